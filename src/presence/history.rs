//! Presence history in sled: what the core and an erasure request need to know about past
//! visits, kept no longer than `presence.retention_days`.
//!
//! Invariants:
//! - Keys are `u64_be(micros since epoch) ‖ customer id`, so expiry is one range removal from
//!   the start of the tree and never scans the living part.
//! - Only recognised, consenting customers have records; an unknown device never reaches here.
//! - A customer's records can be erased at once (GDPR art. 17): [`History::erase`].

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::store::{Batch, Store, StoreError, Tree, TreeName};

/// One presence event as kept locally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub customer_id: String,
    pub event: String,
    /// A zone name, or `store`.
    pub place: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    pub at: Timestamp,
}

/// How many records one expiry pass removes before it yields; keeps the pass from holding the
/// pipeline up after a long downtime.
const EXPIRY_CHUNK: usize = 10_000;

#[derive(Clone)]
pub struct History {
    tree: Tree,
    retention: Duration,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

fn micros(at: Timestamp) -> u64 {
    at.as_microsecond().max(0) as u64
}

impl History {
    pub fn open(store: &Store, retention_days: u32) -> Result<History, StoreError> {
        Ok(History {
            tree: store.tree(TreeName::Presence)?,
            retention: Duration::from_secs(u64::from(retention_days) * 86_400),
        })
    }

    /// Appends records in one atomic batch. Not flushed here: history is not a delivery
    /// guarantee, and sled's background flush bounds what a power cut can take.
    pub fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for r in records {
            let mut key = Vec::with_capacity(8 + r.customer_id.len());
            key.extend_from_slice(&micros(r.at).to_be_bytes());
            key.extend_from_slice(r.customer_id.as_bytes());
            batch.insert(key, serde_json::to_vec(r).expect("records serialise"));
        }
        self.tree.apply(batch)
    }

    /// Removes records older than the retention period, as of `now`. Returns how many went.
    pub fn expire(&self, now: Timestamp) -> Result<usize, StoreError> {
        let cutoff = micros(now).saturating_sub(self.retention.as_micros() as u64);
        let mut removed = 0;
        loop {
            let mut batch = Batch::default();
            let mut n = 0;
            for item in self.tree.range(..cutoff.to_be_bytes().to_vec()) {
                let (k, _) = item?;
                batch.remove(&*k);
                n += 1;
                if n == EXPIRY_CHUNK {
                    break;
                }
            }
            if n == 0 {
                return Ok(removed);
            }
            self.tree.apply(batch)?;
            removed += n;
        }
    }

    /// Removes every record of one customer. Scans the tree: erasures are rare, and a
    /// per-customer index would double every write for them.
    pub fn erase(&self, customer_id: &str) -> Result<usize, StoreError> {
        let mut batch = Batch::default();
        let mut n = 0;
        for item in self.tree.iter() {
            let (k, _) = item?;
            if k.len() >= 8 && &k[8..] == customer_id.as_bytes() {
                batch.remove(&*k);
                n += 1;
            }
        }
        self.tree.apply(batch)?;
        Ok(n)
    }

    /// A customer's records, oldest first.
    pub fn of(&self, customer_id: &str) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            if k.len() >= 8
                && &k[8..] == customer_id.as_bytes()
                && let Ok(r) = serde_json::from_slice(&v)
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// What an erasure removes of the presence history.
impl crate::model::customer::CustomerRecords for History {
    fn erase_customer(&self, ids: &[String]) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let n = match ids.first() {
            Some(id) => self.erase(id)?,
            None => 0,
        };
        Ok(vec![("presence_records", n as u64)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn record(customer: &str, at: &str) -> Record {
        Record {
            customer_id: customer.into(),
            event: "entered".into(),
            place: "store".into(),
            lane: None,
            at: at.parse().unwrap(),
        }
    }

    #[test]
    fn expiry_removes_only_what_is_older_than_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let h = History::open(&store, 30).unwrap();
        h.append(&[
            record("c1", "2026-01-01T10:00:00Z"),
            record("c2", "2026-01-20T10:00:00Z"),
            record("c1", "2026-02-05T10:00:00Z"),
        ])
        .unwrap();
        assert_eq!(
            h.expire("2026-01-31T09:59:59Z".parse().unwrap()).unwrap(),
            0
        );
        assert_eq!(
            h.expire("2026-01-31T10:00:01Z".parse().unwrap()).unwrap(),
            1
        );
        assert_eq!(h.len(), 2);
        assert_eq!(h.of("c1").unwrap().len(), 1);
        assert_eq!(h.erase("c1").unwrap(), 1);
        assert_eq!(h.of("c1").unwrap(), vec![]);
        assert_eq!(h.of("c2").unwrap().len(), 1);
    }

    #[test]
    fn erase_does_not_match_a_customer_whose_id_is_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let h = History::open(&store, 30).unwrap();
        h.append(&[
            record("c1", "2026-01-01T10:00:00Z"),
            record("c10", "2026-01-01T10:00:00Z"),
        ])
        .unwrap();
        assert_eq!(h.erase("c1").unwrap(), 1);
        assert_eq!(h.of("c10").unwrap().len(), 1);
    }
}
