//! What the in-process daemons of a test binary log, captured for the test
//! to wait on. The capture is process-wide, so a binary that reads it holds
//! one test: the lines of parallel tests' daemons would mix.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// One logged event: its message and its fields as text.
#[derive(Clone, Debug, Default)]
pub struct Line {
    pub message: String,
    pub fields: HashMap<String, String>,
}

impl Line {
    /// The numeric field `name`; panics if there is none.
    pub fn number(&self, name: &str) -> u64 {
        let value = self.fields.get(name).and_then(|v| v.parse().ok());
        value.unwrap_or_else(|| panic!("no number {name} in {self:?}"))
    }
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            name => {
                self.fields.insert(name.to_owned(), text);
            }
        }
    }
}

/// The lines captured so far.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<Line>>>);

struct Capture(Logs);

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        self.0 .0.lock().unwrap().push(line);
    }
}

/// Captures apnsd's lines (debug and up) from here on; every call returns
/// the same capture. Call it before the daemon starts.
pub fn capture() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let apnsd = Targets::new().with_target("apnsd", tracing::Level::DEBUG);
        let subscriber =
            tracing_subscriber::registry().with(Capture(logs.clone()).with_filter(apnsd));
        tracing::subscriber::set_global_default(subscriber)
            .expect("the capture is the test binary's only subscriber");
        logs
    })
    .clone()
}

impl Logs {
    /// The lines with `message` so far.
    pub fn lines(&self, message: &str) -> Vec<Line> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|l| l.message == message)
            .cloned()
            .collect()
    }

    /// Waits for a line with `message` that `pred` accepts; returns it.
    pub async fn wait_for(&self, message: &str, pred: impl Fn(&Line) -> bool) -> Line {
        let mut found = None;
        super::eventually(super::WAIT, message, || {
            found = self.lines(message).into_iter().find(&pred);
            found.is_some()
        })
        .await;
        found.expect("found")
    }
}
