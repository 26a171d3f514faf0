//! Bad configurations through the real executable: `apnsd check` and
//! `apnsd run` exit 2 with one line per problem naming its key, and no
//! error anywhere (including a SIGHUP reload's log line) shows a secret.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::{spawn_daemon, wait_for_log, APNSD};
use common::Broker;

const SECRET: &str = "Zq9-SECRET-pw";

const APP: &str = "[[apps]]\nname = \"a\"\nenvironment = \"simulator\"\n";

/// `apnsd <command> --config <path>`: its exit code and stderr.
fn apnsd(command: &str, config: &Path) -> (Option<i32>, String) {
    let out = Command::new(APNSD)
        .args([command, "--config"])
        .arg(config)
        .env_remove("APNSD_AMQP__URI")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Both commands refuse `text` with exit 2; returns `check`'s stderr after
/// asserting `run` said the same.
fn refused(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("apnsd.toml");
    std::fs::write(&config, text).unwrap();
    let (code, check) = apnsd("check", &config);
    assert_eq!(code, Some(2), "check: {check}");
    let (code, run) = apnsd("run", &config);
    assert_eq!(code, Some(2), "run: {run}");
    assert_eq!(check, run, "check and run report alike");
    check
}

/// Every way a TOML or type error could echo a password or a URI's userinfo.
fn secret_cases() -> Vec<String> {
    vec![
        format!("{APP}password = \"Zq9\\q-SECRET-pw\"\n"),
        format!("{APP}password = \"{SECRET}\n"),
        format!("{APP}password = \"{SECRET}\"\npassword = \"{SECRET}\"\n"),
        format!("{APP}password = [\"{SECRET}\"]\n"),
        format!("[amqp]\nuri = \"http://user:{SECRET}@what\"\n{APP}"),
        format!("[amqp]\nuri = \"amqp://user:{SECRET}@host:port/\"\n{APP}"),
        format!("[amqp]\nuri = {{ v = \"{SECRET}\" }}\n{APP}"),
    ]
}

#[test]
fn no_secret_on_check_or_run() {
    for text in secret_cases() {
        let err = refused(&text);
        assert!(!err.contains("SECRET"), "{text}\ngave\n{err}");
        assert!(err.contains("apnsd.toml"), "{err}");
    }
}

#[test]
fn a_bad_amqp_uri_is_refused_naming_the_key() {
    for uri in ["http://what", "amqp://guest:guest@host:port/%2f", "nothing"] {
        let err = refused(&format!("[amqp]\nuri = \"{uri}\"\n{APP}"));
        assert!(err.contains("amqp.uri: "), "{uri}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn every_problem_at_once_one_line_each() {
    let text = format!(
        "[amqp]\nprefetch = \"100\"\n[results]\ndelivered = \"yes\"\n\
         {APP}connections = 2.7\nfeedback_interval = \"0s\"\nreconnect_min = \"0s\"\nreconnect_max = \"0s\"\n\
         connect_timeout = \"0s\"\nwrite_timeout = \"0s\"\nunusable_after = \"0s\"\n\
         [[apps]]\nname = \"b\"\nenvironment = \"simulator\"\nconnections = 100000\nwindow = 0\n\
         max_concurrent_streams = 0\nbogus = 1\n"
    );
    let err = refused(&text);
    let keys = [
        "amqp.prefetch: ",
        "results.delivered: ",
        "apps[0].connections: ",
        "apps[0].feedback_interval: ",
        "apps[0].reconnect_min: ",
        "apps[0].reconnect_max: ",
        "apps[0].connect_timeout: ",
        "apps[0].write_timeout: ",
        "apps[0].unusable_after: ",
        "apps[1].connections: ",
        "apps[1].window: ",
        "apps[1].max_concurrent_streams: ",
        "unknown key apps[1].bogus",
    ];
    for key in keys {
        assert_eq!(
            err.lines().filter(|l| l.contains(key)).count(),
            1,
            "{key} once in\n{err}"
        );
    }
    assert_eq!(err.lines().count(), keys.len(), "{err}");
}

#[test]
fn an_unknown_environment_lists_the_valid_ones() {
    let err = refused("[[apps]]\nname = \"a\"\nenvironment = \"staging\"\n");
    assert!(err.contains("apps[0].environment: "), "{err}");
    for valid in ["sandbox", "production", "simulator"] {
        assert!(err.contains(valid), "{err}");
    }
}

#[test]
fn run_exits_2_when_the_descriptors_needed_exceed_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("apnsd.toml");
    let apps: String = ["a", "b", "c"]
        .map(|n| {
            format!("[[apps]]\nname = \"{n}\"\nenvironment = \"simulator\"\nconnections = 100\n")
        })
        .concat();
    std::fs::write(&config, apps).unwrap();
    // `ulimit -n` sets the hard limit too, so apnsd cannot raise it.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n 200 && exec {APNSD} run --config \"$0\""))
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("file descriptors") && err.contains("RLIMIT_NOFILE allows 200"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test]
async fn no_secret_in_a_refused_reload() {
    let broker = Broker::new("config_errors_reload").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("apnsd.toml");
    let log = dir.path().join("apnsd.log");
    let good = format!("{}{APP}", broker.amqp_toml(100));
    std::fs::write(&config, &good).unwrap();
    let mut daemon = spawn_daemon(&config, &log);
    wait_for_log(&log, "consuming jobs").await;

    // Each is refused, so none needs to name the test's broker.
    for (n, bad) in secret_cases().iter().enumerate() {
        std::fs::write(&config, bad).unwrap();
        daemon.signal("-HUP");
        let seen = common::process::wait_for_nth(&log, "reload refused", n + 1).await;
        assert!(
            !seen.contains("SECRET"),
            "reload {n} logged a secret:\n{seen}"
        );
    }

    daemon.signal("-TERM");
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "apnsd exited with {status}");
    broker.cleanup().await;
}
