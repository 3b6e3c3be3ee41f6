//! Occasions: the durable memory that a lifecycle trigger has fired for a customer, so that
//! each fires once per customer and occasion.
//!
//! An occasion is what makes a trigger new: `winback_due` for `shoes` after the last `shoes`
//! purchase on 2026-03-02, `birthday` in 2026, `first_purchase`. Its key names the customer,
//! the scope, the trigger and that detail. A purchase that moves the last `shoes` day makes a
//! new occasion; a restart, a replayed transaction or a second daily run finds the old one.
//!
//! Invariants:
//! - The memory lives in the log (table `occasions`), so it is exactly as durable as the
//!   outbox. A `storelink.trigger.v1` event and its occasion are written in one transaction by
//!   the engine (`Ingest::Once`): after a power cut either both are there or neither is, so a
//!   trigger is never sent twice and never lost between the two.
//! - Two scopes, remembered apart: [`Scope::Signal`] (the event for central's email tool) and
//!   [`Scope::Store`] (a trigger of an in-store campaign decision at a visit). A birthday mail
//!   sent in the morning does not take the birthday offer at the till away.
//! - Keys begin with the customer id and a NUL (ids never hold one), so an erasure removes a
//!   customer's occasions with one range. A value is the time it fired (i64 µs, BE), so
//!   retention prunes, and a token (u64 BE): an occasion whose token changes fires again. The
//!   customer snapshot uses one key per customer with its content's digest as the token, so
//!   an unchanged snapshot is never sent twice and a changed one replaces the record.
//! - Customer-linked: purpose `marketing` (signal scope) or `personalised_offers` (store
//!   scope), retention `signals.occasion_retention_days`.

use jiff::Timestamp;

use crate::store::{Commit, LogTable, LogWrite, Store, StoreError};

/// Which use of a trigger an occasion is remembered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A `storelink.trigger.v1` event to central.
    Signal,
    /// A trigger of the in-store campaign decision.
    Store,
}

impl Scope {
    fn byte(self) -> u8 {
        match self {
            Scope::Signal => b's',
            Scope::Store => b'i',
        }
    }
}

/// The key of one occasion: `customer ‖ 0 ‖ scope ‖ trigger ‖ 0 ‖ detail`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OccasionKey(Vec<u8>);

impl OccasionKey {
    pub fn new(customer_id: &str, scope: Scope, trigger: &str, detail: &str) -> OccasionKey {
        let mut k = Vec::with_capacity(customer_id.len() + trigger.len() + detail.len() + 4);
        k.extend_from_slice(customer_id.as_bytes());
        k.push(0);
        k.push(scope.byte());
        k.extend_from_slice(trigger.as_bytes());
        k.push(0);
        k.extend_from_slice(detail.as_bytes());
        OccasionKey(k)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

fn customer_range(customer_id: &str) -> (Vec<u8>, Vec<u8>) {
    let mut from = customer_id.as_bytes().to_vec();
    from.push(0);
    let mut to = customer_id.as_bytes().to_vec();
    to.push(1);
    (from, to)
}

/// An occasion as remembered: when it fired and its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    pub at: Timestamp,
    pub token: u64,
}

fn decode(value: &[u8]) -> Option<Fired> {
    let at = i64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let token = value
        .get(8..16)
        .and_then(|t| t.try_into().ok())
        .map_or(0, u64::from_be_bytes);
    Some(Fired {
        at: Timestamp::from_microsecond(at).ok()?,
        token,
    })
}

fn encode(at: Timestamp, token: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&at.as_microsecond().to_be_bytes());
    v[8..].copy_from_slice(&token.to_be_bytes());
    v
}

/// Whether the occasion with this token is already remembered, inside the caller's
/// transaction.
pub fn is_claimed_in(
    w: &mut LogWrite<'_, '_>,
    key: &OccasionKey,
    token: u64,
) -> Result<bool, StoreError> {
    Ok(w.table(LogTable::Occasions)?
        .get(key.as_bytes())?
        .and_then(|v| decode(v.bytes()))
        .is_some_and(|f| f.token == token))
}

/// Remembers the occasion with its token inside the caller's transaction; false when it
/// already was remembered with that token.
pub fn claim_in(
    w: &mut LogWrite<'_, '_>,
    key: &OccasionKey,
    token: u64,
    at: Timestamp,
) -> Result<bool, StoreError> {
    if is_claimed_in(w, key, token)? {
        return Ok(false);
    }
    w.table(LogTable::Occasions)?
        .insert(key.as_bytes(), &encode(at, token))?;
    Ok(true)
}

/// The occasion memory.
#[derive(Clone)]
pub struct Occasions {
    store: Store,
}

impl Occasions {
    pub fn new(store: &Store) -> Occasions {
        Occasions {
            store: store.clone(),
        }
    }

    /// Whether the occasion is remembered (a read; the engine checks again when it writes).
    pub fn fired(&self, key: &OccasionKey) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }

    /// The occasion as remembered, if it is.
    pub fn get(&self, key: &OccasionKey) -> Result<Option<Fired>, StoreError> {
        Ok(self
            .store
            .view(LogTable::Occasions)?
            .get(key.as_bytes())?
            .and_then(|v| decode(v.bytes())))
    }

    /// Per key, whether it is not remembered yet: one read transaction, no write.
    pub fn unclaimed(&self, keys: &[OccasionKey]) -> Result<Vec<bool>, StoreError> {
        let view = self.store.view(LogTable::Occasions)?;
        keys.iter()
            .map(|k| Ok(!view.contains(k.as_bytes())?))
            .collect()
    }

    /// Remembers occasions durably; returns, per key, whether it was new. For in-store
    /// triggers, claimed before the decision is recorded or shown: a power cut in between
    /// loses that trigger's moment rather than firing it twice.
    ///
    /// An occasion already remembered costs a read; only a new one costs a durable commit
    /// (checked again inside it, so two visits at once still claim it once).
    pub fn claim(&self, keys: &[OccasionKey], at: Timestamp) -> Result<Vec<bool>, StoreError> {
        let unseen = self.unclaimed(keys)?;
        if !unseen.contains(&true) {
            return Ok(unseen);
        }
        self.store.write(Commit::Durable, |w| {
            keys.iter()
                .zip(&unseen)
                .map(|(k, unseen)| {
                    if *unseen {
                        claim_in(w, k, 0, at)
                    } else {
                        Ok(false)
                    }
                })
                .collect()
        })
    }

    /// Forgets every occasion of a customer (erasure); returns how many there were.
    pub fn erase_customer(&self, customer_id: &str) -> Result<usize, StoreError> {
        let (from, to) = customer_range(customer_id);
        self.store.write(Commit::Durable, |w| {
            let table = w.table(LogTable::Occasions)?;
            let keys: Vec<Vec<u8>> = table
                .range(&from, Some(&to))?
                .map(|item| item.map(|i| i.key().to_vec()))
                .collect::<Result<_, _>>()?;
            for k in &keys {
                table.remove(k)?;
            }
            Ok(keys.len())
        })
    }

    /// Forgets occasions that fired before `before` (retention); returns how many.
    pub fn prune(&self, before: Timestamp) -> Result<usize, StoreError> {
        let cutoff = before.as_microsecond();
        let old: Vec<Vec<u8>> = self
            .store
            .view(LogTable::Occasions)?
            .iter()?
            .filter_map(|item| {
                let item = item.ok()?;
                let fired = decode(item.value())?;
                (fired.at.as_microsecond() < cutoff).then(|| item.key().to_vec())
            })
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        self.store.write(Commit::Lazy, |w| {
            let table = w.table(LogTable::Occasions)?;
            for k in &old {
                table.remove(k)?;
            }
            Ok(old.len())
        })
    }

    pub fn len(&self) -> Result<u64, StoreError> {
        self.store.view(LogTable::Occasions)?.len()
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[test]
    fn an_occasion_is_claimed_once_survives_a_reopen_and_goes_with_its_customer() {
        let dir = tempfile::tempdir().unwrap();
        let at: Timestamp = "2026-03-01T06:00:00Z".parse().unwrap();
        let shoes = OccasionKey::new("c1", Scope::Signal, "winback_due", "shoes:2026-01-02");
        let in_store = OccasionKey::new("c1", Scope::Store, "winback_due", "shoes:2026-01-02");
        let other = OccasionKey::new("c10", Scope::Signal, "winback_due", "shoes:2026-01-02");
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let o = Occasions::new(&store);
            assert_eq!(
                o.claim(&[shoes.clone(), shoes.clone(), other.clone()], at)
                    .unwrap(),
                vec![true, false, true]
            );
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let o = Occasions::new(&store);
        assert!(o.fired(&shoes).unwrap(), "durable across a reopen");
        assert!(
            !o.fired(&in_store).unwrap(),
            "the scopes are remembered apart"
        );
        assert_eq!(
            o.claim(std::slice::from_ref(&in_store), at).unwrap(),
            vec![true]
        );
        // "c10" begins with "c1": the NUL after the id keeps it out of c1's range.
        assert_eq!(o.erase_customer("c1").unwrap(), 2);
        assert!(o.fired(&other).unwrap());
        assert_eq!(o.prune("2026-03-02T00:00:00Z".parse().unwrap()).unwrap(), 1);
        assert!(o.is_empty().unwrap());
    }
}
