use super::*;
use http::{HeaderMap, StatusCode};

#[test]
fn the_default_store_is_bounded() {
    let store = MemoryStore::new();
    assert_eq!(store.inner.max_records, DEFAULT_MAX_RECORDS);
    assert_eq!(store.inner.max_bytes, DEFAULT_MAX_BYTES);
    assert!(store.inner.completions.enabled(), "the default evicts");
    let unbounded = MemoryStore::builder()
        .max_records(usize::MAX)
        .max_bytes(usize::MAX)
        .build();
    assert!(unbounded.inner.has_room());
}

fn index_len(store: &MemoryStore) -> usize {
    store.inner.expiry.len()
}

/// A lease released at once (its response was a 5xx, a 429, too large) left its expiry
/// index entry behind until the lease's deadline: a caller sending unique keys whose
/// requests fail grew the index by one entry per request for as long as a lease lasts,
/// past `max_records` and `max_bytes` (about 50 bytes a request; an hour's lease at 40,000
/// requests a second is gigabytes).
#[tokio::test(start_paused = true)]
async fn released_leases_do_not_grow_the_expiry_index() {
    let store = MemoryStore::builder()
        .max_records(10)
        .background_sweep(false)
        .build();
    let fp = Fingerprint([1; 32]);
    for i in 0..50_000u32 {
        let mut key = [0; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        key[4] = i as u8; // spread over the index shards
        let key = StoreKey(key);
        let Begin::Acquired(token) = store
            .begin(&key, &fp, Duration::from_secs(3600))
            .await
            .unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        assert!(store.release(&key, token).await.unwrap());
    }
    assert_eq!(store.len(), 0);
    assert_eq!(store.sweep(), 0, "nothing is due");
    let bound = expiry::SHARDS * store.inner.sweep_batch;
    assert!(
        index_len(&store) <= bound,
        "{} index entries for no record",
        index_len(&store)
    );
}

async fn complete_unique_keys(store: &MemoryStore, n: u32, ttl: Duration) {
    let fp = Fingerprint([1; 32]);
    let response = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: bytes::Bytes::from_static(b"ok"),
    };
    for i in 0..n {
        let mut key = [0; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        key[4] = i as u8; // spread over the shards
        let key = StoreKey(key);
        let Begin::Acquired(token) = store.begin(&key, &fp, ttl).await.unwrap() else {
            panic!("a fresh key is acquired");
        };
        assert!(store.complete(&key, token, &response, ttl).await.unwrap());
    }
}

/// Records that expire instead of being evicted leave their completion queue entries
/// behind; a sweep drops them, so the queue does not grow past the records.
#[tokio::test(start_paused = true)]
async fn the_completion_queue_drops_expired_entries() {
    let store = MemoryStore::builder().background_sweep(false).build();
    complete_unique_keys(&store, 5_000, Duration::from_secs(1)).await;
    assert_eq!(store.inner.completions.len(), 5_000);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.sweep(), 5_000);
    assert_eq!(store.inner.completions.len(), 0);
}

/// Under `WhenFull::Refuse` nothing is queued: the queue costs nothing.
#[tokio::test(start_paused = true)]
async fn refuse_keeps_no_completion_queue() {
    let store = MemoryStore::builder()
        .when_full(WhenFull::Refuse)
        .background_sweep(false)
        .build();
    complete_unique_keys(&store, 100, Duration::from_secs(60)).await;
    assert_eq!(store.len(), 100);
    assert_eq!(store.inner.completions.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn sweep_counts_removed_records_not_stale_index_entries() {
    // No background sweeps during the test: only `sweep()` removes records.
    let store = MemoryStore::builder().background_sweep(false).build();
    let key = StoreKey([7; 32]);
    let fp = Fingerprint([1; 32]);
    let Begin::Acquired(token) = store
        .begin(&key, &fp, Duration::from_millis(300))
        .await
        .unwrap()
    else {
        panic!("absent key must be acquired");
    };
    let response = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: bytes::Bytes::from_static(b"ok"),
    };
    assert!(
        store
            .complete(&key, token, &response, Duration::from_secs(30))
            .await
            .unwrap()
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    // The lease's index entry is due but its record lives on as a completed response.
    assert_eq!(store.sweep(), 0);
    assert_eq!(store.len(), 1);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(store.sweep(), 1);
    assert_eq!(store.len(), 0);
}

#[test]
fn builder_settings_are_kept_in_any_order() {
    let store = MemoryStore::builder()
        .max_records(7)
        .sweep_batch(3)
        .when_full(WhenFull::Refuse)
        .build();
    assert_eq!(store.inner.max_records, 7);
    assert_eq!(store.inner.sweep_batch, 3);
    assert!(
        !store.inner.completions.enabled(),
        "a store that refuses keeps no eviction queue"
    );
    let at_least_one = MemoryStore::builder().sweep_batch(0).build();
    assert_eq!(at_least_one.inner.sweep_batch, 1);
}

/// A key in shard `shard` of the expiry index and of the completion queue.
fn key_in_shard(shard: u8, n: u8) -> StoreKey {
    let mut key = [n; 32];
    key[0] = shard;
    StoreKey(key)
}

const HOUR: Duration = Duration::from_secs(3600);

/// 64 records (4 in each of the 16 shards) and a batch of 2: a shard is rebuilt once it
/// holds more than 2 * 64 / 16 + 2 = 10 index entries, twice its share of the records
/// plus a batch. Below that, the sweep leaves stale entries alone (rebuilding a shard reads
/// all of its records).
#[tokio::test(start_paused = true)]
async fn an_index_shard_is_rebuilt_once_past_twice_its_share_of_the_records_plus_a_batch() {
    let store = MemoryStore::builder()
        .sweep_batch(2)
        .background_sweep(false)
        .build();
    let fp = Fingerprint([1; 32]);
    for n in 0..64u8 {
        store
            .begin(&key_in_shard(n % 16, n), &fp, HOUR)
            .await
            .unwrap();
    }
    let release_one = |n: u8| {
        let store = store.clone();
        async move {
            let key = key_in_shard(0, 100 + n);
            let Begin::Acquired(token) = store.begin(&key, &fp, HOUR).await.unwrap() else {
                panic!("a fresh key is acquired");
            };
            assert!(store.release(&key, token).await.unwrap());
        }
    };
    for n in 0..6 {
        release_one(n).await;
    }
    assert_eq!(store.sweep(), 0);
    assert_eq!(
        index_len(&store),
        64 + 6,
        "shard 0 holds 4 + 6 = 10 entries: kept"
    );
    release_one(6).await;
    assert_eq!(store.sweep(), 0);
    assert_eq!(
        index_len(&store),
        64,
        "shard 0 held 4 + 7 = 11 entries: its stale ones are dropped, its records' kept"
    );
}

/// The same threshold for the completion queue: with 64 live completed records (4 a shard)
/// and a batch of 2, the expired entries behind a live front of a shard are dropped once
/// the shard holds more than 10 entries.
#[tokio::test(start_paused = true)]
async fn a_queue_shard_drops_expired_entries_past_twice_its_share_of_records_plus_a_batch() {
    let store = MemoryStore::builder()
        .sweep_batch(2)
        .background_sweep(false)
        .build();
    let fp = Fingerprint([1; 32]);
    let response = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: bytes::Bytes::from_static(b"ok"),
    };
    let complete = |key: StoreKey, ttl: Duration| {
        let (store, response) = (store.clone(), response.clone());
        async move {
            let Begin::Acquired(token) = store.begin(&key, &fp, HOUR).await.unwrap() else {
                panic!("a fresh key is acquired");
            };
            assert!(store.complete(&key, token, &response, ttl).await.unwrap());
        }
    };
    for n in 0..64u8 {
        complete(key_in_shard(n % 16, n), HOUR).await;
    }
    let short = Duration::from_secs(1);
    for n in 0..6 {
        complete(key_in_shard(0, 100 + n), short).await;
    }
    tokio::time::advance(short).await;
    assert_eq!(store.sweep(), 6);
    assert_eq!(
        store.inner.completions.len(),
        64 + 6,
        "shard 0 holds 4 + 6 = 10 entries: kept"
    );
    complete(key_in_shard(0, 106), short).await;
    tokio::time::advance(short).await;
    assert_eq!(store.sweep(), 1);
    assert_eq!(
        store.inner.completions.len(),
        64,
        "shard 0 held 4 + 7 = 11 entries: the expired ones are dropped"
    );
}
