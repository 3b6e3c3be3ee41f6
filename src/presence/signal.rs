//! Signal strength to distance, smoothed over time, per customer and scanner.
//!
//! Distance follows the log-distance path-loss model: a phone `d` metres from a scanner is
//! heard at `rssi = ref_1m - 10·n·log10(d)`, so `d = 10^((ref_1m - rssi) / (10·n))`. The
//! quantity we smooth is the *path loss relative to 1 m*, `L = ref_1m - rssi` in dB, which is
//! RSSI up to the calibration's offset. Filtering `L` rather than raw RSSI lets one filter take
//! readings with and without an advertised tx power, and a remote scanner's own distance
//! (ESPresense) too, as `L = 10·n·log10(d)`.
//!
//! The smoother is a scalar Kalman filter on `L` with a random-walk model (no velocity term):
//! - predict: `P += Q·Δt`, with `Δt` the time since the last reading, however irregular; a
//!   lost packet simply makes the next `Δt` longer and the prior wider, so 30% loss needs no
//!   special case;
//! - update: `K = P/(P+R)`, `L += K·(z - L)`, `P = (1-K)·P`, with the innovation clipped to
//!   three standard deviations so that one deep fade (a body between phone and scanner) moves
//!   the estimate by a bounded step.
//!
//! `Q` = [`PROCESS_NOISE_DB2_PER_S`] and `R` = [`MEASUREMENT_NOISE_DB2`]. We chose Kalman over
//! the one-euro filter because one-euro's cutoff is tuned for a steady sample rate, which BLE
//! with loss and phone-side advertising jitter does not give, and because Kalman hands us a
//! variance that grows with silence: that is what confidence is made of.
//!
//! Confidence, in 0..=1, is `R/(R + P_now) · (1 - 2^-n)`:
//! - `P_now = P + Q·(now - last reading)`: uncertainty, including staleness; a single raw
//!   reading (`P = R`) scores 1/2 on this factor, and every second of silence lowers it;
//! - `n` is the number of readings since the filter (re)started: one reading agrees with
//!   anything, so it alone never looks certain.
//!
//! A filter is 24 bytes, updates without allocating, and restarts from the next reading after
//! [`RESTART_AFTER_S`] of silence, when its old estimate says nothing about where the phone is.

use jiff::Timestamp;
use serde::Deserialize;

/// Distances are clamped to this range: nearer than 10 cm or farther than 50 m is beyond what
/// BLE signal strength can tell apart.
pub const MIN_DISTANCE_M: f32 = 0.1;
pub const MAX_DISTANCE_M: f32 = 50.0;

/// Process noise of the path-loss random walk, in dB² per second. A shopper walking at
/// 1 m/s towards a scanner 2 m away changes `L` by about 4 dB/s; this lets the estimate follow
/// that within a second or two while averaging out 4–8 dB of fading.
pub const PROCESS_NOISE_DB2_PER_S: f32 = 20.0;

/// Measurement noise of one RSSI reading, in dB²: a 6 dB standard deviation, the middle of the
/// 4–8 dB indoor shadowing range.
pub const MEASUREMENT_NOISE_DB2: f32 = 36.0;

/// Silence after which the next reading restarts the filter.
pub const RESTART_AFTER_S: f32 = 15.0;

/// Innovation clip, in standard deviations of the innovation.
const INNOVATION_GATE: f32 = 3.0;

/// Keeps the predicted variance finite over arbitrarily long silences.
const MAX_VARIANCE: f32 = 1.0e6;

/// Plausible RSSI at 1 m. A "tx power" outside it is a transmit power level (dBm at the
/// antenna, often 0..+10), not a 1 m reference, and would put every phone 40 dB too far away.
const PLAUSIBLE_REF_1M: std::ops::RangeInclusive<i16> = -100..=-20;

/// How one scanner turns RSSI into distance.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Calibration {
    /// RSSI a typical phone is heard at from 1 m, in dBm.
    pub ref_rssi_1m: f32,
    /// 2 in free space; 1.6–1.8 along corridors; 2.5–4 through shelving and people.
    pub path_loss_exponent: f32,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            ref_rssi_1m: -59.0,
            path_loss_exponent: 2.0,
        }
    }
}

impl Calibration {
    /// Checks that the numbers describe a radio, for `check-config`.
    pub fn validate(&self) -> Result<(), String> {
        if !(-120.0..=0.0).contains(&self.ref_rssi_1m) {
            return Err(format!(
                "ref_rssi_1m = {}: the RSSI at 1 m is between -120 and 0 dBm (typically -59)",
                self.ref_rssi_1m
            ));
        }
        if !(1.0..=6.0).contains(&self.path_loss_exponent) {
            return Err(format!(
                "path_loss_exponent = {}: between 1 and 6 (2 in free space)",
                self.path_loss_exponent
            ));
        }
        Ok(())
    }

    /// Distance in metres for one reading, clamped to [`MIN_DISTANCE_M`]..=[`MAX_DISTANCE_M`].
    ///
    /// An advertised `tx_power` (iBeacon "measured power", the phone's own RSSI at 1 m)
    /// replaces `ref_rssi_1m`: the phone knows its own transmitter, whereas `ref_rssi_1m` is a
    /// site-wide average over phone models. The scanner's receive gain is then not accounted
    /// for; a site with an unusually deaf or sensitive scanner should tune its
    /// `path_loss_exponent` instead. A `tx_power` that cannot be a 1 m RSSI is ignored.
    pub fn distance_m(&self, rssi: f32, tx_power: Option<i16>) -> f32 {
        self.distance_of_loss(self.loss_db(rssi, tx_power))
    }

    /// Path loss relative to 1 m, `ref_1m - rssi`, clamped to what the distance range maps to.
    pub fn loss_db(&self, rssi: f32, tx_power: Option<i16>) -> f32 {
        let reference = match tx_power {
            Some(p) if PLAUSIBLE_REF_1M.contains(&p) => f32::from(p),
            _ => self.ref_rssi_1m,
        };
        self.clamp_loss(reference - rssi)
    }

    /// Path loss relative to 1 m at distance `d`: how a scanner's own distance joins the filter.
    pub fn loss_of_distance(&self, distance_m: f32) -> f32 {
        self.clamp_loss(10.0 * self.exponent() * distance_m.log10())
    }

    /// Distance for a path loss relative to 1 m.
    pub fn distance_of_loss(&self, loss_db: f32) -> f32 {
        let d = (loss_db * (std::f32::consts::LN_10 / (10.0 * self.exponent()))).exp();
        if d.is_nan() {
            MAX_DISTANCE_M
        } else {
            d.clamp(MIN_DISTANCE_M, MAX_DISTANCE_M)
        }
    }

    /// A NaN or absurd exponent from a config that skipped validation must not turn every
    /// distance into NaN.
    fn exponent(&self) -> f32 {
        if (1.0..=6.0).contains(&self.path_loss_exponent) {
            self.path_loss_exponent
        } else {
            Calibration::default().path_loss_exponent
        }
    }

    fn clamp_loss(&self, loss: f32) -> f32 {
        let n10 = 10.0 * self.exponent();
        // log10(0.1) = -1 and log10(50) ≈ 1.699.
        let (lo, hi) = (-n10, n10 * MAX_DISTANCE_M.log10());
        if loss.is_nan() {
            hi
        } else {
            loss.clamp(lo, hi)
        }
    }
}

/// A smoothed distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub distance_m: f32,
    /// 0..=1, see the module documentation for the formula.
    pub confidence: f32,
    /// The time the estimate is for: the variance behind `confidence` is predicted to it.
    pub at: Timestamp,
}

/// The scalar Kalman filter on path loss, for one customer at one scanner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathLossFilter {
    /// Time of the latest reading, microseconds since the Unix epoch.
    last_us: i64,
    loss_db: f32,
    variance: f32,
    samples: u16,
}

impl Default for PathLossFilter {
    fn default() -> Self {
        PathLossFilter::EMPTY
    }
}

impl PathLossFilter {
    /// A filter that has heard nothing yet.
    pub const EMPTY: PathLossFilter = PathLossFilter {
        last_us: 0,
        loss_db: 0.0,
        variance: MAX_VARIANCE,
        samples: 0,
    };

    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Readings since the filter (re)started.
    pub fn samples(&self) -> u16 {
        self.samples
    }

    /// Time of the latest reading.
    pub fn last(&self) -> Option<Timestamp> {
        if self.is_empty() {
            None
        } else {
            Timestamp::from_microsecond(self.last_us).ok()
        }
    }

    /// Takes one reading of path loss relative to 1 m (see [`Calibration::loss_db`]).
    pub fn update(&mut self, loss_db: f32, at: Timestamp) {
        self.update_us(loss_db, at.as_microsecond());
    }

    pub(crate) fn update_us(&mut self, z: f32, at_us: i64) {
        if !z.is_finite() {
            return;
        }
        let elapsed = self.elapsed_s(at_us);
        if self.samples == 0 || elapsed > RESTART_AFTER_S {
            *self = PathLossFilter {
                last_us: at_us,
                loss_db: z,
                variance: MEASUREMENT_NOISE_DB2,
                samples: 1,
            };
            return;
        }
        let prior = self.predicted_variance(elapsed);
        let innovation_var = prior + MEASUREMENT_NOISE_DB2;
        let gate = INNOVATION_GATE * innovation_var.sqrt();
        let innovation = (z - self.loss_db).clamp(-gate, gate);
        let gain = prior / innovation_var;
        self.loss_db += gain * innovation;
        self.variance = (1.0 - gain) * prior;
        self.samples = self.samples.saturating_add(1);
        // A reading that arrives late (scanners' clocks differ) still counts, but time only
        // moves forward, so the next prediction does not double-count the gap.
        self.last_us = self.last_us.max(at_us);
    }

    /// The smoothed path loss and its confidence at `now_us`.
    pub(crate) fn loss_and_confidence(&self, now_us: i64) -> (f32, f32) {
        if self.samples == 0 {
            return (self.loss_db, 0.0);
        }
        let p_now = self.predicted_variance(self.elapsed_s(now_us));
        let certainty = MEASUREMENT_NOISE_DB2 / (MEASUREMENT_NOISE_DB2 + p_now);
        let support = 1.0 - 0.5f32.powi(i32::from(self.samples.min(24)));
        (self.loss_db, certainty * support)
    }

    /// The smoothed path loss, without its confidence.
    pub(crate) fn loss(&self) -> f32 {
        self.loss_db
    }

    /// The smoothed distance and its confidence at `now`, if anything was heard.
    pub fn estimate(&self, calibration: &Calibration, now: Timestamp) -> Option<Estimate> {
        if self.is_empty() {
            return None;
        }
        let (loss, confidence) = self.loss_and_confidence(now.as_microsecond());
        Some(Estimate {
            distance_m: calibration.distance_of_loss(loss),
            confidence,
            at: now,
        })
    }

    /// Seconds since the latest reading; infinite for an empty filter.
    pub(crate) fn age_s(&self, now_us: i64) -> f32 {
        if self.is_empty() {
            f32::INFINITY
        } else {
            self.elapsed_s(now_us)
        }
    }

    fn elapsed_s(&self, now_us: i64) -> f32 {
        (now_us.saturating_sub(self.last_us).max(0) as f32) * 1e-6
    }

    fn predicted_variance(&self, elapsed_s: f32) -> f32 {
        (self.variance + PROCESS_NOISE_DB2_PER_S * elapsed_s).min(MAX_VARIANCE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn t0() -> Timestamp {
        "2026-11-22T08:00:00Z".parse().unwrap()
    }

    fn after(ms: i64) -> Timestamp {
        t0() + SignedDuration::from_millis(ms)
    }

    #[test]
    fn path_loss_model_and_its_clamps() {
        let c = Calibration::default();
        assert!((c.distance_m(-59.0, None) - 1.0).abs() < 1e-4);
        // 20 dB more loss at n = 2 is ten times the distance.
        assert!((c.distance_m(-79.0, None) - 10.0).abs() < 1e-3);
        assert!((c.distance_m(-69.0, None) - 10f32.sqrt()).abs() < 1e-3);
        let corridor = Calibration {
            ref_rssi_1m: -65.0,
            path_loss_exponent: 1.6,
        };
        assert!((corridor.distance_m(-81.0, None) - 10.0).abs() < 1e-3);
        assert_eq!(c.distance_m(-20.0, None), MIN_DISTANCE_M);
        assert_eq!(c.distance_m(-127.0, None), MAX_DISTANCE_M);
        assert_eq!(c.distance_m(f32::NAN, None), MAX_DISTANCE_M);
    }

    #[test]
    fn a_plausible_advertised_tx_power_replaces_the_reference() {
        let c = Calibration::default();
        assert!((c.distance_m(-75.0, Some(-65)) - 10f32.sqrt()).abs() < 1e-3);
        // +4 dBm is a transmit power level, not an RSSI at 1 m.
        assert_eq!(c.distance_m(-75.0, Some(4)), c.distance_m(-75.0, None));
    }

    #[test]
    fn remote_distances_round_trip_through_path_loss() {
        let c = Calibration {
            ref_rssi_1m: -62.0,
            path_loss_exponent: 2.7,
        };
        for d in [0.3f32, 1.0, 2.5, 7.0, 30.0] {
            assert!((c.distance_of_loss(c.loss_of_distance(d)) - d).abs() < d * 1e-3);
        }
        assert_eq!(c.distance_of_loss(c.loss_of_distance(-1.0)), MAX_DISTANCE_M);
        assert_eq!(c.distance_of_loss(c.loss_of_distance(1e9)), MAX_DISTANCE_M);
        assert_eq!(c.distance_of_loss(c.loss_of_distance(0.0)), MIN_DISTANCE_M);
    }

    #[test]
    fn an_invalid_exponent_never_yields_nan() {
        let c = Calibration {
            ref_rssi_1m: -59.0,
            path_loss_exponent: f32::NAN,
        };
        assert!(c.validate().is_err());
        assert!((c.distance_m(-79.0, None) - 10.0).abs() < 1e-3);
    }

    #[test]
    fn calibration_config_has_defaults_and_rejects_unknown_keys() {
        let c: Calibration = toml::from_str("path_loss_exponent = 2.5").unwrap();
        assert_eq!(c.ref_rssi_1m, -59.0);
        assert_eq!(c.path_loss_exponent, 2.5);
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<Calibration>("ref_rssi = -60").is_err());
        let deaf = Calibration {
            ref_rssi_1m: 3.0,
            path_loss_exponent: 2.0,
        };
        assert!(deaf.validate().is_err());
    }

    #[test]
    fn the_filter_averages_noise_and_converges() {
        let mut f = PathLossFilter::EMPTY;
        // Alternating ±6 dB around 10 dB of loss.
        for i in 0..40 {
            let z = if i % 2 == 0 { 16.0 } else { 4.0 };
            f.update(z, after(i * 250));
        }
        let (loss, _) = f.loss_and_confidence(after(39 * 250).as_microsecond());
        assert!((loss - 10.0).abs() < 3.5, "loss {loss}");
        // It follows a real change within a few seconds.
        for i in 40..56 {
            f.update(-6.0, after(i * 250));
        }
        assert!(f.loss() < -3.0, "loss {}", f.loss());
    }

    #[test]
    fn variance_and_confidence_follow_readings_and_silence() {
        let c = Calibration::default();
        let mut f = PathLossFilter::EMPTY;
        assert!(f.estimate(&c, t0()).is_none());
        f.update(0.0, t0());
        let one = f.estimate(&c, t0()).unwrap().confidence;
        assert!(
            (one - 0.25).abs() < 1e-6,
            "one reading scores 1/2 · 1/2: {one}"
        );
        let mut last = one;
        // Irregular intervals, as lost packets make them.
        let mut ms = 0;
        for gap in [250, 750, 250, 500, 1250, 250, 250] {
            ms += gap;
            f.update(0.0, after(ms));
            let c_now = f.estimate(&c, after(ms)).unwrap().confidence;
            assert!(c_now > 0.4, "confidence {c_now} after {ms} ms");
            last = c_now;
        }
        assert!(last > one);
        let mut previous = last;
        for s in [1, 2, 5, 10] {
            let e = f.estimate(&c, after(ms + s * 1000)).unwrap();
            assert!(e.confidence < previous, "staleness lowers confidence");
            assert_eq!(e.at, after(ms + s * 1000));
            previous = e.confidence;
        }
        assert!(previous < 0.2);
    }

    #[test]
    fn a_long_silence_restarts_the_filter() {
        let mut f = PathLossFilter::EMPTY;
        for i in 0..20 {
            f.update(20.0, after(i * 250));
        }
        assert!(f.samples() == 20);
        f.update(-10.0, after(60_000));
        assert_eq!(f.samples(), 1);
        assert_eq!(f.loss(), -10.0);
        assert_eq!(f.last(), Some(after(60_000)));
    }

    #[test]
    fn one_deep_fade_moves_the_estimate_a_bounded_step() {
        let mut f = PathLossFilter::EMPTY;
        for i in 0..20 {
            f.update(0.0, after(i * 250));
        }
        f.update(60.0, after(20 * 250));
        assert!(f.loss() < 12.0, "loss {}", f.loss());
    }

    #[test]
    fn late_and_garbage_readings_do_no_harm() {
        let mut f = PathLossFilter::EMPTY;
        f.update(5.0, after(10_000));
        f.update(5.0, after(9_000));
        assert_eq!(f.last(), Some(after(10_000)));
        f.update(f32::NAN, after(11_000));
        f.update(f32::INFINITY, after(11_000));
        assert_eq!(f.samples(), 2);
        assert!(f.loss().is_finite());
        assert!(std::mem::size_of::<PathLossFilter>() <= 24);
    }
}
