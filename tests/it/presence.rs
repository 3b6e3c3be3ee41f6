//! Presence end to end: a simulated walk, written as a replay file and played by the real
//! replay source into a running agent, arrives at central as the expected sequence of
//! `storelink.presence.v1` events; consent withdrawn mid-visit ends tracking at once.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{Central, TENANT_UUID, TestAgent, replay_presence_config, start_rumqttd};
use storelink::presence::advert::{Advertisement, Payload};
use storelink::presence::identity;
use storelink::presence::phones::{self, Phone};
use storelink::presence::walk::{self, SimConfig, Walk};
use storelink::profiles::{Profile, ProfileStore};
use storelink::store::{Store, StoreOptions};

fn tenant() -> uuid::Uuid {
    uuid::Uuid::parse_str(TENANT_UUID).unwrap()
}

/// Seeds consenting profiles for `phones` into the store at `dir` before the agent opens it.
fn seed(dir: &std::path::Path, phones: &[Phone]) {
    let store = Store::open(dir, &StoreOptions::default()).unwrap();
    let profiles = ProfileStore::open(&store).unwrap();
    for p in phones {
        let mut profile = Profile::new(p.customer_id.clone());
        profile.consents.presence = true;
        profile.presence_key = Some(p.key);
        profiles.upsert(profile).unwrap();
    }
    store.flush_blocking().unwrap();
}

/// One phone: in at the entrance, through the aisle, eight seconds at lane 2, out.
fn short_walk() -> Walk {
    let (layout, _) = walk::demo_store();
    let at = |name: &str| layout.position(name).expect("a demo-store scanner");
    let entrance = at("entrance");
    let aisle = at("aisle");
    let lane = at("lane-2");
    Walk {
        phone: 0,
        waypoints: vec![
            (0.0, entrance),
            (2.0, entrance),
            (5.0, aisle),
            (8.0, (lane.0, lane.1)),
            (16.0, (lane.0, lane.1)),
            (18.0, entrance),
            // Out of every scanner's range: the phone has left.
            (20.0, (entrance.0 - 60.0, entrance.1 - 60.0)),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_walk_reaches_central_as_the_expected_event_sequence() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/s042/events/presence").await;
    let dir = tempfile::tempdir().unwrap();
    let phones = phones::phones("walk", 1);
    seed(dir.path(), &phones);

    let (layout, _) = walk::demo_store();
    let start = jiff::Timestamp::now();
    let samples = walk::simulate(
        &layout,
        &[short_walk()],
        &SimConfig {
            sigma_db: 4.0,
            loss: 0.3,
            seed: 11,
            ..SimConfig::default()
        },
        start,
    );
    let file = dir.path().join("walk.jsonl");
    phones::write_replay(&file, &phones::adverts(&samples, &phones, &tenant(), 900)).unwrap();

    let agent = TestAgent::start_in(dir, broker, &[], &replay_presence_config(&file)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut events = loop {
        let events = central.of_type("storelink.presence.v1");
        if events
            .iter()
            .any(|e| e["data"]["zone"] == "store" && e["data"]["event"] == "left")
        {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no store-level left within 45 s: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    agent.stop().await;

    events.sort_by_key(|e| e["time"].as_str().unwrap().to_string());
    let seq: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["data"]["customer_id"], "walk-001");
            assert_eq!(e["source"], "/stores/s042");
            (
                e["data"]["zone"].as_str().unwrap().to_string(),
                e["data"]["event"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("store", "entered"),
        ("lane-2", "entered"),
        ("lane-2", "dwelling"),
        ("lane-2", "left"),
        ("store", "left"),
    ];
    // The expected events appear in this order; zones passed on the way may add their own.
    let mut it = seq.iter();
    for (zone, event) in expected {
        assert!(
            it.any(|(z, e)| z == zone && e == event),
            "{zone} {event} missing or out of order in {seq:?}"
        );
    }
    // No lane other than the one walked to.
    assert!(
        !seq.iter()
            .any(|(z, _)| z.starts_with("lane-") && z != "lane-2"),
        "{seq:?}"
    );
    // The lane zone's events carry its lane, for the cashier display.
    let lane_entered = events
        .iter()
        .find(|e| e["data"]["zone"] == "lane-2" && e["data"]["event"] == "entered")
        .unwrap();
    assert_eq!(lane_entered["data"]["lane"], "2");
    let confidence = lane_entered["data"]["confidence"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&confidence));
    // Ids are stable and unique per fact.
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_consent_ends_tracking_at_once_and_silently() {
    let broker = start_rumqttd();
    let dir = tempfile::tempdir().unwrap();
    let phones = phones::phones("consent", 1);
    seed(dir.path(), &phones);
    // The phone stands at lane 2 for 12 seconds, then is gone.
    let (layout, _) = walk::demo_store();
    let lane = layout
        .scanners
        .iter()
        .find(|(s, _)| s == "lane-2")
        .unwrap()
        .1;
    let stand = Walk {
        phone: 0,
        waypoints: vec![(0.0, lane), (12.0, lane)],
    };
    let samples = walk::simulate(
        &layout,
        &[stand],
        &SimConfig {
            sigma_db: 4.0,
            loss: 0.3,
            seed: 3,
            ..SimConfig::default()
        },
        jiff::Timestamp::now(),
    );
    let file = dir.path().join("stand.jsonl");
    phones::write_replay(&file, &phones::adverts(&samples, &phones, &tenant(), 900)).unwrap();
    let agent = TestAgent::start_in(dir, broker, &[], &replay_presence_config(&file)).await;
    let mut events = agent.presence.subscribe();
    let entered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.zone.as_deref() == Some("lane-2") {
                break e;
            }
        }
    })
    .await
    .expect("the phone is seen at lane 2");
    assert_eq!(&*entered.customer_id, "consent-001");

    // Consent goes away while the phone is still at the lane.
    let mut profile = agent.profiles.get("consent-001").unwrap().unwrap();
    profile.consents.presence = false;
    profile.version += 1;
    agent.profiles.upsert(profile).unwrap();
    assert_eq!(agent.profiles.presence_keys().unwrap(), vec![]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = agent.board.get("presence").unwrap();
    assert_eq!(
        status.detail.as_deref(),
        Some("0 customers recognisable, 0 present"),
        "{status:?}"
    );
    // The phone keeps advertising, then goes; no event follows, not even `left`, which would
    // have come by now (lane away_s 3, store_away_s 6).
    tokio::time::sleep(Duration::from_secs(16)).await;
    let mut after = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.at > entered.at + jiff::SignedDuration::from_secs(5) {
            after.push(e);
        }
    }
    assert_eq!(after, vec![], "nothing after consent was withdrawn");
    agent.stop().await;
}

/// The same walk, driven through the recogniser directly with time stepped in simulation:
/// every phone of the demo scenario gets the lane it walked to, in order, and no other.
#[test]
fn demo_walks_give_each_phone_its_lane_in_order() {
    use storelink::presence::pipeline::{Recogniser, tracker_config};
    use storelink::presence::zones::{Place, PresenceKind};

    let (layout, zones) = walk::demo_store();
    let walks = walk::demo_walks();
    let phones = phones::phones("demo", walks.len());
    let start: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
    let samples = walk::simulate(
        &layout,
        &walks,
        &SimConfig {
            sigma_db: 4.0,
            loss: 0.3,
            seed: 5,
            ..SimConfig::default()
        },
        start,
    );
    let section = storelink::config::PresenceSection {
        zones: zones.clone(),
        ..Default::default()
    };
    let mut r = Recogniser::new(
        phones
            .iter()
            .map(|p| (Arc::from(p.customer_id.as_str()), p.key))
            .collect(),
        tracker_config(&section),
        900,
        start,
    );
    let mut out = Vec::new();
    let mut next_tick = start;
    for s in &samples {
        while next_tick <= s.at {
            r.tick(next_tick, &mut out);
            next_tick += jiff::SignedDuration::from_millis(250);
        }
        let p = &phones[s.phone];
        r.handle(
            &Advertisement {
                at: s.at,
                scanner: Arc::from(&*s.scanner),
                rssi: s.rssi,
                tx_power: None,
                distance_m: None,
                payload: Payload::Eid(identity::eid(&p.key, identity::window_of(s.at, 900))),
            },
            &mut out,
        );
    }
    let end = samples.last().unwrap().at + jiff::SignedDuration::from_secs(120);
    while next_tick <= end {
        r.tick(next_tick, &mut out);
        next_tick += jiff::SignedDuration::from_millis(250);
    }
    assert_eq!(r.tracked(), 0, "everyone has left by the end");

    let truth = walk::ground_truth(&layout, &zones, &walks);
    for (i, phone) in phones.iter().enumerate() {
        let mine: Vec<_> = out
            .iter()
            .filter(|c| *c.customer == phone.customer_id)
            .collect();
        let lanes_truth: std::collections::BTreeSet<&str> = truth
            .iter()
            .filter(|(p, z, ..)| *p == i && zones.iter().any(|s| &s.name == z && s.lane.is_some()))
            .map(|(_, z, ..)| z.as_str())
            .collect();
        let lanes_seen: std::collections::BTreeSet<&str> = mine
            .iter()
            .filter_map(|c| match c.place {
                Place::Zone(z) if zones[z].lane.is_some() && c.kind == PresenceKind::Entered => {
                    Some(zones[z].name.as_str())
                }
                _ => None,
            })
            .collect();
        assert_eq!(lanes_seen, lanes_truth, "phone {i}");
        assert_eq!(
            mine.first().map(|c| (c.place, c.kind)),
            Some((Place::Store, PresenceKind::Entered))
        );
        assert_eq!(
            mine.last().map(|c| (c.place, c.kind)),
            Some((Place::Store, PresenceKind::Left))
        );
    }
}
