//! A database that cannot be reached is reported at once, with the driver's cause, not after a
//! pool timeout with the cause lost. Needs no running service: it connects to a closed port.
#![cfg(any(feature = "postgres", feature = "mysql"))]

use std::time::{Duration, Instant};

#[allow(unused_macros)]
macro_rules! refused_at_once {
    ($connect:expr) => {{
        let started = Instant::now();
        let error = $connect.await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        let diagnostic = error.diagnostic();
        assert!(
            diagnostic.to_lowercase().contains("refused"),
            "{diagnostic}"
        );
        assert!(!diagnostic.contains("secret"), "{diagnostic}");
    }};
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_connect_fails_at_once_with_the_cause() {
    refused_at_once!(tower_idempotency::store::PostgresStore::connect(
        "postgres://app:secret@127.0.0.1:1/app"
    ));
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mysql_connect_fails_at_once_with_the_cause() {
    refused_at_once!(tower_idempotency::store::MySqlStore::connect(
        "mysql://app:secret@127.0.0.1:1/app"
    ));
}
