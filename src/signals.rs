//! Signals: SIGTERM or SIGINT cancels a token that every long-running task
//! watches (a second SIGINT ends the process at once); SIGHUP asks for a reload.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use signal_hook::consts::SIGINT;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// What the signal task asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Reload,
}

/// Installs the handlers (before any slow start-up work, so an early SIGTERM
/// is not lost) and returns a receiver of reload requests.
pub fn install(
    shutdown: CancellationToken,
) -> std::io::Result<tokio::sync::mpsc::Receiver<Request>> {
    // signal-hook's conditional shutdown: once the flag is set by the first
    // SIGINT, the next one terminates the process from the handler itself,
    // even if the runtime is wedged.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, interrupted.clone())?;
    signal_hook::flag::register(SIGINT, interrupted)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining");
                    shutdown.cancel();
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: draining (again to exit at once)");
                    shutdown.cancel();
                }
                _ = hup.recv() => {
                    if tx.try_send(Request::Reload).is_err() {
                        tracing::debug!("a reload is already pending");
                    }
                }
            }
        }
    });
    Ok(rx)
}
