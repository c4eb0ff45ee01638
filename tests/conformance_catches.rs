//! The store conformance suite fails on stores that break its rules: each check is run on a
//! `MemoryStore` with one flaw that breaks that check's rule, and must panic; `run_all` on the
//! same store must panic naming the rule. The same wrapper without a flaw passes `run_all`, so
//! each failure comes from its flaw. `MemoryStore` keeps time on tokio's clock, so all of this
//! runs on a paused clock.
#![cfg(feature = "testing")]
mod common;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::conformance;
use http::HeaderMap;
use tokio::{task::JoinHandle, time::Instant};
use tower_idempotency::{
    MemoryStore, StoredResponse, async_trait,
    store::{Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreKey},
};

/// What a [`Flawed`] store does wrong; each breaks one rule of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flaw {
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
struct Flawed {
    inner: MemoryStore,
    flaw: Flaw,
    seen: Arc<Mutex<HashMap<StoreKey, Seen>>>,
    replayed: Arc<Mutex<HashSet<StoreKey>>>,
    overwritten: Arc<Mutex<HashMap<StoreKey, StoredResponse>>>,
    begins_running: Arc<AtomicUsize>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Flawed {
    fn new(flaw: Flaw) -> Self {
        Self {
            inner: MemoryStore::new(),
            flaw,
            seen: Arc::default(),
            replayed: Arc::default(),
            overwritten: Arc::default(),
            begins_running: Arc::default(),
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
        let answer = self.inner.begin(key, fingerprint, lease).await;
        self.begins_running.fetch_sub(1, Ordering::SeqCst);
        let mut answer = answer?;
        if let Begin::Completed { response, .. } = &mut answer
            && let Some(overwritten) = lock(&self.overwritten).get(key)
        {
            *response = overwritten.clone();
        }
        if let Begin::Acquired(token) = answer {
            lock(&self.seen).insert(
                *key,
                Seen::Lease {
                    token,
                    fingerprint: *fingerprint,
                    expires_at: now + lease,
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

type Check = fn(Flawed) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// A check of the suite by name: `(name, check)`.
macro_rules! check {
    ($name:ident) => {
        (
            stringify!($name),
            (|store: Flawed| -> Pin<Box<dyn Future<Output = ()> + Send>> {
                Box::pin(async move { conformance::$name(&store).await })
            }) as Check,
        )
    };
}

/// A flawed store, the check that must fail on it, and the rule `run_all` names (the first of
/// its order that the flaw breaks: the check's own, unless said).
struct Case {
    flaw: Flaw,
    check: (&'static str, Check),
    rule: &'static str,
}

fn case(flaw: Flaw, check: (&'static str, Check)) -> Case {
    Case {
        flaw,
        check,
        rule: check.0,
    }
}

impl Case {
    /// `run_all` reaches an earlier rule that the flaw breaks too.
    fn first_broken(self, rule: &'static str) -> Self {
        Self { rule, ..self }
    }
}

fn cases() -> Vec<Case> {
    use Flaw::*;
    vec![
        case(NeverAcquires, check!(begin_on_absent_key_acquires)),
        case(
            AcquiresHeldLease,
            check!(begin_on_held_lease_reports_in_flight),
        ),
        case(
            InFlightNamesTheCaller,
            check!(begin_on_held_lease_reports_in_flight),
        ),
        case(
            InFlightReportsNoTimeLeft,
            check!(begin_on_held_lease_reports_in_flight),
        ),
        case(
            ReplayBodyAsText,
            check!(complete_then_begin_replays_byte_exact),
        ),
        case(
            ReplayDropsNonUtf8Headers,
            check!(complete_then_begin_replays_byte_exact),
        ),
        case(
            ReplayKeepsLastOfRepeatedHeaders,
            check!(complete_then_begin_replays_byte_exact),
        ),
        case(
            ReplayConsumesTheRecord,
            check!(complete_then_begin_replays_byte_exact),
        ),
        case(
            RepeatCompleteOverwrites,
            check!(complete_needs_a_live_lease),
        ),
        case(CompleteAlwaysSucceeds, check!(wrong_token_changes_nothing)),
        case(CompleteIgnoresTheToken, check!(wrong_token_changes_nothing)),
        case(RenewIgnoresTheToken, check!(wrong_token_changes_nothing)),
        case(ReleaseIgnoresTheToken, check!(wrong_token_changes_nothing)),
        case(
            StrangerCompletesACompletedRecord,
            check!(wrong_token_on_completed_changes_nothing),
        ),
        case(
            CompleteCreatesTheRecord,
            check!(calls_on_absent_key_return_false),
        ),
        case(ReleaseDoesNothing, check!(release_lets_next_begin_acquire)),
        case(
            ExpiredLeaseStaysInFlight,
            check!(expired_lease_is_taken_over),
        ),
        case(
            LateCompleteMisreports,
            check!(late_completion_without_takeover_is_consistent),
        ),
        case(
            RenewDoesNotExtend,
            check!(renew_extends_lease_past_original_expiry),
        ),
        case(
            CompletedNeverExpires,
            check!(completed_record_expires_after_ttl),
        ),
        case(
            CompletedExpiresAtOnce,
            check!(completed_record_expires_after_ttl),
        )
        .first_broken("complete_then_begin_replays_byte_exact"),
        case(
            OverlappingBeginsAllAcquire,
            check!(concurrent_begin_acquires_exactly_once),
        ),
        case(WaitNeverReturns, check!(wait_returns_within_timeout)),
    ]
}

/// The panic message of `task`, or `None` when it ended without panicking.
async fn panic_of(task: JoinHandle<()>) -> Option<String> {
    let panic = task.await.err()?.try_into_panic().ok()?;
    Some(
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default(),
    )
}

#[tokio::test(start_paused = true)]
async fn each_check_fails_on_a_store_that_breaks_its_rule() {
    let mut passed = Vec::new();
    for Case { flaw, check, .. } in cases() {
        let (name, check) = check;
        if panic_of(tokio::spawn(check(Flawed::new(flaw))))
            .await
            .is_none()
        {
            passed.push(format!("{name} passed on a store with {flaw:?}"));
        }
    }
    assert!(passed.is_empty(), "{passed:#?}");
}

#[tokio::test(start_paused = true)]
async fn run_all_names_the_rule_a_flawed_store_breaks() {
    let mut wrong = Vec::new();
    for Case { flaw, rule, .. } in cases() {
        let named = format!("rule `{rule}` broke");
        match panic_of(tokio::spawn(conformance::run_all(Flawed::new(flaw)))).await {
            Some(message) if message.contains(&named) => {}
            Some(message) => wrong.push(format!("{flaw:?}: want {named}, got: {message}")),
            None => wrong.push(format!("{flaw:?}: run_all passed")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test(start_paused = true)]
async fn the_wrapper_without_a_flaw_passes_run_all() {
    conformance::run_all(Flawed::new(Flaw::None)).await;
}
