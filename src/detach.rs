//! [`Detachable`]: a covered request's handler, run in the request's own task, and handed to a
//! task of its own if the request is dropped before it finishes (its client left), so that it
//! runs to completion either way ([`run_to_completion`](crate::IdempotencyLayer::run_to_completion)).
//!
//! Spawning every handler on a task of its own gives the same guarantee at a price every
//! request pays (a task to schedule and a join handle to wake); this pays for a task only when
//! the client leaves. Either way the work is tracked by the layer's [`TaskTracker`], so that
//! [`Drain`](crate::Drain) waits for it.

use std::{
    any::Any,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::runtime::Handle;
use tokio_util::task::{TaskTracker, task_tracker::TrackedFuture};

/// A panic's payload, as [`std::panic::catch_unwind`] gives it.
pub(crate) type Panic = Box<dyn Any + Send>;

/// `job`, polled in place until it finishes (its output) or panics (the panic's payload);
/// dropped before either, it goes on in a task of its own on the runtime it was polled on.
pub(crate) struct Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// `None` once the job has finished, panicked, or been handed to a task.
    job: Option<Pin<Box<TrackedFuture<F>>>>,
    /// The runtime the job started on, to hand it to if dropped unfinished.
    runtime: Option<Handle>,
}

impl<F> Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// `job`, tracked by `tracker` from now until it finishes, here or in its own task.
    pub(crate) fn new(tracker: &TaskTracker, job: F) -> Self {
        Self {
            job: Some(Box::pin(tracker.track_future(job))),
            runtime: Handle::try_current().ok(),
        }
    }
}

impl<F> Future for Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Panic>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(job) = self.job.as_mut() else {
            panic!("a Detachable polled after it finished");
        };
        let polled = catch_unwind(AssertUnwindSafe(|| job.as_mut().poll(cx)));
        let output = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(panic),
        };
        // Finished or panicked: a panicked job is dropped here (its lease guard releases the
        // lease), never handed to a task.
        self.job = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        // The request was dropped while its handler ran: the handler goes on by itself, on the
        // runtime it started on (wherever the request is dropped).
        match self.runtime.take().or_else(|| Handle::try_current().ok()) {
            Some(runtime) => {
                runtime.spawn(job);
            }
            // Made outside any runtime and dropped outside one: nothing can run it on. Its
            // lease guard goes with it, and the lease expires, so that a retry runs.
            None => drop(job),
        }
    }
}
