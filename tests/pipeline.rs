//! The daemon's main path, in-process, against the real RabbitMQ and the
//! simulator over real TLS with client certificates. The scenarios every
//! protocol must pass run once for the binary interface and once for
//! HTTP/2; what only one of them has follows (HTTP/2's own in `http2.rs`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::process::{http_get, metric};
use common::rig::*;
use common::*;

both_protocols!(
    happy_path_delivers_each_notification_once,
    bad_tokens_mid_burst_are_reported_and_the_rest_delivered_once,
    transient_refusals_are_retried_then_reported,
    graceful_closes_mid_burst_lose_nothing_and_duplicate_nothing,
    a_fan_out_job_reaches_every_token_once,
    message_id_stands_in_for_a_missing_id,
    two_apps_in_one_process,
    metrics_endpoint_counts_what_happened,
);

/// A refusal the simulator makes of every token beginning with one byte, in
/// one protocol's terms, and the result the daemon reports for it.
struct Refusal {
    protocol: Protocol,
    first: u8,
    status: u64,
    /// The result's reason, as in its routing key `failed.<reason>`.
    reason: &'static str,
}

impl Refusal {
    /// A token the gateway refuses for good.
    fn bad_token(protocol: Protocol, first: u8) -> Refusal {
        let (status, reason) = match protocol {
            Protocol::Binary => (8, "invalid_token"),
            Protocol::Http2 => (400, "bad_device_token"),
        };
        Refusal {
            protocol,
            first,
            status,
            reason,
        }
    }

    /// Refusals worth another try: a processing error; throttling and a
    /// server error over HTTP/2.
    fn transient(protocol: Protocol) -> Vec<Refusal> {
        let kinds: &[(u8, u64, &str)] = match protocol {
            Protocol::Binary => &[(0xee, 1, "processing_error")],
            Protocol::Http2 => &[
                (0x29, 429, "too_many_requests"),
                (0x50, 500, "internal_server_error"),
            ],
        };
        kinds
            .iter()
            .map(|&(first, status, reason)| Refusal {
                protocol,
                first,
                status,
                reason,
            })
            .collect()
    }

    fn routing_key(&self) -> String {
        format!("failed.{}", self.reason)
    }

    /// The simulator's faults that make these refusals.
    fn faults(refusals: &[Refusal]) -> Faults {
        let mut faults = Faults::default();
        for r in refusals {
            let prefix = format!("{:02x}", r.first);
            match r.protocol {
                Protocol::Binary => faults
                    .refuse
                    .push(RefuseRule::parse(&format!("{prefix}={}", r.status)).unwrap()),
                Protocol::Http2 => {
                    // Apple's reason: `bad_device_token` is `BadDeviceToken`.
                    let apple: String = r
                        .reason
                        .split('_')
                        .map(|w| w[..1].to_uppercase() + &w[1..])
                        .collect();
                    let rule = format!("{prefix}={}:{apple}", r.status);
                    faults.answer.push(AnswerRule::parse(&rule).unwrap());
                }
            }
        }
        faults
    }
}

async fn happy_path_delivers_each_notification_once(protocol: Protocol) {
    let mut rig = Rig::builder("happy", protocol).delivered().start().await;
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
    rig.assert_once(&tokens);
    let accepted = rig.sim.accepted();
    let first = accepted
        .iter()
        .find(|a| a.token == tok(&tokens[0]))
        .unwrap();
    assert_eq!(first.payload, br#"{"aps":{"alert":"hello j0"}}"#);
    match protocol {
        Protocol::Binary => {
            let on_its_connection = accepted
                .iter()
                .find(|a| a.connection == first.connection)
                .unwrap();
            assert_eq!(
                on_its_connection.token, first.token,
                "the first job arrived first on its connection"
            );
            assert!(first.http2.is_none());
        }
        Protocol::Http2 => {
            let meta = first.http2.clone().unwrap();
            assert_eq!(meta.topic, "com.example.app");
            assert_eq!(meta.push_type.as_deref(), Some("alert"));
            assert_eq!(meta.apns_id.map(|id| id.len()), Some(36));
            assert!(!meta.token_auth);
        }
    }
    let stats = rig.finish().await;
    assert_eq!((stats.jobs_acked, stats.accepted), (300, 300));
    assert_eq!(stats.resent_after_close, 0);
}

async fn bad_tokens_mid_burst_are_reported_and_the_rest_delivered_once(protocol: Protocol) {
    let bad = Refusal::bad_token(protocol, 0xff);
    let mut rig = Rig::builder("badtokens", protocol)
        .faults(Refusal::faults(std::slice::from_ref(&bad)))
        .start()
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
        assert_eq!(r.routing_key, bad.routing_key());
        assert_eq!(r.body["status"], bad.status);
        assert_eq!(r.body["reason"], bad.reason);
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
    assert_eq!(stats.failed, 50);
    assert_eq!(stats.resent_after_close, 0);
    if protocol == Protocol::Binary {
        // The binary interface answers only errors, closing the connection.
        assert!(
            stats.resent_after_error > 0,
            "tokens after each bad one were resent"
        );
    }
}

async fn transient_refusals_are_retried_then_reported(protocol: Protocol) {
    let refusals = Refusal::transient(protocol);
    let mut rig = Rig::builder("transient", protocol)
        .faults(Refusal::faults(&refusals))
        .start()
        .await;
    let refused: Vec<String> = (1..)
        .zip(&refusals)
        .map(|(i, r)| token(r.first, i))
        .collect();
    let good = token(0x03, 9);
    let all = [&refused[..], std::slice::from_ref(&good)].concat();
    rig.publish(&all).await;
    let results = by_key(&rig.broker.results(refused.len(), WAIT).await);
    rig.wait_acked(all.len() as u64).await;
    for (r, t) in refusals.iter().zip(&refused) {
        let result = &results[&r.routing_key()][0];
        assert_eq!(result["token"], *t);
        assert_eq!(
            (result["status"].as_u64(), result["attempts"].as_u64()),
            (Some(r.status), Some(3))
        );
        assert_eq!(rig.refusals(t), 3, "{t} tried three times");
    }
    rig.assert_once(&[good]);
    let stats = rig.finish().await;
    assert_eq!(stats.retried, 2 * refused.len() as u64);
}

/// The gateway closes connections mid-burst the way its protocol allows: a
/// binary shutdown notice, an HTTP/2 GOAWAY. Each names the last notification
/// it processed, so what followed is sent again and nothing arrives twice.
async fn graceful_closes_mid_burst_lose_nothing_and_duplicate_nothing(protocol: Protocol) {
    let faults = match protocol {
        Protocol::Binary => Faults {
            shutdown_every: Some(250),
            ..Default::default()
        },
        Protocol::Http2 => Faults {
            goaway_every: Some(40),
            ..Default::default()
        },
    };
    let mut rig = Rig::builder("closes", protocol)
        .faults(faults)
        .delivered()
        .start()
        .await;
    // Two waves: the second finds the first's connections closed.
    let mut tokens = Vec::new();
    for wave in [0x04, 0x14] {
        tokens.extend(rig.burst(500, |i| token(wave, i)).await);
        let results = rig.broker.results(500, WAIT).await;
        assert!(results.iter().all(|r| r.routing_key == "delivered"));
    }
    rig.wait_acked(1000).await;
    assert!(rig.sim.connections() > 2, "the gateway closed connections");
    rig.assert_once(&tokens);
    let stats = rig.finish().await;
    assert_eq!(stats.failed, 0);
    if protocol == Protocol::Binary {
        assert_eq!(stats.resent_after_close, 0);
    }
}

/// One job for many tokens, one in a thousand refused: 10,000 over the
/// binary interface, 3,000 over HTTP/2 (a stream each, on a shared machine).
async fn a_fan_out_job_reaches_every_token_once(protocol: Protocol) {
    let n: u32 = match protocol {
        Protocol::Binary => 10_000,
        Protocol::Http2 => 3_000,
    };
    let bad = Refusal::bad_token(protocol, 0xfd);
    let mut rig = Rig::builder("fanout", protocol)
        .faults(Refusal::faults(std::slice::from_ref(&bad)))
        .start()
        .await;
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            if i % 1000 == 500 {
                token(0xfd, i)
            } else {
                token(0x09, i)
            }
        })
        .collect();
    let refused = u64::from(n / 1000);
    let good = u64::from(n) - refused;
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "broadcast", "tokens": tokens, "payload": {"aps": {"alert": "all"}}
    }))
    .unwrap();
    rig.broker.publish_all([body]).await;
    let results = rig.broker.results(refused as usize, WAIT).await;
    assert!(results
        .iter()
        .all(|r| r.routing_key == bad.routing_key() && r.body["id"] == "broadcast"));
    rig.wait_acked(1).await;
    let counts = rig.accepted_counts();
    assert_eq!(counts.len() as u64, good);
    assert!(counts.values().all(|&n| n == 1));
    assert!(rig
        .broker
        .no_more_results(Duration::from_millis(300))
        .await
        .is_empty());
    let stats = rig.finish().await;
    assert_eq!((stats.jobs_acked, stats.accepted), (1, good));
}

async fn message_id_stands_in_for_a_missing_id(protocol: Protocol) {
    let mut rig = Rig::builder("messageid", protocol)
        .delivered()
        .start()
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

async fn two_apps_in_one_process(protocol: Protocol) {
    let mut rig = Rig::builder("twoapps", protocol)
        .delivered()
        .app(App::new("second", protocol).keys("connections = 1"))
        .start()
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

async fn metrics_endpoint_counts_what_happened(protocol: Protocol) {
    let addr = format!("127.0.0.1:{}", common::process::free_port());
    let bad = Refusal::bad_token(protocol, 0xfc);
    let mut rig = Rig::builder("metrics", protocol)
        .faults(Refusal::faults(std::slice::from_ref(&bad)))
        .section(&format!("[metrics]\nlisten = \"{addr}\"\n"))
        .start()
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
    let failed = format!(
        "apnsd_notifications_failed_by_reason_total{{reason=\"{}\"}}",
        bad.reason
    );
    assert_eq!(metric(&body, &failed), 10);
    assert_eq!(metric(&body, "apnsd_consume_to_accepted_seconds_count"), 90);
    assert_eq!(tokens.len(), 100);
    assert!(http_get(&addr, "/healthz").await.0.contains("200"));
    rig.finish().await;
}

// What only the binary interface has.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_close_mid_burst_loses_nothing_and_counts_duplicates() {
    let faults = Faults {
        close_every: Some(200),
        ..Default::default()
    };
    let rig = Rig::builder("silentclose", Protocol::Binary)
        .faults(faults)
        .start()
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
    let mut rig = Rig::builder("rejected", Protocol::Binary).start().await;
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
async fn feedback_service_tokens_become_unregistered_results() {
    let gone = tok(&token(0x08, 1));
    let mut rig = Rig::builder("feedback", Protocol::Binary)
        .feedback(gone, 1_700_000_000)
        .start()
        .await;
    let results = rig.broker.results(1, WAIT).await;
    assert_eq!(results[0].routing_key, "unregistered");
    assert_eq!(results[0].body["token"], gone.to_hex());
    assert_eq!(results[0].body["timestamp"], 1_700_000_000);
    assert_eq!(results[0].body["app"], "example");
    let stats = rig.finish().await;
    assert_eq!(stats.feedback_tokens, 1);
}
