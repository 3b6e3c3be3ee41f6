//! Presence throughput and memory: advertisements/s through resolve → smooth → zone on one
//! core, with 5,000 consenting customers in the identity table and 300 phones in the store, and
//! the heap each tracked phone costs.
//!
//! `cargo bench --bench presence [-- --adverts N --runs R --customers C --phones P]`
//!
//! Two mixes are measured: every advertisement a customer's (the worst case for the tracker),
//! and a realistic store where four in five advertisements carry someone else's payload under
//! our UUID or a random iBeacon (resolved and dropped).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

mod common;
use common::median;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storelink::presence::advert::{Advertisement, Payload};
use storelink::presence::identity::{self, PresenceKey};
use storelink::presence::pipeline::Recogniser;
use storelink::presence::walk;
use storelink::presence::zones::TrackerConfig;

/// mimalloc, as in the shipped binary, wrapped to count live heap bytes for the memory figure.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// Keeps `System` referenced for readers comparing with the default allocator.
#[allow(dead_code)]
static SYSTEM: System = System;

/// `cargo bench --bench presence -- [flags]`
#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value_t = 2_000_000)]
    adverts: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Consenting customers in the identity table.
    #[arg(long, default_value_t = 5_000)]
    customers: usize,
    /// Phones in the store.
    #[arg(long, default_value_t = 300)]
    phones: usize,
}

const ROTATION_S: u32 = 900;

fn customers(n: usize, rng: &mut StdRng) -> Vec<(Arc<str>, PresenceKey)> {
    (0..n)
        .map(|i| {
            let mut key = [0u8; 32];
            rng.fill(&mut key);
            (Arc::from(format!("c{i:06}")), key)
        })
        .collect()
}

fn tracker_config() -> TrackerConfig {
    let (_, zones) = walk::demo_store();
    TrackerConfig {
        zones,
        calibration: Default::default(),
        default_calibration: Default::default(),
        store_away_s: 60,
    }
}

/// A stream of advertisements: phones spread over the store's scanners, each heard about ten
/// times a second in all, RSSI around what 1-4 m gives. `foreign` of every five carry a payload
/// that is not a customer's.
fn adverts(
    args: &Args,
    keys: &[(Arc<str>, PresenceKey)],
    start: jiff::Timestamp,
    foreign: usize,
    rng: &mut StdRng,
) -> Vec<Advertisement> {
    let (layout, _) = walk::demo_store();
    let scanners: Vec<Arc<str>> = layout
        .scanners
        .iter()
        .map(|(s, _)| Arc::from(s.as_str()))
        .collect();
    let window = identity::window_of(start, ROTATION_S);
    let eids: Vec<[u8; 8]> = keys[..args.phones]
        .iter()
        .map(|(_, k)| identity::eid(k, window))
        .collect();
    // 300 phones at ten adverts/s each: 3,000 adverts per second of store time.
    let step_us = 1_000_000 / (args.phones as i64 * 10);
    (0..args.adverts)
        .map(|i| {
            let phone = i % args.phones;
            // Whole rounds of the 300 phones are foreign, so every phone is still seen.
            let payload = if (i / args.phones) % 5 < foreign {
                if rng.random_bool(0.5) {
                    Payload::Eid(rng.random())
                } else {
                    Payload::IBeacon(rng.random())
                }
            } else {
                Payload::Eid(eids[phone])
            };
            Advertisement {
                at: start + jiff::SignedDuration::from_micros(i as i64 * step_us),
                scanner: scanners[phone % scanners.len()].clone(),
                rssi: rng.random_range(-75..-50),
                tx_power: None,
                distance_m: None,
                payload,
            }
        })
        .collect()
}

fn run(args: &Args, keys: &[(Arc<str>, PresenceKey)], ads: &[Advertisement]) -> (f64, usize) {
    let start = ads[0].at;
    let mut r = Recogniser::new(keys.to_vec(), tracker_config(), ROTATION_S, start);
    let mut out = Vec::with_capacity(1024);
    let mut events = 0;
    let mut next_tick = start;
    let began = Instant::now();
    for ad in ads {
        r.handle(ad, &mut out);
        // The pipeline ticks every 250 ms of wall time; here, of store time.
        if ad.at >= next_tick {
            r.tick(ad.at, &mut out);
            next_tick = ad.at + jiff::SignedDuration::from_millis(250);
        }
        events += out.len();
        out.clear();
    }
    let secs = began.elapsed().as_secs_f64();
    assert_eq!(r.tracked(), args.phones.min(keys.len()));
    (ads.len() as f64 / secs, events)
}

fn main() {
    let args: Args = common::args();
    let mut rng = StdRng::seed_from_u64(42);
    let keys = customers(args.customers, &mut rng);
    let start: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();

    for (name, foreign) in [("all customers", 0), ("4 in 5 foreign", 4)] {
        let ads = adverts(&args, &keys, start, foreign, &mut rng);
        let mut rates = Vec::new();
        let mut events = 0;
        for _ in 0..args.runs {
            let (rate, n) = run(&args, &keys, &ads);
            rates.push(rate);
            events = n;
        }
        let shown: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "{name}: {:.0} adverts/s median over {} runs ({}), {} adverts, {} customers, {} phones, {} events",
            median(rates),
            args.runs,
            shown.join(" / "),
            ads.len(),
            args.customers,
            args.phones,
            events
        );
    }

    // Memory per tracked phone: the heap the tracker holds once every phone has been seen by
    // every scanner, divided by the phones. The identity table is measured separately, per
    // consenting customer.
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = Recogniser::new(keys.clone(), tracker_config(), ROTATION_S, start);
    let table = LIVE.load(Ordering::Relaxed) - before;
    let (layout, _) = walk::demo_store();
    let mut out = Vec::new();
    let window = identity::window_of(start, ROTATION_S);
    let ads: Vec<Advertisement> = (0..args.phones)
        .flat_map(|p| {
            let eid = identity::eid(&keys[p].1, window);
            layout.scanners.iter().map(move |(s, _)| Advertisement {
                at: start,
                scanner: Arc::from(s.as_str()),
                rssi: -60,
                tx_power: None,
                distance_m: None,
                payload: Payload::Eid(eid),
            })
        })
        .collect();
    let base = LIVE.load(Ordering::Relaxed);
    for ad in &ads {
        r.handle(ad, &mut out);
    }
    out.clear();
    out.shrink_to_fit();
    let tracked = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "memory: {} bytes per tracked phone ({} phones, {} scanners each); identity table {} bytes per consenting customer ({} customers)",
        tracked / args.phones as isize,
        args.phones,
        layout.scanners.len(),
        table / args.customers as isize,
        args.customers
    );
    drop(ads);
    drop(r);
}
