//! `amqp.prefetch_bytes` at work: large jobs are taken a few at a time, small
//! ones fill the prefetch, and nothing is lost across the subscriptions. The
//! test waits on the daemon's log lines, captured for the whole process, so
//! it has this test binary to itself.

mod common;

use common::logs;
use common::rig::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_follows_the_bytes_held() {
    let logs = logs::capture();
    let budget = 100_000;
    let rig = Rig::builder("prefetchbytes", Protocol::Binary)
        .amqp("prefetch_bytes = 100000\n")
        .start()
        .await;
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
    let size = bodies[0].len() as u64;
    let total: u64 = bodies.iter().map(|b| b.len() as u64).sum();
    rig.broker.publish_all(bodies).await;
    logs.wait_for("prefetch adapted", |l| {
        l.number("prefetch") <= budget / size
    })
    .await;
    rig.wait_acked(60).await;
    // The first subscription's jobs, then at most what fits on top: the
    // bytes held each time the daemon weighed its prefetch.
    let adapted = logs.lines("prefetch adapted");
    let held = adapted.iter().map(|l| l.number("held_bytes")).max();
    let held = held.expect("the prefetch was adapted");
    let bound = (u64::from(apnsd::intake::START) + budget / size + 1) * size;
    assert!(
        held <= bound && held < total / 2,
        "{held} bytes held of {total}, bound {bound}: {adapted:?}"
    );
    let small = rig.burst(3000, |i| token(0x32, i)).await;
    logs.wait_for("prefetch adapted", |l| l.number("prefetch") >= 512)
        .await;
    rig.wait_acked(60 + 3000).await;
    tokens.extend(small);
    rig.assert_once(&tokens);
    rig.finish().await;
}
