//! A broker session lost while the process lives: the redelivered jobs send
//! only the notifications whose outcome the process did not know.

mod common;

use common::relay::Relay;
use common::rig::{tok, Protocol, Rig};
use common::*;

/// Fan-out jobs of `per_job` tokens each, with ids `fan-<n>`.
fn fan_out_jobs(jobs: u32, per_job: u32) -> (Vec<Vec<u8>>, Vec<String>) {
    let mut bodies = Vec::new();
    let mut all = Vec::new();
    for j in 0..jobs {
        let tokens: Vec<String> = (0..per_job).map(|i| token(0x31, j * per_job + i)).collect();
        bodies.push(
            serde_json::to_vec(&serde_json::json!({
                "id": format!("fan-{j}"),
                "tokens": tokens,
                "payload": {"aps": {"alert": "hello"}},
            }))
            .unwrap(),
        );
        all.extend(tokens);
    }
    (bodies, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_does_not_resend_what_it_knew() {
    let relay = Relay::start("127.0.0.1:5672").await;
    let rig = Rig::builder("recall", Protocol::Binary)
        .broker_uri(&relay.uri())
        .prefetch(100)
        .keys("settle = \"100ms\"\nwindow = 50")
        .start()
        .await;

    // 40 jobs of 100 tokens, at most 100 unsettled at a time (a window of
    // 50 on each of two connections): the cut finds a job with some tokens
    // accepted and others not yet.
    let (bodies, tokens) = fan_out_jobs(40, 100);
    rig.broker.publish_all(bodies).await;
    let stats = rig.stats();
    eventually(WAIT, "some tokens accepted", || {
        stats.accepted.get() >= 1000
    })
    .await;
    relay.cut();

    rig.all_accepted(&tokens).await;
    // An ack the cut lost is acked again after the redelivery, so the count
    // of acks says little: wait until the broker holds nothing for us.
    eventually_async(WAIT, "every job settled", || async {
        rig.broker.queue_depth().await == 0 && stats.jobs_in_flight.get() == 0
    })
    .await;
    let counts = rig.accepted_counts();
    let duplicates: usize = tokens.iter().map(|t| counts[&tok(t)] - 1).sum();
    let stats = rig.finish().await;
    let skipped = stats.skipped_after_redelivery;
    eprintln!("skipped {skipped}, duplicates {duplicates}: {stats:?}");
    assert!(stats.jobs_redelivered > 0, "the cut left jobs unfinished");
    assert!(skipped > 0, "known outcomes were not sent again");
    // A redelivered job's tokens are either skipped or sent again, and only
    // those sent again can be duplicates: a notification in flight when the
    // session ended whose outcome came after the redelivery, or a job whose
    // ack the cut lost (it was final, its memory gone).
    assert!(
        duplicates as u64 + skipped <= stats.jobs_redelivered * 100,
        "{duplicates} duplicates and {skipped} skipped: {stats:?}"
    );
}
