//! Scripted walks through a store, and the radio readings they would produce: for tests, the
//! demo and benchmarks.
//!
//! A [`Walk`] moves a phone along waypoints with linear interpolation; [`simulate`] has it
//! advertise every `interval_ms` (plus up to 10 ms of random delay, as BLE's advDelay adds) and
//! each scanner within `range_m` hear it with probability `1 - loss`, at the log-distance RSSI
//! plus Gaussian shadowing of `sigma_db`. [`ground_truth`] says when each phone really was in
//! each zone, so detection can be measured against it.
//!
//! Invariants: the same inputs and seed give the same samples (a seeded `StdRng`, draws in a
//! fixed order), samples come out sorted by time, and a phone is only heard between its first
//! and last waypoint.

use std::sync::Arc;

use jiff::Timestamp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::zones::ZoneSpec;

/// Where the scanners are, in metres on the store's floor plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub scanners: Vec<(String, (f32, f32))>,
}

impl Layout {
    pub fn position(&self, scanner: &str) -> Option<(f32, f32)> {
        self.scanners
            .iter()
            .find(|(id, _)| id == scanner)
            .map(|(_, p)| *p)
    }
}

fn distance(a: (f32, f32), b: (f32, f32)) -> f32 {
    (a.0 - b.0).hypot(a.1 - b.1)
}

/// A small store, 16 m × 12 m: the door at x = 0 with a scanner at it, a promotion aisle, a
/// corridor along y = 5.5 and three checkout lanes 4 m apart along y = 10, which shoppers pass
/// to leave. Every zone is 1.5 m in and 2.5 m out, and shoppers stand 0.5 m from a zone's
/// scanner: 9.5 dB inside `enter_m` at n = 2. Lane zones are 1 m apart at `enter_m`, and the
/// corridor keeps 4.5 m (again 9.5 dB) from every scanner it passes: with 8 dB of shadowing,
/// tighter geometry than that is where wrong zones come from.
pub fn demo_store() -> (Layout, Vec<ZoneSpec>) {
    let layout = Layout {
        scanners: vec![
            ("entrance".into(), (0.0, 1.0)),
            ("aisle".into(), (8.0, 1.0)),
            ("lane-1".into(), (4.0, 10.0)),
            ("lane-2".into(), (8.0, 10.0)),
            ("lane-3".into(), (12.0, 10.0)),
        ],
    };
    let zone = |name: &str, scanner: &str, lane: Option<&str>| ZoneSpec {
        name: name.into(),
        lane: lane.map(Into::into),
        scanners: vec![scanner.into()],
        enter_m: 1.5,
        exit_m: 2.5,
        dwell_s: 5,
        away_s: 10,
    };
    let zones = vec![
        zone("entrance", "entrance", None),
        zone("aisle-1", "aisle", None),
        zone("lane-1", "lane-1", Some("1")),
        zone("lane-2", "lane-2", Some("2")),
        zone("lane-3", "lane-3", Some("3")),
    ];
    (layout, zones)
}

/// One phone's path: `(seconds from the start, position)`, in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct Walk {
    pub phone: usize,
    pub waypoints: Vec<(f64, (f32, f32))>,
}

impl Walk {
    /// Where the phone is at `t`, interpolating linearly; `None` before the first waypoint
    /// and after the last (the phone is not in the store).
    pub fn position(&self, t: f64) -> Option<(f32, f32)> {
        let (first, last) = self.span()?;
        if !(first..=last).contains(&t) {
            return None;
        }
        let next = self.waypoints.partition_point(|(wt, _)| *wt <= t);
        if next == 0 {
            return Some(self.waypoints[0].1);
        }
        let (t0, p0) = self.waypoints[next - 1];
        let Some(&(t1, p1)) = self.waypoints.get(next) else {
            return Some(p0);
        };
        let f = if t1 > t0 {
            ((t - t0) / (t1 - t0)) as f32
        } else {
            1.0
        };
        Some((p0.0 + (p1.0 - p0.0) * f, p0.1 + (p1.1 - p0.1) * f))
    }

    /// First and last waypoint times.
    pub fn span(&self) -> Option<(f64, f64)> {
        Some((self.waypoints.first()?.0, self.waypoints.last()?.0))
    }
}

/// Door → entrance → aisle → corridor → lane (60 s at the till) → out past the lanes.
fn to_lane(phone: usize, start: f64, lane_x: f32) -> Walk {
    let w = [
        (0.0, (-14.0, 1.0)),
        (12.0, (0.0, 1.5)),
        (18.0, (0.0, 1.5)),
        (25.0, (8.0, 1.5)),
        (45.0, (8.0, 1.5)),
        (49.0, (lane_x, 5.5)),
        (53.0, (lane_x, 9.5)),
        (113.0, (lane_x, 9.5)),
        (116.0, (lane_x, 12.5)),
        (126.0, (lane_x, 24.0)),
    ];
    Walk {
        phone,
        waypoints: w.iter().map(|&(t, p)| (start + t, p)).collect(),
    }
}

/// Like [`to_lane`], but after the aisle the phone waits on the far side of the corridor and
/// then walks across it to the lane: two of these in opposite directions cross mid-corridor.
fn across_to_lane(phone: usize, start: f64, from_x: f32, lane_x: f32) -> Walk {
    let w = [
        (0.0, (-14.0, 1.0)),
        (12.0, (0.0, 1.5)),
        (18.0, (0.0, 1.5)),
        (25.0, (8.0, 1.5)),
        (35.0, (8.0, 1.5)),
        (40.0, (from_x, 5.5)),
        (42.0, (from_x, 5.5)),
        (50.0, (lane_x, 5.5)),
        (54.0, (lane_x, 9.5)),
        (114.0, (lane_x, 9.5)),
        (117.0, (lane_x, 12.5)),
        (127.0, (lane_x, 24.0)),
    ];
    Walk {
        phone,
        waypoints: w.iter().map(|&(t, p)| (start + t, p)).collect(),
    }
}

/// Six shoppers in [`demo_store`]: phones 0–2 go to lanes 1–3 a few seconds apart; phones 3
/// and 4 cross each other in the corridor on their way to lanes 1 and 3; phone 5 only
/// browses the aisle and leaves by the door, past the entrance.
pub fn demo_walks() -> Vec<Walk> {
    let mut walks = vec![
        to_lane(0, 0.0, 4.0),
        to_lane(1, 4.0, 8.0),
        to_lane(2, 9.0, 12.0),
        across_to_lane(3, 20.0, 12.0, 4.0),
        across_to_lane(4, 20.0, 4.0, 12.0),
    ];
    let browse = [
        (0.0, (-14.0, 1.0)),
        (12.0, (0.0, 1.5)),
        (18.0, (0.0, 1.5)),
        (25.0, (8.0, 1.5)),
        (60.0, (8.0, 1.5)),
        (67.0, (0.0, 1.5)),
        (73.0, (0.0, 1.5)),
        (85.0, (-14.0, 1.0)),
    ];
    walks.push(Walk {
        phone: 5,
        waypoints: browse.iter().map(|&(t, p)| (30.0 + t, p)).collect(),
    });
    walks
}

/// How the radio behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Standard deviation of log-normal shadowing, in dB (4 is an open floor, 8 a busy one).
    pub sigma_db: f32,
    /// Probability that a scanner misses an advertisement.
    pub loss: f32,
    /// Advertising interval of the phones.
    pub interval_ms: u32,
    pub seed: u64,
    pub ref_rssi_1m: f32,
    pub path_loss_exponent: f32,
    /// Scanners hear nothing beyond this distance.
    pub range_m: f32,
}

impl Default for SimConfig {
    /// Android's "balanced" advertising (250 ms), a 4 dB floor, 30% loss, a free-space
    /// radio with the tracker's default calibration.
    fn default() -> Self {
        SimConfig {
            sigma_db: 4.0,
            loss: 0.3,
            interval_ms: 250,
            seed: 1,
            ref_rssi_1m: -59.0,
            path_loss_exponent: 2.0,
            range_m: 12.0,
        }
    }
}

/// One advertisement as one scanner heard it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub phone: usize,
    pub scanner: Arc<str>,
    pub rssi: i16,
    pub at: Timestamp,
}

/// Standard normal by Box–Muller; `1 - u` keeps the logarithm's argument in (0, 1].
fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn at_offset(start_us: i64, t: f64) -> Option<Timestamp> {
    let us = start_us.checked_add((t * 1e6).round() as i64)?;
    Timestamp::from_microsecond(us).ok()
}

/// The samples that `walks` produce in `layout`, sorted by time.
pub fn simulate(layout: &Layout, walks: &[Walk], cfg: &SimConfig, start: Timestamp) -> Vec<Sample> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let ids: Vec<Arc<str>> = layout
        .scanners
        .iter()
        .map(|(id, _)| Arc::from(id.as_str()))
        .collect();
    let interval = f64::from(cfg.interval_ms.max(1)) / 1000.0;
    let heard = f64::from(1.0 - cfg.loss.clamp(0.0, 1.0));
    let start_us = start.as_microsecond();
    let mut out = Vec::new();
    for walk in walks {
        let Some((first, last)) = walk.span() else {
            continue;
        };
        // Phones do not advertise in step with one another.
        let mut t = first + rng.random::<f64>() * interval;
        while t <= last {
            let Some(pos) = walk.position(t) else {
                break;
            };
            for (i, (_, scanner_pos)) in layout.scanners.iter().enumerate() {
                let d = distance(pos, *scanner_pos);
                if d > cfg.range_m || rng.random::<f64>() >= heard {
                    continue;
                }
                let model = cfg.ref_rssi_1m - 10.0 * cfg.path_loss_exponent * d.max(0.1).log10();
                let rssi = (model + cfg.sigma_db * gaussian(&mut rng)).round();
                let Some(at) = at_offset(start_us, t) else {
                    continue;
                };
                out.push(Sample {
                    phone: walk.phone,
                    scanner: ids[i].clone(),
                    rssi: rssi.clamp(-127.0, 20.0) as i16,
                    at,
                });
            }
            t += interval + rng.random::<f64>() * 0.010;
        }
    }
    out.sort_by_key(|s| (s.at, s.phone));
    out
}

/// When each phone was really in each zone: `(phone, zone name, entered, left)` in seconds
/// from the start, where "in" means within `enter_m` of the nearest of the zone's scanners.
/// Sampled every 50 ms; a visit still going on at the walk's end ends there.
pub fn ground_truth(
    layout: &Layout,
    zones: &[ZoneSpec],
    walks: &[Walk],
) -> Vec<(usize, String, f64, f64)> {
    const STEP: f64 = 0.05;
    let mut out = Vec::new();
    for walk in walks {
        let Some((first, last)) = walk.span() else {
            continue;
        };
        for zone in zones {
            let scanners: Vec<(f32, f32)> = zone
                .scanners
                .iter()
                .filter_map(|s| layout.position(s))
                .collect();
            let mut entered: Option<f64> = None;
            let mut k = 0u64;
            loop {
                let t = (first + k as f64 * STEP).min(last);
                let inside = walk
                    .position(t)
                    .is_some_and(|p| scanners.iter().any(|&sp| distance(p, sp) <= zone.enter_m));
                match (inside, entered) {
                    (true, None) => entered = Some(t),
                    (false, Some(e)) => {
                        out.push((walk.phone, zone.name.clone(), e, t));
                        entered = None;
                    }
                    _ => {}
                }
                if t >= last {
                    break;
                }
                k += 1;
            }
            if let Some(e) = entered {
                out.push((walk.phone, zone.name.clone(), e, last));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Timestamp {
        "2026-11-22T08:00:00Z".parse().unwrap()
    }

    #[test]
    fn positions_interpolate_between_waypoints() {
        let w = Walk {
            phone: 0,
            waypoints: vec![(10.0, (0.0, 0.0)), (20.0, (10.0, 0.0)), (30.0, (10.0, 5.0))],
        };
        assert_eq!(w.position(9.9), None);
        assert_eq!(w.position(10.0), Some((0.0, 0.0)));
        assert_eq!(w.position(15.0), Some((5.0, 0.0)));
        assert_eq!(w.position(25.0), Some((10.0, 2.5)));
        assert_eq!(w.position(30.0), Some((10.0, 5.0)));
        assert_eq!(w.position(30.1), None);
        assert_eq!(w.span(), Some((10.0, 30.0)));
        let empty = Walk {
            phone: 1,
            waypoints: vec![],
        };
        assert_eq!(empty.position(0.0), None);
    }

    #[test]
    fn demo_store_lanes_do_not_overlap_at_enter_m() {
        let (layout, zones) = demo_store();
        for zone in &zones {
            assert!(zone.validate().is_ok(), "{}", zone.name);
            for s in &zone.scanners {
                assert!(layout.position(s).is_some(), "{s} is placed");
            }
        }
        let lanes: Vec<_> = zones.iter().filter(|z| z.lane.is_some()).collect();
        assert_eq!(lanes.len(), 3);
        for a in &lanes {
            for b in &lanes {
                if a.name == b.name {
                    continue;
                }
                let pa = layout.position(&a.scanners[0]).unwrap();
                let pb = layout.position(&b.scanners[0]).unwrap();
                assert!(distance(pa, pb) > a.enter_m + b.enter_m);
            }
        }
    }

    #[test]
    fn simulation_is_sorted_deterministic_and_lossy() {
        let (layout, _) = demo_store();
        let walks = vec![Walk {
            phone: 0,
            waypoints: vec![(0.0, (8.0, 9.0)), (100.0, (8.0, 9.0))],
        }];
        let cfg = SimConfig {
            sigma_db: 0.0,
            ..SimConfig::default()
        };
        let a = simulate(&layout, &walks, &cfg, start());
        assert_eq!(a, simulate(&layout, &walks, &cfg, start()));
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        // 100 s at ~255 ms, 5 scanners in range, 70% heard.
        let expected = 100.0 / 0.255 * 5.0 * 0.7;
        let n = a.len() as f64;
        assert!((n - expected).abs() < expected * 0.05, "{n} samples");
        // Noise-free RSSI is the model: lane-2 is 1 m away.
        let lane2: Vec<_> = a.iter().filter(|s| &*s.scanner == "lane-2").collect();
        assert!(lane2.iter().all(|s| s.rssi == -59));
        let other = simulate(
            &layout,
            &walks,
            &SimConfig {
                seed: 2,
                ..cfg.clone()
            },
            start(),
        );
        assert_ne!(a, other);
        assert!(a.first().unwrap().at >= start());
        assert!(a.last().unwrap().at <= start() + jiff::SignedDuration::from_secs(100));
    }

    #[test]
    fn shadowing_has_the_configured_spread() {
        let (layout, _) = demo_store();
        let walks = vec![Walk {
            phone: 0,
            waypoints: vec![(0.0, (8.0, 9.0)), (600.0, (8.0, 9.0))],
        }];
        let cfg = SimConfig {
            sigma_db: 8.0,
            loss: 0.0,
            ..SimConfig::default()
        };
        let rssi: Vec<f64> = simulate(&layout, &walks, &cfg, start())
            .iter()
            .filter(|s| &*s.scanner == "lane-2")
            .map(|s| f64::from(s.rssi))
            .collect();
        let mean = rssi.iter().sum::<f64>() / rssi.len() as f64;
        let sd = (rssi.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rssi.len() as f64).sqrt();
        assert!((mean + 59.0).abs() < 0.5, "mean {mean}");
        assert!((sd - 8.0).abs() < 0.5, "sd {sd}");
    }

    #[test]
    fn out_of_range_scanners_hear_nothing() {
        let (layout, _) = demo_store();
        let walks = vec![Walk {
            phone: 0,
            waypoints: vec![(0.0, (-30.0, 1.0)), (10.0, (-30.0, 1.0))],
        }];
        assert!(simulate(&layout, &walks, &SimConfig::default(), start()).is_empty());
    }

    #[test]
    fn ground_truth_of_the_demo_walks() {
        let (layout, zones) = demo_store();
        let walks = demo_walks();
        let truth = ground_truth(&layout, &zones, &walks);
        let visits = |phone: usize| -> Vec<&str> {
            truth
                .iter()
                .filter(|v| v.0 == phone)
                .map(|v| v.1.as_str())
                .collect()
        };
        assert_eq!(visits(0), ["entrance", "aisle-1", "lane-1"]);
        assert_eq!(visits(1), ["entrance", "aisle-1", "lane-2"]);
        assert_eq!(visits(3), ["entrance", "aisle-1", "lane-1"]);
        assert_eq!(visits(4), ["entrance", "aisle-1", "lane-3"]);
        assert_eq!(visits(5), ["entrance", "entrance", "aisle-1"]);
        let lane = truth.iter().find(|v| v.0 == 0 && v.1 == "lane-1").unwrap();
        // In from y = 8.5 (t = 52) to y = 11.5 (t = 115).
        assert!((lane.2 - 52.0).abs() < 0.1, "{lane:?}");
        assert!((lane.3 - 115.0).abs() < 0.1, "{lane:?}");
        // Phones 3 and 4 are within 1 m of each other mid-corridor: they cross.
        let p3 = walks[3].position(66.0).unwrap();
        let p4 = walks[4].position(66.0).unwrap();
        assert!(distance(p3, p4) < 1.0);
        assert!(walks[3].position(60.0).unwrap().0 > walks[4].position(60.0).unwrap().0);
        assert!(walks[3].position(72.0).unwrap().0 < walks[4].position(72.0).unwrap().0);
    }
}
