//! Results on their way to the results exchange: none dropped unseen, none
//! whose failed publish sends its notification again, and never more of them
//! awaiting the broker's confirm than the settlement's bound.

mod common;

use apnsd::metrics::RoutingKeyLabel;
use apnsd::pipeline::settlement::MAX_UNCONFIRMED;
use common::rig::*;
use common::*;
use lapin::options::ExchangeDeleteOptions;

/// A daemon with `delivered` results, publishing them to `exchange` (the
/// broker slice's own, bound to its results queue, unless named otherwise).
async fn rig(test: &str, exchange: Option<&str>) -> Rig {
    let builder = Rig::builder(test, Protocol::Binary).delivered();
    match exchange {
        Some(exchange) => builder.results_exchange(exchange).start().await,
        None => builder.start().await,
    }
}

/// The daemon's count of results returned unrouted with `routing_key`.
fn unroutable(rig: &Rig, routing_key: &str) -> apnsd::metrics::Counter {
    rig.daemon.stats.results_unroutable.with(&RoutingKeyLabel {
        routing_key: routing_key.to_owned(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_no_queue_takes_are_counted_unroutable_and_their_jobs_acked() {
    let unbound = format!("apnsd-test.unbound.{:x}.results", rand::random::<u64>());
    let rig = rig("unroutable", Some(&unbound)).await;
    let tokens = rig.burst(5, |i| token(0x51, i)).await;
    rig.broker.publish_all([b"not json".to_vec()]).await;
    rig.wait_acked(6).await;
    rig.assert_once(&tokens);
    let metrics = rig.daemon.stats.render();
    assert!(
        metrics.contains("apnsd_results_unroutable_total{routing_key=\"delivered\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apnsd_results_unroutable_total{routing_key=\"rejected\"} 1"),
        "{metrics}"
    );
    // A separate connection: the rig's own goes with `finish`.
    let conn = apnsd::amqp::connect(&amqp_uri(), "apnsd-test")
        .await
        .unwrap();
    let (delivered, rejected) = (unroutable(&rig, "delivered"), unroutable(&rig, "rejected"));
    let stats = rig.finish().await;
    assert_eq!(delivered.get() + rejected.get(), 6, "{stats:?}");
    assert_eq!(stats.results_published, 0, "none was routed: {stats:?}");
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(unbound.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_results_exchange_mid_run_sends_no_notification_twice() {
    let mut rig = rig("exchange-gone", None).await;
    let before = rig.burst(5, |i| token(0x52, i)).await;
    rig.broker.results(5, WAIT).await;
    rig.broker.delete_results_exchange().await;
    // These jobs' results go to an exchange that is gone: the first publish
    // closes the results channel (404); a new one declares the exchange again,
    // without the binding, so the rest come back unroutable.
    let after: Vec<String> = (0..50).map(|i| token(0x53, i)).collect();
    rig.publish_tokens("after", &after).await;
    rig.wait_acked(55).await;
    rig.assert_once(&before);
    rig.assert_once(&after);
    let unrouted = unroutable(&rig, "delivered");
    let stats = rig.finish().await;
    let unrouted = unrouted.get();
    assert_eq!(stats.jobs_redelivered, 0, "{stats:?}");
    assert_eq!(stats.jobs_consumed, 55, "{stats:?}");
    assert!(
        stats.results_published + unrouted >= 55,
        "every result settled: {stats:?}"
    );
    assert!(unrouted > 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_job_never_holds_more_unconfirmed_results_than_the_bound() {
    let rig = rig("unconfirmed-bound", None).await;
    let tokens: Vec<String> = (0..4 * MAX_UNCONFIRMED as u32)
        .map(|i| token(0x54, i))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "fan", "tokens": tokens, "payload": {"aps": {"alert": "all"}},
    }))
    .unwrap();
    rig.broker.publish_all([body]).await;
    // The gauge is sampled, so a breach could be missed, never invented.
    let gauge = rig.daemon.stats.results_unconfirmed.clone();
    let acked = rig.daemon.stats.jobs_acked.clone();
    let mut peak = 0;
    let mut every_ms = tokio::time::interval(std::time::Duration::from_millis(1));
    let deadline = std::time::Instant::now() + WAIT;
    while acked.get() < 1 {
        peak = peak.max(gauge.get());
        assert!(std::time::Instant::now() < deadline, "the job never ended");
        every_ms.tick().await;
    }
    assert!(peak > 0, "the gauge never moved");
    assert!(
        peak <= MAX_UNCONFIRMED as i64,
        "{peak} results awaited their confirm at once"
    );
    rig.assert_once(&tokens);
    let stats = rig.finish().await;
    assert_eq!(stats.results_published, tokens.len() as u64, "{stats:?}");
}
