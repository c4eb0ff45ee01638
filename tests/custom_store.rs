//! The store from `examples/custom_store.rs` against the store conformance suite.
#![cfg(feature = "testing")]
mod common;

// The example program itself; its `main` is not used here.
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/custom_store.rs"]
mod custom_store;

use custom_store::HashMapStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_real_clock() {
    common::conformance::run_all(HashMapStore::default()).await;
}

#[tokio::test(start_paused = true)]
async fn conformance_on_paused_clock() {
    common::conformance::run_all(HashMapStore::default()).await;
}
