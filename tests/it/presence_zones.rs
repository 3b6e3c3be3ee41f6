//! The presence tracker against scripted walks with realistic radio: 4 and 8 dB of shadowing,
//! 30% packet loss, advertising with jitter. Time comes from the samples' timestamps and a
//! 250 ms tick, as the pipeline drives it; nothing sleeps.
//!
//! Phones advertise every 100 ms here unless a test says otherwise: that is what an app that
//! advertises in the foreground does (Android's low-latency mode, iOS iBeacon). At 250 ms,
//! 30% loss and 8 dB the readings carry too little information for every entry to be sure
//! within 3 s; `at_250_ms_most_entries_are_detected_within_3_s` pins down how close we get.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use storelink::presence::walk::{
    Sample, SimConfig, Walk, demo_store, demo_walks, ground_truth, simulate,
};
use storelink::presence::zones::{
    Place, PresenceChange, PresenceKind, Tracker, TrackerConfig, ZoneSpec,
};

const TICK_MS: i64 = 250;

/// Counts allocations per thread, so a test can show that the hot path makes none while the
/// other tests run alongside.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

fn start() -> Timestamp {
    "2026-11-22T08:00:00Z".parse().unwrap()
}

fn secs(at: Timestamp) -> f64 {
    at.duration_since(start()).as_secs_f64()
}

fn radio(sigma_db: f32, interval_ms: u32, seed: u64) -> SimConfig {
    SimConfig {
        sigma_db,
        loss: 0.3,
        interval_ms,
        seed,
        ..SimConfig::default()
    }
}

/// Feeds the samples in time order, ticking every 250 ms, until `end_s`.
fn replay(zones: &[ZoneSpec], samples: &[Sample], end_s: f64) -> Vec<PresenceChange<usize>> {
    let mut tracker = Tracker::new(TrackerConfig {
        zones: zones.to_vec(),
        ..TrackerConfig::default()
    });
    let mut out = Vec::new();
    let mut tick = start();
    let step = SignedDuration::from_millis(TICK_MS);
    for s in samples {
        while tick <= s.at {
            tracker.tick(tick, &mut out);
            tick += step;
        }
        tracker.observe(&s.phone, &s.scanner, s.rssi, None, None, s.at, &mut out);
    }
    while secs(tick) <= end_s {
        tracker.tick(tick, &mut out);
        tick += step;
    }
    assert_eq!(tracker.tracked(), 0, "everyone has left by {end_s} s");
    out
}

fn zone_name(zones: &[ZoneSpec], place: Place) -> &str {
    match place {
        Place::Store => "store",
        Place::Zone(i) => &zones[i].name,
    }
}

/// Checks the causal order of one run: per customer, the store is entered before any zone,
/// at most one zone is occupied, every `left` and `dwelling` follows its `entered`, zones
/// are left before the store, and times never go backwards.
fn assert_causal(zones: &[ZoneSpec], events: &[PresenceChange<usize>]) {
    #[derive(Default)]
    struct Seen {
        in_store: bool,
        zone: Option<usize>,
        last: Option<Timestamp>,
    }
    let mut seen: HashMap<usize, Seen> = HashMap::new();
    for e in events {
        let s = seen.entry(e.customer).or_default();
        assert!(s.last.is_none_or(|l| l <= e.at), "time went back: {e:?}");
        s.last = Some(e.at);
        let what = format!(
            "phone {} {} {}",
            e.customer,
            e.kind.as_str(),
            zone_name(zones, e.place)
        );
        match (e.kind, e.place) {
            (PresenceKind::Entered, Place::Store) => {
                assert!(!s.in_store, "{what}: entered twice");
                s.in_store = true;
            }
            (PresenceKind::Left, Place::Store) => {
                assert!(s.in_store, "{what}: never entered");
                assert!(s.zone.is_none(), "{what}: still in a zone");
                s.in_store = false;
            }
            (PresenceKind::Entered, Place::Zone(z)) => {
                assert!(s.in_store, "{what}: zone before store");
                assert!(s.zone.is_none(), "{what}: already in {:?}", s.zone);
                assert!(e.distance_m.is_some_and(|d| d <= zones[z].enter_m));
                s.zone = Some(z);
            }
            (PresenceKind::Dwelling | PresenceKind::Left, Place::Zone(z)) => {
                assert_eq!(s.zone, Some(z), "{what}: not in that zone");
                if e.kind == PresenceKind::Left {
                    s.zone = None;
                }
            }
            (PresenceKind::Dwelling, Place::Store) => panic!("{what}: the store has no dwell"),
        }
        assert!(
            (0.0..=1.0).contains(&e.confidence),
            "{what}: {}",
            e.confidence
        );
    }
    for (phone, s) in seen {
        assert!(!s.in_store && s.zone.is_none(), "phone {phone} never left");
    }
}

/// A detected zone visit: zone name, entered and left, in seconds.
type Visit = (String, f64, Option<f64>);

fn visits(zones: &[ZoneSpec], events: &[PresenceChange<usize>], phone: usize) -> Vec<Visit> {
    let mut out: Vec<Visit> = Vec::new();
    for e in events.iter().filter(|e| e.customer == phone) {
        let Place::Zone(z) = e.place else { continue };
        match e.kind {
            PresenceKind::Entered => out.push((zones[z].name.clone(), secs(e.at), None)),
            PresenceKind::Left => out.last_mut().expect("left after entered").2 = Some(secs(e.at)),
            PresenceKind::Dwelling => {}
        }
    }
    out
}

/// Truth visits at least this long must be detected; shorter ones are a shopper passing by.
const MIN_VISIT_S: f64 = 5.0;

/// What one run of the demo walks shows against ground truth.
#[derive(Debug, Default)]
struct Scored {
    /// Detection latency of every truth visit, `None` when nothing was detected within 10 s.
    latencies: Vec<Option<f64>>,
    /// Detected visits to a zone the phone was not in (±3 s).
    wrong: Vec<String>,
}

fn score_demo(sigma_db: f32, interval_ms: u32, seed: u64) -> Scored {
    let (layout, zones) = demo_store();
    let walks = demo_walks();
    let samples = simulate(
        &layout,
        &walks,
        &radio(sigma_db, interval_ms, seed),
        start(),
    );
    let end = walks
        .iter()
        .filter_map(Walk::span)
        .map(|s| s.1)
        .fold(0.0, f64::max)
        + 90.0;
    let events = replay(&zones, &samples, end);
    assert_causal(&zones, &events);
    let truth = ground_truth(&layout, &zones, &walks);
    let mut scored = Scored::default();
    for walk in &walks {
        let p = walk.phone;
        let detected = visits(&zones, &events, p);
        let truly: Vec<_> = truth.iter().filter(|t| t.0 == p).collect();
        for (_, zone, enter, leave) in &truly {
            if leave - enter < MIN_VISIT_S {
                continue;
            }
            scored.latencies.push(
                detected
                    .iter()
                    .find(|d| &d.0 == zone && (d.1 - enter).abs() <= 10.0)
                    .map(|d| d.1 - enter),
            );
        }
        for (zone, at, _) in &detected {
            if !truly
                .iter()
                .any(|t| &t.1 == zone && *at >= t.2 - 3.0 && *at <= t.3 + 3.0)
            {
                scored
                    .wrong
                    .push(format!("seed {seed}: phone {p} in {zone} at {at:.1} s"));
            }
        }
    }
    scored
}

#[test]
fn entry_is_detected_within_3_s_at_4_and_8_db_with_30_percent_loss() {
    for sigma in [4.0, 8.0] {
        let mut all = Vec::new();
        for seed in 1..=8 {
            let scored = score_demo(sigma, 100, seed);
            assert!(scored.wrong.is_empty(), "σ={sigma}: {:?}", scored.wrong);
            all.extend(scored.latencies);
        }
        // Per seed: phones 0–4 visit the entrance, the aisle and a lane; phone 5 the entrance
        // twice and the aisle.
        assert_eq!(all.len(), 8 * 18);
        let worst = all
            .iter()
            .map(|l| l.expect("every visit is detected"))
            .fold(f64::MIN, f64::max);
        assert!(worst <= 3.0, "σ={sigma}: worst latency {worst:.2} s");
    }
}

#[test]
fn at_250_ms_most_entries_are_detected_within_3_s() {
    for (sigma, within, wrong_at_most) in [(4.0, 0.99, 0), (8.0, 0.97, 2)] {
        let mut all = Vec::new();
        let mut wrong = Vec::new();
        for seed in 1..=10 {
            let scored = score_demo(sigma, 250, seed);
            all.extend(scored.latencies);
            wrong.extend(scored.wrong);
        }
        let n = all.len() as f64;
        let fast = all.iter().filter(|l| l.is_some_and(|l| l <= 3.0)).count() as f64;
        assert!(fast / n >= within, "σ={sigma}: {fast} of {n} within 3 s");
        assert!(
            all.iter().all(Option::is_some),
            "σ={sigma}: a visit was missed"
        );
        assert!(wrong.len() <= wrong_at_most, "σ={sigma}: {wrong:?}");
    }
}

#[test]
fn crossing_phones_end_up_at_their_own_lanes() {
    let (layout, zones) = demo_store();
    let walks = demo_walks();
    for seed in 1..=4 {
        let samples = simulate(&layout, &walks, &radio(8.0, 100, seed), start());
        let events = replay(&zones, &samples, 250.0);
        for (phone, lane) in [(3, "lane-1"), (4, "lane-3")] {
            let lanes: Vec<String> = visits(&zones, &events, phone)
                .into_iter()
                .map(|v| v.0)
                .filter(|z| z.starts_with("lane"))
                .collect();
            assert_eq!(lanes, [lane], "seed {seed} phone {phone}");
        }
    }
}

/// Three phones stand at the three lanes for ten minutes.
fn standing_at_lanes() -> Vec<Walk> {
    [4.0, 8.0, 12.0]
        .iter()
        .enumerate()
        .map(|(phone, &x)| Walk {
            phone,
            waypoints: vec![
                (0.0, (x, 9.5)),
                (600.0, (x, 9.5)),
                (603.0, (x, 12.5)),
                (613.0, (x, 24.0)),
            ],
        })
        .collect()
}

#[test]
fn no_false_left_while_standing_at_a_lane_for_10_minutes_at_8_db() {
    let (layout, zones) = demo_store();
    let walks = standing_at_lanes();
    for interval_ms in [100, 250] {
        for seed in 1..=4 {
            let samples = simulate(&layout, &walks, &radio(8.0, interval_ms, seed), start());
            let events = replay(&zones, &samples, 700.0);
            assert_causal(&zones, &events);
            for walk in &walks {
                let lane = format!("lane-{}", walk.phone + 1);
                let seen = visits(&zones, &events, walk.phone);
                assert_eq!(seen.len(), 1, "{interval_ms} ms seed {seed}: {seen:?}");
                let (zone, entered, left) = &seen[0];
                assert_eq!(zone, &lane);
                assert!(*entered < 3.0, "entered at {entered}");
                assert!(left.expect("left in the end") > 600.0);
                let dwelling = events
                    .iter()
                    .filter(|e| e.customer == walk.phone && e.kind == PresenceKind::Dwelling)
                    .count();
                assert_eq!(dwelling, 1, "dwelling is said once");
            }
        }
    }
}

/// The last time the phone was truly within `exit_m` of the zone's scanner during a visit.
fn true_exit(walk: &Walk, scanner: (f32, f32), exit_m: f32, from: f64, to: f64) -> f64 {
    let mut t = from;
    let mut last = from;
    while t <= to {
        if let Some(p) = walk.position(t)
            && (p.0 - scanner.0).hypot(p.1 - scanner.1) <= exit_m
        {
            last = t;
        }
        t += 0.05;
    }
    last
}

#[test]
fn left_follows_a_real_departure_within_away_s_plus_3_s() {
    let (layout, zones) = demo_store();
    let walks = demo_walks();
    let truth = ground_truth(&layout, &zones, &walks);
    for sigma in [4.0, 8.0] {
        for seed in 1..=4 {
            let samples = simulate(&layout, &walks, &radio(sigma, 100, seed), start());
            let events = replay(&zones, &samples, 250.0);
            for walk in &walks {
                let lane = truth
                    .iter()
                    .find(|t| t.0 == walk.phone && t.1.starts_with("lane"));
                let Some((_, name, enter, leave)) = lane else {
                    continue;
                };
                let zone = zones.iter().find(|z| &z.name == name).unwrap();
                let at = layout.position(&zone.scanners[0]).unwrap();
                let exit = true_exit(walk, at, zone.exit_m, *enter, leave + 10.0);
                let seen = visits(&zones, &events, walk.phone);
                let visit = seen.iter().find(|v| &v.0 == name).unwrap();
                let left = visit.2.expect("the lane is left");
                let away = f64::from(zone.away_s);
                assert!(
                    left >= *leave && left <= exit + away + 3.0,
                    "σ={sigma} seed {seed} phone {}: out of reach at {exit:.1} s, left at \
                     {left:.1} s",
                    walk.phone
                );
            }
        }
    }
}

#[test]
fn store_presence_opens_before_and_closes_after_zones() {
    let (layout, zones) = demo_store();
    let walks = demo_walks();
    let samples = simulate(&layout, &walks, &radio(8.0, 250, 3), start());
    let events = replay(&zones, &samples, 250.0);
    assert_causal(&zones, &events);
    for walk in &walks {
        let mine: Vec<_> = events.iter().filter(|e| e.customer == walk.phone).collect();
        let first = mine.first().unwrap();
        let last = mine.last().unwrap();
        assert_eq!(
            (first.kind, first.place),
            (PresenceKind::Entered, Place::Store)
        );
        assert_eq!((last.kind, last.place), (PresenceKind::Left, Place::Store));
        // The store is left store_away_s after the phone was last heard.
        let heard = samples
            .iter()
            .filter(|s| s.phone == walk.phone)
            .map(|s| secs(s.at))
            .fold(0.0, f64::max);
        let left = secs(last.at);
        assert!(
            left >= heard + 60.0 && left <= heard + 60.0 + 0.25,
            "phone {}: heard until {heard:.1}, left at {left:.1}",
            walk.phone
        );
        assert_eq!(
            mine.iter().filter(|e| e.place == Place::Store).count(),
            2,
            "one visit to the store"
        );
    }
}

#[test]
fn observing_tracked_customers_allocates_nothing() {
    let (layout, zones) = demo_store();
    // 300 phones spread over the floor, drifting 2 m and back.
    let walks: Vec<Walk> = (0..300)
        .map(|phone| {
            let (x, y) = ((phone % 20) as f32 * 0.8, (phone / 20) as f32 * 0.8);
            Walk {
                phone,
                waypoints: vec![(0.0, (x, y)), (30.0, (x + 2.0, y)), (60.0, (x, y))],
            }
        })
        .collect();
    let samples = simulate(&layout, &walks, &radio(8.0, 250, 1), start());
    let (warm, hot): (Vec<_>, Vec<_>) = samples.iter().partition(|s| secs(s.at) < 20.0);
    let mut tracker: Tracker<usize> = Tracker::new(TrackerConfig {
        zones: zones.to_vec(),
        ..TrackerConfig::default()
    });
    let mut out = Vec::with_capacity(4096);
    for s in &warm {
        tracker.observe(&s.phone, &s.scanner, s.rssi, None, None, s.at, &mut out);
    }
    assert_eq!(tracker.tracked(), 300);
    out.clear();
    let before = allocations();
    let mut events = 0;
    let mut tick = hot[0].at;
    for s in &hot {
        if s.at >= tick {
            tracker.tick(tick, &mut out);
            tick += SignedDuration::from_millis(TICK_MS);
        }
        tracker.observe(&s.phone, &s.scanner, s.rssi, None, None, s.at, &mut out);
        events += out.len();
        out.clear();
    }
    assert_eq!(allocations() - before, 0, "{} observations", hot.len());
    assert!(hot.len() > 100_000 && events > 0);
    assert!(tracker.approx_bytes_per_customer() <= 320);
}

/// One step of a random stream.
#[derive(Debug, Clone)]
enum Step {
    Observe {
        customer: u8,
        scanner: u8,
        rssi: i16,
        tx_power: Option<i16>,
        distance: Option<f32>,
        dt_ms: i32,
    },
    Tick {
        dt_ms: i32,
    },
    Forget {
        customer: u8,
    },
}

/// Scanner ids the streams use: two zone scanners, an unknown one, a shared one.
const SCANNERS: [&str; 4] = ["s1", "s2", "room", "s3"];

fn step() -> impl Strategy<Value = Step> {
    let distance = prop_oneof![
        Just(None),
        (0.01f32..80.0).prop_map(Some),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30]).prop_map(Some),
    ];
    prop_oneof![
        8 => (0u8..4, 0u8..4, any::<i16>(), proptest::option::of(any::<i16>()), distance,
              -2_000i32..5_000)
            .prop_map(|(customer, scanner, rssi, tx_power, distance, dt_ms)| Step::Observe {
                customer, scanner, rssi, tx_power, distance, dt_ms,
            }),
        // Plausible RSSI near the scanners, so zones really are entered and left.
        8 => (0u8..4, 0u8..4, -75i16..-45, 0i32..400).prop_map(|(customer, scanner, rssi, dt_ms)| {
            Step::Observe { customer, scanner, rssi, tx_power: None, distance: None, dt_ms }
        }),
        2 => (-1_000i32..90_000).prop_map(|dt_ms| Step::Tick { dt_ms }),
        1 => (0u8..4).prop_map(|customer| Step::Forget { customer }),
    ]
}

fn tiny_store() -> TrackerConfig {
    let zone = |name: &str, scanners: &[&str]| ZoneSpec {
        name: name.into(),
        lane: None,
        scanners: scanners.iter().map(|s| s.to_string()).collect(),
        enter_m: 1.5,
        exit_m: 2.5,
        dwell_s: 2,
        away_s: 3,
    };
    TrackerConfig {
        zones: vec![zone("a", &["s1", "s3"]), zone("b", &["s2", "s3"])],
        store_away_s: 20,
        ..TrackerConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_streams_never_panic_nor_leave_what_was_not_entered(
        steps in prop::collection::vec(step(), 1..400)
    ) {
        let mut tracker: Tracker<u8> = Tracker::new(tiny_store());
        let mut now = start();
        let mut out = Vec::new();
        // Places each customer is in, as the events tell it.
        let mut inside: HashMap<u8, Vec<Place>> = HashMap::new();
        for step in steps {
            out.clear();
            match step {
                Step::Observe { customer, scanner, rssi, tx_power, distance, dt_ms } => {
                    now += SignedDuration::from_millis(i64::from(dt_ms));
                    tracker.observe(
                        &customer, SCANNERS[usize::from(scanner)], rssi, tx_power, distance,
                        now, &mut out,
                    );
                }
                Step::Tick { dt_ms } => {
                    now += SignedDuration::from_millis(i64::from(dt_ms));
                    tracker.tick(now, &mut out);
                }
                Step::Forget { customer } => {
                    tracker.forget(&customer);
                    inside.remove(&customer);
                }
            }
            for e in &out {
                let places = inside.entry(e.customer).or_default();
                prop_assert!((0.0..=1.0).contains(&e.confidence), "{e:?}");
                prop_assert!(e.distance_m.is_none_or(|d| d.is_finite() && d > 0.0), "{e:?}");
                match e.kind {
                    PresenceKind::Entered => {
                        prop_assert!(!places.contains(&e.place), "entered twice: {e:?}");
                        if let Place::Zone(_) = e.place {
                            prop_assert!(places.contains(&Place::Store), "zone first: {e:?}");
                            prop_assert!(places.len() == 1, "two zones: {e:?}");
                        }
                        places.push(e.place);
                    }
                    PresenceKind::Dwelling => {
                        prop_assert!(places.contains(&e.place), "dwelling outside: {e:?}");
                    }
                    PresenceKind::Left => {
                        prop_assert!(places.contains(&e.place), "left unentered: {e:?}");
                        places.retain(|p| *p != e.place);
                        if e.place == Place::Store {
                            prop_assert!(places.is_empty(), "store before zone: {e:?}");
                        }
                    }
                }
            }
            prop_assert!(tracker.tracked() <= 4);
            for (customer, places) in &inside {
                let zone = places.iter().find_map(|p| match p {
                    Place::Zone(z) => Some(*z),
                    Place::Store => None,
                });
                prop_assert_eq!(tracker.zone_of(customer), zone);
            }
        }
    }
}
