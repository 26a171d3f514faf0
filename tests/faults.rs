//! Faults a production daemon meets — broker connections cut, gateways that
//! refuse, stall, crawl or reject the certificate, a daemon killed mid-stream —
//! against the real RabbitMQ and the simulator. Each ends with nothing lost:
//! every token accepted or reported, the queues empty, duplicates counted.

mod common;

use std::path::Path;
use std::time::Duration;

use apnsd::job::DeviceToken;
use apnsd::metrics::StatsSnapshot;
use apnsd::simulator::{write_identity, ClientSpec, Faults, SimCerts, Simulator, SimulatorOptions};
use common::relay::Relay;
use common::rig::{tok, Rig, WAIT};
use common::*;

struct Setup {
    /// Broker URI the daemon uses (a relay), when not the broker itself.
    uri: Option<String>,
    prefetch: u32,
    /// More `[amqp]` keys.
    amqp: String,
    /// More keys for the `example` app (placeholders as in `apps`).
    app: &'static str,
    /// More `[[apps]]`; `{dir}` is the certificates folder, `{gateway}` and
    /// `{http2}` the simulator's binary and HTTP/2 addresses.
    apps: String,
    faults: Faults,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            uri: None,
            prefetch: 1000,
            amqp: "".into(),
            app: "",
            apps: String::new(),
            faults: Faults::default(),
        }
    }
}

/// An `[[apps]]` entry presenting `client` (a `.p12` in `dir`) to `gateway`;
/// `extra` lines (`key = value`) add to or override the test defaults.
fn app_toml(name: &str, dir: &Path, client: &str, gateway: &str, extra: &str) -> String {
    let mut keys = vec![
        ("connections", "2".to_owned()),
        ("settle", "\"100ms\"".to_owned()),
        ("feedback_interval", "\"1h\"".to_owned()),
        ("reconnect_min", "\"10ms\"".to_owned()),
        ("reconnect_max", "\"200ms\"".to_owned()),
    ];
    for (key, value) in extra.lines().filter_map(|l| l.split_once('=')) {
        let (key, value) = (key.trim(), value.trim().to_owned());
        match keys.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => keys.push((key, value)),
        }
    }
    let keys: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    format!(
        r#"
[[apps]]
name = "{name}"
environment = "simulator"
certificate = "{dir}/{client}.p12"
password = "simulator"
ca = "{dir}/ca.pem"
gateway = "{gateway}"
feedback = "{gateway}"
{keys}"#,
        dir = dir.display(),
    )
}

async fn rig(test: &str, setup: Setup) -> Rig {
    apnsd::apns::tls::install_crypto_provider();
    let broker = Broker::new(test).await;
    let dir = tempfile::tempdir().unwrap();
    let certs = SimCerts::generate("com.example.app").unwrap();
    certs.write_to(dir.path()).unwrap();
    // `expired.p12`: signed by the right CA, expired in 2020; the gateway refuses it.
    let mut spec = ClientSpec::new("com.example.app");
    spec.expired = true;
    let expired = certs.mint_client(&spec).unwrap();
    write_identity(&expired, dir.path(), "expired").unwrap();
    let mut options = SimulatorOptions::new(certs);
    options.faults = setup.faults;
    let sim = Simulator::start(options).await.unwrap();
    let mut amqp = broker.amqp_toml(setup.prefetch);
    if let Some(uri) = &setup.uri {
        amqp = amqp.replace(&amqp_uri(), uri);
    }
    let gateway = sim.gateway_addr().to_string();
    let toml = format!(
        "shutdown_timeout = \"10s\"\n{amqp}{}\n{}{}",
        setup.amqp,
        app_toml("example", dir.path(), "client", &gateway, setup.app),
        setup.apps,
    )
    .replace("{dir}", &dir.path().display().to_string())
    .replace("{gateway}", &gateway)
    .replace("{http2}", &sim.http2_addr().to_string());
    Rig::start(broker, sim, dir, &toml).await
}

/// Drains the daemon and checks that no job is left in either queue.
async fn finish(rig: Rig) -> StatsSnapshot {
    assert_eq!(rig.broker.retry_depth().await, 0, "jobs left to retry");
    rig.finish().await
}

/// Publishes one-token jobs for `tokens`.
async fn publish(rig: &Rig, tokens: &[String]) {
    let jobs = tokens.iter().enumerate();
    rig.broker
        .publish_all(jobs.map(|(i, t)| job(&format!("j{i}"), t)))
        .await;
}

/// Waits until every token was accepted at least once; returns the duplicates.
async fn all_accepted(rig: &Rig, tokens: &[String]) -> usize {
    let wanted: Vec<DeviceToken> = tokens.iter().map(|t| tok(t)).collect();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let counts = rig.accepted_counts();
        if wanted.iter().all(|t| counts.contains_key(t)) {
            return wanted.iter().map(|t| counts[t] - 1).sum();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} tokens accepted: {:?}",
            wanted.iter().filter(|t| counts.contains_key(t)).count(),
            wanted.len(),
            rig.daemon.stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A counter summed over its labels (apps, lanes), from the Prometheus text.
fn total(stats: &apnsd::metrics::Stats, name: &str) -> u64 {
    stats
        .render()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

fn tokens(first: u8, n: u32) -> Vec<String> {
    (0..n).map(|i| token(first, i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_cut_mid_stream_lose_nothing() {
    broker_cuts_lose_nothing("brokercut", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_cut_mid_stream_lose_nothing_over_http2() {
    let app = "protocol = \"http2\"\nendpoint = \"{http2}\"";
    broker_cuts_lose_nothing("brokercut-h2", app).await;
}

/// Cuts the daemon's broker connections twice mid-stream; `app` holds more
/// keys for the `example` app.
async fn broker_cuts_lose_nothing(test: &str, app: &'static str) {
    let relay = Relay::start("127.0.0.1:5672").await;
    let rig = rig(
        test,
        Setup {
            uri: Some(relay.uri()),
            prefetch: 300,
            app,
            ..Default::default()
        },
    )
    .await;
    let tokens = tokens(0x21, 3000);
    publish(&rig, &tokens).await;
    for round in 1..=2u64 {
        let stats = rig.daemon.stats.clone();
        eventually(WAIT, "progress before the cut", || {
            stats.jobs_acked.get() >= round * 800
        })
        .await;
        relay.cut();
    }
    let duplicates = all_accepted(&rig, &tokens).await;
    let stats = finish(rig).await;
    // Every duplicate comes from a job the broker redelivered (its earlier
    // try may have sent it) or a silent gateway close; both are counted.
    assert!(stats.jobs_redelivered > 0, "{stats:?}");
    assert!(
        duplicates as u64 <= stats.jobs_redelivered + stats.resent_after_close,
        "{duplicates} duplicates: {stats:?}"
    );
    assert!(duplicates <= 2 * 300, "at most a prefetch per cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_apps_retry_through_the_retry_queue_then_fail_without_blocking_others() {
    unusable_apps_retry_then_fail("unusable", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_http2_apps_retry_through_the_retry_queue_then_fail_without_blocking_others() {
    unusable_apps_retry_then_fail(
        "unusable-h2",
        "protocol = \"http2\"\nendpoint = \"{endpoint}\"",
    )
    .await;
}

/// Two unusable apps — one whose gateway port is closed, one whose
/// certificate the simulator refuses — beside the working `example` app;
/// `protocol` holds the unusable apps' protocol lines (`{endpoint}` is their
/// HTTP/2 endpoint), empty for the binary interface.
async fn unusable_apps_retry_then_fail(test: &str, protocol: &str) {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let keys = |endpoint: &str| {
        format!(
            "unusable_after = \"100ms\"\n{}",
            protocol.replace("{endpoint}", endpoint)
        )
    };
    let apps = format!(
        "{}{}",
        app_toml(
            "dead",
            Path::new("{dir}"),
            "client",
            &dead_addr,
            &keys(&dead_addr)
        ),
        app_toml(
            "expired",
            Path::new("{dir}"),
            "expired",
            "{gateway}",
            &keys("{http2}")
        ),
    );
    let mut rig = rig(
        test,
        Setup {
            amqp: "retry_delay = \"200ms\"\nmax_job_attempts = 3\n".into(),
            apps,
            ..Default::default()
        },
    )
    .await;
    let good = tokens(0x22, 300);
    let mut bodies = Vec::new();
    for (i, t) in good.iter().enumerate() {
        bodies.push(job(&format!("g{i}"), t));
        if i % 60 == 0 {
            for app in ["dead", "expired"] {
                bodies.push(
                    serde_json::to_vec(&serde_json::json!({
                        "id": format!("{app}{i}"), "app": app,
                        "tokens": [token(0x23, i as u32), token(0x24, i as u32)],
                        "payload": {"aps": {"alert": "x"}},
                    }))
                    .unwrap(),
                );
            }
        }
    }
    rig.broker.publish_all(bodies).await;
    let duplicates = all_accepted(&rig, &good).await;
    assert_eq!(duplicates, 0);
    // A refused certificate withholds readiness and is named; a dead port is not
    // an identity problem.
    let stats = rig.daemon.stats.clone();
    eventually(WAIT, "the refused certificate to be seen", || {
        !stats.refused_apps().is_empty()
    })
    .await;
    assert_eq!(stats.refused_apps(), ["expired"]);
    assert!(!stats.is_ready());
    let results = rig.broker.results(20, WAIT).await;
    let grouped = by_key(&results);
    for (key, app) in [
        ("failed.gateway_unreachable", "dead"),
        ("failed.certificate_rejected", "expired"),
    ] {
        let failed = grouped.get(key).cloned().unwrap_or_default();
        assert_eq!(failed.len(), 10, "{key}: {grouped:?}");
        for f in failed {
            assert_eq!(f["app"], app);
            assert_eq!(f["attempts"], 3, "{f}");
            assert!(f["status"].is_null(), "{f}");
        }
    }
    let stats = finish(rig).await;
    assert_eq!(
        stats.jobs_deferred, 20,
        "two retries of each of the 10 jobs"
    );
}

/// Fan-out jobs of `per_job` tokens each with a payload near the 2 KiB limit:
/// enough bytes to fill socket buffers when the gateway stops reading.
fn big_fan_out(first: u8, jobs: u32, per_job: u32) -> (Vec<Vec<u8>>, Vec<String>) {
    let alert = "x".repeat(1900);
    let mut all = Vec::new();
    let bodies = (0..jobs)
        .map(|j| {
            let tokens: Vec<String> = (0..per_job)
                .map(|i| token(first, j * per_job + i))
                .collect();
            all.extend(tokens.iter().cloned());
            serde_json::to_vec(&serde_json::json!({
                "id": format!("fan{j}"), "tokens": tokens, "payload": {"aps": {"alert": alert}},
            }))
            .unwrap()
        })
        .collect();
    (bodies, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_reading_is_dropped_and_nothing_is_lost() {
    let rig = rig(
        "stall",
        Setup {
            app: "settle = \"1500ms\"\nwrite_timeout = \"200ms\"\nconnections = 1",
            // The gateway stops reading for seconds at a time: writes stall
            // once the socket buffers are full.
            faults: Faults {
                read_delay: Some(Duration::from_secs(3)),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let (bodies, tokens) = big_fan_out(0x25, 4, 2000);
    rig.broker.publish_all(bodies).await;
    let stats = rig.daemon.stats.clone();
    eventually(WAIT, "the stall detected", || {
        total(&stats, "apnsd_connection_stalls_total") >= 1
    })
    .await;
    rig.sim.set_faults(Faults::default());
    let duplicates = all_accepted(&rig, &tokens).await;
    let connections = rig.sim.connections();
    let stats = finish(rig).await;
    assert!(
        duplicates as u64 <= stats.resent_after_close,
        "{duplicates} duplicates: {stats:?}"
    );
    assert!(
        connections <= 10,
        "{connections} connections: no tight reconnect loop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_gateway_holds_the_backlog_in_the_broker_not_in_memory() {
    let prefetch = 1000;
    let rig = rig(
        "slow",
        Setup {
            prefetch,
            app: "settle = \"50ms\"",
            faults: Faults {
                read_delay: Some(Duration::from_secs(1)),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let tokens = tokens(0x26, 20_000);
    publish(&rig, &tokens).await;
    let stats = rig.daemon.stats.clone();
    eventually(WAIT, "the daemon holding a full prefetch", || {
        stats.jobs_consumed.get() >= u64::from(prefetch)
    })
    .await;
    for _ in 0..10 {
        let held = stats.jobs_consumed.get() - stats.jobs_acked.get();
        assert!(held <= u64::from(prefetch), "{held} jobs held");
        let queued = rig.broker.queue_depth().await;
        let outside = u64::from(queued) + stats.jobs_acked.get() + u64::from(prefetch);
        assert!(outside >= 20_000, "the backlog stays in the broker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.sim.set_faults(Faults::default());
    assert_eq!(all_accepted(&rig, &tokens).await, 0);
    let stats = finish(rig).await;
    assert_eq!(stats.jobs_acked, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_back_off_until_the_gateway_comes_up() {
    let late = format!("127.0.0.1:{}", common::process::free_port());
    let rig = rig(
        "refused",
        Setup {
            apps: app_toml("late", Path::new("{dir}"), "client", &late, ""),
            ..Default::default()
        },
    )
    .await;
    let tokens = tokens(0x27, 200);
    rig.broker
        .publish_all(tokens.iter().enumerate().map(|(i, t)| {
            serde_json::to_vec(&serde_json::json!({
                "id": format!("l{i}"), "app": "late", "token": t, "payload": {"aps": {}},
            }))
            .unwrap()
        }))
        .await;
    let stats = rig.daemon.stats.clone();
    eventually(WAIT, "refused connections", || {
        total(&stats, "apnsd_connect_failures_total") >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = total(&stats, "apnsd_connect_failures_total");
    // Two lanes, backing off from 10 ms to 200 ms: a tight loop would make thousands.
    assert!(refused < 40, "{refused} connection attempts");
    let _gateway_up = Relay::start_at(&late, &rig.sim.gateway_addr().to_string()).await;
    assert_eq!(all_accepted(&rig, &tokens).await, 0);
    finish(rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_queue_dead_letters_back_to_the_jobs_queue_classic_and_quorum() {
    use apnsd::amqp::{self, Confirmed, Owner, Publisher, Topology};
    use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};

    let conn = amqp::connect(AMQP_URI, "apnsd-test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    for kind in [None, Some("quorum")] {
        let suffix: u64 = rand::random();
        let topology = Topology {
            queue: format!("apnsd-test.retry.{suffix:x}.jobs"),
            queue_type: kind.map(str::to_owned),
            results_exchange: format!("apnsd-test.retry.{suffix:x}.results"),
        };
        // Declaring again, as every session does, must not clash.
        for _ in 0..2 {
            amqp::declare_queue(&ch, &topology).await.unwrap();
        }
        let publish_conn = amqp::connect(AMQP_URI, "apnsd-test-publish").await.unwrap();
        let mut publisher = Publisher::open(publish_conn, &topology.results_exchange, WAIT)
            .await
            .unwrap();
        let body = br#"{"token":"00","payload":{"aps":{}}}"#.to_vec();
        let delay = Duration::from_millis(200);
        publisher
            .publish_retry(
                &topology.retry_queue(),
                body.clone(),
                2,
                delay,
                Owner::Nobody,
            )
            .await
            .unwrap();
        assert!(matches!(
            publisher.confirmed().await,
            Ok(Some(Confirmed {
                owner: Owner::Nobody,
                unroutable: None
            }))
        ));
        publisher.close().await;
        let deadline = std::time::Instant::now() + WAIT;
        let back = loop {
            let got = ch
                .basic_get(
                    topology.queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap();
            if let Some(message) = got {
                break message.delivery;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{kind:?}: not dead-lettered back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(back.data, body, "{kind:?}");
        assert_eq!(amqp::attempts(&back.properties), 2, "{kind:?}");
        for q in [topology.retry_queue(), topology.queue.clone()] {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        ch.exchange_delete(
            topology.results_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
}

/// A rig with `dead` beside the working `example` app: an app whose gateway
/// port is closed, unusable after 100 ms; its jobs wait 200 ms per retry.
async fn rig_with_dead_app(test: &str, max_job_attempts: u32) -> Rig {
    let dead = format!("127.0.0.1:{}", common::process::free_port());
    rig(
        test,
        Setup {
            amqp: format!("retry_delay = \"200ms\"\nmax_job_attempts = {max_job_attempts}\n"),
            apps: app_toml(
                "dead",
                Path::new("{dir}"),
                "client",
                &dead,
                "unusable_after = \"100ms\"",
            ),
            ..Default::default()
        },
    )
    .await
}

/// The retry queue deleted under a running daemon: the broker confirms the
/// retry but returns it unroutable, so the job stays unacked, the session
/// starts again, declares the queue anew and the job still gets its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_queue_deleted_under_the_daemon_loses_no_job() {
    let mut rig = rig_with_dead_app("retry-gone", 2).await;
    // A job of the working app first: the session has declared its queues.
    let first = tokens(0x29, 1);
    publish(&rig, &first).await;
    assert_eq!(all_accepted(&rig, &first).await, 0);
    rig.broker.delete_retry_queue().await;
    rig.broker
        .publish_all([serde_json::to_vec(&serde_json::json!({
            "id": "parked", "app": "dead", "token": token(0x29, 2), "payload": {"aps": {}},
        }))
        .unwrap()])
        .await;
    let results = rig.broker.results(1, WAIT).await;
    assert_eq!(results[0].routing_key, "failed.gateway_unreachable");
    assert_eq!(results[0].body["id"], "parked");
    assert_eq!(results[0].body["attempts"], 2, "{:?}", results[0]);
    let stats = finish(rig).await;
    assert!(stats.jobs_redelivered >= 1, "{stats:?}");
    assert_eq!(
        stats.jobs_deferred, 2,
        "the returned retry, then the one that went through: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jobs_are_not_sent_even_after_waiting_in_the_retry_queue() {
    let mut rig = rig_with_dead_app("expired", 1000).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = |id: &str, app: &str, expiry: u64| {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "app": app, "token": token(0x28, 1), "expiry": expiry,
            "payload": {"aps": {}},
        }))
        .unwrap()
    };
    rig.broker
        .publish_all([body("past", "example", 1000), body("soon", "dead", now + 2)])
        .await;
    let results = rig.broker.results(2, WAIT).await;
    for r in &results {
        assert_eq!(r.routing_key, "failed.expired", "{r:?}");
        assert!(r.body["status"].is_null());
    }
    assert_eq!(results[0].body["id"], "past");
    assert_eq!(results[1].body["id"], "soon");
    assert!(
        rig.sim.accepted().is_empty(),
        "an expired job is never sent"
    );
    let stats = finish(rig).await;
    assert!(
        stats.jobs_deferred >= 1,
        "it waited in the retry queue: {stats:?}"
    );
}
