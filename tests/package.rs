//! The Debian package, installed for real: `scripts/build-deb.sh` packages the
//! binary `cargo test` just built (no release build), `dpkg -i` installs it,
//! and the files, the user, the unit and `apnsd check` on the shipped
//! configuration are checked before `dpkg --remove` and `--purge` take it all
//! away again. Needs root and dpkg (CI has both).

mod common;

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Written while the test's package is installed: a package found installed
/// with it present was left by a test run that died, and may be purged.
const MARKER: &str = "/var/lib/apnsd-package-test.installed";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    common::process::succeeded(&format!("{program} {args:?}"), &run(program, args))
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", "apnsd"]);
    String::from_utf8_lossy(&out.stdout).contains("installed")
}

/// Two test runs on one machine would install and purge under each other.
fn exclusive() -> File {
    let lock = File::create("/tmp/apnsd-package-test.lock").unwrap();
    // SAFETY: flock on a descriptor this function owns; released when it closes.
    let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
    lock
}

fn mode_owner(path: &str) -> (u32, String, String) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let name = |db: &str, id: u32| {
        let line = ok("getent", &[db, &id.to_string()]);
        line.split(':').next().unwrap_or_default().to_owned()
    };
    (
        meta.permissions().mode() & 0o7777,
        name("passwd", meta.uid()),
        name("group", meta.gid()),
    )
}

#[test]
fn the_debian_package_installs_stopped_and_purges_clean() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: the package test must run"
        );
        eprintln!("skipped: installing a package needs root");
        return;
    }
    let _lock = exclusive();
    if installed() {
        assert!(
            Path::new(MARKER).exists(),
            "apnsd is installed on this machine and not by this test: it will not purge it"
        );
        ok("dpkg", &["--purge", "apnsd"]);
    }

    let built = ok(
        "bash",
        &[
            "scripts/build-deb.sh",
            "--profile",
            "dev",
            "--no-build",
            "--fast",
        ],
    );
    let deb = built.lines().last().unwrap_or_default().trim().to_owned();
    assert!(
        deb.ends_with(&format!("apnsd_{}_amd64.deb", env!("CARGO_PKG_VERSION"))),
        "{built}"
    );

    std::fs::write(MARKER, "").unwrap();
    ok("dpkg", &["-i", &deb]);

    // The files, their owners and modes, and the user.
    assert_eq!(
        mode_owner("/usr/bin/apnsd"),
        (0o755, "root".into(), "root".into())
    );
    assert_eq!(
        mode_owner("/etc/apnsd"),
        (0o750, "root".into(), "apnsd".into())
    );
    assert_eq!(
        mode_owner("/etc/apnsd/apnsd.toml"),
        (0o640, "root".into(), "apnsd".into())
    );
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "apnsd"]);
    assert!(conffiles.contains("/etc/apnsd/apnsd.toml"), "{conffiles}");
    let user = ok("getent", &["passwd", "apnsd"]);
    let fields: Vec<&str> = user.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {user}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{user}");
    let version = ok("/usr/bin/apnsd", &["--version"]);
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // The unit runs the packaged binary, verifies, and is not enabled.
    let unit = "/usr/lib/systemd/system/apnsd.service";
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(
        text.contains("ExecStart=/usr/bin/apnsd run --config /etc/apnsd/apnsd.toml"),
        "{text}"
    );
    let verify = run("systemd-analyze", &["verify", unit]);
    let said = String::from_utf8_lossy(&verify.stdout).into_owned()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/apnsd.service").exists());

    // The shipped configuration names its placeholders as what is missing.
    let check = run(
        "/usr/bin/apnsd",
        &["check", "--config", "/etc/apnsd/apnsd.toml"],
    );
    let said = String::from_utf8_lossy(&check.stderr).into_owned();
    assert_eq!(check.status.code(), Some(2), "{said}");
    for placeholder in [
        "apps[0].key_id: \"YOUR_KEY_ID\" is a placeholder",
        "apps[0].team_id: \"YOUR_TEAM_ID\" is a placeholder",
        "apps[0].key_file: /etc/apnsd/AuthKey_YOUR_KEY_ID.p8 does not exist",
    ] {
        assert!(said.contains(placeholder), "{placeholder:?} not in: {said}");
    }
    assert!(
        !said.contains("CHANGE-ME"),
        "the broker password leaked: {said}"
    );

    // Remove keeps the configuration; purge takes everything the package made.
    ok("dpkg", &["--remove", "apnsd"]);
    assert!(!Path::new("/usr/bin/apnsd").exists());
    assert!(!Path::new(unit).exists());
    assert!(Path::new("/etc/apnsd/apnsd.toml").exists());
    ok("dpkg", &["--purge", "apnsd"]);
    assert!(!installed());
    assert!(!Path::new("/etc/apnsd").exists());
    assert!(!run("getent", &["passwd", "apnsd"]).status.success());
    assert!(!run("getent", &["group", "apnsd"]).status.success());
    std::fs::remove_file(MARKER).unwrap();
}
