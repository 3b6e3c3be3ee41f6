//! Customer profiles at the edge: what the agent knows about loyalty customers, kept in the
//! `profiles` tree with a bounded in-memory cache of hot profiles in front.
//!
//! Invariants:
//! - A profile carries a presence key only while the customer consents to in-store
//!   recognition. [`ProfileStore::upsert`] drops the key of a profile without that consent, so
//!   withdrawing consent removes the key at once.
//! - Older updates never overwrite newer ones: each profile has a `version` from central, and a
//!   stale upsert is ignored.
//! - The keys of consenting customers are also kept under their own prefix, so the presence
//!   resolver is rebuilt without reading every profile.
//! - Every change bumps a generation that watchers (the presence resolver) follow.
//! - The in-memory copies of profiles and KPI records ([`hot`]) never serve what sled no
//!   longer holds: every write to sled is followed by [`hot::Hot::wrote`] with the writer's own
//!   change. Writers are serialised among themselves by a separate lock that lookups never
//!   wait for.
//!
//! - KPIs follow the store's own transactions (see [`kpi`]): each loyalty transaction is one
//!   ledger entry keyed by its id, so a re-delivered transaction changes nothing.
//! - An erasure removes everything the tree holds about a customer and leaves a tombstone with
//!   the version it was at; an upsert no newer than the tombstone is refused, so a stale sync
//!   cannot bring the customer back.
//!
//! Layout of the `profiles` tree: `p ‖ customer id` → profile (JSON); `k ‖ customer id` →
//! presence key (32 bytes); `c ‖ card number` → customer id; `l ‖ customer id ‖ 0 ‖
//! transaction id` → ledger entry (JSON); `m ‖ customer id` → KPIs (JSON); `t ‖ customer id` →
//! tombstone (u64 version, big-endian); `x ‖ name` → small facts (sync cursor, model
//! parameters, RFM breakpoints). Customer ids never contain NUL, so `l ‖ id ‖ 0` is a prefix of
//! that customer's ledger only.

pub mod downlink;
pub mod erasure;
pub mod followups;
mod hot;
pub mod kpi;
pub mod sync;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::FollowUpConfig;
use crate::model::customer::PresenceKey;
use crate::model::ingest::{CommitHook, Committed, StepOutput};
use crate::model::transaction::{Transaction, TransactionKind};
use crate::store::{Batch, Store, StoreError, Tree, TreeName};
use followups::{FollowUps, Share};
use hot::Hot;
use kpi::{Kpis, LedgerEntry, ModelParams, RfmBreakpoints};

const PROFILE: u8 = b'p';
const KEY: u8 = b'k';
const CARD: u8 = b'c';
const LEDGER: u8 = b'l';
const KPIS: u8 = b'm';
const TOMBSTONE: u8 = b't';
const FACT: u8 = b'x';

pub use crate::config::DEFAULT_CACHE_ENTRIES;

/// KPI records kept decoded: the customers at the tills now, a few per lane.
const HOT_KPIS: usize = 256;

/// A customer's consents, one flag per purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Consents {
    /// Personalised offers.
    pub personalised_offers: bool,
    /// Recognition in the store by their phone.
    pub presence: bool,
    /// Marketing contact.
    pub marketing: bool,
}

/// A birthday without the year, which the agent has no use for: `"MM-DD"` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MonthDay {
    pub month: i8,
    pub day: i8,
}

impl MonthDay {
    /// Whether `date` is this birthday. 29 February is celebrated on 28 February in other years.
    pub fn is(&self, date: Date) -> bool {
        if (self.month, self.day) == (2, 29) && !date.in_leap_year() {
            return (date.month(), date.day()) == (2, 28);
        }
        (date.month(), date.day()) == (self.month, self.day)
    }
}

impl std::str::FromStr for MonthDay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("birthday {s:?} is not MM-DD");
        let (m, d) = s.split_once('-').ok_or_else(bad)?;
        // i8's parser takes a sign ("+3"); a birthday is two digits, nothing else.
        let digits = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(m) || !digits(d) {
            return Err(bad());
        }
        let (month, day) = (m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
        // 2000 is a leap year, so 02-29 is valid and 02-30 is not.
        Date::new(2000, month, day).map_err(|_| bad())?;
        Ok(MonthDay { month, day })
    }
}

impl Serialize for MonthDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:02}-{:02}", self.month, self.day))
    }
}

impl<'de> Deserialize<'de> for MonthDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Points of a customer that expire on a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointsExpiry {
    pub points: i64,
    pub on: Date,
}

impl MonthDay {
    /// The next day, `from` or after, that is this birthday.
    pub fn next_from(&self, from: Date) -> Option<Date> {
        (0..=366)
            .filter_map(|n| from.checked_add(jiff::Span::new().days(n)).ok())
            .find(|d| self.is(*d))
    }
}

/// What a follow-up recommendation matches or suggests: a category or one article.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Item {
    Category(String),
    Sku(String),
}

/// "Bought a PlayStation, so games are likely": shipped by central per customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowUp {
    pub if_bought: Item,
    pub suggest: Item,
    pub confidence: f64,
    pub lift: f64,
}

/// A loyalty customer as central describes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The loyalty id.
    pub customer_id: String,
    /// Loyalty card numbers that differ from the id; a scanned card finds the customer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cards: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default)]
    pub points: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday: Option<MonthDay>,
    /// Points that expire, when central's loyalty programme says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points_expiring: Option<PointsExpiry>,
    #[serde(default)]
    pub consents: Consents,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub affinities: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub follow_ups: Vec<FollowUp>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_key")]
    pub presence_key: Option<PresenceKey>,
    /// Central's version of this profile; higher wins. 0 is a local stub.
    #[serde(default)]
    pub version: u64,
}

impl Profile {
    pub fn new(customer_id: impl Into<String>) -> Profile {
        Profile {
            customer_id: customer_id.into(),
            cards: Vec::new(),
            first_name: None,
            tier: None,
            points: 0,
            birthday: None,
            points_expiring: None,
            consents: Consents::default(),
            segments: Vec::new(),
            affinities: BTreeMap::new(),
            follow_ups: Vec::new(),
            presence_key: None,
            version: 0,
        }
    }

    /// Whether the id can be a key: not empty, no NUL (the ledger's separator), not huge.
    pub fn valid_id(id: &str) -> bool {
        !id.is_empty() && id.len() <= 128 && !id.contains('\0')
    }
}

mod hex_key {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &Option<PresenceKey>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(k) => s.serialize_str(&crate::model::customer::hex(k)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PresenceKey>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| crate::model::customer::parse_key(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    Applied,
    /// A newer version is already held.
    Stale,
    /// The customer was erased at this version or later.
    Erased,
    /// The customer id is empty, too long or holds a NUL.
    Invalid,
}

/// What `storelink profiles stats` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileStats {
    pub profiles: u64,
    pub with_presence_key: u64,
    pub cards: u64,
    pub with_kpis: u64,
    pub ledger_entries: u64,
    pub tombstones: u64,
    pub cached: u64,
}

/// What an erasure removed from the profiles tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Erased {
    /// Profile, presence key, KPIs and card index entries.
    pub records: u64,
    pub ledger_entries: u64,
    /// The version of the tombstone left behind.
    pub version: u64,
}

/// The profile cache in sled.
#[derive(Clone)]
pub struct ProfileStore {
    inner: Arc<Inner>,
}

struct Inner {
    tree: Tree,
    changes: watch::Sender<u64>,
    /// Hot profiles, decoded (`cache_entries`; see [`hot`] for how it stays true to sled).
    cache: Hot<Profile>,
    /// Hot KPI records: the decision and the cashier's insight right after a commit read what
    /// that commit wrote, without decoding it again.
    kpis: Hot<Kpis>,
    /// Serialises writers (sync, downlink, engine), so each one's read-check-write on a
    /// profile (versions, tombstones, the ledger) sees no other writer in between. Readers
    /// never take it, so a long page does not hold up lookups.
    writer: Mutex<()>,
    /// The follow-up model; moved only by writers holding `writer`, after their batch.
    followups: std::sync::RwLock<FollowUps>,
}

impl std::fmt::Debug for ProfileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileStore").finish_non_exhaustive()
    }
}

fn key(prefix: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(prefix);
    k.extend_from_slice(id.as_bytes());
    k
}

fn ledger_prefix(customer_id: &str) -> Vec<u8> {
    let mut k = key(LEDGER, customer_id);
    k.push(0);
    k
}

impl ProfileStore {
    pub fn open(store: &Store) -> Result<ProfileStore, StoreError> {
        ProfileStore::open_with(store, DEFAULT_CACHE_ENTRIES)
    }

    /// Opens with an in-memory cache of at most `cache_entries` profiles (0 turns it off).
    pub fn open_with(store: &Store, cache_entries: usize) -> Result<ProfileStore, StoreError> {
        let store = ProfileStore {
            inner: Arc::new(Inner {
                tree: store.tree(TreeName::Profiles)?,
                changes: watch::channel(0).0,
                cache: Hot::new(cache_entries),
                kpis: Hot::new(if cache_entries == 0 { 0 } else { HOT_KPIS }),
                writer: Mutex::new(()),
                followups: std::sync::RwLock::new(FollowUps::new(FollowUpConfig::default())),
            }),
        };
        store.load_followups()?;
        Ok(store)
    }

    fn load_followups(&self) -> Result<(), StoreError> {
        let mut model = FollowUps::new(self.followups().config().clone());
        for item in self.tree().scan_prefix([followups::PREFIX]) {
            let (k, v) = item?;
            model.load(&k, &v);
        }
        *self.followups_mut() = model;
        Ok(())
    }

    fn followups(&self) -> std::sync::RwLockReadGuard<'_, FollowUps> {
        self.inner
            .followups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn followups_mut(&self) -> std::sync::RwLockWriteGuard<'_, FollowUps> {
        self.inner
            .followups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the follow-up model's settings. When the window or the anchors differ from those
    /// the counts were made with, the model is rebuilt from every customer's KPIs (once; the
    /// settings are kept as a fact).
    pub fn configure_followups(&self, config: &FollowUpConfig) -> Result<(), StoreError> {
        let _writer = self.writer();
        let basis = format!("{}|{}", config.window_days, config.anchor_skus.join(","));
        let held = self.fact(FOLLOWUPS_FACT)?;
        if held.as_deref() == Some(basis.as_bytes()) {
            // The counts loaded at open hold: only the bounds and the top change.
            self.followups_mut().reconfigure(config.clone());
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut model = FollowUps::new(config.clone());
        let mut batch = Batch::default();
        for item in self.tree().scan_prefix([followups::PREFIX]) {
            batch.remove(&*item?.0);
        }
        let mut customers = 0u64;
        for item in self.all_kpis() {
            let (_, k) = item?;
            for (key, n) in model.apply(&Share::default(), &Share::of(Some(&k), config.window_days))
            {
                batch.insert(key, n.to_be_bytes());
            }
            customers += 1;
        }
        batch.insert(key(FACT, FOLLOWUPS_FACT), basis.as_bytes());
        self.tree().apply(batch)?;
        *self.followups_mut() = model;
        if customers > 0 {
            tracing::info!(
                customers,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "follow-up model rebuilt for new settings"
            );
        }
        Ok(())
    }

    /// The follow-up pairs with enough customers, best lift first.
    pub fn top_followups(&self, limit: usize) -> Vec<followups::Pair> {
        self.followups().top(limit)
    }

    /// Loyalty customers the follow-up model counts, and its window.
    pub fn followup_basis(&self) -> (u64, u32) {
        let m = self.followups();
        (m.customers(), m.config().window_days)
    }

    /// The learned follow-up for a customer's KPIs as of `today`, if any.
    pub fn suggest_followup(&self, kpis: &Kpis, today: Date) -> Option<followups::Suggestion> {
        self.followups().suggest(kpis, today)
    }

    fn tree(&self) -> &Tree {
        &self.inner.tree
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores a profile unless a newer version is held. Not durable until the store flushes.
    pub fn upsert(&self, profile: Profile) -> Result<Upserted, StoreError> {
        let outcome = self.upsert_many(vec![profile], &[])?;
        Ok(outcome[0])
    }

    /// Stores a page of profiles, and the facts given (the sync cursor), in one atomic batch:
    /// after a crash either the whole page and its cursor are there or neither is. A profile
    /// the page holds twice ends at its newer version.
    pub fn upsert_many(
        &self,
        profiles: Vec<Profile>,
        facts: &[(&str, Vec<u8>)],
    ) -> Result<Vec<Upserted>, StoreError> {
        let mut batch = Batch::default();
        let mut outcomes = Vec::with_capacity(profiles.len());
        let mut written: HashMap<String, Arc<Profile>> = HashMap::new();
        let _writer = self.writer();
        for mut profile in profiles {
            let id = profile.customer_id.clone();
            if !Profile::valid_id(&id) {
                outcomes.push(Upserted::Invalid);
                continue;
            }
            if let Some(erased_at) = self.tombstone(&id)?
                && profile.version <= erased_at
            {
                outcomes.push(Upserted::Erased);
                continue;
            }
            let held = match written.get(&id) {
                Some(p) => Some(p.clone()),
                None => self.read(&id)?.map(Arc::new),
            };
            if let Some(held) = &held
                && held.version > profile.version
            {
                outcomes.push(Upserted::Stale);
                continue;
            }
            if !profile.consents.presence {
                profile.presence_key = None;
            }
            match &profile.presence_key {
                Some(k) => batch.insert(key(KEY, &id), k),
                None => batch.remove(key(KEY, &id)),
            }
            for old in held.iter().flat_map(|h| h.cards.iter()) {
                if !profile.cards.contains(old) {
                    batch.remove(key(CARD, old));
                }
            }
            for card in &profile.cards {
                if Profile::valid_id(card) && card != &id {
                    batch.insert(key(CARD, card), id.as_bytes());
                }
            }
            batch.insert(
                key(PROFILE, &id),
                serde_json::to_vec(&profile).expect("profiles serialise"),
            );
            written.insert(id, Arc::new(profile));
            outcomes.push(Upserted::Applied);
        }
        for (name, value) in facts {
            batch.insert(key(FACT, name), value);
        }
        if written.is_empty() && facts.is_empty() {
            return Ok(outcomes);
        }
        self.tree().apply(batch)?;
        self.inner.cache.wrote(|cache| {
            for (id, p) in written {
                let id: Arc<str> = Arc::from(id);
                if cache.contains(&id) {
                    cache.put(id, p);
                }
            }
        });
        self.inner.changes.send_modify(|g| *g += 1);
        Ok(outcomes)
    }

    fn read(&self, customer_id: &str) -> Result<Option<Profile>, StoreError> {
        Ok(self
            .tree()
            .get(key(PROFILE, customer_id))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// A customer's profile for a scan over many customers (the daily signals run): from the
    /// cache when it is hot, else from sled without entering the cache or moving anyone in
    /// it, so a run over every customer does not evict the ones at the tills.
    pub fn peek(&self, customer_id: &str) -> Result<Option<Arc<Profile>>, StoreError> {
        if let Some(p) = self.inner.cache.peek(customer_id) {
            return Ok(Some(p));
        }
        Ok(self.read(customer_id)?.map(Arc::new))
    }

    /// A customer's profile by id, from the cache when it is hot.
    pub fn lookup(&self, customer_id: &str) -> Result<Option<Arc<Profile>>, StoreError> {
        self.inner
            .cache
            .get_or_read(customer_id, || self.read(customer_id))
    }

    /// A customer's profile by id (a copy; [`ProfileStore::lookup`] shares it).
    pub fn get(&self, customer_id: &str) -> Result<Option<Profile>, StoreError> {
        Ok(self.lookup(customer_id)?.map(|p| (*p).clone()))
    }

    /// The customer id a scanned loyalty card belongs to: the card index, or the card itself
    /// when it is the id.
    pub fn resolve_card(&self, card: &str) -> Result<String, StoreError> {
        Ok(match self.tree().get(key(CARD, card))? {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None => card.to_string(),
        })
    }

    /// A customer's profile by a scanned loyalty card.
    pub fn by_card(&self, card: &str) -> Result<Option<Arc<Profile>>, StoreError> {
        self.lookup(&self.resolve_card(card)?)
    }

    /// The version at which a customer was erased, if they were.
    pub fn tombstone(&self, customer_id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree()
            .get(key(TOMBSTONE, customer_id))?
            .and_then(|v| <[u8; 8]>::try_from(&*v).ok())
            .map(u64::from_be_bytes))
    }

    /// Erases a customer: profile, presence key, card index entries, ledger and KPIs go in one
    /// atomic batch, and a tombstone at `version` (at least the held profile's) stays. Presence
    /// and offer history live elsewhere and are erased by their owners (see [`erasure`]).
    pub fn erase(&self, customer_id: &str, version: u64) -> Result<Erased, StoreError> {
        let _writer = self.writer();
        let mut batch = Batch::default();
        let mut erased = Erased::default();
        let held = self.read(customer_id)?;
        for card in held.iter().flat_map(|p| p.cards.iter()) {
            let k = key(CARD, card);
            if self
                .tree()
                .get(&k)?
                .is_some_and(|v| *v == *customer_id.as_bytes())
            {
                batch.remove(k);
                erased.records += 1;
            }
        }
        for k in [
            key(PROFILE, customer_id),
            key(KEY, customer_id),
            key(KPIS, customer_id),
        ] {
            if self.tree().contains(&k)? {
                erased.records += 1;
            }
            batch.remove(k);
        }
        for item in self.tree().scan_prefix(ledger_prefix(customer_id)) {
            let (k, _) = item?;
            batch.remove(&*k);
            erased.ledger_entries += 1;
        }
        erased.version = version
            .max(held.map(|p| p.version).unwrap_or(0))
            .max(self.tombstone(customer_id)?.unwrap_or(0));
        batch.insert(key(TOMBSTONE, customer_id), erased.version.to_be_bytes());
        self.tree().apply(batch)?;
        self.inner.cache.wrote(|cache| {
            cache.pop(customer_id);
        });
        self.inner.kpis.wrote(|kpis| {
            kpis.pop(customer_id);
        });
        self.inner.changes.send_modify(|g| *g += 1);
        Ok(erased)
    }

    /// Adds a transaction to its customer's ledger and recomputes their KPIs. The loyalty id
    /// may be a card number; it is resolved to the customer first. Returns false (and changes
    /// nothing) for a transaction without a loyalty id, a void, one already in the ledger, or
    /// an erased customer. A customer not known yet gets a stub profile (version 0) that sync
    /// fills in later.
    pub fn record_transaction(&self, tx: &Transaction) -> Result<bool, StoreError> {
        Ok(self.record_transactions([tx])? == 1)
    }

    /// [`ProfileStore::record_transaction`] for many transactions in one sled batch; returns
    /// how many were recorded. The ingest engine calls this once per group commit: sled rolls
    /// its log buffer around every batch (two log writes each), so a batch per loyalty
    /// transaction made ingest 2.5 times slower (BENCHMARKS.md). Several transactions of one
    /// customer build on each other's KPIs before anything is written.
    pub fn record_transactions<'a>(
        &self,
        txs: impl IntoIterator<Item = &'a Transaction>,
    ) -> Result<usize, StoreError> {
        let _writer = self.writer();
        let mut batch = Batch::default();
        let mut kpis_now: HashMap<String, Kpis> = HashMap::new();
        // Each customer's KPIs before this batch, for the follow-up model's difference.
        let mut kpis_before: HashMap<String, Option<Kpis>> = HashMap::new();
        let (window, anchors): (u32, Vec<String>) = {
            let m = self.followups();
            (m.config().window_days, m.config().anchor_skus.clone())
        };
        let mut entries_now = std::collections::HashSet::new();
        let mut stubs_now = std::collections::HashSet::new();
        for tx in txs {
            let Some(card) = tx.loyalty_id.as_deref() else {
                continue;
            };
            if !Profile::valid_id(card) {
                continue;
            }
            let customer = self.resolve_card(card)?;
            let amount = match tx.kind {
                TransactionKind::Sale => tx.total,
                TransactionKind::Return => -tx.total.abs(),
                TransactionKind::Void => continue,
            };
            let mut entry_key = ledger_prefix(&customer);
            entry_key.extend_from_slice(tx.id.as_bytes());
            if entries_now.contains(&entry_key)
                || self.tree().contains(&entry_key)?
                || self.tombstone(&customer)?.is_some()
            {
                continue;
            }
            let mut groups: Vec<String> = tx
                .lines
                .iter()
                .filter(|l| !l.voided)
                .filter_map(|l| l.category.clone())
                .collect();
            groups.sort();
            groups.dedup();
            let mut anchored: Vec<String> = tx
                .lines
                .iter()
                .filter(|l| !l.voided && anchors.contains(&l.sku))
                .map(|l| l.sku.clone())
                .collect();
            anchored.sort();
            anchored.dedup();
            let mut by_group: HashMap<&str, i64> = HashMap::new();
            for l in tx.lines.iter().filter(|l| !l.voided) {
                if let Some(c) = &l.category {
                    *by_group.entry(c).or_insert(0) += l.net();
                }
            }
            let main = by_group
                .into_iter()
                .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)))
                .map(|(g, _)| g.to_string());
            let entry = LedgerEntry {
                day: tx.business_day,
                amount,
                groups,
                anchors: anchored,
                main,
            };
            // KPIs written earlier in this batch are always incremental (a rebuild yields
            // the kept inputs), so the ledger rebuild below never misses this batch's entries.
            let held = match kpis_now.remove(&customer) {
                Some(k) => Some(k),
                None => {
                    let k = self.kpis(&customer)?;
                    kpis_before.insert(customer.clone(), k.clone());
                    k
                }
            };
            let kpis = match held {
                Some(mut k) if k.is_incremental() => {
                    k.add(&entry);
                    k
                }
                _ => {
                    let mut ledger = self.ledger(&customer)?;
                    ledger.push(entry.clone());
                    Kpis::compute(&ledger)
                }
            };
            batch.insert(
                entry_key.clone(),
                serde_json::to_vec(&entry).expect("ledger entries serialise"),
            );
            entries_now.insert(entry_key);
            if !stubs_now.contains(&customer) && !self.tree().contains(key(PROFILE, &customer))? {
                batch.insert(
                    key(PROFILE, &customer),
                    serde_json::to_vec(&Profile::new(&customer)).expect("profiles serialise"),
                );
                stubs_now.insert(customer.clone());
            }
            kpis_now.insert(customer, kpis);
        }
        if entries_now.is_empty() {
            return Ok(0);
        }
        for (customer, kpis) in &kpis_now {
            batch.insert(
                key(KPIS, customer),
                serde_json::to_vec(kpis).expect("KPIs serialise"),
            );
        }
        // The follow-up model moves by each customer's change, in the same batch; if the
        // batch fails, the move is undone in memory.
        let mut model = self.followups_mut();
        let shares: Vec<(Share, Share)> = kpis_now
            .iter()
            .map(|(customer, kpis)| {
                let before = kpis_before.get(customer).and_then(|k| k.as_ref());
                (Share::of(before, window), Share::of(Some(kpis), window))
            })
            .collect();
        let mut counters: HashMap<Vec<u8>, i64> = HashMap::new();
        for (old, new) in &shares {
            counters.extend(model.apply(old, new));
        }
        for (k, n) in &counters {
            batch.insert(k.clone(), n.to_be_bytes());
        }
        if let Err(e) = self.tree().apply(batch) {
            for (old, new) in shares.iter().rev() {
                model.apply(new, old);
            }
            return Err(e);
        }
        drop(model);
        // Stub profiles may have been written; the KPIs written are what the decision that
        // follows this commit reads.
        self.inner.cache.wrote(|_| {});
        self.inner.kpis.wrote(|hot| {
            for (customer, kpis) in kpis_now {
                hot.put(Arc::from(customer), Arc::new(kpis));
            }
        });
        Ok(entries_now.len())
    }

    /// Forgets ledger entries of business days before `before` (retention) and rebuilds the
    /// KPIs of the customers who had any from what remains, so KPIs describe the retained
    /// window; the follow-up model moves with them. Returns the entries removed.
    ///
    /// The scan for candidates takes no lock; each customer's rebuild holds the writer lock
    /// for that customer only, so the engine's KPI step waits for one customer at most.
    pub fn prune_ledger(&self, before: Date) -> Result<u64, StoreError> {
        // Only customers whose first purchase is that old can have anything to forget.
        let mut old: Vec<String> = Vec::new();
        for item in self.all_kpis() {
            let (id, k) = item?;
            let oldest = k.revenue_by_year.keys().next().copied();
            if k.rhythm.first.is_some_and(|f| f < before)
                || oldest.is_some_and(|y| y < before.year())
            {
                old.push(id);
            }
        }
        let window = self.followups().config().window_days;
        let mut removed = 0u64;
        for customer in old {
            let _writer = self.writer();
            let mut batch = Batch::default();
            let mut kept = Vec::new();
            let mut gone = 0u64;
            for item in self.tree().scan_prefix(ledger_prefix(&customer)) {
                let (k, v) = item?;
                match serde_json::from_slice::<LedgerEntry>(&v) {
                    Ok(e) if e.day < before => {
                        batch.remove(&*k);
                        gone += 1;
                    }
                    Ok(e) => kept.push(e),
                    Err(_) => {}
                }
            }
            if gone == 0 {
                continue;
            }
            let held = self.kpis(&customer)?;
            let rebuilt = (!kept.is_empty()).then(|| Kpis::compute(&kept));
            match &rebuilt {
                Some(k) => batch.insert(
                    key(KPIS, &customer),
                    serde_json::to_vec(k).expect("KPIs serialise"),
                ),
                None => batch.remove(key(KPIS, &customer)),
            }
            let mut model = self.followups_mut();
            let (was, now) = (
                Share::of(held.as_ref(), window),
                Share::of(rebuilt.as_ref(), window),
            );
            for (k, n) in model.apply(&was, &now) {
                batch.insert(k, n.to_be_bytes());
            }
            if let Err(e) = self.tree().apply(batch) {
                model.apply(&now, &was);
                return Err(e);
            }
            self.inner.kpis.wrote(|hot| {
                hot.pop(customer.as_str());
            });
            removed += gone;
        }
        Ok(removed)
    }

    /// A customer's ledger, in key (transaction id) order.
    pub fn ledger(&self, customer_id: &str) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree().scan_prefix(ledger_prefix(customer_id)) {
            let (_, v) = item?;
            if let Ok(e) = serde_json::from_slice(&v) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// A customer's KPIs as last computed.
    pub fn kpis(&self, customer_id: &str) -> Result<Option<Kpis>, StoreError> {
        Ok(self.kpis_shared(customer_id)?.map(|k| (*k).clone()))
    }

    /// [`ProfileStore::kpis`] without a copy, from the hot set when the customer was just
    /// served (the decision after a commit reads what the commit wrote).
    pub fn kpis_shared(&self, customer_id: &str) -> Result<Option<Arc<Kpis>>, StoreError> {
        self.inner.kpis.get_or_read(customer_id, || {
            Ok(self
                .tree()
                .get(key(KPIS, customer_id))?
                .and_then(|v| serde_json::from_slice(&v).ok()))
        })
    }

    /// Every customer's KPIs, in id order.
    pub fn all_kpis(&self) -> impl Iterator<Item = Result<(String, Kpis), StoreError>> + '_ {
        self.tree()
            .scan_prefix([KPIS])
            .filter_map(|item| match item {
                Err(e) => Some(Err(e)),
                Ok((k, v)) => {
                    let id = std::str::from_utf8(&k[1..]).ok()?.to_string();
                    serde_json::from_slice(&v).ok().map(|kpis| Ok((id, kpis)))
                }
            })
    }

    /// A small fact kept with the profiles (sync cursor, model parameters, RFM breakpoints).
    pub fn fact(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree().get(key(FACT, name))?.map(|v| v.to_vec()))
    }

    pub fn set_fact(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree().insert(key(FACT, name), value)?;
        Ok(())
    }

    fn json_fact<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StoreError> {
        Ok(self
            .fact(name)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The BG/NBD and Gamma-Gamma parameters central shipped last, if any.
    pub fn model(&self) -> Result<Option<ModelParams>, StoreError> {
        self.json_fact(MODEL_FACT)
    }

    pub fn set_model(&self, model: &ModelParams) -> Result<(), StoreError> {
        self.set_fact(
            MODEL_FACT,
            &serde_json::to_vec(model).expect("params serialise"),
        )
    }

    /// The store's RFM quintile breakpoints as last recomputed.
    pub fn rfm_breakpoints(&self) -> Result<Option<RfmBreakpoints>, StoreError> {
        self.json_fact(RFM_FACT)
    }

    /// Recomputes the store's RFM breakpoints from every customer's KPIs as of `today`.
    pub fn recompute_rfm(&self, today: Date) -> Result<Option<RfmBreakpoints>, StoreError> {
        let mut all = Vec::new();
        for item in self.all_kpis() {
            all.push(item?.1);
        }
        let breakpoints = RfmBreakpoints::of(all.iter(), today);
        if let Some(b) = &breakpoints {
            self.set_fact(
                RFM_FACT,
                &serde_json::to_vec(b).expect("breakpoints serialise"),
            )?;
        }
        Ok(breakpoints)
    }

    /// Counts for support and status.
    pub fn stats(&self) -> Result<ProfileStats, StoreError> {
        let count = |prefix: u8| self.tree().scan_prefix([prefix]).count() as u64;
        Ok(ProfileStats {
            profiles: count(PROFILE),
            with_presence_key: count(KEY),
            cards: count(CARD),
            with_kpis: count(KPIS),
            ledger_entries: count(LEDGER),
            tombstones: count(TOMBSTONE),
            cached: self.inner.cache.count() as u64,
        })
    }

    /// Every consenting customer's presence key.
    pub fn presence_keys(&self) -> Result<Vec<(Arc<str>, PresenceKey)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree().scan_prefix([KEY]) {
            let (k, v) = item?;
            let (Ok(id), Ok(key)) = (std::str::from_utf8(&k[1..]), <PresenceKey>::try_from(&*v))
            else {
                continue;
            };
            out.push((Arc::from(id), key));
        }
        Ok(out)
    }

    /// Follows changes: the value is a generation that moves on every upsert and removal.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    pub fn len(&self) -> usize {
        self.tree().scan_prefix([PROFILE]).count()
    }

    pub fn is_empty(&self) -> bool {
        self.tree().scan_prefix([PROFILE]).next().is_none()
    }
}

const MODEL_FACT: &str = "model";
/// The window and anchors the follow-up counts were made with.
const FOLLOWUPS_FACT: &str = "followups";
const RFM_FACT: &str = "rfm";

/// Recomputes the store's RFM distribution now and then every `every`, as of the store's
/// today. The scan reads every customer's KPIs, so it runs on a blocking thread.
pub async fn run_rfm(
    profiles: ProfileStore,
    clock: crate::clock::SharedClock,
    tz: jiff::tz::TimeZone,
    every: std::time::Duration,
    component: crate::supervisor::Component,
    token: tokio_util::sync::CancellationToken,
) -> Result<(), StoreError> {
    loop {
        let today = clock.now().to_zoned(tz.clone()).date();
        let p = profiles.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || p.recompute_rfm(today))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        match result {
            Some(b) => {
                tracing::info!(
                    customers = b.customers,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "RFM distribution recomputed"
                );
                component.running(Some(format!("RFM over {} customers", b.customers)));
            }
            None => component.running(Some("no purchases yet for RFM".to_string())),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = token.cancelled() => return Ok(()),
        }
    }
}

/// The profile cache's share of the engine's durable step: the KPI updates of a group's
/// loyalty transactions, in one sled batch (a batch per transaction costs sled two log writes).
impl CommitHook for ProfileStore {
    fn committed(&self, group: &[Committed<'_>], _: &mut StepOutput) -> Result<(), StoreError> {
        self.record_transactions(group.iter().map(|c| c.tx))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;
    use std::sync::atomic::Ordering;

    fn open() -> (tempfile::TempDir, ProfileStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        (dir, ProfileStore::open(&store).unwrap())
    }

    fn consenting(id: &str, version: u64) -> Profile {
        let mut p = Profile::new(id);
        p.consents.presence = true;
        p.presence_key = Some([7; 32]);
        p.version = version;
        p
    }

    #[test]
    fn stale_versions_lose_and_keys_follow_consent() {
        let (_d, profiles) = open();
        let changes = profiles.subscribe();
        assert_eq!(
            profiles.upsert(consenting("c1", 5)).unwrap(),
            Upserted::Applied
        );
        assert_eq!(profiles.presence_keys().unwrap().len(), 1);
        assert_eq!(
            profiles.upsert(consenting("c1", 4)).unwrap(),
            Upserted::Stale
        );

        let mut withdrawn = consenting("c1", 6);
        withdrawn.consents.presence = false;
        profiles.upsert(withdrawn).unwrap();
        assert!(
            profiles.presence_keys().unwrap().is_empty(),
            "key gone with consent"
        );
        assert_eq!(profiles.get("c1").unwrap().unwrap().presence_key, None);
        assert_eq!(*changes.borrow(), 2, "a stale upsert changes nothing");
    }

    #[test]
    fn profiles_round_trip_with_hex_keys() {
        let p = consenting("4711", 1);
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(&"07".repeat(32)));
        let back: Profile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert!(
            serde_json::from_str::<Profile>(r#"{"customer_id":"x","presence_key":"zz"}"#).is_err()
        );
    }

    fn tx(id: &str, customer: &str, day: &str, kind: TransactionKind, total: i64) -> Transaction {
        let mut t = crate::sim::SimRegister::new("s1", "r1", None, 1)
            .next("2026-01-01T10:00:00Z".parse().unwrap());
        t.id = id.into();
        t.loyalty_id = Some(customer.into());
        t.business_day = day.parse().unwrap();
        t.kind = kind;
        t.total = total;
        t
    }

    #[test]
    fn one_batch_of_transactions_gives_the_same_kpis_as_one_at_a_time() {
        let (_d, one_by_one) = open();
        let (_e, batched) = open();
        let days = [
            "2026-01-05",
            "2026-01-05",
            "2026-02-11",
            "2026-03-02",
            "2026-03-02",
        ];
        let mut txs: Vec<Transaction> = days
            .iter()
            .enumerate()
            .map(|(i, day)| {
                let customer = if i % 2 == 0 { "c1" } else { "c2" };
                tx(
                    &format!("t{i}"),
                    customer,
                    day,
                    TransactionKind::Sale,
                    1000 + i as i64,
                )
            })
            .collect();
        txs.push(tx("t9", "c1", "2026-03-04", TransactionKind::Return, 300));
        // The same transaction twice in one group, and an anonymous one.
        txs.push(txs[0].clone());
        let mut anonymous = txs[1].clone();
        anonymous.id = "t-anon".into();
        anonymous.loyalty_id = None;
        txs.push(anonymous);

        let recorded = txs
            .iter()
            .filter(|t| one_by_one.record_transaction(t).unwrap())
            .count();
        assert_eq!(batched.record_transactions(&txs).unwrap(), recorded);
        assert_eq!(
            recorded, 6,
            "the repeat and the anonymous one are not recorded"
        );
        for customer in ["c1", "c2"] {
            assert_eq!(
                batched.kpis(customer).unwrap(),
                one_by_one.kpis(customer).unwrap(),
                "{customer}"
            );
            assert_eq!(
                batched.ledger(customer).unwrap().len(),
                one_by_one.ledger(customer).unwrap().len()
            );
            assert_eq!(batched.get(customer).unwrap().unwrap().version, 0, "stub");
        }
        assert_eq!(
            batched.record_transactions(&txs).unwrap(),
            0,
            "a re-delivered group changes nothing"
        );
    }

    #[test]
    fn ledger_retention_forgets_old_entries_and_rebuilds_the_kpis_from_the_rest() {
        let (_d, profiles) = open();
        for (id, day) in [
            ("t1", "2021-03-01"),
            ("t2", "2025-03-01"),
            ("t3", "2026-01-10"),
        ] {
            profiles
                .record_transaction(&tx(id, "c5", day, TransactionKind::Sale, 1000))
                .unwrap();
        }
        profiles
            .record_transaction(&tx("t4", "c6", "2026-01-10", TransactionKind::Sale, 500))
            .unwrap();
        assert_eq!(
            profiles
                .prune_ledger("2023-12-01".parse().unwrap())
                .unwrap(),
            1
        );
        let k = profiles.kpis("c5").unwrap().unwrap();
        assert_eq!(
            (k.purchases, k.rhythm.first),
            (2, Some("2025-03-01".parse().unwrap()))
        );
        assert_eq!(k, Kpis::compute(&profiles.ledger("c5").unwrap()));
        assert_eq!(
            profiles.kpis("c6").unwrap().unwrap().purchases,
            1,
            "untouched"
        );
        assert_eq!(
            profiles
                .prune_ledger("2023-12-01".parse().unwrap())
                .unwrap(),
            0
        );
    }

    #[test]
    fn ledger_is_idempotent_voids_change_nothing_and_unknown_customers_get_a_stub() {
        let (_d, profiles) = open();
        let sale = tx("t1", "c9", "2026-01-05", TransactionKind::Sale, 2500);
        assert!(profiles.record_transaction(&sale).unwrap());
        assert!(!profiles.record_transaction(&sale).unwrap(), "re-delivered");
        let void = tx("t2", "c9", "2026-01-06", TransactionKind::Void, 999);
        assert!(!profiles.record_transaction(&void).unwrap());
        let ret = tx("t3", "c9", "2026-01-07", TransactionKind::Return, 500);
        assert!(profiles.record_transaction(&ret).unwrap());
        let k = profiles.kpis("c9").unwrap().unwrap();
        assert_eq!(k.revenue_by_year[&2026], 2000);
        assert_eq!(k.purchases, 1);
        let stub = profiles.get("c9").unwrap().unwrap();
        assert_eq!(stub.version, 0, "a stub that any sync overwrites");
        let mut anonymous = sale.clone();
        anonymous.id = "t4".into();
        anonymous.loyalty_id = None;
        assert!(!profiles.record_transaction(&anonymous).unwrap());
    }

    #[test]
    fn erasure_leaves_only_a_tombstone_that_stale_upserts_lose_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let profiles = ProfileStore::open(&store).unwrap();
        profiles.upsert(consenting("c42", 3)).unwrap();
        profiles.upsert(consenting("c421", 3)).unwrap();
        profiles
            .record_transaction(&tx(
                "s1:r1:20260105:1",
                "c42",
                "2026-01-05",
                TransactionKind::Sale,
                100,
            ))
            .unwrap();
        let history = crate::presence::history::History::open(&store, 30).unwrap();
        history
            .append(&[crate::presence::history::Record {
                customer_id: "c42".into(),
                event: "entered".into(),
                place: "store".into(),
                lane: None,
                at: "2026-01-05T10:00:00Z".parse().unwrap(),
            }])
            .unwrap();

        assert_eq!(
            profiles.erase("c42", 3).unwrap(),
            Erased {
                records: 3,
                ledger_entries: 1,
                version: 3
            }
        );
        assert_eq!(history.erase("c42").unwrap(), 1);
        // Nothing anywhere holds the id but the tombstone.
        let needle = b"c42";
        for name in crate::store::TreeName::ALL {
            let tree = store.tree(name).unwrap();
            for item in tree.iter() {
                let (k, v) = item.unwrap();
                // The tombstone, and the neighbour "c421" whose id contains "c42".
                if *k == *key(TOMBSTONE, "c42")
                    || *k == *key(PROFILE, "c421")
                    || *k == *key(KEY, "c421")
                {
                    continue;
                }
                assert!(
                    !k.windows(3).any(|w| w == needle) && !v.windows(3).any(|w| w == needle),
                    "{name:?} still holds the erased customer"
                );
            }
        }
        assert!(
            profiles
                .presence_keys()
                .unwrap()
                .iter()
                .all(|(c, _)| &**c != "c42")
        );
        // A stale sync cannot bring them back; a genuinely newer registration can.
        assert_eq!(
            profiles.upsert(consenting("c42", 3)).unwrap(),
            Upserted::Erased
        );
        assert_eq!(profiles.get("c42").unwrap(), None);
        assert!(
            !profiles
                .record_transaction(&tx(
                    "s1:r1:20260106:2",
                    "c42",
                    "2026-01-06",
                    TransactionKind::Sale,
                    100
                ))
                .unwrap()
        );
        assert_eq!(
            profiles.upsert(consenting("c42", 4)).unwrap(),
            Upserted::Applied
        );
        // The neighbour whose id starts the same is untouched.
        assert!(profiles.get("c421").unwrap().is_some());
    }

    #[test]
    fn cards_find_their_customer_follow_changes_and_go_with_erasure() {
        let (_d, profiles) = open();
        let mut p = consenting("c5", 1);
        p.cards = vec!["9001".into(), "9002".into()];
        profiles.upsert(p.clone()).unwrap();
        assert_eq!(profiles.by_card("9001").unwrap().unwrap().customer_id, "c5");
        assert_eq!(
            profiles.resolve_card("c5").unwrap(),
            "c5",
            "the id is a card too"
        );
        p.cards = vec!["9002".into()];
        p.version = 2;
        profiles.upsert(p).unwrap();
        assert_eq!(
            profiles.resolve_card("9001").unwrap(),
            "9001",
            "card withdrawn"
        );
        assert_eq!(profiles.by_card("9002").unwrap().unwrap().version, 2);

        // A transaction scanned by card lands in the customer's ledger.
        let sale = tx("t1", "9002", "2026-01-05", TransactionKind::Sale, 700);
        assert!(profiles.record_transaction(&sale).unwrap());
        assert_eq!(profiles.kpis("c5").unwrap().unwrap().purchases, 1);
        assert!(profiles.kpis("9002").unwrap().is_none());

        let erased = profiles.erase("c5", 2).unwrap();
        assert_eq!((erased.records, erased.ledger_entries), (4, 1));
        assert_eq!(profiles.resolve_card("9002").unwrap(), "9002");
        assert_eq!(profiles.stats().unwrap().cards, 0);
    }

    #[test]
    fn the_cache_never_serves_what_sled_no_longer_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let profiles = ProfileStore::open_with(&store, 2).unwrap();
        for v in 1..=3 {
            profiles.upsert(consenting("hot", v)).unwrap();
            assert_eq!(profiles.lookup("hot").unwrap().unwrap().version, v);
        }
        profiles.upsert(consenting("a", 1)).unwrap();
        profiles.upsert(consenting("b", 1)).unwrap();
        profiles.lookup("a").unwrap();
        profiles.lookup("b").unwrap();
        assert_eq!(profiles.stats().unwrap().cached, 2, "bounded");
        // A scan peeks: "hot" is read, and "a" and "b" stay the ones cached, in their order.
        assert_eq!(profiles.peek("hot").unwrap().unwrap().version, 3);
        assert_eq!(profiles.peek("a").unwrap().unwrap().version, 1);
        assert_eq!(profiles.inner.cache.ids(), ["b", "a"]);
        let uncached = ProfileStore::open_with(&store, 0).unwrap();
        assert!(uncached.lookup("a").unwrap().is_some());
        assert_eq!(uncached.stats().unwrap().cached, 0, "0 turns the cache off");
        profiles.lookup("hot").unwrap();
        profiles.erase("hot", 3).unwrap();
        assert!(profiles.lookup("hot").unwrap().is_none());
        // A stub from a transaction is visible at once.
        let sale = tx("t1", "new", "2026-01-05", TransactionKind::Sale, 700);
        assert!(profiles.lookup("new").unwrap().is_none());
        profiles.record_transaction(&sale).unwrap();
        assert_eq!(profiles.lookup("new").unwrap().unwrap().version, 0);
        // A page holding one customer twice ends at the newer version, in either order.
        let out = profiles
            .upsert_many(vec![consenting("d", 5), consenting("d", 4)], &[])
            .unwrap();
        assert_eq!(out, vec![Upserted::Applied, Upserted::Stale]);
        assert_eq!(profiles.get("d").unwrap().unwrap().version, 5);
        assert_eq!(
            profiles.upsert(Profile::new("bad\0id")).unwrap(),
            Upserted::Invalid
        );
    }

    #[test]
    fn the_kpis_a_commit_wrote_are_served_hot_and_go_with_an_erasure_or_a_prune() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let profiles = ProfileStore::open(&store).unwrap();
        let sled_kpis = |id: &str| -> Option<Kpis> {
            profiles
                .tree()
                .get(key(KPIS, id))
                .unwrap()
                .and_then(|v| serde_json::from_slice(&v).ok())
        };
        profiles
            .record_transaction(&tx("t1", "k1", "2026-01-05", TransactionKind::Sale, 700))
            .unwrap();
        assert_eq!(
            profiles.inner.kpis.ids(),
            ["k1"],
            "the commit's KPIs are hot"
        );
        profiles
            .record_transaction(&tx("t2", "k1", "2026-01-09", TransactionKind::Sale, 300))
            .unwrap();
        let hot = profiles.kpis_shared("k1").unwrap().unwrap();
        assert_eq!(hot.purchases, 2);
        assert_eq!(Some((*hot).clone()), sled_kpis("k1"), "hot equals sled");
        // A prune rebuilds in sled; the hot copy goes, and the next read is sled's.
        assert_eq!(
            profiles
                .prune_ledger("2026-01-07".parse().unwrap())
                .unwrap(),
            1
        );
        assert!(profiles.inner.kpis.ids().is_empty());
        assert_eq!(profiles.kpis("k1").unwrap().unwrap().purchases, 1);
        assert_eq!(profiles.kpis("k1").unwrap(), sled_kpis("k1"));
        profiles.erase("k1", 1).unwrap();
        assert!(profiles.inner.kpis.ids().is_empty(), "erased, not cached");
        assert_eq!(profiles.kpis("k1").unwrap(), None);
    }

    #[test]
    fn concurrent_lookups_never_go_back_in_versions_or_end_stale() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let profiles = ProfileStore::open_with(&store, 4).unwrap();
        profiles.upsert(consenting("x", 1)).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (profiles, done) = (profiles.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut last = 0;
                    while !done.load(Ordering::SeqCst) {
                        let v = profiles.lookup("x").unwrap().unwrap().version;
                        assert!(v >= last, "went back from {last} to {v}");
                        last = v;
                        // Churn the small cache so misses and fills race the writer.
                        profiles.lookup("y").unwrap();
                    }
                })
            })
            .collect();
        for v in 2..=2000 {
            profiles.upsert(consenting("x", v)).unwrap();
        }
        done.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(profiles.lookup("x").unwrap().unwrap().version, 2000);
    }

    #[test]
    fn birthdays_are_month_and_day() {
        let b: MonthDay = "02-29".parse().unwrap();
        assert!(b.is("2028-02-29".parse().unwrap()));
        assert!(
            b.is("2027-02-28".parse().unwrap()),
            "celebrated a day early"
        );
        assert!(!b.is("2028-02-28".parse().unwrap()));
        for bad in ["2-29", "02-30", "13-01", "0101", "ab-cd", "12-+3", "+1-01"] {
            assert!(bad.parse::<MonthDay>().is_err(), "{bad}");
        }
        let p: Profile = serde_json::from_str(r#"{"customer_id":"x","birthday":"07-14"}"#).unwrap();
        assert_eq!(serde_json::to_value(&p).unwrap()["birthday"], "07-14");
        assert!(
            serde_json::from_str::<Profile>(r#"{"customer_id":"x","birthday":"1990-07-14"}"#)
                .is_err()
        );
    }

    fn arbitrary_profile() -> impl proptest::strategy::Strategy<Value = Profile> {
        use proptest::prelude::*;
        let item = prop_oneof![
            "[a-z]{1,8}".prop_map(Item::Category),
            "[A-Z0-9-]{1,8}".prop_map(Item::Sku)
        ];
        let follow_up = (item.clone(), item, 0.0f64..1.0, 0.0f64..20.0).prop_map(
            |(if_bought, suggest, confidence, lift)| FollowUp {
                if_bought,
                suggest,
                confidence,
                lift,
            },
        );
        (
            "\\PC{1,20}",
            proptest::collection::vec("[0-9]{4,16}", 0..3),
            proptest::option::of("\\PC{0,12}"),
            proptest::option::of((1i8..=12, 1i8..=28)),
            any::<(bool, bool, bool)>(),
            proptest::collection::btree_map("[a-z]{1,6}", -1e6f64..1e6, 0..4),
            proptest::collection::vec(follow_up, 0..3),
            proptest::option::of(any::<[u8; 32]>()),
            any::<(u64, i64)>(),
        )
            .prop_map(
                |(
                    id,
                    cards,
                    first_name,
                    birthday,
                    (o, pr, m),
                    affinities,
                    follow_ups,
                    key,
                    (version, points),
                )| {
                    let mut p = Profile::new(id);
                    p.cards = cards;
                    p.first_name = first_name;
                    p.birthday = birthday.map(|(month, day)| MonthDay { month, day });
                    p.consents = Consents {
                        personalised_offers: o,
                        presence: pr,
                        marketing: m,
                    };
                    p.affinities = affinities;
                    p.follow_ups = follow_ups;
                    p.presence_key = key;
                    p.version = version;
                    p.points = points;
                    p
                },
            )
    }

    proptest::proptest! {
        /// Whatever central can express survives the wire and the store unchanged, apart from
        /// a presence key without consent, which the store drops.
        #[test]
        fn profiles_round_trip_through_json_and_the_store(p in arbitrary_profile()) {
            let json = serde_json::to_vec(&p).unwrap();
            let back: Profile = serde_json::from_slice(&json).unwrap();
            proptest::prop_assert_eq!(&back, &p);
            let (_d, profiles) = open();
            let outcome = profiles.upsert(p.clone()).unwrap();
            if !Profile::valid_id(&p.customer_id) {
                proptest::prop_assert_eq!(outcome, Upserted::Invalid);
                return Ok(());
            }
            let mut expected = p.clone();
            if !p.consents.presence {
                expected.presence_key = None;
            }
            proptest::prop_assert_eq!(profiles.get(&p.customer_id).unwrap(), Some(expected));
            for card in p.cards.iter().filter(|c| **c != p.customer_id) {
                proptest::prop_assert_eq!(profiles.resolve_card(card).unwrap(), p.customer_id.clone());
            }
        }
    }
}
