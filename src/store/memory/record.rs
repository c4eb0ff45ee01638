//! What the store holds for a key: a lease in flight or a completed response.

use std::sync::Arc;

use tokio::{sync::Notify, time::Instant};

use crate::store::{Begin, Fingerprint, LeaseToken, StoredResponse};

pub(super) struct Record {
    pub(super) fingerprint: Fingerprint,
    pub(super) state: State,
}

pub(super) enum State {
    InFlight {
        token: LeaseToken,
        expires_at: Instant,
        /// Created by the first waiter only.
        notify: Option<Arc<Notify>>,
    },
    Completed {
        /// Boxed, so that a map slot (and an in-flight record) stays small: 112 bytes rather
        /// than 240, which keeps a large map's probes to fewer cache lines.
        response: Box<StoredResponse>,
        weight: usize,
        expires_at: Instant,
    },
}

impl Record {
    /// What `begin` reports for this record at `now`, unless it has expired.
    pub(super) fn live(&self, now: Instant) -> Option<Begin> {
        match &self.state {
            State::InFlight { expires_at, .. } if *expires_at > now => Some(Begin::InFlight {
                fingerprint: self.fingerprint,
                lease_remaining: *expires_at - now,
            }),
            State::Completed {
                response,
                expires_at,
                ..
            } if *expires_at > now => Some(Begin::Completed {
                fingerprint: self.fingerprint,
                response: StoredResponse::clone(response),
            }),
            _ => None,
        }
    }
}

impl State {
    pub(super) fn expires_at(&self) -> Instant {
        match self {
            State::InFlight { expires_at, .. } | State::Completed { expires_at, .. } => *expires_at,
        }
    }

    pub(super) fn weight(&self) -> usize {
        match self {
            State::InFlight { .. } => 0,
            State::Completed { weight, .. } => *weight,
        }
    }

    /// Wakes everybody waiting on this record (it is about to change).
    pub(super) fn wake(&self) {
        if let State::InFlight {
            notify: Some(notify),
            ..
        } = self
        {
            notify.notify_waiters();
        }
    }
}
