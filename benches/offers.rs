//! Decision latency with 1,000 live campaigns (CEL audiences of the common shapes: segment
//! membership, KPI comparisons, follow-ups), for one customer with KPIs, and the time to
//! compile the set. The profile lookup is measured in the profiles bench and is not included.
//!
//! `cargo bench --bench offers [-- --campaigns N --decisions D]`

use std::time::{Duration, Instant};

use storelink::offers::campaign::{CampaignSet, CompiledSet, Trigger};
use storelink::offers::decide::{CapState, Occasion, decide};
use storelink::profiles::kpi::{KpiConfig, Kpis, LedgerEntry};
use storelink::profiles::{FollowUp, Item, Profile};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = arg("--campaigns", 1000);
    let decisions = arg("--decisions", 5000);
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
    let set: CampaignSet =
        serde_json::from_value(serde_json::json!({"version": 1, "campaigns": campaigns})).unwrap();
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
            groups: vec!["games".into()],
        })
        .collect();
    let view = Kpis::compute(&ledger).view(day("2026-11-23"), &KpiConfig::default(), None, None);
    let occasion = Occasion {
        triggers: vec![Trigger::StoreEntered],
        store: "s1".into(),
        zone: None,
        lane: None,
        at: "2026-11-23T10:00:00Z".parse().unwrap(),
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
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{n} campaigns ({} on this trigger); compile {:.0} ms",
        n / triggers.len(),
        compile.as_secs_f64() * 1000.0
    );
    println!(
        "decide: p50 {:.1} µs, p99 {:.1} µs, {:.0} decisions/s on one core ({chosen} offers chosen)",
        at(0.5).as_nanos() as f64 / 1000.0,
        at(0.99).as_nanos() as f64 / 1000.0,
        decisions as f64 / total.as_secs_f64()
    );
}
