//! Presence: recognising opted-in customers' phones in the store, over Bluetooth LE.
//!
//! Sources (a local adapter, remote room scanners over MQTT, a replay file) turn what radios
//! hear into [`advert::Advertisement`]s carrying only a presence payload. [`identity`] resolves
//! a payload to a consenting customer, or drops it on the spot. The tracker smooths signal
//! strength into distance and turns it into zone events (entered, dwelling, left), which go to
//! the outbox as `storelink.presence.v1` and to the core for offers and prompts.
//!
//! Invariants (privacy by design):
//! - Only customers with presence consent and a key can be recognised.
//! - A sighting that does not resolve creates no state, no log line and no metric label; no
//!   device address ever enters this module.

pub mod advert;
pub mod history;
pub mod identity;
pub mod phones;
pub mod pipeline;
pub mod signal;
pub mod source;
pub mod walk;
pub mod zones;
