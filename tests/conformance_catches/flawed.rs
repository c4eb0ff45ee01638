//! A store wrapper with one flaw at a time, each breaking one rule of the store contract.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use tokio::time::Instant;
use tower_idempotency::{
    MemoryStore, StoredResponse, async_trait,
    store::{Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreKey},
};
/// What a [`Flawed`] store does wrong; each breaks one rule of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flaw {
    /// Nothing: the store meets the contract.
    None,
    /// `begin` on a key with no record reports it in flight instead of acquiring.
    NeverAcquires,
    /// `begin` on a held lease answers `Acquired` (with a token that owns nothing).
    AcquiresHeldLease,
    /// `InFlight` reports the caller's fingerprint instead of the owner's.
    InFlightNamesTheCaller,
    /// `InFlight` reports no time left on the lease.
    InFlightReportsNoTimeLeft,
    /// A replayed body went through UTF-8 text (as in a text column): invalid bytes are replaced.
    ReplayBodyAsText,
    /// Replayed header values that are not UTF-8 are dropped.
    ReplayDropsNonUtf8Headers,
    /// A repeated header field is replayed with its last value only (a map of one value per name).
    ReplayKeepsLastOfRepeatedHeaders,
    /// A replay consumes the record: the next `begin` acquires.
    ReplayConsumesTheRecord,
    /// `complete` reports success whether or not it stored the response.
    CompleteAlwaysSucceeds,
    /// A repeated `complete` by the token that completed the record replaces the response.
    RepeatCompleteOverwrites,
    /// `complete` with any token completes the lease (as its owner).
    CompleteIgnoresTheToken,
    /// `renew` with any token renews the lease (as its owner).
    RenewIgnoresTheToken,
    /// `release` with any token drops the lease (as its owner).
    ReleaseIgnoresTheToken,
    /// `complete` with a stranger's token on a completed record reports success.
    StrangerCompletesACompletedRecord,
    /// `complete` on a key with no record stores the response (an upsert).
    CompleteCreatesTheRecord,
    /// `release` drops nothing and reports false, even for the owner.
    ReleaseDoesNothing,
    /// A lease past its deadline is still reported in flight, never taken over.
    ExpiredLeaseStaysInFlight,
    /// `complete` of a lease past its deadline reports the opposite of what it did.
    LateCompleteMisreports,
    /// `renew` reports success to the owner but keeps the old deadline.
    RenewDoesNotExtend,
    /// A completed record is kept for a day, whatever its TTL.
    CompletedNeverExpires,
    /// A completed record expires at once, whatever its TTL.
    CompletedExpiresAtOnce,
    /// Overlapping `begin` calls on a key all acquire (a check-then-write race).
    OverlappingBeginsAllAcquire,
    /// `wait` never returns.
    WaitNeverReturns,
    /// Leases last half the time asked (taken, and renewed).
    HalvesLeases,
    /// Completed records are kept for half their TTL.
    HalvesTtl,
    /// `InFlight` reports the whole lease as left, however much of it has passed.
    InFlightReportsTheWholeLease,
}

/// What the wrapper saw of a key's record, to break rules that depend on it.
enum Seen {
    Lease {
        token: LeaseToken,
        fingerprint: Fingerprint,
        expires_at: Instant,
    },
    Completed {
        token: LeaseToken,
    },
}

/// A `MemoryStore` with one [`Flaw`].
#[derive(Clone)]
pub(crate) struct Flawed {
    inner: MemoryStore,
    flaw: Flaw,
    seen: Arc<Mutex<HashMap<StoreKey, Seen>>>,
    replayed: Arc<Mutex<HashSet<StoreKey>>>,
    overwritten: Arc<Mutex<HashMap<StoreKey, StoredResponse>>>,
    begins_running: Arc<AtomicUsize>,
    /// The lease each key's owner asked for.
    leases: Arc<Mutex<HashMap<StoreKey, Duration>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Flawed {
    pub(crate) fn new(flaw: Flaw) -> Self {
        Self {
            inner: MemoryStore::new(),
            flaw,
            seen: Arc::default(),
            replayed: Arc::default(),
            overwritten: Arc::default(),
            begins_running: Arc::default(),
            leases: Arc::default(),
        }
    }

    /// The token of the lease on `key` as the wrapper saw it, with its deadline.
    fn lease(&self, key: &StoreKey) -> Option<(LeaseToken, Instant)> {
        match lock(&self.seen).get(key) {
            Some(Seen::Lease {
                token, expires_at, ..
            }) => Some((*token, *expires_at)),
            _ => None,
        }
    }

    /// The owner's token in place of `token`, for the flaws that ignore the token.
    fn owner_token(&self, key: &StoreKey, token: LeaseToken, ignores: bool) -> LeaseToken {
        match self.lease(key) {
            Some((owner, _)) if ignores => owner,
            _ => token,
        }
    }
}

/// A token that owns nothing.
fn fake_acquired() -> Begin {
    Begin::Acquired(LeaseToken::random())
}

fn text_body(body: &Bytes) -> Bytes {
    Bytes::from(String::from_utf8_lossy(body).into_owned())
}

fn utf8_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if value.to_str().is_ok() {
            out.append(name, value.clone());
        }
    }
    out
}

fn last_values(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        out.insert(name, value.clone());
    }
    out
}

#[async_trait]
impl IdempotencyStore for Flawed {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        match self.flaw {
            Flaw::NeverAcquires => {
                return Ok(Begin::InFlight {
                    fingerprint: *fingerprint,
                    lease_remaining: lease,
                });
            }
            Flaw::ExpiredLeaseStaysInFlight => {
                if let Some(Seen::Lease {
                    fingerprint,
                    expires_at,
                    ..
                }) = lock(&self.seen).get(key)
                    && *expires_at <= now
                {
                    return Ok(Begin::InFlight {
                        fingerprint: *fingerprint,
                        lease_remaining: Duration::ZERO,
                    });
                }
            }
            _ => {}
        }
        // Whether another `begin` was running when this one started.
        let overlapped = self.begins_running.fetch_add(1, Ordering::SeqCst) > 0;
        if self.flaw == Flaw::OverlappingBeginsAllAcquire {
            // Let the other callers in between this one's check and its write.
            tokio::task::yield_now().await;
        }
        let kept = if self.flaw == Flaw::HalvesLeases {
            lease / 2
        } else {
            lease
        };
        let answer = self.inner.begin(key, fingerprint, kept).await;
        self.begins_running.fetch_sub(1, Ordering::SeqCst);
        let mut answer = answer?;
        if let Begin::Completed { response, .. } = &mut answer
            && let Some(overwritten) = lock(&self.overwritten).get(key)
        {
            *response = overwritten.clone();
        }
        if let Begin::Acquired(token) = answer {
            lock(&self.leases).insert(*key, lease);
            lock(&self.seen).insert(
                *key,
                Seen::Lease {
                    token,
                    fingerprint: *fingerprint,
                    expires_at: now + kept,
                },
            );
        }
        Ok(match (self.flaw, answer) {
            (Flaw::AcquiresHeldLease, Begin::InFlight { .. }) => fake_acquired(),
            (Flaw::OverlappingBeginsAllAcquire, Begin::InFlight { .. }) if overlapped => {
                fake_acquired()
            }
            (
                Flaw::InFlightNamesTheCaller,
                Begin::InFlight {
                    lease_remaining, ..
                },
            ) => Begin::InFlight {
                fingerprint: *fingerprint,
                lease_remaining,
            },
            (Flaw::InFlightReportsNoTimeLeft, Begin::InFlight { fingerprint, .. }) => {
                Begin::InFlight {
                    fingerprint,
                    lease_remaining: Duration::ZERO,
                }
            }
            (Flaw::InFlightReportsTheWholeLease, Begin::InFlight { fingerprint, .. }) => {
                Begin::InFlight {
                    fingerprint,
                    lease_remaining: lock(&self.leases).get(key).copied().unwrap_or(lease),
                }
            }
            (Flaw::ReplayConsumesTheRecord, answer @ Begin::Completed { .. }) => {
                if lock(&self.replayed).insert(*key) {
                    answer
                } else {
                    fake_acquired()
                }
            }
            (
                flaw @ (Flaw::ReplayBodyAsText
                | Flaw::ReplayDropsNonUtf8Headers
                | Flaw::ReplayKeepsLastOfRepeatedHeaders),
                Begin::Completed {
                    fingerprint,
                    mut response,
                },
            ) => {
                match flaw {
                    Flaw::ReplayBodyAsText => response.body = text_body(&response.body),
                    Flaw::ReplayDropsNonUtf8Headers => {
                        response.headers = utf8_headers(&response.headers);
                    }
                    _ => response.headers = last_values(&response.headers),
                }
                Begin::Completed {
                    fingerprint,
                    response,
                }
            }
            (_, answer) => answer,
        })
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        if self.flaw == Flaw::RenewDoesNotExtend {
            return Ok(matches!(
                self.lease(key),
                Some((owner, expires_at)) if owner == token && expires_at > Instant::now()
            ));
        }
        let token = self.owner_token(key, token, self.flaw == Flaw::RenewIgnoresTheToken);
        let lease = if self.flaw == Flaw::HalvesLeases {
            lease / 2
        } else {
            lease
        };
        let renewed = self.inner.renew(key, token, lease).await?;
        if renewed && let Some(Seen::Lease { expires_at, .. }) = lock(&self.seen).get_mut(key) {
            *expires_at = Instant::now() + lease;
        }
        Ok(renewed)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let late = matches!(
            self.lease(key),
            Some((owner, expires_at)) if owner == token && expires_at <= Instant::now()
        );
        let token = self.owner_token(key, token, self.flaw == Flaw::CompleteIgnoresTheToken);
        let ttl = match self.flaw {
            Flaw::CompletedNeverExpires => Duration::from_secs(24 * 60 * 60),
            Flaw::CompletedExpiresAtOnce => Duration::ZERO,
            Flaw::HalvesTtl => ttl / 2,
            _ => ttl,
        };
        let completed = self.inner.complete(key, token, response, ttl).await?;
        let completed_by = match lock(&self.seen).get(key) {
            Some(Seen::Completed { token }) => Some(*token),
            _ => None,
        };
        if completed {
            lock(&self.seen).insert(*key, Seen::Completed { token });
        }
        Ok(match self.flaw {
            Flaw::CompleteAlwaysSucceeds => true,
            Flaw::RepeatCompleteOverwrites if completed_by == Some(token) => {
                lock(&self.overwritten).insert(*key, response.clone());
                true
            }
            Flaw::StrangerCompletesACompletedRecord => {
                completed || completed_by.is_some_and(|by| by != token)
            }
            Flaw::CompleteCreatesTheRecord if !completed => {
                match self.inner.begin(key, &Fingerprint([0; 32]), ttl).await? {
                    Begin::Acquired(token) => {
                        self.inner.complete(key, token, response, ttl).await?
                    }
                    _ => false,
                }
            }
            Flaw::LateCompleteMisreports if late => !completed,
            _ => completed,
        })
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        if self.flaw == Flaw::ReleaseDoesNothing {
            return Ok(false);
        }
        let token = self.owner_token(key, token, self.flaw == Flaw::ReleaseIgnoresTheToken);
        let released = self.inner.release(key, token).await?;
        if released {
            lock(&self.seen).remove(key);
        }
        Ok(released)
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        if self.flaw == Flaw::WaitNeverReturns {
            std::future::pending::<()>().await;
        }
        self.inner.wait(key, timeout).await
    }
}
