//! Sinks toward central: the durable [`outbox`] and the two paths that drain it, [`mqtt`] (live)
//! and [`https`] (bulk backfill).
//!
//! Invariants:
//! - An event leaves the outbox only when central has acknowledged it (a PUBACK, or a 2xx for
//!   the batch that held it), so every path delivers at least once, with stable CloudEvent ids
//!   for de-duplication.
//! - A sender claims the entries it sends ([`outbox::Outbox::claim`]); the other path never
//!   sees them until they are acknowledged or released, so the paths never race on an entry.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use jiff::Timestamp;

pub mod https;
pub mod mqtt;
pub mod outbox;
pub mod session;

/// What the HTTPS path needs to know about the MQTT path: whether it is up, and since when it
/// has been down.
#[derive(Debug, Default)]
pub struct PathState {
    mqtt_connected: AtomicBool,
    mqtt_down_since: Mutex<Option<Timestamp>>,
}

impl PathState {
    pub fn mqtt_up(&self) {
        self.mqtt_connected.store(true, Ordering::Release);
        *self.mqtt_down_since.lock().expect("path state lock") = None;
    }

    /// Marks MQTT down, keeping the start of an outage that is already going on.
    pub fn mqtt_down(&self, now: Timestamp) {
        self.mqtt_connected.store(false, Ordering::Release);
        self.mqtt_down_since
            .lock()
            .expect("path state lock")
            .get_or_insert(now);
    }

    pub fn mqtt_connected(&self) -> bool {
        self.mqtt_connected.load(Ordering::Acquire)
    }

    /// When the current MQTT outage began; none while connected.
    pub fn mqtt_down_since(&self) -> Option<Timestamp> {
        *self.mqtt_down_since.lock().expect("path state lock")
    }
}
