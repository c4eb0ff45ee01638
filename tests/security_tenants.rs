//! The security properties of `SECURITY.md` for callers who share or guess keys (its sections 1
//! and 2, cross-tenant replay and key guessing): two organizations that send the same key,
//! endpoint and body never see each other's response, and a caller who guesses (or steals)
//! another credential's key gets the answer an unused key gets.

mod support;

use std::time::Duration;

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use support::{Calls, Gate, KEY, ORG_B, created, request, security::app, send, within};
use tower_idempotency::{ExtensionScope, IdempotencyLayer, InFlight, KeyReuse};

// ---------------------------------------------------------------------------------------------
// Cross-tenant replay and key guessing

/// An organization id that an authentication layer resolved and put in the extensions.
#[derive(Clone)]
struct Org(&'static str);

impl std::fmt::Display for Org {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

fn as_org(org: &'static str, key: &str, json: &str) -> Request<Body> {
    let mut req = Request::post("/calls")
        .header(header::CONTENT_TYPE, "application/json")
        .header(KEY, key)
        .body(Body::from(json.to_owned()))
        .unwrap();
    req.extensions_mut().insert(Org(org));
    req
}

/// Two organizations send the same key, endpoint and body, one while the other's request is
/// still running, in both key-reuse modes and both in-flight modes: each gets its own run, never
/// the other's response, nor a 409 or 422 caused by the other's record. Organization ids of
/// which one is a prefix of the other (`org-1`, `org-12`) are kept apart too.
#[tokio::test]
async fn organizations_sharing_a_key_never_see_each_others_response() {
    for (reuse, in_flight) in [
        (KeyReuse::NewRequest, InFlight::Conflict),
        (KeyReuse::Reject, InFlight::Conflict),
        (
            KeyReuse::Reject,
            InFlight::Wait {
                timeout: Duration::from_secs(5),
            },
        ),
    ] {
        let gate = Gate::default();
        let calls = Calls::default();
        let (g, c) = (gate.clone(), calls.clone());
        let app = Router::new()
            .route(
                "/calls",
                post(
                    move |axum::Extension(org): axum::Extension<Org>, body: Bytes| async move {
                        let run = c.hit();
                        if org.0 == "org-1" {
                            g.enter().await;
                        }
                        let mut response = created(run, &body);
                        response
                            .headers_mut()
                            .insert("x-org", HeaderValue::from_static(org.0));
                        response
                    },
                ),
            )
            .layer(
                IdempotencyLayer::new()
                    .post("/calls")
                    .scope(ExtensionScope::<Org>::new())
                    .key_reuse(reuse)
                    .in_flight(in_flight),
            );

        // org-1's request is in flight; org-12 sends the same key and body, then another body.
        let first = tokio::spawn({
            let app = app.clone();
            async move { send(&app, as_org("org-1", "shared", r#"{"amount":1}"#)).await }
        });
        gate.entered(1).await;
        let other = send(&app, as_org("org-12", "shared", r#"{"amount":1}"#)).await;
        assert_eq!(other.status, StatusCode::CREATED, "{reuse:?} {in_flight:?}");
        assert!(!other.replayed());
        assert_eq!(other.header("x-org"), Some("org-12"));
        let reused = send(&app, as_org("org-12", "shared", r#"{"amount":2}"#)).await;
        match reuse {
            // Checked against its own earlier request, not org-1's running one.
            KeyReuse::Reject => {
                reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused")
            }
            _ => assert_eq!(reused.header("x-org"), Some("org-12")),
        }
        gate.open(1);
        let first = within(first).await.unwrap();
        assert_eq!(first.header("x-org"), Some("org-1"));

        // Replays: each organization gets its own response back.
        let first_again = send(&app, as_org("org-1", "shared", r#"{"amount":1}"#)).await;
        let other_again = send(&app, as_org("org-12", "shared", r#"{"amount":1}"#)).await;
        assert!(first_again.replayed() && other_again.replayed());
        assert_eq!(first_again.body, first.body);
        assert_eq!(other_again.body, other.body);
        assert_ne!(first.body, other.body);
        assert_eq!(first_again.header("x-org"), Some("org-1"));
        assert_eq!(other_again.header("x-org"), Some("org-12"));
    }
}

/// A caller who guesses (or steals) another credential's key learns nothing: the answer is the
/// one an unused key gets (its own run: not a replay, no 409, no 422), whether the victim's
/// record is completed or in flight, with the victim's body or another.
#[tokio::test]
async fn a_guessed_key_answers_like_an_unused_key() {
    for reuse in [KeyReuse::NewRequest, KeyReuse::Reject] {
        let gate = Gate::default();
        let calls = Calls::default();
        let app = app(
            IdempotencyLayer::new().post("/calls").key_reuse(reuse),
            &calls,
            &gate,
        );
        let as_attacker = |credential: &'static str, key: &str, json: &str| {
            let mut req = request("/calls", Some(key), json);
            req.headers_mut()
                .insert(header::AUTHORIZATION, HeaderValue::from_static(credential));
            req
        };

        // The victim (organization A) has a completed record and one in flight.
        let done = send(&app, request("/calls", Some("victim-done"), "{}")).await;
        let running = tokio::spawn({
            let app = app.clone();
            let req = request("/calls", Some("victim-running"), r#"{"slow":true}"#);
            async move { send(&app, req).await }
        });
        gate.entered(1).await;

        // Two attackers: one sends the victim's body, one another body.
        for (attacker, json) in [(ORG_B, "{}"), ("Bearer org_c_secret", r#"{"other":true}"#)] {
            for key in ["victim-done", "victim-running", "never-used"] {
                let got = send(&app, as_attacker(attacker, key, json)).await;
                assert_eq!(got.status, StatusCode::CREATED, "{reuse:?} {key} {json}");
                assert!(!got.replayed(), "{reuse:?} {key}");
                assert_ne!(got.body, done.body);
            }
        }
        gate.open(1);
        within(running).await.unwrap();
    }
}
