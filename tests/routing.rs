//! Routing: a set of tokens that share a long prefix (as tokens issued
//! together, or made up by a load test, do) still uses every connection of
//! an app, on either protocol (binary hashes the whole token; HTTP/2 hands
//! out runs of consecutive tokens, whatever they look like).

mod common;

use std::collections::HashMap;

use common::rig::*;

const CONNECTIONS: usize = 4;
const TOKENS: u32 = 400;

/// 32-byte tokens that differ only in their last four bytes.
fn shared_prefix_token(i: u32) -> String {
    let mut bytes = [0xab_u8; 32];
    bytes[28..].copy_from_slice(&i.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends one fan-out job of shared-prefix tokens and checks that every
/// connection carried a fair share of them.
async fn shared_prefix_tokens_use_every_connection(protocol: Protocol) {
    let rig = Rig::builder("routing", protocol)
        .keys(&format!("connections = {CONNECTIONS}"))
        .start()
        .await;
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
        "{protocol:?}: tokens per connection: {per_connection:?}"
    );
    let fair = TOKENS / CONNECTIONS as u32;
    for (connection, &count) in &per_connection {
        assert!(
            count > fair / 2,
            "{protocol:?}: connection {connection} carried {count} of {TOKENS}: {per_connection:?}"
        );
    }
    rig.finish().await;
}

both_protocols!(shared_prefix_tokens_use_every_connection);
