//! A store of your own: `HashMapStore`, a `Mutex<HashMap>` implementing `IdempotencyStore`,
//! served behind the idempotency layer.
//!
//! Run it:
//!
//! ```text
//! cargo run --example custom_store                  # listens on 127.0.0.1:3000
//! cargo run --example custom_store -- 127.0.0.1:8080
//! ```
//!
//! Then try (it prints these lines with its address):
//!
//! ```text
//! curl -i -X POST localhost:3000/calls -H 'Authorization: Bearer demo' \
//!      -H 'X-Idempotency-Key: 7f1c' -H 'Content-Type: application/json' -d '{"to":"+15550100"}'
//! ```
//!
//! - Send it twice: the second answer is the first one again (same `id`), with
//!   `Idempotent-Replayed: true`, and the handler did not run.
//! - Change the key or the body: a new call with the next `id`.
//! - Wait 30 seconds (the TTL set below) and send the first one again: it runs again.
//!
//! The store is the whole contract in a few dozen lines: every method takes the lock once, so
//! each is one atomic step, and expiry is decided from the deadlines kept in the records. What
//! it leaves out: expired records are replaced when their key comes back but never swept, and
//! records live in this process only. `MemoryStore` (sweeping, bounds) and `RedisStore` /
//! `PostgresStore` (several instances) are the stores to use; `tests/custom_store.rs` runs the
//! store conformance suite on this one.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::StatusCode, http::header, routing::post};
use tokio::time::Instant;
use tower_idempotency::{
    IdempotencyLayer, StoredResponse,
    store::{Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreKey},
};

/// Idempotency records in a `Mutex<HashMap>`, with deadlines on tokio's clock.
#[derive(Clone, Default)]
pub struct HashMapStore {
    records: Arc<Mutex<HashMap<StoreKey, Record>>>,
}

enum Record {
    InFlight {
        fingerprint: Fingerprint,
        token: LeaseToken,
        expires_at: Instant,
    },
    Completed {
        fingerprint: Fingerprint,
        response: StoredResponse,
        expires_at: Instant,
    },
}

impl HashMapStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<StoreKey, Record>> {
        // No method panics while holding the lock, so a poisoned lock still holds good data.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fingerprint of the lease on `key`, if `token` owns it.
    fn owned(
        records: &HashMap<StoreKey, Record>,
        key: &StoreKey,
        token: LeaseToken,
    ) -> Option<Fingerprint> {
        match records.get(key) {
            Some(Record::InFlight {
                fingerprint,
                token: owner,
                ..
            }) if *owner == token => Some(*fingerprint),
            _ => None,
        }
    }
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for HashMapStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let mut records = self.lock();
        match records.get(key) {
            Some(Record::InFlight {
                fingerprint,
                expires_at,
                ..
            }) if *expires_at > now => {
                return Ok(Begin::InFlight {
                    fingerprint: *fingerprint,
                    lease_remaining: *expires_at - now,
                });
            }
            Some(Record::Completed {
                fingerprint,
                response,
                expires_at,
            }) if *expires_at > now => {
                return Ok(Begin::Completed {
                    fingerprint: *fingerprint,
                    response: response.clone(),
                });
            }
            // Absent, or expired: take the key.
            _ => {}
        }
        let token = LeaseToken::random();
        let record = Record::InFlight {
            fingerprint: *fingerprint,
            token,
            expires_at: now + lease,
        };
        records.insert(*key, record);
        Ok(Begin::Acquired(token))
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut records = self.lock();
        let Some(fingerprint) = Self::owned(&records, key, token) else {
            return Ok(false);
        };
        let record = Record::InFlight {
            fingerprint,
            token,
            expires_at: Instant::now() + lease,
        };
        records.insert(*key, record);
        Ok(true)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut records = self.lock();
        let Some(fingerprint) = Self::owned(&records, key, token) else {
            return Ok(false);
        };
        let expires_at = Instant::now() + ttl;
        records.insert(
            *key,
            Record::Completed {
                fingerprint,
                response: response.clone(),
                expires_at,
            },
        );
        Ok(true)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        let mut records = self.lock();
        let owned = Self::owned(&records, key, token).is_some();
        if owned {
            records.remove(key);
        }
        Ok(owned)
    }
    // `wait` keeps its default: sleep for the timeout (the layer polls with backoff).
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let next_id = Arc::new(AtomicU64::new(1));
    let app = Router::new()
        .route(
            "/calls",
            post(move |body: String| async move {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                println!("handler ran: call {id}, body {body}");
                let location = format!("/calls/{id}");
                let body = serde_json::json!({ "id": id, "request": body }).to_string();
                (StatusCode::CREATED, [(header::LOCATION, location)], body)
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .store(HashMapStore::default())
                .ttl(Duration::from_secs(30)),
        );

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}; send this twice:");
    println!(
        "curl -i -X POST {addr}/calls -H 'Authorization: Bearer demo' -H 'X-Idempotency-Key: 7f1c' \
         -H 'Content-Type: application/json' -d '{{\"to\":\"+15550100\"}}'"
    );
    axum::serve(listener, app).await?;
    Ok(())
}
