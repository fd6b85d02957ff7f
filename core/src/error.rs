//! The one error type of kiln, shared by every driver through the `VolumeDriver` trait.
//!
//! Modelled on cloud-hypervisor's `block::Error`: a small, stable [`ErrorKind`] that callers
//! branch on (exit codes, "retry later" in recovery, JSON output), the typed cause kept as
//! [`std::error::Error::source`], and an [`ErrorContext`] (operation, object, backend) for
//! logs. The one-line message is fixed when the error is made, so adding context never
//! changes what a user reads.

use std::borrow::Cow;
use std::fmt;

/// Result alias used across kiln.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Coarse error categories; stable across versions, used for exit codes and JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The named object does not exist (in the store or on the backend).
    NotFound,
    /// The request or the configuration is malformed.
    InvalidInput,
    /// The object exists but its status does not allow the operation.
    WrongState,
    /// The backend refuses because other objects depend on this one
    /// ([`Error::dependents`] names them).
    Busy,
    /// The backend cannot do this (for this object, attachment or configuration).
    Unsupported,
    /// A backend command or library call failed.
    Backend,
    /// The backend cannot answer *right now*: the cluster is unreachable, or another process
    /// holds the object (e.g. qemu's image lock). Nothing was decided; retrying later may
    /// succeed. Recovery keeps such operations journaled instead of recording a failure.
    Unavailable,
    /// The metadata store failed.
    Store,
    /// The owning project's quota does not allow it (API requests only).
    OverLimit,
}

impl ErrorKind {
    /// The process exit code the CLI uses for this kind. 1 and 2 stay reserved for
    /// "internal error" and "usage error" (clap's own code). `Unavailable` shares the
    /// backend-failure code so scripts written against earlier versions keep working.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::NotFound => 3,
            ErrorKind::InvalidInput => 4,
            ErrorKind::WrongState => 5,
            ErrorKind::Busy => 6,
            ErrorKind::Unsupported => 7,
            ErrorKind::Backend | ErrorKind::Unavailable => 8,
            ErrorKind::Store => 9,
            ErrorKind::OverLimit => 10,
        }
    }

    /// The kind as printed and stored (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::WrongState => "wrong_state",
            ErrorKind::Busy => "busy",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Backend => "backend",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Store => "store",
            ErrorKind::OverLimit => "over_limit",
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
            ErrorKind::Unavailable => "backend unavailable",
            ErrorKind::Store => "store failure",
            ErrorKind::OverLimit => "quota exceeded",
        };
        f.write_str(s)
    }
}

/// Where an error happened, for logs and diagnostics (never part of the one-line message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorContext {
    /// The operation, e.g. "create_snapshot" or "qemu-img commit".
    pub op: Option<Cow<'static, str>>,
    /// The object, e.g. a volume or snapshot id.
    pub object: Option<String>,
    /// The configured backend name.
    pub backend: Option<String>,
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<Source>,
    context: ErrorContext,
    dependents: Vec<String>,
}

/// A kiln error: a kind, a one-line message, the typed cause and context.
///
/// Returning an error means nothing changed, unless the message says otherwise: callers
/// leave the store and the backend as they found them.
pub struct Error(Box<Inner>);

impl Error {
    /// An error of `kind` with the one-line `message` (the whole text the user reads).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            source: None,
            context: ErrorContext::default(),
            dependents: Vec::new(),
        }))
    }

    /// `{what} {id} not found`.
    pub fn not_found(what: &str, id: impl fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, format!("{what} {id} not found")).with_object(id)
    }

    /// `invalid {what}: {reason}` — the request is malformed.
    pub fn invalid(what: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidInput, format!("invalid {what}: {reason}"))
    }

    /// `configuration: {msg}` — the configuration is unusable.
    pub fn config(msg: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidInput, format!("configuration: {msg}"))
    }

    /// The object's status does not allow the operation; `msg` says what it is and must be.
    pub fn wrong_state(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::WrongState, msg)
    }

    /// The backend refuses because `dependents` (ids or backend names) depend on the object.
    pub fn busy(reason: impl Into<String>, dependents: Vec<String>) -> Self {
        let mut e = Self::new(ErrorKind::Busy, reason);
        e.0.dependents = dependents;
        e
    }

    /// `unsupported: {msg}`.
    pub fn unsupported(msg: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Unsupported, format!("unsupported: {msg}"))
    }

    /// `backend operation {op} failed: {message}` — `message` is the backend's own words.
    pub fn backend(op: impl Into<Cow<'static, str>>, message: impl fmt::Display) -> Self {
        let op = op.into();
        Self::new(
            ErrorKind::Backend,
            format!("backend operation {op} failed: {message}"),
        )
        .with_op(op)
    }

    /// Like [`Error::backend`], but the backend could not answer now (unreachable, or the
    /// object is held by another process): see [`ErrorKind::Unavailable`].
    pub fn unavailable(op: impl Into<Cow<'static, str>>, message: impl fmt::Display) -> Self {
        let op = op.into();
        Self::new(
            ErrorKind::Unavailable,
            format!("backend operation {op} failed: {message}"),
        )
        .with_op(op)
    }

    /// `store: {msg}`.
    pub fn store(msg: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Store, format!("store: {msg}"))
    }

    /// `{context}: {source}` — a local I/O error, with what kiln was doing. The OS error is
    /// kept as the source.
    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        Self::new(ErrorKind::Backend, format!("{context}: {source}")).with_source(source)
    }

    /// Keeps `source` as the typed cause (see [`std::error::Error::source`]).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.0.source = Some(Box::new(source));
        self
    }

    /// Records the operation in the context (only if none is recorded yet: the innermost
    /// operation is the most precise).
    pub fn with_op(mut self, op: impl Into<Cow<'static, str>>) -> Self {
        self.0.context.op.get_or_insert_with(|| op.into());
        self
    }

    /// Records the object in the context (only if none is recorded yet).
    pub fn with_object(mut self, object: impl fmt::Display) -> Self {
        self.0
            .context
            .object
            .get_or_insert_with(|| object.to_string());
        self
    }

    /// Records the backend in the context (only if none is recorded yet).
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.0.context.backend.get_or_insert_with(|| backend.into());
        self
    }

    /// Prefixes the one-line message with what it concerns (e.g. `volume <id> (backend
    /// b)`), for errors of one member among many.
    pub fn about(mut self, what: impl fmt::Display) -> Self {
        self.0.message = format!("{what}: {}", self.0.message);
        self
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The one-line message (what `Display` prints).
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Where it happened.
    pub fn context(&self) -> &ErrorContext {
        &self.0.context
    }

    /// For [`ErrorKind::Busy`]: the dependent objects the backend named.
    pub fn dependents(&self) -> &[String] {
        &self.0.dependents
    }

    /// The OS error kind, when the cause is a local I/O error.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        self.0
            .source
            .as_deref()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind)
    }

    /// Whether retrying later may succeed without anyone changing anything
    /// ([`ErrorKind::Unavailable`]).
    pub fn is_transient(&self) -> bool {
        self.0.kind == ErrorKind::Unavailable
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.0.kind)
            .field("message", &self.0.message);
        if self.0.context != ErrorContext::default() {
            d.field("context", &self.0.context);
        }
        if !self.0.dependents.is_empty() {
            d.field("dependents", &self.0.dependents);
        }
        if let Some(s) = &self.0.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// An error with its causes, each once: a client library's own text ("db error") says
/// nothing without the server's message underneath.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text = format!("{text}: {t}");
        }
        cause = c.source();
    }
    text
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        // SQLITE_BUSY after the busy timeout: another process holds the write lock.
        let busy = matches!(
            &e,
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        let err = Error::store(&e);
        let err = if busy {
            Error::new(ErrorKind::Unavailable, err.message().to_string())
        } else {
            err
        };
        err.with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stay_one_line_and_keep_the_typed_cause() {
        let os = std::io::Error::from_raw_os_error(libc_enoent());
        let e = Error::io("open /x", os)
            .with_op("create_volume")
            .with_backend("default");
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(e.to_string().starts_with("open /x: "));
        let src = std::error::Error::source(&e).expect("source kept");
        let io = src
            .downcast_ref::<std::io::Error>()
            .expect("typed io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(e.context().op.as_deref(), Some("create_volume"));
        assert_eq!(e.context().backend.as_deref(), Some("default"));
        // The innermost op wins: outer layers do not overwrite it.
        let e = e.with_op("outer");
        assert_eq!(e.context().op.as_deref(), Some("create_volume"));
    }

    #[test]
    fn unavailable_is_transient_and_keeps_the_backend_exit_code() {
        let e = Error::unavailable("rados connect", "timed out");
        assert!(e.is_transient());
        assert_eq!(
            e.kind().exit_code(),
            Error::backend("x", "y").kind().exit_code()
        );
        assert!(!Error::backend("x", "y").is_transient());
        assert_eq!(
            e.to_string(),
            "backend operation rados connect failed: timed out"
        );
    }

    #[test]
    fn busy_names_its_dependents() {
        let e = Error::busy("snapshot s has clones", vec!["c1".into()]);
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert_eq!(e.dependents(), ["c1".to_string()]);
        assert_eq!(e.to_string(), "snapshot s has clones");
    }

    fn libc_enoent() -> i32 {
        2
    }
}
