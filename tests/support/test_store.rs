//! [`TestStore`]: a store wrapper that injects [`Fault`]s into the calls the layer makes and
//! publishes what the layer asked of it as [`Events`], so that tests wait on what happened.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tower_idempotency::{
    IdempotencyStore,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey, StoredResponse},
};

use super::within;

/// What a [`TestStore`] does on one kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward to the wrapped store.
    #[default]
    None,
    /// Fail with [`StoreErrorKind::Unavailable`] without forwarding.
    Fail,
    /// Never answer.
    Hang,
    /// `begin` only: forward, and when that acquires a lease, keep the token (see
    /// [`TestStore::abandoned`]) and fail as if the owner had crashed right after acquiring.
    Abandon,
}

/// The fault for each store method.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub begin: Fault,
    pub renew: Fault,
    pub complete: Fault,
    pub release: Fault,
    pub wait: Fault,
}

/// What the layer asked of a [`TestStore`], counted by answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    pub begins: usize,
    pub acquired: usize,
    pub in_flight: usize,
    pub found_completed: usize,
    pub renews: usize,
    pub renewed: usize,
    pub completes: usize,
    pub completed: usize,
    pub releases: usize,
    pub released: usize,
    pub waits: usize,
}

/// A store wrapper that injects [`Fault`]s and publishes [`Events`] (so tests wait on what
/// happened instead of sleeping). Clones share faults and events.
#[derive(Clone)]
pub struct TestStore {
    inner: Arc<dyn IdempotencyStore>,
    faults: Arc<Mutex<Faults>>,
    events: Arc<watch::Sender<Events>>,
    abandoned: Arc<Mutex<Vec<(StoreKey, LeaseToken)>>>,
}

impl TestStore {
    pub fn new(inner: impl IdempotencyStore) -> Self {
        Self {
            inner: Arc::new(inner),
            faults: Arc::default(),
            events: Arc::new(watch::Sender::new(Events::default())),
            abandoned: Arc::default(),
        }
    }

    pub fn set_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.faults.lock().unwrap());
    }

    pub fn events(&self) -> Events {
        *self.events.borrow()
    }

    /// Waits until the events satisfy `done` (or fails the test after [`HANG`]).
    pub async fn wait_for(&self, done: impl FnMut(&Events) -> bool) -> Events {
        let mut rx = self.events.subscribe();
        let events = within(rx.wait_for(done)).await.expect("sender alive");
        *events
    }

    /// Leases acquired under [`Fault::Abandon`]: never completed nor released by anyone.
    pub fn abandoned(&self) -> Vec<(StoreKey, LeaseToken)> {
        self.abandoned.lock().unwrap().clone()
    }

    fn fault(&self, pick: impl FnOnce(&Faults) -> Fault) -> Fault {
        pick(&self.faults.lock().unwrap())
    }

    fn count(&self, change: impl FnOnce(&mut Events)) {
        self.events.send_modify(change);
    }
}

fn injected() -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, "injected store fault")
}

async fn apply(fault: Fault) -> Result<(), StoreError> {
    match fault {
        Fault::None | Fault::Abandon => Ok(()),
        Fault::Fail => Err(injected()),
        Fault::Hang => std::future::pending().await,
    }
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for TestStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let fault = self.fault(|f| f.begin);
        apply(fault).await?;
        let outcome = self.inner.begin(key, fingerprint, lease).await?;
        if let (Fault::Abandon, Begin::Acquired(token)) = (fault, &outcome) {
            self.abandoned.lock().unwrap().push((*key, *token));
            return Err(injected());
        }
        self.count(|e| {
            e.begins += 1;
            match &outcome {
                Begin::Acquired(_) => e.acquired += 1,
                Begin::InFlight { .. } => e.in_flight += 1,
                Begin::Completed { .. } => e.found_completed += 1,
            }
        });
        Ok(outcome)
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.count(|e| e.renews += 1);
        apply(self.fault(|f| f.renew)).await?;
        let renewed = self.inner.renew(key, token, lease).await?;
        self.count(|e| e.renewed += usize::from(renewed));
        Ok(renewed)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        apply(self.fault(|f| f.complete)).await.inspect_err(|_| {
            self.count(|e| e.completes += 1);
        })?;
        let completed = self.inner.complete(key, token, response, ttl).await;
        self.count(|e| {
            e.completes += 1;
            e.completed += usize::from(matches!(completed, Ok(true)));
        });
        completed
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        apply(self.fault(|f| f.release)).await.inspect_err(|_| {
            self.count(|e| e.releases += 1);
        })?;
        let released = self.inner.release(key, token).await;
        self.count(|e| {
            e.releases += 1;
            e.released += usize::from(matches!(released, Ok(true)));
        });
        released
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.count(|e| e.waits += 1);
        apply(self.fault(|f| f.wait)).await?;
        self.inner.wait(key, timeout).await
    }
}
