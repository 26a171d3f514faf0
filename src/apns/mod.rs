//! Everything that speaks to APNs.
pub mod frame;
