//! A JSON body's digest allocates nothing once the thread has digested a body as large: the
//! canonical form is written into buffers the thread keeps. Counted by a global allocator
//! (this binary runs one test, on one thread).

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower_idempotency::fingerprint::{BodyKind, body_digest};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A JSON body of about `size` bytes whose objects (the outer one and each item) come out of key
/// order, so that canonicalizing it reorders members.
fn json_body(size: usize) -> Vec<u8> {
    let mut out =
        String::from(r#"{"ref":"0001","to":"+15550100","metadata":{"b":3,"a":"x"},"items":["#);
    let mut i = 0;
    while out.len() < size {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"sku":"sku-{i:06}","qty":{},"note":"ring twice"}}"#,
            i % 7
        ));
        i += 1;
    }
    out.push_str("]}");
    out.into_bytes()
}

/// Heap allocations (and reallocations) of one digest.
fn allocations(body: &[u8]) -> usize {
    let region = Region::new(GLOBAL);
    let (kind, _) = body_digest(body, true);
    let change = region.change();
    assert_eq!(kind, BodyKind::Json);
    change.allocations + change.reallocations
}

#[test]
fn a_json_digest_allocates_nothing_once_the_thread_has_digested_a_body_as_large() {
    let small = json_body(1024);
    let large = json_body(16 * 1024);
    let huge = json_body(1024 * 1024);
    allocations(&small);
    assert_eq!(allocations(&small), 0);
    allocations(&large);
    assert_eq!(allocations(&large), 0);
    assert_eq!(allocations(&small), 0);
    // A body past what the thread keeps room for: its buffers are let go afterwards, and the
    // next body allocates again, once.
    allocations(&huge);
    assert_ne!(allocations(&small), 0);
    assert_eq!(allocations(&small), 0);
}
