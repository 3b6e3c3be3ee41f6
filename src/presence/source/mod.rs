//! Presence sources: whatever hears phones, reduced to [`Advertisement`]s on one bounded channel.
//!
//! Three sources share one trait, [`Source`], and what they are handed, [`Feed`]: a replay
//! file ([`replay`]), remote ESPresense room scanners over MQTT ([`espresense`]) and the
//! gateway's own Bluetooth adapter through BlueZ ([`btle`]). The config picks one of them with
//! `presence.source`.
//!
//! Invariants:
//! - A source hands on only advertisements that carry the tenant's presence payload; the rest is
//!   dropped where it is heard, before it can reach a map, a log line or a metric.
//! - No device address leaves a source. ESPresense's `mac` is never deserialised; BlueZ
//!   peripherals are tracked under a salted hash of their id; the recorder writes a salted hash.
//! - [`Source::run`] returns `Ok(())` only once the token is cancelled. Any error goes to the
//!   supervisor, which restarts the source with backoff; nothing here panics on what it hears.
//! - Backpressure: the replay and ESPresense sources wait for room on the channel. The local
//!   adapter does not: stalling the BlueZ signal stream is worse than losing a sighting (phones
//!   advertise several times a second), so it drops and counts
//!   `storelink_presence_adverts_dropped_total`.
//! - `storelink_presence_adverts_total{source}` counts the presence advertisements each source
//!   received, whether or not the channel had room for them. No metric has a device label.

pub mod btle;
pub mod espresense;
pub mod replay;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::presence::advert::Advertisement;
use crate::supervisor::Component;

pub use crate::config::{BtleSettings, ReplaySettings, ScannerSettings};

/// Which source presence listens to, with its settings (`[presence.replay]`,
/// `[presence.scanners]` or `[presence.btleplug]`).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSettings {
    Replay(ReplaySettings),
    Scanners(ScannerSettings),
    Btleplug(BtleSettings),
}

impl SourceSettings {
    /// The `source` label of this source's metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SourceSettings::Replay(_) => "replay",
            SourceSettings::Scanners(_) => "scanners",
            SourceSettings::Btleplug(_) => "btleplug",
        }
    }
}

/// Why a source stopped. Every variant says what to check; none carries a device address.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("replay file {path}: {source}")]
    ReplayFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A setting the source cannot work with, named by its config key.
    #[error("{0}")]
    Config(#[from] crate::config::Problem),
    #[error("presence.scanners: broker refused the subscription to {0:?}; check its ACL")]
    SubscriptionRefused(String),
    /// No system bus: BlueZ cannot be reached at all.
    #[error(
        "D-Bus unavailable: {0}; BLE presence talks to BlueZ over the system bus (is dbus running, and may this user connect to it?)"
    )]
    DbusUnavailable(String),
    #[error("no Bluetooth adapter: {0}")]
    NoAdapter(String),
    #[error("Bluetooth adapter {adapter}: {reason}")]
    Adapter { adapter: String, reason: String },
    #[error("recording to {path}: {source}")]
    Record {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The receiving end is gone: the presence pipeline is shutting down or has failed.
    #[error("the presence pipeline stopped taking advertisements")]
    Closed,
}

/// What every source is handed when it starts: whose sightings to keep, where they go, and
/// what it runs under. One struct, so the sources share one run signature.
pub struct Feed {
    /// The tenant's presence service UUID; sightings without its payload are dropped.
    pub tenant: uuid::Uuid,
    /// The presence pipeline's bounded channel.
    pub out: mpsc::Sender<Advertisement>,
    pub clock: SharedClock,
    /// The supervisor's handle on this task, for running / degraded status.
    pub component: Component,
    pub token: CancellationToken,
}

/// A presence source. `run` hands on the tenant's sightings until `feed.token` is cancelled,
/// and returns `Ok(())` only then (see the invariants above).
pub trait Source {
    fn run(&self, feed: Feed) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// The configured source, whichever it is.
impl Source for SourceSettings {
    async fn run(&self, feed: Feed) -> Result<(), SourceError> {
        match self {
            SourceSettings::Replay(s) => s.run(feed).await,
            SourceSettings::Scanners(s) => s.run(feed).await,
            SourceSettings::Btleplug(s) => s.run(feed).await,
        }
    }
}

/// Counts one presence advertisement a source received.
fn count_received(source: &'static str) {
    metrics::counter!("storelink_presence_adverts_total", "source" => source).increment(1);
}

/// Hands an advertisement on, waiting for room; gives up when the token is cancelled (returns
/// `Ok(false)`) or the pipeline has gone away.
async fn send(
    out: &mpsc::Sender<Advertisement>,
    advert: Advertisement,
    token: &CancellationToken,
) -> Result<bool, SourceError> {
    tokio::select! {
        biased;
        _ = token.cancelled() => Ok(false),
        sent = out.send(advert) => sent.map(|()| true).map_err(|_| SourceError::Closed),
    }
}
