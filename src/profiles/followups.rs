//! Follow-up purchases learned at the edge: "bought X, then Y within W days" ("a PlayStation
//! buyer wants games"), from the store's own loyalty baskets.
//!
//! Items are product categories, and SKUs configured as anchor products
//! (`signals.followups.anchor_skus`). For each pair X → Y the model counts customers, not
//! transactions: `n(X)` bought X, `n(Y)` bought Y, `n(X→Y)` bought Y on the day of an X
//! purchase or within W days after it, and `N` loyalty customers with a purchase. Then
//! `support = n(X→Y) / N`, `confidence = n(X→Y) / n(X)`, `lift = confidence / (n(Y) / N)`.
//!
//! Invariants:
//! - Incremental and idempotent: a customer's share is a function of their KPIs' purchase
//!   days per item, and the model moves by the difference between their share before and
//!   after a transaction. The counters are written in the same sled batch as the KPIs they
//!   follow, so the ledger's own idempotency (a transaction id is recorded once) is the
//!   model's, and a rebuild from every customer's KPIs gives the same counts.
//! - Bounded: at most `max_pairs` pairs are tracked; a pair first seen beyond that is not
//!   (and is counted as untracked). Items and pairs live in memory and under the profile
//!   tree's `f` prefix, one small record per counter.
//! - Anonymous: no customer id is kept here; an erasure leaves the counts as they are.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use jiff::civil::Date;
use serde::Serialize;

use super::Item;
use super::kpi::Kpis;
use crate::config::FollowUpConfig;

/// Sled key prefix of the model's counters within the profiles tree.
pub(super) const PREFIX: u8 = b'f';
const CUSTOMERS: u8 = 0;
const ITEM: u8 = 1;
const PAIR: u8 = 2;

/// One pair's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pair {
    pub if_bought: Item,
    pub then: Item,
    pub customers: u64,
    pub antecedent_customers: u64,
    pub consequent_customers: u64,
    pub support: f64,
    pub confidence: f64,
    pub lift: f64,
}

pub use super::kpi::Suggestion;

/// A customer's share of the model: the items they bought and the pairs they followed.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Share {
    counted: bool,
    items: BTreeSet<Item>,
    pairs: BTreeSet<(Item, Item)>,
}

/// The days each item was bought, from a customer's KPIs.
fn item_days(k: &Kpis) -> BTreeMap<Item, &BTreeSet<Date>> {
    let mut out = BTreeMap::new();
    for (g, days) in &k.group_days {
        out.insert(Item::Category(g.clone()), days);
    }
    for (s, days) in &k.sku_days {
        out.insert(Item::Sku(s.clone()), days);
    }
    out
}

impl Share {
    pub(super) fn of(k: Option<&Kpis>, window_days: u32) -> Share {
        let Some(k) = k.filter(|k| k.purchases > 0) else {
            return Share::default();
        };
        let days = item_days(k);
        let w = jiff::Span::new().days(i64::from(window_days));
        let mut pairs = BTreeSet::new();
        for (x, xd) in &days {
            for (y, yd) in &days {
                if x == y {
                    continue;
                }
                let followed = xd.iter().any(|dx| {
                    let until = dx.checked_add(w).unwrap_or(Date::MAX);
                    yd.range(*dx..=until).next().is_some()
                });
                if followed {
                    pairs.insert((x.clone(), y.clone()));
                }
            }
        }
        Share {
            counted: true,
            items: days.into_keys().collect(),
            pairs,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    customers: i64,
    items: HashMap<Item, i64>,
    /// Antecedent → consequent → customers, so a suggestion reads one customer's items only.
    pairs: HashMap<Item, HashMap<Item, i64>>,
    tracked: usize,
    untracked: u64,
}

/// The model: counters in memory, mirrored in sled by the profile store.
#[derive(Debug)]
pub struct FollowUps {
    config: FollowUpConfig,
    anchors: HashSet<String>,
    counts: Counts,
}

fn item_key(item: &Item, out: &mut Vec<u8>) {
    match item {
        Item::Category(c) => {
            out.push(b'c');
            out.extend_from_slice(c.as_bytes());
        }
        Item::Sku(s) => {
            out.push(b's');
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn parse_item(b: &[u8]) -> Option<Item> {
    let (kind, name) = b.split_first()?;
    let name = std::str::from_utf8(name).ok()?.to_string();
    match kind {
        b'c' => Some(Item::Category(name)),
        b's' => Some(Item::Sku(name)),
        _ => None,
    }
}

/// The sled key of a counter.
pub(super) fn key_customers() -> Vec<u8> {
    vec![PREFIX, CUSTOMERS]
}

pub(super) fn key_item(item: &Item) -> Vec<u8> {
    let mut k = vec![PREFIX, ITEM];
    item_key(item, &mut k);
    k
}

pub(super) fn key_pair(x: &Item, y: &Item) -> Vec<u8> {
    let mut k = vec![PREFIX, PAIR];
    item_key(x, &mut k);
    k.push(0);
    item_key(y, &mut k);
    k
}

impl FollowUps {
    pub fn new(config: FollowUpConfig) -> FollowUps {
        FollowUps {
            anchors: config.anchor_skus.iter().cloned().collect(),
            config,
            counts: Counts::default(),
        }
    }

    /// Takes a config on the same basis (window and anchors) and keeps the counts, which
    /// depend on nothing else.
    pub(super) fn reconfigure(&mut self, config: FollowUpConfig) {
        self.anchors = config.anchor_skus.iter().cloned().collect();
        self.config = config;
    }

    pub fn config(&self) -> &FollowUpConfig {
        &self.config
    }

    /// Whether a SKU is an anchor product.
    pub fn is_anchor(&self, sku: &str) -> bool {
        self.anchors.contains(sku)
    }

    /// Loads one counter read back from sled.
    pub(super) fn load(&mut self, key: &[u8], value: &[u8]) {
        let Ok(n) = <[u8; 8]>::try_from(value).map(i64::from_be_bytes) else {
            return;
        };
        match key.get(1) {
            Some(&CUSTOMERS) => self.counts.customers = n,
            Some(&ITEM) => {
                if let Some(item) = parse_item(&key[2..]) {
                    self.counts.items.insert(item, n);
                }
            }
            Some(&PAIR) => {
                let rest = &key[2..];
                let Some(split) = rest.iter().position(|b| *b == 0) else {
                    return;
                };
                if let (Some(x), Some(y)) =
                    (parse_item(&rest[..split]), parse_item(&rest[split + 1..]))
                {
                    self.counts.pairs.entry(x).or_default().insert(y, n);
                    self.counts.tracked += 1;
                }
            }
            _ => {}
        }
    }

    /// Moves the counts from a customer's old share to their new one; returns the counters
    /// that changed, with their new values, for the caller's sled batch.
    pub(super) fn apply(&mut self, old: &Share, new: &Share) -> Vec<(Vec<u8>, i64)> {
        let mut changed = Vec::new();
        let c = &mut self.counts;
        if old.counted != new.counted {
            c.customers += if new.counted { 1 } else { -1 };
            changed.push((key_customers(), c.customers));
        }
        for item in new.items.symmetric_difference(&old.items) {
            let d = if new.items.contains(item) { 1 } else { -1 };
            let n = c.items.entry(item.clone()).or_insert(0);
            *n += d;
            changed.push((key_item(item), *n));
        }
        for (x, y) in new.pairs.symmetric_difference(&old.pairs) {
            let d = if new.pairs.contains(&(x.clone(), y.clone())) {
                1
            } else {
                -1
            };
            let held = c.pairs.get_mut(x).and_then(|m| m.get_mut(y));
            let n = match held {
                Some(n) => n,
                None if c.tracked < self.config.max_pairs && d > 0 => {
                    c.tracked += 1;
                    c.pairs
                        .entry(x.clone())
                        .or_default()
                        .entry(y.clone())
                        .or_insert(0)
                }
                None => {
                    c.untracked += 1;
                    continue;
                }
            };
            *n += d;
            changed.push((key_pair(x, y), *n));
        }
        changed
    }

    fn figures(&self, x: &Item, y: &Item, n_xy: i64) -> Option<Pair> {
        let c = &self.counts;
        let (n, n_x, n_y) = (
            c.customers,
            *c.items.get(x).unwrap_or(&0),
            *c.items.get(y).unwrap_or(&0),
        );
        if n <= 0 || n_x <= 0 || n_y <= 0 || n_xy <= 0 {
            return None;
        }
        let confidence = n_xy as f64 / n_x as f64;
        Some(Pair {
            if_bought: x.clone(),
            then: y.clone(),
            customers: n_xy as u64,
            antecedent_customers: n_x as u64,
            consequent_customers: n_y as u64,
            support: n_xy as f64 / n as f64,
            confidence,
            lift: confidence / (n_y as f64 / n as f64),
        })
    }

    /// The pairs with at least `min_customers`, by lift (then customers, then name), best first.
    pub fn top(&self, limit: usize) -> Vec<Pair> {
        let min = i64::try_from(self.config.min_customers).unwrap_or(i64::MAX);
        let mut all: Vec<Pair> = self
            .counts
            .pairs
            .iter()
            .flat_map(|(x, ys)| ys.iter().map(move |(y, n)| (x, y, *n)))
            .filter(|(_, _, n)| *n >= min)
            .filter_map(|(x, y, n)| self.figures(x, y, n))
            .collect();
        all.sort_by(|a, b| {
            b.lift
                .total_cmp(&a.lift)
                .then(b.customers.cmp(&a.customers))
                .then_with(|| (&a.if_bought, &a.then).cmp(&(&b.if_bought, &b.then)))
        });
        all.truncate(limit);
        all
    }

    /// Loyalty customers counted.
    pub fn customers(&self) -> u64 {
        self.counts.customers.max(0) as u64
    }

    /// Pairs first seen after the bound was reached.
    pub fn untracked(&self) -> u64 {
        self.counts.untracked
    }

    /// The best follow-up for a customer as of `today`: an item they bought within the window,
    /// and the pair with the highest lift (above 1, with enough customers) whose consequent
    /// they have not bought since.
    pub fn suggest(&self, k: &Kpis, today: Date) -> Option<Suggestion> {
        let min = i64::try_from(self.config.min_customers).unwrap_or(i64::MAX);
        let days = item_days(k);
        let from = today
            .checked_sub(jiff::Span::new().days(i64::from(self.config.window_days)))
            .unwrap_or(Date::MIN);
        let mut best: Option<Suggestion> = None;
        for (x, xd) in &days {
            let Some(last_x) = xd.range(from..=today).next_back().copied() else {
                continue;
            };
            let Some(ys) = self.counts.pairs.get(x) else {
                continue;
            };
            for (y, n) in ys {
                if *n < min
                    || days
                        .get(y)
                        .is_some_and(|yd| yd.range(last_x..).next().is_some())
                {
                    continue;
                }
                let Some(p) = self.figures(x, y, *n) else {
                    continue;
                };
                if p.lift <= 1.0 || best.as_ref().is_some_and(|b| b.lift >= p.lift) {
                    continue;
                }
                best = Some(Suggestion {
                    if_bought: x.clone(),
                    suggest: y.clone(),
                    bought_on: last_x,
                    days_ago: (today - last_x).get_days(),
                    confidence: p.confidence,
                    lift: p.lift,
                });
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::kpi::LedgerEntry;
    use jiff::civil::date;
    use rand::{Rng, SeedableRng};

    fn buy(day: Date, groups: &[&str]) -> LedgerEntry {
        LedgerEntry {
            day,
            amount: 1000,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            anchors: Vec::new(),
            main: None,
        }
    }

    fn cat(c: &str) -> Item {
        Item::Category(c.into())
    }

    /// The share is the one a rebuild gives, whatever order the purchases come in, and the
    /// model moved by shares adds up to the model built from the final KPIs.
    #[test]
    fn incremental_counts_equal_a_rebuild() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let groups = ["consoles", "games", "shoes", "toys"];
        let mut live = FollowUps::new(FollowUpConfig::default());
        let mut finals = Vec::new();
        for _ in 0..200 {
            let mut k = Kpis::default();
            let mut share = Share::default();
            for _ in 0..rng.random_range(1..6) {
                let e = buy(
                    date(2026, 1, 1) + jiff::Span::new().days(rng.random_range(0..120)),
                    &[groups[rng.random_range(0..4)]],
                );
                k.add(&e);
                let next = Share::of(Some(&k), 30);
                live.apply(&share, &next);
                share = next;
            }
            finals.push(k);
        }
        let mut rebuilt = FollowUps::new(FollowUpConfig::default());
        for k in &finals {
            rebuilt.apply(&Share::default(), &Share::of(Some(k), 30));
        }
        assert_eq!(live.counts.customers, rebuilt.counts.customers);
        assert_eq!(live.counts.items, rebuilt.counts.items);
        assert_eq!(live.counts.pairs, rebuilt.counts.pairs);
        assert_eq!(live.top(100), rebuilt.top(100));
    }

    /// The simulated store: 10% of loyalty customers buy a console, 60% of those buy
    /// games within 30 days and 5% of the others do. Expected lift 0.6 / 0.105 ≈ 5.7.
    #[test]
    fn consoles_then_games_ranks_first_with_the_expected_lift() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut m = FollowUps::new(FollowUpConfig::default());
        let others = ["shoes", "toys", "garden", "books"];
        for _ in 0..20_000 {
            let mut k = Kpis::default();
            let start = date(2026, 1, 1) + jiff::Span::new().days(rng.random_range(0..200));
            k.add(&buy(start, &[others[rng.random_range(0..4)]]));
            let console = rng.random_bool(0.1);
            let console_day = start + jiff::Span::new().days(rng.random_range(0..10));
            if console {
                k.add(&buy(console_day, &["consoles"]));
            }
            if rng.random_bool(if console { 0.6 } else { 0.05 }) {
                let day = if console {
                    console_day + jiff::Span::new().days(rng.random_range(0..=30))
                } else {
                    start + jiff::Span::new().days(rng.random_range(0..60))
                };
                k.add(&buy(day, &["games"]));
            }
            m.apply(&Share::default(), &Share::of(Some(&k), 30));
        }
        let top = m.top(5);
        assert_eq!(
            (&top[0].if_bought, &top[0].then),
            (&cat("consoles"), &cat("games"))
        );
        assert!(top[0].lift > 5.0, "{:?}", top[0]);
        assert!((top[0].lift - 5.7).abs() < 0.6, "{:?}", top[0]);
        // A console bought ten days ago, no games since: games is the suggestion.
        let mut buyer = Kpis::default();
        buyer.add(&buy(date(2026, 9, 1), &["consoles"]));
        let s = m.suggest(&buyer, date(2026, 9, 11)).unwrap();
        assert_eq!(
            (s.if_bought, s.suggest, s.days_ago),
            (cat("consoles"), cat("games"), 10)
        );
        // A shoe buyer gets no games suggestion; a console bought long ago is no longer news.
        let mut shoes = Kpis::default();
        shoes.add(&buy(date(2026, 9, 1), &["shoes"]));
        assert!(
            m.suggest(&shoes, date(2026, 9, 11))
                .is_none_or(|s| s.suggest != cat("games"))
        );
        assert!(m.suggest(&buyer, date(2026, 12, 1)).is_none());
    }

    #[test]
    fn the_pair_bound_holds() {
        let mut m = FollowUps::new(FollowUpConfig {
            max_pairs: 3,
            ..FollowUpConfig::default()
        });
        let mut k = Kpis::default();
        k.add(&buy(date(2026, 1, 1), &["a", "b", "c"]));
        m.apply(&Share::default(), &Share::of(Some(&k), 30));
        assert_eq!(m.counts.tracked, 3);
        assert_eq!(m.untracked(), 3, "six pairs, three tracked");
    }
}
