//! An in-process daemon against a simulator and this test's slice of the
//! broker, with what the pipeline tests ask of them.

use std::collections::HashMap;
use std::time::Duration;

use apnsd::config::Config;
use apnsd::daemon::Daemon;
use apnsd::job::DeviceToken;
use apnsd::simulator::Simulator;
use tokio_util::sync::CancellationToken;

use super::{job, Broker};

/// How long any one wait in a rig test may take.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Rig {
    pub broker: Broker,
    pub sim: Simulator,
    pub daemon: Daemon,
    pub shutdown: CancellationToken,
    /// Certificates and the configuration file; removed with the rig.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Writes `toml` as the configuration in `dir` and starts a daemon on it.
    pub async fn start(broker: Broker, sim: Simulator, dir: tempfile::TempDir, toml: &str) -> Rig {
        let path = dir.path().join("apnsd.toml");
        std::fs::write(&path, toml).unwrap();
        let config = Config::load(&path).unwrap();
        let shutdown = CancellationToken::new();
        let daemon = Daemon::start(config, shutdown.clone()).await.unwrap();
        Rig {
            broker,
            sim,
            daemon,
            shutdown,
            dir,
        }
    }

    /// Stops the daemon (drain), checks nothing was left in the queue, cleans up.
    pub async fn finish(self) -> apnsd::metrics::StatsSnapshot {
        self.shutdown.cancel();
        let stats = self.daemon.stats.clone();
        tokio::time::timeout(WAIT, self.daemon.wait())
            .await
            .expect("daemon drains");
        assert_eq!(
            self.broker.queue_depth().await,
            0,
            "jobs left in the queue (unacked ones return there)"
        );
        self.sim.shutdown().await;
        self.broker.cleanup().await;
        stats.snapshot()
    }

    /// How often the simulator accepted each token.
    pub fn accepted_counts(&self) -> HashMap<DeviceToken, usize> {
        let mut counts = HashMap::new();
        for a in self.sim.accepted() {
            *counts.entry(a.token).or_insert(0) += 1;
        }
        counts
    }

    /// Every token of `tokens` was accepted exactly once.
    pub fn assert_once(&self, tokens: &[String]) {
        let counts = self.accepted_counts();
        for t in tokens {
            assert_eq!(counts.get(&tok(t)), Some(&1), "token {t}");
        }
    }

    /// Publishes `n` one-token jobs (`j0`, `j1`, ...) for `tokens(i)`; returns the tokens.
    pub async fn burst(&self, n: u32, tokens: impl Fn(u32) -> String) -> Vec<String> {
        let tokens: Vec<String> = (0..n).map(tokens).collect();
        self.broker
            .publish_all(
                tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| job(&format!("j{i}"), t)),
            )
            .await;
        tokens
    }

    /// Publishes a one-token job for each of `tokens`, with ids `<prefix><i>`.
    pub async fn publish_tokens(&self, prefix: &str, tokens: &[String]) {
        let jobs = tokens.iter().enumerate();
        self.broker
            .publish_all(jobs.map(|(i, t)| job(&format!("{prefix}{i}"), t)))
            .await;
    }

    pub async fn wait_acked(&self, jobs: u64) {
        let deadline = std::time::Instant::now() + WAIT;
        while self.daemon.stats.jobs_acked.get() < jobs {
            assert!(
                std::time::Instant::now() < deadline,
                "not every job was acked: {:?}, simulator accepted {} over {} connections",
                self.daemon.stats.snapshot(),
                self.sim.accepted_count(),
                self.sim.connections()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A token as the simulator records it.
pub fn tok(hex: &str) -> DeviceToken {
    DeviceToken::parse(hex).unwrap()
}
