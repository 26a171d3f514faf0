//! Faults a production daemon meets — broker connections cut, gateways that
//! refuse, stall, crawl or reject the certificate, a daemon killed mid-stream —
//! against the real RabbitMQ and the simulator. Each ends with nothing lost:
//! every token accepted or reported, the queues empty, duplicates counted.

mod common;

use std::time::Duration;

use common::relay::Relay;
use common::rig::*;
use common::*;

/// The rig of these tests: a binary `example` app, a prefetch of 1,000 and
/// a 100 ms settle.
fn rig(test: &str) -> RigBuilder {
    Rig::builder(test, Protocol::Binary)
        .prefetch(1000)
        .keys("settle = \"100ms\"")
}

/// Signed by the simulator's CA, expired in 2020: the gateway refuses it.
fn expired_identity() -> ClientSpec {
    ClientSpec {
        expired: true,
        ..ClientSpec::new("com.example.app")
    }
}

both_protocols!(
    broker_connections_cut_mid_stream_lose_nothing,
    unusable_apps_retry_through_the_retry_queue_then_fail_without_blocking_others,
);

/// Cuts the daemon's broker connections twice mid-stream.
async fn broker_connections_cut_mid_stream_lose_nothing(protocol: Protocol) {
    let relay = Relay::start("127.0.0.1:5672").await;
    let rig = Rig::builder("brokercut", protocol)
        .broker_uri(&relay.uri())
        .prefetch(300)
        .start()
        .await;
    let tokens = tokens(0x21, 3000);
    rig.publish(&tokens).await;
    for round in 1..=2u64 {
        let stats = rig.stats();
        eventually(WAIT, "progress before the cut", || {
            stats.jobs_acked.get() >= round * 800
        })
        .await;
        relay.cut();
    }
    let duplicates = rig.all_accepted(&tokens).await;
    let stats = rig.finish().await;
    // Every duplicate comes from a job the broker redelivered (its earlier
    // try may have sent it) or a silent gateway close; both are counted.
    assert!(stats.jobs_redelivered > 0, "{stats:?}");
    assert!(
        duplicates as u64 <= stats.jobs_redelivered + stats.resent_after_close,
        "{duplicates} duplicates: {stats:?}"
    );
    assert!(duplicates <= 2 * 300, "at most a prefetch per cut");
}

/// Two unusable apps speaking `protocol` — one whose gateway port is
/// closed, one whose certificate the simulator refuses — beside the working
/// `example` app.
async fn unusable_apps_retry_through_the_retry_queue_then_fail_without_blocking_others(
    protocol: Protocol,
) {
    let dead = format!("127.0.0.1:{}", common::process::free_port());
    let unusable = |name: &str| App::new(name, protocol).keys("unusable_after = \"100ms\"");
    let mut rig = rig("unusable")
        .amqp("retry_delay = \"200ms\"\nmax_job_attempts = 3\n")
        .identity("expired", expired_identity())
        .app(unusable("dead").at(&dead))
        .app(unusable("expired").client("expired"))
        .start()
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
    let duplicates = rig.all_accepted(&good).await;
    assert_eq!(duplicates, 0);
    // A refused certificate withholds readiness and is named; a dead port is not
    // an identity problem.
    let stats = rig.stats();
    eventually(WAIT, "the refused certificate to be seen", || {
        !stats.health.refused_apps().is_empty()
    })
    .await;
    assert_eq!(stats.health.refused_apps(), ["expired"]);
    assert!(!stats.health.is_ready());
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
    let stats = rig.finish().await;
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
    let rig = rig("stall")
        .keys("settle = \"1500ms\"\nwrite_timeout = \"200ms\"\nconnections = 1")
        // The gateway stops reading for seconds at a time: writes stall
        // once the socket buffers are full.
        .faults(Faults {
            read_delay: Some(Duration::from_secs(3)),
            ..Default::default()
        })
        .start()
        .await;
    let (bodies, tokens) = big_fan_out(0x25, 4, 2000);
    rig.broker.publish_all(bodies).await;
    eventually(WAIT, "the stall detected", || {
        rig.total("apnsd_connection_stalls_total") >= 1
    })
    .await;
    rig.sim.set_faults(Faults::default());
    let duplicates = rig.all_accepted(&tokens).await;
    let connections = rig.sim.connections();
    let stats = rig.finish().await;
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
    let rig = rig("slow")
        .prefetch(prefetch)
        .keys("settle = \"50ms\"")
        .faults(Faults {
            read_delay: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .start()
        .await;
    let tokens = tokens(0x26, 20_000);
    rig.publish(&tokens).await;
    let stats = rig.stats();
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
    assert_eq!(rig.all_accepted(&tokens).await, 0);
    let stats = rig.finish().await;
    assert_eq!(stats.jobs_acked, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_back_off_until_the_gateway_comes_up() {
    let late = format!("127.0.0.1:{}", common::process::free_port());
    let rig = rig("refused")
        .app(App::new("late", Protocol::Binary).at(&late))
        .start()
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
    eventually(WAIT, "refused connections", || {
        rig.total("apnsd_connect_failures_total") >= 6
    })
    .await;
    // Half a second more of attempts: a rate is measured over time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = rig.total("apnsd_connect_failures_total");
    // Two lanes, backing off from 10 ms to 200 ms: a tight loop would make thousands.
    assert!(refused < 40, "{refused} connection attempts");
    let _gateway_up = Relay::start_at(&late, &rig.sim.gateway_addr().to_string()).await;
    assert_eq!(rig.all_accepted(&tokens).await, 0);
    rig.finish().await;
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
    let dead_app = App::new("dead", Protocol::Binary)
        .at(&dead)
        .keys("unusable_after = \"100ms\"");
    rig(test)
        .amqp(&format!(
            "retry_delay = \"200ms\"\nmax_job_attempts = {max_job_attempts}\n"
        ))
        .app(dead_app)
        .start()
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
    rig.publish(&first).await;
    assert_eq!(rig.all_accepted(&first).await, 0);
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
    let stats = rig.finish().await;
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
    let stats = rig.finish().await;
    assert!(
        stats.jobs_deferred >= 1,
        "it waited in the retry queue: {stats:?}"
    );
}
