//! The lease an owner holds while its request runs: [`LeaseGuard`], renewal, and durable
//! completion (an owner whose handler has finished keeps its claim alive until the response is
//! stored).

use std::{future::Future, sync::Arc, time::Duration};

use http::Method;
use tokio::time::Instant;

use crate::{
    config::Config,
    instrument::{self, Op},
    store::{LeaseToken, StoreError, StoreErrorKind, StoreKey, StoredResponse},
};

/// Runs a store call under the configured timeout.
pub(crate) async fn store_call<T>(
    config: &Config,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(config.store_timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::new(
            StoreErrorKind::Timeout,
            "store call timed out",
        )),
    }
}

/// The pause before the next try of a failed renewal or completion: 50 ms doubling to 1 s, and
/// never more than a quarter of the lease, so that a store that comes back within the lease
/// hears from the owner before the lease runs out.
pub(crate) fn retry_pause(lease: Duration, attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.min(5))
        .min(Duration::from_secs(1))
        .min(lease / 4)
}

/// Owns a lease until it is completed or released; dropping it while armed (a panic, a
/// cancelled future) releases the lease in the background so a retry can run.
pub(crate) struct LeaseGuard {
    pub(crate) config: Arc<Config>,
    pub(crate) key: StoreKey,
    pub(crate) token: Option<LeaseToken>,
}

impl LeaseGuard {
    pub(crate) fn token(&self) -> LeaseToken {
        self.token.expect("lease guard used after it was settled")
    }

    /// Hands the lease over to another owner.
    pub(crate) fn take(&mut self) -> LeaseToken {
        self.token
            .take()
            .expect("lease guard used after it was settled")
    }

    /// Releases the lease now, so that the next request with the key runs.
    pub(crate) async fn release(&mut self) {
        if let Some(token) = self.token.take() {
            release(&self.config, &self.key, token).await;
        }
    }
}

/// Drops the lease on `key` if `token` still owns it. A failure is logged: the lease then
/// expires by itself.
pub(crate) async fn release(config: &Config, key: &StoreKey, token: LeaseToken) {
    let released = instrument::timed(
        Op::Release,
        store_call(config, config.store.release(key, token)),
    );
    if let Err(error) = released.await {
        tracing::warn!(
            target: "tower_idempotency",
            cause = %error.diagnostic(),
            "could not release an idempotency lease; it will expire"
        );
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let config = self.config.clone();
        let key = self.key;
        config
            .tracker
            .clone()
            .spawn(async move { release(&config, &key, token).await });
    }
}

/// Drives `work` while keeping the guard's lease alive: renewed every third of the lease, and
/// a renewal that failed is tried again after [`retry_pause`] rather than a whole third later.
///
/// Renewals run beside `work`, not in turn with it: a renewal that waits for a slow or hanging
/// store (up to the store timeout) never holds the handler up.
pub(crate) async fn renewing<T>(
    config: &Config,
    guard: &LeaseGuard,
    work: impl Future<Output = T>,
) -> T {
    let renewals = async {
        let every = config.lease / 3;
        let mut next = Instant::now() + every;
        let mut failures = 0;
        loop {
            tokio::time::sleep_until(next).await;
            let renewed = instrument::timed(
                Op::Renew,
                store_call(
                    config,
                    config.store.renew(&guard.key, guard.token(), config.lease),
                ),
            )
            .await;
            match renewed {
                Ok(true) => {
                    failures = 0;
                    next = Instant::now() + every;
                }
                Ok(false) => {
                    tracing::warn!(target: "tower_idempotency", "idempotency lease was lost while the handler ran");
                    next = Instant::now() + every;
                }
                Err(error) => {
                    tracing::warn!(target: "tower_idempotency", cause = %error.diagnostic(), "could not renew an idempotency lease; trying again");
                    next = Instant::now() + retry_pause(config.lease, failures);
                    failures += 1;
                }
            }
        }
    };
    tokio::select! {
        biased;
        done = work => done,
        _ = renewals => unreachable!("renewals run until the work is done"),
    }
}

/// What became of a completion, for the trace.
pub(crate) const STORED: &str = "stored";
pub(crate) const LEASE_LOST: &str = "lease lost, not stored";
pub(crate) const COMPLETING: &str = "store failed, completing in the background";

/// Stores `stored` under the guard's lease, durably.
///
/// The first try happens here, so a healthy store has the response before the client does.
/// When it fails, the owner keeps its claim alive in the background (see [`keep_completing`])
/// and the client gets its response at once; duplicates meanwhile get 409 (or wait), never a
/// second run. The lease is never released after the handler ran.
pub(crate) async fn complete(
    mut guard: LeaseGuard,
    stored: StoredResponse,
    method: &Method,
    path: &str,
) -> &'static str {
    let token = guard.take();
    let config = guard.config.clone();
    let key = guard.key;
    let first = instrument::timed(
        Op::Complete,
        store_call(
            &config,
            config.store.complete(&key, token, &stored, config.ttl),
        ),
    )
    .await;
    match first {
        Ok(true) => STORED,
        Ok(false) => {
            lease_lost(method, path);
            LEASE_LOST
        }
        Err(error) => {
            tracing::warn!(
                target: "tower_idempotency",
                %method,
                path,
                cause = %error.diagnostic(),
                "could not store the response; the owner keeps its lease and tries again"
            );
            let (method, path) = (method.clone(), path.to_owned());
            let tracker = config.tracker.clone();
            tracker.spawn(async move {
                keep_completing(&config, &key, token, &stored, &method, &path).await;
            });
            COMPLETING
        }
    }
}

fn lease_lost(method: &Method, path: &str) {
    tracing::warn!(
        target: "tower_idempotency",
        %method,
        path,
        "lease was lost before completion (it expired and was taken over); response not stored"
    );
}

fn refused_after_error(method: &Method, path: &str) {
    tracing::warn!(
        target: "tower_idempotency",
        %method,
        path,
        "the store refused a later try to store the response: an earlier try whose answer was \
         lost stored it, or the lease was lost (it expired and was taken over)"
    );
}

/// Tries `complete` again until the store takes the response, the store says the token lost
/// the lease, or the layer's completion deadline passes; the lease is renewed every third of
/// its duration meanwhile, so that no duplicate takes it over while the store is back but
/// `complete` still fails. Each try waits [`retry_pause`] first.
async fn keep_completing(
    config: &Config,
    key: &StoreKey,
    token: LeaseToken,
    stored: &StoredResponse,
    method: &Method,
    path: &str,
) {
    let deadline = Instant::now() + config.completion_deadline;
    let every = config.lease / 3;
    let mut next_renewal = Instant::now() + every;
    let mut attempt = 0;
    loop {
        tokio::time::sleep(retry_pause(config.lease, attempt)).await;
        attempt += 1;
        instrument::completion_retry();
        let completed = instrument::timed(
            Op::Complete,
            store_call(
                config,
                config.store.complete(key, token, stored, config.ttl),
            ),
        );
        let error = match completed.await {
            Ok(true) => {
                tracing::info!(
                    target: "tower_idempotency",
                    %method,
                    path,
                    attempts = attempt + 1,
                    "response stored on a later try"
                );
                return;
            }
            // An earlier try that reported an error may have stored the response after all
            // (its reply was lost); the store cannot tell that from a lost lease.
            Ok(false) => return refused_after_error(method, path),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            tracing::error!(
                target: "tower_idempotency",
                %method,
                path,
                attempts = attempt + 1,
                cause = %error.diagnostic(),
                "could not store the response before the completion deadline; its lease will \
                 expire, and a retry after that runs the request again"
            );
            return;
        }
        if Instant::now() >= next_renewal {
            let renewed = instrument::timed(
                Op::Renew,
                store_call(config, config.store.renew(key, token, config.lease)),
            );
            match renewed.await {
                Ok(true) => next_renewal = Instant::now() + every,
                Ok(false) => return lease_lost(method, path),
                // The store is still failing; the next try of `complete` comes soon.
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pause_doubles_from_50_ms_to_one_second_and_stays_under_a_quarter_lease() {
        let lease = Duration::from_secs(60);
        let pauses: Vec<u64> = (0..8)
            .map(|n| retry_pause(lease, n).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(
            retry_pause(Duration::from_millis(400), 7),
            Duration::from_millis(100)
        );
    }
}
