//! Profiles at scale: the full initial sync of N profiles (default 1,000,000) from a local
//! HTTPS server, peak RSS and disk used, then profile lookups (p50/p99/p99.9) with all N
//! cached in sled, by id and by card, cold (uniform over N) and hot (a few thousand regulars,
//! served by the in-memory cache), and the cost of the KPI update per loyalty transaction.
//!
//! `cargo bench --bench profiles [-- --profiles N --lookups L --page P]`
//!
//! The HTTPS server (tests/it/common/https.rs: rustls, rcgen certificates, gzip pages) runs in
//! this process on the same two cores and builds each page on demand, so the sync figure
//! includes central's side of the work and the RSS figure its page buffers.

mod common;
#[path = "../tests/it/common/https.rs"]
mod https;

use common::quantile;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storelink::model::transaction::TransactionKind;
use storelink::profiles::erasure::Eraser;
use storelink::profiles::sync::{self, Syncer};
use storelink::profiles::{DEFAULT_CACHE_ENTRIES, ProfileStore};
use storelink::store::{Store, StoreOptions};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `cargo bench --bench profiles -- [flags]`
#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    profiles: usize,
    #[arg(long, default_value_t = 200_000)]
    lookups: usize,
    /// Profiles per page of the initial sync.
    #[arg(long, default_value_t = 1000)]
    page: u32,
    #[arg(long, default_value_t = StoreOptions::default().cache_bytes >> 20)]
    sled_cache_mib: u64,
    /// Load through `upsert_many` directly, without HTTPS, to separate the two costs.
    #[arg(long)]
    direct: bool,
}

/// A `/proc/self/status` figure in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    Percentiles {
        p50: quantile(&mut v, 0.5),
        p99: quantile(&mut v, 0.99),
        p999: quantile(&mut v, 0.999),
    }
}

fn print(label: &str, p: &Percentiles) {
    println!(
        "{label:<44} p50 {:>7.2} µs   p99 {:>7.2} µs   p99.9 {:>7.2} µs",
        p.p50.as_nanos() as f64 / 1000.0,
        p.p99.as_nanos() as f64 / 1000.0,
        p.p999.as_nanos() as f64 / 1000.0
    );
}

fn time_lookups(n: usize, mut f: impl FnMut(usize)) -> Percentiles {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i);
        samples.push(t.elapsed());
    }
    percentiles(samples)
}

fn main() {
    let args: Args = common::args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(
        &data,
        &StoreOptions {
            cache_bytes: args.sled_cache_mib << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let profiles = ProfileStore::open_with(&store, DEFAULT_CACHE_ENTRIES).unwrap();
    let n = args.profiles;
    println!(
        "profiles: {n}, page size {}, sled cache {} MiB, profile cache {DEFAULT_CACHE_ENTRIES}",
        args.page, args.sled_cache_mib
    );

    // Full initial sync over HTTPS.
    let rss_before = status_kib("VmRSS:");
    let (elapsed, pages) = if args.direct {
        let started = Instant::now();
        let mut pages = 0;
        for start in (0..n).step_by(args.page as usize) {
            let page: Vec<storelink::profiles::Profile> = (start
                ..(start + args.page as usize).min(n))
                .map(|i| serde_json::from_value(https::synthetic_profile(i)).unwrap())
                .collect();
            profiles.upsert_many(page, &[]).unwrap();
            store.flush_blocking().unwrap();
            pages += 1;
        }
        (started.elapsed(), pages)
    } else {
        rt.block_on(async {
            let central = https::CentralHttps::start(https::Feed {
                generated: n,
                ..Default::default()
            })
            .await;
            let ca = central.pki.write_ca(dir.path());
            let syncer = Syncer {
                client: sync::client(&storelink::tls::TlsFiles {
                    ca_file: Some(&ca),
                    ..Default::default()
                })
                .unwrap(),
                base_url: central.base_url(),
                store_id: "s1".into(),
                token: None,
                page_size: args.page,
                store: store.clone(),
                eraser: Eraser {
                    profiles: profiles.clone(),
                    records: vec![
                        std::sync::Arc::new(
                            storelink::presence::history::History::open(&store, 30).unwrap(),
                        ),
                        std::sync::Arc::new(
                            storelink::offers::ledger::OfferLedger::open(&store).unwrap(),
                        ),
                    ],
                    store_id: "s1".into(),
                    clock: storelink::clock::system(),
                    ingest: None,
                },
            };
            let started = Instant::now();
            let report = syncer
                .sync(&CancellationToken::new(), |_| {})
                .await
                .unwrap();
            (started.elapsed(), report.pages)
        })
    };
    store.flush_blocking().unwrap();
    assert_eq!(profiles.len(), n, "every profile synced");
    let hwm = status_kib("VmHWM:");
    println!(
        "initial sync: {n} profiles in {pages} pages, {:.1} s ({:.0} profiles/s); RSS before {} MiB, peak {} MiB, after {} MiB",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        rss_before / 1024,
        hwm / 1024,
        status_kib("VmRSS:") / 1024
    );
    let disk = dir_size(&data);
    println!(
        "disk: {} MiB for {n} profiles = {:.1} MiB per 100,000 ({} bytes per profile)",
        disk >> 20,
        disk as f64 / (1 << 20) as f64 * 100_000.0 / n as f64,
        disk / n as u64
    );

    // Lookups with every profile in sled.
    let mut rng = StdRng::seed_from_u64(11);
    let ids: Vec<String> = (0..args.lookups)
        .map(|_| format!("g{:07}", rng.random_range(0..n)))
        .collect();
    for pass in ["first pass", "second pass"] {
        let cold = time_lookups(ids.len(), |i| {
            assert!(profiles.lookup(&ids[i]).unwrap().is_some());
        });
        print(&format!("lookup by id, uniform over all, {pass}"), &cold);
    }
    let cards: Vec<String> = (0..args.lookups)
        .map(|_| format!("9{:012}", rng.random_range(0..n)))
        .collect();
    let by_card = time_lookups(cards.len(), |i| {
        assert!(profiles.by_card(&cards[i]).unwrap().is_some());
    });
    print("lookup by card, uniform over all (cold)", &by_card);
    let regulars: Vec<String> = (0..5_000).map(|i| format!("g{:07}", i * 7 % n)).collect();
    for id in &regulars {
        profiles.lookup(id).unwrap();
    }
    let hot = time_lookups(args.lookups, |i| {
        assert!(
            profiles
                .lookup(&regulars[i % regulars.len()])
                .unwrap()
                .is_some()
        );
    });
    print("lookup by id, 5,000 regulars (cache hits)", &hot);
    let unknown = time_lookups(args.lookups, |i| {
        assert!(profiles.lookup(&format!("u{i}")).unwrap().is_none());
    });
    print("lookup of an unknown id", &unknown);
    println!("RSS after the lookups: {} MiB", status_kib("VmRSS:") / 1024);

    // KPI update per loyalty transaction: ledger of 0, 10 and 100 entries before it.
    let mut register = storelink::sim::SimRegister::new("s1", "r1", None, 3);
    let mut seq = 0u64;
    let mut kpi_cost = |customer: &str, day: jiff::civil::Date| {
        seq += 1;
        let mut tx = register.next("2026-06-01T10:00:00Z".parse().unwrap());
        tx.id = format!("s1:r1:{seq}");
        tx.loyalty_id = Some(customer.to_string());
        tx.business_day = day;
        tx.kind = TransactionKind::Sale;
        let t = Instant::now();
        assert!(profiles.record_transaction(&tx).unwrap());
        t.elapsed()
    };
    let base: jiff::civil::Date = "2024-01-01".parse().unwrap();
    for history in [0usize, 10, 100] {
        let mut samples = Vec::new();
        for c in 0..2_000 / (history + 1).max(1) + 200 {
            let customer = format!("g{:07}", (c * 131 + history * 17) % n);
            for d in 0..history {
                kpi_cost(&customer, base + jiff::Span::new().days(d as i64 * 3));
            }
            samples.push(kpi_cost(
                &customer,
                base + jiff::Span::new().days(history as i64 * 3 + 1),
            ));
        }
        print(
            &format!("KPI update, ledger of {history} before it"),
            &percentiles(samples),
        );
    }
}
