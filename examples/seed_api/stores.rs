//! The stores `--store` names.

use std::sync::Arc;
#[cfg(feature = "postgres")]
use std::time::Duration;

use tower_idempotency::{IdempotencyStore, MemoryStore};

use super::{Config, StoreKind, resources::Resources};

/// The idempotency store `--store` names, and where the resources live.
pub async fn build(config: &Config) -> Result<(Arc<dyn IdempotencyStore>, Resources), String> {
    match config.store {
        StoreKind::Memory => Ok((Arc::new(MemoryStore::new()), Resources::default())),
        StoreKind::Redis => Ok((redis_store(config).await?, Resources::default())),
        StoreKind::Postgres => postgres_store(config).await,
    }
}

/// The Redis URL: `--redis-url`, else `$REDIS_URL`, else the local default.
#[cfg(feature = "redis")]
fn redis_url(config: &Config) -> String {
    config
        .redis_url
        .clone()
        .or_else(|| std::env::var("REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// The PostgreSQL URL: `--database-url`, else `$DATABASE_URL`, else the local default.
#[cfg(feature = "postgres")]
fn database_url(config: &Config) -> String {
    config
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[cfg(not(feature = "redis"))]
async fn redis_store(_config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err("--store redis needs the `redis` feature: \
         cargo run --example seed_api --features redis -- --store redis"
        .to_owned())
}

#[cfg(feature = "redis")]
async fn redis_store(config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    use tower_idempotency::store::RedisStore;

    let url = redis_url(config);
    // A store error's message includes its cause. Records expire in Redis by themselves.
    let store = RedisStore::open(&url)
        .await
        .map_err(|error| format!("--store redis: cannot connect to Redis ({url}): {error}"))?;
    Ok(Arc::new(store.prefix("seed_api:idempotency:")))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_store(
    _config: &Config,
) -> Result<(Arc<dyn IdempotencyStore>, Resources), String> {
    Err("--store postgres needs the `postgres` feature: \
         cargo run --example seed_api --features postgres -- --store postgres"
        .to_owned())
}

#[cfg(feature = "postgres")]
async fn postgres_store(config: &Config) -> Result<(Arc<dyn IdempotencyStore>, Resources), String> {
    use tower_idempotency::store::{PostgresStore, StoreError};

    let url = database_url(config);
    // A store error's message includes its cause.
    let failed = |what: &str, error: &StoreError| {
        format!("--store postgres: cannot {what} ({url}): {error}")
    };
    let store = PostgresStore::connect(&url)
        .await
        .map_err(|error| failed("connect to PostgreSQL", &error))?;
    store
        .migrate()
        .await
        .map_err(|error| failed("create the idempotency table", &error))?;
    // Reclaims expired records every minute, for as long as the server runs.
    drop(store.spawn_cleanup(Duration::from_secs(60)));
    let resources = super::resources::postgres::Db::open(store.clone())
        .await
        .map_err(|error| format!("--store postgres: cannot create the resources table: {error}"))?;
    Ok((Arc::new(store), Resources::Postgres(resources)))
}
