//! Every APNs connection through a real HTTP CONNECT proxy (Debian's
//! tinyproxy, installed by `deploy/test-prerequisites.sh`): HTTP/2, the
//! binary gateway and the feedback service, with and without basic auth;
//! and proxies that refuse (403, 407) as connect failures that make the app
//! unusable. Each test starts its own tinyproxy on its own port with its own
//! configuration file, killed when the test ends, pass or fail.

mod common;

use common::process::free_port;
use common::reach::*;
use common::rig::*;
use common::*;

/// The daemon's configuration: `top` before the tables, then the broker, then `apps`.
fn config(broker: &Broker, top: &str, amqp: &str, apps: &str) -> String {
    format!(
        "{top}\nshutdown_timeout = \"10s\"\n{}{amqp}\n[results]\ndelivered = true\n{apps}",
        broker.amqp_toml(1000)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_through_a_proxy_with_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path()).await;
    let h2_port = sim.http2_addr().port();
    let proxy = Tinyproxy::start(dir.path(), "auth", &[h2_port], Some(("apnsd", "s3cret"))).await;
    let broker = Broker::new("proxy-h2").await;
    let toml = config(
        &broker,
        &format!("proxy = \"{}\"", proxy.uri("apnsd:s3cret@")),
        "",
        &http2_app("example", dir.path(), &sim, ""),
    );
    let mut rig = Rig::with_config(broker, sim, dir, &toml).await;
    let tokens = rig.burst(50, |i| token(0x51, i)).await;
    let results = rig.broker.results(50, WAIT).await;
    assert!(results.iter().all(|r| r.routing_key == "delivered"));
    rig.wait_acked(50).await;
    rig.assert_once(&tokens);
    assert!(
        proxy.tunnels_to(h2_port) >= 1,
        "no tunnel in the proxy's log"
    );
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_gateway_and_feedback_through_a_proxy_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path()).await;
    let (gateway, feedback) = (sim.gateway_addr(), sim.feedback_addr());
    let gone = token(0x53, 0);
    sim.add_feedback(tok(&gone), 1_700_000_000);
    let proxy =
        Tinyproxy::start(dir.path(), "open", &[gateway.port(), feedback.port()], None).await;
    let broker = Broker::new("proxy-binary").await;
    let d = dir.path().display();
    let app = format!(
        r#"
[[apps]]
name = "example"
environment = "simulator"
certificate = "{d}/client.p12"
password = "simulator"
ca = "{d}/ca.pem"
gateway = "{gateway}"
feedback = "{feedback}"
proxy = "{uri}"
reconnect_min = "10ms"
reconnect_max = "200ms"
"#,
        uri = proxy.uri(""),
    );
    let toml = config(&broker, "", "", &app);
    let mut rig = Rig::with_config(broker, sim, dir, &toml).await;
    let tokens = rig.burst(50, |i| token(0x52, i)).await;
    let results = rig.broker.results(51, WAIT).await;
    let grouped = by_key(&results);
    assert_eq!(grouped["delivered"].len(), 50, "{grouped:?}");
    let unregistered = &grouped["unregistered"];
    assert_eq!(unregistered.len(), 1, "{grouped:?}");
    assert_eq!(unregistered[0]["token"], gone);
    rig.wait_acked(50).await;
    rig.assert_once(&tokens);
    assert!(
        proxy.tunnels_to(gateway.port()) >= 1,
        "gateway not tunnelled"
    );
    assert!(
        proxy.tunnels_to(feedback.port()) >= 1,
        "feedback not tunnelled"
    );
    rig.finish().await;
}

/// A proxy that refuses the tunnel (403: the port is not allowed) or the
/// credentials (407) leaves the app unusable, like a gateway that cannot be
/// reached: its jobs go through the retry queue and then fail, while an app
/// that opts out of the proxy with `""` delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_proxies_make_the_app_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path()).await;
    let h2_port = sim.http2_addr().port();
    let other_port = free_port();
    let forbidding = Tinyproxy::start(dir.path(), "forbid", &[other_port], None).await;
    let auth = Tinyproxy::start(dir.path(), "auth", &[h2_port], Some(("apnsd", "right"))).await;
    let broker = Broker::new("proxy-refused").await;
    let unusable = "unusable_after = \"100ms\"\n";
    let apps = [
        http2_app("forbidden", dir.path(), &sim, unusable),
        http2_app(
            "unauthorized",
            dir.path(),
            &sim,
            &format!("{unusable}proxy = \"{}\"", auth.uri("apnsd:wrong@")),
        ),
        http2_app("direct", dir.path(), &sim, "proxy = \"\""),
    ]
    .concat();
    let toml = config(
        &broker,
        &format!("proxy = \"{}\"", forbidding.uri("")),
        "retry_delay = \"200ms\"\nmax_job_attempts = 2\n",
        &apps,
    );
    let mut rig = Rig::with_config(broker, sim, dir, &toml).await;
    let bodies = ["forbidden", "unauthorized", "direct"].map(|app| {
        serde_json::to_vec(&serde_json::json!({
            "id": app, "app": app, "token": token(0x54, 0),
            "payload": {"aps": {"alert": "x"}},
        }))
        .unwrap()
    });
    rig.broker.publish_all(bodies).await;
    let results = rig.broker.results(3, WAIT).await;
    let grouped = by_key(&results);
    assert_eq!(grouped["delivered"].len(), 1, "{grouped:?}");
    assert_eq!(grouped["delivered"][0]["app"], "direct");
    let failed = &grouped["failed.gateway_unreachable"];
    let mut apps: Vec<_> = failed.iter().map(|f| f["app"].as_str().unwrap()).collect();
    apps.sort();
    assert_eq!(apps, ["forbidden", "unauthorized"], "{grouped:?}");
    let metrics = rig.daemon.stats.render();
    for app in ["forbidden", "unauthorized"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("apnsd_connect_failures_total{") && l.contains(app))
            .unwrap_or_else(|| panic!("no connect failures for {app}:\n{metrics}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    assert_eq!(forbidding.tunnels_to(other_port), 0);
    rig.finish().await;
}

/// `apnsd check --connect` names what the proxy refused, without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_proxy_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path()).await;
    let h2_port = sim.http2_addr().port();
    let forbidding = Tinyproxy::start(dir.path(), "forbid", &[free_port()], None).await;
    let auth = Tinyproxy::start(dir.path(), "auth", &[h2_port], Some(("apnsd", "right"))).await;
    let apps = [
        http2_app(
            "forbidden",
            dir.path(),
            &sim,
            &format!("proxy = \"{}\"", forbidding.uri("")),
        ),
        http2_app(
            "unauthorized",
            dir.path(),
            &sim,
            &format!("proxy = \"{}\"", auth.uri("apnsd:hunter2@")),
        ),
        http2_app(
            "through",
            dir.path(),
            &sim,
            &format!("proxy = \"{}\"", auth.uri("apnsd:right@")),
        ),
    ]
    .concat();
    let path = dir.path().join("check.toml");
    std::fs::write(&path, apps).unwrap();
    let (code, stdout, stderr) = apnsd([
        "check".as_ref(),
        "--connect".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ])
    .await;
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("403 Forbidden"), "{stderr}");
    // tinyproxy answers a wrong password with 401 rather than 407.
    assert!(
        stderr.contains("refused the user and password given (HTTP 40"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2") && !stdout.contains("hunter2"));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("through: ") && l.contains("via http://127.0.0.1:")),
        "{stdout}"
    );
    sim.shutdown().await;
}
