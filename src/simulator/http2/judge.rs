//! Judging a whole request: Apple's rules ([`super::rules`]) with what a
//! connection knows (its credentials, the faults of the moment), and what
//! an accepted request leaves behind (count, record, meter, GOAWAY, stall).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::Method;
use tokio::time::Instant;

use super::head::{Field, Head};
use super::reply::Reply;
use super::rules::{self, Credential};
use super::Stream;
use crate::apns::http2::ApnsReason;
use crate::simulator::{channels, Accepted, Faults, Shared};

/// What judging a request needs, and what it leaves for the connection to do.
pub(super) struct Judge {
    pub(super) shared: Arc<Shared>,
    /// The faults as of this turn of the connection (they change while it runs).
    pub(super) faults: Faults,
    pub(super) certified: bool,
    pub(super) client_topic: Option<Arc<str>>,
    pub(super) number: u64,
    /// The provider token last presented here, and what it checked out as.
    pub(super) credential: Option<(String, Credential)>,
    /// The clocks and the meter, read once per read of the socket.
    pub(super) now: Option<SystemTime>,
    pub(super) instant: Option<Instant>,
    pub(super) arrived: Option<u64>,
    /// Accepted during this read, recorded together (never in sink mode).
    pub(super) accepted: Vec<Accepted>,
    /// An acceptance made it time for a GOAWAY.
    pub(super) goaway_due: bool,
    /// An acceptance (or another connection's) reached `stall_after`.
    pub(super) stalled: bool,
}

impl Judge {
    pub(super) fn stall_reached(&self) -> bool {
        self.faults
            .stall_after
            .is_some_and(|n| self.shared.accepted_count.load(Ordering::Relaxed) >= n)
    }

    /// A read's frames are about to be handled.
    pub(super) fn begin(&mut self) {
        self.now = None;
        self.instant = None;
        self.arrived = None;
    }

    /// A read's frames were handled: what they brought is recorded.
    pub(super) fn end(&mut self) {
        if !self.accepted.is_empty() {
            self.shared
                .record_accepted(std::mem::take(&mut self.accepted));
        }
    }

    pub(super) fn now(&mut self) -> SystemTime {
        *self.now.get_or_insert_with(SystemTime::now)
    }

    pub(super) fn instant(&mut self) -> Instant {
        *self.instant.get_or_insert_with(Instant::now)
    }

    /// What the request's `authorization` checked out as, under token auth.
    pub(super) fn credential(&mut self, head: &Head) -> Option<Credential> {
        if self.certified {
            return None;
        }
        let value = head.get(Field::Authorization)?;
        match &self.credential {
            Some((seen, credential)) if seen == value => Some(*credential),
            _ => {
                let rank = self.shared.provider_token_rank(value);
                let credential = Credential::check(value, rank, &self.shared.token_public_key);
                self.credential = Some((value.to_owned(), credential));
                Some(credential)
            }
        }
    }

    /// Judges a whole request (stream `id`): counts, records and meters an
    /// accepted one, records a refused one.
    pub(super) fn reply(&mut self, id: u32, stream: &mut Stream) -> Reply {
        let now = self.now();
        let head = &stream.head;
        let credential = self.credential(head);
        let path = head.path().unwrap_or_default();
        if path.starts_with(channels::PATH) || path.starts_with(channels::BROADCAST_PATH) {
            let answer = match rules::authorize(head, self.certified, &self.faults, credential, now)
            {
                Err((status, reason)) => channels::Answer::refused(status, reason),
                Ok(()) => {
                    let method = head
                        .get(Field::Method)
                        .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
                    let headers = head.header_map();
                    let store = &self.shared.channels;
                    match method {
                        None => channels::Answer::refused(405, ApnsReason::MethodNotAllowed),
                        Some(m) if path.starts_with(channels::BROADCAST_PATH) => {
                            store.broadcast(&m, path, &headers, &stream.payload)
                        }
                        Some(m) => store.handle(&m, path, &headers, &stream.payload),
                    }
                }
            };
            let (status, channel_id, body) = answer.into_parts();
            return Reply::Channel {
                status,
                channel_id,
                body,
            };
        }
        let payload_len = usize::try_from(stream.received).unwrap_or(usize::MAX);
        let verdict = rules::judge(
            head,
            payload_len,
            self.certified,
            &self.faults,
            credential,
            now,
        );
        match verdict {
            Ok(valid) => {
                let arrived = *self
                    .arrived
                    .get_or_insert_with(|| self.shared.meter.arrived());
                if self.shared.stamps {
                    self.shared.meter.time(&valid.token, arrived);
                }
                let count = self.shared.accepted_count.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.shared.sink {
                    self.accepted.push(Accepted {
                        token: valid.token,
                        payload: std::mem::take(&mut stream.payload),
                        identifier: id,
                        expiry: valid.expiry,
                        priority: valid.priority,
                        connection: self.number,
                        client_topic: self.client_topic.clone(),
                        http2: Some(valid.meta()),
                    });
                }
                let faults = &self.faults;
                if faults
                    .goaway_every
                    .is_some_and(|n| n > 0 && count.is_multiple_of(n))
                {
                    self.goaway_due = true;
                }
                if faults.stall_after.is_some_and(|n| count >= n) {
                    self.stalled = true;
                }
                Reply::Accepted
            }
            Err(refusal) => {
                if let Some(token) = refusal.token {
                    self.shared
                        .record_http2_refusal(token, refusal.status, refusal.reason);
                }
                let timestamp = (refusal.status == 410).then(|| {
                    now.duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64)
                });
                Reply::Refused {
                    status: refusal.status,
                    reason: refusal.reason,
                    timestamp,
                }
            }
        }
    }
}
