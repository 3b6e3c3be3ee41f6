//! Decision latency with 1,000 live campaigns (CEL audiences of the common shapes: segment
//! membership, KPI comparisons, follow-ups), and the time to compile the set:
//!
//! - the pure decision, for one customer with KPIs (no store involved);
//! - the full path at 1,000,000 profiles in sled: a customer enters the store, and the agent
//!   looks the profile up, reads their KPIs and cap state, asks the learned follow-up model,
//!   checks the visit's lifecycle triggers (claimed only when a campaign fires on one; none
//!   of the bench's campaigns listens to them), decides, and records the decision
//!   (`Offers::on_presence`, as the agent runs it, without the uplink). The customers'
//!   histories have categories, so the follow-up model has pairs to look through.
//!
//! The pure decision has a learned follow-up and a basket in its context.
//!
//! `cargo bench --bench offers [-- --campaigns N --decisions D --profiles P]` (`--profiles 0`
//! skips the full path)

mod common;
#[path = "../tests/it/common/https.rs"]
mod https;

use common::quantile;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storelink::model::transaction::TransactionKind;
use storelink::offers::campaign::{CampaignSet, CompiledSet, Trigger};
use storelink::offers::decide::{CapState, Occasion, decide};
use storelink::offers::ledger::OfferLedger;
use storelink::offers::live::{Offers, Settings, Slot};
use storelink::presence::pipeline::PresenceEvent;
use storelink::presence::zones::PresenceKind;
use storelink::profiles::kpi::{KpiConfig, Kpis, LedgerEntry};
use storelink::profiles::{DEFAULT_CACHE_ENTRIES, FollowUp, Item, Profile, ProfileStore};
use storelink::store::{Store, StoreOptions};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `cargo bench --bench offers -- [flags]`
#[derive(clap::Parser)]
struct Args {
    /// Live campaigns in the set.
    #[arg(long, default_value_t = 1000)]
    campaigns: usize,
    /// Decisions timed in each part.
    #[arg(long, default_value_t = 5000)]
    decisions: usize,
    /// Profiles in sled for the full path; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    profiles: usize,
}

fn main() {
    let args: Args = common::args();
    let (n, decisions) = (args.campaigns, args.decisions);
    let audiences = [
        "'gamer' in segments",
        "kpi.frequency >= 3 && profile.tier == 'gold'",
        "profile.follow_ups.exists(f, has(f.if_bought.category) && f.if_bought.category == 'consoles')",
        "kpi.overdue || profile.points > 2000",
        "size(profile.segments) >= 2 && kpi.revenue_this_year > 50000",
    ];
    let triggers = [
        "store_entered",
        "zone_dwelling",
        "lane_arrived",
        "transaction_started",
    ];
    let campaigns: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let trigger = match triggers[i % triggers.len()] {
                "zone_dwelling" => serde_json::json!({"kind": "zone_dwelling", "zone": "games"}),
                t => serde_json::json!({"kind": t}),
            };
            serde_json::json!({
                "id": format!("c{i:04}"),
                "name": "bench",
                "valid_from": "2026-01-01T00:00:00Z",
                "valid_until": "2027-01-01T00:00:00Z",
                "trigger": trigger,
                "audience": audiences[i % audiences.len()],
                "offers": [{"id": "o", "texts": {"push": {"de": "Hallo {first_name}, -{points}"}, "cashier": {"de": "{first_name}: Angebot"}}}],
                "priority": (i % 7) as f64,
                "value": 100 + i,
                "caps": [{"max": 1, "per": "day"}],
                "holdout_bp": 1000
            })
        })
        .collect();
    let set_json = serde_json::json!({"version": 1, "campaigns": campaigns});
    let set: CampaignSet = serde_json::from_value(set_json.clone()).unwrap();
    let t = Instant::now();
    let compiled = CompiledSet::compile(set);
    let compile = t.elapsed();
    assert!(compiled.rejected.is_empty(), "{:?}", compiled.rejected);

    let mut p = Profile::new("c-bench");
    p.first_name = Some("Ada".into());
    p.tier = Some("gold".into());
    p.points = 2500;
    p.consents.personalised_offers = true;
    p.segments = vec!["gamer".into(), "family".into()];
    p.follow_ups = vec![FollowUp {
        if_bought: Item::Category("consoles".into()),
        suggest: Item::Category("games".into()),
        confidence: 0.5,
        lift: 2.0,
    }];
    let day = |d: &str| d.parse::<jiff::civil::Date>().unwrap();
    let ledger: Vec<LedgerEntry> = (0..20)
        .map(|i| LedgerEntry {
            day: day("2025-01-01") + jiff::Span::new().days(i * 20),
            amount: 4000 + i * 100,
            anchors: Vec::new(),
            main: None,
            groups: vec!["games".into()],
        })
        .collect();
    let mut view =
        Kpis::compute(&ledger).view(day("2026-11-23"), &KpiConfig::default(), None, None);
    // The learned follow-up and the basket just bought are in the context, as they are for a
    // recognised customer after a purchase.
    view.follow_up = Some(storelink::profiles::followups::Suggestion {
        if_bought: Item::Category("consoles".into()),
        suggest: Item::Category("games".into()),
        bought_on: day("2026-11-02"),
        days_ago: 21,
        confidence: 0.6,
        lift: 5.7,
    });
    let occasion = Occasion {
        triggers: vec![Trigger::StoreEntered],
        store: "s1".into(),
        zone: None,
        lane: None,
        at: "2026-11-23T10:00:00Z".parse().unwrap(),
        basket: Some(storelink::offers::decide::Basket {
            categories: vec!["consoles".into(), "games".into()],
            skus: vec!["PS5-DISC".into(), "G-1".into(), "G-2".into()],
            total: 61_997,
        }),
    };
    let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    let state = CapState::default();
    let mut samples: Vec<Duration> = Vec::with_capacity(decisions);
    let started = Instant::now();
    let mut chosen = 0;
    for i in 0..decisions {
        p.customer_id = format!("c{i}");
        let t = Instant::now();
        let d = decide(&compiled, &p, Some(&view), &occasion, &state, &tz);
        samples.push(t.elapsed());
        chosen += d.chosen.len();
    }
    let total = started.elapsed();
    let typed = compiled
        .live
        .iter()
        .filter(|c| c.audience.as_ref().is_some_and(|a| a.is_typed()))
        .count();
    println!(
        "{n} campaigns ({} on this trigger, {typed} with a typed audience); compile {:.0} ms",
        n / triggers.len(),
        compile.as_secs_f64() * 1000.0
    );
    let (p50, p99) = percentiles(samples);
    println!(
        "decide: p50 {p50:.1} µs, p99 {p99:.1} µs, {:.0} decisions/s on one core ({chosen} offers chosen)",
        decisions as f64 / total.as_secs_f64()
    );
    let profiles = args.profiles;
    if profiles > 0 {
        full_path(profiles, decisions, &serde_json::to_vec(&set_json).unwrap());
    }
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    let mut micros = |q: f64| quantile(&mut samples, q).as_nanos() as f64 / 1000.0;
    (micros(0.5), micros(0.99))
}

/// The agent's path for a store entry, at `n` profiles.
fn full_path(n: usize, decisions: usize, campaigns: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let profiles = ProfileStore::open_with(&store, DEFAULT_CACHE_ENTRIES).unwrap();
    let t = Instant::now();
    for start in (0..n).step_by(1000) {
        let page: Vec<Profile> = (start..(start + 1000).min(n))
            .map(|i| serde_json::from_value(https::synthetic_profile(i)).unwrap())
            .collect();
        profiles.upsert_many(page, &[]).unwrap();
    }
    store.flush_blocking().unwrap();
    println!(
        "full path: {n} profiles loaded in {:.0} s",
        t.elapsed().as_secs_f64()
    );

    // The customers who walk in: consenting ones (even ids; the others cost less, as no
    // campaign is evaluated for them), each with 5-20 purchase days of history, and half of
    // them with offers shown a week earlier, so their cap state has records to read.
    let mut rng = StdRng::seed_from_u64(7);
    let customers: Vec<String> = (0..decisions)
        .map(|_| format!("g{:07}", rng.random_range(0..n / 2) * 2))
        .collect();
    let mut register = storelink::sim::SimRegister::new("s1", "r1", None, 3);
    let mut seq = 0u64;
    let start: jiff::civil::Date = "2025-06-01".parse().unwrap();
    for c in &customers {
        let days = rng.random_range(5..=20);
        for d in 0..days {
            seq += 1;
            let mut tx = register.next("2026-06-01T10:00:00Z".parse().unwrap());
            tx.id = format!("s1:r1:{seq}");
            tx.loyalty_id = Some(c.clone());
            tx.business_day = start + jiff::Span::new().days(d * 25);
            tx.kind = TransactionKind::Sale;
            profiles.record_transaction(&tx).unwrap();
        }
    }
    let clock = std::sync::Arc::new(storelink::clock::ManualClock::new(
        "2026-11-16T10:00:00Z".parse().unwrap(),
    ));
    let offers = Offers::open(
        Settings {
            store_id: "s1".into(),
            tz: jiff::tz::TimeZone::get("Europe/Berlin").unwrap(),
            kpi: KpiConfig::default(),
            register_lanes: Default::default(),
            prompt_ttl: Duration::from_secs(60),
            enabled: true,
        },
        clock.clone(),
        profiles,
        OfferLedger::open(&store).unwrap(),
        storelink::occasions::Occasions::new(&store),
        None,
    )
    .unwrap();
    offers.install(Slot::File, campaigns).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let enter = |customer: &str, at: jiff::Timestamp| PresenceEvent {
        id: String::new(),
        customer_id: customer.into(),
        kind: PresenceKind::Entered,
        zone: None,
        lane: None,
        at,
        confidence: 1.0,
        distance_m: None,
    };
    rt.block_on(async {
        for c in customers.iter().step_by(2) {
            offers
                .on_presence(&enter(c, clock_now(&clock)))
                .await
                .unwrap();
        }
    });
    store.flush_blocking().unwrap();
    clock.set("2026-11-23T10:00:00Z".parse().unwrap());
    let mut samples = Vec::with_capacity(customers.len());
    let mut chosen = 0;
    let started = Instant::now();
    rt.block_on(async {
        for c in &customers {
            let ev = enter(c, clock_now(&clock));
            let t = Instant::now();
            let d = offers.on_presence(&ev).await.unwrap();
            samples.push(t.elapsed());
            chosen += d.map_or(0, |d| d.chosen.len());
        }
    });
    let total = started.elapsed();
    let (p50, p99) = percentiles(samples);
    println!(
        "full path (lookup, KPIs, cap state, decide, record), {} store entries: p50 {p50:.1} µs, p99 {p99:.1} µs, {:.0} decisions/s ({chosen} offers chosen)",
        customers.len(),
        customers.len() as f64 / total.as_secs_f64()
    );
}

fn clock_now(clock: &storelink::clock::ManualClock) -> jiff::Timestamp {
    use storelink::clock::Clock;
    clock.now()
}
