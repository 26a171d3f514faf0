//! The shipped unit passes `systemd-analyze verify` and keeps its hardening
//! exposure at or below 2.0 (`.ci/run` makes sure systemd-analyze is there).

use std::path::Path;
use std::process::Command;

const APNSD: &str = env!("CARGO_BIN_EXE_apnsd");

/// The unit as shipped, with the binary path pointing at the one just built
/// (verify checks that ExecStart= is executable).
fn unit_under_test(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/apnsd.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/apnsd run"));
    let path = dir.join("apnsd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/apnsd", APNSD)).unwrap();
    path
}

fn analyze(args: &[&str], unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze (package systemd) is needed for this test");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn unit_verifies_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let (ok, text) = analyze(&["verify"], &unit);
    assert!(ok && text.trim().is_empty(), "{text}");
}

#[test]
fn unit_exposure_is_at_most_2_0() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    // --threshold is the exposure level times ten.
    let (ok, text) = analyze(&["security", "--offline=true", "--threshold=20"], &unit);
    assert!(ok, "{text}");
    assert!(text.contains("Overall exposure level"), "{text}");
}
