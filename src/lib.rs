//! apnsd: consumes push jobs from RabbitMQ and delivers them to APNs.
pub mod apns;
pub mod job;
