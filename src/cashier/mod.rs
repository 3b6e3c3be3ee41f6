//! The agent's local HTTP face on `cashier.bind`: today health, readiness, status and metrics
//! for retail IT; the lane displays and the register API join it here.
//!
//! Invariant: everything served is read from state the core already keeps; a request never
//! blocks the pipeline or waits on central.

pub mod api;
