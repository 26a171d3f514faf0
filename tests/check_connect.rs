//! `apnsd check --connect` on HTTP/2 apps, against the simulator over real
//! TLS: a good provider key passes, a wrong key id and a certificate the
//! server refuses are named, one line per app, exit 2 on any failure.

mod common;

use std::path::Path;

use apnsd::simulator::{write_identity, SimCerts};
use common::reach::*;

/// Runs `apnsd check --connect` on `apps` (TOML `[[apps]]` entries).
async fn check(dir: &Path, apps: &str) -> (i32, String, String) {
    let path = dir.join("apnsd.toml");
    std::fs::write(&path, apps).unwrap();
    apnsd([
        "check".as_ref(),
        "--connect".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_credentials_pass_with_one_line_per_app() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sim = simulator(d).await;
    let apps = [
        http2_app("token", d, &sim, &token_auth(d, "SIMKEY0001")),
        http2_app("cert", d, &sim, ""),
    ]
    .concat();
    let (code, out, err) = check(d, &apps).await;
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
    let d = dir.path();
    let sim = simulator(d).await;
    let app = http2_app("wrongkey", d, &sim, &token_auth(d, "WRONGKEY01"));
    let (code, out, err) = check(d, &app).await;
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
    let d = dir.path();
    let sim = simulator(d).await;
    // Signed by another CA: the simulator refuses it in the TLS handshake.
    let stranger = SimCerts::generate("com.example.app").unwrap();
    write_identity(stranger.client(), d, "stranger").unwrap();
    let stranger_auth = format!(
        "certificate = \"{}/stranger.p12\"\npassword = \"simulator\"\n",
        d.display()
    );
    let apps = [
        http2_app("refused", d, &sim, &stranger_auth),
        http2_app("fine", d, &sim, &token_auth(d, "SIMKEY0001")),
    ]
    .concat();
    let (code, out, err) = check(d, &apps).await;
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
