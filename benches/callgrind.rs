//! Instruction counts per request, for `valgrind --tool=callgrind` (see `benches/callgrind.sh`,
//! which runs every scenario below under callgrind and prints the table). Instruction counts do
//! not drift with the machine's load the way wall-clock times do.
//!
//! ```text
//! bash benches/callgrind.sh                   # every scenario
//! bash benches/callgrind.sh first/ours        # one
//! ```
//!
//! Each scenario builds its router, sends a few untimed requests to warm it up, builds all its
//! requests, then sends them one at a time from `measured` (the only function callgrind
//! collects in, with `--toggle-collect`), reading each response to the end. The script divides
//! the collected instructions by [`REQUESTS`]. Without a scenario argument (as
//! `cargo bench --workspace` runs it) it runs every scenario natively once, as a smoke test.

use std::{future::Future, hint::black_box, pin::Pin};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderValue, Request, StatusCode, header},
};
use tower_idempotency_benches::{
    KIB, bare, fresh_key, json_body, new_session, noop_layer, ours, ours_with, peer, request,
    runtime, send, unique_body,
};

/// Requests (or digests) per measured run.
const REQUESTS: usize = 200;
/// Untimed requests before it.
const WARM_UP: usize = 20;
/// The peer's requests per session (see `benches/layer.rs`).
const PEER_SESSION_REQUESTS: usize = 64;

const SCENARIOS: &[&str] = &[
    "passthrough/bare",
    "passthrough/noop_layer",
    "passthrough/ours_no_key",
    "passthrough/ours_unlisted",
    "first/bare",
    "first/ours",
    "first/ours_text_body",
    "first/ours_no_run_to_completion",
    "first/axum_idempotent",
    "replay/bare",
    "replay/ours",
    "replay/axum_idempotent",
    "digest/raw_64KiB",
    "digest/json_64KiB",
    "digest/raw_1KiB",
    "digest/json_1KiB",
];

type Job<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// The measured part: callgrind collects instructions only inside this function.
#[inline(never)]
fn measured(rt: &tokio::runtime::Runtime, job: Job<'_>) {
    rt.block_on(job);
}

/// What a scenario sends.
enum Requests {
    /// The same request each time.
    Same {
        path: &'static str,
        key: Option<&'static str>,
    },
    /// A new key and body each time (`text`: sent as `text/plain`).
    Fresh { text: bool },
}

fn build(
    requests: &Requests,
    body: &Bytes,
    cookies: &[HeaderValue],
    n: usize,
) -> Vec<Request<Body>> {
    (0..n)
        .map(|i| {
            let cookie = cookies.get(i / PEER_SESSION_REQUESTS);
            match *requests {
                Requests::Same { path, key } => request(path, key, cookie, body),
                Requests::Fresh { text } => {
                    let (key, k) = fresh_key();
                    let mut req = request("/calls", Some(&key), cookie, &unique_body(body, k));
                    if text {
                        req.headers_mut()
                            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    }
                    req
                }
            }
        })
        .collect()
}

async fn send_all(app: &Router, requests: Vec<Request<Body>>, replay: Option<bool>) {
    for req in requests {
        let (status, replayed, body) = send(app, req).await;
        assert_eq!(status, StatusCode::CREATED, "a bench request failed");
        if let Some(replay) = replay {
            assert_eq!(
                replayed, replay,
                "a replay where none was expected, or none"
            );
        }
        black_box(body);
    }
}

fn run(scenario: &str) {
    let rt = runtime();
    if let Some(size) = scenario.strip_prefix("digest/") {
        let (json, size) = match size {
            "json_64KiB" => (true, 64 * KIB),
            "raw_64KiB" => (false, 64 * KIB),
            "raw_1KiB" => (false, KIB),
            "json_1KiB" => (true, KIB),
            _ => panic!("unknown scenario {scenario}"),
        };
        let body = json_body(size);
        let job = Box::pin(async {
            for _ in 0..REQUESTS {
                black_box(tower_idempotency::fingerprint::body_digest(
                    black_box(&body),
                    json,
                ));
            }
        });
        return measured(&rt, job);
    }
    let (group, variant) = scenario.split_once('/').expect("group/variant");
    let app = rt.block_on(async {
        match variant {
            "bare" => bare(),
            "noop_layer" => noop_layer(),
            "ours" | "ours_no_key" | "ours_unlisted" | "ours_text_body" => ours(),
            "ours_no_run_to_completion" => ours_with(|layer| layer.run_to_completion(false)),
            "axum_idempotent" => peer(false),
            _ => panic!("unknown scenario {scenario}"),
        }
    });
    let peer = variant == "axum_idempotent";
    let requests = match (group, variant) {
        ("passthrough", "ours_unlisted") => Requests::Same {
            path: "/voices",
            key: Some("unlisted-key"),
        },
        ("passthrough", _) => Requests::Same {
            path: "/calls",
            key: None,
        },
        ("first", v) => Requests::Fresh {
            text: v == "ours_text_body",
        },
        ("replay", "bare") => Requests::Same {
            path: "/calls",
            key: Some("replay-key"),
        },
        ("replay", _) => Requests::Same {
            path: "/calls",
            key: Some("replay-key"),
        },
        _ => panic!("unknown scenario {scenario}"),
    };
    let replay = match (group, variant) {
        ("replay", "bare") => Some(false),
        ("replay", _) => Some(true),
        ("first", _) => Some(false),
        _ => None,
    };
    let body = json_body(KIB);
    let sessions = |n: usize| {
        rt.block_on(async {
            let mut cookies = Vec::new();
            if peer {
                // The replay scenario keeps one session; first requests start one every 64.
                let count = if group == "replay" {
                    1
                } else {
                    n.div_ceil(PEER_SESSION_REQUESTS)
                };
                for _ in 0..count {
                    cookies.push(new_session(&app).await);
                }
            }
            if group == "replay" {
                let cookie = cookies.first().cloned();
                cookies = vec![cookie; n].into_iter().flatten().collect();
            }
            cookies
        })
    };
    // Warm up (for replays: store the response; the peer's session is shared with the run).
    let cookies = sessions(WARM_UP.max(REQUESTS));
    let warm = build(&requests, &body, &cookies, WARM_UP);
    let first_replay = if group == "replay" {
        Some(false)
    } else {
        replay
    };
    rt.block_on(async {
        let mut warm = warm.into_iter();
        if let Some(first) = warm.next() {
            send_all(&app, vec![first], first_replay).await;
        }
        send_all(&app, warm.collect(), replay).await;
    });
    let cookies = if group == "first" {
        sessions(REQUESTS)
    } else {
        cookies
    };
    let requests = build(&requests, &body, &cookies, REQUESTS);
    measured(&rt, Box::pin(send_all(&app, requests, replay)));
}

fn main() {
    let scenarios: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    if scenarios.is_empty() {
        for scenario in SCENARIOS {
            run(scenario);
        }
        println!(
            "callgrind: {} scenarios ran; see benches/callgrind.sh",
            SCENARIOS.len()
        );
        return;
    }
    if scenarios.iter().any(|s| s == "list") {
        for scenario in SCENARIOS {
            println!("{scenario}");
        }
        println!("requests {REQUESTS}");
        return;
    }
    for scenario in &scenarios {
        run(scenario);
    }
}
