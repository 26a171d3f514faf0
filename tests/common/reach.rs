//! Helpers of the tests that reach APNs in new ways (proxies, `check
//! --connect`, broadcast channels): an in-process simulator with its files,
//! an HTTP/2 app on it, and `apnsd` commands run to completion.

use std::ffi::OsStr;
use std::path::Path;

use apnsd::simulator::{SimCerts, Simulator, SimulatorOptions};

use super::process::APNSD;

/// A simulator whose certificates and token key are written to `dir`.
pub async fn simulator(dir: &Path) -> Simulator {
    apnsd::apns::tls::install_crypto_provider();
    let certs = SimCerts::generate("com.example.app").unwrap();
    certs.write_to(dir).unwrap();
    Simulator::start(SimulatorOptions::new(certs))
        .await
        .unwrap()
}

/// An HTTP/2 `[[apps]]` entry on `sim`; `auth` holds its identity lines
/// (the simulator's client certificate when empty) and any other keys.
pub fn http2_app(name: &str, dir: &Path, sim: &Simulator, auth: &str) -> String {
    let d = dir.display();
    let auth = if auth.contains("key_file") || auth.contains("certificate") {
        auth.to_owned()
    } else {
        format!("certificate = \"{d}/client.p12\"\npassword = \"simulator\"\n{auth}")
    };
    format!(
        r#"
[[apps]]
name = "{name}"
environment = "simulator"
protocol = "http2"
endpoint = "{endpoint}"
ca = "{d}/ca.pem"
connect_timeout = "5s"
reconnect_min = "10ms"
reconnect_max = "200ms"
{auth}
"#,
        endpoint = sim.http2_addr(),
    )
}

/// Token-auth identity lines with the simulator's key under `key_id`.
pub fn token_auth(dir: &Path, key_id: &str) -> String {
    format!(
        "key_file = \"{}/token-key.p8\"\nkey_id = \"{key_id}\"\nteam_id = \"SIMTEAM001\"\ntopic = \"com.example.app\"\n",
        dir.display()
    )
}

/// Runs `apnsd ARGS` to its end without blocking the runtime (the
/// in-process simulator must keep serving): exit code, stdout, stderr.
pub async fn apnsd<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = tokio::process::Command::new(APNSD)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
