//! The presence pipeline: advertisements in, `storelink.presence.v1` events out.
//!
//! [`Recogniser`] is the synchronous heart (resolve → smooth → zone), kept free of I/O so it can
//! be benchmarked and tested by driving time. [`run`] wraps it in a task: it pulls
//! advertisements from the bounded source channel, ticks the tracker, follows rotation windows
//! and profile changes, and hands each change to the outbox (through the engine), to the
//! history tree and to the core's broadcast channel.
//!
//! Invariants:
//! - An advertisement that does not resolve to exactly one consenting customer is counted and
//!   dropped before any state exists for it (see [`Recogniser::handle`]).
//! - When a customer's consent or key goes away, their tracking state goes with it, silently:
//!   no `left` event is made up for someone we may no longer follow.
//! - Customer ids appear in logs at debug level only.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::{Mutex, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::advert::Advertisement;
use super::history::{History, Record};
use super::identity::{PresenceKey, Resolution, Resolver};
use super::signal::Calibration;
use super::zones::{Place, PresenceChange, Tracker, TrackerConfig};
use crate::clock::SharedClock;
use crate::config::PresenceSection;
use crate::events::{self, EventKind};
use crate::model::ingest::{IngestHandle, NewEvent};
pub use crate::model::presence::PresenceEvent;
use crate::profiles::ProfileStore;
use crate::store::StoreError;
use crate::supervisor::Component;

/// Capacity of the source → pipeline channel. Sources block on it (replay, scanners) or
/// count what does not fit (the local adapter), so a slow pipeline is visible, not silent.
pub const ADVERT_CHANNEL: usize = 8192;

/// How often time-based transitions (dwelling, left) are looked at.
const TICK: Duration = Duration::from_millis(250);

/// Profile changes arrive in bursts during a sync; the table is rebuilt at most this often.
const RELOAD_DEBOUNCE: Duration = Duration::from_secs(1);

/// How often expired history is removed.
const EXPIRY_EVERY: Duration = Duration::from_secs(3600);

/// How many advertisements are taken from the channel at once.
const BATCH: usize = 512;

/// Capacity of the broadcast channel to the core; a lagging consumer loses the oldest.
pub const EVENT_BROADCAST: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("profile store: {0}")]
    Store(#[from] StoreError),
    #[error("rebuilding the identity table: {0}")]
    Rebuild(String),
}

/// The `data` of a `storelink.presence.v1` CloudEvent.
#[derive(Debug, Serialize)]
pub struct PresenceData<'a> {
    pub store: &'a str,
    pub customer_id: &'a str,
    pub event: &'static str,
    /// A zone name, or `store`.
    pub zone: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane: Option<&'a str>,
    pub confidence: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance_m: Option<f32>,
}

/// Sightings that led nowhere, counted since the last [`Recogniser::take_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub recognised: u64,
    pub unknown: u64,
    pub ambiguous: u64,
}

/// Builds the tracker configuration from `[presence]`.
pub fn tracker_config(section: &PresenceSection) -> TrackerConfig {
    TrackerConfig {
        zones: section.zones.clone(),
        calibration: section
            .calibration
            .iter()
            .map(|c| {
                (
                    c.scanner.clone(),
                    Calibration {
                        ref_rssi_1m: c.ref_rssi_1m,
                        path_loss_exponent: c.path_loss_exponent,
                    },
                )
            })
            .collect(),
        default_calibration: Calibration::default(),
        store_away_s: section.store_away_s,
    }
}

/// Resolve → smooth → zone, without I/O.
pub struct Recogniser {
    resolver: Resolver,
    tracker: Tracker<Arc<str>>,
    rotation_s: u32,
    counts: Counts,
}

impl std::fmt::Debug for Recogniser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recogniser")
            .field("customers", &self.resolver.len())
            .field("tracked", &self.tracker.tracked())
            .finish_non_exhaustive()
    }
}

impl Recogniser {
    pub fn new(
        customers: Vec<(Arc<str>, PresenceKey)>,
        config: TrackerConfig,
        rotation_s: u32,
        now: Timestamp,
    ) -> Recogniser {
        Recogniser {
            resolver: Resolver::new(customers, now, rotation_s),
            tracker: Tracker::new(config),
            rotation_s,
            counts: Counts::default(),
        }
    }

    /// Takes one advertisement. Only a sighting that resolves to exactly one customer touches
    /// the tracker; everything else is a counter increment and nothing more.
    pub fn handle(&mut self, ad: &Advertisement, out: &mut Vec<PresenceChange<Arc<str>>>) {
        match self.resolver.resolve(&ad.payload) {
            Resolution::Customer(idx) => {
                self.counts.recognised += 1;
                let customer = self.resolver.customer(idx);
                self.tracker.observe(
                    customer,
                    &ad.scanner,
                    ad.rssi,
                    ad.tx_power,
                    ad.distance_m,
                    ad.at,
                    out,
                );
            }
            Resolution::Unknown => self.counts.unknown += 1,
            Resolution::Ambiguous => self.counts.ambiguous += 1,
        }
    }

    /// Time passes: dwelling and left transitions.
    pub fn tick(&mut self, now: Timestamp, out: &mut Vec<PresenceChange<Arc<str>>>) {
        self.tracker.tick(now, out);
    }

    /// Whether `now` is in a window other than the table's.
    pub fn window_turned(&self, now: Timestamp) -> bool {
        super::identity::window_of(now, self.rotation_s) != self.resolver.window()
    }

    /// Rebuilds the table for the window of `now` (the rebuild costs three HMACs per customer).
    pub fn refresh(&mut self, now: Timestamp) {
        self.resolver.refresh(now);
    }

    /// Replaces the table with a freshly built one, and forgets everyone it no longer holds.
    pub fn replace(&mut self, resolver: Resolver) {
        let current: HashSet<&str> = (0..resolver.len() as u32)
            .map(|i| &**resolver.customer(i))
            .collect();
        let gone = self.tracker.retain_customers(|c| current.contains(&**c));
        if gone > 0 {
            tracing::info!(
                forgotten = gone,
                "stopped following customers whose presence consent or key is gone"
            );
        }
        self.resolver = resolver;
    }

    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// Customers with tracking state.
    pub fn tracked(&self) -> usize {
        self.tracker.tracked()
    }

    /// Customers the table can recognise.
    pub fn recognisable(&self) -> usize {
        self.resolver.len()
    }

    pub fn tracker(&self) -> &Tracker<Arc<str>> {
        &self.tracker
    }
}

/// Everything the pipeline task needs besides its channel.
#[derive(Clone)]
pub struct Pipeline {
    pub store_id: String,
    pub section: PresenceSection,
    pub profiles: ProfileStore,
    pub history: History,
    pub ingest: IngestHandle,
    pub events: broadcast::Sender<PresenceEvent>,
    pub clock: SharedClock,
}

impl Pipeline {
    /// Runs until cancelled. `ads` is shared so the supervisor can restart the task on the
    /// same channel.
    pub async fn run(
        &self,
        ads: Arc<Mutex<mpsc::Receiver<Advertisement>>>,
        component: Component,
        token: CancellationToken,
    ) -> Result<(), PresenceError> {
        let mut ads = ads.lock().await;
        let mut changes_rx = self.profiles.subscribe();
        changes_rx.mark_unchanged();
        let rotation_s = self.section.rotation_s;
        let mut recogniser = Recogniser::new(
            self.load_keys().await?,
            tracker_config(&self.section),
            rotation_s,
            self.clock.now(),
        );
        self.report(&component, &recogniser);
        if let Ok(n) = self.history.expire(self.clock.now())
            && n > 0
        {
            tracing::info!(removed = n, "expired presence history");
        }

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut expiry = tokio::time::interval(EXPIRY_EVERY);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        expiry.reset();
        let mut batch = Vec::with_capacity(BATCH);
        let mut changes = Vec::new();
        let mut ads_open = true;
        let mut reload_due: Option<tokio::time::Instant> = None;
        let mut last_report = tokio::time::Instant::now();

        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                n = ads.recv_many(&mut batch, BATCH), if ads_open => {
                    if n == 0 {
                        // No source (or it is gone for good): time-based events still happen.
                        ads_open = false;
                    }
                    for ad in batch.drain(..) {
                        recogniser.handle(&ad, &mut changes);
                    }
                }
                _ = tick.tick() => {
                    let now = self.clock.now();
                    if recogniser.window_turned(now) {
                        recogniser = rebuild_window(recogniser, now).await?;
                    }
                    if reload_due.is_some_and(|due| tokio::time::Instant::now() >= due) {
                        reload_due = None;
                        let keys = self.load_keys().await?;
                        let resolver = build_resolver(keys, now, rotation_s).await?;
                        recogniser.replace(resolver);
                        self.report(&component, &recogniser);
                    }
                    recogniser.tick(now, &mut changes);
                    flush_counts(&mut recogniser);
                    if last_report.elapsed() >= Duration::from_secs(5) {
                        last_report = tokio::time::Instant::now();
                        self.report(&component, &recogniser);
                    }
                }
                Ok(()) = changes_rx.changed() => {
                    reload_due.get_or_insert_with(|| tokio::time::Instant::now() + RELOAD_DEBOUNCE);
                }
                _ = expiry.tick() => {
                    match self.history.expire(self.clock.now()) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "expired presence history"),
                        Err(e) => tracing::warn!(error = %e, "could not expire presence history"),
                    }
                }
            }
            if !changes.is_empty() {
                self.emit(&recogniser, &mut changes).await;
            }
        }
        flush_counts(&mut recogniser);
        Ok(())
    }

    async fn load_keys(&self) -> Result<Vec<(Arc<str>, PresenceKey)>, PresenceError> {
        let profiles = self.profiles.clone();
        tokio::task::spawn_blocking(move || profiles.presence_keys())
            .await
            .map_err(|e| PresenceError::Rebuild(e.to_string()))?
            .map_err(PresenceError::from)
    }

    fn report(&self, component: &Component, recogniser: &Recogniser) {
        metrics::gauge!("storelink_presence_tracked").set(recogniser.tracked() as f64);
        metrics::gauge!("storelink_presence_recognisable_customers")
            .set(recogniser.recognisable() as f64);
        if self.section.source == crate::config::PresenceSource::None {
            component.running(Some(
                "off (presence.source = \"none\"); history still expires".to_string(),
            ));
            return;
        }
        component.running(Some(format!(
            "{} customers recognisable, {} present",
            recogniser.recognisable(),
            recogniser.tracked()
        )));
    }

    /// Hands each change to the outbox, the history and the core.
    async fn emit(&self, recogniser: &Recogniser, changes: &mut Vec<PresenceChange<Arc<str>>>) {
        let zones = recogniser.tracker().zones();
        let mut records = Vec::with_capacity(changes.len());
        for change in changes.drain(..) {
            let (zone, lane) = match change.place {
                Place::Store => (None, None),
                Place::Zone(i) => (Some(zones[i].name.clone()), zones[i].lane.clone()),
            };
            let place = zone.as_deref().unwrap_or("store");
            let kind = change.kind.as_str();
            let id = format!(
                "presence:{}:{}:{}:{}:{}",
                self.store_id,
                change.customer,
                place,
                kind,
                change.at.as_microsecond()
            );
            let data = PresenceData {
                store: &self.store_id,
                customer_id: &change.customer,
                event: kind,
                zone: place,
                lane: lane.as_deref(),
                confidence: round2(change.confidence),
                distance_m: change.distance_m.map(round2),
            };
            let payload =
                events::encode(EventKind::Presence, &id, &self.store_id, change.at, &data);
            tracing::debug!(customer = %change.customer, event = kind, zone = place, "presence");
            metrics::counter!("storelink_presence_events_total", "event" => kind).increment(1);
            if self
                .ingest
                .event(NewEvent {
                    kind: EventKind::Presence,
                    id: id.clone(),
                    payload,
                })
                .await
                .is_err()
            {
                tracing::debug!("agent stopping; presence event not queued");
            }
            records.push(Record {
                customer_id: change.customer.to_string(),
                event: kind.to_string(),
                place: place.to_string(),
                lane: lane.clone(),
                at: change.at,
            });
            // No receiver (no core consumer yet) is fine; a lagging one loses the oldest.
            let _ = self.events.send(PresenceEvent {
                id,
                customer_id: change.customer,
                kind: change.kind,
                zone,
                lane,
                at: change.at,
                confidence: change.confidence,
                distance_m: change.distance_m,
            });
        }
        if let Err(e) = self.history.append(&records) {
            tracing::warn!(error = %e, "could not record presence history");
        }
    }
}

fn round2(x: f32) -> f32 {
    (x * 100.0).round() / 100.0
}

fn flush_counts(recogniser: &mut Recogniser) {
    let c = recogniser.take_counts();
    if c.recognised > 0 {
        metrics::counter!("storelink_presence_recognised_total").increment(c.recognised);
    }
    if c.unknown > 0 {
        metrics::counter!("storelink_presence_unrecognised_total").increment(c.unknown);
    }
    if c.ambiguous > 0 {
        metrics::counter!("storelink_presence_ambiguous_total").increment(c.ambiguous);
    }
}

/// Builds a table off the async threads: three HMACs per customer add up with many.
async fn build_resolver(
    keys: Vec<(Arc<str>, PresenceKey)>,
    now: Timestamp,
    rotation_s: u32,
) -> Result<Resolver, PresenceError> {
    tokio::task::spawn_blocking(move || Resolver::new(keys, now, rotation_s))
        .await
        .map_err(|e| PresenceError::Rebuild(e.to_string()))
}

async fn rebuild_window(
    mut recogniser: Recogniser,
    now: Timestamp,
) -> Result<Recogniser, PresenceError> {
    tokio::task::spawn_blocking(move || {
        recogniser.refresh(now);
        recogniser
    })
    .await
    .map_err(|e| PresenceError::Rebuild(e.to_string()))
}
