//! Shared test code. Each test crate uses what it needs of it.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "testing")]
pub mod conformance;
// Behind `testing` too, as are the tests that use it: the reference API's tests include this
// module, and that package has no `testing` feature, nor the crates `mysql` needs.
#[cfg(all(feature = "mysql", feature = "testing"))]
pub mod mysql;

use std::io::Write;

/// Whether the tests run under CI (`CI=true`), where a missing service is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says that `test` is skipped and why, straight to the terminal: unlike `eprintln!`, a direct
/// write is not captured by the test harness, so the line shows without `--nocapture`.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
}

/// The URL in the environment variable `var`. Unset or empty: under CI a failure, elsewhere
/// `None` after saying that `test` is skipped.
pub fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if in_ci() => panic!("{var} is not set, and CI=true: {test} must run"),
        _ => {
            skip(test, &format!("{var} is not set"));
            None
        }
    }
}

/// `error`'s message and those of its sources, outermost first.
pub fn error_chain(error: &dyn std::error::Error) -> Vec<String> {
    let mut chain = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push(cause.to_string());
        source = cause.source();
    }
    chain
}
