//! The `apnsd` binary end to end: `apnsd simulate` and `apnsd run` as separate
//! processes, the real RabbitMQ between the test and the daemon.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::*;
use common::rig::{App, Protocol};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_jobs_with_bad_tokens_and_unusable_jobs() {
    let mut broker = Broker::new("executable").await;
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::start(dir.path(), &["--refuse", "ff=8"]).await;
    let record = sim.record.clone();
    let config = dir.path().join("apnsd.toml");
    std::fs::write(
        &config,
        format!(
            // The multi-threaded runtime here; the other binary tests run the default one.
            "shutdown_timeout = \"20s\"\nworker_threads = 2\n{}{}",
            broker.amqp_toml(2000),
            App::new("example", Protocol::Binary)
                .keys("settle = \"200ms\"")
                .toml(&sim.services)
        ),
    )
    .unwrap();
    let mut daemon = spawn_daemon(&config, &dir.path().join("apnsd.log"));

    // 5,000 jobs: every 19th-ish token is refused by the gateway (256 in all),
    // and 7 jobs are unusable.
    let mut bodies = Vec::new();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for i in 0..4993u32 {
        let t = if i % 19 == 3 && bad.len() < 256 {
            let t = token(0xff, i);
            bad.push(t.clone());
            t
        } else {
            let t = token(0x10, i);
            good.push(t.clone());
            t
        };
        bodies.push(job(&format!("job-{i}"), &t));
    }
    assert_eq!(bad.len(), 256);
    let unusable: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"\"just a string\"".to_vec(),
        vec![0xc3, 0x28],
        br#"{"payload":{"aps":{}}}"#.to_vec(),
        br#"{"token":"<1b14a89b>","payload":{"aps":{}}}"#.to_vec(),
        format!(
            r#"{{"token":"{}","payload":{{"aps":{{}}}},"app":"ghost"}}"#,
            token(0x10, 9999)
        )
        .into_bytes(),
        format!(
            r#"{{"token":"{}","payload":{{"noaps":1}}}}"#,
            token(0x10, 9998)
        )
        .into_bytes(),
    ];
    for (k, u) in unusable.iter().enumerate() {
        bodies.insert(700 * k + 11, u.clone());
    }
    assert_eq!(bodies.len(), 5000);
    broker.publish_all(bodies).await;

    let results = broker.results(256 + 7, Duration::from_secs(120)).await;
    let grouped = by_key(&results);
    assert_eq!(
        grouped.get("rejected").map(Vec::len),
        Some(7),
        "{grouped:?}"
    );
    let failed = grouped
        .get("failed.invalid_token")
        .cloned()
        .unwrap_or_default();
    let mut failed_tokens: Vec<String> = failed
        .iter()
        .map(|v| v["token"].as_str().unwrap().to_owned())
        .collect();
    failed_tokens.sort();
    let mut want = bad.clone();
    want.sort();
    assert_eq!(failed_tokens, want, "every bad token reported exactly once");

    eventually(
        Duration::from_secs(120),
        "every good token recorded",
        || {
            let seen = read_record(&record);
            good.iter().all(|t| seen.contains_key(t))
        },
    )
    .await;

    daemon.stop().await;
    assert!(broker
        .no_more_results(Duration::from_millis(300))
        .await
        .is_empty());
    assert_eq!(
        broker.queue_depth().await,
        0,
        "nothing left unacked or queued"
    );

    let seen = read_record(&record);
    for t in &good {
        assert_eq!(
            seen.get(t),
            Some(&1),
            "good token {t} delivered exactly once"
        );
    }
    assert!(bad.iter().all(|t| !seen.contains_key(t)));
    broker.cleanup().await;
}

#[test]
fn check_rejects_a_config_with_an_unknown_key_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[amqp]\nprefetchh = 3\n[[apps]]\nname = \"a\"\nenvironment = \"simulator\"\n",
    )
    .unwrap();
    let out = Command::new(APNSD)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prefetchh"), "{stderr}");
}

#[test]
fn check_accepts_the_shipped_config() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let out = Command::new(APNSD)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
