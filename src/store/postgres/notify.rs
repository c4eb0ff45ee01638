//! Change notification for waiting duplicates: `complete` and `release` run `pg_notify` on the
//! record's channel, and a store's one listener connection (`LISTEN`, through sqlx's
//! [`PgListener`]) listens on the channels of the keys that requests of this instance wait for.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::{
    PgPool,
    postgres::{PgListener, PgPoolOptions},
};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};

use crate::store::{StoreKey, wait};

/// How many hex digits of the store key name a channel: 160 bits, so that the name
/// (`idempotency_` and the digits, 52 bytes) fits PostgreSQL's 63-byte identifiers.
const CHANNEL_HEX_DIGITS: usize = 40;

/// How long the listener waits for its connection before a waiter falls back to polling.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The channel of `key`'s record: `idempotency_` and the first 40 hex digits of the key.
pub(super) fn channel(key: &StoreKey) -> String {
    let mut hex = key.to_hex();
    hex.truncate(CHANNEL_HEX_DIGITS);
    format!("idempotency_{hex}")
}

enum Command {
    /// `LISTEN` on the channel (unless listening already); answered once it is in effect.
    Listen(String, oneshot::Sender<Result<(), sqlx::Error>>),
    /// `UNLISTEN`, unless a waiter came back meanwhile.
    Unlisten(String),
}

/// One channel that requests of this instance wait on.
struct Channel {
    waiters: usize,
    changed: Arc<Notify>,
}

#[derive(Default)]
struct Shared {
    channels: Mutex<HashMap<String, Channel>>,
    /// Woken when the listener's connection drops: notifications may have been lost, so every
    /// waiter looks at the store again.
    disconnected: Notify,
}

impl Shared {
    fn waiters(&self, channel: &str) -> usize {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.get(channel).map_or(0, |c| c.waiters)
    }
}

/// A store's listener: a task that owns one connection, opened when a request first waits.
pub(super) struct Listener {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Listener {
    /// A listener on a pool of one connection with `pool`'s connect options, opened on the
    /// first wait. Spawns its task (which ends with the listener): call within a tokio runtime.
    pub(super) fn new(pool: &PgPool) -> Arc<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with((*pool.connect_options()).clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        tokio::spawn(listen(pool, rx, shared.clone()));
        Arc::new(Self {
            commands: tx,
            shared,
        })
    }

    /// Returns by `timeout`, earlier when a notification comes on `channel`, when the
    /// connection drops, or when `in_flight` (run once listening) says the record is no longer
    /// in flight. When the `LISTEN` cannot be made in time, sleeps out the timeout: the caller
    /// then polls, as without notification.
    pub(super) async fn wait<F>(&self, channel: &str, in_flight: F, timeout: Duration)
    where
        F: Future<Output = Result<bool, sqlx::Error>>,
    {
        let deadline = Instant::now() + timeout;
        let changed = {
            let mut channels = self
                .shared
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let entry = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    waiters: 0,
                    changed: Arc::default(),
                });
            entry.waiters += 1;
            entry.changed.clone()
        };
        let _leave = Leave {
            listener: self,
            channel,
        };
        let changed = changed.notified_owned();
        let disconnected = self.shared.disconnected.notified();
        tokio::pin!(changed, disconnected);
        changed.as_mut().enable();
        disconnected.as_mut().enable();

        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Listen(channel.to_owned(), tx))
            .is_err()
        {
            tokio::time::sleep_until(deadline).await;
            return;
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(_) => {
                tokio::time::sleep_until(deadline).await;
                return;
            }
            Err(_) => return,
        }
        // The record may have changed between the caller's `begin` and the `LISTEN`.
        wait::until_changed(deadline, in_flight, changed, disconnected).await;
    }
}

/// Uncounts a waiter when its wait ends; the last one out has the channel unlistened.
struct Leave<'a> {
    listener: &'a Listener,
    channel: &'a str,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut channels = self
            .listener
            .shared
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = channels.get_mut(self.channel) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                let _ = self
                    .listener
                    .commands
                    .send(Command::Unlisten(self.channel.to_owned()));
            }
        }
    }
}

/// The listener's task: runs the commands in order, and wakes the waiters of each
/// notification's channel (all waiters when the connection drops). Ends when the store is
/// dropped.
async fn listen(pool: PgPool, mut commands: mpsc::UnboundedReceiver<Command>, shared: Arc<Shared>) {
    let mut listener: Option<PgListener> = None;
    // The channels `listener` listens on.
    let mut listening = HashSet::new();
    loop {
        let event = tokio::select! {
            command = commands.recv() => Event::Command(command),
            received = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await,
                    None => std::future::pending().await,
                }
            } => Event::Received(received),
        };
        match event {
            Event::Command(None) => return,
            Event::Command(Some(Command::Listen(channel, reply))) => {
                if listening.contains(&channel) {
                    let _ = reply.send(Ok(()));
                    continue;
                }
                if listener.is_none() {
                    match PgListener::connect_with(&pool).await {
                        Ok(l) => listener = Some(l),
                        Err(error) => {
                            let _ = reply.send(Err(error));
                            continue;
                        }
                    }
                }
                let Some(l) = listener.as_mut() else { continue };
                match l.listen(&channel).await {
                    Ok(()) => {
                        listening.insert(channel);
                        let _ = reply.send(Ok(()));
                    }
                    Err(error) => {
                        listener = None;
                        listening.clear();
                        shared.disconnected.notify_waiters();
                        let _ = reply.send(Err(error));
                    }
                }
            }
            Event::Command(Some(Command::Unlisten(channel))) => {
                if shared.waiters(&channel) > 0 {
                    continue;
                }
                if listening.remove(&channel)
                    && let Some(l) = listener.as_mut()
                    && l.unlisten(&channel).await.is_err()
                {
                    listener = None;
                    listening.clear();
                }
                let mut channels = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
                if channels.get(&channel).is_some_and(|c| c.waiters == 0) {
                    channels.remove(&channel);
                }
            }
            Event::Received(Ok(Some(notification))) => {
                let channels = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = channels.get(notification.channel()) {
                    entry.changed.notify_waiters();
                }
            }
            // The connection was lost (and opened again, listening again): what came meanwhile
            // is lost.
            Event::Received(Ok(None)) => shared.disconnected.notify_waiters(),
            Event::Received(Err(error)) => {
                tracing::debug!(
                    target: "tower_idempotency",
                    %error,
                    "PostgreSQL listener failed; waiters poll until it is back"
                );
                listener = None;
                listening.clear();
                shared.disconnected.notify_waiters();
            }
        }
    }
}

enum Event {
    Command(Option<Command>),
    Received(Result<Option<sqlx::postgres::PgNotification>, sqlx::Error>),
}

#[cfg(test)]
#[path = "notify_tests.rs"]
mod tests;
