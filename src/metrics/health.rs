//! Whether the daemon is ready to take work, which `/readyz` reports: kept
//! apart from the counters because it decides, where they only count.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::{AppLabel, Gauge, Labelled};

/// Ready while a broker session consumes and no gateway refuses an app's
/// certificate.
#[derive(Debug)]
pub struct Health {
    consuming: AtomicBool,
    /// (app, lane) pairs whose gateway refuses the certificate now.
    refused: Mutex<HashSet<(String, usize)>>,
    /// The per-app count of `refused`, for the scraper.
    identity_refused: Labelled<AppLabel, Gauge>,
    /// [`Health::is_ready`] as a series, for the scraper.
    ready: Gauge,
}

impl Health {
    pub(super) fn new(identity_refused: Labelled<AppLabel, Gauge>, ready: Gauge) -> Health {
        Health {
            consuming: AtomicBool::new(false),
            refused: Mutex::new(HashSet::new()),
            identity_refused,
            ready,
        }
    }

    /// Records whether a broker session consumes now.
    pub fn set_ready(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
        self.ready.set(i64::from(self.is_ready()));
    }

    /// A broker session consumes, and no gateway refuses an app's certificate.
    pub fn is_ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) && self.refused_apps().is_empty()
    }

    /// Records whether the gateway refuses the certificate of `app`'s lane
    /// `lane`: readiness is withheld while any lane is refused.
    pub fn set_identity_refused(&self, app: &str, lane: usize, refused: bool) {
        let mut set = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (app.to_owned(), lane);
        let changed = if refused {
            set.insert(key)
        } else {
            set.remove(&key)
        };
        if changed {
            let count = set.iter().filter(|(a, _)| a == app).count();
            self.identity_refused
                .with(&AppLabel {
                    app: app.to_owned(),
                })
                .set(count as i64);
            drop(set);
            self.ready.set(i64::from(self.is_ready()));
        }
    }

    /// Apps with a lane whose gateway refuses their certificate, sorted.
    pub fn refused_apps(&self) -> Vec<String> {
        let set = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let mut apps: Vec<String> = set.iter().map(|(a, _)| a.clone()).collect();
        apps.sort();
        apps.dedup();
        apps
    }
}
