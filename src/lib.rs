//! apnsd: consumes push jobs from RabbitMQ and delivers them to APNs.
//!
//! The flow of one job, module by module:
//!
//! ```text
//! [jobs queue] → intake (Subscription, intake::Prefetch, job::Job::decode, Job::check per protocol)
//!      → apns::pool (route by token)
//!      → apns::lane (binary: TLS socket, apns::frame, apns::window) → APNs
//!        or apns::http2 (a stream per notification, apns::http2::request) → APNs
//!      → apns::Outcome → pipeline::settlement (ledger, results::Event)
//!      → amqp::Publisher (confirms) → ledger::AckPlanner → basic.ack
//! feedback::Poller (binary apps) → pipeline → [results exchange]
//! ```
//!
//! `startup` resolves the built-in simulator (if an app needs it) into a
//! `targets::StandIn`; `daemon` runs the apps (`targets`: addresses and
//! identities) and the `pipeline` under its broker `pipeline::supervisor`,
//! applies reloads, and tells `systemd`; `signals` asks for drains and
//! reloads. `simulator` is the APNs stand-in the tests and the quick start
//! run against. The rules that keep this shape: `docs/architecture.md`.
pub mod amqp;
pub mod apns;
pub mod backoff;
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
pub mod results;
pub mod send;
pub mod signals;
pub mod simulator;
pub mod startup;
pub mod systemd;
pub mod targets;
