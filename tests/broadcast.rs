//! Broadcast jobs end to end: a channel made with `apnsd channels create`
//! in the simulator, a job with `channel` delivered to
//! `/4/broadcasts/apps/<topic>` (the simulator accepts only what Apple's
//! rules allow: push type, priority, expiration), results that name the
//! channel, an unknown channel, and a channel job for a binary app.

mod common;

use common::reach::apnsd;
use common::rig::*;
use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_job_is_broadcast_and_its_results_name_the_channel() {
    let mut rig = Rig::builder("broadcast", Protocol::Http2)
        .app(App::new("legacy", Protocol::Binary))
        .delivered()
        .start()
        .await;
    let config = rig.config_path().display().to_string();
    let (code, out, err) = apnsd([
        "channels", "create", "--config", &config, "--app", "example",
    ])
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let channel = out.trim().to_owned();
    // A channel that stores no message: only expiration 0 is accepted, which
    // is what a job without `expiry` gets.
    let update = r#"{"aps":{"event":"update","timestamp":1,"content-state":{"score":"1-0"}}}"#;
    let unknown = "dW5rbm93bi1jaGFubmVs";
    let bodies = [
        format!(r#"{{"id":"b1","channel":"{channel}","payload":{update}}}"#),
        format!(r#"{{"id":"b2","channel":"{unknown}","payload":{update},"priority":5}}"#),
        format!(r#"{{"id":"b3","app":"legacy","channel":"{channel}","payload":{update}}}"#),
    ];
    rig.broker
        .publish_all(bodies.iter().map(|b| b.clone().into_bytes()))
        .await;
    let results = rig.broker.results(3, WAIT).await;
    let by_id = |id: &str| {
        results
            .iter()
            .find(|r| r.body["id"] == id)
            .unwrap_or_else(|| panic!("no result for {id}: {results:?}"))
    };

    let delivered = by_id("b1");
    assert_eq!(delivered.routing_key, "delivered", "{results:?}");
    assert_eq!(delivered.body["channel"], channel.as_str());
    assert_eq!(delivered.body.get("token"), None);
    let broadcasts = rig.sim.broadcasts();
    assert_eq!(broadcasts.len(), 1, "{broadcasts:?}");
    assert_eq!(broadcasts[0].channel, channel);
    assert_eq!(broadcasts[0].topic, "com.example.app");
    let sent: Value = serde_json::from_slice(&broadcasts[0].payload).unwrap();
    assert_eq!(sent, serde_json::from_str::<Value>(update).unwrap());
    assert!(rig.sim.accepted().is_empty(), "nothing went to a device");

    let failed = by_id("b2");
    assert_eq!(failed.routing_key, "failed.channel_not_registered");
    assert_eq!(failed.body["channel"], unknown);
    assert_eq!(failed.body["status"], 400);
    assert_eq!(failed.body.get("token"), None);

    let rejected = by_id("b3");
    assert_eq!(rejected.routing_key, "rejected");
    let error = rejected.body["error"].as_str().unwrap();
    assert!(error.contains("HTTP/2"), "{error}");

    rig.wait_acked(3).await;
    let stats = rig.finish().await;
    assert_eq!((stats.failed, stats.jobs_rejected), (1, 1));
}
