//! The listener's bookkeeping, against a real PostgreSQL: the last waiter out of a channel has
//! it unlistened and forgotten, and a waiter that stays keeps it listened to. Needs
//! `DATABASE_URL`; skipped without it, except under `CI=true`.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::time::Instant;

use super::Listener;
use crate::store::test_services::{service_url, unique_name};

async fn pool(test: &str) -> Option<PgPool> {
    let url = service_url("DATABASE_URL", test)?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at DATABASE_URL is unreachable: {e}"));
    Some(pool)
}

/// A channel no other test run uses.
fn channel(test: &str) -> String {
    unique_name("idempotency_test", test, '_')
}

/// Whether the listener still keeps `channel` within `within`.
async fn still_kept(listener: &Listener, channel: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let kept = listener
            .shared
            .channels
            .lock()
            .unwrap()
            .contains_key(channel);
        if !kept || Instant::now() >= deadline {
            return kept;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_last_waiter_out_has_the_channel_forgotten() {
    let Some(pool) = pool("the_last_waiter_out_has_the_channel_forgotten").await else {
        return;
    };
    let listener = Listener::new(&pool);
    let channel = channel("forgotten");
    listener
        .wait(&channel, async { Ok(true) }, Duration::from_millis(300))
        .await;
    assert!(
        !still_kept(&listener, &channel, Duration::from_secs(5)).await,
        "a channel nobody waits on any more is forgotten (and unlistened)"
    );
    assert_eq!(listener.shared.waiters(&channel), 0);
}

#[tokio::test]
async fn a_waiter_that_stays_is_still_woken_after_another_leaves() {
    let Some(pool) = pool("a_waiter_that_stays_is_still_woken_after_another_leaves").await else {
        return;
    };
    let listener = Listener::new(&pool);
    let channel = channel("stays");
    let stays = {
        let listener = listener.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            listener
                .wait(&channel, async { Ok(true) }, Duration::from_secs(30))
                .await;
        })
    };
    // The first waiter is counted (and listening) before the second one comes and goes.
    let counted = Instant::now() + Duration::from_secs(5);
    while listener.shared.waiters(&channel) == 0 {
        assert!(Instant::now() < counted, "the staying waiter is counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    listener
        .wait(&channel, async { Ok(true) }, Duration::from_millis(300))
        .await;
    assert_eq!(listener.shared.waiters(&channel), 1);
    // Let the listener handle what the leaving waiter asked of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(still_kept(&listener, &channel, Duration::ZERO).await);

    sqlx::query("SELECT pg_notify($1, '')")
        .bind(&channel)
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), stays)
        .await
        .expect("the staying waiter is woken by the notification, not by its 30 s timeout")
        .unwrap();
}
