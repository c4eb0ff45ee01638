//! What `RedisStore`'s `Debug` output tells an operator: the connection kind, the key prefix,
//! replica waiting (off when asked for 0 replicas), durability, and whether notification is on.
//! Never a password: see `errors_carry_the_driver_error_and_no_credentials` in `redis_store`.
//!
//! Reads `REDIS_URL`; skipped without it, except under `CI=true`.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;

use std::time::Duration;

use tower_idempotency::store::RedisStore;

async fn store(test: &str) -> Option<RedisStore> {
    let url = common::service_url("REDIS_URL", test)?;
    Some(
        RedisStore::open(&url)
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} does not answer: {e}"))
            .prefix("debug-test:"),
    )
}

#[tokio::test]
async fn debug_names_the_settings() {
    let Some(store) = store("debug_names_the_settings").await else {
        return;
    };
    let shown = format!("{store:?}");
    for part in [
        "RedisStore {",
        r#"connection: "single""#,
        r#"prefix: "debug-test:""#,
        "wait: None",
        "notify: true",
        "subscriber: true",
    ] {
        assert!(shown.contains(part), "{part} in {shown}");
    }
    let quiet = format!("{:?}", store.clone().notify(false));
    assert!(quiet.contains("notify: false"), "{quiet}");
}

#[tokio::test]
async fn waiting_for_zero_replicas_is_no_waiting() {
    let Some(store) = store("waiting_for_zero_replicas_is_no_waiting").await else {
        return;
    };
    let off = format!(
        "{:?}",
        store.clone().wait_replicas(0, Duration::from_secs(1))
    );
    assert!(off.contains("wait: None"), "{off}");
    let on = format!("{:?}", store.wait_replicas(1, Duration::from_millis(1500)));
    assert!(
        on.contains("wait: Some(WaitReplicas { replicas: 1, timeout_ms: 1500 })"),
        "{on}"
    );
}
