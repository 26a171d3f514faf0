//! Typed views of the configuration: what each part of the daemon runs on,
//! read from the keys in one place so the wiring only passes them along.

use crate::amqp::Topology;
use crate::apns::{http2, lane};
use crate::pipeline::{LiveSettings, SessionConfig};

use super::schema::{AppConfig, Config};

impl AppConfig {
    /// What a binary-protocol lane of this app runs on.
    pub fn binary(&self) -> lane::Settings {
        lane::Settings {
            settle: self.settle,
            retain: self.retain,
            window: self.window,
            max_attempts: self.max_attempts,
            connect_timeout: self.connect_timeout,
            write_timeout: self.write_timeout,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            unusable_after: self.unusable_after,
        }
    }

    /// What an HTTP/2 lane of this app runs on; `window` bounds its backlog.
    pub fn http2(&self) -> http2::Settings {
        http2::Settings {
            max_attempts: self.max_attempts,
            max_streams: self.max_concurrent_streams,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            ping_interval: self.ping_interval,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            unusable_after: self.unusable_after,
            backlog: self.window,
        }
    }
}

impl Config {
    /// What a broker session runs on: a change to it restarts the session.
    pub fn session(&self) -> SessionConfig {
        let amqp = &self.amqp;
        SessionConfig {
            uri: amqp.uri.clone(),
            topology: Topology {
                queue: amqp.queue.clone(),
                queue_type: amqp.queue_type.clone(),
                results_exchange: amqp.results_exchange.clone(),
            },
            prefetch: amqp.prefetch,
            prefetch_bytes: amqp.prefetch_bytes,
            consumer_tag: amqp
                .consumer_tag
                .clone()
                .unwrap_or_else(|| format!("apnsd-{}", std::process::id())),
            confirm_timeout: amqp.confirm_timeout,
        }
    }

    /// What the pipeline may change without restarting the session.
    pub fn live(&self) -> LiveSettings {
        LiveSettings {
            delivered_results: self.results.delivered,
            shutdown_timeout: self.shutdown_timeout,
            retry_delay: self.amqp.retry_delay,
            max_job_attempts: self.amqp.max_job_attempts,
        }
    }
}
