//! What the agent remembers about offers it made, in the `offers` tree: when each customer
//! was shown each campaign's offer (for frequency caps, and later attribution), and how much of
//! each campaign's budget is spent.
//!
//! Invariants:
//! - A budget is never overspent, however many triggers race: a campaign's counter is taken
//!   with an atomic compare-and-swap before the offer counts as made, and an offer that finds
//!   the budget spent is dropped from the decision.
//! - A customer's offer history lives under their id, so erasure removes it with one prefix
//!   scan.
//!
//! Layout: `s ‖ customer ‖ 0 ‖ campaign ‖ 0 ‖ time (µs, big-endian)` → offer id;
//! `b ‖ campaign` → offers made (u64, big-endian).

use jiff::Timestamp;

use super::decide::{CapState, Decision};
use crate::store::{Batch, Store, StoreError, Tree, TreeName};

const SHOWN: u8 = b's';
const BUDGET: u8 = b'b';

/// The offers tree.
#[derive(Clone, Debug)]
pub struct OfferLedger {
    tree: Tree,
}

fn customer_prefix(customer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + customer.len());
    k.push(SHOWN);
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k
}

fn budget_key(campaign: &str) -> Vec<u8> {
    let mut k = vec![BUDGET];
    k.extend_from_slice(campaign.as_bytes());
    k
}

fn count(v: Option<&[u8]>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl OfferLedger {
    pub fn open(store: &Store) -> Result<OfferLedger, StoreError> {
        Ok(OfferLedger {
            tree: store.tree(TreeName::Offers)?,
        })
    }

    /// The customer's cap state: their past offers, and the budgets of the campaigns.
    pub fn cap_state(&self, customer: &str) -> Result<CapState, StoreError> {
        let mut state = CapState::default();
        let prefix = customer_prefix(customer);
        for item in self.tree.scan_prefix(&prefix) {
            let (k, _) = item?;
            let rest = &k[prefix.len()..];
            let Some(sep) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let (campaign, time) = (&rest[..sep], &rest[sep + 1..]);
            let (Ok(campaign), Ok(time)) =
                (std::str::from_utf8(campaign), <[u8; 8]>::try_from(time))
            else {
                continue;
            };
            if let Ok(at) = Timestamp::from_microsecond(i64::from_be_bytes(time)) {
                state
                    .shown
                    .entry(campaign.to_string())
                    .or_default()
                    .push(at);
            }
        }
        for item in self.tree.scan_prefix([BUDGET]) {
            let (k, v) = item?;
            if let Ok(campaign) = std::str::from_utf8(&k[1..]) {
                state
                    .budget_used
                    .insert(campaign.to_string(), count(Some(&v)));
            }
        }
        Ok(state)
    }

    /// Takes one offer from a campaign's budget; false when it is spent.
    pub fn reserve(&self, campaign: &str, budget: Option<u64>) -> Result<bool, StoreError> {
        let mut taken = false;
        self.tree.update_and_fetch(budget_key(campaign), |old| {
            let used = count(old);
            taken = budget.is_none_or(|b| used < b);
            Some(if taken { used + 1 } else { used }.to_be_bytes().to_vec())
        })?;
        Ok(taken)
    }

    /// Records what a decision showed, taking each campaign's budget first; offers whose
    /// budget is spent (another trigger got there first) are removed from the decision.
    pub fn record(
        &self,
        decision: &mut Decision,
        customer: &str,
        at: Timestamp,
        budgets: impl Fn(&str) -> Option<u64>,
    ) -> Result<(), StoreError> {
        let mut campaigns: Vec<String> =
            decision.chosen.iter().map(|c| c.campaign.clone()).collect();
        campaigns.sort();
        campaigns.dedup();
        let mut spent = Vec::new();
        let mut batch = Batch::default();
        for campaign in &campaigns {
            if !self.reserve(campaign, budgets(campaign))? {
                spent.push(campaign.clone());
                continue;
            }
            let mut k = customer_prefix(customer);
            k.extend_from_slice(campaign.as_bytes());
            k.push(0);
            k.extend_from_slice(&at.as_microsecond().to_be_bytes());
            let offer = decision
                .chosen
                .iter()
                .find(|c| &c.campaign == campaign)
                .map(|c| c.offer.clone())
                .unwrap_or_default();
            batch.insert(k, offer.as_bytes());
        }
        decision.chosen.retain(|c| !spent.contains(&c.campaign));
        if !batch.is_empty() {
            self.tree.apply(batch)?;
        }
        Ok(())
    }

    /// Removes a customer's offer history (erasure). Returns how many records went.
    pub fn erase(&self, customer: &str) -> Result<usize, StoreError> {
        let mut batch = Batch::default();
        let mut n = 0;
        for item in self.tree.scan_prefix(customer_prefix(customer)) {
            let (k, _) = item?;
            batch.remove(&*k);
            n += 1;
        }
        if n > 0 {
            self.tree.apply(batch)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offers::campaign::Trigger;
    use crate::offers::campaign::{CampaignSet, CompiledSet};
    use crate::offers::decide::{Occasion, decide};
    use crate::profiles::Profile;
    use crate::store::StoreOptions;

    fn campaign_set(budget: u64) -> CompiledSet {
        let set: CampaignSet = serde_json::from_value(serde_json::json!({
            "version": 1,
            "campaigns": [{
                "id": "welcome",
                "name": "Welcome",
                "valid_from": "2026-01-01T00:00:00Z",
                "valid_until": "2027-01-01T00:00:00Z",
                "trigger": {"kind": "store_entered"},
                "offers": [{"id": "w5", "texts": {"push": {"en": "5 off today"}}}],
                "caps": [{"max": 1, "per": "day"}],
                "budget": budget
            }]
        }))
        .unwrap();
        CompiledSet::compile(set)
    }

    #[test]
    fn a_budget_stops_at_its_limit_under_concurrent_triggers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let ledger = OfferLedger::open(&store).unwrap();
        let set = std::sync::Arc::new(campaign_set(50));
        let tz = jiff::tz::TimeZone::UTC;
        let shown: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let (ledger, set, tz) = (ledger.clone(), set.clone(), tz.clone());
                    s.spawn(move || {
                        let mut shown = 0;
                        for i in 0..100 {
                            let mut p = Profile::new(format!("c{w}-{i}"));
                            p.consents.personalised_offers = true;
                            let occasion = Occasion {
                                trigger: Trigger::StoreEntered,
                                store: "s1".into(),
                                zone: None,
                                lane: None,
                                at: "2026-11-23T10:00:00Z".parse().unwrap(),
                            };
                            let state = ledger.cap_state(&p.customer_id).unwrap();
                            let mut d = decide(&set, &p, None, &occasion, &state, &tz);
                            ledger
                                .record(&mut d, &p.customer_id, occasion.at, |_| Some(50))
                                .unwrap();
                            shown += d.chosen.len();
                        }
                        shown
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(shown, 50, "400 triggers raced for a budget of 50");
        assert_eq!(ledger.cap_state("c0-0").unwrap().budget_used["welcome"], 50);
    }

    #[test]
    fn history_feeds_the_caps_and_goes_with_erasure() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let ledger = OfferLedger::open(&store).unwrap();
        let set = campaign_set(1000);
        let mut p = Profile::new("c1");
        p.consents.personalised_offers = true;
        let at = |t: &str| Occasion {
            trigger: Trigger::StoreEntered,
            store: "s1".into(),
            zone: None,
            lane: None,
            at: t.parse().unwrap(),
        };
        let tz = jiff::tz::TimeZone::UTC;
        for (t, expect) in [
            ("2026-11-23T10:00:00Z", 1),
            ("2026-11-23T15:00:00Z", 0),
            ("2026-11-24T10:00:00Z", 1),
        ] {
            let o = at(t);
            let mut d = decide(&set, &p, None, &o, &ledger.cap_state("c1").unwrap(), &tz);
            ledger.record(&mut d, "c1", o.at, |_| Some(1000)).unwrap();
            assert_eq!(d.chosen.len(), expect, "{t}");
        }
        assert_eq!(ledger.cap_state("c1").unwrap().shown["welcome"].len(), 2);
        // A neighbour whose id starts the same keeps their history.
        let mut d = decide(
            &set,
            &Profile {
                customer_id: "c10".into(),
                ..p.clone()
            },
            None,
            &at("2026-11-23T10:00:00Z"),
            &CapState::default(),
            &tz,
        );
        ledger
            .record(
                &mut d,
                "c10",
                "2026-11-23T10:00:00Z".parse().unwrap(),
                |_| None,
            )
            .unwrap();
        assert_eq!(ledger.erase("c1").unwrap(), 2);
        assert!(ledger.cap_state("c1").unwrap().shown.is_empty());
        assert_eq!(ledger.cap_state("c10").unwrap().shown["welcome"].len(), 1);
    }
}
