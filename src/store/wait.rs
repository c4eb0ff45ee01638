//! The end of a notified [`wait`](super::IdempotencyStore::wait), alike for the stores that wake
//! waiting duplicates (PostgreSQL by `LISTEN`, Redis by `SUBSCRIBE`), once the waiter listens on
//! its record's channel.

use std::future::Future;

use tokio::time::Instant;

/// Asks `in_flight` whether the record is still in flight (it may have changed between the
/// caller's `begin` and the listening): if not, returns at once; if so, returns when `changed`
/// or `disconnected` fires, or at `deadline`. An `in_flight` that fails sleeps out the
/// deadline, so that the caller polls, as without notification.
pub(super) async fn until_changed<E>(
    deadline: Instant,
    in_flight: impl Future<Output = Result<bool, E>>,
    changed: impl Future,
    disconnected: impl Future,
) {
    match tokio::time::timeout_at(deadline, in_flight).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return,
        Ok(Err(_)) => {
            tokio::time::sleep_until(deadline).await;
            return;
        }
        Err(_) => return,
    }
    tokio::select! {
        _ = changed => {}
        _ = disconnected => {}
        _ = tokio::time::sleep_until(deadline) => {}
    }
}
