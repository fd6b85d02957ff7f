//! Negative-errno results of librados/librbd calls, turned into kiln errors.

use kiln_core::Error;

/// A failed librados/librbd call: the operation's name and the (positive) errno it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdCallError {
    /// The C function (and object) that failed, e.g. `rbd_snap_create volume-…@snapshot-…`.
    pub op: String,
    /// The positive errno (librbd returns `-errno`).
    pub errno: i32,
}

impl RbdCallError {
    /// Whether the call failed because the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno == libc::ENOENT
    }
}

impl std::fmt::Display for RbdCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed: {} (errno {})",
            self.op,
            std::io::Error::from_raw_os_error(self.errno),
            self.errno
        )
    }
}

impl std::error::Error for RbdCallError {}

impl From<RbdCallError> for std::io::Error {
    fn from(e: RbdCallError) -> Self {
        std::io::Error::new(std::io::Error::from_raw_os_error(e.errno).kind(), e)
    }
}

impl From<RbdCallError> for Error {
    fn from(e: RbdCallError) -> Self {
        let message = format!(
            "{} (errno {})",
            std::io::Error::from_raw_os_error(e.errno),
            e.errno
        );
        // The cluster did not answer in time or the client lost its session: nothing was
        // decided, a later retry may succeed (recovery keeps the operation journaled).
        let transient = matches!(
            e.errno,
            libc::ETIMEDOUT | libc::ENOTCONN | libc::ESHUTDOWN | libc::ECONNREFUSED
        );
        let err = if transient {
            Error::unavailable(e.op.clone(), message)
        } else {
            Error::backend(e.op.clone(), message)
        };
        err.with_source(e)
    }
}

/// Result of a wrapped librbd call.
pub type CallResult<T> = std::result::Result<T, RbdCallError>;

/// Turns a C return code (`< 0` is `-errno`) into a result carrying the non-negative value.
pub fn check(op: impl FnOnce() -> String, rc: i64) -> CallResult<i64> {
    if rc < 0 {
        let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
        Err(RbdCallError { op: op(), errno })
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_codes_become_errors_with_the_op_name() {
        let e = check(|| "rbd_open x".into(), -2).unwrap_err();
        assert!(e.is_not_found());
        assert!(e.to_string().starts_with("rbd_open x failed: "), "{e}");
        assert_eq!(check(|| unreachable!(), 5).unwrap(), 5);
        let k: Error = e.into();
        assert_eq!(k.kind(), kiln_core::ErrorKind::Backend);
    }

    #[test]
    fn a_cluster_that_does_not_answer_is_unavailable_not_a_backend_failure() {
        for errno in [
            libc::ETIMEDOUT,
            libc::ENOTCONN,
            libc::ESHUTDOWN,
            libc::ECONNREFUSED,
        ] {
            let k: Error = check(|| "rbd_snap_create x@y".into(), -i64::from(errno))
                .unwrap_err()
                .into();
            assert_eq!(k.kind(), kiln_core::ErrorKind::Unavailable, "{k}");
        }
        let k: Error = check(|| "rbd_snap_create x@y".into(), -i64::from(libc::EIO))
            .unwrap_err()
            .into();
        assert_eq!(k.kind(), kiln_core::ErrorKind::Backend, "{k}");
    }
}
