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
//! Layout of the `profiles` tree: `p ‖ customer id` → profile (JSON); `k ‖ customer id` →
//! presence key (32 bytes).

pub mod kpi;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::presence::identity::PresenceKey;
use crate::store::{Batch, Store, StoreError, Tree, TreeName};

const PROFILE: u8 = b'p';
const KEY: u8 = b'k';

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

impl ProfileStore {
    pub fn open(store: &Store) -> Result<ProfileStore, StoreError> {
        Ok(ProfileStore {
            tree: store.tree(TreeName::Profiles)?,
            changes: Arc::new(watch::channel(0).0),
        })
    }

    /// Stores a profile unless a newer version is held. Not durable until the store flushes.
    pub fn upsert(&self, mut profile: Profile) -> Result<Upserted, StoreError> {
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

    /// Removes a profile and its presence key.
    pub fn remove(&self, customer_id: &str) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.remove(key(PROFILE, customer_id));
        batch.remove(key(KEY, customer_id));
        self.tree.apply(batch)?;
        self.changes.send_modify(|g| *g += 1);
        Ok(())
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
}
