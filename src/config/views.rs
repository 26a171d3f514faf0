//! Typed views of the configuration: what each part of the daemon runs on,
//! read from the keys in one place so the wiring only passes them along.

use crate::amqp::Topology;
use crate::apns::binary::BinarySettings;
use crate::apns::http2::growth::{Growth, GROW_AFTER};
use crate::apns::http2::Http2Settings;
use crate::apns::lane::Policy;
use crate::pipeline::{BrokerSettings, LiveSettings};

use super::schema::{AppConfig, Config};

impl AppConfig {
    /// What a binary-protocol lane of this app runs on.
    pub fn binary(&self) -> BinarySettings {
        BinarySettings {
            settle: self.settle,
            retain: self.retain,
            window: self.window,
            max_attempts: self.max_attempts,
            write_timeout: self.write_timeout,
            policy: self.lane_policy(),
        }
    }

    /// What an HTTP/2 lane of this app runs on.
    pub fn http2(&self) -> Http2Settings {
        Http2Settings {
            max_attempts: self.max_attempts,
            max_streams: self.max_concurrent_streams,
            request_timeout: self.request_timeout,
            ping_interval: self.ping_interval,
            policy: self.lane_policy(),
        }
    }

    /// When an HTTP/2 app's connections grow and shrink.
    pub fn growth(&self) -> Growth {
        Growth::with_timing(
            self.connections,
            self.max_connections(),
            GROW_AFTER,
            self.shrink_after,
        )
    }

    /// What lanes of either transport share: connecting, reconnecting, and
    /// what they queue meanwhile (`window` doubles as the HTTP/2 backlog).
    fn lane_policy(&self) -> Policy {
        Policy {
            connect_timeout: self.connect_timeout,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            unusable_after: self.unusable_after,
            backlog: self.window,
        }
    }
}

impl Config {
    /// What a broker session runs on: a change to it restarts the session.
    pub fn broker(&self) -> BrokerSettings {
        let amqp = &self.amqp;
        BrokerSettings {
            uri: amqp.uri.clone(),
            topology: Topology::from(amqp),
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
