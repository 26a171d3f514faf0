//! apnsd as a service: the real binary under SIGHUP and SIGTERM, its
//! `/metrics` against what the simulator recorded, and `apnsd check` on every
//! kind of bad configuration.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::*;
use common::rig::{App, ClientSpec, DeviceToken, Faults, Protocol, SimDir};
use common::*;

/// What these tests ask of the in-process simulator beside a daemon in
/// another process.
trait ServiceSim {
    fn app(&self, name: &str, client: &str, connections: u32) -> String;
    fn accepted(&self) -> HashMap<String, Vec<String>>;
}

impl ServiceSim for SimDir {
    /// A binary app presenting `<client>.p12`, for a configuration beside the certificates.
    fn app(&self, name: &str, client: &str, connections: u32) -> String {
        App::new(name, Protocol::Binary)
            .client(client)
            .keys(&format!("connections = {connections}"))
            .toml(&self.services())
    }

    /// How often each token was accepted, and by which client identity.
    fn accepted(&self) -> HashMap<String, Vec<String>> {
        let mut by_token: HashMap<String, Vec<String>> = HashMap::new();
        for a in self.sim.accepted() {
            by_token
                .entry(a.token.to_string())
                .or_default()
                .push(a.client_topic.as_deref().unwrap_or("").to_owned());
        }
        by_token
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn daemon_toml(broker: &Broker, metrics_port: u16, apps: &str) -> String {
    format!(
        "shutdown_timeout = \"20s\"\n{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{apps}",
        broker.amqp_toml(1000)
    )
}

fn app_job(id: &str, token: &str, app: &str) -> Vec<u8> {
    let mut job: serde_json::Value = serde_json::from_slice(&common::job(id, token)).unwrap();
    job["app"] = app.into();
    serde_json::to_vec(&job).unwrap()
}

async fn wait_all_accepted(sim: &SimDir, tokens: &[String]) {
    eventually(WAIT, "every token accepted", || {
        let seen = sim.accepted();
        tokens.iter().all(|t| seen.contains_key(t))
    })
    .await;
}

/// SIGTERM, exit 0, then: no stray result, and every job acked (unacked
/// ones would be back in the queue once the daemon is gone).
async fn stop_clean(daemon: &mut Process, mut broker: Broker) {
    daemon.stop().await;
    assert!(broker
        .no_more_results(Duration::from_millis(300))
        .await
        .is_empty());
    assert_eq!(broker.queue_depth().await, 0, "nothing left unacked");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_an_app_rotates_a_certificate_and_resizes_lanes_mid_stream() {
    let broker = Broker::new("sighup").await;
    let sim = SimDir::start(Faults::default()).await;
    sim.mint("rotated", ClientSpec::new("com.example.rotated"));
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let config = sim.path("apnsd.toml");
    let log = sim.path("apnsd.log");
    write(
        &config,
        &daemon_toml(&broker, port, &sim.app("example", "client", 1)),
    );
    let mut daemon = spawn_daemon(&config, &log);

    let before = tokens(0x10, 600);
    broker
        .publish_all(
            before
                .iter()
                .enumerate()
                .map(|(i, t)| job(&format!("a{i}"), t)),
        )
        .await;
    eventually(WAIT, "the first notifications", || {
        sim.sim.accepted_count() >= 100
    })
    .await;

    // Mid-stream: rotate example's certificate, give it 3 connections, add an app.
    let apps = sim.app("example", "rotated", 3) + &sim.app("second", "client", 1);
    write(&config, &daemon_toml(&broker, port, &apps));
    daemon.signal("-HUP");
    let text = wait_for_log(&log, "configuration reloaded").await;
    assert!(
        text.contains(r#"added=["second"]"#) && text.contains(r#"replaced=["example"]"#),
        "{text}"
    );

    let after = tokens(0x20, 400);
    let second = tokens(0x30, 200);
    let bodies = after
        .iter()
        .enumerate()
        .map(|(i, t)| app_job(&format!("b{i}"), t, "example"))
        .chain(
            second
                .iter()
                .enumerate()
                .map(|(i, t)| app_job(&format!("c{i}"), t, "second")),
        );
    broker.publish_all(bodies).await;

    let everything: Vec<String> = [&before[..], &after[..], &second[..]].concat();
    wait_all_accepted(&sim, &everything).await;
    let seen = sim.accepted();
    for t in &everything {
        assert_eq!(seen[t].len(), 1, "{t} accepted exactly once");
    }
    assert!(
        after.iter().all(|t| seen[t] == ["com.example.rotated"]),
        "jobs published after the reload use the rotated certificate"
    );
    assert!(second.iter().all(|t| seen[t] == ["com.example.app"]));

    // The new lane count is in force, and the counters match the simulator.
    let accepted = sim.sim.accepted_count();
    let metrics = metrics_once(&metrics_addr, |m| {
        metric(m, "apnsd_connections_up{app=\"example\"}") == 3
            && metric(m, "apnsd_notifications_accepted_total") == accepted
    })
    .await;
    assert_eq!(
        metric(&metrics, "apnsd_connections_up{app=\"example\"}"),
        3,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "apnsd_notifications_accepted_total"),
        accepted,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "apnsd_jobs_acked_total"),
        everything.len() as u64
    );
    assert_eq!(metric(&metrics, "apnsd_notifications_failed_total"), 0);

    stop_clean(&mut daemon, broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_file_keeps_the_old_configuration() {
    let broker = Broker::new("sighup-invalid").await;
    let sim = SimDir::start(Faults::default()).await;
    let config = sim.path("apnsd.toml");
    let log = sim.path("apnsd.log");
    let good = daemon_toml(&broker, free_port(), &sim.app("example", "client", 2));
    write(&config, &good);
    let mut daemon = spawn_daemon(&config, &log);

    let first = tokens(0x40, 300);
    broker.publish_all(first.iter().map(|t| job(t, t))).await;
    eventually(WAIT, "the first notifications", || {
        sim.sim.accepted_count() >= 50
    })
    .await;

    // An unknown key, then a missing certificate: each refused, named, harmless.
    write(&config, &good.replace("[amqp]", "[amqp]\nbogus = 1"));
    daemon.signal("-HUP");
    let text = wait_for_log(&log, "unknown key amqp.bogus").await;
    assert!(text.contains("reload refused"), "{text}");
    assert!(text.contains(&config.display().to_string()), "{text}");

    write(&config, &good.replace("client.p12", "missing.p12"));
    daemon.signal("-HUP");
    let text = wait_for_log(&log, "apps[0].certificate").await;
    assert!(text.contains("missing.p12 does not exist"), "{text}");

    let second = tokens(0x41, 300);
    broker.publish_all(second.iter().map(|t| job(t, t))).await;
    let everything = [&first[..], &second[..]].concat();
    wait_all_accepted(&sim, &everything).await;
    let seen = sim.accepted();
    assert!(everything.iter().all(|t| seen[t].len() == 1));
    assert!(!text.contains("configuration reloaded"), "{text}");

    stop_clean(&mut daemon, broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_zero_and_leaves_nothing_unacked() {
    let broker = Broker::new("sigterm").await;
    let sim = SimDir::start(Faults::default()).await;
    let config = sim.path("apnsd.toml");
    let log = sim.path("apnsd.log");
    // A small prefetch keeps most jobs in the queue when the signal comes.
    let toml = daemon_toml(&broker, free_port(), &sim.app("example", "client", 2))
        .replace("prefetch = 1000", "prefetch = 100");
    write(&config, &toml);
    let mut daemon = spawn_daemon(&config, &log);

    let tokens = tokens(0x50, 3000);
    broker.publish_all(tokens.iter().map(|t| job(t, t))).await;
    eventually(WAIT, "some notifications", || {
        sim.sim.accepted_count() >= 200
    })
    .await;
    daemon.stop().await;

    // Every job is either delivered and acked, or back in the queue untouched:
    // a job delivered but left unacked would be counted on both sides.
    let seen = sim.accepted();
    assert!(seen.values().all(|v| v.len() == 1), "no duplicates");
    let depth = broker.queue_depth().await as usize;
    // prefetch ÷ settle bounds the rate far below 3,000 jobs in the drain's time.
    assert!(depth > 0, "the signal came mid-stream");
    assert_eq!(
        seen.len() + depth,
        tokens.len(),
        "{} delivered + {depth} queued",
        seen.len()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopping intake"), "{text}");
    broker.cleanup().await;
}

/// `apnsd check --config FILE [extra]`: (exit code, stdout + stderr). Awaited:
/// `--connect` talks to the in-process simulator, which the runtime serves.
async fn check(config: &Path, extra: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(APNSD)
        .args(["check", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_every_kind_of_problem_with_exit_2() {
    let sim = SimDir::start(Faults::default()).await;
    sim.mint(
        "expired",
        ClientSpec {
            expired: true,
            ..ClientSpec::new("com.example.app")
        },
    );
    sim.mint(
        "soon",
        ClientSpec {
            expires_soon: true,
            ..ClientSpec::new("com.example.app")
        },
    );
    sim.mint(
        "sandbox-only",
        ClientSpec {
            production: false,
            ..ClientSpec::new("com.example.app")
        },
    );
    // A PEM certificate paired with somebody else's key.
    sim.mint("other", ClientSpec::new("com.example.other"));
    let config = sim.path("apnsd.toml");
    let app = |name: &str, client: &str| sim.app(name, client, 1);

    let (code, text) = {
        write(&config, &app("example", "client"));
        check(&config, &["--connect"]).await
    };
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("topic com.example.app"), "{text}");

    let cases: Vec<(String, &str)> = vec![
        (
            app("example", "client").replace("connections", "conections"),
            "unknown key apps[0].conections",
        ),
        (app("example", "missing"), "apps[0].certificate"),
        (
            app("example", "client").replace("password = \"simulator\"", "password = \"nope\""),
            "wrong password",
        ),
        (
            app("example", "client").replace(
                "certificate = \"client.p12\"",
                "certificate = \"client.pem\"\nkey = \"other-key.pem\"",
            ),
            "does not match the certificate",
        ),
        (app("example", "expired"), "has expired"),
        (app("example", "soon"), "expires in 9 days"),
        (
            app("example", "sandbox-only").replace("\"simulator\"\ncert", "\"production\"\ncert"),
            "is not for the production environment",
        ),
    ];
    for (toml, want) in cases {
        write(&config, &toml);
        let (code, text) = check(&config, &[]).await;
        assert_eq!(code, 2, "{want}: {text}");
        assert!(text.contains(want), "want {want:?} in {text}");
    }

    // Several problems at once: each on its own line.
    write(
        &config,
        &(app("a", "expired") + &app("b", "soon").replace("connections = 1", "connections = 0")),
    );
    let (code, text) = check(&config, &[]).await;
    assert_eq!(
        (code, text.contains("apps[1].connections")),
        (2, true),
        "{text}"
    );
    write(&config, &(app("a", "expired") + &app("b", "soon")));
    let (code, text) = check(&config, &[]).await;
    assert_eq!(code, 2);
    assert!(
        text.lines()
            .any(|l| l.contains("a: ") && l.contains("has expired"))
            && text
                .lines()
                .any(|l| l.contains("b: ") && l.contains("expires in")),
        "{text}"
    );

    // --connect: an identity from another CA is refused by the gateway.
    sim.mint_stranger("stranger");
    write(&config, &app("example", "stranger"));
    let (code, text) = check(&config, &["--connect"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("cannot connect to the gateway"), "{text}");
    sim.sim.shutdown().await;
}

#[test]
fn send_queues_a_broadcast_from_a_tokens_file() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let broker = Broker::new("send").await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("apnsd.toml");
        write(
            &config,
            &format!(
                "{}\n[[apps]]\nname = \"example\"\nenvironment = \"simulator\"\n",
                broker.amqp_toml(10)
            ),
        );
        let tokens = tokens(0x60, 1500);
        let file = dir.path().join("tokens.txt");
        write(&file, &format!("# broadcast\n{}\n", tokens.join("\n")));
        let out = Command::new(APNSD)
            .args(["send", "--config"])
            .arg(&config)
            .arg("--tokens-file")
            .arg(&file)
            .args(["--alert", "Hello", "--app", "example"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(broker.queue_depth().await, 2, "1,500 tokens in two jobs");
        let jobs = broker.take_jobs(2).await;
        let sent: Vec<DeviceToken> = jobs
            .iter()
            .flat_map(|j| j["tokens"].as_array().unwrap().clone())
            .map(|t| DeviceToken::parse(t.as_str().unwrap()).unwrap())
            .collect();
        let want: Vec<DeviceToken> = tokens
            .iter()
            .map(|t| DeviceToken::parse(t).unwrap())
            .collect();
        assert_eq!(sent, want);
        assert!(jobs.iter().all(|j| j["payload"]["aps"]["alert"] == "Hello"));

        // A bad line is named, and nothing is queued.
        write(&file, &format!("{}\nnot-a-token\n", tokens[0]));
        let out = Command::new(APNSD)
            .args(["send", "--config"])
            .arg(&config)
            .arg("--tokens-file")
            .arg(&file)
            .args(["--alert", "Hello"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
        assert_eq!(broker.queue_depth().await, 0);
        broker.cleanup().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_new_broker_settings_drains_and_reconnects() {
    let broker = Broker::new("sighup-amqp").await;
    let sim = SimDir::start(Faults::default()).await;
    let config = sim.path("apnsd.toml");
    let log = sim.path("apnsd.log");
    let toml = daemon_toml(&broker, free_port(), &sim.app("example", "client", 2));
    write(&config, &toml);
    let mut daemon = spawn_daemon(&config, &log);

    let tokens = tokens(0x70, 2000);
    broker
        .publish_all(tokens[..1000].iter().map(|t| job(t, t)))
        .await;
    eventually(WAIT, "the first notifications", || {
        sim.sim.accepted_count() >= 100
    })
    .await;
    write(
        &config,
        &toml.replace(
            "prefetch = 1000",
            "prefetch = 300\nconsumer_tag = \"reloaded\"",
        ),
    );
    daemon.signal("-HUP");
    let text = wait_for_log(&log, "configuration reloaded").await;
    assert!(text.contains("broker_session=true"), "{text}");
    broker
        .publish_all(tokens[1000..].iter().map(|t| job(t, t)))
        .await;
    wait_for_log(&log, "reconnecting with the new broker settings").await;

    wait_all_accepted(&sim, &tokens).await;
    let seen = sim.accepted();
    assert!(tokens.iter().all(|t| seen[t].len() == 1), "nothing twice");
    stop_clean(&mut daemon, broker).await;
}

/// Whether something accepts connections on `addr` within a second.
async fn listening(addr: &str) -> bool {
    let accepts = || async move { tokio::net::TcpStream::connect(addr).await.is_ok() };
    wait_until_async(Duration::from_secs(1), accepts).await
}

/// Until nothing accepts connections on `addr` (a stopped server's listener
/// closes as its task sees the stop).
async fn wait_closed(addr: &str) {
    let closed = || async move { tokio::net::TcpStream::connect(addr).await.is_err() };
    let what = format!("{addr} to stop accepting connections");
    eventually_async(WAIT, &what, closed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_the_metrics_server_and_refuses_an_address_in_use() {
    let broker = Broker::new("sighup-metrics").await;
    let sim = SimDir::start(Faults::default()).await;
    let config = sim.path("apnsd.toml");
    let log = sim.path("apnsd.log");
    let apps = sim.app("example", "client", 1);
    let (first, second) = (free_port(), free_port());
    let (first_addr, second_addr) = (format!("127.0.0.1:{first}"), format!("127.0.0.1:{second}"));
    write(&config, &daemon_toml(&broker, first, &apps));
    let mut daemon = spawn_daemon(&config, &log);
    wait_for_log(&log, "consuming jobs").await;
    assert!(http_get(&first_addr, "/healthz").await.0.contains("200"));

    // Moved: the new address serves the same counters, the old one closes.
    write(&config, &daemon_toml(&broker, second, &apps));
    daemon.signal("-HUP");
    wait_for_nth(&log, "configuration reloaded", 1).await;
    let tokens = tokens(0x71, 20);
    broker.publish_all(tokens.iter().map(|t| job(t, t))).await;
    wait_all_accepted(&sim, &tokens).await;
    let metrics = metrics_once(&second_addr, |m| {
        metric(m, "apnsd_notifications_accepted_total") == 20
    })
    .await;
    assert_eq!(
        metric(&metrics, "apnsd_notifications_accepted_total"),
        20,
        "{metrics}"
    );
    wait_closed(&first_addr).await;

    // An address in use: the reload is refused, named, and the server stays.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    write(&config, &daemon_toml(&broker, taken_port, &apps));
    daemon.signal("-HUP");
    let text = wait_for_log(&log, "reload refused").await;
    assert!(
        text.contains(&format!(
            "metrics.listen: cannot listen on 127.0.0.1:{taken_port}"
        )),
        "{text}"
    );
    assert!(listening(&second_addr).await, "the old server still serves");
    drop(taken);

    // Without the key the server stops.
    write(
        &config,
        &format!(
            "shutdown_timeout = \"20s\"\n{}\n{apps}",
            broker.amqp_toml(1000)
        ),
    );
    daemon.signal("-HUP");
    wait_for_nth(&log, "configuration reloaded", 2).await;
    wait_for_nth(&log, "metrics server stopped", 2).await;
    wait_closed(&second_addr).await;
    stop_clean(&mut daemon, broker).await;
}
