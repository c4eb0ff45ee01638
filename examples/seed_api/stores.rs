//! The stores `--store` names.
//!
//! Errors name what failed and the store error's causes with URLs redacted
//! (`StoreError::diagnostic`), never the URL given, which may hold a password.

use std::sync::Arc;
#[cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]
use std::time::Duration;

use tower_idempotency::{IdempotencyStore, MemoryStore};

use super::{Config, StoreKind, resources::Resources};

/// The idempotency store `--store` names, and where the resources live.
pub async fn build(config: &Config) -> Result<(Arc<dyn IdempotencyStore>, Resources), String> {
    match config.store {
        StoreKind::Memory => Ok((Arc::new(MemoryStore::new()), Resources::default())),
        StoreKind::Redis => Ok((redis_store(config).await?, Resources::default())),
        StoreKind::RedisCluster => Ok((redis_cluster_store(config).await?, Resources::default())),
        StoreKind::Postgres => postgres_store(config).await,
        StoreKind::Mysql => Ok((mysql_store(config).await?, Resources::default())),
    }
}

/// `--store X` without the crate feature it needs.
#[allow(dead_code)]
fn needs(store: &str, feature: &str) -> String {
    format!(
        "--store {store} needs the `{feature}` feature: \
         cargo run -p seed_api --features {feature} -- --store {store}"
    )
}

/// `--redis-url`, else the environment variable `var`, else `default`.
#[allow(dead_code)]
fn url(given: &Option<String>, var: &str, default: &str) -> String {
    given
        .clone()
        .or_else(|| std::env::var(var).ok())
        .unwrap_or_else(|| default.to_owned())
}

#[cfg(feature = "redis")]
fn failed(store: &str, what: &str, error: &tower_idempotency::store::StoreError) -> String {
    format!("--store {store}: cannot {what}: {}", error.diagnostic())
}

#[cfg(not(feature = "redis"))]
async fn redis_store(_config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err(needs("redis", "redis"))
}

/// `--store redis`: the server at `--redis-url`, else `$REDIS_URL`, else the local default.
#[cfg(feature = "redis")]
async fn redis_store(config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    use tower_idempotency::store::RedisStore;

    let url = url(&config.redis_url, "REDIS_URL", "redis://127.0.0.1:6379");
    let store = RedisStore::open(&url)
        .await
        .map_err(|error| failed("redis", "connect to Redis", &error))?;
    // Records expire in Redis by themselves.
    Ok(Arc::new(
        store
            .prefix("seed_api:idempotency:")
            .wait_replicas(config.redis_wait_replicas, wait_timeout(config)),
    ))
}

#[cfg(feature = "redis")]
fn wait_timeout(config: &Config) -> Duration {
    Duration::from_millis(config.redis_wait_ms)
}

#[cfg(not(feature = "redis-cluster"))]
async fn redis_cluster_store(_config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err(needs("redis-cluster", "redis-cluster"))
}

/// `--store redis-cluster`: the cluster of the seed nodes in `--redis-url` (comma-separated),
/// else `$REDIS_CLUSTER_URL`, else `redis://127.0.0.1:7000`.
#[cfg(feature = "redis-cluster")]
async fn redis_cluster_store(config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    use tower_idempotency::store::RedisStore;

    let urls = url(
        &config.redis_url,
        "REDIS_CLUSTER_URL",
        "redis://127.0.0.1:7000",
    );
    let seeds: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let store = RedisStore::open_cluster(&seeds)
        .await
        .map_err(|error| failed("redis-cluster", "connect to the Redis Cluster", &error))?;
    Ok(Arc::new(
        store
            .prefix("seed_api:idempotency:")
            .wait_replicas(config.redis_wait_replicas, wait_timeout(config)),
    ))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_store(
    _config: &Config,
) -> Result<(Arc<dyn IdempotencyStore>, Resources), String> {
    Err(needs("postgres", "postgres"))
}

/// `--store postgres`: records and resources in the database at `--database-url`, else
/// `$DATABASE_URL`, else the local default.
#[cfg(feature = "postgres")]
async fn postgres_store(config: &Config) -> Result<(Arc<dyn IdempotencyStore>, Resources), String> {
    use tower_idempotency::store::PostgresStore;

    let url = url(
        &config.database_url,
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let failed = |what: &str, error: &tower_idempotency::store::StoreError| {
        format!("--store postgres: cannot {what}: {}", error.diagnostic())
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

#[cfg(not(feature = "mysql"))]
async fn mysql_store(_config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err(needs("mysql", "mysql"))
}

/// `--store mysql`: records in the MySQL or MariaDB database at `--database-url`, else
/// `$MYSQL_URL`, else the local default. Resources stay in memory.
#[cfg(feature = "mysql")]
async fn mysql_store(config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    use tower_idempotency::store::MySqlStore;

    let url = url(
        &config.database_url,
        "MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
    );
    let failed = |what: &str, error: &tower_idempotency::store::StoreError| {
        format!("--store mysql: cannot {what}: {}", error.diagnostic())
    };
    let store = MySqlStore::connect(&url)
        .await
        .map_err(|error| failed("connect to MySQL", &error))?;
    store
        .migrate()
        .await
        .map_err(|error| failed("create the idempotency table", &error))?;
    // Reclaims expired records every minute, for as long as the server runs.
    drop(store.spawn_cleanup(Duration::from_secs(60)));
    Ok(Arc::new(store))
}
