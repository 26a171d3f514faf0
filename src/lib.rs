//! apnsd: consumes push jobs from RabbitMQ and delivers them to APNs.
//!
//! The flow of one job, module by module:
//!
//! ```text
//! [jobs queue] → intake (Subscription, intake::Prefetch, job::Job::decode, apns::Protocol::check)
//!      → apns::pool (route by a hash of the whole token)
//!      → apns::lane (connect via apns::connect, reconnect, standby) driving a transport:
//!        apns::binary (TLS socket, apns::frame, apns::window) → APNs
//!        or apns::http2 (a stream per notification, apns::http2::request) → APNs
//!      → apns::Outcome → pipeline::settlement (ledger, results::Event)
//!      → amqp::Publisher (confirms) → ledger::AckPlanner → basic.ack
//! feedback::Poller (binary apps, via apns::connect) → pipeline → [results exchange]
//! ```
//!
//! `startup` resolves the built-in simulator (if an app needs it) into a
//! `targets::StandIn`; `daemon` runs the apps (`targets`: addresses and
//! identities) and the `pipeline` under its broker `pipeline::supervisor`
//! (which rotates over the nodes of `brokers`; `redelivery` is what the
//! settlement remembers of a lost session's jobs),
//! applies reloads, and tells `systemd`; `signals` asks for drains and
//! reloads. `simulator` is the APNs stand-in the tests and the quick start
//! run against. `proxy` is the HTTP CONNECT tunnel `apns::connect` opens
//! when an app has a proxy; `check` and `channels` are commands that speak to
//! Apple once, through the same connector.
//!
//! Rules that keep the shape (more in `docs/architecture.md`): `token` is a
//! leaf and `job` imports only it, so `job`, `apns` and `ledger` form no
//! cycle; protocol limits live in `apns`; every connection to Apple is opened
//! by `apns::connect`; a lane sees an opaque `apns::Withdrawal`, never broker
//! session state; the frame codec and the window reach no I/O.
pub mod amqp;
pub mod apns;
pub mod backoff;
pub mod brokers;
pub mod channels;
pub mod check;
pub mod clock;
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
pub mod redelivery;
pub mod results;
pub mod send;
pub mod signals;
pub mod simulator;
pub mod startup;
pub mod systemd;
pub mod targets;
pub mod token;
