//! The store conformance suite fails on stores that break its rules: each check is run on a
//! `MemoryStore` with one flaw that breaks that check's rule, and must panic; `run_all` on the
//! same store must panic naming the rule. The same wrapper without a flaw passes `run_all`, so
//! each failure comes from its flaw. `MemoryStore` keeps time on tokio's clock, so all of this
//! runs on a paused clock.
#![cfg(feature = "testing")]
mod common;

#[path = "conformance_catches/flawed.rs"]
mod flawed;

use std::{future::Future, pin::Pin};

use common::conformance;
use flawed::{Flaw, Flawed};
use tokio::task::JoinHandle;

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
        case(HalvesLeases, check!(deadlines_are_not_early)),
        case(HalvesTtl, check!(deadlines_are_not_early)),
        case(
            InFlightReportsTheWholeLease,
            check!(deadlines_are_not_early),
        ),
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
