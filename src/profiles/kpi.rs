//! Customer KPIs computed at the edge from the store's own transactions.
//!
//! Each loyalty transaction becomes one [`LedgerEntry`] in the customer's ledger (sales and
//! returns; voids change nothing). [`Kpis::compute`] derives the stored KPIs from the ledger:
//! revenue and purchases per calendar year, mean basket, first and last purchase, the
//! intervals between purchase days overall and per product group. [`Kpis::view`] adds what
//! depends on the day it is asked: activity class, this year against last year, expected next
//! purchase and overdue flags, and the BG/NBD figures.
//!
//! Invariants:
//! - Money is integer minor units. A return's amount counts against revenue of the year it
//!   happened in; it is not a purchase.
//! - The ledger is keyed by transaction id, so a re-delivered transaction changes nothing:
//!   KPIs are idempotent by construction, whatever the delivery does.
//! - Days are business days in the store's time zone; intervals are whole days between
//!   distinct purchase days (two baskets on one day are one purchase occasion).
//!
//! ## BG/NBD and Gamma-Gamma (Fader, Hardie and Lee 2005; Fader, Hardie 2013)
//! With `x` repeat purchase days, `t_x` the age of the customer at the last purchase and `T`
//! the age now (both counted from the first purchase, in the model's time unit), and central's
//! fitted parameters `r, α, a, b`:
//!
//! ```text
//! P(alive | x, t_x, T) = 1 / (1 + [x > 0] · a / (b + x − 1) · ((α + T) / (α + t_x))^(r + x))
//!
//! E[Y(t) | x, t_x, T] = (a + b + x − 1) / (a − 1)
//!                       · (1 − ((α + T) / (α + T + t))^(r + x) · ₂F₁(r + x, b + x; a + b + x − 1; t / (α + T + t)))
//!                       / (1 + [x > 0] · a / (b + x − 1) · ((α + T) / (α + t_x))^(r + x))
//! ```
//!
//! With Gamma-Gamma parameters `p, q, γ` and `m̄` the mean value of the repeat purchases, the
//! expected value of a purchase is `(p (γ + x m̄)) / (p x + q − 1)` (for `x = 0`, the population
//! mean `p γ / (q − 1)`). CLV over the horizon `H` is `E[Y(H)] · E[M]`, undiscounted.
//!
//! Without shipped parameters the fallback is `mean basket × purchases per year × expected
//! lifetime in years` (config: `expected_lifetime_years`, default 3), and P(alive) is absent.

use std::collections::BTreeMap;

use jiff::civil::Date;
use serde::{Deserialize, Serialize};

/// One transaction of a customer, as the KPIs need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub day: Date,
    /// Signed: a sale's total, or minus a return's refund.
    pub amount: i64,
    /// Product groups (categories) the basket touched, sorted, without repeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Anchor-product SKUs (`signals.followups.anchor_skus`) in the basket, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anchors: Vec<String>,
    /// The category with the largest net amount in the basket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<String>,
}

impl LedgerEntry {
    pub fn is_purchase(&self) -> bool {
        self.amount >= 0
    }
}

pub use crate::config::KpiConfig;

/// BG/NBD and Gamma-Gamma parameters fitted by central.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
    /// Gamma-Gamma; absent when central fitted only BG/NBD.
    #[serde(default)]
    pub p: Option<f64>,
    #[serde(default)]
    pub q: Option<f64>,
    #[serde(default)]
    pub gamma: Option<f64>,
    /// Days per model time unit (7 when central fitted in weeks).
    #[serde(default = "one")]
    pub unit_days: f64,
}

fn one() -> f64 {
    1.0
}

/// The rhythm of purchases, overall or in one product group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rhythm {
    /// Distinct purchase days.
    pub purchase_days: u32,
    pub first: Option<Date>,
    pub last: Option<Date>,
    /// Mean and median days between consecutive purchase days; absent with fewer than two.
    pub mean_interval_days: Option<f64>,
    pub median_interval_days: Option<f64>,
}

impl Rhythm {
    fn of(days: &[Date]) -> Rhythm {
        let mut days = days.to_vec();
        days.sort();
        days.dedup();
        let intervals: Vec<f64> = days
            .windows(2)
            .map(|w| (w[1] - w[0]).get_days() as f64)
            .collect();
        Rhythm {
            purchase_days: days.len() as u32,
            first: days.first().copied(),
            last: days.last().copied(),
            mean_interval_days: (!intervals.is_empty())
                .then(|| intervals.iter().sum::<f64>() / intervals.len() as f64),
            median_interval_days: median(intervals),
        }
    }

    /// When the next purchase is due: the last one plus the median interval.
    pub fn next_due(&self) -> Option<Date> {
        let last = self.last?;
        let days = self.median_interval_days?.round() as i64;
        last.checked_add(jiff::Span::new().days(days)).ok()
    }

    /// The first day on which [`Rhythm::overdue`] holds: when a win-back became due.
    pub fn overdue_from(&self, factor: f64) -> Option<Date> {
        let (last, median) = (self.last?, self.median_interval_days?);
        let days = (median * factor).floor() as i64 + 1;
        last.checked_add(jiff::Span::new().days(days)).ok()
    }

    /// Whether the customer is past their own rhythm by `factor`.
    pub fn overdue(&self, today: Date, factor: f64) -> bool {
        match (self.last, self.median_interval_days) {
            (Some(last), Some(median)) => (today - last).get_days() as f64 > median * factor,
            _ => false,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// What the ledger says, independent of today.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Kpis {
    /// Net revenue (sales minus returns) per calendar year.
    pub revenue_by_year: BTreeMap<i16, i64>,
    /// Purchases (sale transactions) per calendar year.
    pub purchases_by_year: BTreeMap<i16, u32>,
    /// Sales total over sale transactions, in minor units (rounded half away from zero).
    pub mean_basket: Option<i64>,
    pub purchases: u32,
    pub rhythm: Rhythm,
    pub groups: BTreeMap<String, Rhythm>,
    /// Mean value of the repeat purchase days (each day's sales summed), for Gamma-Gamma.
    pub mean_repeat_value: Option<f64>,
    /// The inputs kept so a new transaction updates the KPIs without the ledger: sales per
    /// purchase day, the days each product group was bought, and the sales total.
    #[serde(default)]
    pub sales_by_day: BTreeMap<Date, i64>,
    #[serde(default)]
    pub group_days: BTreeMap<String, std::collections::BTreeSet<Date>>,
    /// The days each anchor product was bought (for the follow-up model).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sku_days: BTreeMap<String, std::collections::BTreeSet<Date>>,
    #[serde(default)]
    pub sales_total: i64,
    /// The last purchase day and the main category of that day's largest-category basket
    /// (the greatest category name on ties, so the order of arrival does not matter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_main: Option<(Date, String)>,
    /// Refunds per day (positive), so revenue over any window of days is known.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub returns_by_day: BTreeMap<Date, i64>,
    /// Which inputs the record keeps ([`KPI_INPUTS`] for the current ones); a record with
    /// older inputs is rebuilt from the ledger once.
    #[serde(default)]
    pub inputs: u8,
}

/// The version of the inputs [`Kpis`] keeps: 2 added refunds per day (rolling year-on-year).
pub const KPI_INPUTS: u8 = 2;

impl Kpis {
    /// Derives every stored KPI from the ledger: the fold of [`Kpis::add`] over it, so the
    /// incremental update and a rebuild agree by construction.
    pub fn compute<'a>(ledger: impl IntoIterator<Item = &'a LedgerEntry>) -> Kpis {
        let mut k = Kpis::default();
        for e in ledger {
            k.apply(e);
        }
        k.derive();
        k
    }

    /// Adds one ledger entry: what a new loyalty transaction costs, without reading the
    /// ledger. Work is linear in the customer's purchase days, not their transactions' size.
    pub fn add(&mut self, e: &LedgerEntry) {
        self.apply(e);
        self.derive();
    }

    /// Whether the record carries the inputs [`Kpis::add`] needs (records written before they
    /// were kept are rebuilt from the ledger once).
    pub fn is_incremental(&self) -> bool {
        self.inputs >= KPI_INPUTS || self.revenue_by_year.is_empty()
    }

    fn apply(&mut self, e: &LedgerEntry) {
        *self.revenue_by_year.entry(e.day.year()).or_insert(0) += e.amount;
        if !e.is_purchase() {
            *self.returns_by_day.entry(e.day).or_insert(0) -= e.amount;
            return;
        }
        self.purchases += 1;
        *self.purchases_by_year.entry(e.day.year()).or_insert(0) += 1;
        self.sales_total += e.amount;
        *self.sales_by_day.entry(e.day).or_insert(0) += e.amount;
        for g in &e.groups {
            self.group_days.entry(g.clone()).or_default().insert(e.day);
        }
        for s in &e.anchors {
            self.sku_days.entry(s.clone()).or_default().insert(e.day);
        }
        if let Some(main) = &e.main {
            let this = (e.day, main.clone());
            if self.last_main.as_ref().is_none_or(|held| *held < this) {
                self.last_main = Some(this);
            }
        }
    }

    /// Recomputes what follows from the kept inputs.
    fn derive(&mut self) {
        self.inputs = KPI_INPUTS;
        if self.purchases > 0 {
            self.mean_basket = Some(div_round(self.sales_total, i64::from(self.purchases)));
        }
        let days: Vec<Date> = self.sales_by_day.keys().copied().collect();
        self.rhythm = Rhythm::of(&days);
        self.groups = self
            .group_days
            .iter()
            .map(|(g, d)| {
                (
                    g.clone(),
                    Rhythm::of(&d.iter().copied().collect::<Vec<_>>()),
                )
            })
            .collect();
        let repeat: Vec<i64> = self.sales_by_day.values().skip(1).copied().collect();
        self.mean_repeat_value =
            (!repeat.is_empty()).then(|| repeat.iter().sum::<i64>() as f64 / repeat.len() as f64);
    }

    /// The KPIs as of `today`.
    pub fn view(
        &self,
        today: Date,
        config: &KpiConfig,
        model: Option<&ModelParams>,
        rfm: Option<&RfmBreakpoints>,
    ) -> KpiView {
        let year = today.year();
        let activity = match (self.rhythm.first, self.rhythm.last) {
            (Some(first), Some(last)) => Some(
                if (today - first).get_days() <= i32::try_from(config.new_days).unwrap_or(i32::MAX)
                {
                    Activity::New
                } else if (today - last).get_days()
                    <= i32::try_from(config.passive_after_days).unwrap_or(i32::MAX)
                {
                    Activity::Loyal
                } else {
                    Activity::Passive
                },
            ),
            _ => None,
        };
        let frequency = self.rhythm.purchase_days.saturating_sub(1);
        let (p_alive, expected_purchases_90d, clv) = match (model, self.rhythm.first) {
            (Some(m), Some(first)) => {
                let unit = m.unit_days.max(f64::MIN_POSITIVE);
                let x = f64::from(frequency);
                let t_x = (self.rhythm.last.unwrap_or(first) - first).get_days() as f64 / unit;
                let big_t = (today - first).get_days().max(0) as f64 / unit;
                let p = bgnbd_p_alive(m, x, t_x, big_t);
                let e90 = bgnbd_expected(m, 90.0 / unit, x, t_x, big_t);
                let eh =
                    bgnbd_expected(m, f64::from(config.clv_horizon_days) / unit, x, t_x, big_t);
                let value = gamma_gamma_value(m, x, self.mean_repeat_value.unwrap_or(0.0))
                    .or(self.mean_basket.map(|b| b as f64));
                (Some(p), Some(e90), value.map(|v| (eh * v).round() as i64))
            }
            _ => (None, None, self.fallback_clv(today, config)),
        };
        // Rolling years: the 365 days up to and including today, and the 365 before them.
        let days_ago = |n: i64| today.saturating_sub(jiff::Span::new().days(n));
        KpiView {
            revenue_12m: self.revenue_between(days_ago(364), today),
            revenue_prev_12m: self.revenue_between(days_ago(729), days_ago(365)),
            revenue_this_year: self.revenue_by_year.get(&year).copied().unwrap_or(0),
            revenue_last_year: self.revenue_by_year.get(&(year - 1)).copied().unwrap_or(0),
            purchases_this_year: self.purchases_by_year.get(&year).copied().unwrap_or(0),
            activity,
            next_purchase_due: self.rhythm.next_due(),
            overdue: self.rhythm.overdue(today, config.overdue_factor),
            overdue_groups: self
                .groups
                .iter()
                .filter(|(_, r)| r.overdue(today, config.overdue_factor))
                .map(|(g, _)| g.clone())
                .collect(),
            frequency,
            recency_days: self.recency_days(),
            age_days: self.age_days(today),
            days_since_last: self.rhythm.last.map(|l| (today - l).get_days()),
            p_alive,
            expected_purchases_90d,
            clv,
            rfm: rfm.and_then(|b| b.score(self, today)),
            days_since: self
                .groups
                .iter()
                .filter_map(|(g, r)| Some((g.clone(), (today - r.last?).get_days())))
                .collect(),
            follow_up: None,
        }
    }

    /// The activity class as of `day`, from the purchases up to that day.
    pub fn activity_on(&self, day: Date, config: &KpiConfig) -> Option<Activity> {
        let first = self.rhythm.first.filter(|f| *f <= day)?;
        let last = *self.sales_by_day.range(..=day).next_back()?.0;
        let days = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        Some(if (day - first).get_days() <= days(config.new_days) {
            Activity::New
        } else if (day - last).get_days() <= days(config.passive_after_days) {
            Activity::Loyal
        } else {
            Activity::Passive
        })
    }

    /// The day the customer entered the class they are in on `today`: the class changes only
    /// on a purchase day, the day after the New period, or the day after the passive limit.
    pub fn activity_since(&self, today: Date, config: &KpiConfig) -> Option<Date> {
        let first = self.rhythm.first?;
        let after = |d: Date, n: u32| d.checked_add(jiff::Span::new().days(i64::from(n) + 1)).ok();
        let mut points: Vec<Date> = vec![first];
        points.extend(after(first, config.new_days));
        for d in self.sales_by_day.keys() {
            points.push(*d);
            points.extend(after(*d, config.passive_after_days));
        }
        points.retain(|d| *d <= today);
        points.sort();
        points.dedup();
        let mut since = None;
        let mut class = None;
        for d in points {
            let c = self.activity_on(d, config);
            if c != class {
                (class, since) = (c, Some(d));
            }
        }
        since
    }

    /// Net revenue (sales minus refunds) on the days in `from..=to`.
    pub fn revenue_between(&self, from: Date, to: Date) -> i64 {
        let sales: i64 = self.sales_by_day.range(from..=to).map(|(_, v)| v).sum();
        let refunds: i64 = self.returns_by_day.range(from..=to).map(|(_, v)| v).sum();
        sales - refunds
    }

    /// Net revenue over the whole ledger.
    pub fn net_revenue(&self) -> i64 {
        self.revenue_by_year.values().sum()
    }

    /// Days from the first purchase to the last (the `recency` of BG/NBD and lifetimes).
    pub fn recency_days(&self) -> Option<i32> {
        Some((self.rhythm.last? - self.rhythm.first?).get_days())
    }

    /// Days from the first purchase to `today` (the `T` of BG/NBD).
    pub fn age_days(&self, today: Date) -> Option<i32> {
        Some((today - self.rhythm.first?).get_days().max(0))
    }

    /// mean basket × purchases per year (over the customer's life so far, at least a year) ×
    /// expected lifetime in years.
    fn fallback_clv(&self, today: Date, config: &KpiConfig) -> Option<i64> {
        let basket = self.mean_basket? as f64;
        let first = self.rhythm.first?;
        let years = ((today - first).get_days() as f64 / 365.25).max(1.0);
        let per_year = f64::from(self.purchases) / years;
        Some((basket * per_year * config.expected_lifetime_years).round() as i64)
    }
}

fn div_round(n: i64, d: i64) -> i64 {
    let q = n / d;
    let r = n % d;
    if 2 * r.abs() >= d.abs() {
        q + n.signum() * d.signum()
    } else {
        q
    }
}

/// What the follow-up model (`profiles::followups`) suggests for one customer: they bought `if_bought` `days_ago` days ago
/// and nothing of `suggest` since.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    pub if_bought: crate::profiles::Item,
    pub suggest: crate::profiles::Item,
    pub bought_on: Date,
    pub days_ago: i32,
    pub confidence: f64,
    pub lift: f64,
}

/// Activity class by recency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    New,
    Loyal,
    Passive,
}

impl Activity {
    /// The wire name (as serialised).
    pub fn name(self) -> &'static str {
        match self {
            Activity::New => "new",
            Activity::Loyal => "loyal",
            Activity::Passive => "passive",
        }
    }
}

/// KPIs as of a day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KpiView {
    /// Net revenue over the last 365 days including today, and over the 365 days before
    /// them: year on year, rolling.
    pub revenue_12m: i64,
    pub revenue_prev_12m: i64,
    /// Calendar year to date, and the whole of last calendar year.
    pub revenue_this_year: i64,
    pub revenue_last_year: i64,
    pub purchases_this_year: u32,
    pub activity: Option<Activity>,
    pub next_purchase_due: Option<Date>,
    pub overdue: bool,
    pub overdue_groups: Vec<String>,
    /// Repeat purchase days (BG/NBD's x).
    pub frequency: u32,
    /// Days from the first purchase to the last (BG/NBD's t_x, lifetimes' `recency`).
    pub recency_days: Option<i32>,
    /// Days from the first purchase to today (BG/NBD's T).
    pub age_days: Option<i32>,
    pub days_since_last: Option<i32>,
    pub p_alive: Option<f64>,
    pub expected_purchases_90d: Option<f64>,
    /// Minor units.
    pub clv: Option<i64>,
    /// Scores against the store's distribution; absent before the first recomputation.
    pub rfm: Option<Rfm>,
    /// Days since the last purchase in each product group: "bought from `consoles` in the
    /// last 60 days and not yet from `games`" is
    /// `kpi.days_since['consoles'] <= 60 && !('games' in kpi.days_since)`.
    pub days_since: BTreeMap<String, i32>,
    /// The follow-up the store's own baskets suggest (set by the caller that holds the
    /// model; see `profiles::followups`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<Suggestion>,
}

/// Recency, frequency and monetary scores, 1 (lowest fifth of the store's customers) to 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rfm {
    pub r: u8,
    pub f: u8,
    pub m: u8,
}

/// The quintile boundaries (20th, 40th, 60th and 80th percentiles, linear interpolation as in
/// numpy's default) of the store's customers with a purchase: days since the last purchase,
/// purchase days, and net revenue. Scores count the boundaries a customer is beyond: for
/// frequency and money `1 + #{q < v}`; for recency, where fewer days is better,
/// `5 − #{q < days}`. Recomputed periodically; a customer's score uses their live figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfmBreakpoints {
    pub as_of: Date,
    pub customers: u64,
    pub recency_days: [f64; 4],
    pub frequency: [f64; 4],
    pub monetary: [f64; 4],
}

impl RfmBreakpoints {
    /// The breakpoints over the given customers' KPIs; `None` when none has a purchase.
    pub fn of<'a>(all: impl IntoIterator<Item = &'a Kpis>, today: Date) -> Option<RfmBreakpoints> {
        let (mut r, mut f, mut m) = (Vec::new(), Vec::new(), Vec::new());
        for k in all {
            let Some(last) = k.rhythm.last else { continue };
            r.push(f64::from((today - last).get_days()));
            f.push(f64::from(k.rhythm.purchase_days));
            m.push(k.net_revenue() as f64);
        }
        Some(RfmBreakpoints {
            as_of: today,
            customers: r.len() as u64,
            recency_days: quintiles(r)?,
            frequency: quintiles(f)?,
            monetary: quintiles(m)?,
        })
    }

    /// A customer's scores as of `today`; `None` without a purchase.
    pub fn score(&self, k: &Kpis, today: Date) -> Option<Rfm> {
        let last = k.rhythm.last?;
        let beyond = |qs: &[f64; 4], v: f64| qs.iter().filter(|q| **q < v).count() as u8;
        Some(Rfm {
            r: 5 - beyond(&self.recency_days, f64::from((today - last).get_days())),
            f: 1 + beyond(&self.frequency, f64::from(k.rhythm.purchase_days)),
            m: 1 + beyond(&self.monetary, k.net_revenue() as f64),
        })
    }
}

/// The 20/40/60/80th percentiles by linear interpolation between closest ranks (numpy's
/// default method), so central's pandas reproduces them.
fn quintiles(mut v: Vec<f64>) -> Option<[f64; 4]> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let h = (v.len() - 1) as f64 * p;
        let lo = h.floor() as usize;
        let hi = (lo + 1).min(v.len() - 1);
        v[lo] + (h - lo as f64) * (v[hi] - v[lo])
    };
    Some([at(0.2), at(0.4), at(0.6), at(0.8)])
}

/// `((α + T) / (α + t_x))^(r + x)` and the `a / (b + x − 1)` factor, shared by both formulas.
fn bgnbd_denominator(m: &ModelParams, x: f64, t_x: f64, big_t: f64) -> f64 {
    if x > 0.0 {
        1.0 + m.a / (m.b + x - 1.0) * ((m.alpha + big_t) / (m.alpha + t_x)).powf(m.r + x)
    } else {
        1.0
    }
}

/// Probability the customer is still active.
pub fn bgnbd_p_alive(m: &ModelParams, x: f64, t_x: f64, big_t: f64) -> f64 {
    1.0 / bgnbd_denominator(m, x, t_x, big_t)
}

/// Expected purchases in the next `t` time units.
pub fn bgnbd_expected(m: &ModelParams, t: f64, x: f64, t_x: f64, big_t: f64) -> f64 {
    let z = t / (m.alpha + big_t + t);
    let hyp = hyp2f1(m.r + x, m.b + x, m.a + m.b + x - 1.0, z);
    let head = (m.a + m.b + x - 1.0) / (m.a - 1.0);
    let body = 1.0 - ((m.alpha + big_t) / (m.alpha + big_t + t)).powf(m.r + x) * hyp;
    head * body / bgnbd_denominator(m, x, t_x, big_t)
}

/// Gamma-Gamma expected value of a purchase, when its parameters are shipped.
pub fn gamma_gamma_value(m: &ModelParams, x: f64, mean_value: f64) -> Option<f64> {
    let (p, q, g) = (m.p?, m.q?, m.gamma?);
    if q <= 1.0 {
        return None;
    }
    Some((p * (g + x * mean_value)) / (p * x + q - 1.0))
}

/// Gauss's hypergeometric function by its power series, for `|z| < 1` (BG/NBD's argument is
/// `t / (α + T + t)`, always in [0, 1)). Sums until terms stop mattering.
pub fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    let mut term = 1.0;
    let mut sum = 1.0;
    for j in 0..100_000 {
        let j = f64::from(j);
        term *= (a + j) * (b + j) / ((c + j) * (j + 1.0)) * z;
        sum += term;
        if term.abs() < 1e-16 * sum.abs() {
            break;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn sale(day: Date, amount: i64, groups: &[&str]) -> LedgerEntry {
        LedgerEntry {
            day,
            amount,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            anchors: Vec::new(),
            main: groups.first().map(|g| g.to_string()),
        }
    }

    /// Hand-computed: purchases on 2025-01-10 (40.00, fashion), 2025-03-01 (60.00, fashion
    /// and games), 2025-06-19 (20.00, games), a return of 10.00 on 2025-06-25, and
    /// 2026-02-04 (90.00, fashion). Today is 2026-05-01.
    fn fixture() -> Vec<LedgerEntry> {
        vec![
            sale(date(2025, 1, 10), 4000, &["fashion"]),
            sale(date(2025, 3, 1), 6000, &["fashion", "games"]),
            sale(date(2025, 6, 19), 2000, &["games"]),
            sale(date(2025, 6, 25), -1000, &[]),
            sale(date(2026, 2, 4), 9000, &["fashion"]),
        ]
    }

    #[test]
    fn hand_computed_fixture() {
        let k = Kpis::compute(&fixture());
        // 40 + 60 + 20 - 10 = 110.00 in 2025; 90.00 in 2026.
        assert_eq!(
            k.revenue_by_year,
            BTreeMap::from([(2025, 11000), (2026, 9000)])
        );
        assert_eq!(k.purchases_by_year, BTreeMap::from([(2025, 3), (2026, 1)]));
        assert_eq!(k.purchases, 4);
        // (40 + 60 + 20 + 90) / 4 = 52.50.
        assert_eq!(k.mean_basket, Some(5250));
        // Intervals: Jan 10 → Mar 1 = 50 days, → Jun 19 = 110, → Feb 4 2026 = 230.
        assert_eq!(k.rhythm.first, Some(date(2025, 1, 10)));
        assert_eq!(k.rhythm.last, Some(date(2026, 2, 4)));
        assert_eq!(k.rhythm.mean_interval_days, Some(130.0));
        assert_eq!(k.rhythm.median_interval_days, Some(110.0));
        // Fashion: Jan 10, Mar 1, Feb 4 → 50 and 340 days; games: Mar 1, Jun 19 → 110.
        assert_eq!(k.groups["fashion"].mean_interval_days, Some(195.0));
        assert_eq!(k.groups["fashion"].median_interval_days, Some(195.0));
        assert_eq!(k.groups["games"].median_interval_days, Some(110.0));
        // Repeat days: 60, 20, 90 → 56.666…
        assert!((k.mean_repeat_value.unwrap() - 170.0 / 3.0 * 100.0).abs() < 1e-9);

        let today = date(2026, 5, 1);
        let v = k.view(today, &KpiConfig::default(), None, None);
        assert_eq!(v.revenue_this_year, 9000);
        assert_eq!(v.revenue_last_year, 11000);
        // Rolling: 2025-05-02..=2026-05-01 holds 20 - 10 + 90; the year before, 40 + 60.
        assert_eq!((v.revenue_12m, v.revenue_prev_12m), (10000, 10000));
        // The window's edges: the day 364 days ago is in, 365 days ago is the year before.
        let k2 = Kpis::compute(&[
            sale(date(2025, 5, 2), 100, &[]),
            sale(date(2025, 5, 1), 7, &[]),
        ]);
        let v2 = k2.view(today, &KpiConfig::default(), None, None);
        assert_eq!((v2.revenue_12m, v2.revenue_prev_12m), (100, 7));
        assert_eq!(v.purchases_this_year, 1);
        // Last purchase 86 days ago: not new (first was 476 days ago), within 180: Loyal.
        assert_eq!(v.activity, Some(Activity::Loyal));
        // Next due Feb 4 + 110 days = May 25; 86 days since ≤ 110 × 1.5: not overdue.
        assert_eq!(v.next_purchase_due, Some(date(2026, 5, 25)));
        assert!(!v.overdue);
        // Games: last Jun 19 2025, 316 days ago > 110 × 1.5 = 165: overdue. Fashion: 86 ≤ 292.5.
        assert_eq!(v.overdue_groups, vec!["games".to_string()]);
        assert_eq!(v.frequency, 3);
        // Fallback CLV: 52.50 × (4 purchases / (476 / 365.25) years) × 3 years.
        let years: f64 = 476.0 / 365.25;
        assert_eq!(
            v.clv,
            Some((5250.0 * (4.0 / years) * 3.0_f64).round() as i64)
        );
        assert_eq!(v.p_alive, None);
    }

    #[test]
    fn activity_since_is_the_day_the_class_began() {
        let c = KpiConfig::default();
        let k = Kpis::compute(&[
            sale(date(2025, 1, 1), 100, &[]),
            sale(date(2025, 2, 1), 100, &[]),
            sale(date(2026, 1, 1), 100, &[]),
        ]);
        // New from the first purchase; Loyal from day 91; Passive 181 days after Feb 1.
        assert_eq!(
            k.activity_since(date(2025, 3, 1), &c),
            Some(date(2025, 1, 1))
        );
        assert_eq!(
            k.activity_since(date(2025, 5, 1), &c),
            Some(date(2025, 4, 2))
        );
        assert_eq!(
            k.activity_since(date(2025, 9, 1), &c),
            Some(date(2025, 8, 1))
        );
        assert_eq!(k.activity_on(date(2025, 9, 1), &c), Some(Activity::Passive));
        // The purchase of 2026-01-01 ended the passive period.
        assert_eq!(
            k.activity_since(date(2026, 2, 1), &c),
            Some(date(2026, 1, 1))
        );
        assert_eq!(
            k.view(date(2026, 2, 1), &c, None, None).activity,
            k.activity_on(date(2026, 2, 1), &c)
        );
    }

    #[test]
    fn activity_at_the_thresholds_edges() {
        let k = Kpis::compute(&[sale(date(2026, 1, 1), 100, &[])]);
        let c = KpiConfig::default();
        // New up to and including 90 days after the first purchase.
        assert_eq!(
            k.view(date(2026, 4, 1), &c, None, None).activity,
            Some(Activity::New)
        ); // 90 days
        assert_eq!(
            k.view(date(2026, 4, 2), &c, None, None).activity,
            Some(Activity::Loyal)
        ); // 91
        // Loyal up to and including 180 days after the last purchase.
        assert_eq!(
            k.view(date(2026, 6, 30), &c, None, None).activity,
            Some(Activity::Loyal)
        ); // 180
        assert_eq!(
            k.view(date(2026, 7, 1), &c, None, None).activity,
            Some(Activity::Passive)
        ); // 181
        assert_eq!(
            Kpis::default()
                .view(date(2026, 7, 1), &c, None, None)
                .activity,
            None
        );
    }

    proptest::proptest! {
        /// A new transaction updates the stored KPIs to exactly what a rebuild from the whole
        /// ledger gives, in any order of arrival.
        #[test]
        fn incremental_update_equals_rebuild(
            entries in proptest::collection::vec(
                (0i32..900, -5000i64..20000, proptest::collection::vec(0usize..4, 0..3)),
                0..40,
            )
        ) {
            let names = ["fashion", "games", "toys", "garden"];
            let ledger: Vec<LedgerEntry> = entries
                .iter()
                .map(|(d, amount, g)| {
                    let mut groups: Vec<String> = g.iter().map(|i| names[*i].to_string()).collect();
                    groups.sort();
                    groups.dedup();
                    LedgerEntry {
                        day: date(2024, 1, 1) + jiff::Span::new().days(*d),
                        amount: *amount,
                        anchors: groups.iter().filter(|g| *g == "games").map(|_| "ps5-game".to_string()).collect(),
                        main: groups.last().cloned(),
                        groups,
                    }
                })
                .collect();
            let mut incremental = Kpis::default();
            for (i, e) in ledger.iter().enumerate() {
                incremental.add(e);
                let stored: Kpis =
                    serde_json::from_slice(&serde_json::to_vec(&incremental).unwrap()).unwrap();
                proptest::prop_assert_eq!(&stored, &Kpis::compute(&ledger[..=i]));
                incremental = stored;
            }
        }
    }

    #[test]
    fn returns_only_reduce_revenue_and_two_baskets_a_day_are_one_occasion() {
        let k = Kpis::compute(&[
            sale(date(2026, 1, 1), 1000, &[]),
            sale(date(2026, 1, 1), 500, &[]),
            sale(date(2026, 1, 11), -300, &[]),
        ]);
        assert_eq!(k.revenue_by_year[&2026], 1200);
        assert_eq!(k.purchases, 2);
        assert_eq!(k.rhythm.purchase_days, 1);
        assert_eq!(k.rhythm.mean_interval_days, None);
        assert_eq!(k.mean_basket, Some(750));
    }

    #[test]
    fn hypergeometric_series_matches_closed_forms() {
        // ₂F₁(1, 1; 2; z) = −ln(1 − z) / z.
        for z in [0.1, 0.5, 0.9] {
            let closed = -(1.0_f64 - z).ln() / z;
            assert!((hyp2f1(1.0, 1.0, 2.0, z) - closed).abs() < 1e-12, "{z}");
        }
        // ₂F₁(a, b; b; z) = (1 − z)^−a.
        assert!((hyp2f1(2.5, 3.0, 3.0, 0.3) - 0.7_f64.powf(-2.5)).abs() < 1e-12);
    }
}
