//! The Lua scripts of [`RedisStore`](super::RedisStore): one per store call, each touching only
//! the record's key (`KEYS[1]`), so that every call goes to one server, on a cluster too.

use std::{sync::LazyLock, time::Duration};

use redis::Script;

/// The longest lease or TTL the store writes, in milliseconds (100 years): longer ones are cut
/// to it, so that deadlines stay exact in Lua's doubles and `PEXPIRE` never overflows.
pub(super) const MAX_MILLIS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

// Deadlines (now, about 1.8e12 ms, plus at most twice MAX_MILLIS) stay exact in a double.
const _: () = assert!(MAX_MILLIS * 3 < 1 << 53);

/// Whole milliseconds, rounded up, within 1 ms and [`MAX_MILLIS`].
pub(super) fn millis(duration: Duration) -> u64 {
    let nanos = duration.as_nanos();
    let ms = nanos.div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).clamp(1, MAX_MILLIS)
}

/// The server's clock in milliseconds since the Unix epoch, as `now`. Scripts that write after
/// reading `TIME` need effects replication, the default since Redis 5.
pub(super) const NOW: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
";

/// KEYS[1] record; ARGV[1] fingerprint, ARGV[2] token, ARGV[3] lease ms, ARGV[4] key lifetime
/// ms. Returns {0} (acquired), {1, fingerprint, ms left} (in flight) or {2, fingerprint,
/// response} (completed).
pub(super) const BEGIN: &str = r"
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
pub(super) const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'd', string.format('%.0f', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS[1] record; ARGV[1] token, ARGV[2] encoded response, ARGV[3] TTL ms, ARGV[4] the
/// publish command (`PUBLISH`, `SPUBLISH`, or empty for none). Returns 1 if the token owned the
/// lease (and the response is stored, and, if a request waits for the record (field `w`), an
/// empty message published on the channel named as the key), 2 if the token already completed the record (a repeated `complete`; nothing
/// changes), else 0.
pub(super) const COMPLETE: &str = r"
local record = redis.call('HMGET', KEYS[1], 't', 'c', 'w')
if record[1] ~= ARGV[1] then
  if record[2] == ARGV[1] then
    return 2
  end
  return 0
end
redis.call('HDEL', KEYS[1], 't', 'w')
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'c', ARGV[1],
  'd', string.format('%.0f', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if record[3] and ARGV[4] and ARGV[4] ~= '' then
  redis.call(ARGV[4], KEYS[1], '')
end
return 1
";

/// KEYS[1] record; ARGV[1] token, ARGV[2] the publish command, as for [`COMPLETE`] (absent or
/// empty: none). Returns 1 if the token owned the lease (and it is gone, and the release
/// published if a request waits for it), else 0.
pub(super) const RELEASE: &str = r"
local record = redis.call('HMGET', KEYS[1], 't', 'w')
if record[1] ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if record[2] and ARGV[2] and ARGV[2] ~= '' then
  redis.call(ARGV[2], KEYS[1], '')
end
return 1
";

/// KEYS[1] record. Marks a lease as waited for (field `w`), so that its `complete` or
/// `release` publishes. Returns 1 if the record holds a lease, else 0.
pub(super) const WAITED: &str = r"
if redis.call('HEXISTS', KEYS[1], 't') == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'w', '1')
return 1
";

/// A script: its source, sent with `EVAL` when the server does not know it, and its SHA-1,
/// sent with `EVALSHA` otherwise.
pub(super) struct LuaScript {
    pub(super) source: String,
    pub(super) hash: String,
}

impl LuaScript {
    fn new(source: String) -> Self {
        let hash = Script::new(&source).get_hash().to_owned();
        Self { source, hash }
    }
}

pub(super) struct Scripts {
    pub(super) begin: LuaScript,
    pub(super) renew: LuaScript,
    pub(super) complete: LuaScript,
    pub(super) release: LuaScript,
    pub(super) waited: LuaScript,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    begin: LuaScript::new(format!("{NOW}{BEGIN}")),
    renew: LuaScript::new(format!("{NOW}{RENEW}")),
    complete: LuaScript::new(format!("{NOW}{COMPLETE}")),
    // Release needs no clock.
    release: LuaScript::new(RELEASE.to_owned()),
    waited: LuaScript::new(WAITED.to_owned()),
});

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

    /// The cut is at 100 years: a TTL of 99 years is written whole, one of 101 as 100.
    #[test]
    fn the_cut_is_at_100_years() {
        const YEAR_MS: u64 = 365 * 24 * 60 * 60 * 1000;
        let years = |n: u64| Duration::from_secs(n * 365 * 24 * 60 * 60);
        assert_eq!(millis(years(99)), 99 * YEAR_MS);
        assert_eq!(millis(years(101)), 100 * YEAR_MS);
    }
}
