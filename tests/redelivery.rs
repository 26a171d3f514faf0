//! A broker session lost while the process lives: the redelivered jobs send
//! only the notifications whose outcome the process did not know, in the
//! library's daemon and in the real binary.

mod common;

use std::collections::{HashMap, HashSet};

use common::process::*;
use common::relay::Relay;
use common::rig::{tok, App, Protocol, Rig};
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

/// The real binary, its broker connection cut while jobs are half done,
/// sends again none of the notifications whose outcome it knew. What it knew
/// is shown by the `delivered` results it published before the cut (a result
/// goes out only once its outcome is final). Only jobs that were certainly
/// not finished at the cut are held to it, those with a token the simulator
/// had not accepted yet: a finished job's ack can be lost with the
/// connection, and such a job is sent again in full (the documented gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_does_not_resend_what_it_knew_after_losing_its_session() {
    let relay = Relay::start("127.0.0.1:5672").await;
    let mut broker = Broker::new("recall-binary").await;
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::start(dir.path(), &[]).await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("apnsd.toml");
    std::fs::write(
        &config,
        format!(
            "shutdown_timeout = \"20s\"\n[amqp]\nuri = \"{}\"\nqueue = \"{}\"\nprefetch = 100\n\
             results_exchange = \"{}\"\n[results]\ndelivered = true\n[metrics]\nlisten = \"{metrics}\"\n{}",
            relay.uri(),
            broker.queue,
            broker.exchange,
            App::new("example", Protocol::Binary)
                .keys("settle = \"100ms\"\nwindow = 10")
                .toml(&sim.services)
        ),
    )
    .unwrap();
    let mut daemon = spawn_daemon(&config, &dir.path().join("apnsd.log"));

    // 10 jobs of 100 tokens, at most 20 unsettled at a time (a window of
    // 10 on each of two connections): a job takes about five settle periods,
    // longer than its first results take to come back.
    let (bodies, tokens) = fan_out_jobs(10, 100);
    let job_of: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i / 100))
        .collect();
    broker.publish_all(bodies).await;
    // Results until some job has a known outcome and many tokens the
    // gateway has not seen: the cut then lands inside that job.
    let mut known = HashSet::new();
    let mut results = 0;
    loop {
        let r = broker.results(1, WAIT).await.remove(0);
        assert_eq!(r.routing_key, "delivered", "{r:?}");
        let token = r.body["token"].as_str().unwrap().to_owned();
        let job = job_of[token.as_str()];
        known.insert(token);
        results += 1;
        // Past the first job, so that a finished job's tokens are seen too.
        if results >= 150
            && results % 10 == 0
            && unseen_in(&sim.record, &tokens[job * 100..][..100]) >= 20
        {
            break;
        }
        assert!(results < 900, "no job was caught half done");
    }
    relay.cut();
    let seen = read_record(&sim.record);
    let unfinished: HashSet<usize> = tokens
        .iter()
        .filter(|t| !seen.contains_key(*t))
        .map(|t| job_of[t.as_str()])
        .collect();
    let held: Vec<&String> = known
        .iter()
        .filter(|t| unfinished.contains(&job_of[t.as_str()]))
        .collect();
    assert!(
        !held.is_empty(),
        "the cut found no known outcome of an unfinished job"
    );

    eventually(WAIT, "every token accepted", || {
        let seen = read_record(&sim.record);
        tokens.iter().all(|t| seen.contains_key(t))
    })
    .await;
    eventually_async(WAIT, "every job settled", || async {
        broker.queue_depth().await == 0 && scrape(&metrics, "apnsd_jobs_in_flight").await == 0
    })
    .await;
    let redelivered = scrape(&metrics, "apnsd_jobs_redelivered_total").await;
    let skipped = scrape(
        &metrics,
        "apnsd_notifications_skipped_after_redelivery_total",
    )
    .await;
    daemon.stop().await;
    assert_eq!(broker.queue_depth().await, 0, "nothing left unacked");

    let counts = read_record(&sim.record);
    let sent_twice: Vec<&&String> = held.iter().filter(|t| counts[t.as_str()] > 1).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "{} known outcomes of {} unfinished jobs held, {} of them sent twice; \
         redelivered {redelivered}, skipped {skipped}, duplicates in all {duplicates}",
        held.len(),
        unfinished.len(),
        sent_twice.len()
    );
    assert!(
        sent_twice.is_empty(),
        "sent again though known: {sent_twice:?}"
    );
    assert!(redelivered > 0, "the cut left jobs unfinished");
    assert!(
        skipped >= held.len() as u64,
        "{skipped} skipped, fewer than the {} known",
        held.len()
    );
    broker.cleanup().await;
}

/// How many of `tokens` the simulator has not accepted yet.
fn unseen_in(record: &std::path::Path, tokens: &[String]) -> usize {
    let seen = read_record(record);
    tokens.iter().filter(|t| !seen.contains_key(*t)).count()
}
