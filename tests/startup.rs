//! Start-up with the built-in simulator: resolved once, it keeps serving the
//! apps on it across a reload that replaces them, and through the drain.

mod common;

use apnsd::config::Config;

use common::rig::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_on_the_built_in_simulator_survive_a_reload() {
    let mut broker = Broker::new("startreload").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apnsd.toml");
    let amqp = broker.amqp_toml(100);
    let toml = |connections: u32| {
        format!(
            "{}\n[results]\ndelivered = true\n[[apps]]\nname = \"example\"\nenvironment = \"simulator\"\nconnections = {connections}\n\
             [[apps]]\nname = \"h2\"\nenvironment = \"simulator\"\nprotocol = \"http2\"\nconnections = {connections}\n",
            amqp
        )
    };
    std::fs::write(&path, toml(1)).unwrap();
    let (started, shutdown) = start_with_builtin(&path).await;
    let stats = started.stats().clone();
    publish(&broker, 0, 10).await;
    let before = broker.results(20, WAIT).await;
    assert!(before.iter().all(|r| r.routing_key == "delivered"));

    std::fs::write(&path, toml(2)).unwrap();
    let done = started
        .daemon
        .reload(Config::load(&path).unwrap())
        .await
        .unwrap();
    assert_eq!(done.replaced, ["example", "h2"]);

    publish(&broker, 10, 30).await;
    let after = broker.results(40, WAIT).await;
    assert!(
        after.iter().all(|r| r.routing_key == "delivered"),
        "the replaced apps still reach the simulator"
    );
    eventually(WAIT, "every job acked", || stats.jobs_acked.get() == 60).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, started.wait()).await.unwrap();
    broker.cleanup().await;
}

/// Jobs `from..to` for each of the two apps.
async fn publish(broker: &Broker, from: u32, to: u32) {
    let with_app = |app: &str, id: String, token: String| {
        let mut job: serde_json::Value = serde_json::from_slice(&job(&id, &token)).unwrap();
        job["app"] = app.into();
        serde_json::to_vec(&job).unwrap()
    };
    let jobs = (from..to).flat_map(|i| {
        [
            with_app("example", format!("a{i}"), token(0x1a, i)),
            with_app("h2", format!("b{i}"), token(0x1b, i)),
        ]
    });
    broker.publish_all(jobs.collect::<Vec<_>>()).await;
}
