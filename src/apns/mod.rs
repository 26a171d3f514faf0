//! Everything that speaks to APNs, behind one seam: the pipeline hands a
//! transport [`Notification`]s and gets one [`Outcome`] back for each.
//! Resends, reconnects and settling stay inside the transport.

pub mod frame;
pub mod lane;
pub mod pool;
pub mod tls;
pub mod window;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::job::{DeviceToken, Priority};
use crate::ledger::JobKey;
use frame::Status;

/// What every notification of one job shares: one allocation per job, so a
/// fan-out of 10,000 tokens costs one payload buffer.
#[derive(Debug)]
pub struct Envelope {
    pub key: JobKey,
    pub id: Option<Arc<str>>,
    pub app: Arc<str>,
    pub payload: Bytes,
    pub expiry: Option<u32>,
    pub priority: Option<Priority>,
    /// When the job was consumed, for the consume-to-accepted latency.
    pub consumed_at: Instant,
}

/// One device's copy of a job, as it travels through a lane.
#[derive(Debug, Clone)]
pub struct Notification {
    pub envelope: Arc<Envelope>,
    pub token: DeviceToken,
    /// Tries that ended in a transient status.
    pub attempts: u8,
    /// An acceptance was reported already (it settled, then a late error made it
    /// travel again): later outcomes must not be counted against its job again.
    pub reported: bool,
}

impl Notification {
    pub fn new(envelope: Arc<Envelope>, token: DeviceToken) -> Self {
        Notification {
            envelope,
            token,
            attempts: 0,
            reported: false,
        }
    }
}

/// Why a notification failed for good: APNs' status, or a daemon-side reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Apns(Status),
    /// Its `expiry` passed before it could be written.
    Expired,
}

impl Reason {
    /// The `<reason>` of the `failed.<reason>` routing key.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Apns(s) => s.reason(),
            Reason::Expired => "expired",
        }
    }

    /// APNs' status code, when APNs gave one.
    pub fn status(self) -> Option<u8> {
        match self {
            Reason::Apns(s) => Some(s.code()),
            Reason::Expired => None,
        }
    }
}

/// The final word on one notification.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub notification: Notification,
    pub result: Result<(), Failure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub attempts: u8,
}
