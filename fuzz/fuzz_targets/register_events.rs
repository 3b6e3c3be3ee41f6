//! Any bytes as a register event (`POST /pos/v1/events`), and as an audience expression.
//!
//! - A register event parses or is refused; one that parses is handled by a live offers
//!   service (a store with one customer and a campaign set) without panicking, and its answer
//!   names the lane it was about.
//! - An expression that compiles and that the typed fast path answers gets CEL's answer.
#![no_main]
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use storelink::clock::ManualClock;
use storelink::offers::audience::Audience;
use storelink::offers::campaign::Trigger;
use storelink::offers::decide::Occasion;
use storelink::offers::ledger::OfferLedger;
use storelink::offers::live::{Offers, RegisterEvent, Settings, Slot};
use storelink::profiles::kpi::{KpiConfig, Kpis, LedgerEntry};
use storelink::profiles::{Profile, ProfileStore};
use storelink::store::{Store, StoreOptions};

struct World {
    rt: tokio::runtime::Runtime,
    offers: Offers,
    _dir: tempfile::TempDir,
}

fn customer() -> Profile {
    let mut p = Profile::new("c1");
    p.first_name = Some("Ada".into());
    p.tier = Some("gold".into());
    p.points = 120;
    p.consents.personalised_offers = true;
    p.segments = vec!["gamer".into()];
    p.affinities.insert("games".into(), 0.7);
    p.cards = vec!["4000123".into()];
    p.version = 1;
    p
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let profiles = ProfileStore::open(&store).unwrap();
        profiles.upsert_many(vec![customer()], &[]).unwrap();
        let offers = Offers::open(
            Settings {
                store_id: "s1".into(),
                tz: jiff::tz::TimeZone::UTC,
                kpi: KpiConfig::default(),
                register_lanes: HashMap::from([("r1".to_string(), "1".to_string())]),
                prompt_ttl: Duration::from_secs(60),
                enabled: true,
            },
            Arc::new(ManualClock::new("2026-06-01T10:00:00Z".parse().unwrap())),
            profiles,
            OfferLedger::open(&store).unwrap(),
            storelink::occasions::Occasions::new(&store),
            None,
        )
        .unwrap();
        let set = serde_json::json!({"version": 1, "campaigns": [{
            "id": "card", "name": "card",
            "valid_from": "2026-01-01T00:00:00Z", "valid_until": "2027-01-01T00:00:00Z",
            "trigger": {"kind": "transaction_started"},
            "audience": "'gamer' in segments",
            "offers": [{"id": "o", "texts": {"cashier": {"en": "{first_name}: games -20%"}}}]
        }]});
        offers
            .install(Slot::File, &serde_json::to_vec(&set).unwrap())
            .unwrap();
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            offers,
            _dir: dir,
        }
    })
}

fn kpis() -> storelink::profiles::kpi::KpiView {
    let day = |d: &str| d.parse::<jiff::civil::Date>().unwrap();
    let ledger: Vec<LedgerEntry> = (0..6)
        .map(|i| LedgerEntry {
            day: day("2026-01-01") + jiff::Span::new().days(i * 30),
            amount: 2500,
            groups: vec!["games".into()],
            anchors: Vec::new(),
            main: Some("games".into()),
        })
        .collect();
    Kpis::compute(&ledger).view(day("2026-06-01"), &KpiConfig::default(), None, None)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<RegisterEvent>(data) {
        let w = world();
        if let Ok(effects) = w.rt.block_on(w.offers.on_register_event(event)) {
            assert!(!effects.lane.is_empty());
        }
    }
    if let Ok(expr) = std::str::from_utf8(data)
        && let Ok(audience) = Audience::compile(expr)
    {
        let p = customer();
        let k = kpis();
        let o = Occasion {
            triggers: vec![Trigger::StoreEntered],
            store: "s1".into(),
            zone: Some("games".into()),
            lane: Some("1".into()),
            at: "2026-06-01T10:00:00Z".parse().unwrap(),
            basket: None,
        };
        for kpi in [Some(&k), None] {
            if let Some(fast) = audience.fast(&p, kpi, &o) {
                assert_eq!(Some(fast), audience.cel_verdict(&p, kpi, &o), "{expr}");
            }
        }
    }
});
