//! apnsd on a 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`) with a
//! quorum jobs queue: two `apnsd` processes on different nodes, and mid-stream
//! the node one of them is on stops, then the node that leads the jobs queue.
//! Every good token is delivered, every bad one reported, nothing is left
//! unacked, and the notifications sent twice stay within what the faults
//! could have left in flight.
//!
//! The cluster is started for the test and stopped after it (also when it
//! fails); a file lock keeps two test runs on one machine from sharing it.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use common::process::*;
use common::rig::{App, Protocol};
use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-cluster.sh");
const NODES: [usize; 3] = [1, 2, 3];
/// `amqp.prefetch` of both processes: bounds what a fault can leave unacked.
const PREFETCH: u64 = 50;
/// The whole test, the cluster's start included (about 100 s on a loaded
/// 2-core machine): a fault that hangs fails the test instead of the run,
/// and the cluster and daemons are stopped as the test's future is dropped.
const BUDGET: Duration = Duration::from_secs(240);

/// The cluster of this test: held under a file lock, stopped on drop.
struct Cluster {
    _lock: std::fs::File,
}

impl Cluster {
    async fn start() -> Cluster {
        let lock = tokio::task::spawn_blocking(|| {
            let file = std::fs::File::create(std::env::temp_dir().join("apnsd-cluster.lock"))
                .expect("lock file");
            // SAFETY: flock on a file descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
            file
        })
        .await
        .unwrap();
        let cluster = Cluster { _lock: lock };
        script(&["start"]).await;
        cluster
    }

    fn uri(node: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5680 + node)
    }

    async fn stop_node(node: usize) {
        script(&["stop-node", &node.to_string()]).await;
    }

    async fn start_node(node: usize) {
        script(&["start-node", &node.to_string()]).await;
    }

    /// The node whose member leads `queue`, as node `ask` sees it.
    async fn leader(ask: usize, queue: &str) -> usize {
        let out = script(&[
            "ctl",
            &ask.to_string(),
            "-q",
            "list_queues",
            "name",
            "leader",
            "--formatter",
            "json",
        ])
        .await;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list_queues json");
        let leader = rows
            .iter()
            .find(|r| r["name"] == queue)
            .and_then(|r| r["leader"].as_str())
            .unwrap_or_else(|| panic!("no leader for {queue} in {out}"));
        NODES
            .into_iter()
            .find(|n| leader == format!("apnsd-c{n}@localhost"))
            .unwrap_or_else(|| panic!("unknown leader {leader}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .args([SCRIPT, "stop"])
            .status();
    }
}

async fn script(args: &[&str]) -> String {
    let out = tokio::process::Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("bash");
    assert!(
        out.status.success(),
        "rabbitmq-cluster.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A channel with confirms on the first of `nodes` that answers.
async fn channel(nodes: &[usize]) -> (Connection, Channel) {
    for &n in nodes {
        if let Ok(conn) =
            Connection::connect(&Cluster::uri(n), ConnectionProperties::default()).await
        {
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            return (conn, ch);
        }
    }
    panic!("no cluster node of {nodes:?} answers");
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

struct Names {
    jobs: String,
    exchange: String,
    results: String,
}

async fn publish(nodes: &[usize], queue: &str, bodies: &[Vec<u8>]) {
    let (conn, ch) = channel(nodes).await;
    let mut confirms = Vec::new();
    for body in bodies {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    let _ = conn.close(200, "bye".into()).await;
}

struct Daemon {
    process: Process,
    metrics: String,
    log: PathBuf,
}

impl Daemon {
    async fn start(dir: &Path, name: &str, nodes: &[usize], names: &Names, app: &str) -> Daemon {
        let metrics = format!("127.0.0.1:{}", free_port());
        let uris: Vec<String> = nodes
            .iter()
            .map(|&n| format!("\"{}\"", Cluster::uri(n)))
            .collect();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "shutdown_timeout = \"20s\"\n[amqp]\nuri = [{}]\nqueue = \"{}\"\nqueue_type = \"quorum\"\nprefetch = {PREFETCH}\nresults_exchange = \"{}\"\n[metrics]\nlisten = \"{metrics}\"\n{app}",
                uris.join(", "),
                names.jobs,
                names.exchange
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let process = spawn_daemon(&config, &log);
        wait_for_log(&log, "broker session open").await;
        Daemon {
            process,
            metrics,
            log,
        }
    }

    /// The cluster node the session is on now (none between sessions), from `/metrics`.
    async fn node(&self) -> Option<usize> {
        let (_, text) = http_get(&self.metrics, "/metrics").await;
        let on = text
            .lines()
            .filter(|l| l.starts_with("apnsd_amqp_session_node{") && l.ends_with(" 1"))
            .collect::<Vec<_>>();
        assert!(on.len() <= 1, "one node at a time: {text}");
        let line = on.first()?;
        let node = NODES
            .into_iter()
            .find(|n| line.contains(&format!("127.0.0.1:{}\"", 5680 + n)));
        Some(node.unwrap_or_else(|| panic!("unknown node in {line}")))
    }

    async fn counter(&self, name: &str) -> u64 {
        scrape(&self.metrics, name).await
    }

    /// Waits until the session is on a node other than `left`.
    async fn moved_from(&self, left: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.node().await {
                Some(n) if n != left => return n,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "still on node {left}: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn acked(daemons: &[&Daemon]) -> u64 {
    let mut sum = 0;
    for d in daemons {
        sum += d.counter("apnsd_jobs_acked_total").await;
    }
    sum
}

async fn wait_acked(daemons: &[&Daemon], at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked(daemons).await < at_least {
        assert!(
            Instant::now() < deadline,
            "fewer than {at_least} jobs acked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_survive_losing_a_node_and_the_queue_leader() {
    tokio::time::timeout(BUDGET, lose_a_node_and_the_queue_leader())
        .await
        .unwrap_or_else(|_| panic!("not done within {BUDGET:?}"));
}

async fn lose_a_node_and_the_queue_leader() {
    let began = Instant::now();
    let cluster = Cluster::start().await;
    eprintln!("cluster up after {:?}", began.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::start(dir.path(), &["--refuse", "ff=8"]).await;
    let suffix: u64 = rand::random();
    let names = Names {
        jobs: format!("apnsd-test.cluster.{suffix:x}.jobs"),
        exchange: format!("apnsd-test.cluster.{suffix:x}.results"),
        results: format!("apnsd-test.cluster.{suffix:x}.collected"),
    };
    // Quorum queues place their leader on the declaring node: node 3 leads
    // the jobs queue until a fault moves it.
    let (setup_conn, setup) = channel(&[3]).await;
    setup
        .queue_declare(names.jobs.as_str().into(), durable(), quorum())
        .await
        .unwrap();
    setup
        .exchange_declare(
            names.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Results wait in a quorum queue, so they outlive any one node.
    setup
        .queue_declare(names.results.as_str().into(), durable(), quorum())
        .await
        .unwrap();
    setup
        .queue_bind(
            names.results.as_str().into(),
            names.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = setup_conn.close(200, "bye".into()).await;

    // 4,000 one-token jobs in three phases; every 10th token is refused.
    let (mut good, mut bad) = (HashSet::new(), HashSet::new());
    let bodies: Vec<Vec<u8>> = (0..4000u32)
        .map(|i| {
            let t = if i % 10 == 7 {
                token(0xff, i)
            } else {
                token(0x11, i)
            };
            if i % 10 == 7 {
                bad.insert(t.clone());
            } else {
                good.insert(t.clone());
            }
            job(&format!("job-{i}"), &t)
        })
        .collect();
    // A settle of 500 ms paces the stream (about 100 jobs/s per process at
    // this prefetch), so the faults land while jobs are in flight.
    let app = App::new("example", Protocol::Binary)
        .keys("settle = \"500ms\"")
        .toml(&sim.services);

    let a = Daemon::start(dir.path(), "a", &NODES, &names, &app).await;
    let node_a = a.node().await.expect("A is on a node");
    let others: Vec<usize> = NODES.into_iter().filter(|&n| n != node_a).collect();
    let b = Daemon::start(dir.path(), "b", &others, &names, &app).await;
    let node_b = b.node().await.expect("B is on a node");
    assert_ne!(node_a, node_b, "the processes start on different nodes");

    publish(&others, &names.jobs, &bodies[..2000]).await;
    wait_acked(&[&a, &b], 300).await;

    // Fault 1: the node process A is on.
    Cluster::stop_node(node_a).await;
    let a_now = a.moved_from(node_a).await;
    eprintln!(
        "fault 1 at {:?}: node {node_a} stopped; A moved to node {a_now}",
        began.elapsed()
    );
    publish(&others, &names.jobs, &bodies[2000..3000]).await;
    let before = acked(&[&a, &b]).await;
    wait_acked(&[&a, &b], before + 300).await;
    // Back, so that the quorum keeps its majority when the leader goes.
    Cluster::start_node(node_a).await;

    // Fault 2: the node leading the jobs queue.
    let leader = Cluster::leader(node_b, &names.jobs).await;
    Cluster::stop_node(leader).await;
    let up: Vec<usize> = NODES.into_iter().filter(|&n| n != leader).collect();
    let a_now = a.moved_from(leader).await;
    let b_now = b.moved_from(leader).await;
    eprintln!(
        "fault 2 at {:?}: node {leader} (queue leader) stopped; A on node {a_now}, B on node {b_now}",
        began.elapsed()
    );
    publish(&up, &names.jobs, &bodies[3000..]).await;

    // Every good token reaches the gateway, every bad one comes back as a result.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (_probe_conn, probe) = channel(&up).await;
    loop {
        let record = read_record(&sim.record);
        let delivered = good.iter().filter(|t| record.contains_key(*t)).count();
        let results = message_count(&probe, &names.results).await as usize;
        if delivered == good.len() && results >= bad.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of {} good tokens delivered, {results} of {} results",
            good.len(),
            bad.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The bound: a notification is sent twice only when its job was delivered
    // twice (a session lost with it unacked) or a gateway connection closed
    // without saying what it processed.
    let mut redelivered = 0;
    let mut resent = 0;
    for d in [&a, &b] {
        redelivered += d.counter("apnsd_jobs_redelivered_total").await;
        resent += d
            .counter("apnsd_notifications_resent_after_close_total")
            .await;
    }
    eprintln!("all delivered at {:?}", began.elapsed());
    for d in [&a, &b] {
        let log = std::fs::read_to_string(&d.log).unwrap_or_default();
        for line in log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("session open"))
        {
            eprintln!("{}: {line}", d.log.display());
        }
    }
    let mut a = a;
    let mut b = b;
    for d in [&a, &b] {
        d.process.signal("-TERM");
    }
    for d in [&mut a, &mut b] {
        let status = d.process.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "{}",
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
    }

    // Nothing left unacked: with both consumers gone the jobs queue is empty.
    assert_eq!(
        message_count(&probe, &names.jobs).await,
        0,
        "jobs left in the queue"
    );
    let mut failed: HashMap<String, usize> = HashMap::new();
    while let Some(m) = probe
        .basic_get(
            names.results.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(
            m.delivery.routing_key.as_str(),
            "failed.invalid_token",
            "{body}"
        );
        let token = body["token"].as_str().unwrap().to_owned();
        *failed.entry(token).or_insert(0) += 1;
    }
    assert_eq!(failed.keys().cloned().collect::<HashSet<_>>(), bad);

    let record = read_record(&sim.record);
    assert!(
        record.keys().all(|t| good.contains(t)),
        "only good tokens accepted"
    );
    let duplicates: usize = record.values().map(|&n| n - 1).sum::<usize>()
        + failed.values().map(|&n| n - 1).sum::<usize>();
    eprintln!(
        "duplicates {duplicates}: jobs redelivered {redelivered}, resent after close {resent}; \
         bound per fault: {PREFETCH} unacked jobs per process session"
    );
    assert!(
        duplicates as u64 <= redelivered + resent,
        "{duplicates} duplicates, more than the {redelivered} redelivered jobs and {resent} resends"
    );
    // Each fault ends at most both processes' sessions, each holding at most
    // the prefetch unacked.
    assert!(
        redelivered <= 2 * 2 * PREFETCH,
        "{redelivered} redeliveries after 2 faults with prefetch {PREFETCH}"
    );
    drop(sim);
    drop(cluster);
}
