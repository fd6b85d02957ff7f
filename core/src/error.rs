//! The one error type of kiln-core, shared by every driver through the `VolumeDriver` trait.

use std::fmt;

/// Result alias used across kiln.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in categories the CLI maps to distinct exit codes.
///
/// Each variant carries enough context (object, operation, backend message) to print a useful
/// one-line error; none of them means "something changed": callers that return an error leave
/// the store and the backend as they found them unless the message says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named object does not exist (in the store or on the backend).
    #[error("{what} {id} not found")]
    NotFound {
        /// Kind of object: "volume", "snapshot", "backend", ...
        what: &'static str,
        /// The id or name that was looked up.
        id: String,
    },
    /// The request itself is malformed (bad size, bad name, bad id, bad config value).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which input was wrong.
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// The object exists but its status does not allow the operation.
    #[error("{0}")]
    WrongState(String),
    /// The backend refuses because other objects depend on this one.
    #[error("{reason}")]
    Busy {
        /// Human-readable reason, naming the dependents.
        reason: String,
        /// Ids (or backend names) of the dependent objects.
        dependents: Vec<String>,
    },
    /// The backend cannot do this (for this object, attachment or configuration).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A backend command or library call failed; `message` is the backend's own words.
    #[error("backend operation {op} failed: {message}")]
    Backend {
        /// The operation, e.g. "qemu-img create" or "rbd_snap_create".
        op: String,
        /// The backend's own message.
        message: String,
    },
    /// The metadata store failed.
    #[error("store: {0}")]
    Store(String),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A local I/O error, with what kiln was doing.
    #[error("{context}: {source}")]
    Io {
        /// What kiln was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Coarse error categories; stable across versions, used for exit codes and JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// See [`Error::NotFound`].
    NotFound,
    /// See [`Error::Invalid`] and [`Error::Config`].
    InvalidInput,
    /// See [`Error::WrongState`].
    WrongState,
    /// See [`Error::Busy`].
    Busy,
    /// See [`Error::Unsupported`].
    Unsupported,
    /// See [`Error::Backend`] and [`Error::Io`].
    Backend,
    /// See [`Error::Store`].
    Store,
}

impl ErrorKind {
    /// The process exit code the CLI uses for this kind. 1 and 2 stay reserved for
    /// "internal error" and "usage error" (clap's own code).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::NotFound => 3,
            ErrorKind::InvalidInput => 4,
            ErrorKind::WrongState => 5,
            ErrorKind::Busy => 6,
            ErrorKind::Unsupported => 7,
            ErrorKind::Backend => 8,
            ErrorKind::Store => 9,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::WrongState => "wrong state",
            ErrorKind::Busy => "busy",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Backend => "backend failure",
            ErrorKind::Store => "store failure",
        };
        f.write_str(s)
    }
}

impl Error {
    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Invalid { .. } | Error::Config(_) => ErrorKind::InvalidInput,
            Error::WrongState(_) => ErrorKind::WrongState,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Backend { .. } | Error::Io { .. } => ErrorKind::Backend,
            Error::Store(_) => ErrorKind::Store,
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Backend`].
    pub fn backend(op: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Backend {
            op: op.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}
