//! What the agent remembers about offers, in the `offers` tree: which campaign's offer each
//! customer was shown (or held back from, as control) and when, for frequency caps and
//! attribution; how much of each campaign's budget is spent; and each campaign's running
//! statistics.
//!
//! Invariants:
//! - A budget is never overspent, however many triggers race: a campaign's counter is taken
//!   with an atomic compare-and-swap before the offer counts as made, and an offer that finds
//!   the budget spent is dropped from the decision.
//! - A control decision is recorded like a shown offer (it counts against the caps, so the
//!   control group is "held back" exactly as often as the exposed group is shown an offer), but
//!   takes no budget.
//! - An offer is redeemed at most once: the first qualifying purchase inside its window marks
//!   the record, and a later purchase finds it taken.
//! - A customer's records live under their id, so erasure removes them with one prefix scan.
//!   Statistics are counts per campaign and variant, with no customer in them.
//!
//! Layout: `s ‖ customer ‖ 0 ‖ campaign ‖ 0 ‖ time (µs, big-endian)` → [`ShownRecord`] (JSON);
//! `b ‖ campaign` → offers made (u64, big-endian); `c ‖ campaign ‖ 0 ‖ variant` → statistics
//! (eight big-endian i64).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::campaign::CompiledSet;
use super::decide::{CapState, Decision};
use crate::model::transaction::{Money, Transaction, TransactionKind};
use crate::profiles::Item;
use crate::store::{Batch, Store, StoreError, Tree, TreeName};

const SHOWN: u8 = b's';
const BUDGET: u8 = b'b';
const STATS: u8 = b'c';

/// The offers tree.
#[derive(Clone, Debug)]
pub struct OfferLedger {
    tree: Tree,
}

/// One offer made to (or held back from) a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownRecord {
    pub offer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Held back as control: nothing was shown.
    #[serde(default)]
    pub control: bool,
    /// What a redemption is; empty means any purchase.
    #[serde(default)]
    pub items: Vec<Item>,
    /// The end of the attribution window.
    pub until: Timestamp,
    /// The transaction that redeemed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redeemed_by: Option<String>,
}

/// A line of a transaction that qualified for a redemption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeemedLine {
    pub sku: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Net amount of the line (after its discount), minor units.
    pub amount: Money,
}

/// The `data` of `storelink.redemption.v1`: an offer (or a control decision) followed by a
/// qualifying purchase inside the campaign's attribution window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redemption {
    pub store: String,
    pub customer_id: String,
    pub campaign: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub offer: String,
    /// `exposed` (the offer was shown) or `control` (held back; the purchase is the baseline).
    pub group: Group,
    pub offered_at: Timestamp,
    pub transaction_id: String,
    pub transaction_at: Timestamp,
    pub currency: String,
    /// Net amount of the qualifying lines, minor units.
    pub revenue: Money,
    /// Revenue minus the lines' cost, when every qualifying line carries its cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<Money>,
    pub lines: Vec<RedeemedLine>,
}

impl Redemption {
    /// The CloudEvent id: one redemption per transaction and campaign, however often the
    /// transaction is delivered.
    pub fn event_id(&self) -> String {
        format!("{}:redemption:{}", self.transaction_id, self.campaign)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Exposed,
    Control,
}

/// One campaign variant's running counts (all since the campaign first ran here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Offers shown (exposed decisions that survived the budget).
    pub shown: i64,
    /// Control decisions: the offer was held back.
    pub controls: i64,
    pub redeemed: i64,
    /// Qualifying purchases by control customers.
    pub control_purchases: i64,
    pub revenue: Money,
    pub margin: Money,
    pub control_revenue: Money,
    /// Redemptions whose lines all carried a cost, so `margin` covers these.
    pub with_margin: i64,
}

impl Counts {
    const FIELDS: usize = 8;

    fn to_bytes(self) -> Vec<u8> {
        [
            self.shown,
            self.controls,
            self.redeemed,
            self.control_purchases,
            self.revenue,
            self.margin,
            self.control_revenue,
            self.with_margin,
        ]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
    }

    fn from_bytes(b: Option<&[u8]>) -> Counts {
        let mut f = [0i64; Self::FIELDS];
        if let Some(b) = b {
            for (i, chunk) in b.chunks_exact(8).take(Self::FIELDS).enumerate() {
                f[i] = i64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            }
        }
        Counts {
            shown: f[0],
            controls: f[1],
            redeemed: f[2],
            control_purchases: f[3],
            revenue: f[4],
            margin: f[5],
            control_revenue: f[6],
            with_margin: f[7],
        }
    }

    fn add(&mut self, d: &Counts) {
        self.shown += d.shown;
        self.controls += d.controls;
        self.redeemed += d.redeemed;
        self.control_purchases += d.control_purchases;
        self.revenue += d.revenue;
        self.margin += d.margin;
        self.control_revenue += d.control_revenue;
        self.with_margin += d.with_margin;
    }
}

fn customer_prefix(customer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + customer.len());
    k.push(SHOWN);
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k
}

fn shown_key(customer: &str, campaign: &str, at: Timestamp) -> Vec<u8> {
    let mut k = customer_prefix(customer);
    k.extend_from_slice(campaign.as_bytes());
    k.push(0);
    k.extend_from_slice(&at.as_microsecond().to_be_bytes());
    k
}

/// Splits the part of a shown key after the customer prefix into (campaign, time).
fn split_shown(rest: &[u8]) -> Option<(&str, Timestamp)> {
    let sep = rest.iter().position(|b| *b == 0)?;
    let campaign = std::str::from_utf8(&rest[..sep]).ok()?;
    let time = <[u8; 8]>::try_from(&rest[sep + 1..]).ok()?;
    Some((
        campaign,
        Timestamp::from_microsecond(i64::from_be_bytes(time)).ok()?,
    ))
}

fn budget_key(campaign: &str) -> Vec<u8> {
    let mut k = vec![BUDGET];
    k.extend_from_slice(campaign.as_bytes());
    k
}

fn stats_key(campaign: &str, variant: Option<&str>) -> Vec<u8> {
    let mut k = vec![STATS];
    k.extend_from_slice(campaign.as_bytes());
    k.push(0);
    k.extend_from_slice(variant.unwrap_or("").as_bytes());
    k
}

fn count(v: Option<&[u8]>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Whether a line is one of the offer's items; no items means any purchase qualifies.
fn qualifies(items: &[Item], line: &crate::model::transaction::Line) -> bool {
    if line.voided || line.net() <= 0 {
        return false;
    }
    items.is_empty()
        || items.iter().any(|item| match item {
            Item::Category(c) => line
                .category
                .as_deref()
                .is_some_and(|l| l.eq_ignore_ascii_case(c)),
            Item::Sku(s) => line.sku == *s || line.gtin.as_deref() == Some(s.as_str()),
        })
}

impl OfferLedger {
    pub fn open(store: &Store) -> Result<OfferLedger, StoreError> {
        Ok(OfferLedger {
            tree: store.tree(TreeName::Offers)?,
        })
    }

    /// The customer's cap state: their past offers and control decisions, and the budget used
    /// by each of `budgeted` (only campaigns with a budget need their counter read).
    pub fn cap_state<'a>(
        &self,
        customer: &str,
        budgeted: impl IntoIterator<Item = &'a String>,
    ) -> Result<CapState, StoreError> {
        let mut state = CapState::default();
        let prefix = customer_prefix(customer);
        for item in self.tree.scan_prefix(&prefix) {
            let (k, _) = item?;
            if let Some((campaign, at)) = split_shown(&k[prefix.len()..]) {
                state
                    .shown
                    .entry(campaign.to_string())
                    .or_default()
                    .push(at);
            }
        }
        for campaign in budgeted {
            let used = count(self.tree.get(budget_key(campaign))?.as_deref());
            state.budget_used.insert(campaign.clone(), used);
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

    fn bump(
        &self,
        campaign: &str,
        variant: Option<&str>,
        delta: &Counts,
    ) -> Result<(), StoreError> {
        self.tree
            .update_and_fetch(stats_key(campaign, variant), |old| {
                let mut c = Counts::from_bytes(old);
                c.add(delta);
                Some(c.to_bytes())
            })
            .map(|_| ())
    }

    /// Records a decision: takes each chosen campaign's budget first, and removes from the
    /// decision the offers whose budget is spent (another trigger got there first); then
    /// keeps a record per campaign shown and per control decision, and counts them.
    pub fn record(
        &self,
        decision: &mut Decision,
        customer: &str,
        at: Timestamp,
        set: &CompiledSet,
    ) -> Result<(), StoreError> {
        let window = |campaign: &str| {
            let days = set
                .get(campaign)
                .map_or(0, |c| i64::from(c.campaign.attribution_days));
            at.checked_add(jiff::SignedDuration::from_hours(days * 24))
                .unwrap_or(Timestamp::MAX)
        };
        let items = |campaign: &str, offer: &str| {
            set.get(campaign)
                .and_then(|c| c.campaign.offers.iter().find(|o| o.id == offer))
                .map(|o| o.items.clone())
                .unwrap_or_default()
        };
        let mut campaigns: Vec<String> =
            decision.chosen.iter().map(|c| c.campaign.clone()).collect();
        campaigns.sort();
        campaigns.dedup();
        let mut spent = Vec::new();
        let mut batch = Batch::default();
        let mut counted = Vec::new();
        for campaign in &campaigns {
            let budget = set.get(campaign).and_then(|c| c.campaign.budget);
            if !self.reserve(campaign, budget)? {
                spent.push(campaign.clone());
                continue;
            }
            let chosen = decision
                .chosen
                .iter()
                .find(|c| &c.campaign == campaign)
                .expect("campaign taken from the decision");
            let record = ShownRecord {
                offer: chosen.offer.clone(),
                variant: chosen.variant.clone(),
                control: false,
                items: chosen.items.clone(),
                until: window(campaign),
                redeemed_by: None,
            };
            batch.insert(
                shown_key(customer, campaign, at),
                serde_json::to_vec(&record).expect("record serialises"),
            );
            counted.push((campaign.clone(), record.variant, false));
        }
        decision.chosen.retain(|c| !spent.contains(&c.campaign));
        for control in &decision.controls {
            let record = ShownRecord {
                offer: control.offer.clone(),
                variant: control.variant.clone(),
                control: true,
                items: items(&control.campaign, &control.offer),
                until: window(&control.campaign),
                redeemed_by: None,
            };
            batch.insert(
                shown_key(customer, &control.campaign, at),
                serde_json::to_vec(&record).expect("record serialises"),
            );
            counted.push((control.campaign.clone(), record.variant, true));
        }
        if !batch.is_empty() {
            self.tree.apply(batch)?;
        }
        for (campaign, variant, control) in counted {
            let delta = if control {
                Counts {
                    controls: 1,
                    ..Counts::default()
                }
            } else {
                Counts {
                    shown: 1,
                    ..Counts::default()
                }
            };
            self.bump(&campaign, variant.as_deref(), &delta)?;
        }
        Ok(())
    }

    /// Attributes a completed transaction of `customer` to the offers (and control decisions)
    /// whose window it falls in and whose items it contains: the latest open record per
    /// campaign is marked redeemed and counted. Returns the redemptions to send.
    ///
    /// Idempotent: for a transaction already attributed, the same redemptions come back (same
    /// event ids, so the outbox keeps them once) without counting them again. The engine relies
    /// on it when it replays the cache journal after a power cut, or when a register resends a
    /// transaction whose attribution reached the cache but whose outbox entry did not.
    pub fn attribute(
        &self,
        customer: &str,
        store: &str,
        tx: &Transaction,
    ) -> Result<Vec<Redemption>, StoreError> {
        if tx.kind != TransactionKind::Sale {
            return Ok(Vec::new());
        }
        let prefix = customer_prefix(customer);
        // Campaign → (key, record, offered at) of the latest open record that qualifies.
        let mut open: BTreeMap<String, (Vec<u8>, ShownRecord, Timestamp)> = BTreeMap::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            let Some((campaign, at)) = split_shown(&k[prefix.len()..]) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<ShownRecord>(&v) else {
                continue;
            };
            let again = record.redeemed_by.as_deref() == Some(tx.id.as_str());
            if (record.redeemed_by.is_some() && !again)
                || at > tx.ended_at
                || tx.ended_at >= record.until
            {
                continue;
            }
            // An earlier attribution of this very transaction wins over any other open record.
            if !again
                && open
                    .get(campaign)
                    .is_some_and(|(_, r, _)| r.redeemed_by.is_some())
            {
                continue;
            }
            open.insert(campaign.to_string(), (k.to_vec(), record, at));
        }
        let mut out = Vec::new();
        for (campaign, (key, mut record, offered_at)) in open {
            let lines: Vec<RedeemedLine> = tx
                .lines
                .iter()
                .filter(|l| qualifies(&record.items, l))
                .map(|l| RedeemedLine {
                    sku: l.sku.clone(),
                    category: l.category.clone(),
                    amount: l.net(),
                })
                .collect();
            if lines.is_empty() {
                continue;
            }
            let qualifying: Vec<_> = tx
                .lines
                .iter()
                .filter(|l| qualifies(&record.items, l))
                .collect();
            let revenue: Money = lines.iter().map(|l| l.amount).sum();
            let margin = qualifying
                .iter()
                .map(|l| l.cost.map(|c| l.net() - c))
                .sum::<Option<Money>>();
            let group = if record.control {
                Group::Control
            } else {
                Group::Exposed
            };
            let again = record.redeemed_by.is_some();
            if !again {
                record.redeemed_by = Some(tx.id.clone());
                self.tree
                    .insert(key, serde_json::to_vec(&record).expect("record serialises"))?;
            }
            let delta = match group {
                Group::Exposed => Counts {
                    redeemed: 1,
                    revenue,
                    margin: margin.unwrap_or(0),
                    with_margin: i64::from(margin.is_some()),
                    ..Counts::default()
                },
                Group::Control => Counts {
                    control_purchases: 1,
                    control_revenue: revenue,
                    ..Counts::default()
                },
            };
            if !again {
                self.bump(&campaign, record.variant.as_deref(), &delta)?;
            }
            out.push(Redemption {
                store: store.to_string(),
                customer_id: customer.to_string(),
                campaign,
                variant: record.variant,
                offer: record.offer,
                group,
                offered_at,
                transaction_id: tx.id.clone(),
                transaction_at: tx.ended_at,
                currency: tx.currency.clone(),
                revenue,
                margin,
                lines,
            });
        }
        Ok(out)
    }

    /// Every campaign variant's counts, by (campaign, variant).
    pub fn counts(&self) -> Result<BTreeMap<(String, Option<String>), Counts>, StoreError> {
        let mut out = BTreeMap::new();
        for item in self.tree.scan_prefix([STATS]) {
            let (k, v) = item?;
            let rest = &k[1..];
            let Some(sep) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let (Ok(campaign), Ok(variant)) = (
                std::str::from_utf8(&rest[..sep]),
                std::str::from_utf8(&rest[sep + 1..]),
            ) else {
                continue;
            };
            let variant = (!variant.is_empty()).then(|| variant.to_string());
            out.insert(
                (campaign.to_string(), variant),
                Counts::from_bytes(Some(&v)),
            );
        }
        Ok(out)
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

    /// Forgets the shown and control records made before `before` (retention); returns how
    /// many. Caps look back far less than any retention, so no cap is loosened by it.
    pub fn prune(&self, before: Timestamp) -> Result<usize, StoreError> {
        let cutoff = before.as_microsecond();
        let mut batch = Batch::default();
        let mut n = 0;
        for item in self.tree.scan_prefix([b's']) {
            let (k, _) = item?;
            let at = k
                .len()
                .checked_sub(8)
                .and_then(|i| <[u8; 8]>::try_from(&k[i..]).ok())
                .map(i64::from_be_bytes);
            if at.is_some_and(|at| at < cutoff) {
                batch.remove(&*k);
                n += 1;
            }
        }
        if n > 0 {
            self.tree.apply(batch)?;
        }
        Ok(n)
    }

    /// A value kept beside the ledger (the last good campaign sets).
    pub fn fact(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(fact_key(name))?.map(|v| v.to_vec()))
    }

    pub fn set_fact(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(fact_key(name), value).map(|_| ())
    }
}

fn fact_key(name: &str) -> Vec<u8> {
    let mut k = vec![b'f'];
    k.extend_from_slice(name.as_bytes());
    k
}

/// What an erasure removes of the offer history.
impl crate::model::customer::CustomerRecords for OfferLedger {
    fn erase_customer(&self, ids: &[String]) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let n = match ids.first() {
            Some(id) => self.erase(id)?,
            None => 0,
        };
        Ok(vec![("offer_records", n as u64)])
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
                                triggers: vec![Trigger::StoreEntered],
                                store: "s1".into(),
                                zone: None,
                                lane: None,
                                at: "2026-11-23T10:00:00Z".parse().unwrap(),
                                basket: None,
                            };
                            let state = ledger.cap_state(&p.customer_id, set.budgeted()).unwrap();
                            let mut d = decide(&set, &p, None, &occasion, &state, &tz);
                            ledger
                                .record(&mut d, &p.customer_id, occasion.at, &set)
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
        assert_eq!(
            ledger
                .cap_state("c0-0", set.budgeted())
                .unwrap()
                .budget_used["welcome"],
            50
        );
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
            triggers: vec![Trigger::StoreEntered],
            store: "s1".into(),
            zone: None,
            lane: None,
            at: t.parse().unwrap(),
            basket: None,
        };
        let tz = jiff::tz::TimeZone::UTC;
        for (t, expect) in [
            ("2026-11-23T10:00:00Z", 1),
            ("2026-11-23T15:00:00Z", 0),
            ("2026-11-24T10:00:00Z", 1),
        ] {
            let o = at(t);
            let mut d = decide(
                &set,
                &p,
                None,
                &o,
                &ledger.cap_state("c1", set.budgeted()).unwrap(),
                &tz,
            );
            ledger.record(&mut d, "c1", o.at, &set).unwrap();
            assert_eq!(d.chosen.len(), expect, "{t}");
        }
        assert_eq!(
            ledger.cap_state("c1", set.budgeted()).unwrap().shown["welcome"].len(),
            2
        );
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
            .record(&mut d, "c10", "2026-11-23T10:00:00Z".parse().unwrap(), &set)
            .unwrap();
        assert_eq!(ledger.erase("c1").unwrap(), 2);
        assert!(
            ledger
                .cap_state("c1", set.budgeted())
                .unwrap()
                .shown
                .is_empty()
        );
        assert_eq!(
            ledger.cap_state("c10", set.budgeted()).unwrap().shown["welcome"].len(),
            1
        );
    }

    fn purchase(id: &str, at: &str, lines: &[(&str, &str, i64, Option<i64>)]) -> Transaction {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "business_day": &at[..10],
            "started_at": at,
            "ended_at": at,
            "currency": "EUR",
            "loyalty_id": "c1",
            "lines": lines.iter().map(|(sku, cat, amount, cost)| serde_json::json!({
                "sku": sku, "category": cat, "quantity": "1", "unit_price": amount,
                "amount": amount, "cost": cost
            })).collect::<Vec<_>>(),
            "total": lines.iter().map(|l| l.2).sum::<i64>(),
        }))
        .unwrap()
    }

    fn games_set(holdout_bp: u32) -> CompiledSet {
        CompiledSet::compile(
            serde_json::from_value(serde_json::json!({
                "version": 1,
                "campaigns": [{
                    "id": "games",
                    "name": "Games",
                    "valid_from": "2026-01-01T00:00:00Z",
                    "valid_until": "2027-01-01T00:00:00Z",
                    "trigger": {"kind": "store_entered"},
                    "offers": [{"id": "g20", "texts": {"push": {"en": "20% off games"}}, "items": [{"category": "games"}, {"sku": "PS5-PAD"}]}],
                    "holdout_bp": holdout_bp,
                    "attribution_days": 7
                }]
            }))
            .unwrap(),
        )
    }

    fn offered(ledger: &OfferLedger, set: &CompiledSet, at: &str) -> Decision {
        let mut p = Profile::new("c1");
        p.consents.personalised_offers = true;
        let occasion = Occasion {
            triggers: vec![Trigger::StoreEntered],
            store: "s1".into(),
            zone: None,
            lane: None,
            at: at.parse().unwrap(),
            basket: None,
        };
        let state = ledger.cap_state("c1", set.budgeted()).unwrap();
        let mut d = decide(set, &p, None, &occasion, &state, &jiff::tz::TimeZone::UTC);
        ledger.record(&mut d, "c1", occasion.at, set).unwrap();
        d
    }

    #[test]
    fn a_purchase_inside_the_window_is_one_redemption_with_revenue_and_margin() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let ledger = OfferLedger::open(&store).unwrap();
        let set = games_set(0);
        assert_eq!(
            offered(&ledger, &set, "2026-11-02T10:00:00Z").chosen.len(),
            1
        );

        // Before the offer, or of something unrelated: nothing.
        let before = purchase("t0", "2026-11-02T09:00:00Z", &[("G1", "games", 5000, None)]);
        assert!(ledger.attribute("c1", "s1", &before).unwrap().is_empty());
        let unrelated = purchase(
            "t1",
            "2026-11-03T10:00:00Z",
            &[("M1", "dairy", 149, Some(90))],
        );
        assert!(ledger.attribute("c1", "s1", &unrelated).unwrap().is_empty());

        // Inside the window: one redemption, the qualifying lines only (category or SKU).
        let tx = purchase(
            "t2",
            "2026-11-05T18:00:00Z",
            &[
                ("G1", "GAMES", 5999, Some(4100)),
                ("PS5-PAD", "accessories", 6999, Some(5000)),
                ("M1", "dairy", 149, None),
            ],
        );
        let r = ledger.attribute("c1", "s1", &tx).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].campaign, "games");
        assert_eq!(r[0].group, Group::Exposed);
        assert_eq!(r[0].revenue, 5999 + 6999);
        assert_eq!(r[0].margin, Some(5999 - 4100 + 6999 - 5000));
        assert_eq!(r[0].event_id(), "t2:redemption:games");
        assert_eq!(
            r[0].offered_at,
            "2026-11-02T10:00:00Z".parse::<Timestamp>().unwrap()
        );

        // Redeemed once: a later purchase inside the window finds the offer taken.
        let later = purchase("t3", "2026-11-06T10:00:00Z", &[("G2", "games", 2999, None)]);
        assert!(ledger.attribute("c1", "s1", &later).unwrap().is_empty());

        // A new offer after the window closed: a purchase past its own window gets nothing.
        assert_eq!(
            offered(&ledger, &set, "2026-11-20T10:00:00Z").chosen.len(),
            1
        );
        let late = purchase("t4", "2026-11-27T10:00:01Z", &[("G3", "games", 999, None)]);
        assert!(
            ledger.attribute("c1", "s1", &late).unwrap().is_empty(),
            "7 days and 1 s later"
        );
        // Without a cost on a line, margin is unknown rather than overstated.
        let no_cost = purchase("t5", "2026-11-26T10:00:00Z", &[("G3", "games", 999, None)]);
        assert_eq!(
            ledger.attribute("c1", "s1", &no_cost).unwrap()[0].margin,
            None
        );

        let counts = ledger.counts().unwrap()[&("games".to_string(), None)];
        assert_eq!(
            (counts.shown, counts.redeemed, counts.revenue),
            (2, 2, 5999 + 6999 + 999)
        );
        assert_eq!(
            (counts.margin, counts.with_margin),
            (5999 - 4100 + 6999 - 5000, 1)
        );
    }

    #[test]
    fn control_customers_purchases_are_recorded_as_control() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let ledger = OfferLedger::open(&store).unwrap();
        let set = games_set(10_000);
        let d = offered(&ledger, &set, "2026-11-02T10:00:00Z");
        assert!(d.chosen.is_empty());
        assert_eq!(d.controls.len(), 1);
        // Held back counts against the caps like a shown offer, but takes no budget.
        assert_eq!(
            ledger.cap_state("c1", set.budgeted()).unwrap().shown["games"].len(),
            1
        );
        let tx = purchase("t1", "2026-11-03T10:00:00Z", &[("G1", "games", 5000, None)]);
        let r = ledger.attribute("c1", "s1", &tx).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].group, Group::Control);
        let counts = ledger.counts().unwrap()[&("games".to_string(), None)];
        assert_eq!(
            (
                counts.shown,
                counts.controls,
                counts.control_purchases,
                counts.control_revenue
            ),
            (0, 1, 1, 5000)
        );
        assert_eq!(counts.redeemed, 0);
    }
}
