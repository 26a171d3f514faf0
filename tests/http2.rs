//! The HTTP/2 transport end to end, in-process: the real RabbitMQ, the
//! simulator's HTTP/2 endpoint over TLS with ALPN h2, client certificates
//! or provider tokens. What only HTTP/2 has is here; the scenarios both
//! protocols share run for it in `pipeline.rs`.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::rig::*;
use common::*;

fn answer(rule: &str) -> AnswerRule {
    AnswerRule::parse(rule).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_is_accepted_and_an_expired_token_is_refreshed() {
    let faults = Faults {
        token_max_age: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let mut rig = Rig::builder("h2jwt", Protocol::Http2)
        .auth(Auth::Token)
        .faults(faults)
        .delivered()
        .start()
        .await;
    let first = rig.burst(50, |i| token(0x02, i)).await;
    rig.broker.results(50, WAIT).await;
    assert!(rig
        .sim
        .accepted()
        .iter()
        .all(|a| a.http2.as_ref().unwrap().token_auth));
    // Let the token grow older than the simulator allows: the passing of
    // time is the scenario here, not a wait for something to happen.
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
async fn gone_tokens_give_failed_unregistered_and_an_unregistered_result() {
    let faults = Faults {
        answer: vec![answer("0410=410:Unregistered")],
        ..Default::default()
    };
    let mut rig = Rig::builder("h2gone", Protocol::Http2)
        .faults(faults)
        .start()
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
async fn a_stream_limit_of_one_is_honoured() {
    let faults = Faults {
        max_streams: Some(1),
        ..Default::default()
    };
    let mut rig = Rig::builder("h2streams", Protocol::Http2)
        .faults(faults)
        .delivered()
        .start()
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
    let mut rig = Rig::builder("h2stall", Protocol::Http2)
        .faults(faults)
        .keys("max_attempts = 20")
        .delivered()
        .start()
        .await;
    let tokens = rig.burst(100, |i| token(0x09, i)).await;
    // Stalls are counted per app, whichever lane saw them.
    let stalls = rig.stats().lane("example", 0).stalls;
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
    let mut rig = Rig::builder("h2timeout", Protocol::Http2)
        .faults(faults)
        // PING would find the stall only after an hour: the timeout must.
        .keys("ping_interval = \"1h\"\nrequest_timeout = \"500ms\"\nmax_attempts = 20")
        .delivered()
        .start()
        .await;
    let mut tokens = rig.burst(10, |i| token(0x0e, i)).await;
    rig.broker.results(10, WAIT).await;
    // The ten results say the simulator accepted ten: from there on it
    // drives each connection at most once more (one more request), so what
    // follows waits for an answer that never comes.
    tokens.extend(rig.burst(40, |i| token(0x1e, i)).await);
    let stats = rig.stats();
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
    let mut rig = Rig::builder("h2limits", Protocol::Http2)
        .delivered()
        .start()
        .await;
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
async fn binary_and_http2_apps_side_by_side_keep_their_own_limits() {
    let mut rig = Rig::builder("h2mixed", Protocol::Http2)
        .app(App::new("legacy", Protocol::Binary).keys("settle = \"100ms\""))
        .delivered()
        .start()
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
    let mut broker = Broker::new("h2builtin").await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[results]\ndelivered = true\n[[apps]]\nname = \"example\"\nenvironment = \"simulator\"\nprotocol = \"http2\"\n",
        broker.amqp_toml(100)
    );
    let path = dir.path().join("apnsd.toml");
    std::fs::write(&path, toml).unwrap();
    let (daemon, shutdown) = start_with_builtin(&path).await;
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
    let mut rig = Rig::builder("h2reload", Protocol::Http2)
        .delivered()
        .start()
        .await;
    let mut tokens = rig.burst(200, |i| token(0x0f, i)).await;
    let path = rig.config_path();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &Auth::Certificate.toml("", "client"),
        &Auth::Token.toml("", "client"),
    );
    std::fs::write(&path, text).unwrap();
    let done = rig.reload().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_unacked_counts_what_the_broker_holds_against_the_prefetch() {
    // Answers take a while: the broker hands over its prefetch of five, and
    // no more until acks free slots.
    let rig = Rig::builder("h2unacked", Protocol::Http2)
        .prefetch(5)
        .delay(Duration::from_millis(300))
        .start()
        .await;
    let stats = rig.stats();
    let tokens = rig.burst(20, |i| token(0x21, i)).await;
    eventually(WAIT, "the prefetch taken", || {
        stats.jobs_unacked.get() == 5 && stats.jobs_in_flight.get() == 5
    })
    .await;
    assert!(
        rig.broker.queue_depth().await >= 10,
        "the rest waits in the queue"
    );
    rig.wait_acked(20).await;
    eventually(WAIT, "nothing left unacked", || {
        stats.jobs_unacked.get() == 0
    })
    .await;
    rig.assert_once(&tokens);
    rig.finish().await;
}
