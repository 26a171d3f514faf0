//! The real `apnsd` binary under crashes: killed with SIGKILL mid-stream and
//! restarted, two daemons sharing one queue with one of them killed, and the
//! soak (`scripts/soak.sh`): many jobs with bad tokens, gateway shutdowns and
//! silent closes, one daemon kill and one broker restart.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use common::process::*;
use common::rig::{App, Protocol};
use common::*;

/// One daemon's configuration file, with its own metrics port.
struct DaemonConfig {
    path: PathBuf,
    metrics: String,
}

fn daemon_config(
    dir: &Path,
    name: &str,
    broker: &Broker,
    sim: &SimProcess,
    prefetch: u32,
) -> DaemonConfig {
    let metrics = format!("127.0.0.1:{}", free_port());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "shutdown_timeout = \"20s\"\n{}consumer_tag = \"{name}\"\n[metrics]\nlisten = \"{metrics}\"\n{}",
            broker.amqp_toml(prefetch),
            App::new("example", Protocol::Binary)
                .keys("settle = \"200ms\"\nreconnect_max = \"500ms\"")
                .toml(&sim.services)
        ),
    )
    .unwrap();
    DaemonConfig { path, metrics }
}

/// What a run left behind, the figures the soak prints.
#[derive(Debug, Default)]
struct Tally {
    lost: usize,
    bad_unreported: usize,
    duplicates: usize,
}

/// Compares the simulator's record and the collected results with what was sent.
fn tally(record: &Path, good: &[String], bad: &[String], reported: &HashSet<String>) -> Tally {
    let seen = read_record(record);
    Tally {
        lost: good.iter().filter(|t| !seen.contains_key(*t)).count(),
        bad_unreported: bad.iter().filter(|t| !reported.contains(*t)).count(),
        duplicates: seen.values().map(|n| n - 1).sum(),
    }
}

/// `n` one-token jobs, every hundredth with a token the simulator refuses.
fn jobs(n: u32) -> (Vec<Vec<u8>>, Vec<String>, Vec<String>) {
    let (mut bodies, mut good, mut bad) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let t = if i % 100 == 42 {
            let t = token(0xff, i);
            bad.push(t.clone());
            t
        } else {
            let t = token(0x30, i);
            good.push(t.clone());
            t
        };
        bodies.push(job(&format!("s{i}"), &t));
    }
    (bodies, good, bad)
}

/// Lines in the simulator's record: how many notifications it accepted.
fn recorded(record: &Path) -> usize {
    std::fs::read(record).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

async fn wait_recorded(record: &Path, at_least: usize, within: Duration) {
    let done = wait_until(within, || recorded(record) >= at_least).await;
    assert!(done, "only {} of {at_least} recorded", recorded(record));
}

/// A fresh connection: the test's own may not survive a broker restart.
async fn connect() -> Connection {
    Connection::connect(&amqp_uri(), ConnectionProperties::default())
        .await
        .unwrap()
}

async fn depth(queue: &str) -> u32 {
    let ch = connect().await.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

/// A durable queue bound to every result, read once the run is over.
async fn tap(broker: &Broker) -> String {
    let name = format!("{}.tap", broker.queue);
    let ch = connect().await.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        name.as_str().into(),
        broker.exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    name
}

/// Tokens of the `failed.invalid_token` results in the tap; panics on any other result.
async fn reported(tap: &str) -> HashSet<String> {
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            tap.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut tokens = HashSet::new();
    let quiet = Duration::from_millis(500);
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, consumer.next()).await {
        assert_eq!(d.routing_key.as_str(), "failed.invalid_token");
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        tokens.insert(body["token"].as_str().unwrap().to_owned());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "bye".into()).await;
    tokens
}

async fn delete(queues: &[String]) {
    let ch = connect().await.create_channel().await.unwrap();
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// How a crash run goes.
struct Crash {
    jobs: u32,
    prefetch: u32,
    /// `apnsd simulate` fault switches besides `--refuse ff=8`.
    faults: Vec<String>,
    /// Both daemons consume from the start (scale-out), rather than the second
    /// starting after the first is killed (restart).
    parallel: bool,
    /// Restart the broker's app once (`rabbitmqctl stop_app`/`start_app`):
    /// every other user of the broker notices, so only the soak does it.
    broker_restart: bool,
}

/// What a crash run measured.
#[derive(Debug)]
struct Report {
    tally: Tally,
    /// Jobs the surviving daemon got redelivered: the bound on duplicates.
    redelivered: u64,
    resent_after_close: u64,
    peak_rss_kib: u64,
}

/// Runs `crash.jobs` jobs through two daemons, killing the first with SIGKILL
/// a third of the way, until every good token is accepted and every bad one
/// reported; then stops the second and checks both queues are empty.
async fn crash_run(test: &str, crash: Crash) -> Report {
    let broker = Broker::new(test).await;
    let tap = tap(&broker).await;
    let dir = tempfile::tempdir().unwrap();
    let mut switches = vec!["--refuse", "ff=8"];
    switches.extend(crash.faults.iter().map(String::as_str));
    let sim = SimProcess::start(dir.path(), &switches).await;
    let first = daemon_config(dir.path(), "first", &broker, &sim, crash.prefetch);
    let second = daemon_config(dir.path(), "second", &broker, &sim, crash.prefetch);
    let second_log = dir.path().join("second.log");
    let mut a = spawn_daemon(&first.path, &dir.path().join("first.log"));
    let mut b = crash
        .parallel
        .then(|| spawn_daemon(&second.path, &second_log));
    let (bodies, good, bad) = jobs(crash.jobs);
    let mut chunks = bodies.into_iter().peekable();
    while chunks.peek().is_some() {
        broker.publish_all(chunks.by_ref().take(10_000)).await;
    }
    let within = Duration::from_secs(60 + u64::from(crash.jobs) / 2000);
    let mut peak = 0;
    if crash.parallel {
        for m in [first.metrics.as_str(), second.metrics.as_str()] {
            let works = || async move { scrape(m, "apnsd_jobs_acked_total").await > 0 };
            eventually_async(within, "both daemons take work", works).await;
        }
    }
    wait_recorded(&sim.record, good.len() / 3, within).await;
    peak = peak.max(peak_rss_kib(a.pid()).unwrap_or(0));
    a.signal("-KILL");
    a.wait_exit(Duration::from_secs(10)).await;
    let mut b = b
        .take()
        .unwrap_or_else(|| spawn_daemon(&second.path, &second_log));
    if crash.broker_restart {
        wait_recorded(&sim.record, good.len() * 2 / 3, within).await;
        let node =
            std::env::var("SOAK_RABBITMQ_NODE").unwrap_or_else(|_| "rabbit@localhost".into());
        for step in ["stop_app", "start_app"] {
            let status = std::process::Command::new("rabbitmqctl")
                .args(["-q", "-n", &node, step])
                .status()
                .unwrap();
            assert!(status.success(), "rabbitmqctl {step}");
        }
    }
    let deadline = Instant::now() + within;
    let mut last = usize::MAX;
    loop {
        peak = peak.max(peak_rss_kib(b.pid()).unwrap_or(0));
        let now = recorded(&sim.record);
        // Only read the whole record once it could be complete.
        if now >= good.len() && now == last {
            let seen = read_record(&sim.record);
            if good.iter().all(|t| seen.contains_key(t)) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{now} of {} recorded",
            good.len()
        );
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every token arrived, but jobs redelivered after the kill or the broker
    // restart may still wait: stop only once the queue is empty and the
    // daemon holds no job that is not final.
    let mut idle = 0;
    while idle < 3 {
        let in_flight = scrape(&second.metrics, "apnsd_jobs_in_flight").await;
        let ready = depth(&broker.queue).await;
        idle = if ready == 0 && in_flight == 0 {
            idle + 1
        } else {
            0
        };
        assert!(
            Instant::now() < deadline,
            "{ready} jobs queued, {in_flight} in flight"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let redelivered = scrape(&second.metrics, "apnsd_jobs_redelivered_total").await;
    let resent_after_close = scrape(
        &second.metrics,
        "apnsd_notifications_resent_after_close_total",
    )
    .await;
    b.signal("-TERM");
    assert!(b.wait_exit(within).await.success());
    assert_eq!(
        depth(&broker.queue).await,
        0,
        "nothing left queued or unacked"
    );
    assert_eq!(depth(&format!("{}.retry", broker.queue)).await, 0);
    let reported = reported(&tap).await;
    let report = Report {
        tally: tally(&sim.record, &good, &bad, &reported),
        redelivered,
        resent_after_close,
        peak_rss_kib: peak,
    };
    delete(&[tap, broker.queue.clone(), format!("{}.retry", broker.queue)]).await;
    broker.cleanup().await;
    report
}

impl Report {
    /// Nothing lost or unreported; without silent closes, duplicates come only
    /// from jobs in flight when the daemon died, which the broker redelivers
    /// (at most a prefetch) and the surviving daemon counts.
    fn assert_sound(&self, prefetch: u32) {
        assert_eq!(
            (self.tally.lost, self.tally.bad_unreported),
            (0, 0),
            "{self:?}"
        );
        assert!(self.redelivered <= u64::from(prefetch), "{self:?}");
        assert!(self.tally.duplicates as u64 <= self.redelivered, "{self:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_restarts_and_loses_nothing() {
    let crash = Crash {
        jobs: 4000,
        prefetch: 500,
        faults: vec!["--shutdown-every".into(), "700".into()],
        parallel: false,
        broker_restart: false,
    };
    let report = crash_run("sigkill", crash).await;
    report.assert_sound(500);
    assert!(report.redelivered > 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_the_queue_and_one_dying_loses_nothing() {
    let crash = Crash {
        jobs: 4000,
        prefetch: 300,
        faults: Vec::new(),
        parallel: true,
        broker_restart: false,
    };
    crash_run("scaleout", crash).await.assert_sound(300);
}

/// `scripts/soak.sh`: `SOAK_JOBS` jobs (1,000,000 by default) with 1% bad
/// tokens, gateway shutdowns and silent closes, one daemon kill and one
/// broker restart. Prints the figures; fails on anything lost or unreported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long; restarts the broker: run alone through scripts/soak.sh"]
async fn soak() {
    let jobs: u32 = std::env::var("SOAK_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let report = crash_run(
        "soak",
        Crash {
            jobs,
            prefetch: 20_000,
            faults: vec![
                "--shutdown-every".into(),
                (jobs / 40).max(100).to_string(),
                "--close-every".into(),
                (jobs / 25).max(150).to_string(),
            ],
            parallel: false,
            broker_restart: std::env::var_os("SOAK_NO_BROKER_RESTART").is_none(),
        },
    )
    .await;
    println!(
        "soak: jobs={jobs} lost={} bad_unreported={} duplicates={} (redelivered={} resent_after_close={}) peak_rss={} KiB",
        report.tally.lost,
        report.tally.bad_unreported,
        report.tally.duplicates,
        report.redelivered,
        report.resent_after_close,
        report.peak_rss_kib
    );
    assert_eq!((report.tally.lost, report.tally.bad_unreported), (0, 0));
}
