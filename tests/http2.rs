//! The HTTP/2 transport end to end, in-process: the real RabbitMQ, the
//! simulator's HTTP/2 endpoint over TLS with ALPN h2, client certificates
//! or provider tokens.

mod common;

use apnsd::config::Config;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

use apnsd::apns::http2::ApnsReason;
use apnsd::simulator::{AnswerRule, Faults, SimCerts, Simulator, SimulatorOptions};
use common::rig::*;
use common::*;

#[derive(Clone, Copy, PartialEq)]
enum Auth {
    Certificate,
    Token,
}

struct Options {
    auth: Auth,
    faults: Faults,
    delivered: bool,
    /// The app's `request_timeout` and `ping_interval` lines.
    timing: &'static str,
    /// Lines after the app's keys: more keys, or more `[[apps]]` (with
    /// `{dir}`, `{gateway}` and `{feedback}` filled in).
    app: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth: Auth::Certificate,
            faults: Faults::default(),
            delivered: true,
            timing: "request_timeout = \"5s\"\nping_interval = \"1s\"\n",
            app: "",
        }
    }
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
    let d = dir.path().display();
    let auth = auth_toml(opts.auth, dir.path());
    let toml = format!(
        r#"shutdown_timeout = "10s"
{amqp}
[results]
delivered = {delivered}

[[apps]]
name = "example"
environment = "simulator"
protocol = "http2"
endpoint = "{endpoint}"
ca = "{d}/ca.pem"
connections = 2
reconnect_min = "10ms"
reconnect_max = "200ms"
{timing}{auth}{extra}
"#,
        amqp = broker.amqp_toml(5000),
        delivered = opts.delivered,
        endpoint = sim.http2_addr(),
        timing = opts.timing,
        extra = opts
            .app
            .replace("{dir}", &d.to_string())
            .replace("{gateway}", &sim.gateway_addr().to_string())
            .replace("{feedback}", &sim.feedback_addr().to_string()),
    );
    Rig::start(broker, sim, dir, &toml).await
}

/// The app's identity lines: the simulator's client certificate, or its
/// provider-token key.
fn auth_toml(auth: Auth, dir: &std::path::Path) -> String {
    let d = dir.display();
    match auth {
        Auth::Certificate => {
            format!("certificate = \"{d}/client.p12\"\npassword = \"simulator\"\n")
        }
        Auth::Token => format!(
            "key_file = \"{d}/token-key.p8\"\nkey_id = \"SIMKEY0001\"\nteam_id = \"SIMTEAM001\"\ntopic = \"com.example.app\"\n"
        ),
    }
}

fn answer(rule: &str) -> AnswerRule {
    AnswerRule::parse(rule).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_over_http2_with_a_client_certificate() {
    let mut rig = rig("h2happy", Options::default()).await;
    let tokens = rig.burst(300, |i| token(0x01, i)).await;
    let results = rig.broker.results(300, WAIT).await;
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    rig.wait_acked(300).await;
    rig.assert_once(&tokens);
    let first = rig
        .sim
        .accepted()
        .into_iter()
        .find(|a| a.token == tok(&tokens[0]))
        .unwrap();
    assert_eq!(first.payload, br#"{"aps":{"alert":"hello j0"}}"#);
    let meta = first.http2.unwrap();
    assert_eq!(meta.topic, "com.example.app");
    assert_eq!(meta.push_type.as_deref(), Some("alert"));
    assert_eq!(meta.apns_id.map(|id| id.len()), Some(36));
    assert!(!meta.token_auth);
    let stats = rig.finish().await;
    assert_eq!((stats.jobs_acked, stats.accepted), (300, 300));
    assert_eq!(stats.resent_after_close, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_is_accepted_and_an_expired_token_is_refreshed() {
    let faults = Faults {
        token_max_age: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let mut rig = rig(
        "h2jwt",
        Options {
            auth: Auth::Token,
            faults,
            ..Default::default()
        },
    )
    .await;
    let first = rig.burst(50, |i| token(0x02, i)).await;
    rig.broker.results(50, WAIT).await;
    assert!(rig
        .sim
        .accepted()
        .iter()
        .all(|a| a.http2.as_ref().unwrap().token_auth));
    // Let the token grow older than the simulator allows.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = rig.burst(50, |i| token(0x03, i)).await;
    let results = rig.broker.results(50, WAIT).await;
    assert!(
        results.iter().all(|r| r.routing_key == "delivered"),
        "{results:?}"
    );
    rig.wait_acked(100).await;
    rig.assert_once(&first);
    rig.assert_once(&second);
    let expired = rig
        .sim
        .http2_refused()
        .iter()
        .filter(|r| r.2 == ApnsReason::ExpiredProviderToken)
        .count();
    assert!(expired > 0, "the old token was refused");
    let stats = rig.finish().await;
    assert_eq!(stats.failed, 0);
    assert_eq!(stats.retried, expired as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_fail_with_apples_reason_and_the_rest_arrive_once() {
    let faults = Faults {
        answer: vec![answer("ee=400:BadDeviceToken")],
        ..Default::default()
    };
    let mut rig = rig(
        "h2bad",
        Options {
            faults,
            delivered: false,
            ..Default::default()
        },
    )
    .await;
    let tokens = rig
        .burst(500, |i| {
            if i % 10 == 3 {
                token(0xee, i)
            } else {
                token(0x04, i)
            }
        })
        .await;
    let results = rig.broker.results(50, WAIT).await;
    rig.wait_acked(500).await;
    assert!(rig
        .broker
        .no_more_results(Duration::from_millis(300))
        .await
        .is_empty());
    for r in &results {
        assert_eq!(r.routing_key, "failed.bad_device_token");
        assert_eq!(r.body["status"], 400);
        assert_eq!(r.body["reason"], "bad_device_token");
        assert_eq!(r.body["attempts"], 1);
        assert!(r.body["token"].as_str().unwrap().starts_with("ee"));
    }
    let good: Vec<String> = tokens
        .into_iter()
        .filter(|t| !t.starts_with("ee"))
        .collect();
    rig.assert_once(&good);
    let stats = rig.finish().await;
    assert_eq!(stats.failed, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_tokens_give_failed_unregistered_and_an_unregistered_result() {
    let faults = Faults {
        answer: vec![answer("0410=410:Unregistered")],
        ..Default::default()
    };
    let mut rig = rig(
        "h2gone",
        Options {
            faults,
            delivered: false,
            ..Default::default()
        },
    )
    .await;
    let gone = format!("0410{}", "ab".repeat(30));
    let live = token(0x05, 1);
    let body = serde_json::json!({
        "id": "fan", "tokens": [live, gone], "payload": {"aps": {"alert": "x"}},
    });
    rig.broker
        .publish_all([serde_json::to_vec(&body).unwrap()])
        .await;
    let results = by_key(&rig.broker.results(2, WAIT).await);
    rig.wait_acked(1).await;
    let failed = &results["failed.unregistered"][0];
    assert_eq!(failed["status"], 410);
    assert_eq!(failed["token"], gone);
    assert_eq!(failed["id"], "fan");
    let unregistered = &results["unregistered"][0];
    assert_eq!(unregistered["token"], gone);
    assert_eq!(unregistered["app"], "example");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts = unregistered["timestamp"].as_u64().unwrap();
    assert!(
        ts <= now && now - ts < 120,
        "timestamp {ts} is APNs' time in seconds"
    );
    rig.assert_once(&[live]);
    let stats = rig.finish().await;
    assert_eq!((stats.jobs_acked, stats.results_published), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_are_retried_then_reported() {
    let faults = Faults {
        answer: vec![
            answer("29=429:TooManyRequests"),
            answer("50=500:InternalServerError"),
        ],
        ..Default::default()
    };
    let mut rig = rig(
        "h2retry",
        Options {
            faults,
            delivered: false,
            ..Default::default()
        },
    )
    .await;
    let (throttled, broken) = (token(0x29, 1), token(0x50, 2));
    rig.broker
        .publish_all([
            job("t1", &throttled),
            job("t2", &broken),
            job("t3", &token(0x06, 3)),
        ])
        .await;
    let results = by_key(&rig.broker.results(2, WAIT).await);
    rig.wait_acked(3).await;
    let r = &results["failed.too_many_requests"][0];
    assert_eq!(
        (r["status"].as_u64(), r["attempts"].as_u64()),
        (Some(429), Some(3))
    );
    let r = &results["failed.internal_server_error"][0];
    assert_eq!(
        (r["status"].as_u64(), r["attempts"].as_u64()),
        (Some(500), Some(3))
    );
    let tries = |t: &str| {
        rig.sim
            .http2_refused()
            .iter()
            .filter(|r| r.0 == tok(t))
            .count()
    };
    assert_eq!((tries(&throttled), tries(&broken)), (3, 3));
    let stats = rig.finish().await;
    assert_eq!(stats.retried, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_mid_burst_loses_nothing() {
    let faults = Faults {
        goaway_every: Some(40),
        ..Default::default()
    };
    let mut rig = rig(
        "h2goaway",
        Options {
            faults,
            ..Default::default()
        },
    )
    .await;
    // Two waves: the second finds the first's connection gone away.
    let mut tokens = Vec::new();
    for wave in [0x07, 0x17] {
        tokens.extend(rig.burst(200, |i| token(wave, i)).await);
        let results = rig.broker.results(200, WAIT).await;
        assert!(results.iter().all(|r| r.routing_key == "delivered"));
    }
    rig.wait_acked(400).await;
    assert!(rig.sim.connections() > 2, "GOAWAY closed connections");
    // GOAWAY names the last stream processed: what followed was refused
    // unprocessed and sent again, so nothing arrives twice either.
    rig.assert_once(&tokens);
    let stats = rig.finish().await;
    assert_eq!(stats.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_limit_of_one_is_honoured() {
    let faults = Faults {
        max_streams: Some(1),
        ..Default::default()
    };
    let mut rig = rig(
        "h2streams",
        Options {
            faults,
            ..Default::default()
        },
    )
    .await;
    let tokens = rig.burst(200, |i| token(0x08, i)).await;
    rig.broker.results(200, WAIT).await;
    rig.wait_acked(200).await;
    rig.assert_once(&tokens);
    let stats = rig.finish().await;
    // A stream beyond the limit would have been refused and sent again.
    assert_eq!(stats.resent_after_error, 0);
    assert_eq!(stats.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_is_found_by_ping_and_replaced() {
    let faults = Faults {
        stall_after: Some(20),
        ..Default::default()
    };
    let mut rig = rig(
        "h2stall",
        Options {
            faults,
            app: "max_attempts = 20\n",
            ..Default::default()
        },
    )
    .await;
    let tokens = rig.burst(100, |i| token(0x09, i)).await;
    // Stalls are counted per app, whichever lane saw them.
    let stalls = rig.daemon.stats.lane("example", 0).stalls;
    eventually(WAIT, "a dead connection detected", || stalls.get() > 0).await;
    rig.sim.set_faults(Faults::default());
    let results = rig.broker.results(100, WAIT).await;
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    rig.wait_acked(100).await;
    let counts = rig.accepted_counts();
    assert!(tokens.iter().all(|t| counts.contains_key(&tok(t))));
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_times_out_and_goes_again_on_a_new_connection() {
    let faults = Faults {
        stall_after: Some(10),
        ..Default::default()
    };
    let mut rig = rig(
        "h2timeout",
        Options {
            faults,
            // PING would find the stall only after an hour: the timeout must.
            timing: "ping_interval = \"1h\"\nrequest_timeout = \"500ms\"\n",
            app: "max_attempts = 20\n",
            ..Default::default()
        },
    )
    .await;
    let mut tokens = rig.burst(10, |i| token(0x0e, i)).await;
    rig.broker.results(10, WAIT).await;
    // The simulator stops driving its connections within 50 ms of the tenth.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokens.extend(rig.burst(40, |i| token(0x1e, i)).await);
    let stats = rig.daemon.stats.clone();
    eventually(WAIT, "a request timed out", || {
        stats.resent_after_close.get() > 0
    })
    .await;
    rig.sim.set_faults(Faults::default());
    let results = rig.broker.results(40, WAIT).await;
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    rig.wait_acked(50).await;
    let counts = rig.accepted_counts();
    assert!(tokens.iter().all(|t| counts.contains_key(&tok(t))));
    assert!(
        rig.sim.connections() > 2,
        "the stalled connection was replaced"
    );
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_apply_to_jobs() {
    let mut rig = rig("h2limits", Options::default()).await;
    let long_token = "cd".repeat(100);
    let fits = "x".repeat(4000);
    let voip = "v".repeat(5000);
    let ok = [
        serde_json::json!({"id": "long", "token": long_token, "payload": {"aps": {}}}),
        serde_json::json!({"id": "big", "token": token(0x0a, 1), "payload": {"aps": {"alert": fits}}}),
        serde_json::json!({"id": "voip", "token": token(0x0a, 2), "push_type": "voip",
            "collapse_id": "call-1", "payload": {"aps": {}, "v": voip}}),
    ];
    let bad = [
        (
            serde_json::json!({"id": "b1", "token": "ab".repeat(101), "payload": {"aps": {}}}),
            "at most 200",
        ),
        (
            serde_json::json!({"id": "b2", "token": token(0x0a, 3), "payload": {"aps": {"alert": voip}}}),
            "limit is 4096",
        ),
        (
            serde_json::json!({"id": "b3", "token": token(0x0a, 4), "push_type": 1, "payload": {"aps": {}}}),
            "`push_type`",
        ),
    ];
    rig.broker
        .publish_all(
            ok.iter()
                .chain(bad.iter().map(|(b, _)| b))
                .map(|b| serde_json::to_vec(b).unwrap()),
        )
        .await;
    let results = rig.broker.results(6, WAIT).await;
    rig.wait_acked(6).await;
    let keys = by_key(&results);
    assert_eq!(keys["delivered"].len(), 3);
    for (body, needle) in &bad {
        let r = keys["rejected"]
            .iter()
            .find(|r| r["id"] == body["id"])
            .unwrap();
        let error = r["error"].as_str().unwrap();
        assert!(
            error.contains(needle),
            "{error:?} should mention {needle:?}"
        );
    }
    let voip = rig
        .sim
        .accepted()
        .into_iter()
        .find(|a| a.token == tok(&token(0x0a, 2)))
        .unwrap();
    let meta = voip.http2.unwrap();
    assert_eq!(meta.topic, "com.example.app.voip");
    assert_eq!(meta.collapse_id.as_deref(), Some("call-1"));
    assert!(rig.accepted_counts().contains_key(&tok(&long_token)));
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_over_http2() {
    let mut rig = rig(
        "h2fanout",
        Options {
            delivered: false,
            ..Default::default()
        },
    )
    .await;
    let tokens: Vec<String> = (0..3000).map(|i| token(0x0b, i)).collect();
    let body =
        serde_json::json!({"id": "fan", "tokens": tokens, "payload": {"aps": {"alert": "all"}}});
    rig.broker
        .publish_all([serde_json::to_vec(&body).unwrap()])
        .await;
    rig.wait_acked(1).await;
    rig.assert_once(&tokens);
    assert!(rig
        .broker
        .no_more_results(Duration::from_millis(300))
        .await
        .is_empty());
    let stats = rig.finish().await;
    assert_eq!(stats.accepted, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_http2_apps_side_by_side_keep_their_own_limits() {
    let legacy = r#"
[[apps]]
name = "legacy"
environment = "simulator"
certificate = "{dir}/client.p12"
password = "simulator"
ca = "{dir}/ca.pem"
gateway = "{gateway}"
feedback = "{feedback}"
settle = "100ms"
"#;
    let mut rig = rig(
        "h2mixed",
        Options {
            app: legacy,
            ..Default::default()
        },
    )
    .await;
    let long = "ef".repeat(40);
    let short = token(0x0c, 1);
    let jobs = [
        serde_json::json!({"id": "h2", "token": long, "payload": {"aps": {}}}),
        serde_json::json!({"id": "bin", "app": "legacy", "token": short, "payload": {"aps": {}}}),
        serde_json::json!({"id": "bad", "app": "legacy", "token": long, "payload": {"aps": {}}}),
    ];
    rig.broker
        .publish_all(jobs.iter().map(|j| serde_json::to_vec(j).unwrap()))
        .await;
    let results = by_key(&rig.broker.results(3, WAIT).await);
    rig.wait_acked(3).await;
    let mut delivered: Vec<(&str, &str)> = results["delivered"]
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["app"].as_str().unwrap()))
        .collect();
    delivered.sort();
    assert_eq!(delivered, [("bin", "legacy"), ("h2", "example")]);
    let rejected = &results["rejected"][0];
    assert_eq!(rejected["id"], "bad");
    let error = rejected["error"].as_str().unwrap();
    assert!(
        error.contains("binary interface takes exactly 32"),
        "{error}"
    );
    let accepted = rig.sim.accepted();
    let via = |t: &str| {
        accepted
            .iter()
            .find(|a| a.token == tok(t))
            .map(|a| a.http2.is_some())
    };
    assert_eq!((via(&long), via(&short)), (Some(true), Some(false)));
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_simulator_speaks_http2_too() {
    apnsd::apns::tls::install_crypto_provider();
    let mut broker = Broker::new("h2builtin").await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[results]\ndelivered = true\n[[apps]]\nname = \"example\"\nenvironment = \"simulator\"\nprotocol = \"http2\"\n",
        broker.amqp_toml(100)
    );
    let path = dir.path().join("apnsd.toml");
    std::fs::write(&path, toml).unwrap();
    let shutdown = CancellationToken::new();
    let daemon = apnsd::startup::start(Config::load(&path).unwrap(), shutdown.clone())
        .await
        .unwrap();
    broker
        .publish_all((0..20).map(|i| job(&format!("j{i}"), &token(0x0d, i))))
        .await;
    let results = broker.results(20, WAIT).await;
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    let stats = daemon.stats().clone();
    eventually(WAIT, "every job acked", || stats.jobs_acked.get() == 20).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, daemon.wait()).await.unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_an_app_to_token_auth_without_losing_work() {
    let mut rig = rig("h2reload", Options::default()).await;
    let mut tokens = rig.burst(200, |i| token(0x0f, i)).await;
    let path = rig.dir.path().join("apnsd.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &auth_toml(Auth::Certificate, rig.dir.path()),
        &auth_toml(Auth::Token, rig.dir.path()),
    );
    std::fs::write(&path, text).unwrap();
    let done = rig
        .daemon
        .reload(Config::load(&path).unwrap())
        .await
        .unwrap();
    assert_eq!(done.replaced, ["example"]);
    let second = rig.burst(200, |i| token(0x1f, i)).await;
    tokens.extend(second.iter().cloned());
    let results = rig.broker.results(400, WAIT).await;
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    rig.wait_acked(400).await;
    let accepted = rig.sim.accepted();
    for t in &tokens {
        assert!(accepted.iter().any(|a| a.token == tok(t)), "token {t} lost");
    }
    let by_token = accepted
        .iter()
        .filter(|a| second.iter().any(|t| a.token == tok(t)));
    assert!(
        by_token.clone().count() >= 200
            && by_token
                .clone()
                .all(|a| a.http2.as_ref().unwrap().token_auth),
        "jobs published after the reload use the provider token"
    );
    rig.finish().await;
}
