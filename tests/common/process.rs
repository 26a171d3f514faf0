//! Running the `apnsd` binary as a test's child process.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
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
    let mut seen = String::new();
    super::eventually(Duration::from_secs(30), text, || {
        seen = std::fs::read_to_string(log).unwrap_or_default();
        seen.contains(text)
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
