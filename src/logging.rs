//! Logs to stderr as text or JSON lines, with a level filter and a format that
//! a reload can change while the daemon runs.

use std::io::IsTerminal;

use tracing_subscriber::layer::{Layer, Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

/// Handles to the installed subscriber's filter and output.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    output: reload::Handle<Output, Filtered>,
}

impl Logging {
    /// Installs the process-wide subscriber. `level` has been validated with
    /// the configuration; an unusable one falls back to `info`.
    pub fn init(level: &str, format: LogFormat) -> Logging {
        let (filter, filter_handle) = reload::Layer::new(filter(level));
        let (output, output_handle) = reload::Layer::new(output(format));
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(output)
            .try_init();
        Logging {
            filter: filter_handle,
            output: output_handle,
        }
    }

    /// Switches level and format; the next event already uses them.
    pub fn apply(&self, level: &str, format: LogFormat) {
        if let Err(e) = self.filter.reload(filter(level)) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
        if let Err(e) = self.output.reload(output(format)) {
            tracing::warn!(error = %e, "cannot change the log format");
        }
    }
}

/// lapin warns of every message the broker returns, with its whole body as
/// bytes; apnsd takes the returned (unroutable) results itself and logs them
/// once per routing key, rate-limited (`results_unroutable_total`). A level
/// that names this target keeps its own say.
const RETURNS: &str = "lapin::returned_messages";

fn filter(level: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    if level.contains(RETURNS) {
        return filter;
    }
    match format!("{RETURNS}=error").parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    }
}

/// Colours only on a terminal: the journal and log files get plain text.
fn output(format: LogFormat) -> Output {
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapins_returned_message_warnings_are_left_to_apnsd_unless_named() {
        let quiet = filter("info").to_string();
        assert!(quiet.contains("lapin::returned_messages=error"), "{quiet}");
        let named = filter("debug,lapin::returned_messages=warn").to_string();
        assert!(named.contains("lapin::returned_messages=warn"), "{named}");
        assert!(!named.contains("=error"), "{named}");
    }
}
