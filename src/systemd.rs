//! Telling systemd how the daemon is going: `READY=1`, `RELOADING=1`,
//! `STOPPING=1`, a `STATUS=` line, and the watchdog's pings. Without systemd
//! listening each of these does nothing.

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

/// Tells systemd, when it is listening; a failure to tell it changes nothing.
pub fn notify(states: &[NotifyState<'_>]) {
    let _ = sd_notify::notify(states);
}

/// Pings systemd's watchdog at half its interval while the runtime is alive,
/// draining included: a runtime wedged for longer gets the process restarted.
pub fn spawn_watchdog() -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        loop {
            notify(&[NotifyState::Watchdog]);
            tokio::time::sleep(interval).await;
        }
    }))
}
