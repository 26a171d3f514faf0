//! apnsd's throughput benchmark: `cargo bench --bench throughput [-- --help]`.
//!
//! One run, against the local RabbitMQ and the built-in simulator in sink mode
//! (it reads, validates and counts frames over TLS, keeping nothing per
//! notification):
//!
//! 1. one-token jobs: RabbitMQ's own ceiling (a plain lapin consumer that only
//!    acks) and apnsd end to end (first to last frame at the simulator), both
//!    draining the same number of jobs from a filled queue;
//! 2. latency: one-token jobs published at a steady rate, each token stamped
//!    with its publish time, timed by the simulator when its frame arrives;
//! 3. fan-out: jobs of many tokens each;
//! 4. the same over HTTP/2: one-token jobs against the same ceiling, fan-out
//!    at once and with the simulator answering after Apple's round trip
//!    (`--delay`), each figure next to its target from issue 17.
//! 5. fan-out with `delivered` results: one job of many tokens, a result per
//!    token, timed from the first result confirmed to the last.
//! 6. scaling (`--only scaling`, not in the default run: it starts a 3-node
//!    cluster): one and two apnsd processes against one node and against the
//!    cluster, classic and quorum queues, each next to RabbitMQ's own ceiling
//!    (module `scaling`).
//!
//! apnsd runs as the real release binary (`apnsd run`), a fresh process per
//! case, so its peak RSS (VmHWM) is its own.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, PublisherConfirm,
};

use apnsd::config::AmqpConfig;
use apnsd::simulator::{stamped_token, SimCerts, Simulator, SimulatorOptions, P12_PASSWORD};

// Not `benches/scaling.rs`: cargo would take that for a bench of its own.
#[path = "throughput/scaling.rs"]
mod scaling;

#[derive(Parser)]
#[command(about = "apnsd throughput benchmark against the local RabbitMQ and the simulator")]
struct Args {
    /// One-token jobs drained by the plain consumer, then by apnsd.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Rounds of the one-token case; the median is reported. A shared machine
    /// slows the broker or apnsd by a third in some rounds, either way: five
    /// keep one such round from deciding the median.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Publish rate of the latency case (jobs per second).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Duration of the latency case, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Jobs in the fan-out case.
    #[arg(long, default_value_t = 100)]
    fanout_jobs: u64,
    /// Tokens per fan-out job.
    #[arg(long, default_value_t = 10_000)]
    fanout_tokens: u64,
    /// Tokens of the one job in the fan-out case with `delivered` results.
    #[arg(long, default_value_t = 100_000)]
    delivered_tokens: u64,
    /// One-token jobs per run of the scaling case (each layout, queue type and
    /// process count drains them twice: plain consumers, then apnsd).
    #[arg(long, default_value_t = 50_000)]
    scaling_jobs: u64,
    /// `amqp.prefetch` for apnsd and the plain consumer (default: apnsd's).
    #[arg(long)]
    prefetch: Option<u16>,
    /// Extra `[[apps]]` lines for apnsd, e.g. "connections = 4" (repeatable).
    #[arg(long = "app-setting", value_name = "KEY = VALUE")]
    app_settings: Vec<String>,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Run only these cases (repeatable; default: all but `scaling`).
    #[arg(long, value_enum)]
    only: Vec<Case>,
    /// The simulator's HTTP/2 response delay in the second http2-fanout run
    /// (Apple's round trip; 0ms skips that run).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// The apnsd binary to run.
    #[arg(long, default_value = env!("CARGO_BIN_EXE_apnsd"))]
    apnsd: PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    OneToken,
    Latency,
    FanOut,
    /// One fan-out job with `results.delivered = true`.
    FanOutDelivered,
    /// One-token jobs again, with the app on the HTTP/2 transport.
    Http2,
    /// Fan-out over HTTP/2, at once and at `--delay`.
    Http2Fanout,
    /// One and two apnsd processes on one node and on a 3-node cluster,
    /// classic and quorum queues (only when named: it starts the cluster).
    Scaling,
}

/// The transport the benchmarked app uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Binary,
    Http2,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    apnsd::apns::tls::install_crypto_provider();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = SimCerts::generate("com.example.bench")?;
    certs.write_to(dir.path())?;
    let sim = Simulator::start(SimulatorOptions {
        sink: true,
        stamps: true,
        ..SimulatorOptions::new(certs)
    })
    .await?;
    let prefetch = args
        .prefetch
        .unwrap_or_else(|| AmqpConfig::default().prefetch);
    let broker = Broker::open(&args.uri).await?;
    println!("{}", machine_facts());
    println!(
        "apnsd: prefetch {prefetch}, app settings: {}",
        if args.app_settings.is_empty() {
            "defaults".to_owned()
        } else {
            args.app_settings.join(", ")
        }
    );
    let bench = Bench {
        args: &args,
        dir: dir.path(),
        sim: &sim,
        broker: &broker,
        prefetch,
    };
    let result = bench.all().await;
    broker.cleanup().await;
    sim.shutdown().await;
    result
}

struct Bench<'a> {
    args: &'a Args,
    dir: &'a Path,
    sim: &'a Simulator,
    broker: &'a Broker,
    prefetch: u16,
}

impl Bench<'_> {
    async fn all(&self) -> anyhow::Result<()> {
        let run = |case: Case| self.args.only.is_empty() || self.args.only.contains(&case);
        if run(Case::OneToken) {
            self.one_token(Transport::Binary).await?;
        }
        if run(Case::Latency) {
            self.latency().await?;
        }
        if run(Case::FanOut) {
            self.fan_out(Transport::Binary, Duration::ZERO).await?;
        }
        if run(Case::FanOutDelivered) {
            self.fan_out_delivered().await?;
        }
        if run(Case::Http2) {
            self.one_token(Transport::Http2).await?;
        }
        if run(Case::Http2Fanout) {
            self.http2_fan_out().await?;
        }
        if self.args.only.contains(&Case::Scaling) {
            self.scaling().await?;
        }
        Ok(())
    }

    /// Rounds of: fill, drain with the plain consumer; fill, drain with apnsd.
    /// The machine is shared, so the median round is the figure.
    async fn one_token(&self, transport: Transport) -> anyhow::Result<()> {
        let n = self.args.jobs;
        let (case, over) = match transport {
            Transport::Binary => ("one-token", "binary protocol"),
            Transport::Http2 => ("http2", "HTTP/2"),
        };
        println!(
            "\none-token jobs over {over}, N = {n}, {} rounds",
            self.args.rounds
        );
        let mut ratios = Vec::new();
        let mut peak = 0;
        for round in 1..=self.args.rounds {
            self.broker.publish(one_token_jobs(0, n)).await?;
            let ceiling = n as f64
                / self
                    .broker
                    .plain_consume(n, self.prefetch)
                    .await?
                    .as_secs_f64();
            self.broker.publish(one_token_jobs(n, n)).await?;
            let mut daemon = self.start_daemon(case, transport, false)?;
            let rate = n as f64 / self.frames(n, &mut daemon).await?.as_secs_f64();
            let cpu = daemon.cpu()?;
            daemon.wait_acked(n).await?;
            peak = peak.max(daemon.stop(self.broker).await?);
            println!(
                "  round {round}: RabbitMQ ceiling {} jobs/s, apnsd {} jobs/s, ratio {:.2}, {}",
                thousands(ceiling),
                thousands(rate),
                rate / ceiling,
                cpu_per("apnsd", cpu, n, "job")
            );
            ratios.push((rate / ceiling, ceiling, rate));
        }
        ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ratio, ceiling, rate) = ratios[ratios.len() / 2];
        println!(
            "  median round: RabbitMQ ceiling (plain consumer, multiple-acks only) {} jobs/s, \
             apnsd end to end (first → last frame) {} jobs/s, ratio {ratio:.2} (target ≥ 0.90)",
            thousands(ceiling),
            thousands(rate)
        );
        println!("  apnsd peak RSS: {:.1} MB (target < 64 MB)", mb(peak));
        Ok(())
    }

    /// Jobs published at a steady rate: RabbitMQ alone (publish → delivery to a
    /// plain consumer), then apnsd (publish → frame read by the gateway).
    async fn latency(&self) -> anyhow::Result<()> {
        let (rate, n) = (self.args.rate, self.args.rate * self.args.seconds);
        println!("\nlatency at {} jobs/s, {n} jobs", thousands(rate as f64));
        let consumer = self.broker.plain_latencies(n, self.prefetch);
        let (latencies, published) =
            futures_lite::future::zip(consumer, self.broker.publish_paced(n, rate)).await;
        published?;
        let mut latencies = latencies?;
        latencies.sort_unstable();
        let q =
            |q: f64| Duration::from_micros(latencies[((latencies.len() - 1) as f64 * q) as usize]);
        println!(
            "  RabbitMQ alone, publish → delivery: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            q(0.5),
            q(0.99),
            q(1.0)
        );
        let mut daemon = self.start_daemon("latency", Transport::Binary, false)?;
        daemon.wait_ready().await?;
        self.sim.meter().reset();
        let before = self.sim.accepted_count();
        self.broker.publish_paced(n, rate).await?;
        self.wait_frames(before + n, &mut daemon).await?;
        let r = self.sim.meter().read();
        println!(
            "  apnsd, publish → frame read by the gateway: p50 {:.2?}, p99 {:.2?}, max {:.2?} (target p99 < 5ms)",
            r.p50, r.p99, r.max
        );
        daemon.wait_acked(n).await?;
        let rss = daemon.stop(self.broker).await?;
        println!("  apnsd peak RSS: {:.1} MB (target < 64 MB)", mb(rss));
        Ok(())
    }

    /// Fan-out over HTTP/2 with answers at once, then after `--delay`: how
    /// much of its rate the round trip leaves.
    async fn http2_fan_out(&self) -> anyhow::Result<()> {
        let at_once = self.fan_out(Transport::Http2, Duration::ZERO).await?;
        let delay = self.args.delay;
        if delay.is_zero() {
            return Ok(());
        }
        let delayed = self.fan_out(Transport::Http2, delay).await?;
        println!(
            "  at a {delay:?} round trip: {:.2} of the rate at once (target ≥ 0.80)",
            delayed / at_once
        );
        Ok(())
    }

    /// Jobs of many tokens, queued before apnsd starts; returns notifications/s.
    async fn fan_out(&self, transport: Transport, delay: Duration) -> anyhow::Result<f64> {
        let (jobs, tokens) = (self.args.fanout_jobs, self.args.fanout_tokens);
        let n = jobs * tokens;
        let (case, over, target) = match transport {
            Transport::Binary => ("fan-out", "", "target ≥ 1,000,000"),
            Transport::Http2 if delay.is_zero() => (
                "http2-fan-out",
                " over HTTP/2",
                "target ≥ 250,000 and ≤ 4µs CPU per notification",
            ),
            Transport::Http2 => (
                "http2-fan-out-delayed",
                " over HTTP/2",
                "target: see the ratio below",
            ),
        };
        let answers = if delay.is_zero() {
            String::new()
        } else {
            format!(", the simulator answering after {delay:?}")
        };
        println!("\nfan-out{over}, {jobs} jobs × {tokens} tokens{answers}");
        self.broker.publish(fan_out_jobs(jobs, tokens)).await?;
        self.sim.set_delay(delay);
        // On a small machine the simulator (this process) shares the cores
        // with apnsd and RabbitMQ: its CPU says how much of them it took.
        let sim_before = process_cpu("self")?;
        let mut daemon = self.start_daemon(case, transport, false)?;
        let span = self.frames(n, &mut daemon).await;
        self.sim.set_delay(Duration::ZERO);
        let span = span?;
        let sim_cpu = process_cpu("self")?.saturating_sub(sim_before);
        let rate = n as f64 / span.as_secs_f64();
        println!(
            "  apnsd: {} notifications/s ({span:.2?}, {}) ({target})",
            thousands(rate),
            cpu_per("apnsd", daemon.cpu()?, n, "notification")
        );
        println!(
            "  {}",
            cpu_per("simulator (this process)", sim_cpu, n, "notification")
        );
        daemon.wait_acked(jobs).await?;
        let rss = daemon.stop(self.broker).await?;
        println!("  apnsd peak RSS: {:.1} MB (target < 64 MB)", mb(rss));
        Ok(rate)
    }

    /// One job of `delivered_tokens` tokens, each owing a `delivered` result,
    /// routed to a queue: how fast results are confirmed, and what waiting for
    /// their confirms costs in memory.
    async fn fan_out_delivered(&self) -> anyhow::Result<()> {
        let tokens = self.args.delivered_tokens;
        println!(
            "
fan-out with delivered results, 1 job × {tokens} tokens"
        );
        let collected = self.broker.collect_results().await?;
        let span = self.broker.publish_results(tokens).await?;
        println!(
            "  RabbitMQ ceiling (a plain publisher, {PUBLISH_WINDOW} confirms in flight, result-sized bodies): {} results confirmed/s",
            thousands(tokens as f64 / span.as_secs_f64())
        );
        self.broker.purge(&collected).await?;
        self.broker.publish(fan_out_jobs(1, tokens)).await?;
        let mut daemon = self.start_daemon("fan-out-delivered", Transport::Binary, true)?;
        let name = "apnsd_results_published_total";
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut first = None;
        loop {
            let confirmed = daemon.counter(name).await.unwrap_or(0);
            if confirmed > 0 && first.is_none() {
                first = Some((Instant::now(), confirmed));
            }
            if confirmed >= tokens {
                break;
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("apnsd exited with {status}; see {}", daemon.log.display());
            }
            ensure!(
                Instant::now() < deadline,
                "only {confirmed} of {tokens} results confirmed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (since, at_first) = first.context("no result was confirmed")?;
        let span = since.elapsed();
        println!(
            "  apnsd: {} results confirmed/s ({span:.2?} for {}, {})",
            thousands((tokens - at_first) as f64 / span.as_secs_f64()),
            tokens - at_first,
            cpu_per(
                "apnsd",
                daemon.cpu()?,
                tokens,
                "notification with its result"
            )
        );
        daemon.wait_acked(1).await?;
        let rss = daemon.stop(self.broker).await?;
        println!(
            "  apnsd peak RSS: {:.1} MB (target < 64 MB; results awaiting confirms are bounded)",
            mb(rss)
        );
        self.broker.drop_results(&collected).await;
        Ok(())
    }

    fn start_daemon(
        &self,
        case: &str,
        transport: Transport,
        delivered: bool,
    ) -> anyhow::Result<Daemon> {
        let on = Target {
            broker: self.broker,
            uri: &self.args.uri,
            amqp: "",
        };
        self.start_daemon_on(case, transport, delivered, on)
    }

    /// Starts apnsd on `on`'s queue through its URI, with its extra `[amqp]` keys.
    fn start_daemon_on(
        &self,
        case: &str,
        transport: Transport,
        delivered: bool,
        on: Target,
    ) -> anyhow::Result<Daemon> {
        let config = self.dir.join(format!("{case}.toml"));
        let certs = self.dir.display();
        let gateway = self.sim.gateway_addr();
        let feedback = self.sim.feedback_addr();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut text = format!(
            r#"log_level = "warn"
[amqp]
uri = "{uri}"
queue = "{queue}"
results_exchange = "{exchange}"
prefetch = {prefetch}
{amqp}
[metrics]
listen = "{metrics}"

[results]
delivered = {delivered}

[[apps]]
name = "bench"
environment = "simulator"
certificate = "{certs}/client.p12"
password = "{P12_PASSWORD}"
ca = "{certs}/ca.pem"
{transport}
"#,
            transport = match transport {
                Transport::Binary => format!("gateway = \"{gateway}\"\nfeedback = \"{feedback}\""),
                Transport::Http2 => format!(
                    "protocol = \"http2\"\nendpoint = \"{}\"",
                    self.sim.http2_addr()
                ),
            },
            uri = on.uri,
            queue = on.broker.queue,
            exchange = on.broker.exchange,
            prefetch = self.prefetch,
            amqp = on.amqp,
            delivered = delivered,
        );
        for line in &self.args.app_settings {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(self.dir.join(format!("{case}.log")))?;
        let child = Command::new(&self.args.apnsd)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.args.apnsd.display()))?;
        Ok(Daemon {
            child,
            metrics,
            log: self.dir.join(format!("{case}.log")),
        })
    }

    /// Waits for `n` more frames at the simulator; returns first → last frame.
    async fn frames(&self, n: u64, daemon: &mut Daemon) -> anyhow::Result<Duration> {
        self.sim.meter().reset();
        let target = self.sim.accepted_count() + n;
        self.wait_frames(target, daemon).await?;
        Ok(self.sim.meter().read().span)
    }

    async fn wait_frames(&self, target: u64, daemon: &mut Daemon) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.sim.accepted_count() < target {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("apnsd exited with {status}; see {}", daemon.log.display());
            }
            ensure!(
                Instant::now() < deadline,
                "only {} of {target} frames arrived; see {}",
                self.sim.accepted_count(),
                daemon.log.display()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// Where a daemon consumes: a queue, the URI it reaches it through, and
/// extra `[amqp]` lines (e.g. the queue type), each ending in a newline.
#[derive(Clone, Copy)]
struct Target<'a> {
    broker: &'a Broker,
    uri: &'a str,
    amqp: &'a str,
}

/// The apnsd process of one case; killed if the bench fails before stopping it.
struct Daemon {
    child: Child,
    metrics: std::net::SocketAddr,
    log: PathBuf,
}

impl Daemon {
    /// Waits until apnsd has acked `n` jobs in all (settling takes `settle`).
    async fn wait_acked(&mut self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let acked = self.counter("apnsd_jobs_acked_total").await?;
            if acked >= n {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "apnsd acked only {acked} of {n} jobs; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until apnsd consumes and holds a gateway connection.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.counter("apnsd_connections_up").await.unwrap_or(0) == 0
            || self.counter("apnsd_jobs_consumed_total").await.is_err()
        {
            if let Some(status) = self.child.try_wait()? {
                bail!("apnsd exited with {status}; see {}", self.log.display());
            }
            ensure!(Instant::now() < deadline, "apnsd did not get ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// CPU time apnsd used so far (user + system).
    fn cpu(&self) -> anyhow::Result<Duration> {
        process_cpu(&self.child.id().to_string())
    }

    /// One counter or gauge from apnsd's `/metrics`.
    async fn counter(&self, name: &str) -> anyhow::Result<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(self.metrics).await?;
        tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await?;
        // Summed over label sets: `name 3` or `name{app="bench"} 3`.
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .reduce(|a, b| a + b)
            .with_context(|| format!("{name} not in apnsd's /metrics"))
    }

    /// Reads the peak RSS, then stops apnsd with SIGTERM and checks that it
    /// acked every job (the queue is empty once it is gone).
    async fn stop(&mut self, broker: &Broker) -> anyhow::Result<u64> {
        let rss = peak_rss(self.child.id())?;
        let pid = self.child.id().to_string();
        ensure!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()?
                .success(),
            "kill -TERM {pid}"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            ensure!(Instant::now() < deadline, "apnsd did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(
            status.success(),
            "apnsd exited with {status}; see {}",
            self.log.display()
        );
        let left = broker.depth().await?;
        ensure!(left == 0, "{left} jobs were not acked");
        Ok(rss)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bench's own slice of RabbitMQ: a jobs queue and a results exchange.
struct Broker {
    uri: String,
    conn: Connection,
    ch: Channel,
    queue: String,
    exchange: String,
}

/// Unconfirmed publishes allowed in flight while filling the queue.
const PUBLISH_WINDOW: usize = 4096;

impl Broker {
    async fn open(uri: &str) -> anyhow::Result<Broker> {
        Broker::open_typed(uri, FieldTable::default()).await
    }

    /// A fresh queue declared with `args` (e.g. `x-queue-type`) on `uri`'s node.
    async fn open_typed(uri: &str, args: FieldTable) -> anyhow::Result<Broker> {
        let suffix: u64 = rand::random();
        let queue = format!("apnsd-bench.{suffix:x}.jobs");
        let exchange = format!("apnsd-bench.{suffix:x}.results");
        let conn = Connection::connect(uri, ConnectionProperties::default())
            .await
            .with_context(|| format!("RabbitMQ must run at {uri}"))?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        Ok(Broker {
            uri: uri.to_owned(),
            conn,
            ch,
            queue,
            exchange,
        })
    }

    async fn send(&self, body: &[u8]) -> anyhow::Result<PublisherConfirm> {
        Ok(self
            .ch
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?)
    }

    /// Publishes persistent jobs with pipelined confirms.
    async fn publish(&self, bodies: impl Iterator<Item = Vec<u8>>) -> anyhow::Result<()> {
        let mut pending = VecDeque::with_capacity(PUBLISH_WINDOW);
        for body in bodies {
            if pending.len() == PUBLISH_WINDOW {
                confirmed(pending.pop_front()).await?;
            }
            pending.push_back(self.send(&body).await?);
        }
        for c in pending {
            confirmed(Some(c)).await?;
        }
        Ok(())
    }

    /// Publishes `n` one-token jobs at `rate` per second, each token stamped
    /// with the moment it is published.
    async fn publish_paced(&self, n: u64, rate: u64) -> anyhow::Result<()> {
        let start = tokio::time::Instant::now();
        let mut pending = VecDeque::new();
        for i in 0..n {
            tokio::time::sleep_until(start + Duration::from_secs(i) / rate as u32).await;
            pending.push_back(self.send(&one_token_job(u64::MAX - i)).await?);
            while let Some(front) = pending.front_mut() {
                let Some(confirmation) = futures_lite::future::poll_once(front).await else {
                    break;
                };
                ensure!(confirmation?.is_ack(), "RabbitMQ refused a job");
                pending.pop_front();
            }
        }
        for c in pending {
            confirmed(Some(c)).await?;
        }
        Ok(())
    }

    /// A consumer on the jobs queue with its own connection, as any client would.
    async fn plain_consumer(&self, prefetch: u16) -> anyhow::Result<(Connection, Consumer)> {
        let conn = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                "apnsd-bench-plain".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((conn, consumer))
    }

    /// RabbitMQ's own ceiling: a consumer that does nothing but ack, with one
    /// multiple-ack for whatever arrived since the last one (the cheapest way
    /// to ack). Returns first delivery → last ack.
    async fn plain_consume(&self, n: u64, prefetch: u16) -> anyhow::Result<Duration> {
        let (conn, mut consumer) = self.plain_consumer(prefetch).await?;
        let mut first = None;
        let mut received = 0;
        while received < n {
            let mut last = consumer.next().await.context("consumer cancelled")??;
            first.get_or_insert_with(Instant::now);
            received += 1;
            while received < n {
                match futures_lite::future::poll_once(consumer.next()).await {
                    Some(Some(d)) => last = d?,
                    _ => break,
                }
                received += 1;
            }
            last.ack(BasicAckOptions { multiple: true }).await?;
        }
        let span = first.map_or(Duration::ZERO, |t| t.elapsed());
        conn.close(200, "bye".into()).await?;
        Ok(span)
    }

    /// Consumes `n` stamped one-token jobs as they are published; returns each
    /// one's publish → delivery time in microseconds.
    async fn plain_latencies(&self, n: u64, prefetch: u16) -> anyhow::Result<Vec<u64>> {
        let (conn, mut consumer) = self.plain_consumer(prefetch).await?;
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n {
            let d = consumer.next().await.context("consumer cancelled")??;
            let now = unix_micros(SystemTime::now());
            let stamp = stamp_in(&d.data).context("a job without a stamped token")?;
            out.push(now.saturating_sub(stamp));
            d.ack(BasicAckOptions { multiple: true }).await?;
        }
        conn.close(200, "bye".into()).await?;
        Ok(out)
    }

    /// Ready messages in the jobs queue.
    async fn depth(&self) -> anyhow::Result<u32> {
        let q = self
            .ch
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }

    /// Declares the results exchange as apnsd does and binds a queue that
    /// takes every result; returns the queue's name.
    async fn collect_results(&self) -> anyhow::Result<String> {
        let queue = format!("{}.collected", self.exchange);
        self.ch
            .exchange_declare(
                self.exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.ch
            .queue_bind(
                queue.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(queue)
    }

    /// Publishes `n` persistent `delivered`-sized results to the results
    /// exchange with pipelined confirms; returns how long that took.
    async fn publish_results(&self, n: u64) -> anyhow::Result<Duration> {
        let token = "ab".repeat(32);
        let body = format!(
            r#"{{"app":"bench","id":"fan-0","token":"{token}","at":"2026-12-02T00:00:00.000Z"}}"#
        );
        let start = Instant::now();
        let mut pending = VecDeque::with_capacity(PUBLISH_WINDOW);
        for _ in 0..n {
            if pending.len() == PUBLISH_WINDOW {
                confirmed(pending.pop_front()).await?;
            }
            let confirm = self
                .ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    "delivered".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await?;
            pending.push_back(confirm);
        }
        for c in pending {
            confirmed(Some(c)).await?;
        }
        Ok(start.elapsed())
    }

    async fn purge(&self, queue: &str) -> anyhow::Result<()> {
        self.ch
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    async fn drop_results(&self, queue: &str) {
        let _ = self
            .ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }

    async fn cleanup(&self) {
        let queue = self.queue.as_str();
        let _ = self
            .ch
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await;
        // apnsd declares `<queue>.retry` beside the jobs queue.
        for q in [queue.to_owned(), format!("{queue}.retry")] {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .ch
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

async fn confirmed(confirm: Option<PublisherConfirm>) -> anyhow::Result<()> {
    if let Some(c) = confirm {
        ensure!(c.await?.is_ack(), "RabbitMQ refused a job");
    }
    Ok(())
}

/// Spreads tokens over lanes the way random device tokens would.
fn prefix(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn one_token_job(i: u64) -> Vec<u8> {
    let token = stamped_token(prefix(i), SystemTime::now());
    format!(r#"{{"id":"bench-{i}","token":"{token}","payload":{{"aps":{{"alert":"Hello from the benchmark","badge":1}}}}}}"#)
        .into_bytes()
}

fn one_token_jobs(from: u64, n: u64) -> impl Iterator<Item = Vec<u8>> {
    (from..from + n).map(one_token_job)
}

fn fan_out_jobs(jobs: u64, tokens: u64) -> impl Iterator<Item = Vec<u8>> {
    (0..jobs).map(move |j| {
        let now = SystemTime::now();
        let list: Vec<String> = (0..tokens)
            .map(|t| format!("\"{}\"", stamped_token(prefix(j * tokens + t), now)))
            .collect();
        format!(
            r#"{{"id":"fan-{j}","tokens":[{}],"payload":{{"aps":{{"alert":"Hello, everyone","sound":"default"}}}}}}"#,
            list.join(",")
        )
        .into_bytes()
    })
}

/// The publish time a one-token job's token carries (see [`stamped_token`]).
fn stamp_in(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let (_, rest) = text.split_once(r#""token":""#)?;
    u64::from_str_radix(rest.get(48..64)?, 16).ok()
}

fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// VmHWM of a process, in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kb * 1024)
}

fn machine_facts() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("machine: {cores} cores ({cpu}), RabbitMQ, apnsd and the simulator on the same machine")
}

/// CPU time process `pid` (or `self`) used so far (user + system).
fn process_cpu(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    ensure!(ticks.len() == 2, "unreadable /proc/PID/stat");
    // The kernel reports in USER_HZ, which is 100 on Linux.
    Ok(Duration::from_millis((ticks[0] + ticks[1]) * 10))
}

/// "apnsd CPU 1.20s, 24.0µs per job", `who` being "apnsd".
fn cpu_per(who: &str, cpu: Duration, n: u64, what: &str) -> String {
    format!(
        "{who} CPU {cpu:.2?}, {:.2?} per {what}",
        cpu / n.max(1) as u32
    )
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// 1234567.8 → "1,234,568".
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
