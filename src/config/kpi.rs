//! `[profiles.kpi]`: the thresholds of the activity classes and the overdue rule, and the
//! profile cache's default size. The KPI arithmetic that reads them lives in `profiles::kpi`.

use super::*;

/// Profiles kept in memory when `profiles.cache_entries` is not set.
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;

/// Thresholds of the activity classes and the overdue rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KpiConfig {
    /// A customer whose first purchase is at most this many days ago is New.
    #[serde(default = "default_new_days")]
    pub new_days: u32,
    /// A customer whose last purchase is more than this many days ago is Passive; otherwise,
    /// and not New, Loyal.
    #[serde(default = "default_passive_after_days")]
    pub passive_after_days: u32,
    /// Overdue when the days since the last purchase exceed the customer's median interval
    /// times this factor.
    #[serde(default = "default_overdue_factor")]
    pub overdue_factor: f64,
    /// Fallback CLV: years a customer is expected to stay.
    #[serde(default = "default_expected_lifetime_years")]
    pub expected_lifetime_years: f64,
    /// CLV horizon in days.
    #[serde(default = "default_clv_horizon_days")]
    pub clv_horizon_days: u32,
}

fn default_new_days() -> u32 {
    90
}
fn default_passive_after_days() -> u32 {
    180
}
fn default_overdue_factor() -> f64 {
    1.5
}
fn default_expected_lifetime_years() -> f64 {
    3.0
}
fn default_clv_horizon_days() -> u32 {
    365
}

impl Default for KpiConfig {
    fn default() -> Self {
        KpiConfig {
            new_days: default_new_days(),
            passive_after_days: default_passive_after_days(),
            overdue_factor: default_overdue_factor(),
            expected_lifetime_years: default_expected_lifetime_years(),
            clv_horizon_days: default_clv_horizon_days(),
        }
    }
}
