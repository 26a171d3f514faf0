//! The scaling case (`--only scaling`): how apnsd's throughput grows with
//! processes, on one broker node and on a 3-node cluster, with classic and
//! with quorum queues.
//!
//! For each layout and queue type, a fresh queue is drained four times,
//! `--scaling-jobs` one-token jobs each time: by one plain consumer
//! (RabbitMQ's ceiling, as in case 1), by one apnsd process, by two plain
//! consumers, by two apnsd processes. On the cluster the queue is declared on
//! node 1 (which leads it when it is a quorum queue) and process or consumer
//! k connects to node k alone, so the two spread over two nodes. The cluster
//! is `scripts/rabbitmq-cluster.sh`, started for the case and stopped after
//! it, under the lock `tests/cluster.rs` takes, so the two never share it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lapin::types::AMQPValue;

use super::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-cluster.sh");

/// The cluster's first AMQP port is this plus one (the script's default base).
const CLUSTER_PORT_BASE: u16 = 5680;

/// One measured drain: a layout, a queue type and a number of processes.
struct Row {
    layout: &'static str,
    queue: &'static str,
    processes: usize,
    ceiling: f64,
    apnsd: f64,
    cpu_per_job: Duration,
    /// Jobs each apnsd process acked.
    shares: Vec<u64>,
}

impl Bench<'_> {
    pub(super) async fn scaling(&self) -> anyhow::Result<()> {
        let n = self.args.scaling_jobs;
        println!(
            "\nscaling: one-token jobs over the binary protocol, N = {n} per drain\n  \
             single node: {}; cluster: 3 nodes on this machine (scripts/rabbitmq-cluster.sh), \
             queue declared on node 1 (its leader when quorum), process and plain consumer k on node k",
            self.args.uri
        );
        let mut rows = Vec::new();
        let single = [self.args.uri.clone(), self.args.uri.clone()];
        for queue in ["classic", "quorum"] {
            rows.extend(self.layout("single node", &single, queue).await?);
        }
        let cluster = Cluster::start().await?;
        let nodes = [Cluster::uri(1), Cluster::uri(2)];
        let mut result = Ok(());
        for queue in ["classic", "quorum"] {
            match self.layout("cluster", &nodes, queue).await {
                Ok(r) => rows.extend(r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(cluster);
        print_table(&rows);
        result
    }

    /// One and two processes on a fresh queue of type `queue`; process k on `uris[k]`.
    async fn layout(
        &self,
        layout: &'static str,
        uris: &[String; 2],
        queue: &'static str,
    ) -> anyhow::Result<Vec<Row>> {
        let mut args = FieldTable::default();
        let mut amqp = String::new();
        if queue == "quorum" {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            amqp.push_str("queue_type = \"quorum\"\n");
        }
        let broker = Broker::open_typed(&uris[0], args)
            .await
            .with_context(|| format!("declaring a {queue} queue on {}", uris[0]))?;
        let mut rows = Vec::new();
        let mut result = Ok(());
        for processes in [1, 2] {
            let on: Vec<Target> = uris[..processes]
                .iter()
                .map(|uri| Target {
                    broker: &broker,
                    uri,
                    amqp: &amqp,
                })
                .collect();
            match self.drains(&on).await {
                Ok((ceiling, apnsd, cpu_per_job, shares)) => {
                    let row = Row {
                        layout,
                        queue,
                        processes,
                        ceiling,
                        apnsd,
                        cpu_per_job,
                        shares,
                    };
                    println!("  {}", row.line());
                    rows.push(row);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        broker.cleanup().await;
        result.map(|()| rows)
    }

    /// Fills the queue and drains it with one plain consumer per target, then
    /// fills it again and drains it with one apnsd process per target.
    /// Returns both rates, apnsd's CPU per job and each process's acked jobs.
    async fn drains(&self, on: &[Target<'_>]) -> anyhow::Result<(f64, f64, Duration, Vec<u64>)> {
        let n = self.args.scaling_jobs;
        let broker = on[0].broker;
        broker.publish(one_token_jobs(0, n)).await?;
        let uris: Vec<String> = on.iter().map(|t| t.uri.to_owned()).collect();
        let ceiling = n as f64 / broker.plain_consume_on(&uris, n, self.prefetch).await?;
        let left = broker.depth().await?;
        ensure!(
            left == 0,
            "the plain consumers left {left} jobs in the queue"
        );
        broker.publish(one_token_jobs(n, n)).await?;
        self.sim.meter().reset();
        let target = self.sim.accepted_count() + n;
        let mut daemons = Vec::new();
        for (k, t) in on.iter().enumerate() {
            let case = format!("scaling-{}-of-{}", k + 1, on.len());
            daemons.push(self.start_daemon_on(&case, Transport::Binary, false, *t)?);
        }
        self.wait_frames_of(target, &mut daemons).await?;
        let rate = n as f64 / self.sim.meter().read().span.as_secs_f64();
        let mut cpu = Duration::ZERO;
        for d in &daemons {
            cpu += d.cpu()?;
        }
        let acked = wait_acked_by(&mut daemons, n).await?;
        for d in &mut daemons {
            d.stop(broker).await?;
        }
        let per_job = cpu / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        Ok((ceiling, rate, per_job, acked))
    }

    /// Waits until the simulator has accepted `target` frames in all.
    async fn wait_frames_of(&self, target: u64, daemons: &mut [Daemon]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.sim.accepted_count() < target {
            for d in daemons.iter_mut() {
                if let Some(status) = d.child.try_wait()? {
                    bail!("apnsd exited with {status}; see {}", d.log.display());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "only {} of {target} frames arrived",
                self.sim.accepted_count()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// Waits until the processes have acked `n` jobs between them; returns each one's count.
async fn wait_acked_by(daemons: &mut [Daemon], n: u64) -> anyhow::Result<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut acked = Vec::new();
        for d in daemons.iter() {
            acked.push(d.counter("apnsd_jobs_acked_total").await?);
        }
        let sum: u64 = acked.iter().sum();
        if sum >= n {
            return Ok(acked);
        }
        ensure!(
            Instant::now() < deadline,
            "apnsd acked only {sum} of {n} jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Broker {
    /// RabbitMQ's ceiling with one plain consumer per URI (each on its own
    /// connection), each acking as `plain_consume` does, together draining
    /// `n` jobs. Returns the first delivery → the last ack, in seconds.
    async fn plain_consume_on(
        &self,
        uris: &[String],
        n: u64,
        prefetch: u16,
    ) -> anyhow::Result<f64> {
        let received = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for uri in uris {
            let (uri, queue, received) = (uri.clone(), self.queue.clone(), received.clone());
            tasks.push(tokio::spawn(async move {
                drain_share(&uri, &queue, &received, n, prefetch).await
            }));
        }
        let (mut first, mut last, mut again) = (None::<Instant>, None::<Instant>, 0);
        for task in tasks {
            let (f, l, a) = task.await??;
            again += a;
            first = match (first, f) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            last = last.max(l);
        }
        if again > 0 {
            println!("  (RabbitMQ delivered {again} jobs to the plain consumers twice)");
        }
        match (first, last) {
            (Some(f), Some(l)) => Ok((l - f).as_secs_f64()),
            _ => bail!("the plain consumers received nothing"),
        }
    }
}

/// One plain consumer's part of a shared drain: takes deliveries until the
/// consumers have `n` between them. Returns its first delivery, its last ack
/// and how many deliveries were redeliveries (not counted towards `n`: the
/// broker sent that job to a plain consumer before).
async fn drain_share(
    uri: &str,
    queue: &str,
    received: &AtomicU64,
    n: u64,
    prefetch: u16,
) -> anyhow::Result<(Option<Instant>, Option<Instant>, u64)> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "apnsd-bench-plain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (mut first, mut last_ack, mut again) = (None, None, 0);
    // Another consumer may take the last jobs: look at the shared count now and then.
    while received.load(Ordering::Relaxed) < n {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(20), consumer.next()).await
        else {
            continue;
        };
        let mut last = next.context("consumer cancelled")??;
        first.get_or_insert_with(Instant::now);
        let mut got = 0;
        loop {
            if last.redelivered {
                again += 1;
            } else {
                got += 1;
            }
            match futures_lite::future::poll_once(consumer.next()).await {
                Some(Some(d)) => last = d?,
                _ => break,
            }
        }
        last.ack(BasicAckOptions { multiple: true }).await?;
        last_ack = Some(Instant::now());
        received.fetch_add(got, Ordering::Relaxed);
    }
    conn.close(200, "bye".into()).await?;
    Ok((first, last_ack, again))
}

/// The 3-node cluster of `scripts/rabbitmq-cluster.sh`, held under the lock
/// `tests/cluster.rs` takes, stopped when dropped.
struct Cluster {
    _lock: std::fs::File,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        let lock = tokio::task::spawn_blocking(|| -> anyhow::Result<std::fs::File> {
            let file = std::fs::File::create(std::env::temp_dir().join("apnsd-cluster.lock"))?;
            // SAFETY: flock on a file descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                println!("  waiting for the cluster lock (a cluster test is running)");
                // SAFETY: as above.
                let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
                ensure!(rc == 0, "flock: {}", std::io::Error::last_os_error());
            }
            Ok(file)
        })
        .await??;
        let began = Instant::now();
        let cluster = Cluster { _lock: lock };
        script(&["start"]).await?;
        println!("  cluster up after {:.0?}", began.elapsed());
        Ok(cluster)
    }

    fn uri(node: u16) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            CLUSTER_PORT_BASE + node
        )
    }
}

/// Stops the nodes and removes their files, also when the case failed.
impl Drop for Cluster {
    fn drop(&mut self) {
        let stopped = Command::new("bash").args([SCRIPT, "stop"]).status();
        if !stopped.is_ok_and(|s| s.success()) {
            println!("  rabbitmq-cluster.sh stop failed: stop the cluster by hand");
        }
    }
}

async fn script(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "rabbitmq-cluster.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Row {
    fn line(&self) -> String {
        let shares: Vec<String> = self.shares.iter().map(|s| s.to_string()).collect();
        format!(
            "{:<12} {:<8} {:>5} {:>15} {:>16} {:>6.2} {:>14.2?}   {}",
            self.layout,
            self.queue,
            self.processes,
            thousands(self.apnsd),
            thousands(self.ceiling),
            self.apnsd / self.ceiling,
            self.cpu_per_job,
            shares.join(" + ")
        )
    }
}

fn print_table(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "\n  {:<12} {:<8} {:>5} {:>15} {:>16} {:>6} {:>14}   jobs acked per process",
        "layout", "queue", "procs", "apnsd jobs/s", "ceiling jobs/s", "ratio", "apnsd CPU/job",
    );
    for row in rows {
        println!("  {}", row.line());
    }
    println!("  (ceiling: as many plain consumers as processes, each only acking; ratio = apnsd ÷ ceiling)");
    println!("  growth from one process to two:");
    for pair in rows.chunks(2) {
        if let [one, two] = pair {
            println!(
                "    {} {}: apnsd ×{:.2}, RabbitMQ ceiling ×{:.2}",
                one.layout,
                one.queue,
                two.apnsd / one.apnsd,
                two.ceiling / one.ceiling
            );
        }
    }
}
