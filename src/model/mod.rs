//! The seams: the domain types and channel handles that sources, the core and sinks share.
//!
//! A source (`pos`, `presence`) produces these, the core (`engine`, `profiles`, `offers`)
//! consumes and enriches them, and sinks (`uplink`, `cashier`) deliver them; each of those
//! imports this module and not each other's internals. Where a lower part must reach work
//! that a higher one does (the durable step's KPI and attribution work, an erasure's reach
//! into offer and presence history, a register's live events), the seam is a trait here,
//! implemented above and registered by the agent (`daemon`), the only code that knows every
//! part.
//!
//! Invariants:
//! - Nothing here imports a source, the core or a sink: only the bottom layer (`clock`,
//!   `events`, `deadletter`'s record and `store`'s error type).
//! - Money is integer minor units ([`transaction::Money`]); time is a `jiff::Timestamp`
//!   taken from the one injectable clock by whoever builds the value.

pub mod customer;
pub mod downlink;
pub mod ingest;
pub mod presence;
pub mod register;
pub mod transaction;
