//! [`RedisStore`]: records in Redis, one hash per key, every call one Lua script.

use std::{
    fmt,
    sync::{Arc, LazyLock},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::FutureExt;
use redis::{Script, Value, aio::ConnectionManager};

use super::{
    Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreErrorKind, StoreKey,
    StoredResponse,
};

/// The default key prefix.
const DEFAULT_PREFIX: &str = "idempotency:";

/// The longest lease or TTL the store writes, in milliseconds (100 years): longer ones are cut
/// to it, so that deadlines stay exact in Lua's doubles and `PEXPIRE` never overflows.
const MAX_MILLIS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

// Deadlines (now, about 1.8e12 ms, plus at most twice MAX_MILLIS) stay exact in a double.
const _: () = assert!(MAX_MILLIS * 3 < 1 << 53);

/// The server's clock in milliseconds since the Unix epoch, as `now`. Scripts that write after
/// reading `TIME` need effects replication, the default since Redis 5.
const NOW: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
";

/// KEYS[1] record; ARGV[1] fingerprint, ARGV[2] token, ARGV[3] lease ms, ARGV[4] key lifetime
/// ms. Returns {0} (acquired), {1, fingerprint, ms left} (in flight) or {2, fingerprint,
/// response} (completed).
const BEGIN: &str = r"
local record = redis.call('HMGET', KEYS[1], 'f', 'd', 'r')
local deadline = tonumber(record[2])
if deadline and deadline > now then
  if record[3] then
    return {2, record[1], record[3]}
  end
  return {1, record[1], deadline - now}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'f', ARGV[1], 't', ARGV[2],
  'd', string.format('%.0f', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {0}
";

/// KEYS[1] record; ARGV[1] token, ARGV[2] lease ms, ARGV[3] key lifetime ms. Returns 1 if the
/// token owns the lease (and it was renewed), else 0.
const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'd', string.format('%.0f', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS[1] record; ARGV[1] token, ARGV[2] encoded response, ARGV[3] TTL ms. Returns 1 if the
/// token owned the lease (and the response is stored), else 0.
const COMPLETE: &str = r"
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 't')
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'd', string.format('%.0f', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS[1] record; ARGV[1] token. Returns 1 if the token owned the lease (and it is gone),
/// else 0.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
";

struct Scripts {
    begin: Script,
    renew: Script,
    complete: Script,
    release: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    begin: Script::new(&format!("{NOW}{BEGIN}")),
    renew: Script::new(&format!("{NOW}{RENEW}")),
    complete: Script::new(&format!("{NOW}{COMPLETE}")),
    // Release needs no clock.
    release: Script::new(RELEASE),
});

/// A store in Redis, for services that run as several instances: every instance sees every
/// record, and leases and TTLs run on the Redis server's clock, so instances need not agree on
/// the time.
///
/// Built on [`ConnectionManager`], which multiplexes calls over one connection and reconnects
/// by itself; while Redis cannot be reached, calls fail with
/// [`StoreErrorKind::Unavailable`] (the driver error is the [`source`](std::error::Error::source))
/// and the layer answers `503` (see [`StoreFailure`](crate::StoreFailure)). Needs Redis 5 or
/// later (or Valkey); every record is one key, so it works on Redis Cluster too.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
/// use tower_idempotency::{IdempotencyLayer, store::RedisStore};
///
/// let store = RedisStore::open("redis://127.0.0.1:6379").await?.prefix("billing:idem:");
/// let layer = IdempotencyLayer::new().post("/calls").store(store);
/// # let _ = layer; Ok(()) }
/// ```
///
/// # Data layout
///
/// One hash per record, at `<prefix><key>`: the [prefix](Self::prefix) (default
/// `idempotency:`) followed by the [`StoreKey`] as 64 lowercase hex digits. Its fields:
///
/// | field | value | present |
/// |---|---|---|
/// | `f` | the fingerprint, 32 raw bytes | always |
/// | `d` | the deadline, milliseconds since the Unix epoch on the server's clock, in decimal: the lease expiry while in flight, completion time plus TTL once completed | always |
/// | `t` | the lease token, 16 raw bytes | in flight |
/// | `r` | the response, [`StoredResponse::encode`]d: status, headers and body as length-prefixed binary | completed |
///
/// Nothing is base64 or JSON: a completed record with a 100-byte body and two short headers
/// holds about 230 bytes of values, and took 592 bytes of Redis memory in all (`MEMORY USAGE`,
/// Redis 7.0, x86_64).
///
/// # Round trips
///
/// | call | round trips | what runs on the server |
/// |---|---|---|
/// | `begin` | 1 | one script: read the record; if absent or past its deadline, write a new lease |
/// | `complete` | 1 | one script: compare the token, write the response and its deadline |
/// | `renew` | 1 | one script: compare the token, move the deadline |
/// | `release` | 1 | one script: compare the token, delete the key |
/// | `wait` | 0 | none: sleeps for its timeout, so a waiting duplicate polls `begin` with the layer's backoff (20 ms doubling to 500 ms) |
///
/// Scripts run by `EVALSHA`; the first call of each script on a server that has not seen it
/// (after a restart or `SCRIPT FLUSH`) loads it first, once.
///
/// # Expiry
///
/// Every script reads the server's clock (`TIME`) and decides from the stored deadline `d`:
/// a record past it is never replayed, and a lease past it is taken over by the next `begin`.
/// Redis reclaims the memory through key expiry (`PEXPIRE`): a completed record's key expires
/// with its TTL; an in-flight key lives twice its lease, so that an owner which finishes late
/// (its renewals failed) can still complete while nobody has taken the key over.
/// Durations are written in whole milliseconds, rounded up, at least 1 ms and at most 100
/// years.
///
/// Cloning is cheap; clones share the connection.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on `conn`, with the default prefix `idempotency:`.
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
        }
    }

    /// Connects to `url` (`redis://host:port/db`, `rediss://` for TLS when the `redis` crate
    /// has a TLS feature enabled) with a [`ConnectionManager`] of default settings, and returns
    /// a store with the default prefix.
    ///
    /// Returns once connected. Errors with [`StoreErrorKind::Unavailable`] if the URL is
    /// invalid, or if the server cannot be reached within the connection manager's retries
    /// (about 10 s with its defaults; build a [`ConnectionManager`] with your own
    /// `ConnectionManagerConfig` and use [`new`](Self::new) to choose otherwise).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::unavailable)?;
        let conn = client
            .get_connection_manager()
            .await
            .map_err(StoreError::unavailable)?;
        Ok(Self::new(conn))
    }

    /// The prefix of every key this store writes. Default: `idempotency:`. Give each
    /// application (or each test run) sharing a Redis its own.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// The key prefix in use.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    fn redis_key(&self, key: &StoreKey) -> String {
        format!("{}{}", self.prefix, key.to_hex())
    }

    /// A `begin` that failed without an answer (the reply came after the connection's response
    /// timeout, say) may still have run, and taken a lease under `token` that nobody will
    /// complete or release: the key would answer 409 until the lease ran out. So release it,
    /// best effort and without waiting: the release is queued at once on the same connection,
    /// behind the `begin`, and drops the lease only if `token` holds it. It is sent with its
    /// source (`EVAL`), since its answer, `NOSCRIPT` included, may come too late as well.
    fn undo_begin(&self, key: &StoreKey, token: LeaseToken) {
        let mut release = redis::cmd("EVAL");
        release
            .arg(RELEASE)
            .arg(1)
            .arg(self.redis_key(key))
            .arg(&token.to_bytes()[..]);
        let mut conn = self.conn.clone();
        let mut undo = Box::pin(async move {
            let _: redis::RedisResult<Value> = release.query_async(&mut conn).await;
        });
        if (&mut undo).now_or_never().is_none() {
            tokio::spawn(undo);
        }
    }
}

/// Whole milliseconds, rounded up, within 1 ms and [`MAX_MILLIS`].
fn millis(duration: Duration) -> u64 {
    let nanos = duration.as_nanos();
    let ms = nanos.div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).clamp(1, MAX_MILLIS)
}

fn corrupt() -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, "stored Redis record is corrupt")
}

fn fingerprint(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Fingerprint)
        .map_err(|_| corrupt())
}

/// Reads the reply of the `begin` script.
fn begin_outcome(reply: Value, token: LeaseToken) -> Result<Begin, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt());
    };
    match items.as_slice() {
        [Value::Int(0)] => Ok(Begin::Acquired(token)),
        [Value::Int(1), Value::BulkString(fp), Value::Int(ms)] => Ok(Begin::InFlight {
            fingerprint: fingerprint(fp)?,
            lease_remaining: Duration::from_millis(u64::try_from(*ms).unwrap_or(0).max(1)),
        }),
        [
            Value::Int(2),
            Value::BulkString(fp),
            Value::BulkString(response),
        ] => Ok(Begin::Completed {
            fingerprint: fingerprint(fp)?,
            response: StoredResponse::decode(response)?,
        }),
        _ => Err(corrupt()),
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LeaseToken::random();
        let lease = millis(lease);
        let reply: Value = SCRIPTS
            .begin
            .key(self.redis_key(key))
            .arg(&fingerprint.0[..])
            .arg(&token.to_bytes()[..])
            .arg(lease)
            .arg(lease.saturating_mul(2))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| {
                self.undo_begin(key, token);
                StoreError::unavailable(error)
            })?;
        begin_outcome(reply, token)
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let lease = millis(lease);
        let renewed: i64 = SCRIPTS
            .renew
            .key(self.redis_key(key))
            .arg(&token.to_bytes()[..])
            .arg(lease)
            .arg(lease.saturating_mul(2))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(StoreError::unavailable)?;
        Ok(renewed == 1)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let completed: i64 = SCRIPTS
            .complete
            .key(self.redis_key(key))
            .arg(&token.to_bytes()[..])
            .arg(response.encode())
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(StoreError::unavailable)?;
        Ok(completed == 1)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        let released: i64 = SCRIPTS
            .release
            .key(self.redis_key(key))
            .arg(&token.to_bytes()[..])
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(StoreError::unavailable)?;
        Ok(released == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_whole_milliseconds_rounded_up() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_nanos(1)), 1);
        assert_eq!(millis(Duration::from_millis(300)), 300);
        assert_eq!(millis(Duration::from_micros(300_001)), 301);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
    }

    #[test]
    fn begin_replies_are_read_strictly() {
        let token = LeaseToken::random();
        let fp = vec![7; 32];
        assert!(matches!(
            begin_outcome(Value::Array(vec![Value::Int(0)]), token),
            Ok(Begin::Acquired(t)) if t == token
        ));
        match begin_outcome(
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(fp.clone()),
                Value::Int(250),
            ]),
            token,
        ) {
            Ok(Begin::InFlight {
                fingerprint,
                lease_remaining,
            }) => {
                assert_eq!(fingerprint, Fingerprint([7; 32]));
                assert_eq!(lease_remaining, Duration::from_millis(250));
            }
            other => panic!("{other:?}"),
        }
        let bad = [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(3)]),
            // A fingerprint of the wrong length.
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(vec![7; 31]),
                Value::Int(250),
            ]),
            // A response that does not decode.
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(fp),
                Value::BulkString(b"nope".to_vec()),
            ]),
        ];
        for reply in bad {
            let error = begin_outcome(reply, token).unwrap_err();
            assert_eq!(error.kind(), StoreErrorKind::Corrupt);
        }
    }
}
