//! Running the `apnsd` binary as a test's child process.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use super::rig::Services;

pub const APNSD: &str = env!("CARGO_BIN_EXE_apnsd");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process of the test, killed if the test ends before it exits.
/// Its exit is awaited, not polled: the runtime keeps serving the in-process
/// simulator a draining daemon still talks to.
pub struct Process(tokio::process::Child);

impl Process {
    /// Starts `command`, to be killed when dropped.
    pub fn spawn(command: Command) -> Process {
        let mut command = tokio::process::Command::from(command);
        Process(command.kill_on_drop(true).spawn().unwrap())
    }

    pub fn pid(&self) -> u32 {
        self.0.id().expect("the process still runs")
    }

    /// Sends `sig` (`-TERM`, `-HUP`, `-KILL`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; panics after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.0.wait())
            .await
            .expect("process did not exit")
            .unwrap()
    }

    /// SIGTERM, then a successful exit.
    pub async fn stop(&mut self) {
        self.signal("-TERM");
        let status = self.wait_exit(super::WAIT).await;
        assert!(status.success(), "apnsd exited with {status}");
    }
}

/// `apnsd run --config CONFIG`, its stderr going to `log`.
pub fn spawn_daemon(config: &Path, log: &Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    let mut command = Command::new(APNSD);
    command.args(["run", "--config"]).arg(config).stderr(log);
    Process::spawn(command)
}

pub async fn wait_for_file(path: &Path) {
    super::eventually(Duration::from_secs(30), "a file to appear", || {
        path.exists()
    })
    .await;
}

/// Waits until `log` contains `text`; returns the log.
pub async fn wait_for_log(log: &Path, text: &str) -> String {
    wait_for_nth(log, text, 1).await
}

/// Waits until `log` holds `text` `n` times (the n-th reload, not the
/// first); returns the log.
pub async fn wait_for_nth(log: &Path, text: &str, n: usize) -> String {
    let mut seen = String::new();
    super::eventually(Duration::from_secs(30), text, || {
        seen = std::fs::read_to_string(log).unwrap_or_default();
        seen.matches(text).count() >= n
    })
    .await;
    seen
}

/// `GET path` on a plain-HTTP address: (status line, body).
pub async fn http_get(addr: &str, path: &str) -> (String, String) {
    try_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("nothing answers on {addr}"))
}

/// `GET path`, or `None` while nothing answers on `addr`.
async fn try_get(addr: &str, path: &str) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Some((
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    ))
}

/// The value of the sample `name` (labels included, if any) in a Prometheus
/// text exposition.
pub fn metric(text: &str, name: &str) -> u64 {
    sample(text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A daemon's `/metrics` once `settled` holds on it (or the last one
/// after [`super::WAIT`]: the caller's assertions then say what differs).
pub async fn metrics_once(addr: &str, settled: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + super::WAIT;
    loop {
        let text = http_get(addr, "/metrics").await.1;
        if settled(&text) || std::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One sample from a daemon's `/metrics`, or 0 while it does not answer.
pub async fn scrape(addr: &str, name: &str) -> u64 {
    let text = try_get(addr, "/metrics").await.map(|(_, body)| body);
    text.and_then(|t| sample(&t, name)).unwrap_or(0)
}

/// How often each token appears in a simulator's `--record` file.
pub fn read_record(path: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *counts.entry(line.trim().to_owned()).or_insert(0) += 1;
    }
    counts
}

/// `apnsd simulate` in its own process, recording what it accepts.
pub struct SimProcess {
    pub services: Services,
    pub record: PathBuf,
    _process: Process,
}

impl SimProcess {
    /// Starts the simulator with `faults` (its command-line switches) and
    /// waits until its certificates are written.
    pub async fn start(dir: &Path, faults: &[&str]) -> SimProcess {
        let certs = dir.join("certs");
        let record = dir.join("accepted.txt");
        let addr = || format!("127.0.0.1:{}", free_port());
        // Every service on a port of its own, so simulators can run side by side.
        let services = Services {
            certs: format!("{}/", certs.display()),
            gateway: addr(),
            feedback: addr(),
            http2: addr(),
        };
        let mut command = Command::new(APNSD);
        command
            .args(["simulate", "--gateway", &services.gateway])
            .args(["--feedback", &services.feedback])
            .args(["--http2", &services.http2])
            .arg("--dir")
            .arg(&certs)
            .args(faults)
            .arg("--record")
            .arg(&record)
            .stderr(Stdio::null());
        let process = Process::spawn(command);
        wait_for_file(&certs.join("ca.pem")).await;
        wait_for_file(&certs.join("client.p12")).await;
        SimProcess {
            services,
            record,
            _process: process,
        }
    }
}

/// Peak resident memory of a process in KiB (`VmHWM`), if it still runs.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The stdout of a finished command, which must have succeeded; `what` and
/// both outputs are shown if it did not.
pub fn succeeded(what: &str, out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
