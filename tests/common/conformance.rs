//! The store conformance suite lives in the crate (feature `testing`), so that users run it on
//! their own stores; the tests here run it on every built-in one.
#[allow(unused_imports)]
pub use tower_idempotency::testing::conformance::*;
