//! What Redis keeps: the server's persistence settings, and replica acknowledgement.

use std::fmt;

use redis::{ErrorKind, RedisError, RedisResult, Value};

use super::connection::Connection;

/// What the Redis server's persistence settings mean for the records a [`RedisStore`](super::RedisStore) writes,
/// as read from its configuration (`CONFIG GET appendonly`, `appendfsync` and `save`) when the
/// store opened. On a cluster, the weakest of its masters.
///
/// "Runs once" holds only while Redis keeps the record: a record Redis forgets is a key that
/// is free again, and its retry runs the handler a second time. Persistence is about restarts;
/// replication is a separate matter: an asynchronous replica promoted by a failover lacks the
/// writes it had not received yet, whatever the persistence, unless the store waits for
/// replicas ([`RedisStore::wait_replicas`](super::RedisStore::wait_replicas)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisDurability {
    /// No persistence (`appendonly no`, `save ""`): a restart of Redis forgets every record.
    None,
    /// RDB snapshots only (`appendonly no`, `save` set): a restart loses every record written
    /// since the last snapshot, minutes of them with the usual `save` rules.
    Snapshots,
    /// Append-only file with `appendfsync no`: a restart of the Redis process loses nothing
    /// (the file is written before Redis replies), a crash of the machine loses what the
    /// operating system had not flushed yet (typically up to 30 s).
    AppendOnlyNoFsync,
    /// Append-only file with `appendfsync everysec` (Redis' default for AOF): a restart of the
    /// Redis process loses nothing, a crash of the machine up to about a second of records.
    AppendOnlyEverySec,
    /// Append-only file with `appendfsync always`: every write is on disk before Redis
    /// replies; nothing acknowledged is lost to a restart or a machine crash.
    AppendOnlyAlways,
    /// The store could not tell: `CONFIG` is disabled or renamed, or the user may not run it
    /// (managed Redis services often do this). Find out from the provider.
    Unknown,
}

impl RedisDurability {
    /// Whether records survive a restart of the Redis process (they may still be lost to a
    /// crash of the machine; see each variant). `false` for [`Unknown`](Self::Unknown).
    pub fn survives_restart(self) -> bool {
        matches!(
            self,
            Self::AppendOnlyNoFsync | Self::AppendOnlyEverySec | Self::AppendOnlyAlways
        )
    }

    /// From the values of `appendonly`, `appendfsync` and `save` on one server.
    fn from_config(appendonly: &str, appendfsync: &str, save: &str) -> Self {
        if appendonly.eq_ignore_ascii_case("yes") {
            match appendfsync.to_ascii_lowercase().as_str() {
                "always" => Self::AppendOnlyAlways,
                "everysec" => Self::AppendOnlyEverySec,
                "no" => Self::AppendOnlyNoFsync,
                _ => Self::Unknown,
            }
        } else if save.trim().is_empty() {
            Self::None
        } else {
            Self::Snapshots
        }
    }

    /// Weakest first, for the minimum over a cluster's masters.
    fn rank(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::None => 1,
            Self::Snapshots => 2,
            Self::AppendOnlyNoFsync => 3,
            Self::AppendOnlyEverySec => 4,
            Self::AppendOnlyAlways => 5,
        }
    }
}

/// The text of a reply value.
pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// The value of `name` in a `CONFIG GET` reply (a flat array in RESP2, a map in RESP3).
pub(super) fn config_value(reply: &Value, name: &str) -> Option<String> {
    let matches = |k: &Value| text(k).is_some_and(|k| k.eq_ignore_ascii_case(name));
    match reply {
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| pair.len() == 2 && matches(&pair[0]))
            .and_then(|pair| text(&pair[1])),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| matches(k))
            .and_then(|(_, v)| text(v)),
        _ => None,
    }
}

/// `CONFIG GET name` on the server, or on every master of a cluster: one value per server,
/// keyed by its address (empty for a single server).
pub(super) async fn config_get(
    conn: &mut Connection,
    name: &str,
) -> RedisResult<Vec<(String, String)>> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg(name);
    let not_found = || RedisError::from((ErrorKind::Client, "no such configuration parameter"));
    match conn {
        Connection::Single(conn) => {
            let reply: Value = cmd.query_async(conn).await?;
            let value = config_value(&reply, name).ok_or_else(not_found)?;
            Ok(vec![(String::new(), value)])
        }
        #[cfg(feature = "redis-cluster")]
        Connection::Cluster(conn) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            let reply = conn.route_command(cmd, routing).await?;
            let Value::Map(nodes) = reply else {
                return Err(not_found());
            };
            nodes
                .into_iter()
                .map(|(node, reply)| {
                    if let Value::ServerError(error) = reply {
                        return Err(RedisError::from(error));
                    }
                    let value = config_value(&reply, name).ok_or_else(not_found)?;
                    Ok((text(&node).unwrap_or_default(), value))
                })
                .collect()
        }
    }
}

/// Reads the persistence settings; [`RedisDurability::Unknown`] when any of them cannot be
/// read, with the reason.
pub(super) async fn read_durability(
    conn: &mut Connection,
) -> (RedisDurability, Option<RedisError>) {
    let read = async {
        let appendonly = config_get(conn, "appendonly").await?;
        let appendfsync = config_get(conn, "appendfsync").await?;
        let save = config_get(conn, "save").await?;
        let setting = |values: &[(String, String)], node: &str| {
            values
                .iter()
                .find(|(n, _)| n == node)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let weakest = appendonly
            .iter()
            .map(|(node, appendonly)| {
                RedisDurability::from_config(
                    appendonly,
                    &setting(&appendfsync, node),
                    &setting(&save, node),
                )
            })
            .min_by_key(|d| d.rank())
            .unwrap_or(RedisDurability::Unknown);
        Ok::<_, RedisError>(weakest)
    };
    match read.await {
        Ok(durability) => (durability, None),
        Err(error) => (RedisDurability::Unknown, Some(error)),
    }
}

/// Replica acknowledgement, as set by [`RedisStore::wait_replicas`](super::RedisStore::wait_replicas).
#[derive(Debug, Clone, Copy)]
pub(super) struct WaitReplicas {
    pub(super) replicas: u32,
    pub(super) timeout_ms: u64,
}

/// The source of the error a `begin` or `complete` returns when fewer replicas than asked for
/// acknowledged its write within the timeout.
#[derive(Debug)]
pub(super) struct NotAcknowledged {
    pub(super) wanted: u32,
    pub(super) acknowledged: i64,
    pub(super) timeout_ms: u64,
}

impl fmt::Display for NotAcknowledged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WAIT {} {}: {} replica(s) acknowledged the write",
            self.wanted, self.timeout_ms, self.acknowledged
        )
    }
}

impl std::error::Error for NotAcknowledged {}

#[cfg(test)]
mod tests {
    use redis::{Value, VerbatimFormat};

    use super::{
        RedisDurability::{self, *},
        config_value, text,
    };

    /// Every combination the server's settings can take (the tests in
    /// `tests/redis_store_durability.rs` start servers with some of them), in any case.
    #[test]
    fn settings_map_to_what_a_restart_keeps() {
        let cases: [(&str, &str, &str, RedisDurability); 9] = [
            ("yes", "always", "", AppendOnlyAlways),
            ("YES", "EverySec", "3600 1", AppendOnlyEverySec),
            ("yes", "no", "", AppendOnlyNoFsync),
            ("yes", "No", "60 100", AppendOnlyNoFsync),
            ("yes", "sometimes", "", Unknown),
            ("no", "always", "", None),
            ("no", "everysec", "  ", None),
            ("no", "everysec", "3600 1 300 100", Snapshots),
            ("", "", "60 1", Snapshots),
        ];
        for (appendonly, appendfsync, save, expected) in cases {
            assert_eq!(
                RedisDurability::from_config(appendonly, appendfsync, save),
                expected,
                "appendonly {appendonly:?}, appendfsync {appendfsync:?}, save {save:?}"
            );
        }
    }

    /// A cluster is as durable as its weakest master: the order of the variants, weakest first.
    #[test]
    fn ranks_go_from_weakest_to_strongest() {
        let order = [
            Unknown,
            None,
            Snapshots,
            AppendOnlyNoFsync,
            AppendOnlyEverySec,
            AppendOnlyAlways,
        ];
        for pair in order.windows(2) {
            assert!(pair[0].rank() < pair[1].rank(), "{pair:?}");
        }
    }

    /// `CONFIG GET` answers in any of Redis' string kinds.
    #[test]
    fn text_reads_every_string_kind() {
        assert_eq!(
            text(&Value::BulkString(b"yes".to_vec())).as_deref(),
            Some("yes")
        );
        assert_eq!(
            text(&Value::SimpleString("no".into())).as_deref(),
            Some("no")
        );
        let verbatim = Value::VerbatimString {
            format: VerbatimFormat::Text,
            text: "everysec".into(),
        };
        assert_eq!(text(&verbatim).as_deref(), Some("everysec"));
        assert_eq!(text(&Value::Int(1)), Option::None);
    }

    /// The value of the name asked for, from a RESP2 array of pairs or a RESP3 map; not the
    /// value of another name.
    #[test]
    fn config_value_finds_the_name_in_either_protocol() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let array = Value::Array(vec![
            bulk("appendfsync"),
            bulk("everysec"),
            bulk("appendonly"),
            bulk("yes"),
        ]);
        assert_eq!(config_value(&array, "APPENDONLY").as_deref(), Some("yes"));
        assert_eq!(config_value(&array, "save"), Option::None);
        let map = Value::Map(vec![
            (bulk("save"), bulk("3600 1")),
            (bulk("appendonly"), bulk("no")),
        ]);
        assert_eq!(config_value(&map, "appendonly").as_deref(), Some("no"));
        assert_eq!(config_value(&map, "appendfsync"), Option::None);
        assert_eq!(config_value(&Value::Nil, "appendonly"), Option::None);
    }
}
