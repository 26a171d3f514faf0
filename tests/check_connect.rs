//! `apnsd check --connect` on HTTP/2 apps, against the simulator over real
//! TLS: a good provider key passes, a wrong key id and a certificate the
//! server refuses are named, one line per app, exit 2 on any failure.

use std::path::Path;

use apnsd::simulator::{write_identity, SimCerts, Simulator, SimulatorOptions};

const APNSD: &str = env!("CARGO_BIN_EXE_apnsd");

async fn simulator(dir: &Path) -> Simulator {
    apnsd::apns::tls::install_crypto_provider();
    let certs = SimCerts::generate("com.example.app").unwrap();
    certs.write_to(dir).unwrap();
    Simulator::start(SimulatorOptions::new(certs))
        .await
        .unwrap()
}

/// Runs `apnsd check --connect` on `apps` (TOML `[[apps]]` entries).
async fn check(dir: &Path, apps: &str) -> (i32, String, String) {
    let path = dir.join("apnsd.toml");
    std::fs::write(&path, apps).unwrap();
    let out = tokio::process::Command::new(APNSD)
        .args(["check", "--connect", "--config"])
        .arg(&path)
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

/// An HTTP/2 `[[apps]]` entry on the simulator with `auth` (its identity lines).
fn app(name: &str, dir: &Path, sim: &Simulator, auth: &str) -> String {
    format!(
        r#"
[[apps]]
name = "{name}"
environment = "simulator"
protocol = "http2"
endpoint = "{endpoint}"
ca = "{d}/ca.pem"
connect_timeout = "5s"
{auth}
"#,
        d = dir.display(),
        endpoint = sim.http2_addr(),
    )
}

fn token_app(name: &str, dir: &Path, sim: &Simulator, key_id: &str) -> String {
    let d = dir.display();
    let auth = format!(
        "key_file = \"{d}/token-key.p8\"\nkey_id = \"{key_id}\"\nteam_id = \"SIMTEAM001\"\ntopic = \"com.example.app\""
    );
    app(name, dir, sim, &auth)
}

fn certificate_app(name: &str, dir: &Path, sim: &Simulator, p12: &str) -> String {
    let d = dir.display();
    let auth = format!("certificate = \"{d}/{p12}\"\npassword = \"simulator\"");
    app(name, dir, sim, &auth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_credentials_pass_with_one_line_per_app() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path()).await;
    let apps = [
        token_app("token", dir.path(), &sim, "SIMKEY0001"),
        certificate_app("cert", dir.path(), &sim, "client.p12"),
    ]
    .concat();
    let (code, out, err) = check(dir.path(), &apps).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let endpoint = sim.http2_addr().to_string();
    for (app, what) in [("token", "provider token"), ("cert", "client certificate")] {
        let lines: Vec<_> = out
            .lines()
            .filter(|l| l.starts_with(&format!("{app}: {endpoint}")))
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert!(
            lines[0].contains(&format!("{what} and topic accepted")),
            "{out}"
        );
        assert!(lines[0].contains("400 BadDeviceToken"), "{out}");
    }
    // Nobody was notified.
    assert!(sim.accepted().is_empty());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_id_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path()).await;
    let (code, out, err) = check(
        dir.path(),
        &token_app("wrongkey", dir.path(), &sim, "WRONGKEY01"),
    )
    .await;
    assert_eq!(code, 2, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("wrongkey: ")
            && err.contains("APNs refused the provider token: 403 InvalidProviderToken"),
        "{err}"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulator(dir.path()).await;
    // Signed by another CA: the simulator refuses it in the TLS handshake.
    let stranger = SimCerts::generate("com.example.app").unwrap();
    write_identity(stranger.client(), dir.path(), "stranger").unwrap();
    let apps = [
        certificate_app("refused", dir.path(), &sim, "stranger.p12"),
        token_app("fine", dir.path(), &sim, "SIMKEY0001"),
    ]
    .concat();
    let (code, out, err) = check(dir.path(), &apps).await;
    assert_eq!(code, 2, "stdout:\n{out}\nstderr:\n{err}");
    let refused: Vec<_> = err.lines().filter(|l| l.contains("refused: ")).collect();
    assert_eq!(refused.len(), 1, "{err}");
    assert!(refused[0].contains("cannot connect to"), "{err}");
    // The other app is still judged, on its own line.
    assert!(
        out.lines()
            .any(|l| l.starts_with("fine: ") && l.contains("provider token and topic accepted")),
        "{out}"
    );
    sim.shutdown().await;
}
