//! The daemon's main path, in-process, against the real RabbitMQ and the
//! simulator over real TLS with client certificates.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use apnsd::job::DeviceToken;
use apnsd::simulator::{Faults, RefuseRule, SimCerts, Simulator, SimulatorOptions};
use common::process::{http_get, metric};
use common::rig::*;
use common::*;

struct Options {
    faults: Faults,
    delivered: bool,
    connections: u32,
    extra: String,
    /// More `[amqp]` keys.
    amqp: &'static str,
    /// Tuples the feedback service holds before the daemon starts.
    feedback: Vec<(DeviceToken, u32)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            faults: Faults::default(),
            delivered: false,
            connections: 2,
            extra: String::new(),
            amqp: "",
            feedback: Vec::new(),
        }
    }
}

fn app_toml(name: &str, dir: &Path, client: &str, sim: &Simulator, connections: u32) -> String {
    format!(
        r#"
[[apps]]
name = "{name}"
environment = "simulator"
certificate = "{dir}/{client}.p12"
password = "simulator"
ca = "{dir}/ca.pem"
gateway = "{gateway}"
feedback = "{feedback}"
connections = {connections}
settle = "150ms"
feedback_interval = "1h"
reconnect_min = "10ms"
reconnect_max = "200ms"
"#,
        dir = dir.display(),
        gateway = sim.gateway_addr(),
        feedback = sim.feedback_addr(),
    )
}

async fn rig(test: &str, opts: Options) -> Rig {
    apnsd::apns::tls::install_crypto_provider();
    let broker = Broker::new(test).await;
    let dir = tempfile::tempdir().unwrap();
    let certs = SimCerts::generate("com.example.app").unwrap();
    certs.write_to(dir.path()).unwrap();
    let mut sim_opts = SimulatorOptions::new(certs);
    sim_opts.faults = opts.faults;
    let sim = Simulator::start(sim_opts).await.unwrap();
    for (token, timestamp) in opts.feedback {
        sim.add_feedback(token, timestamp);
    }
    let toml = format!(
        "shutdown_timeout = \"10s\"\n{}{}\n[results]\ndelivered = {}\n{}\n{}",
        broker.amqp_toml(5000),
        opts.amqp,
        opts.delivered,
        app_toml("example", dir.path(), "client", &sim, opts.connections),
        opts.extra
            .replace("{dir}", &dir.path().display().to_string())
            .replace("{gateway}", &sim.gateway_addr().to_string())
            .replace("{feedback}", &sim.feedback_addr().to_string()),
    );
    Rig::start(broker, sim, dir, &toml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_delivers_each_notification_once() {
    let mut rig = rig(
        "happy",
        Options {
            delivered: true,
            ..Default::default()
        },
    )
    .await;
    let tokens = rig.burst(300, |i| token(0x01, i)).await;
    let results = rig.broker.results(300, WAIT).await;
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    let mut ids: Vec<&str> = results
        .iter()
        .map(|r| r.body["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300);
    assert!(results
        .iter()
        .all(|r| r.body["app"] == "example" && r.body["at"].is_string()));
    rig.wait_acked(300).await;
    let counts = rig.accepted_counts();
    for t in &tokens {
        assert_eq!(counts.get(&tok(t)), Some(&1), "token {t}");
    }
    let first = rig
        .sim
        .accepted()
        .into_iter()
        .find(|a| a.token == tok(&tokens[0]))
        .unwrap();
    assert_eq!(first.payload, br#"{"aps":{"alert":"hello j0"}}"#);
    let stats = rig.finish().await;
    assert_eq!(stats.jobs_acked, 300);
    assert_eq!(stats.resent_after_close, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_mid_burst_are_reported_and_the_rest_delivered_once() {
    let faults = Faults {
        refuse: vec![RefuseRule::parse("ff=8").unwrap()],
        ..Default::default()
    };
    let mut rig = rig(
        "badtokens",
        Options {
            faults,
            ..Default::default()
        },
    )
    .await;
    let tokens = rig
        .burst(1000, |i| {
            if i % 20 == 7 {
                token(0xff, i)
            } else {
                token(0x02, i)
            }
        })
        .await;
    let results = rig.broker.results(50, WAIT).await;
    rig.wait_acked(1000).await;
    let extra = rig.broker.no_more_results(Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "unexpected results: {extra:?}");
    for r in &results {
        assert_eq!(r.routing_key, "failed.invalid_token");
        assert_eq!(r.body["status"], 8);
        assert_eq!(r.body["reason"], "invalid_token");
        assert_eq!(r.body["attempts"], 1);
        assert!(r.body["token"].as_str().unwrap().starts_with("ff"));
    }
    let counts = rig.accepted_counts();
    for t in tokens.iter().filter(|t| !t.starts_with("ff")) {
        assert_eq!(
            counts.get(&tok(t)),
            Some(&1),
            "good token {t} must be delivered exactly once"
        );
    }
    assert!(counts.keys().all(|t| t.as_bytes()[0] != 0xff));
    let stats = rig.finish().await;
    assert!(
        stats.resent_after_error > 0,
        "tokens after each bad one were resent"
    );
    assert_eq!(stats.resent_after_close, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_status_is_retried_then_reported() {
    let faults = Faults {
        refuse: vec![RefuseRule::parse("ee=1").unwrap()],
        ..Default::default()
    };
    let mut rig = rig(
        "transient",
        Options {
            faults,
            ..Default::default()
        },
    )
    .await;
    let bad = token(0xee, 1);
    rig.broker
        .publish_all([job("t1", &bad), job("t2", &token(0x03, 2))])
        .await;
    let results = rig.broker.results(1, WAIT).await;
    assert_eq!(results[0].routing_key, "failed.processing_error");
    assert_eq!(results[0].body["attempts"], 3);
    assert_eq!(results[0].body["status"], 1);
    rig.wait_acked(2).await;
    assert_eq!(
        rig.sim
            .refused()
            .iter()
            .filter(|r| r.0 == tok(&bad))
            .count(),
        3
    );
    let stats = rig.finish().await;
    assert_eq!(stats.retried, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_shutdown_mid_burst_loses_nothing_and_duplicates_nothing() {
    let faults = Faults {
        shutdown_every: Some(250),
        ..Default::default()
    };
    let rig = rig(
        "shutdown10",
        Options {
            faults,
            ..Default::default()
        },
    )
    .await;
    let tokens = rig.burst(1000, |i| token(0x04, i)).await;
    rig.wait_acked(1000).await;
    let counts = rig.accepted_counts();
    for t in &tokens {
        assert_eq!(counts.get(&tok(t)), Some(&1), "token {t}");
    }
    assert!(rig.sim.connections() > 2, "the gateway closed connections");
    let stats = rig.finish().await;
    assert_eq!(stats.resent_after_close, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_close_mid_burst_loses_nothing_and_counts_duplicates() {
    let faults = Faults {
        close_every: Some(200),
        ..Default::default()
    };
    let rig = rig(
        "silentclose",
        Options {
            faults,
            ..Default::default()
        },
    )
    .await;
    let tokens = rig.burst(1000, |i| token(0x05, i)).await;
    rig.wait_acked(1000).await;
    let counts = rig.accepted_counts();
    let mut duplicates = 0;
    for t in &tokens {
        let n = *counts.get(&tok(t)).unwrap_or(&0);
        assert!(n >= 1, "token {t} was lost");
        duplicates += n - 1;
    }
    let stats = rig.finish().await;
    assert!(
        stats.resent_after_close > 0,
        "silent closes must be counted"
    );
    assert!(
        duplicates as u64 <= stats.resent_after_close,
        "{duplicates} duplicates but only {} counted resends",
        stats.resent_after_close
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_jobs_are_rejected_with_their_body() {
    let mut rig = rig("rejected", Options::default()).await;
    let good = token(0x06, 1);
    let big = "x".repeat(3000);
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "not JSON"),
        (vec![0xff, 0xfe, 0x00], "not UTF-8"),
        (
            br#"{"id":"n1","payload":{"aps":{}}}"#.to_vec(),
            "neither `token`",
        ),
        (
            br#"{"id":"n2","token":"abc","payload":{"aps":{}}}"#.to_vec(),
            "malformed",
        ),
        (
            format!(r#"{{"id":"n3","token":"{good}","payload":{{"aps":{{"alert":"{big}"}}}}}}"#)
                .into_bytes(),
            "limit is 2048",
        ),
        (
            format!(r#"{{"id":"n4","app":"nope","token":"{good}","payload":{{"aps":{{}}}}}}"#)
                .into_bytes(),
            "unknown app",
        ),
        (
            format!(r#"{{"id":"n5","token":"{good}","payload":{{"aps":{{}}}},"priority":"now"}}"#)
                .into_bytes(),
            "`priority`",
        ),
    ];
    rig.broker
        .publish_all(bodies.iter().map(|(b, _)| b.clone()))
        .await;
    let results = rig.broker.results(bodies.len(), WAIT).await;
    rig.wait_acked(bodies.len() as u64).await;
    for ((body, needle), r) in bodies.iter().zip(&results) {
        assert_eq!(r.routing_key, "rejected");
        let error = r.body["error"].as_str().unwrap();
        assert!(
            error.contains(needle),
            "{error:?} should mention {needle:?}"
        );
        assert_eq!(
            r.body["body"].as_str().unwrap(),
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(results[3].body["id"], "n2");
    assert_eq!(results[5].body["id"], "n4");
    assert!(rig.sim.accepted().is_empty());
    let stats = rig.finish().await;
    assert_eq!(stats.jobs_rejected, bodies.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_id_stands_in_for_a_missing_id() {
    let mut rig = rig(
        "messageid",
        Options {
            delivered: true,
            ..Default::default()
        },
    )
    .await;
    let body = format!(
        r#"{{"token":"{}","payload":{{"aps":{{}}}}}}"#,
        token(0x07, 1)
    );
    rig.broker
        .publish_with_message_id(body.as_bytes(), "amqp-id-1")
        .await;
    let results = rig.broker.results(1, WAIT).await;
    assert_eq!(results[0].body["id"], "amqp-id-1");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_service_tokens_become_unregistered_results() {
    let gone = tok(&token(0x08, 1));
    let mut rig = rig(
        "feedback",
        Options {
            feedback: vec![(gone, 1_700_000_000)],
            ..Default::default()
        },
    )
    .await;
    let results = rig.broker.results(1, WAIT).await;
    assert_eq!(results[0].routing_key, "unregistered");
    assert_eq!(results[0].body["token"], gone.to_hex());
    assert_eq!(results[0].body["timestamp"], 1_700_000_000);
    assert_eq!(results[0].body["app"], "example");
    let stats = rig.finish().await;
    assert_eq!(stats.feedback_tokens, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_job_of_ten_thousand_tokens() {
    let faults = Faults {
        refuse: vec![RefuseRule::parse("fd=8").unwrap()],
        ..Default::default()
    };
    let mut rig = rig(
        "fanout",
        Options {
            faults,
            ..Default::default()
        },
    )
    .await;
    let tokens: Vec<String> = (0..10_000)
        .map(|i| {
            if i % 1000 == 500 {
                token(0xfd, i)
            } else {
                token(0x09, i)
            }
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "broadcast", "tokens": tokens, "payload": {"aps": {"alert": "all"}}
    }))
    .unwrap();
    rig.broker.publish_all([body]).await;
    let results = rig.broker.results(10, WAIT).await;
    assert!(results
        .iter()
        .all(|r| r.routing_key == "failed.invalid_token" && r.body["id"] == "broadcast"));
    rig.wait_acked(1).await;
    let counts = rig.accepted_counts();
    assert_eq!(counts.len(), 9_990);
    assert!(counts.values().all(|&n| n == 1));
    let stats = rig.finish().await;
    assert_eq!(stats.jobs_acked, 1);
}

/// `amqp.prefetch_bytes` at work: large jobs are taken a few at a time, small
/// ones fill the prefetch, and nothing is lost across the subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_follows_the_bytes_held() {
    let budget = 100_000;
    let rig = rig(
        "prefetchbytes",
        Options {
            amqp: "prefetch_bytes = 100000\n",
            ..Default::default()
        },
    )
    .await;
    let stats = rig.daemon.stats.clone();
    // Polls the gauges until every job so far is acked: (most bytes held,
    // least and most prefetch seen).
    let watch = |acked: u64| {
        let stats = stats.clone();
        async move {
            let (mut held, mut low, mut high) = (0, i64::MAX, 0);
            let deadline = std::time::Instant::now() + WAIT;
            while stats.jobs_acked.get() < acked {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{:?}",
                    stats.snapshot()
                );
                held = held.max(stats.job_bytes_held.get());
                let prefetch = stats.prefetch.get();
                (low, high) = (low.min(prefetch), high.max(prefetch));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (held, low, high)
        }
    };
    // 60 jobs of 500 tokens, about 34 kB each: 2 MB in all.
    let mut tokens = Vec::new();
    let bodies: Vec<Vec<u8>> = (0..60u32)
        .map(|j| {
            let list: Vec<String> = (0..500).map(|i| token(0x31, j * 500 + i)).collect();
            tokens.extend(list.iter().cloned());
            serde_json::to_vec(&serde_json::json!({
                "id": format!("big{j}"), "tokens": list, "payload": {"aps": {"alert": "x"}}
            }))
            .unwrap()
        })
        .collect();
    let size = bodies[0].len() as i64;
    let total: i64 = bodies.iter().map(|b| b.len() as i64).sum();
    rig.broker.publish_all(bodies).await;
    let (held, low, _) = watch(60).await;
    assert!(
        low <= budget / size,
        "the prefetch shrank to what fits: {low}"
    );
    // The first subscription's jobs, then at most what fits on top.
    let bound = (i64::from(apnsd::intake::START) + budget / size + 1) * size;
    assert!(
        held <= bound && held < total / 2,
        "{held} bytes held of {total}, bound {bound}"
    );
    let small = rig.burst(3000, |i| token(0x32, i)).await;
    let (_, _, high) = watch(60 + 3000).await;
    assert!(high >= 512, "small jobs grew the prefetch: {high}");
    tokens.extend(small);
    rig.assert_once(&tokens);
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_in_one_process() {
    let extra = r#"
[[apps]]
name = "second"
environment = "simulator"
certificate = "{dir}/client.p12"
password = "simulator"
ca = "{dir}/ca.pem"
gateway = "{gateway}"
feedback = "{feedback}"
connections = 1
settle = "150ms"
feedback_interval = "1h"
"#;
    let mut rig = rig(
        "twoapps",
        Options {
            delivered: true,
            extra: extra.into(),
            ..Default::default()
        },
    )
    .await;
    let a = token(0x0a, 1);
    let b = token(0x0b, 2);
    let second = format!(r#"{{"id":"s","app":"second","token":"{b}","payload":{{"aps":{{}}}}}}"#);
    rig.broker
        .publish_all([job("f", &a), second.into_bytes()])
        .await;
    let results = rig.broker.results(2, WAIT).await;
    let apps: HashMap<String, String> = results
        .iter()
        .map(|r| {
            (
                r.body["id"].as_str().unwrap().to_owned(),
                r.body["app"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(apps["f"], "example");
    assert_eq!(apps["s"], "second");
    let counts = rig.accepted_counts();
    assert_eq!(
        (counts.get(&tok(&a)), counts.get(&tok(&b))),
        (Some(&1), Some(&1))
    );
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_what_happened() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let faults = Faults {
        refuse: vec![RefuseRule::parse("fc=8").unwrap()],
        ..Default::default()
    };
    let mut rig = rig(
        "metrics",
        Options {
            faults,
            extra: format!("[metrics]\nlisten = \"{addr}\"\n"),
            ..Default::default()
        },
    )
    .await;
    let tokens = rig
        .burst(100, |i| {
            if i % 10 == 0 {
                token(0xfc, i)
            } else {
                token(0x0c, i)
            }
        })
        .await;
    rig.broker.results(10, WAIT).await;
    rig.wait_acked(100).await;
    let (status, _) = http_get(&addr, "/readyz").await;
    assert!(status.contains("200"), "{status}");
    let (status, body) = http_get(&addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(metric(&body, "apnsd_jobs_consumed_total"), 100);
    assert_eq!(metric(&body, "apnsd_jobs_acked_total"), 100);
    assert_eq!(
        metric(&body, "apnsd_notifications_accepted_total"),
        rig.sim.accepted_count()
    );
    assert_eq!(rig.sim.accepted_count(), 90);
    assert_eq!(
        metric(
            &body,
            "apnsd_notifications_failed_by_reason_total{reason=\"invalid_token\"}"
        ),
        10
    );
    assert_eq!(metric(&body, "apnsd_consume_to_accepted_seconds_count"), 90);
    assert_eq!(tokens.len(), 100);
    assert!(http_get(&addr, "/healthz").await.0.contains("200"));
    rig.finish().await;
}
