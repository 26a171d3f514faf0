//! The file descriptors a configuration needs, against `RLIMIT_NOFILE`: a
//! daemon that runs out of them mid-way cannot reach its broker and loops
//! on failed connects, so start-up finds out first.

use super::schema::{AppConfig, Config, Protocol};

/// Descriptors beyond the apps': stdio, the broker connection (and its
/// successor while a reload swaps it), the metrics listener and its
/// clients, the runtime's own.
const BASE: u64 = 64;

impl Config {
    /// The most descriptors this configuration holds open at once.
    pub fn descriptors_needed(&self) -> u64 {
        BASE + self.apps.iter().map(app_descriptors).sum::<u64>()
    }
}

/// Each connection twice (a reconnect can overlap the socket it replaces;
/// the in-process simulator holds the other end), plus the feedback poll.
fn app_descriptors(app: &AppConfig) -> u64 {
    let feedback = u64::from(app.protocol == Protocol::Binary);
    2 * app.max_connections() as u64 + feedback
}

/// Raises the soft `RLIMIT_NOFILE` to `needed` when it is lower and the hard
/// limit allows; otherwise says what is missing.
pub fn ensure_descriptors(needed: u64) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Ok(());
    }
    if limit.rlim_cur >= needed {
        return Ok(());
    }
    if limit.rlim_max >= needed {
        let raised = libc::rlimit {
            rlim_cur: needed,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads only the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(());
        }
    }
    Err(format!(
        "the configuration needs up to {needed} file descriptors (apps[].connections); \
         RLIMIT_NOFILE allows {} (hard limit {}): raise it (systemd: LimitNOFILE) or lower connections",
        limit.rlim_cur, limit.rlim_max
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::DEFAULT_MAX_CONNECTIONS;

    #[test]
    fn needs_grow_with_connections_and_fit_the_current_limit() {
        let text = "[[apps]]\nname = \"a\"\nenvironment = \"simulator\"\nconnections = 3\n\
                    [[apps]]\nname = \"b\"\nenvironment = \"simulator\"\nprotocol = \"http2\"\nconnections = 5\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apnsd.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load_with_env(&path, Some(Default::default())).unwrap();
        // The HTTP/2 app may grow to its `max_connections` (64 unset).
        assert_eq!(
            config.descriptors_needed(),
            BASE + (2 * 3 + 1) + 2 * DEFAULT_MAX_CONNECTIONS as u64
        );
        assert_eq!(ensure_descriptors(config.descriptors_needed()), Ok(()));
    }
}
