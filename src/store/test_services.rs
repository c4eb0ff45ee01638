//! What the crate's own tests against real servers share: the server's URL from the
//! environment, as the integration tests read it, and names no other run uses.

use std::{
    io::Write,
    time::{SystemTime, UNIX_EPOCH},
};

/// The URL in the environment variable `var`. Unset or empty: under `CI=true` a failure,
/// elsewhere `None` after saying that `test` is skipped (straight to the terminal, so that the
/// line shows without `--nocapture`).
pub(crate) fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("{var} is not set, and CI=true: {test} must run")
        }
        _ => {
            let _ = writeln!(std::io::stderr(), "skipped {test}: {var} is not set");
            None
        }
    }
}

/// `prefix`, `name`, this process's id and the time in nanoseconds, joined by `sep`: a name
/// no other test or run uses.
pub(crate) fn unique_name(prefix: &str, name: &str, sep: char) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{sep}{name}{sep}{}{sep}{nanos}", std::process::id())
}
