//! [`Drain`]: waiting for a layer's detached work at shutdown.

use std::{fmt, time::Duration};

use tokio_util::task::TaskTracker;

/// Waits, at shutdown, for the work a layer detached from its requests: handlers still running
/// for clients that left ([`run_to_completion`](crate::IdempotencyLayer::run_to_completion)),
/// responses whose storing is still being retried after a store failure, and lease releases.
/// Without it, a process that exits leaves that work's leases to expire, and the retries that
/// follow on another instance run the requests again.
///
/// Get one from [`IdempotencyLayer::drain_handle`](crate::IdempotencyLayer::drain_handle) and
/// wait on it after the server has stopped taking requests, for example after axum's
/// `with_graceful_shutdown`:
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower_idempotency::IdempotencyLayer;
///
/// let layer = IdempotencyLayer::new();
/// let drain = layer.drain_handle();
/// let app: Router = Router::new().route("/calls", post(|| async { "created" })).route_layer(layer);
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// if let Err(timed_out) = drain.wait(Duration::from_secs(30)).await {
///     eprintln!("{timed_out}");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Drain {
    pub(crate) tracker: TaskTracker,
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("pending", &self.pending())
            .finish()
    }
}

impl Drain {
    /// How many pieces of detached work are running now.
    pub fn pending(&self) -> usize {
        self.tracker.len()
    }

    /// Waits until every piece of detached work has finished, or `timeout` has passed.
    ///
    /// Work the layer detaches after this call is waited for too. Errors with
    /// [`DrainTimedOut`] (saying how much work was left) when the timeout passes first; that
    /// work's leases then expire by themselves, and the retries after that run again.
    pub async fn wait(&self, timeout: Duration) -> Result<(), DrainTimedOut> {
        self.tracker.close();
        match tokio::time::timeout(timeout, self.tracker.wait()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(DrainTimedOut {
                pending: self.pending(),
                timeout,
            }),
        }
    }
}

/// [`Drain::wait`] ran out of time with work still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainTimedOut {
    /// How many pieces of detached work were still running.
    pub pending: usize,
    /// The timeout that passed.
    pub timeout: Duration,
}

impl fmt::Display for DrainTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "idempotency drain timed out after {:?} with {} detached requests or completions \
             still running; their leases will expire and their retries run again",
            self.timeout, self.pending
        )
    }
}

impl std::error::Error for DrainTimedOut {}
