//! Helpers of the tests that reach APNs in new ways (proxies, `check
//! --connect`, broadcast channels): an in-process simulator with its files,
//! an HTTP/2 app on it, and `apnsd` commands run to completion.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use apnsd::simulator::{SimCerts, Simulator, SimulatorOptions};

use super::eventually;
use super::process::{free_port, APNSD};
use super::WAIT;

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

/// A tinyproxy process, killed on drop.
pub struct Tinyproxy {
    pub port: u16,
    log: PathBuf,
    child: Child,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tinyproxy {
    /// Starts tinyproxy allowing CONNECT to `ports` only, with basic auth
    /// when `auth` is given, and waits until it accepts connections.
    pub async fn start(
        dir: &Path,
        name: &str,
        ports: &[u16],
        auth: Option<(&str, &str)>,
    ) -> Tinyproxy {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\nAllow 127.0.0.1\nLogLevel Connect\nLogFile \"{}\"\n",
            log.display()
        );
        if nix_root() {
            conf.push_str("User nobody\nGroup nogroup\n");
        }
        for p in ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        if let Some((user, password)) = auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).unwrap();
        // The log file must be writable by the user tinyproxy switches to.
        std::fs::write(&log, "").unwrap();
        let _ = Command::new("chmod").arg("0666").arg(&log).status();
        let _ = Command::new("chmod").arg("0755").arg(dir).status();
        let child = Command::new(tinyproxy_binary())
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (run deploy/test-prerequisites.sh)");
        let proxy = Tinyproxy { port, log, child };
        eventually(WAIT, "tinyproxy to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        proxy
    }

    pub fn uri(&self, userinfo: &str) -> String {
        format!("http://{userinfo}127.0.0.1:{}", self.port)
    }

    /// Tunnels tinyproxy opened to `port`, from its log.
    pub fn tunnels_to(&self, port: u16) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let needle = format!("CONNECT 127.0.0.1:{port} ");
        log.lines().filter(|l| l.contains(&needle)).count()
    }
}

fn nix_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn tinyproxy_binary() -> &'static str {
    ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("tinyproxy")
}
