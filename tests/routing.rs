//! Routing by the whole token: a set of tokens that share a long prefix (as
//! tokens issued together, or made up by a load test, do) still uses every
//! connection of an app, on either protocol.

mod common;

use std::collections::HashMap;

use apnsd::simulator::{SimCerts, Simulator, SimulatorOptions};
use common::rig::*;
use common::*;

const CONNECTIONS: usize = 4;
const TOKENS: u32 = 400;

/// 32-byte tokens that differ only in their last four bytes.
fn shared_prefix_token(i: u32) -> String {
    let mut bytes = [0xab_u8; 32];
    bytes[28..].copy_from_slice(&i.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The app's lines for `protocol`, against `sim`, with client certificates.
fn app_toml(protocol: &str, sim: &Simulator, dir: &std::path::Path) -> String {
    let d = dir.display();
    let endpoint = match protocol {
        "http2" => format!("endpoint = \"{}\"", sim.http2_addr()),
        _ => format!(
            "gateway = \"{}\"\nfeedback = \"{}\"\nfeedback_interval = \"1h\"",
            sim.gateway_addr(),
            sim.feedback_addr()
        ),
    };
    format!(
        r#"
[[apps]]
name = "example"
environment = "simulator"
protocol = "{protocol}"
certificate = "{d}/client.p12"
password = "simulator"
ca = "{d}/ca.pem"
{endpoint}
connections = {CONNECTIONS}
settle = "100ms"
reconnect_min = "10ms"
reconnect_max = "200ms"
"#
    )
}

/// Sends one fan-out job of shared-prefix tokens and checks that every
/// connection carried a fair share of them.
async fn spreads_over_every_connection(protocol: &str) {
    apnsd::apns::tls::install_crypto_provider();
    let broker = Broker::new(&format!("routing_{protocol}")).await;
    let dir = tempfile::tempdir().unwrap();
    let certs = SimCerts::generate("com.example.app").unwrap();
    certs.write_to(dir.path()).unwrap();
    let sim = Simulator::start(SimulatorOptions::new(certs))
        .await
        .unwrap();
    let toml = format!(
        "shutdown_timeout = \"10s\"\n{}\n{}",
        broker.amqp_toml(5000),
        app_toml(protocol, &sim, dir.path())
    );
    let rig = Rig::start(broker, sim, dir, &toml).await;
    let tokens: Vec<String> = (0..TOKENS).map(shared_prefix_token).collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "fan-out",
        "tokens": tokens,
        "payload": {"aps": {"alert": "hello"}},
    }))
    .unwrap();
    rig.broker.publish_all([body]).await;
    rig.wait_acked(1).await;
    rig.assert_once(&tokens);

    let mut per_connection: HashMap<u64, u32> = HashMap::new();
    for a in rig.sim.accepted() {
        *per_connection.entry(a.connection).or_default() += 1;
    }
    assert_eq!(
        per_connection.len(),
        CONNECTIONS,
        "{protocol}: tokens per connection: {per_connection:?}"
    );
    let fair = TOKENS / CONNECTIONS as u32;
    for (connection, &count) in &per_connection {
        assert!(
            count > fair / 2,
            "{protocol}: connection {connection} carried {count} of {TOKENS}: {per_connection:?}"
        );
    }
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_tokens_use_every_binary_connection() {
    spreads_over_every_connection("binary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_tokens_use_every_http2_connection() {
    spreads_over_every_connection("http2").await;
}
