//! The store conformance suite: the whole [`IdempotencyStore`] contract, run once per backend.
//! Every store of this crate passes it; run it on yours in one call:
//!
//! ```no_run
//! # #[derive(Clone)] struct MyStore;
//! # #[tower_idempotency::async_trait] impl tower_idempotency::IdempotencyStore for MyStore {
//! #   async fn begin(&self, _: &tower_idempotency::store::StoreKey, _: &tower_idempotency::store::Fingerprint, _: std::time::Duration) -> Result<tower_idempotency::store::Begin, tower_idempotency::store::StoreError> { unimplemented!() }
//! #   async fn renew(&self, _: &tower_idempotency::store::StoreKey, _: tower_idempotency::store::LeaseToken, _: std::time::Duration) -> Result<bool, tower_idempotency::store::StoreError> { unimplemented!() }
//! #   async fn complete(&self, _: &tower_idempotency::store::StoreKey, _: tower_idempotency::store::LeaseToken, _: &tower_idempotency::StoredResponse, _: std::time::Duration) -> Result<bool, tower_idempotency::store::StoreError> { unimplemented!() }
//! #   async fn release(&self, _: &tower_idempotency::store::StoreKey, _: tower_idempotency::store::LeaseToken) -> Result<bool, tower_idempotency::store::StoreError> { unimplemented!() }
//! # }
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn my_store_meets_the_contract() {
//!     tower_idempotency::testing::conformance::run_all(MyStore).await;
//! }
//! ```
//!
//! A check that fails panics with the rule that broke, as in ``store conformance: rule
//! `release_lets_next_begin_acquire` broke: ...``. Your store must be `Clone` (derive it, or pass an
//! `Arc` of it): checks that race several calls share it between tasks.
//!
//! Which clock: run it on the real clock (as above) for a store that keeps time on a server or
//! on `std::time::Instant`. A store on tokio's clock (`tokio::time::Instant`) may run it on a
//! paused clock instead (`#[tokio::test(start_paused = true)]`, which needs tokio's `test-util`
//! feature), where the waits cost nothing. Never pause the clock for a store on
//! `std::time::Instant`: its deadlines would not move, and `expired_lease_is_taken_over` fails
//! with `expected Acquired, got InFlight`.
//!
//! `run_all(store).await` runs every check; each check is also a `pub async fn` of its own, so
//! a failure names the rule that broke. Every check uses fresh random keys and fingerprints, so
//! a store shared by several tests (or several runs, as with Redis and PostgreSQL) never sees
//! one check's records in another.
//!
//! Durations are kept short (a few hundred milliseconds) because shared stores keep time on
//! the server's clock, so expiry needs real waiting; under a paused tokio clock the sleeps
//! cost nothing.
mod begin;
mod expiry;
mod fencing;
mod fixtures;
mod replay;

pub use begin::{
    begin_on_absent_key_acquires, begin_on_held_lease_reports_in_flight,
    concurrent_begin_acquires_exactly_once, release_lets_next_begin_acquire,
    wait_returns_within_timeout,
};
pub use expiry::{
    completed_record_expires_after_ttl, deadlines_are_not_early, expired_lease_is_taken_over,
    late_completion_without_takeover_is_consistent, renew_extends_lease_past_original_expiry,
};
pub use fencing::{
    calls_on_absent_key_return_false, wrong_token_changes_nothing,
    wrong_token_on_completed_changes_nothing,
};
pub use fixtures::{
    LONG, MARGIN, SHORT, acquire, binary_response, empty_response, expect_completed,
    expect_in_flight, marked_response, problem_response, random_fingerprint, random_key,
};
pub use replay::{complete_needs_a_live_lease, complete_then_begin_replays_byte_exact};

use crate::store::IdempotencyStore;

/// Runs every check of the suite on `store`, one after another.
pub async fn run_all<S: IdempotencyStore + Clone>(store: S) {
    // Each check's name goes to stderr first, so a failing run shows which rule broke.
    macro_rules! checks {
        ($($check:ident),* $(,)?) => {$(
            eprintln!("store conformance: {}", stringify!($check));
            check_named(stringify!($check), $check(&store)).await;
        )*};
    }
    checks!(
        begin_on_absent_key_acquires,
        begin_on_held_lease_reports_in_flight,
        complete_then_begin_replays_byte_exact,
        complete_needs_a_live_lease,
        wrong_token_changes_nothing,
        wrong_token_on_completed_changes_nothing,
        calls_on_absent_key_return_false,
        release_lets_next_begin_acquire,
        expired_lease_is_taken_over,
        late_completion_without_takeover_is_consistent,
        renew_extends_lease_past_original_expiry,
        completed_record_expires_after_ttl,
        deadlines_are_not_early,
        concurrent_begin_acquires_exactly_once,
        wait_returns_within_timeout,
    );
}

/// Runs one check; a failure panics again with the rule's name in front of its message.
async fn check_named(name: &str, check: impl std::future::Future<Output = ()>) {
    use futures_util::FutureExt;

    if let Err(panic) = std::panic::AssertUnwindSafe(check).catch_unwind().await {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("store conformance: rule `{name}` broke: {message}");
    }
}
