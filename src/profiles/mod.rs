//! Customer profiles at the edge: what the agent knows about loyalty customers, kept in the
//! `profiles` tree.
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
//!
//! - KPIs follow the store's own transactions (see [`kpi`]): each loyalty transaction is one
//!   ledger entry keyed by its id, so a re-delivered transaction changes nothing.
//! - An erasure removes everything the tree holds about a customer and leaves a tombstone with
//!   the version it was at; an upsert no newer than the tombstone is refused, so a stale sync
//!   cannot bring the customer back.
//!
//! Layout of the `profiles` tree: `p ‖ customer id` → profile (JSON); `k ‖ customer id` →
//! presence key (32 bytes); `l ‖ customer id ‖ 0 ‖ transaction id` → ledger entry (JSON);
//! `m ‖ customer id` → KPIs (JSON); `t ‖ customer id` → tombstone (u64 version, big-endian).
//! Customer ids never contain NUL, so `l ‖ id ‖ 0` is a prefix of that customer's ledger only.

pub mod downlink;
pub mod kpi;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::pos::transaction::{Transaction, TransactionKind};
use crate::presence::identity::PresenceKey;
use crate::store::{Batch, Store, StoreError, Tree, TreeName};
use kpi::{Kpis, LedgerEntry};

const PROFILE: u8 = b'p';
const KEY: u8 = b'k';
const LEDGER: u8 = b'l';
const KPIS: u8 = b'm';
const TOMBSTONE: u8 = b't';

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

/// A loyalty customer as central describes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The loyalty id.
    pub customer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default)]
    pub points: i64,
    #[serde(default)]
    pub consents: Consents,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub affinities: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_key")]
    pub presence_key: Option<PresenceKey>,
    /// Central's version of this profile; higher wins.
    #[serde(default)]
    pub version: u64,
}

impl Profile {
    pub fn new(customer_id: impl Into<String>) -> Profile {
        Profile {
            customer_id: customer_id.into(),
            first_name: None,
            tier: None,
            points: 0,
            consents: Consents::default(),
            segments: Vec::new(),
            affinities: BTreeMap::new(),
            presence_key: None,
            version: 0,
        }
    }
}

mod hex_key {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &Option<PresenceKey>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(k) => s.serialize_str(&crate::presence::identity::hex(k)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PresenceKey>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| crate::presence::identity::parse_key(&t).map_err(serde::de::Error::custom))
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
}

/// What `storelink profiles stats` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileStats {
    pub profiles: u64,
    pub with_presence_key: u64,
    pub with_kpis: u64,
    pub ledger_entries: u64,
    pub tombstones: u64,
}

/// The profile cache in sled.
#[derive(Clone)]
pub struct ProfileStore {
    tree: Tree,
    changes: Arc<watch::Sender<u64>>,
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
        Ok(ProfileStore {
            tree: store.tree(TreeName::Profiles)?,
            changes: Arc::new(watch::channel(0).0),
        })
    }

    /// Stores a profile unless a newer version is held. Not durable until the store flushes.
    pub fn upsert(&self, mut profile: Profile) -> Result<Upserted, StoreError> {
        if let Some(erased_at) = self.tombstone(&profile.customer_id)?
            && profile.version <= erased_at
        {
            return Ok(Upserted::Erased);
        }
        if let Some(held) = self.get(&profile.customer_id)?
            && held.version > profile.version
        {
            return Ok(Upserted::Stale);
        }
        if !profile.consents.presence {
            profile.presence_key = None;
        }
        let mut batch = Batch::default();
        let id = &profile.customer_id;
        match &profile.presence_key {
            Some(k) => batch.insert(key(KEY, id), k),
            None => batch.remove(key(KEY, id)),
        }
        batch.insert(
            key(PROFILE, id),
            serde_json::to_vec(&profile).expect("profiles serialise"),
        );
        self.tree.apply(batch)?;
        self.changes.send_modify(|g| *g += 1);
        Ok(Upserted::Applied)
    }

    pub fn get(&self, customer_id: &str) -> Result<Option<Profile>, StoreError> {
        Ok(self
            .tree
            .get(key(PROFILE, customer_id))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The version at which a customer was erased, if they were.
    pub fn tombstone(&self, customer_id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree
            .get(key(TOMBSTONE, customer_id))?
            .and_then(|v| <[u8; 8]>::try_from(&*v).ok())
            .map(u64::from_be_bytes))
    }

    /// Erases a customer: profile, presence key, ledger and KPIs go in one atomic batch, and a
    /// tombstone at `version` (at least the held profile's) stays. Returns how many records
    /// went. Presence and offer history live elsewhere and are erased by their owners.
    pub fn erase(&self, customer_id: &str, version: u64) -> Result<usize, StoreError> {
        let mut batch = Batch::default();
        let mut n = 0;
        let held = self.get(customer_id)?.map(|p| p.version).unwrap_or(0);
        for k in [
            key(PROFILE, customer_id),
            key(KEY, customer_id),
            key(KPIS, customer_id),
        ] {
            if self.tree.contains(&k)? {
                n += 1;
            }
            batch.remove(k);
        }
        for item in self.tree.scan_prefix(ledger_prefix(customer_id)) {
            let (k, _) = item?;
            batch.remove(&*k);
            n += 1;
        }
        let erased_at = version
            .max(held)
            .max(self.tombstone(customer_id)?.unwrap_or(0));
        batch.insert(key(TOMBSTONE, customer_id), erased_at.to_be_bytes());
        self.tree.apply(batch)?;
        self.changes.send_modify(|g| *g += 1);
        Ok(n)
    }

    /// Adds a transaction to its customer's ledger and recomputes their KPIs. Returns false
    /// (and changes nothing) for a transaction without a loyalty id, a void, one already in
    /// the ledger, or an erased customer. A customer not known yet gets a stub profile
    /// (version 0) that sync fills in later.
    pub fn record_transaction(&self, tx: &Transaction) -> Result<bool, StoreError> {
        let Some(customer) = tx.loyalty_id.as_deref() else {
            return Ok(false);
        };
        if customer.is_empty() || customer.contains('\0') {
            return Ok(false);
        }
        let amount = match tx.kind {
            TransactionKind::Sale => tx.total,
            TransactionKind::Return => -tx.total.abs(),
            TransactionKind::Void => return Ok(false),
        };
        let mut entry_key = ledger_prefix(customer);
        entry_key.extend_from_slice(tx.id.as_bytes());
        if self.tree.contains(&entry_key)? || self.tombstone(customer)?.is_some() {
            return Ok(false);
        }
        let mut groups: Vec<String> = tx
            .lines
            .iter()
            .filter(|l| !l.voided)
            .filter_map(|l| l.category.clone())
            .collect();
        groups.sort();
        groups.dedup();
        let entry = LedgerEntry {
            day: tx.business_day,
            amount,
            groups,
        };
        let mut ledger = self.ledger(customer)?;
        ledger.push(entry.clone());
        let kpis = Kpis::compute(&ledger);

        let mut batch = Batch::default();
        batch.insert(
            entry_key,
            serde_json::to_vec(&entry).expect("ledger entries serialise"),
        );
        batch.insert(
            key(KPIS, customer),
            serde_json::to_vec(&kpis).expect("KPIs serialise"),
        );
        if !self.tree.contains(key(PROFILE, customer))? {
            batch.insert(
                key(PROFILE, customer),
                serde_json::to_vec(&Profile::new(customer)).expect("profiles serialise"),
            );
        }
        self.tree.apply(batch)?;
        Ok(true)
    }

    /// A customer's ledger, in key (transaction id) order.
    pub fn ledger(&self, customer_id: &str) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(ledger_prefix(customer_id)) {
            let (_, v) = item?;
            if let Ok(e) = serde_json::from_slice(&v) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// A customer's KPIs as last computed.
    pub fn kpis(&self, customer_id: &str) -> Result<Option<Kpis>, StoreError> {
        Ok(self
            .tree
            .get(key(KPIS, customer_id))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Counts for support and status.
    pub fn stats(&self) -> Result<ProfileStats, StoreError> {
        let count = |prefix: u8| self.tree.scan_prefix([prefix]).count() as u64;
        Ok(ProfileStats {
            profiles: count(PROFILE),
            with_presence_key: count(KEY),
            with_kpis: count(KPIS),
            ledger_entries: count(LEDGER),
            tombstones: count(TOMBSTONE),
        })
    }

    /// Every consenting customer's presence key.
    pub fn presence_keys(&self) -> Result<Vec<(Arc<str>, PresenceKey)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([KEY]) {
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
        self.changes.subscribe()
    }

    pub fn len(&self) -> usize {
        self.tree.scan_prefix([PROFILE]).count()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.scan_prefix([PROFILE]).next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

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

        assert_eq!(profiles.erase("c42", 3).unwrap(), 4);
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
}
