//! The Grafana dashboard and the Prometheus rules: promtool validates the
//! rules and runs their tests (cases that fire and cases that do not), every
//! dashboard query parses, and every metric either names is one apnsd serves
//! (read from its registry, not from a list kept by hand).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/apnsd.rules.yml"
);
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/apnsd.rules.test.yml"
);
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/apnsd.json");

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian's prometheus package; deploy/test-prerequisites.sh installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_runs_their_tests() {
    promtool(&["check", "rules", RULES]);
    promtool(&["test", "rules", RULE_TESTS]);
}

/// Every `expr` of the dashboard's panels, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| {
            target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*")
        })
        .collect();
    assert!(queries.len() >= 12, "{queries:?}");
    queries
}

#[test]
fn every_dashboard_query_parses() {
    // promtool parses PromQL only in rule files: one recording rule per query.
    let dir = tempfile::tempdir().unwrap();
    let rules: String = dashboard_queries()
        .iter()
        .enumerate()
        .map(|(i, q)| format!("      - record: dashboard_query_{i}\n        expr: {q:?}\n"))
        .collect();
    let file = dir.path().join("dashboard.rules.yml");
    std::fs::write(
        &file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()]);
}

/// The sample names apnsd serves, from its registry's `# TYPE` lines: a
/// counter's samples end in `_total`, a histogram's in `_bucket`, `_sum` and
/// `_count`. A labelled family is listed only once it has a series, so one
/// series of each is made here, as a running daemon makes them.
fn served() -> BTreeSet<String> {
    let stats = apnsd::metrics::Stats::new();
    stats.lane("shop", 0);
    stats.health.set_identity_refused("shop", 0, true);
    stats.failed_with("bad_device_token");
    stats.set_certificate_expiry("shop", Some(1_800_000_000));
    let text = stats.render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// `apnsd_...` names in `text`.
fn used(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("apnsd_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_rules_use_is_served() {
    let served = served();
    for expected in [
        "apnsd_certificate_expiry_timestamp_seconds",
        "apnsd_ready",
        "apnsd_jobs_acked_total",
        "apnsd_consume_to_accepted_seconds_bucket",
    ] {
        assert!(served.contains(expected), "{expected} not in {served:?}");
    }
    for file in [RULES, RULE_TESTS, DASHBOARD] {
        let names = used(&std::fs::read_to_string(file).unwrap());
        assert!(names.len() >= 5, "{file}: {names:?}");
        let unknown: Vec<_> = names.difference(&served).collect();
        assert!(
            unknown.is_empty(),
            "{} uses {unknown:?}, which apnsd does not serve ({served:?})",
            Path::new(file).file_name().unwrap().to_string_lossy()
        );
    }
    // The dashboard shows what the issue asks for.
    let dashboard = used(&std::fs::read_to_string(DASHBOARD).unwrap());
    for shown in [
        "apnsd_jobs_consumed_total",
        "apnsd_notifications_accepted_total",
        "apnsd_notifications_failed_by_reason_total",
        "apnsd_consume_to_accepted_seconds_bucket",
        "apnsd_connections_up",
        "apnsd_prefetch",
        "apnsd_job_bytes_held",
        "apnsd_ready",
    ] {
        assert!(dashboard.contains(shown), "the dashboard lacks {shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_serves_when_its_certificate_expires() {
    let rig = common::rig::Rig::builder("monexpiry", common::rig::Protocol::Http2)
        .start()
        .await;
    let p12 = rig.dir.path().join("client.p12");
    let identity = apnsd::apns::tls::load_identity(&p12, Some("simulator"), None).unwrap();
    let line = format!(
        "apnsd_certificate_expiry_timestamp_seconds{{app=\"example\"}} {}",
        identity.info.not_after
    );
    let text = rig.daemon.stats.render();
    assert!(text.contains(&line), "{line:?} not in:\n{text}");
    rig.finish().await;
}
