//! Heap bytes per `MemoryStore` record, counted by `dhat`'s allocator (every byte the store
//! asked the allocator for; the allocator's own per-block overhead, typically 8 to 16 bytes a
//! block with glibc, comes on top).
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! For each case the store is filled with N records and the growth of live heap bytes is
//! divided by N. A completed record holds a response as the layer stores it: status 201,
//! `Content-Type: application/json` and a 30-byte `Location`, and the body. The per-record
//! figure includes the record's slot in the hash map (with the map's spare capacity at that
//! size, which is why it changes with N) and its entries in the expiry index (two per
//! completed record until the lease's entry comes due and is swept: one for the lease, one for
//! the response), and, in the default `WhenFull::EvictOldest` store measured here, its entry in
//! the queue of completed records that eviction keeps.

use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use tower_idempotency::{
    IdempotencyStore, MemoryStore, StoredResponse,
    store::{Begin, Fingerprint, StoreKey},
};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

fn key(i: u64) -> StoreKey {
    StoreKey(Sha256::digest(i.to_be_bytes()).into())
}

/// The response the layer would store for a 201 with a `body_len`-byte body.
fn response(i: u64, body_len: usize) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/calls/call_{i:016x}")).unwrap(),
    );
    // As the layer captures a body: collected into a `BytesMut`, then frozen.
    let mut body = BytesMut::new();
    body.extend_from_slice(&vec![b'x'; body_len]);
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: body.freeze(),
    }
}

/// Live heap bytes per record after `n` records, in flight (`body_len: None`) or completed.
fn per_record(rt: &tokio::runtime::Runtime, n: u64, body_len: Option<usize>) -> f64 {
    let store = MemoryStore::builder()
        // Unbounded: these measurements hold more than the default million records.
        .max_records(usize::MAX)
        .max_bytes(usize::MAX)
        .background_sweep(false)
        .build();
    // One record first, so that one-time costs are not counted per record.
    rt.block_on(store.begin(&key(u64::MAX), &Fingerprint([0; 32]), LEASE))
        .unwrap();
    let before = dhat::HeapStats::get().curr_bytes;
    rt.block_on(async {
        for i in 0..n {
            let key = key(i);
            let Begin::Acquired(token) =
                store.begin(&key, &Fingerprint(key.0), LEASE).await.unwrap()
            else {
                panic!("a new key is acquired");
            };
            if let Some(len) = body_len {
                // The layer's copy is dropped after the client got it; the store's stays.
                let response = response(i, len);
                assert!(store.complete(&key, token, &response, TTL).await.unwrap());
            }
        }
    });
    let after = dhat::HeapStats::get().curr_bytes;
    assert_eq!(store.len() as u64, n + 1);
    let per = (after - before) as f64 / n as f64;
    drop(store);
    per
}

fn main() {
    // `cargo bench` passes `--bench`; this binary takes no options of its own.
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("MemoryStore heap bytes per record (dhat, live bytes / records)");
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "record", "10,000", "100,000", "1,000,000"
    );
    // (label, body length, whether to fill a million records too: dhat makes that slow, so
    // only for the two rows the docs quote).
    let cases: [(&str, Option<usize>, bool); 4] = [
        ("in flight", None, true),
        ("completed, 0-byte body", Some(0), false),
        ("completed, 100-byte body", Some(100), true),
        ("completed, 1,000-byte body", Some(1_000), false),
    ];
    for (label, body, million) in cases {
        let figures: Vec<String> = [10_000, 100_000, 1_000_000]
            .into_iter()
            .map(|n| {
                if n == 1_000_000 && !million {
                    "-".to_owned()
                } else {
                    format!("{:.0}", per_record(&rt, n, body))
                }
            })
            .collect();
        println!(
            "{:<34} {:>12} {:>12} {:>12}",
            label, figures[0], figures[1], figures[2]
        );
    }
}
