//! The lanes of one app. A device's notifications always take the same lane,
//! so they reach APNs in the order they were published.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::lane::{Lane, Transport};
use super::{Notification, Outcomes};
use crate::metrics::Stats;

pub struct Pool {
    lanes: Vec<mpsc::Sender<Vec<Notification>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Every lane has stopped: the daemon is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("the app's connections are closed")]
pub struct Closed;

impl Pool {
    /// Starts `connections` lanes (at least one), each over a transport from
    /// `transport`, reporting on `outcomes`.
    pub fn spawn<T: Transport>(
        app: Arc<str>,
        connections: usize,
        mut transport: impl FnMut() -> T,
        outcomes: Outcomes,
        stats: Arc<Stats>,
    ) -> Pool {
        let (lanes, tasks) = (0..connections.max(1))
            .map(|i| Lane::spawn(app.clone(), i, transport(), outcomes.clone(), stats.clone()))
            .unzip();
        Pool { lanes, tasks }
    }

    /// Routes notifications to their lanes, waiting while a lane is full: this
    /// is the back-pressure that keeps memory bounded.
    pub async fn submit(&self, notifications: Vec<Notification>) -> Result<(), Closed> {
        if self.lanes.len() == 1 {
            return self.lanes[0].send(notifications).await.map_err(|_| Closed);
        }
        let n = self.lanes.len() as u64;
        let share = notifications.len() / self.lanes.len() + 1;
        let mut split: Vec<Vec<Notification>> = (0..self.lanes.len())
            .map(|_| Vec::with_capacity(share + share / 4))
            .collect();
        for item in notifications {
            split[(item.route_hash() % n) as usize].push(item);
        }
        for (lane, batch) in self.lanes.iter().zip(split) {
            if !batch.is_empty() {
                lane.send(batch).await.map_err(|_| Closed)?;
            }
        }
        Ok(())
    }

    /// Stops taking work; the returned tasks end once every notification they
    /// hold has an outcome.
    pub fn close(self) -> Vec<JoinHandle<()>> {
        self.tasks
    }
}
