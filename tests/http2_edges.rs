//! HTTP/2 edge cases found by probing (issue 17, item 4), in-process against
//! the real RabbitMQ and the simulator: streams the server always refuses,
//! provider tokens called expired in a burst or always, a connection whose
//! streams never complete, the simulator's response delay, and an app's
//! connections growing under load and shrinking when idle (item 2).
//!
//! Log lines are part of what is checked: each test names its app after
//! itself and counts only the lines of that app in the binary's capture.

mod common;

use std::time::{Duration, Instant};

use apnsd::simulator::StreamRule;
use common::logs::{capture, Line};
use common::rig::*;
use common::*;

const MINTING: &str = "APNs says the provider token expired: minting a new one";
const CLOCK_OFF: &str = "APNs says a fresh provider token expired: the system clock may be off; \
                         the next token waits for the floor between mints";
const RETIRED: &str = "retired an HTTP/2 connection whose streams went unanswered";
const GROWN: &str = "every HTTP/2 stream is busy and work waits: opening another connection";
const SHRUNK: &str = "the load fits in fewer HTTP/2 connections: closing one";

/// The captured lines of app `app` with `message`.
fn log_lines(app: &str, message: &str) -> Vec<Line> {
    let lines = capture().lines(message).into_iter();
    lines
        .filter(|l| l.fields.get("app").map(String::as_str) == Some(app))
        .collect()
}

struct Setup {
    faults: Faults,
    delay: Duration,
    token_auth: bool,
    request_timeout: &'static str,
    /// More lines for the app.
    app: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            faults: Faults::default(),
            delay: Duration::ZERO,
            token_auth: false,
            request_timeout: "5s",
            app: "",
        }
    }
}

/// A daemon with one HTTP/2 app named `name` against a fresh simulator.
async fn rig(name: &str, setup: Setup) -> Rig {
    capture();
    let auth = if setup.token_auth {
        Auth::Token
    } else {
        Auth::Certificate
    };
    Rig::builder(name, Protocol::Http2)
        .name(name)
        .faults(setup.faults)
        .delay(setup.delay)
        .auth(auth)
        .delivered()
        .keys(&format!(
            "request_timeout = \"{}\"\n{}",
            setup.request_timeout, setup.app
        ))
        .start()
        .await
}

/// A token-auth app against a simulator that calls the first `expire`
/// provider tokens expired.
async fn token_rig(name: &str, expire: u32) -> Rig {
    let faults = Faults {
        expire_tokens: expire,
        ..Default::default()
    };
    let setup = Setup {
        faults,
        token_auth: true,
        ..Default::default()
    };
    rig(name, setup).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_every_time_pauses_then_fails_as_refused_stream() {
    let faults = Faults {
        refuse_streams: vec![StreamRule::parse("0a").unwrap()],
        ..Default::default()
    };
    let mut rig = rig(
        "edge-refused",
        Setup {
            faults,
            ..Default::default()
        },
    )
    .await;
    let refused = rig.burst(4, |i| token(0x0a, i)).await;
    let fine: Vec<String> = (0..20).map(|i| token(0x0b, i)).collect();
    rig.broker
        .publish_all(fine.iter().map(|t| job(&format!("ok-{t}"), t)))
        .await;
    let results = rig.broker.results(24, WAIT).await;
    let by = by_key(&results);
    assert_eq!(by.get("delivered").map(Vec::len), Some(20), "{by:?}");
    let failed = &by["failed.refused_stream"];
    assert_eq!(failed.len(), 4);
    for f in failed {
        assert!(refused.contains(&f["token"].as_str().unwrap().to_owned()));
        assert_eq!(f["attempts"], 3, "{f}");
    }
    // Three free resends, then three counted tries: six resets per token,
    // not a loop.
    let free = u64::from(apnsd::apns::http2::refused::FREE_REFUSALS);
    assert_eq!(rig.sim.streams_refused(), 4 * (free + 3));
    rig.wait_acked(24).await;
    rig.assert_once(&fine);
    let stats = rig.finish().await;
    assert_eq!(stats.failed, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_expiry_answers_mints_one_token_and_says_so_once() {
    let app = "edge-burst";
    let mut rig = token_rig(app, 1).await;
    // All sent with the first token at once: a burst of 403s comes back.
    let tokens = rig.burst(300, |i| token(0x0c, i)).await;
    let results = rig.broker.results(300, WAIT).await;
    assert!(
        results.iter().all(|r| r.routing_key == "delivered"),
        "{results:?}"
    );
    rig.wait_acked(300).await;
    rig.assert_once(&tokens);
    assert_eq!(
        rig.sim.provider_tokens().len(),
        2,
        "the expired token and one replacement"
    );
    let minted = log_lines(app, MINTING);
    assert_eq!(minted.len(), 1, "{minted:?}");
    assert_eq!(minted[0].number("tokens_minted"), 1);
    assert!(log_lines(app, CLOCK_OFF).is_empty());
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_apns_calls_off_mints_one_replacement_then_waits_and_says_so_once() {
    let app = "edge-skew";
    let mut rig = token_rig(app, u32::MAX).await;
    let tokens = rig.burst(20, |i| token(0x0d, i)).await;
    let results = rig.broker.results(20, WAIT).await;
    for r in &results {
        assert_eq!(r.routing_key, "failed.expired_provider_token", "{r:?}");
        assert_eq!(r.body["attempts"], 3);
    }
    rig.wait_acked(20).await;
    // Without a floor every answer minted another (8 in 0.65 s).
    assert_eq!(rig.sim.provider_tokens().len(), 2);
    assert_eq!(log_lines(app, MINTING).len(), 1);
    assert_eq!(log_lines(app, CLOCK_OFF).len(), 1);
    let counts = rig.accepted_counts();
    assert!(tokens.iter().all(|t| !counts.contains_key(&tok(t))));
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_streams_stall_in_flow_control_is_retired_with_a_count() {
    let app = "edge-window";
    let faults = Faults {
        stream_window: Some(0),
        ..Default::default()
    };
    let setup = Setup {
        faults,
        // PINGs are answered: only the request timeout finds the stall.
        request_timeout: "300ms",
        app: "max_attempts = 2\n",
        ..Default::default()
    };
    let mut rig = rig(app, setup).await;
    rig.burst(5, |i| token(0x0e, i)).await;
    let results = rig.broker.results(5, WAIT).await;
    assert!(
        results.iter().all(|r| r.routing_key == "failed.timeout"),
        "{results:?}"
    );
    rig.wait_acked(5).await;
    // Each retired connection says so once, counting its streams: two
    // tries of five notifications timed out in all.
    let mut lines = Vec::new();
    eventually(WAIT, "every retirement logged", || {
        lines = log_lines(app, RETIRED);
        lines.iter().map(|l| l.number("timed_out")).sum::<u64>() >= 10
    })
    .await;
    assert_eq!(lines.iter().map(|l| l.number("timed_out")).sum::<u64>(), 10);
    assert!(lines.len() <= 10, "{lines:?}");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_larger_than_the_stream_window_goes_out_as_the_server_opens_it() {
    // 100 bytes of window per stream: a 3 KB payload leaves in pieces, each
    // sent when the server's WINDOW_UPDATE comes.
    let faults = Faults {
        stream_window: Some(100),
        ..Default::default()
    };
    let setup = Setup {
        faults,
        ..Default::default()
    };
    let mut rig = rig("edge-small-window", setup).await;
    let tokens: Vec<String> = (0..20).map(|i| token(0x10, i)).collect();
    let alert = |i: usize| format!("{i:04}{}", "w".repeat(3000));
    let jobs = tokens.iter().enumerate().map(|(i, t)| {
        serde_json::to_vec(&serde_json::json!({
            "id": format!("w{i}"),
            "token": t,
            "payload": {"aps": {"alert": alert(i)}},
        }))
        .unwrap()
    });
    rig.broker.publish_all(jobs).await;
    let results = rig.broker.results(20, WAIT).await;
    assert!(
        results.iter().all(|r| r.routing_key == "delivered"),
        "{results:?}"
    );
    rig.wait_acked(20).await;
    rig.assert_once(&tokens);
    for accepted in rig.sim.accepted() {
        let i = tokens
            .iter()
            .position(|t| tok(t) == accepted.token)
            .unwrap();
        let payload: serde_json::Value = serde_json::from_slice(&accepted.payload).unwrap();
        assert_eq!(
            payload["aps"]["alert"],
            alert(i),
            "payload {i} arrived whole"
        );
    }
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_delay_leaves_the_connection_carrying_other_streams() {
    let delay = Duration::from_millis(200);
    let setup = Setup {
        delay,
        ..Default::default()
    };
    let mut rig = rig("edge-delay", setup).await;
    let started = Instant::now();
    let tokens = rig.burst(300, |i| token(0x0f, i)).await;
    let results = rig.broker.results(300, WAIT).await;
    let took = started.elapsed();
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    rig.wait_acked(300).await;
    rig.assert_once(&tokens);
    // One at a time, 300 answers would take a minute; side by side on the
    // app's two connections they take a few round trips.
    assert!(took >= delay, "{took:?}");
    assert!(took < delay * 30, "{took:?}");
    assert_eq!(rig.sim.connections(), 2);
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_one_write_buffer_of_large_payloads_go_out_in_one_round_trip() {
    // 300 payloads of 3.5 KB are about 1 MB: several fills of a connection's
    // write buffer. Each fill must be followed by the next as the socket takes
    // it, not by the first answer a round trip later (before, each round trip
    // carried one buffer's worth: five round trips here).
    let delay = Duration::from_millis(500);
    let setup = Setup {
        delay,
        app: "connections = 1\nmax_connections = 1\n",
        ..Default::default()
    };
    let mut rig = rig("edge-big-writes", setup).await;
    let tokens: Vec<String> = (0..300).map(|i| token(0x11, i)).collect();
    let job = serde_json::json!({
        "id": "big",
        "tokens": tokens,
        "payload": {"aps": {"alert": "b".repeat(3500)}},
    });
    let started = Instant::now();
    rig.broker
        .publish_all([serde_json::to_vec(&job).unwrap()])
        .await;
    let results = rig.broker.results(300, WAIT).await;
    let took = started.elapsed();
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    rig.wait_acked(1).await;
    rig.assert_once(&tokens);
    assert_eq!(rig.sim.connections(), 1);
    assert!(took >= delay, "{took:?}");
    assert!(
        took < delay * 3,
        "{took:?} for 300 streams of one connection"
    );
    rig.finish().await;
}

/// The value of gauge `name` for app `app`, from the Prometheus text.
fn gauge(stats: &apnsd::metrics::Stats, name: &str, app: &str) -> Option<u64> {
    let text = stats.render();
    let prefix = format!("{name}{{app=\"{app}\"}} ");
    let line = text.lines().find_map(|l| l.strip_prefix(&prefix))?;
    line.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_grow_while_every_stream_is_busy_and_shrink_when_idle() {
    let app = "edge-grow";
    capture();
    // One connection of 10 streams at 100 ms a round trip carries 100/s.
    let mut rig = Rig::builder(app, Protocol::Http2)
        .name(app)
        .delay(Duration::from_millis(100))
        .delivered()
        .keys(
            "connections = 1\nmax_connections = 4\nmax_concurrent_streams = 10\n\
             shrink_after = \"200ms\"",
        )
        .start()
        .await;
    let stats = rig.stats();
    assert_eq!(gauge(&stats, "apnsd_connections_max", app), Some(4));
    let tokens = rig.burst(400, |i| token(0x10, i)).await;
    let up = || gauge(&stats, "apnsd_connections_up", app).unwrap_or(0);
    let mut peak = 0;
    eventually(WAIT, "connections grown beyond `connections`", || {
        peak = peak.max(up());
        peak > 1
    })
    .await;
    let results = rig.broker.results(400, WAIT).await;
    assert!(
        results.iter().all(|r| r.routing_key == "delivered"),
        "{results:?}"
    );
    rig.wait_acked(400).await;
    rig.assert_once(&tokens);
    assert!(up() <= 4, "never beyond max_connections");
    assert!(rig.sim.connections() > 1);
    // Idle: back to `connections`, one at a time.
    eventually(WAIT, "connections shrunk back to one", || up() == 1).await;
    assert_eq!(
        log_lines(app, GROWN).len() as u64,
        rig.sim.connections() - 1
    );
    assert_eq!(
        log_lines(app, SHRUNK).len(),
        log_lines(app, GROWN).len(),
        "every connection grown was closed again"
    );
    rig.finish().await;
}
