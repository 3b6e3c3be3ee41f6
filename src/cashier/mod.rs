//! The agent's local HTTP face on `cashier.bind`: the lane displays for cashiers, the register
//! API for POS systems, and health, readiness, status and metrics for retail IT.
//!
//! Invariant: everything served is read from state the core already keeps; a request never
//! blocks the pipeline or waits on central.

pub mod api;
pub mod auth;
pub mod lane;
pub mod report;
