//! The examples in `examples/` run against the real RabbitMQ and an
//! in-process daemon on the simulator's HTTP/2 endpoint: each publisher
//! publishes a one-token job and a fan-out job, which the simulator must
//! receive; the pruner deletes the tokens apnsd reports dead from a SQLite
//! table and keeps the good one.

mod common;

use common::rig::*;
use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs an example to its end; its output is shown if it fails.
async fn example(program: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program}: {e} (deploy/test-prerequisites.sh installs it)"));
    common::process::succeeded(&format!("{program} {args:?}"), &out)
}

/// Publishes with one of the publishers, `--token` then `--tokens-file`, and
/// checks the simulator received every token once with the alert.
async fn publisher_delivers(test: &str, program: &str, script: &str) {
    let rig = Rig::builder(test, Protocol::Http2).start().await;
    let single = token(0x01, 1);
    let fan_out: Vec<String> = (0..3).map(|i| token(0x02, i)).collect();
    let file = rig.dir.path().join("tokens.txt");
    std::fs::write(&file, format!("# one per line\n{}\n\n", fan_out.join("\n"))).unwrap();
    let uri = amqp_uri();
    let alert = format!("hello from {test}");
    let common = [
        "--uri",
        &uri,
        "--queue",
        &rig.broker.queue,
        "--alert",
        &alert,
    ];

    let said = example(
        program,
        &[&[script, "--token", &single][..], &common].concat(),
    )
    .await;
    assert!(said.contains("(1 token(s))"), "{said}");
    let file = file.to_str().unwrap();
    let said = example(
        program,
        &[&[script, "--tokens-file", file][..], &common].concat(),
    )
    .await;
    assert!(said.contains("(3 token(s))"), "{said}");

    rig.wait_acked(2).await;
    let mut all = fan_out.clone();
    all.push(single);
    rig.assert_once(&all);
    for accepted in rig.sim.accepted() {
        let payload: serde_json::Value = serde_json::from_slice(&accepted.payload).unwrap();
        assert_eq!(payload["aps"]["alert"], alert.as_str());
    }
    let stats = rig.finish().await;
    assert_eq!((stats.jobs_consumed, stats.jobs_rejected), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_publisher_delivers() {
    publisher_delivers("expy", "python3", "examples/python/publish.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_publisher_delivers() {
    publisher_delivers("exnode", "node", "examples/node/publish.js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_php_publisher_delivers() {
    publisher_delivers("exphp", "php", "examples/php/publish.php").await;
}

/// Runs `sql` on the SQLite file `db` with Python's sqlite3 (as the pruner
/// does); returns the first column of the rows, one per line.
async fn sqlite(db: &std::path::Path, sql: &str) -> String {
    let script = "import sqlite3, sys\n\
                  db = sqlite3.connect(sys.argv[1])\n\
                  rows = db.execute(sys.argv[2]).fetchall()\n\
                  db.commit()\n\
                  print('\\n'.join(str(r[0]) for r in rows))";
    let said = example("python3", &["-c", script, db.to_str().unwrap(), sql]).await;
    said.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pruner_deletes_the_tokens_apns_reports_dead() {
    let faults = Faults {
        answer: vec![
            AnswerRule::parse("ee=400:BadDeviceToken").unwrap(),
            AnswerRule::parse("ff=410:Unregistered").unwrap(),
        ],
        ..Faults::default()
    };
    let rig = Rig::builder("exprune", Protocol::Http2)
        .faults(faults)
        .start()
        .await;
    let (good, bad, gone) = (token(0x01, 1), token(0xee, 2), token(0xff, 3));
    let db = rig.dir.path().join("app.sqlite3");
    let uri = amqp_uri();
    let results_queue = format!("{}.pruner", rig.broker.queue);
    let pruner = [
        "examples/python/prune_tokens.py",
        "--uri",
        &uri,
        "--db",
        db.to_str().unwrap(),
        "--exchange",
        &rig.broker.exchange,
        "--queue",
        &results_queue,
        "--drain",
    ];
    // The first run creates the table, declares and binds its queue, finds it empty.
    let said = example("python3", &pruner).await;
    assert!(said.is_empty(), "{said}");
    sqlite(
        &db,
        &format!(
            "INSERT INTO device_tokens (token, user_id) VALUES ('{good}', 'u1'), ('{bad}', 'u2'), ('{gone}', 'u3')"
        ),
    )
    .await;

    // A job is acked only once its results are confirmed: in the queue by then.
    rig.broker
        .publish_all([job("good", &good), job("bad", &bad), job("gone", &gone)])
        .await;
    rig.wait_acked(3).await;

    let said = example("python3", &pruner).await;
    assert!(
        said.contains(&format!(
            "failed.bad_device_token: {bad} (1 row(s) deleted)"
        )),
        "{said}"
    );
    assert!(said.contains(&format!("unregistered: {gone}")), "{said}");
    assert_eq!(sqlite(&db, "SELECT token FROM device_tokens").await, good);
    // Every result was acked after the commit: nothing is left to redo.
    let said = example("python3", &pruner).await;
    assert!(said.is_empty(), "{said}");

    rig.broker.delete_queue(&results_queue).await;
    rig.finish().await;
}
