//! apnsd: consumes push jobs from RabbitMQ and delivers them to APNs.
//!
//! The flow of one job, module by module:
//!
//! ```text
//! [jobs queue] → pipeline (intake: intake::Prefetch, job::Job::decode, Job::check per protocol)
//!      → apns::pool (route by token)
//!      → apns::lane (binary: TLS socket, apns::frame, apns::window) → APNs
//!        or apns::http2 (a stream per notification, apns::http2::request) → APNs
//!      → apns::Outcome → pipeline (ledger, results::Event) → amqp::Publisher (confirms)
//!      → ledger::AckPlanner → basic.ack
//! feedback::Poller (binary apps) → pipeline → [results exchange]
//! ```
//!
//! `daemon` wires it together with the configuration, signals and systemd;
//! `simulator` is the APNs stand-in the tests and the quick start run against.
pub mod amqp;
pub mod apns;
pub mod backoff;
pub mod channels;
pub mod check;
pub mod config;
pub mod daemon;
pub mod feedback;
pub mod intake;
pub mod job;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod proxy;
pub mod results;
pub mod send;
pub mod shutdown;
pub mod simulator;
