//! Running the `apnsd` binary as a test's child process.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const APNSD: &str = env!("CARGO_BIN_EXE_apnsd");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child if the test fails before stopping it.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `apnsd run --config CONFIG`, its stderr going to `log`.
pub fn spawn_daemon(config: &Path, log: &Path) -> Guard {
    let log = std::fs::File::create(log).unwrap();
    Guard(
        Command::new(APNSD)
            .args(["run", "--config"])
            .arg(config)
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The value of the sample `name` (labels included, if any) in a Prometheus
/// text exposition.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
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
    pub gateway: u16,
    pub feedback: u16,
    pub certs: PathBuf,
    pub record: PathBuf,
    _process: Guard,
}

impl SimProcess {
    /// Starts the simulator with `faults` (its command-line switches) and
    /// waits until its certificates are written.
    pub async fn start(dir: &Path, faults: &[&str]) -> SimProcess {
        let certs = dir.join("certs");
        let record = dir.join("accepted.txt");
        let (gateway, feedback) = (free_port(), free_port());
        // Every service on a port of its own, so simulators can run side by side.
        let process = Command::new(APNSD)
            .args(["simulate", "--gateway", &format!("127.0.0.1:{gateway}")])
            .args(["--feedback", &format!("127.0.0.1:{feedback}")])
            .args(["--http2", &format!("127.0.0.1:{}", free_port())])
            .arg("--dir")
            .arg(&certs)
            .args(faults)
            .arg("--record")
            .arg(&record)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sim = SimProcess {
            gateway,
            feedback,
            certs,
            record,
            _process: Guard(process),
        };
        wait_for_file(&sim.certs.join("ca.pem")).await;
        wait_for_file(&sim.certs.join("client.p12")).await;
        sim
    }

    /// An `[[apps]]` entry named `example` that talks to this simulator.
    pub fn app_toml(&self, extra: &str) -> String {
        format!(
            r#"
[[apps]]
name = "example"
environment = "simulator"
certificate = "{certs}/client.p12"
password = "simulator"
ca = "{certs}/ca.pem"
gateway = "127.0.0.1:{gateway}"
feedback = "127.0.0.1:{feedback}"
{extra}
"#,
            certs = self.certs.display(),
            gateway = self.gateway,
            feedback = self.feedback,
        )
    }
}

/// One counter from a daemon's `/metrics`, or 0 while it does not answer.
pub async fn scrape(addr: &str, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    if s.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
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
