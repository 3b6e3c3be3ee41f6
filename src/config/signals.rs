//! `[signals]`: what the store tells central about its customers (`storelink.customer.v1`,
//! `storelink.trigger.v1`, `storelink.followups.v1`), and `[retention]`: how long the
//! customer-linked records that are not profiles are kept. The work itself lives in
//! `signals` and `profiles::followups`.

use super::*;

/// Customer signals: snapshots, lifecycle triggers and the follow-up model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalsConfig {
    /// Sends snapshots and triggers at all (they also need each customer's `marketing`
    /// consent).
    pub enabled: bool,
    /// Local time of the daily trigger run, `HH:MM` in `store.timezone`. A run missed while the
    /// agent was down happens at start.
    pub daily_at: String,
    /// At most one `storelink.customer.v1` per customer per this many seconds.
    pub snapshot_every_s: u64,
    /// `birthday` fires this many days before the birthday (0: on the day).
    pub birthday_days_ahead: u32,
    /// `points_expiring` fires this many days before central's expiry date.
    pub points_expiry_days_ahead: u32,
    /// A trigger whose moment (a rhythm became overdue, the next purchase was due, the
    /// customer turned Passive, the first purchase) lies more than this many days back is
    /// history, not news, unless the agent was down since: a gateway's first run then sends
    /// what became due in the last week, not every win-back of the years before. Older
    /// states stay visible in `storelink.customer.v1`.
    pub catch_up_days: u32,
    pub followups: FollowUpConfig,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        SignalsConfig {
            enabled: true,
            daily_at: "06:00".into(),
            snapshot_every_s: 3600,
            birthday_days_ahead: 7,
            points_expiry_days_ahead: 30,
            catch_up_days: 7,
            followups: FollowUpConfig::default(),
        }
    }
}

impl SignalsConfig {
    /// `daily_at` as hour and minute; `None` when it is not `HH:MM`.
    pub fn daily_time(&self) -> Option<jiff::civil::Time> {
        let (h, m) = self.daily_at.split_once(':')?;
        let two = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
        if !two(h) || !two(m) {
            return None;
        }
        jiff::civil::Time::new(h.parse().ok()?, m.parse().ok()?, 0, 0).ok()
    }
}

/// The follow-up model learned from the store's own loyalty baskets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FollowUpConfig {
    /// "Bought X, then Y within this many days".
    pub window_days: u32,
    /// SKUs that count as products of their own (a console model), besides categories.
    pub anchor_skus: Vec<String>,
    /// Most (X, Y) pairs counted; beyond it new pairs are not tracked (and counted as such).
    pub max_pairs: usize,
    /// A pair needs this many customers before it is suggested or sent.
    pub min_customers: u64,
    /// Pairs sent daily in `storelink.followups.v1`.
    pub top: usize,
}

impl Default for FollowUpConfig {
    fn default() -> Self {
        FollowUpConfig {
            window_days: 30,
            anchor_skus: Vec::new(),
            max_pairs: 20_000,
            min_customers: 5,
            top: 50,
        }
    }
}

/// How long customer-linked records beyond the profile are kept, in days.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// A customer's transaction ledger entries (the KPIs' per-day inputs are kept as long).
    pub ledger_days: u32,
    /// Offer decisions, redemptions and cap history per customer.
    pub offer_history_days: u32,
    /// The memory of which triggers fired (it must outlive the occasions it remembers).
    pub occasion_days: u32,
    /// Dead letters kept locally (they hold raw register bytes).
    pub deadletter_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            ledger_days: 3 * 365,
            offer_history_days: 2 * 365,
            occasion_days: 400,
            deadletter_days: 90,
        }
    }
}
