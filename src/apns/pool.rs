//! The lanes of one app. A device's notifications always take the same lane,
//! so they reach APNs in the order they were published.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::lane::{Lane, Outcomes, Settings, Target};
use super::Notification;
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
    pub fn start(
        app: Arc<str>,
        connections: usize,
        target: Arc<Target>,
        settings: Settings,
        outcomes: Outcomes,
        stats: Arc<Stats>,
    ) -> Pool {
        Self::with_lanes((0..connections.max(1)).map(|i| {
            Lane::spawn(
                app.clone(),
                i,
                target.clone(),
                settings,
                outcomes.clone(),
                stats.clone(),
            )
        }))
    }

    /// A pool over lanes of any transport: each lane is a sender of work and
    /// the task that ends once that work has outcomes.
    pub fn with_lanes(
        lanes: impl IntoIterator<Item = (mpsc::Sender<Vec<Notification>>, JoinHandle<()>)>,
    ) -> Pool {
        let (lanes, tasks) = lanes.into_iter().unzip();
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
