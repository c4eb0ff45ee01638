//! Change notification for waiting duplicates: the `complete` and `release` scripts publish on
//! the record's channel (`PUBLISH`, or `SPUBLISH` on a cluster), and a store's one subscriber
//! connection listens on the channels of the keys that requests of this instance wait for.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use redis::{ProtocolVersion, PushInfo, PushKind, RedisResult, Value, aio::ConnectionManager};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};

use crate::store::wait;

/// The publish command the `complete` and `release` scripts run, passed to them as an
/// argument (an empty one publishes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Publish {
    /// Nothing is published ([`RedisStore::notify`](super::RedisStore::notify) off).
    Off,
    /// `PUBLISH`, on one server.
    Plain,
    /// `SPUBLISH`, on a cluster: the message stays on the shard that holds the key's slot.
    #[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
    Sharded,
}

impl Publish {
    /// The script argument.
    pub(super) fn arg(self) -> &'static [u8] {
        match self {
            Self::Off => b"",
            Self::Plain => b"PUBLISH",
            Self::Sharded => b"SPUBLISH",
        }
    }
}

/// The subscriber's own connection, in RESP3, with its push messages sent to the store.
#[derive(Clone)]
enum PushConnection {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl PushConnection {
    async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Single(conn) => conn.subscribe(channel).await,
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(conn) => conn.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Single(conn) => conn.unsubscribe(channel).await,
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(conn) => conn.sunsubscribe(channel).await,
        }
    }
}

/// One channel that requests of this instance wait on.
struct Channel {
    /// Requests waiting on it now.
    waiters: usize,
    /// Woken by a message on the channel.
    changed: Arc<Notify>,
    /// Orders this channel's `SUBSCRIBE` and `UNSUBSCRIBE`, so that a waiter that comes just
    /// as the last one leaves is never left unsubscribed.
    commands: Arc<tokio::sync::Mutex<()>>,
}

/// A store's one subscriber connection and the channels waited on.
pub(super) struct Subscriber {
    conn: PushConnection,
    channels: Mutex<HashMap<String, Channel>>,
    /// Woken when the connection drops: messages may have been lost, so every waiter looks
    /// at the store again.
    disconnected: Notify,
}

impl Subscriber {
    /// A subscriber on its own connection to the server `client` connects to (RESP3 whatever
    /// `client` says; Redis 6 or later), reconnecting with pauses of at most `max_delay` and
    /// subscribing again to its channels by itself.
    pub(super) async fn single(
        client: &redis::Client,
        max_delay: Duration,
    ) -> RedisResult<Arc<Self>> {
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_max_delay(max_delay)
            .set_push_sender(tx)
            .set_automatic_resubscription();
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self::start(PushConnection::Single(conn), rx))
    }

    /// A subscriber on a cluster connection of its own to `nodes` (RESP3, sharded pub/sub;
    /// the cluster client's own resubscription is relied on after it reconnects).
    #[cfg(feature = "redis-cluster")]
    pub(super) async fn cluster(nodes: &[String]) -> RedisResult<Arc<Self>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?;
        let conn = client.get_async_connection().await?;
        Ok(Self::start(PushConnection::Cluster(conn), rx))
    }

    fn start(conn: PushConnection, pushes: mpsc::UnboundedReceiver<PushInfo>) -> Arc<Self> {
        let subscriber = Arc::new(Self {
            conn,
            channels: Mutex::default(),
            disconnected: Notify::new(),
        });
        tokio::spawn(deliver(Arc::downgrade(&subscriber), pushes));
        subscriber
    }

    /// Returns by `timeout`, earlier when a message comes on `channel`, when the connection
    /// drops, or when `in_flight` (run once subscribed) says the record is no longer in flight.
    /// When the subscription cannot be made in time, sleeps out the timeout: the caller then
    /// polls, as without notification.
    pub(super) async fn wait<F>(self: &Arc<Self>, channel: &str, in_flight: F, timeout: Duration)
    where
        F: Future<Output = RedisResult<bool>>,
    {
        let deadline = Instant::now() + timeout;
        let (changed, commands) = self.join(channel);
        let _leave = Leave {
            subscriber: self.clone(),
            channel: channel.to_owned(),
        };
        // Enabled before subscribing: a message that comes once subscribed is never missed.
        let changed = changed.notified_owned();
        let disconnected = self.disconnected.notified();
        tokio::pin!(changed, disconnected);
        changed.as_mut().enable();
        disconnected.as_mut().enable();

        let subscribed = async {
            let _order = commands.lock().await;
            self.conn.clone().subscribe(channel).await
        };
        match tokio::time::timeout_at(deadline, subscribed).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(target: "tower_idempotency", %error, "Redis subscription failed; polling");
                tokio::time::sleep_until(deadline).await;
                return;
            }
            Err(_) => return,
        }
        // The record may have changed between the caller's `begin` and the subscription.
        wait::until_changed(deadline, in_flight, changed, disconnected).await;
    }

    /// Counts a waiter on `channel`.
    fn join(&self, channel: &str) -> (Arc<Notify>, Arc<tokio::sync::Mutex<()>>) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let entry = channels
            .entry(channel.to_owned())
            .or_insert_with(|| Channel {
                waiters: 0,
                changed: Arc::default(),
                commands: Arc::default(),
            });
        entry.waiters += 1;
        (entry.changed.clone(), entry.commands.clone())
    }

    /// Uncounts a waiter on `channel`; the last one out unsubscribes, in a task of its own.
    fn leave(self: &Arc<Self>, channel: String) {
        let commands = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = channels.get_mut(&channel) else {
                return;
            };
            entry.waiters -= 1;
            if entry.waiters > 0 {
                return;
            }
            entry.commands.clone()
        };
        let subscriber = self.clone();
        tokio::spawn(async move {
            let _order = commands.lock().await;
            if subscriber.waiters(&channel) > 0 {
                // A waiter came meanwhile; its subscription stands.
                return;
            }
            // Best effort: a failure leaves a subscription whose messages nobody waits for.
            let _ = subscriber.conn.clone().unsubscribe(&channel).await;
            let mut channels = subscriber
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if channels.get(&channel).is_some_and(|c| c.waiters == 0) {
                channels.remove(&channel);
            }
        });
    }

    fn waiters(&self, channel: &str) -> usize {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.get(channel).map_or(0, |c| c.waiters)
    }
}

/// Uncounts a waiter when its wait ends, however it ends.
struct Leave {
    subscriber: Arc<Subscriber>,
    channel: String,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.subscriber.leave(std::mem::take(&mut self.channel));
    }
}

/// Wakes the waiters of each message's channel, and every waiter when the connection drops.
/// Ends when the store is dropped.
async fn deliver(subscriber: Weak<Subscriber>, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = pushes.recv().await {
        let Some(subscriber) = subscriber.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let Some(Value::BulkString(channel)) = push.data.first() else {
                    continue;
                };
                let Ok(channel) = std::str::from_utf8(channel) else {
                    continue;
                };
                let channels = subscriber
                    .channels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = channels.get(channel) {
                    entry.changed.notify_waiters();
                }
            }
            PushKind::Disconnection => subscriber.disconnected.notify_waiters(),
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "notify_tests.rs"]
mod tests;
