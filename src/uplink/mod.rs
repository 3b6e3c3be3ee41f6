//! Sinks toward central: the durable [`outbox`] and the transports that drain it ([`mqtt`]).
//!
//! Invariant: an event leaves the outbox only when central has acknowledged it (a PUBACK), so
//! every path here delivers at least once, with stable CloudEvent ids for de-duplication.

pub mod mqtt;
pub mod outbox;
