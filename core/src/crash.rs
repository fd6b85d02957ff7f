//! Crash-test fail points.
//!
//! Built with the `failpoints` feature, `crash_point!("name")` aborts the process when the
//! `FAILPOINTS` environment variable configures that name (e.g.
//! `FAILPOINTS=create_snapshot::after_driver=return`). The service places them between
//! each driver call and the store update around it, so tests can kill kiln at the two
//! moments crash recovery must handle. Without the feature they compile to nothing.

/// Aborts the process here when the fail point `$name` is configured (feature `failpoints`).
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        $crate::__fail::fail_point!($name, |_| {
            ::tracing::error!(point = $name, "fail point hit: aborting the process");
            ::std::process::abort()
        })
    };
}

/// Aborts the process when the fail point `{op}::{moment}` is configured (feature
/// `failpoints`; without it this does nothing). The operation executor calls it on both
/// sides of every driver call, so crash tests can kill kiln at the two moments recovery
/// must handle.
pub fn crash_point(op: &str, moment: &str) {
    #[cfg(feature = "failpoints")]
    {
        let name = format!("{op}::{moment}");
        if fail::eval(&name, |_| ()).is_some() {
            tracing::error!(point = %name, "fail point hit: aborting the process");
            std::process::abort();
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (op, moment);
}

/// Like [`crash_point`], for async code, with two more actions that catch an operation in
/// flight, holding its locks and its journal entry, without blocking a runtime thread:
/// `return(hang)` (e.g. `FAILPOINTS=create_snapshot::after_driver=return(hang)`) stops it
/// there forever, for tests that kill the process (or the node) under it;
/// `return(sleep:MS)` pauses it for MS milliseconds, then lets it go on.
pub async fn crash_point_async(op: &str, moment: &str) {
    #[cfg(feature = "failpoints")]
    {
        let name = format!("{op}::{moment}");
        match fail::eval(&name, |arg| arg) {
            None => {}
            Some(Some(arg)) if arg == "hang" => {
                tracing::error!(point = %name, "fail point hit: hanging this operation");
                std::future::pending::<()>().await;
            }
            Some(Some(arg)) if arg.starts_with("sleep:") => {
                let ms = arg["sleep:".len()..].parse::<u64>().unwrap_or(0);
                tracing::error!(point = %name, ms, "fail point hit: pausing this operation");
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            Some(_) => {
                tracing::error!(point = %name, "fail point hit: aborting the process");
                std::process::abort();
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (op, moment);
}

/// The argument a test configured for the fail point `name` (`name=return(ARG)`), for
/// tests that set a value rather than stop the process (e.g. the speed of a hypervisor
/// job, so that it surely still runs when the test acts). Always `None` without the
/// `failpoints` feature.
pub fn fail_value(name: &str) -> Option<String> {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |arg| arg).flatten()
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

/// Reads `FAILPOINTS` once at start-up; call from `main` before anything else. Returns a
/// guard to keep alive for the life of the process.
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}
