//! Zones and presence events: where in the store a recognised customer is.
//!
//! The [`Tracker`] takes resolved sightings (customer, scanner, signal) and emits
//! [`PresenceChange`]s for the store as a whole and for configured zones (the entrance, an
//! aisle, a checkout lane).
//!
//! Rules, per customer:
//! - **Store.** `entered` once a reading gives an estimate of at least [`STORE_CONFIDENCE`]
//!   (two readings in quick succession; a single one never does); `left` after
//!   `store_away_s` without any reading, after which all of the customer's state is dropped.
//! - **Zone.** A zone's distance is the smoothed distance to the nearest of its scanners.
//!   `entered` when it is within `enter_m` with confidence of at least [`ENTER_CONFIDENCE`],
//!   and has stayed so for [`ENTER_HOLD_S`] and [`MIN_SUPPORT`] readings from the zone's own
//!   scanners (readings from other scanners re-evaluate too, but bring no news about this
//!   zone, so time alone must not confirm it). `dwelling` once, `dwell_s` after entering.
//!   `left` once `away_s` pass without a reading that puts the customer within `exit_m`:
//!   between `enter_m` and `exit_m` the customer stays in (hysteresis).
//! - **One zone at a time; no flapping.** Of all zones whose entry condition holds, the
//!   nearest wins. Moving from zone A to zone B needs B to win and to be nearer than A's own
//!   smoothed distance by the factor [`SWITCH_RATIO`] (a quarter nearer, 2.5 dB at n = 2).
//!   While A is still being heard within its `exit_m` (within the last [`SWITCH_HOLD_S`]),
//!   the customer is torn between the two and B must win for [`SWITCH_HOLD_S`]; once A has
//!   gone quiet, the customer has walked out of it and B is entered like any first zone.
//!   Then `left` A is emitted, followed by `entered` B. A phone standing where two zones meet
//!   thus stays in the one it entered first instead of toggling with every fade, and a
//!   shopper walking from the aisle to a lane is not made to wait.
//!
//! The holds are what 8 dB of shadowing costs: on the demo walks (`walk`), with phones
//! advertising every 100 ms and 30% loss, entries are detected 1.0 s (median) and at most
//! 3 s after the phone crosses `enter_m`, with no wrong zones. Advertising every 250 ms
//! gives too few readings for that at 8 dB; see `tests/it/presence_zones.rs`.
//!
//! Invariants:
//! - Events for one customer are causal: store `entered` precedes any zone event, a zone's
//!   `left` follows its `entered` and precedes the next zone's `entered` and the store's
//!   `left`. Every event carries the time the tracker decided it (the reading's or the tick's
//!   time), so a customer's events are in time order as long as readings are.
//! - [`Tracker::observe`] allocates nothing for a customer already tracked: the customer's
//!   filters live in a fixed array of [`SLOTS`], one per nearby zone scanner (when all are in
//!   use, the farthest gives way to a nearer scanner). Scanner ids are interned to indices, up
//!   to [`MAX_SCANNERS`]; readings from scanners beyond that count for store presence only.
//! - Readings from scanners that cover no zone still make store presence, through one shared
//!   filter per customer.
//! - [`Tracker::forget`] leaves nothing behind and emits nothing: consent was withdrawn, so
//!   even a `left` would be a record about that customer.

use std::collections::HashMap;
use std::hash::Hash;

use jiff::Timestamp;
use serde::Deserialize;

use super::signal::{Calibration, PathLossFilter, RESTART_AFTER_S};
pub use crate::model::presence::PresenceKind;

/// Scanner ids interned per tracker. More scanners than this in one store is a misconfigured
/// or hostile source; their readings still count for store presence.
pub const MAX_SCANNERS: usize = 256;
/// Zones per store.
pub const MAX_ZONES: usize = 1024;
/// Zone scanners whose filters a customer keeps at once.
pub const SLOTS: usize = 6;
/// Confidence an estimate needs for a zone entry or switch.
pub const ENTER_CONFIDENCE: f32 = 0.4;
/// Confidence the first estimate needs for store presence.
pub const STORE_CONFIDENCE: f32 = 0.4;
/// How long a zone must stay the winner before a customer enters it.
pub const ENTER_HOLD_S: f32 = 0.5;
/// How long a zone must stay the winner before a customer still heard in another zone moves
/// to it; also how long that other zone must be quiet for the customer to count as gone.
pub const SWITCH_HOLD_S: f32 = 1.0;
/// Readings from a zone's own scanners, while it wins, before it is entered.
pub const MIN_SUPPORT: u16 = 2;
/// A switch needs the new zone's distance below this fraction of the current zone's.
pub const SWITCH_RATIO: f32 = 0.75;

const NO_SCANNER: u16 = u16::MAX;

fn default_store_away_s() -> u32 {
    60
}

pub use crate::config::ZoneSpec;

/// What the tracker needs to know about the store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerConfig {
    #[serde(default)]
    pub zones: Vec<ZoneSpec>,
    /// Per scanner id; scanners not listed use `default_calibration`.
    #[serde(default)]
    pub calibration: HashMap<String, Calibration>,
    #[serde(default)]
    pub default_calibration: Calibration,
    #[serde(default = "default_store_away_s")]
    pub store_away_s: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            zones: Vec::new(),
            calibration: HashMap::new(),
            default_calibration: Calibration::default(),
            store_away_s: default_store_away_s(),
        }
    }
}

impl TrackerConfig {
    /// Checks everything [`Tracker::new`] would otherwise have to make safe. Errors name the
    /// key path, as `check-config` reports them.
    pub fn validate(&self) -> Result<(), String> {
        if self.zones.len() > MAX_ZONES {
            return Err(format!(
                "zones: {} zones, at most {MAX_ZONES}",
                self.zones.len()
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut scanners = std::collections::HashSet::new();
        for (i, zone) in self.zones.iter().enumerate() {
            zone.validate().map_err(|e| format!("zones[{i}].{e}"))?;
            if !names.insert(zone.name.as_str()) {
                return Err(format!("zones[{i}].name: {:?} names two zones", zone.name));
            }
            scanners.extend(zone.scanners.iter().map(String::as_str));
        }
        if scanners.len() > MAX_SCANNERS {
            return Err(format!(
                "zones: {} scanner ids, at most {MAX_SCANNERS}",
                scanners.len()
            ));
        }
        let mut calibrated: Vec<_> = self.calibration.iter().collect();
        calibrated.sort_by(|a, b| a.0.cmp(b.0));
        for (id, c) in calibrated {
            c.validate().map_err(|e| format!("calibration.{id}.{e}"))?;
        }
        self.default_calibration
            .validate()
            .map_err(|e| format!("default_calibration.{e}"))?;
        if self.store_away_s == 0 {
            return Err("store_away_s: must be at least 1 s".into());
        }
        Ok(())
    }
}

/// Where it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    Store,
    /// Index into [`Tracker::zones`].
    Zone(usize),
}

/// One presence event.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceChange<K> {
    pub customer: K,
    pub kind: PresenceKind,
    pub place: Place,
    /// When the tracker decided: the time of the reading or tick that settled it.
    pub at: Timestamp,
    /// 0..=1. For `entered` and `dwelling`, the confidence of the estimate that placed the
    /// customer; for `left`, how sure we are they are gone: the confidence of an estimate
    /// placing them outside, or one minus the (decayed) confidence of the last one inside.
    pub confidence: f32,
    /// Smoothed distance to the zone's nearest scanner, for zone `entered` and `dwelling`.
    pub distance_m: Option<f32>,
}

/// A zone's numbers, made safe and in the units the hot path uses.
#[derive(Debug, Clone, Copy)]
struct Limits {
    enter_m: f32,
    exit_m: f32,
    dwell_us: i64,
    away_us: i64,
}

#[derive(Debug, Clone)]
struct Scanner {
    calibration: Calibration,
    zones: Box<[u16]>,
}

#[derive(Debug, Clone, Copy)]
struct Visit {
    zone: u16,
    dwelling: bool,
    entered_us: i64,
    /// The latest reading that put the customer within the zone's `exit_m`.
    last_inside_us: i64,
}

/// A zone that wins but has not yet held long enough.
#[derive(Debug, Clone, Copy)]
struct Pending {
    zone: u16,
    /// Readings from the zone's own scanners while it kept winning. Other scanners' readings
    /// re-evaluate too, but bring no news about this zone.
    support: u16,
    since_us: i64,
}

/// Everything known about one customer. Fixed size: no heap.
#[derive(Debug, Clone)]
struct CustomerState {
    /// Scanner index per slot, `NO_SCANNER` for a free slot. Kept apart from the filters so
    /// that the filters pack without padding.
    scanners: [u16; SLOTS],
    filters: [PathLossFilter; SLOTS],
    /// Readings from scanners that cover no zone, or that no slot took.
    elsewhere: PathLossFilter,
    last_seen_us: i64,
    in_store: bool,
    visit: Option<Visit>,
    pending: Option<Pending>,
}

impl CustomerState {
    fn new(at_us: i64) -> Self {
        CustomerState {
            scanners: [NO_SCANNER; SLOTS],
            filters: [PathLossFilter::EMPTY; SLOTS],
            elsewhere: PathLossFilter::EMPTY,
            last_seen_us: at_us,
            in_store: false,
            visit: None,
            pending: None,
        }
    }
}

/// The store's zones and scanners; read-only once built, apart from interning.
#[derive(Debug)]
struct Site {
    zones: Vec<ZoneSpec>,
    limits: Vec<Limits>,
    scanners: Vec<Scanner>,
    scanner_ids: HashMap<Box<str>, u16>,
    calibration: HashMap<String, Calibration>,
    default_calibration: Calibration,
    store_away_us: i64,
}

/// Turns sightings into presence events. `K` identifies a customer.
#[derive(Debug)]
pub struct Tracker<K> {
    site: Site,
    customers: HashMap<K, CustomerState>,
}

const MICROS: i64 = 1_000_000;

fn secs_to_us(s: f32) -> i64 {
    (f64::from(s) * 1e6) as i64
}

impl<K: Clone + Eq + Hash> Tracker<K> {
    /// Builds the tracker. It expects a config that passed [`TrackerConfig::validate`];
    /// numbers that did not are made safe rather than trusted (an `exit_m` below `enter_m`
    /// becomes `enter_m`, zones and scanners beyond the limits are ignored).
    pub fn new(config: TrackerConfig) -> Tracker<K> {
        let mut zones = config.zones;
        zones.truncate(MAX_ZONES);
        let limits = zones
            .iter()
            .map(|z| {
                let enter_m = if z.enter_m.is_finite() {
                    z.enter_m.max(0.0)
                } else {
                    0.0
                };
                let exit_m = if z.exit_m.is_finite() {
                    z.exit_m.max(enter_m)
                } else {
                    enter_m
                };
                Limits {
                    enter_m,
                    exit_m,
                    dwell_us: i64::from(z.dwell_s) * MICROS,
                    away_us: i64::from(z.away_s.max(1)) * MICROS,
                }
            })
            .collect();
        let mut site = Site {
            zones,
            limits,
            scanners: Vec::new(),
            scanner_ids: HashMap::new(),
            calibration: config.calibration,
            default_calibration: config.default_calibration,
            store_away_us: i64::from(config.store_away_s.max(1)) * MICROS,
        };
        let mut coverage: Vec<Vec<u16>> = Vec::new();
        for zi in 0..site.zones.len() {
            for si in 0..site.zones[zi].scanners.len() {
                let id = site.zones[zi].scanners[si].clone();
                let idx = site.intern(&id);
                if idx == NO_SCANNER {
                    continue;
                }
                let idx = usize::from(idx);
                coverage.resize_with(coverage.len().max(idx + 1), Vec::new);
                let zone = zi as u16;
                if !coverage[idx].contains(&zone) {
                    coverage[idx].push(zone);
                }
            }
        }
        for (idx, zones) in coverage.into_iter().enumerate() {
            site.scanners[idx].zones = zones.into_boxed_slice();
        }
        Tracker {
            site,
            customers: HashMap::new(),
        }
    }

    /// Takes one resolved sighting of `customer` by `scanner`, and appends what it changes.
    ///
    /// `scanner_distance_m` is a remote scanner's own distance estimate (ESPresense sends
    /// one); when present and sane it is used instead of our path-loss estimate from `rssi`,
    /// and smoothed the same way.
    #[allow(
        clippy::too_many_arguments,
        reason = "one sighting's fields, passed apart so that the hot path builds no struct"
    )]
    pub fn observe(
        &mut self,
        customer: &K,
        scanner: &str,
        rssi: i16,
        tx_power: Option<i16>,
        scanner_distance_m: Option<f32>,
        at: Timestamp,
        out: &mut Vec<PresenceChange<K>>,
    ) {
        let s = self.site.intern(scanner);
        let site = &self.site;
        let calibration = site.calibration_of(s);
        let reading = match scanner_distance_m {
            Some(d) if d.is_finite() && d > 0.0 => calibration.loss_of_distance(d),
            _ => calibration.loss_db(f32::from(rssi), tx_power),
        };
        let at_us = at.as_microsecond();
        if let Some(state) = self.customers.get_mut(customer) {
            site.observe(customer, state, s, reading, at, at_us, out);
        } else {
            let mut state = CustomerState::new(at_us);
            site.observe(customer, &mut state, s, reading, at, at_us, out);
            self.customers.insert(customer.clone(), state);
        }
    }

    /// Lets time pass: emits `dwelling` and `left` that are due at `now`, and drops the state
    /// of customers gone from the store. Call it every 250 ms to 1 s.
    pub fn tick(&mut self, now: Timestamp, out: &mut Vec<PresenceChange<K>>) {
        let now_us = now.as_microsecond();
        let site = &self.site;
        self.customers
            .retain(|who, state| !site.advance(who, state, now, now_us, out));
    }

    /// Drops everything about `customer` without a trace or an event (consent withdrawn).
    pub fn forget(&mut self, customer: &K) {
        self.customers.remove(customer);
    }

    /// Forgets, as [`Tracker::forget`] does, every customer for whom `keep` is false; returns
    /// how many went.
    pub fn retain_customers(&mut self, mut keep: impl FnMut(&K) -> bool) -> usize {
        let before = self.customers.len();
        self.customers.retain(|k, _| keep(k));
        before - self.customers.len()
    }

    /// Customers with state.
    pub fn tracked(&self) -> usize {
        self.customers.len()
    }

    pub fn zones(&self) -> &[ZoneSpec] {
        &self.site.zones
    }

    /// The zone `customer` is in, as an index into [`Tracker::zones`].
    pub fn zone_of(&self, customer: &K) -> Option<usize> {
        self.customers
            .get(customer)
            .and_then(|s| s.visit)
            .map(|v| usize::from(v.zone))
    }

    /// Approximate memory per tracked customer: the map entry (key and state) with the hash
    /// table's control byte and load factor. Heap owned by `K` itself (an `Arc<str>`'s text)
    /// is not included.
    pub fn approx_bytes_per_customer(&self) -> usize {
        (std::mem::size_of::<(K, CustomerState)>() + 1) * 8 / 7
    }
}

impl Site {
    /// The scanner's index, interning it if there is room. Allocates only the first time an
    /// id is seen, and at most [`MAX_SCANNERS`] times in the tracker's life.
    fn intern(&mut self, id: &str) -> u16 {
        if let Some(&idx) = self.scanner_ids.get(id) {
            return idx;
        }
        if self.scanners.len() >= MAX_SCANNERS {
            return NO_SCANNER;
        }
        let idx = self.scanners.len() as u16;
        let calibration = self
            .calibration
            .get(id)
            .copied()
            .unwrap_or(self.default_calibration);
        self.scanners.push(Scanner {
            calibration,
            zones: Box::new([]),
        });
        self.scanner_ids.insert(id.into(), idx);
        idx
    }

    fn calibration_of(&self, s: u16) -> &Calibration {
        self.scanners
            .get(usize::from(s))
            .map_or(&self.default_calibration, |sc| &sc.calibration)
    }

    fn zones_of(&self, s: u16) -> &[u16] {
        self.scanners
            .get(usize::from(s))
            .map_or(&[], |sc| &sc.zones)
    }

    fn covers(&self, s: u16, zone: u16) -> bool {
        self.zones_of(s).contains(&zone)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the time in both forms saves conversions"
    )]
    fn observe<K: Clone>(
        &self,
        who: &K,
        st: &mut CustomerState,
        s: u16,
        reading: f32,
        at: Timestamp,
        at_us: i64,
        out: &mut Vec<PresenceChange<K>>,
    ) {
        // Whatever fell due before this reading happened first.
        if self.advance(who, st, at, at_us, out) {
            *st = CustomerState::new(at_us);
        }
        let slot = if self.zones_of(s).is_empty() {
            None
        } else {
            let distance = self.calibration_of(s).distance_of_loss(reading);
            self.slot_for(st, s, distance, at_us)
        };
        let filter = match slot {
            Some(i) => &mut st.filters[i],
            None => &mut st.elsewhere,
        };
        filter.update_us(reading, at_us);
        let (_, confidence) = filter.loss_and_confidence(at_us);
        st.last_seen_us = st.last_seen_us.max(at_us);
        if !st.in_store {
            if confidence < STORE_CONFIDENCE {
                return;
            }
            st.in_store = true;
            out.push(PresenceChange {
                customer: who.clone(),
                kind: PresenceKind::Entered,
                place: Place::Store,
                at,
                confidence,
                distance_m: None,
            });
        }
        if let Some(i) = slot {
            self.place(who, st, s, i, at, at_us, out);
        }
        self.dwell(who, st, at, at_us, out);
    }

    /// The slot for a reading from zone scanner `s` at raw `distance`: its own, a free or
    /// stale one, or the one of the farthest scanner if this reading is nearer. The current
    /// zone's scanners keep their slots. `None` drops the reading to the shared filter.
    fn slot_for(&self, st: &mut CustomerState, s: u16, distance: f32, at_us: i64) -> Option<usize> {
        if let Some(i) = st.scanners.iter().position(|&x| x == s) {
            return Some(i);
        }
        let current = st.visit.map(|v| v.zone);
        let mut victim = None;
        let mut victim_distance = distance;
        for i in 0..SLOTS {
            let sc = st.scanners[i];
            if sc == NO_SCANNER || st.filters[i].age_s(at_us) > RESTART_AFTER_S {
                victim = Some(i);
                break;
            }
            if current.is_some_and(|z| self.covers(sc, z)) {
                continue;
            }
            let d = self
                .calibration_of(sc)
                .distance_of_loss(st.filters[i].loss());
            if d > victim_distance {
                victim = Some(i);
                victim_distance = d;
            }
        }
        let i = victim?;
        st.scanners[i] = s;
        st.filters[i] = PathLossFilter::EMPTY;
        Some(i)
    }

    /// Zone logic after a reading from zone scanner `s` landed in slot `slot`.
    #[allow(
        clippy::too_many_arguments,
        reason = "the time in both forms saves conversions"
    )]
    fn place<K: Clone>(
        &self,
        who: &K,
        st: &mut CustomerState,
        s: u16,
        slot: usize,
        at: Timestamp,
        at_us: i64,
        out: &mut Vec<PresenceChange<K>>,
    ) {
        if let Some(v) = st.visit.as_mut()
            && self.covers(s, v.zone)
        {
            let d = self
                .calibration_of(s)
                .distance_of_loss(st.filters[slot].loss());
            if d <= self.limits[usize::from(v.zone)].exit_m {
                v.last_inside_us = v.last_inside_us.max(at_us);
            }
        }

        let current = st.visit.map(|v| v.zone);
        let mut best: Option<(u16, f32, f32)> = None;
        let mut current_distance = f32::INFINITY;
        for i in 0..SLOTS {
            let sc = st.scanners[i];
            if sc == NO_SCANNER {
                continue;
            }
            let (loss, confidence) = st.filters[i].loss_and_confidence(at_us);
            let d = self.calibration_of(sc).distance_of_loss(loss);
            for &z in self.zones_of(sc) {
                if Some(z) == current {
                    current_distance = current_distance.min(d);
                }
                if confidence >= ENTER_CONFIDENCE
                    && d <= self.limits[usize::from(z)].enter_m
                    && best.is_none_or(|b| d < b.1)
                {
                    best = Some((z, d, confidence));
                }
            }
        }

        let candidate = match (best, current) {
            (Some(b), Some(c)) if b.0 == c || b.1 >= SWITCH_RATIO * current_distance => None,
            (b, _) => b,
        };
        let Some((zone, distance, confidence)) = candidate else {
            st.pending = None;
            return;
        };
        // Only a customer still heard within the current zone's exit_m is torn between two
        // zones; one who has not been for a while has walked out and is entering afresh.
        let switch_hold_us = secs_to_us(SWITCH_HOLD_S);
        let torn = st
            .visit
            .is_some_and(|v| at_us.saturating_sub(v.last_inside_us) < switch_hold_us);
        let hold_us = if torn {
            switch_hold_us
        } else {
            secs_to_us(ENTER_HOLD_S)
        };
        let fresh = u16::from(self.covers(s, zone));
        match st.pending.as_mut() {
            Some(p) if p.zone == zone => {
                p.support = p.support.saturating_add(fresh);
                if at_us.saturating_sub(p.since_us) < hold_us || p.support < MIN_SUPPORT {
                    return;
                }
            }
            _ => {
                st.pending = Some(Pending {
                    zone,
                    support: fresh,
                    since_us: at_us,
                });
                if hold_us > 0 || fresh < MIN_SUPPORT {
                    return;
                }
            }
        }
        st.pending = None;
        if let Some(v) = st.visit.take() {
            out.push(PresenceChange {
                customer: who.clone(),
                kind: PresenceKind::Left,
                place: Place::Zone(usize::from(v.zone)),
                at,
                // The evidence that they left is the evidence that they are elsewhere.
                confidence,
                distance_m: None,
            });
        }
        out.push(PresenceChange {
            customer: who.clone(),
            kind: PresenceKind::Entered,
            place: Place::Zone(usize::from(zone)),
            at,
            confidence,
            distance_m: Some(distance),
        });
        st.visit = Some(Visit {
            zone,
            dwelling: false,
            entered_us: at_us,
            last_inside_us: at_us,
        });
    }

    /// Emits `dwelling` if it is due at `now` and the visit lasted that long.
    fn dwell<K: Clone>(
        &self,
        who: &K,
        st: &mut CustomerState,
        now: Timestamp,
        now_us: i64,
        out: &mut Vec<PresenceChange<K>>,
    ) {
        let Some(v) = st.visit.as_mut() else {
            return;
        };
        let limits = &self.limits[usize::from(v.zone)];
        let due = v.entered_us.saturating_add(limits.dwell_us);
        let left = v.last_inside_us.saturating_add(limits.away_us);
        if v.dwelling || due > now_us || due > left {
            return;
        }
        v.dwelling = true;
        let zone = v.zone;
        let (distance, confidence) = self.zone_estimate(st, zone, now_us);
        out.push(PresenceChange {
            customer: who.clone(),
            kind: PresenceKind::Dwelling,
            place: Place::Zone(usize::from(zone)),
            at: now,
            confidence,
            distance_m: distance,
        });
    }

    /// Emits what time alone settles at `now`. Returns whether the customer is gone from the
    /// store and their state is to be dropped.
    fn advance<K: Clone>(
        &self,
        who: &K,
        st: &mut CustomerState,
        now: Timestamp,
        now_us: i64,
        out: &mut Vec<PresenceChange<K>>,
    ) -> bool {
        self.dwell(who, st, now, now_us, out);
        let gone = st.last_seen_us.saturating_add(self.store_away_us) <= now_us;
        if let Some(v) = st.visit {
            let due = v
                .last_inside_us
                .saturating_add(self.limits[usize::from(v.zone)].away_us);
            if gone || due <= now_us {
                st.visit = None;
                st.pending = None;
                out.push(PresenceChange {
                    customer: who.clone(),
                    kind: PresenceKind::Left,
                    place: Place::Zone(usize::from(v.zone)),
                    at: now,
                    confidence: self.left_confidence(st, v.zone, now_us),
                    distance_m: None,
                });
            }
        }
        if !gone {
            return false;
        }
        if st.in_store {
            let heard = st
                .filters
                .iter()
                .chain(std::iter::once(&st.elsewhere))
                .map(|f| f.loss_and_confidence(now_us).1)
                .fold(0.0f32, f32::max);
            out.push(PresenceChange {
                customer: who.clone(),
                kind: PresenceKind::Left,
                place: Place::Store,
                at: now,
                confidence: 1.0 - heard,
                distance_m: None,
            });
        }
        true
    }

    /// The nearest of `zone`'s scanners' estimates: distance and confidence.
    fn zone_estimate(&self, st: &CustomerState, zone: u16, now_us: i64) -> (Option<f32>, f32) {
        let mut best: (Option<f32>, f32) = (None, 0.0);
        for i in 0..SLOTS {
            let sc = st.scanners[i];
            if sc == NO_SCANNER || !self.covers(sc, zone) {
                continue;
            }
            let (loss, confidence) = st.filters[i].loss_and_confidence(now_us);
            let d = self.calibration_of(sc).distance_of_loss(loss);
            if best.0.is_none_or(|b| d < b) {
                best = (Some(d), confidence);
            }
        }
        best
    }

    fn left_confidence(&self, st: &CustomerState, zone: u16, now_us: i64) -> f32 {
        match self.zone_estimate(st, zone, now_us) {
            (Some(d), c) if d > self.limits[usize::from(zone)].exit_m => c,
            (Some(_), c) => 1.0 - c,
            (None, _) => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn t(ms: i64) -> Timestamp {
        "2026-11-22T08:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_millis(ms)
    }

    fn zone(name: &str, scanners: &[&str], enter_m: f32, exit_m: f32) -> ZoneSpec {
        ZoneSpec {
            name: name.into(),
            lane: None,
            scanners: scanners.iter().map(|s| s.to_string()).collect(),
            enter_m,
            exit_m,
            dwell_s: 5,
            away_s: 10,
        }
    }

    fn two_lanes() -> Tracker<u32> {
        Tracker::new(TrackerConfig {
            zones: vec![
                zone("lane-1", &["s1"], 1.5, 2.5),
                zone("lane-2", &["s2"], 1.5, 2.5),
            ],
            ..TrackerConfig::default()
        })
    }

    /// RSSI that the default calibration maps to `d` metres.
    fn rssi_at(d: f32) -> i16 {
        (-59.0 - 20.0 * d.log10()).round() as i16
    }

    fn kinds(events: &[PresenceChange<u32>]) -> Vec<(PresenceKind, Place)> {
        events.iter().map(|e| (e.kind, e.place)).collect()
    }

    #[test]
    fn zone_config_defaults_and_validation() {
        let z: ZoneSpec = toml::from_str(
            r#"name = "lane-3"
               lane = "3"
               scanners = ["lane-3"]
               enter_m = 1.5
               exit_m = 2.5"#,
        )
        .unwrap();
        assert_eq!((z.dwell_s, z.away_s), (5, 10));
        assert_eq!(z.lane.as_deref(), Some("3"));
        assert!(z.validate().is_ok());
        assert!(
            toml::from_str::<ZoneSpec>(
                r#"name = "x"
                   scanners = ["a"]
                   enter_m = 1.0
                   exit_m = 2.0
                   radius = 3"#
            )
            .is_err()
        );
        let mut bad = z.clone();
        bad.exit_m = 1.0;
        assert!(bad.validate().unwrap_err().starts_with("exit_m"));
        bad = z.clone();
        bad.enter_m = 0.0;
        assert!(bad.validate().unwrap_err().starts_with("enter_m"));
        bad = z.clone();
        bad.scanners.clear();
        assert!(bad.validate().unwrap_err().starts_with("scanners"));
    }

    #[test]
    fn tracker_config_errors_name_the_key() {
        let mut c: TrackerConfig = toml::from_str(
            r#"store_away_s = 90
               [[zones]]
               name = "a"
               scanners = ["s"]
               enter_m = 1.0
               exit_m = 2.0
               [calibration.s]
               ref_rssi_1m = -61.0"#,
        )
        .unwrap();
        assert_eq!(c.store_away_s, 90);
        assert!(c.validate().is_ok());
        c.zones.push(c.zones[0].clone());
        assert_eq!(
            c.validate().unwrap_err(),
            "zones[1].name: \"a\" names two zones"
        );
        c.zones.pop();
        c.zones[0].exit_m = 0.5;
        assert!(c.validate().unwrap_err().starts_with("zones[0].exit_m"));
        c.zones[0].exit_m = 2.0;
        c.calibration.get_mut("s").unwrap().path_loss_exponent = 9.0;
        assert!(
            c.validate()
                .unwrap_err()
                .starts_with("calibration.s.path_loss_exponent")
        );
        assert_eq!(TrackerConfig::default().store_away_s, 60);
    }

    #[test]
    fn kinds_have_wire_names() {
        assert_eq!(PresenceKind::Entered.as_str(), "entered");
        assert_eq!(PresenceKind::Dwelling.as_str(), "dwelling");
        assert_eq!(PresenceKind::Left.as_str(), "left");
    }

    #[test]
    fn one_reading_is_not_presence_two_are() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        tr.observe(&7, "s1", rssi_at(5.0), None, None, t(0), &mut out);
        assert!(out.is_empty());
        assert_eq!(tr.tracked(), 1);
        tr.observe(&7, "s1", rssi_at(5.0), None, None, t(300), &mut out);
        assert_eq!(kinds(&out), [(PresenceKind::Entered, Place::Store)]);
        assert_eq!(out[0].distance_m, None);
        assert!(out[0].confidence >= STORE_CONFIDENCE);
    }

    #[test]
    fn a_lone_reading_is_forgotten_without_events() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        tr.observe(&7, "s1", rssi_at(5.0), None, None, t(0), &mut out);
        tr.tick(t(61_000), &mut out);
        assert!(out.is_empty());
        assert_eq!(tr.tracked(), 0);
    }

    #[test]
    fn full_visit_enter_dwell_left_with_hysteresis() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        let mut ms = 0;
        // Stand at 0.7 m from lane 1 for 20 s.
        while ms < 20_000 {
            tr.observe(&1, "s1", rssi_at(0.7), None, None, t(ms), &mut out);
            tr.tick(t(ms), &mut out);
            ms += 250;
        }
        assert_eq!(
            kinds(&out),
            [
                (PresenceKind::Entered, Place::Store),
                (PresenceKind::Entered, Place::Zone(0)),
                (PresenceKind::Dwelling, Place::Zone(0)),
            ]
        );
        let entered = out[1].at;
        assert!(entered <= t(2_000), "entered at {entered}");
        assert!((out[1].distance_m.unwrap() - 0.7).abs() < 0.2);
        let dwelling = out[2].at;
        assert!(dwelling >= entered + SignedDuration::from_secs(5));
        assert!(dwelling <= entered + SignedDuration::from_millis(5_250));
        assert_eq!(tr.zone_of(&1), Some(0));
        // Between enter_m and exit_m: still in, for much longer than away_s.
        out.clear();
        while ms < 60_000 {
            tr.observe(&1, "s1", rssi_at(2.1), None, None, t(ms), &mut out);
            tr.tick(t(ms), &mut out);
            ms += 250;
        }
        assert!(out.is_empty(), "{out:?}");
        // Beyond exit_m: left after away_s.
        let moved = ms;
        while ms < 90_000 {
            tr.observe(&1, "s1", rssi_at(6.0), None, None, t(ms), &mut out);
            tr.tick(t(ms), &mut out);
            ms += 250;
        }
        assert_eq!(kinds(&out), [(PresenceKind::Left, Place::Zone(0))]);
        // Measured from the last reading at 2.1 m: one reading at 6 m already smooths to
        // beyond exit_m.
        let left_after = out[0].at.as_millisecond() - t(moved - 250).as_millisecond();
        assert!((10_000..=13_000).contains(&left_after), "{left_after} ms");
        assert!(out[0].confidence > 0.5);
        // Silence: the store notices after store_away_s.
        out.clear();
        tr.tick(t(ms + 59_000), &mut out);
        assert!(out.is_empty());
        tr.tick(t(ms + 60_000), &mut out);
        assert_eq!(kinds(&out), [(PresenceKind::Left, Place::Store)]);
        assert!(out[0].confidence > 0.9);
        assert_eq!(tr.tracked(), 0);
    }

    #[test]
    fn moving_between_zones_leaves_then_enters_and_edges_do_not_flap() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        let mut ms = 0;
        while ms < 5_000 {
            tr.observe(&1, "s1", rssi_at(1.2), None, None, t(ms), &mut out);
            tr.observe(&1, "s2", rssi_at(3.0), None, None, t(ms + 10), &mut out);
            ms += 250;
        }
        assert_eq!(tr.zone_of(&1), Some(0));
        out.clear();
        // Both within enter_m, lane 2 a little nearer: not enough to switch.
        while ms < 30_000 {
            tr.observe(&1, "s1", rssi_at(1.4), None, None, t(ms), &mut out);
            tr.observe(&1, "s2", rssi_at(1.2), None, None, t(ms + 10), &mut out);
            tr.tick(t(ms), &mut out);
            ms += 250;
        }
        assert_eq!(
            kinds(&out),
            [(PresenceKind::Dwelling, Place::Zone(0))],
            "no switch for a 15% difference"
        );
        out.clear();
        // Clearly at lane 2 now.
        while ms < 40_000 {
            tr.observe(&1, "s1", rssi_at(3.0), None, None, t(ms), &mut out);
            tr.observe(&1, "s2", rssi_at(0.6), None, None, t(ms + 10), &mut out);
            tr.tick(t(ms), &mut out);
            ms += 250;
        }
        assert_eq!(
            kinds(&out)[..2],
            [
                (PresenceKind::Left, Place::Zone(0)),
                (PresenceKind::Entered, Place::Zone(1)),
            ]
        );
        assert_eq!(out[0].at, out[1].at);
        assert_eq!(tr.zone_of(&1), Some(1));
    }

    #[test]
    fn unknown_scanners_make_store_presence_and_interning_is_capped() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        for i in 0..(MAX_SCANNERS + 50) {
            let id = format!("room-{i}");
            tr.observe(&3, &id, -70, None, None, t(i as i64 * 100), &mut out);
        }
        assert_eq!(kinds(&out), [(PresenceKind::Entered, Place::Store)]);
        assert_eq!(tr.site.scanners.len(), MAX_SCANNERS);
        assert_eq!(tr.site.scanner_ids.len(), MAX_SCANNERS);
        assert_eq!(tr.zone_of(&3), None);
    }

    #[test]
    fn remote_scanner_distance_replaces_rssi() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        // The RSSI says far away; the scanner's own distance says 0.5 m.
        for i in 0..12 {
            tr.observe(&4, "s2", -95, None, Some(0.5), t(i * 250), &mut out);
        }
        assert_eq!(tr.zone_of(&4), Some(1));
        let entered = out.iter().find(|e| e.place == Place::Zone(1)).unwrap();
        assert!((entered.distance_m.unwrap() - 0.5).abs() < 0.05);
        // A nonsensical distance falls back to RSSI.
        tr.observe(&5, "s2", rssi_at(0.5), None, Some(f32::NAN), t(0), &mut out);
        tr.observe(&5, "s2", rssi_at(0.5), None, Some(-1.0), t(250), &mut out);
        assert_eq!(tr.customers[&5].filters[0].samples(), 2);
    }

    #[test]
    fn forget_drops_everything_silently() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        for i in 0..20 {
            tr.observe(&9, "s1", rssi_at(0.5), None, None, t(i * 250), &mut out);
        }
        assert_eq!(tr.zone_of(&9), Some(0));
        out.clear();
        tr.forget(&9);
        assert_eq!(tr.tracked(), 0);
        tr.tick(t(600_000), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_reading_after_a_long_silence_closes_the_old_visit_first() {
        let mut tr = two_lanes();
        let mut out = Vec::new();
        for i in 0..20 {
            tr.observe(&2, "s1", rssi_at(0.5), None, None, t(i * 250), &mut out);
        }
        out.clear();
        // No ticks at all; the customer is back two minutes later.
        tr.observe(&2, "s1", rssi_at(0.5), None, None, t(125_000), &mut out);
        assert_eq!(
            kinds(&out),
            [
                (PresenceKind::Dwelling, Place::Zone(0)),
                (PresenceKind::Left, Place::Zone(0)),
                (PresenceKind::Left, Place::Store),
            ]
        );
        tr.observe(&2, "s1", rssi_at(0.5), None, None, t(125_250), &mut out);
        assert_eq!(kinds(&out)[3], (PresenceKind::Entered, Place::Store));
    }

    #[test]
    fn slots_keep_the_nearest_scanners() {
        let zones: Vec<_> = (0..10)
            .map(|i| zone(&format!("z{i}"), &[&format!("s{i}")], 1.5, 2.5))
            .collect();
        let mut tr: Tracker<u32> = Tracker::new(TrackerConfig {
            zones,
            ..TrackerConfig::default()
        });
        let mut out = Vec::new();
        // Ten scanners hear the phone, s9 the nearest.
        for round in 0..20 {
            for i in 0..10u32 {
                let d = 12.0 - i as f32;
                let at = t(round * 250 + i64::from(i));
                tr.observe(&1, &format!("s{i}"), rssi_at(d), None, None, at, &mut out);
            }
        }
        let st = &tr.customers[&1];
        let mut kept: Vec<_> = st
            .scanners
            .iter()
            .map(|&s| tr.site.zones_of(s)[0])
            .collect();
        kept.sort();
        assert_eq!(kept, [4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn state_is_compact() {
        let tr = two_lanes();
        let bytes = tr.approx_bytes_per_customer();
        assert!(bytes <= 320, "{bytes} bytes per customer");
        assert!(bytes >= std::mem::size_of::<CustomerState>());
    }
}
