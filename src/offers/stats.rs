//! Campaign success at the edge: per campaign and variant, offers shown, redemptions and
//! revenue, and the uplift against the control group with a two-proportion z-test.
//!
//! Invariants:
//! - Rates are redemptions per decision in each group: exposed = redeemed / shown, control =
//!   qualifying purchases / control decisions. Each decision is redeemed at most once (see
//!   [`super::ledger`]), so both are proportions in [0, 1].
//! - No test is reported without at least one decision in each group; the figures stay,
//!   the uplift is absent.

use serde::{Deserialize, Serialize};

use super::ledger::Counts;

/// Uplift of the exposed group over the control group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Uplift {
    pub exposed_rate: f64,
    pub control_rate: f64,
    /// exposed_rate − control_rate.
    pub difference: f64,
    /// The pooled two-proportion z statistic.
    pub z: f64,
    /// Two-sided p-value of z under the normal approximation.
    pub p_value: f64,
}

/// One line of `storelink offers stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignStats {
    pub campaign: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(flatten)]
    pub counts: Counts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplift: Option<Uplift>,
}

/// The two-proportion z-test: `x1` successes of `n1` against `x2` of `n2`.
pub fn two_proportion(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<Uplift> {
    if n1 == 0 || n2 == 0 || x1 > n1 || x2 > n2 {
        return None;
    }
    let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
    let pooled = (x1 + x2) as f64 / (n1 + n2) as f64;
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    // Both groups all-or-nothing and equal: no evidence either way.
    let z = if se > 0.0 { (p1 - p2) / se } else { 0.0 };
    Some(Uplift {
        exposed_rate: p1,
        control_rate: p2,
        difference: p1 - p2,
        z,
        p_value: libm::erfc(z.abs() / std::f64::consts::SQRT_2),
    })
}

impl CampaignStats {
    pub fn new(campaign: String, variant: Option<String>, counts: Counts) -> CampaignStats {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        let uplift = two_proportion(
            n(counts.redeemed),
            n(counts.shown),
            n(counts.control_purchases),
            n(counts.controls),
        );
        CampaignStats {
            campaign,
            variant,
            counts,
            uplift,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_test_matches_a_worked_example() {
        // 120 of 1000 exposed against 80 of 1000 controls: pooled 0.1, se = sqrt(0.1·0.9·0.002)
        // = 0.013416, z = 0.04 / 0.013416 = 2.9814, two-sided p = 0.00287 (R: prop.test
        // without continuity correction gives X-squared = 8.8889 = z², p-value = 0.002869).
        let u = two_proportion(120, 1000, 80, 1000).unwrap();
        assert!((u.difference - 0.04).abs() < 1e-12);
        assert!((u.z - 2.981_423_97).abs() < 1e-6, "{}", u.z);
        assert!((u.z * u.z - 8.888_889).abs() < 1e-5);
        assert!((u.p_value - 0.002_869).abs() < 1e-5, "{}", u.p_value);
    }

    #[test]
    fn no_test_without_both_groups() {
        assert!(two_proportion(1, 10, 0, 0).is_none());
        assert!(two_proportion(0, 0, 1, 10).is_none());
        let same = two_proportion(0, 10, 0, 10).unwrap();
        assert_eq!((same.z, same.p_value), (0.0, 1.0));
    }
}
