//! [`FaultyStore`]: a store wrapper that injects faults into chosen calls.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_trait::async_trait;

use crate::store::{
    Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreErrorKind, StoreKey,
    StoredResponse,
};

/// A method of [`IdempotencyStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    /// [`IdempotencyStore::begin`].
    Begin,
    /// [`IdempotencyStore::renew`].
    Renew,
    /// [`IdempotencyStore::complete`].
    Complete,
    /// [`IdempotencyStore::release`].
    Release,
    /// [`IdempotencyStore::wait`].
    Wait,
}

const OPS: usize = 5;

impl StoreOp {
    fn index(self) -> usize {
        self as usize
    }
}

/// What a [`FaultyStore`] does with one kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward the call to the wrapped store.
    #[default]
    None,
    /// Fail at once with [`StoreErrorKind::Unavailable`], without forwarding.
    Fail,
    /// Never answer (the layer's store timeout then ends the call).
    Hang,
    /// Wait this long, then forward.
    Delay(Duration),
    /// Forward, then fail with [`StoreErrorKind::Unavailable`]: the store did the work, but its
    /// answer was lost on the way back.
    LoseReply,
}

/// A store that forwards to another and injects a [`Fault`] into the calls you choose, for
/// testing how an application behaves when its store is down, slow, or loses replies. Clones
/// share their faults and counts, so a test keeps a clone and changes the faults while the
/// layer uses the store.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
/// use tower_idempotency::testing::{Fault, FaultyStore, StoreOp};
///
/// let store = FaultyStore::new(MemoryStore::new());
/// let layer = IdempotencyLayer::new().store(store.clone());
/// // The store fails to store responses until told otherwise.
/// store.set(StoreOp::Complete, Fault::Fail);
/// // ...
/// store.set(StoreOp::Complete, Fault::Delay(Duration::from_millis(300)));
/// store.clear();
/// assert_eq!(store.calls(StoreOp::Begin), 0);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: S,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    faults: [Fault; OPS],
    calls: [u64; OPS],
}

impl<S> fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("FaultyStore")
            .field("faults", &state.faults)
            .field("calls", &state.calls)
            .finish_non_exhaustive()
    }
}

impl<S: IdempotencyStore> FaultyStore<S> {
    /// Wraps `inner`, with no faults.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: Arc::default(),
        }
    }

    /// From now on, calls of `op` meet `fault`.
    pub fn set(&self, op: StoreOp, fault: Fault) {
        self.lock().faults[op.index()] = fault;
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.lock().faults = [Fault::None; OPS];
    }

    /// How many calls of `op` were made, faulty or not.
    pub fn calls(&self, op: StoreOp) -> u64 {
        self.lock().calls[op.index()]
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call and runs its fault around `call`.
    async fn run<T>(
        &self,
        op: StoreOp,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let fault = {
            let mut state = self.lock();
            state.calls[op.index()] += 1;
            state.faults[op.index()]
        };
        match fault {
            Fault::None => call.await,
            Fault::Fail => Err(injected()),
            Fault::Hang => std::future::pending().await,
            Fault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                call.await
            }
            Fault::LoseReply => {
                let _ = call.await;
                Err(injected())
            }
        }
    }
}

fn injected() -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, "injected store fault")
}

#[async_trait]
impl<S: IdempotencyStore> IdempotencyStore for FaultyStore<S> {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.run(StoreOp::Begin, self.inner.begin(key, fingerprint, lease))
            .await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.run(StoreOp::Renew, self.inner.renew(key, token, lease))
            .await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.run(
            StoreOp::Complete,
            self.inner.complete(key, token, response, ttl),
        )
        .await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.run(StoreOp::Release, self.inner.release(key, token))
            .await
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.run(StoreOp::Wait, self.inner.wait(key, timeout)).await
    }
}
