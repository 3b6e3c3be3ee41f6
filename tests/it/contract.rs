//! The written contract with central (`docs/asyncapi.yaml`, `docs/schemas/`) against what the
//! agent really sends: one running agent is driven to produce every event type it has
//! (transactions from three register formats, dead letters, status online and offline,
//! presence from a replayed walk, offers with a control decision, prompts shown by card and by
//! presence, redemptions exposed and control, customer snapshots, triggers and follow-ups,
//! erasure acknowledgements), and each event must match the schema of its type. Each schema
//! must also refuse broken variants of those real events, so the check can fail. Every other test's central runs the same check on whatever
//! it receives (`common::contract::check`).

use crate::common;

use std::time::Duration;

use common::contract;
use common::{
    Central, TENANT_UUID, TestAgent, eventually, local, replay_presence_config, start_rumqttd,
};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};
use storelink::events::EventKind;
use storelink::model::transaction::{Line, Tender, TransactionKind};
use storelink::presence::phones::{self, Phone};
use storelink::presence::walk::{self, SimConfig, Walk};
use storelink::profiles::{Profile, ProfileStore};
use storelink::sim::{JsonlClient, SimRegister};
use storelink::store::{Store, StoreOptions};

/// Data fields each schema may leave out (Rust `Option`s skipped when `None`, flags skipped
/// when false). Every other field of a real event must be required by its schema.
const OPTIONAL: &[(&str, &[&str])] = &[
    (
        "storelink.transaction.v1",
        &["lane", "sequence", "loyalty_id", "test"],
    ),
    ("storelink.presence.v1", &["lane", "distance_m"]),
    ("storelink.offer.v1", &["zone", "lane"]),
    // `campaign` and `offer` come together or not at all (a prompt without an offer).
    ("storelink.prompt.v1", &["variant"]),
    ("storelink.redemption.v1", &["variant", "margin"]),
    ("storelink.status.v1", &[]),
    ("storelink.deadletter.v1", &[]),
    ("storelink.erasure.v1", &["request_id"]),
    ("storelink.customer.v1", &[]),
    (
        "storelink.trigger.v1",
        &["group", "due", "days_overdue", "interval_days", "points"],
    ),
    ("storelink.followups.v1", &[]),
];

fn docs() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

#[test]
fn every_event_kind_has_a_schema_and_a_channel() {
    let asyncapi = std::fs::read_to_string(docs().join("asyncapi.yaml")).unwrap();
    assert!(asyncapi.starts_with("asyncapi: 3.0.0"), "AsyncAPI 3.0.0");
    assert_eq!(OPTIONAL.len(), EventKind::ALL.len());
    for kind in EventKind::ALL {
        let ty = kind.cloudevent_type();
        let file = contract::schema_file(kind);
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{ty} has no schema {}: {e}", file.display()));
        let schema: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{ty}"
        );
        assert_eq!(schema["title"], ty);
        assert_eq!(schema["properties"]["type"]["const"], ty);
        assert_eq!(schema["allOf"][0]["$ref"], "cloudevent.schema.json", "{ty}");
        assert!(
            OPTIONAL.iter().any(|(t, _)| *t == ty),
            "{ty} is missing from OPTIONAL"
        );
        // The AsyncAPI document points at the schema and has the topic.
        assert!(
            asyncapi.contains(&format!("./schemas/{ty}.schema.json")),
            "docs/asyncapi.yaml does not reference the schema of {ty}"
        );
        let topic = match kind {
            EventKind::Status => "'{prefix}/{store}/status'".to_string(),
            _ => format!("'{{prefix}}/{{store}}/events/{}'", kind.name()),
        };
        assert!(
            asyncapi.contains(&format!("address: {topic}")),
            "docs/asyncapi.yaml has no channel {topic}"
        );
    }
    // A type without a schema is a violation, not something to let through.
    let unknown = json!({"specversion": "1.0", "id": "x", "type": "storelink.unknown.v1"});
    assert!(contract::is_storelink_event(&unknown));
    let errors = contract::errors(&unknown);
    assert!(errors[0].contains("unknown event type"), "{errors:?}");
    assert!(std::panic::catch_unwind(|| contract::check(&unknown)).is_err());
    // What is not one of the agent's CloudEvents is not checked: scanner reports, downlink
    // messages, anything that is not JSON.
    for other in [
        json!({"id": "iBeacon:…", "rssi": -61, "distance": 1.2}),
        json!({"version": 7, "campaigns": []}),
        json!([{"customer_id": "c1", "version": 2}]),
        json!({"specversion": "1.0", "type": "com.example.other"}),
        Value::Null,
    ] {
        assert!(!contract::is_storelink_event(&other), "{other}");
        contract::check(&other);
    }
}

#[test]
fn downlink_examples_match_their_schemas_and_broken_ones_do_not() {
    let example: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/campaigns.example.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // The example is also what the agent's own parser accepts.
    let parsed: storelink::offers::campaign::CampaignSet =
        serde_json::from_value(example.clone()).unwrap();
    assert!(!parsed.campaigns.is_empty());
    let ok = |file: &str, v: &Value| {
        let errors = contract::errors_against(file, v);
        assert!(errors.is_empty(), "{file}: {errors:#?}\n{v:#}");
    };
    let bad = |file: &str, what: &str, v: &Value| {
        assert!(
            !contract::errors_against(file, v).is_empty(),
            "{file} accepts {what}: {v}"
        );
    };
    ok("downlink.campaigns.schema.json", &example);
    let mut broken = example.clone();
    broken["campaigns"][0]["colour"] = json!("red");
    bad(
        "downlink.campaigns.schema.json",
        "an unknown campaign key (the agent refuses the whole set)",
        &broken,
    );
    let mut broken = example.clone();
    broken["campaigns"][0]["value"] = json!(2.5);
    bad(
        "downlink.campaigns.schema.json",
        "value as a float",
        &broken,
    );
    let mut broken = example.clone();
    broken["campaigns"][0]["trigger"] = json!({"kind": "zone_dwelling"});
    bad(
        "downlink.campaigns.schema.json",
        "zone_dwelling without a zone",
        &broken,
    );

    // Profiles as docs/central.md shows them, one or a list; and what the agent serialises.
    let profile = json!({
        "customer_id": "4711", "version": 12, "cards": ["9990001"], "first_name": "Ada",
        "tier": "gold", "points": 420, "birthday": "02-29",
        "consents": {"personalised_offers": true, "presence": true, "marketing": false},
        "segments": ["gamers"], "affinities": {"games": 0.8},
        "follow_ups": [{"if_bought": {"category": "consoles"}, "suggest": {"sku": "G-1"},
                        "confidence": 0.4, "lift": 2.5}],
        "presence_key": "07".repeat(32)
    });
    let _: Profile = serde_json::from_value(profile.clone()).unwrap();
    ok("downlink.profiles.schema.json", &profile);
    ok(
        "downlink.profiles.schema.json",
        &json!([profile, {"customer_id": "0815"}]),
    );
    let mut ours = Profile::new("c1");
    ours.first_name = Some("Bo".into());
    ok(
        "downlink.profiles.schema.json",
        &serde_json::to_value(&ours).unwrap(),
    );
    bad(
        "downlink.profiles.schema.json",
        "a profile without customer_id",
        &json!({"version": 1}),
    );
    bad(
        "downlink.profiles.schema.json",
        "a short presence key",
        &json!({"customer_id": "1", "presence_key": "abcd"}),
    );

    let erasure = json!({"customer_id": "0815", "version": 3, "request_id": "er-2026-0042"});
    ok("downlink.erasures.schema.json", &erasure);
    ok(
        "downlink.erasures.schema.json",
        &json!([erasure, {"customer_id": "0816"}]),
    );
    bad(
        "downlink.erasures.schema.json",
        "a version as a string",
        &json!({"customer_id": "0815", "version": "3"}),
    );

    ok(
        "sync.profiles-page.schema.json",
        &json!({
            "profiles": [profile], "erased": [erasure], "next_cursor": "opaque", "has_more": true,
            "model": {"r": 0.24, "alpha": 4.41, "a": 0.79, "b": 2.43,
                      "p": 6.25, "q": 3.74, "gamma": 15.44, "unit_days": 7}
        }),
    );
    bad(
        "sync.profiles-page.schema.json",
        "a page without next_cursor",
        &json!({"profiles": []}),
    );
}

/// One phone: in at the entrance, a while at lane 2, out of range.
fn walk_to_lane_2() -> Walk {
    let (layout, _) = walk::demo_store();
    let at = |name: &str| layout.position(name).expect("a demo-store scanner");
    let (entrance, lane) = (at("entrance"), at("lane-2"));
    Walk {
        phone: 0,
        waypoints: vec![
            (0.0, entrance),
            (2.0, entrance),
            (6.0, lane),
            (13.0, lane),
            (15.0, entrance),
            (17.0, (entrance.0 - 60.0, entrance.1 - 60.0)),
        ],
    }
}

/// Two campaigns on a card scanned at the till: an A/B cashier offer on games, and a push
/// offer on dairy that holds everyone back as control.
fn campaign_set() -> Value {
    json!({
        "version": 1,
        "campaigns": [
            {
                "id": "games-at-till",
                "name": "Games for gamers, at the till (A/B)",
                "valid_from": "2020-01-01T00:00:00Z",
                "valid_until": "2100-01-01T00:00:00Z",
                "trigger": {"kind": "transaction_started"},
                "audience": "'gamers' in segments",
                "offers": [
                    {"id": "games-20", "texts": {"cashier": {"en": "{first_name}: 20% off games"}},
                     "code": "GAMES20", "items": [{"category": "games"}]},
                    {"id": "games-2for1", "texts": {"cashier": {"en": "{first_name}: 2 for 1 on games"}},
                     "barcode": "4000000000017", "items": [{"category": "games"}]}
                ],
                "variants": [
                    {"id": "A", "weight": 50, "offer": "games-20"},
                    {"id": "B", "weight": 50, "offer": "games-2for1"}
                ],
                "value": 1500,
                "caps": [{"max": 1, "per": "day"}]
            },
            {
                "id": "milk-control",
                "name": "Milk push, everyone held back",
                "valid_from": "2020-01-01T00:00:00Z",
                "valid_until": "2100-01-01T00:00:00Z",
                "trigger": {"kind": "transaction_started"},
                "offers": [{"id": "milk-10", "texts": {"push": {"en": "10% off milk"}},
                            "items": [{"category": "dairy"}]}],
                "value": 50,
                "holdout_bp": 10000
            }
        ]
    })
}

/// Seeds the gamer (card 9990001) and the phone's customer into the store at `dir` before
/// the agent opens it. The phone's customer consents to presence only: a prompt greets them
/// at the lane, with no offer.
fn seed(dir: &std::path::Path, phone: &Phone) {
    let store = Store::open(dir, &StoreOptions::default()).unwrap();
    let profiles = ProfileStore::open(&store).unwrap();
    let mut gamer = Profile::new("c77");
    gamer.first_name = Some("Ada".into());
    gamer.cards = vec!["9990001".into()];
    gamer.consents.personalised_offers = true;
    gamer.consents.marketing = true;
    gamer.segments = vec!["gamers".into()];
    gamer.version = 3;
    profiles.upsert(gamer).unwrap();
    let mut walker = Profile::new(phone.customer_id.clone());
    walker.first_name = Some("Grace".into());
    walker.consents.presence = true;
    walker.presence_key = Some(phone.key);
    walker.version = 1;
    profiles.upsert(walker).unwrap();
    store.flush_blocking().unwrap();
}

fn line(sku: &str, category: &str, amount: i64, cost: Option<i64>) -> Line {
    serde_json::from_value(json!({
        "sku": sku, "category": category, "quantity": "1",
        "unit_price": amount, "amount": amount, "cost": cost,
    }))
    .unwrap()
}

async fn post(url: String, body: Option<Value>) -> (reqwest::StatusCode, Value) {
    let client = reqwest::Client::new();
    let request = match body {
        Some(b) => client.post(url).json(&b),
        None => client.post(url),
    };
    let r = request.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn connect(addr: std::net::SocketAddr) -> JsonlClient {
    JsonlClient::connect_patiently(addr, Duration::from_secs(5))
        .await
        .unwrap()
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_sends_every_event_type_as_its_schema_says() {
    storelink::install_crypto_provider();
    let broker = start_rumqttd();
    let publisher = {
        let options = MqttOptions::new("central-contract", broker.ip().to_string(), broker.port());
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        client
    };
    publisher
        .publish(
            "storelink/v1/acme/campaigns",
            QoS::AtLeastOnce,
            true,
            campaign_set().to_string(),
        )
        .await
        .unwrap();
    // Everything of the tenant: status, events, and the downlink messages central itself
    // publishes (which the contract check lets through as not being CloudEvents).
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;

    let dir = tempfile::tempdir().unwrap();
    let phone = phones::phones("walk", 1).remove(0);
    seed(dir.path(), &phone);
    let (layout, _) = walk::demo_store();
    let samples = walk::simulate(
        &layout,
        &[walk_to_lane_2()],
        &SimConfig {
            sigma_db: 4.0,
            loss: 0.3,
            seed: 11,
            ..SimConfig::default()
        },
        jiff::Timestamp::now(),
    );
    let replay = dir.path().join("walk.jsonl");
    let tenant = uuid::Uuid::parse_str(TENANT_UUID).unwrap();
    phones::write_replay(
        &replay,
        &phones::adverts(&samples, std::slice::from_ref(&phone), &tenant, 900),
    )
    .unwrap();
    let (poslog_port, receipt_port) = (common::free_port(), common::free_port());
    let extra = format!(
        r#"{}
[[registers]]
name = "pos-3"
lane = "3"
format = "poslog"
transport = {{ kind = "tcp-listen", bind = "127.0.0.1:{poslog_port}" }}

[[registers]]
name = "printer-4"
format = "receipt"
template = "{}/config/receipts/supermarket.toml"
transport = {{ kind = "tcp-listen", bind = "127.0.0.1:{receipt_port}" }}

[signals.followups]
min_customers = 1
"#,
        replay_presence_config(&replay),
        env!("CARGO_MANIFEST_DIR"),
    );
    let agent = TestAgent::start_in(dir, broker, &["lane-1"], &extra).await;
    let api = agent.api();

    // Status: the retained birth message.
    central
        .wait_for_ids("storelink.status.v1", 1, Duration::from_secs(10))
        .await;
    eventually(
        "the retained campaign set goes live",
        Duration::from_secs(10),
        || agent.offers.campaigns().version == 1 && agent.offers.campaigns().live.len() == 2,
    )
    .await;

    // Transactions in all three formats, and what is not one: dead letters.
    let mut lane1 = agent.client(0).await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 5);
    let now = storelink::clock::system().now();
    let plain = register.next(now);
    assert!(lane1.submit(&plain).await.unwrap().starts_with("ok "));
    // A smoke-test return without a sequence (so its id is a content hash), with a weighed
    // line (unit, GTIN, discount, cost) and a voided one.
    let mut odd = register.next(now);
    odd.kind = TransactionKind::Return;
    odd.sequence = None;
    odd.loyalty_id = None;
    odd.lane = None;
    odd.test = true;
    let mut weighed = line("2000532", "cheese", 1064, Some(700));
    weighed.gtin = Some("2000532000007".into());
    weighed.description = "Bergkäse \"alt\"".into();
    weighed.quantity = "0.532".parse().unwrap();
    weighed.unit = Some("kg".into());
    weighed.unit_price = 2000;
    weighed.discount = 64;
    let mut voided = line("V-1", "snacks", 199, None);
    voided.voided = true;
    odd.lines = vec![weighed, voided];
    odd.total = odd.lines_total();
    odd.tenders = vec![Tender {
        kind: "cash".into(),
        amount: odd.total,
    }];
    assert!(lane1.submit(&odd).await.unwrap().starts_with("ok "));
    for garbage in [&b"this is not json\n"[..], b"\xff\xfe\x00garbage\n"] {
        lane1.send_raw(garbage).await.unwrap();
        assert!(lane1.reply().await.unwrap().starts_with("err "));
    }
    let mut pos3 = connect(local(poslog_port)).await;
    for doc in ["poslog/loyalty.xml", "poslog/weighted.xml"] {
        pos3.send_raw(&fixture(doc)).await.unwrap();
        pos3.send_raw(b"\n").await.unwrap();
        let reply = pos3.reply().await.unwrap();
        assert!(reply.starts_with("ok "), "{doc}: {reply}");
    }
    let mut printer = connect(local(receipt_port)).await;
    printer
        .send_raw(&fixture("receipts/supermarket_sale.bin"))
        .await
        .unwrap();
    let reply = printer.reply().await.unwrap();
    assert!(reply.starts_with("ok "), "receipt: {reply}");

    // Offers: the card scanned at lane 1 decides (an exposed A/B offer and a control), and
    // the cashier accepts the prompt.
    let (status, effects) = post(
        format!("{api}/pos/v1/events"),
        Some(json!({"type": "customer_identified", "register": "lane-1", "loyalty_id": "9990001"})),
    )
    .await;
    assert_eq!(status, 200, "{effects}");
    let prompt_id = effects["prompt"]["id"].as_str().unwrap().to_string();
    let (status, body) = post(
        format!("{api}/api/v1/lanes/1/prompts/{prompt_id}/accepted"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The purchase redeems both: games (exposed, with margin) and milk (control, no cost).
    let mut buy = register.next(storelink::clock::system().now());
    buy.kind = TransactionKind::Sale;
    buy.loyalty_id = Some("9990001".into());
    buy.lines = vec![
        line("G-1", "games", 5999, Some(4100)),
        line("M-1", "dairy", 149, None),
    ];
    buy.total = buy.lines_total();
    buy.tenders = vec![Tender {
        kind: "card".into(),
        amount: buy.total,
    }];
    assert!(lane1.submit(&buy).await.unwrap().starts_with("ok "));
    central
        .wait_for_ids("storelink.redemption.v1", 2, Duration::from_secs(10))
        .await;

    // Customer signals: the gamer consents to marketing, so their snapshot and welcome
    // follow the purchases, and the daily run sends the store's follow-ups (games and dairy
    // in one basket are a pair).
    let signals = agent.signals.clone();
    tokio::task::spawn_blocking(move || {
        signals.flush().unwrap();
        signals.daily_run().unwrap();
    })
    .await
    .unwrap();
    for ty in [
        "storelink.customer.v1",
        "storelink.trigger.v1",
        "storelink.followups.v1",
    ] {
        central.wait_for_ids(ty, 1, Duration::from_secs(10)).await;
    }

    // Erasures: one the store knew, with a request id, and one it never knew, without.
    publisher
        .publish(
            "storelink/v1/acme/erasures",
            QoS::AtLeastOnce,
            false,
            json!([
                {"customer_id": "c77", "version": 9, "request_id": "er-2026-0042"},
                {"customer_id": "never-seen", "version": 1}
            ])
            .to_string(),
        )
        .await
        .unwrap();
    central
        .wait_for_ids("storelink.erasure.v1", 2, Duration::from_secs(10))
        .await;

    // Presence: the walk ends with the store left; on the way the phone's customer was
    // greeted at lane 2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let presence = central.of_type("storelink.presence.v1");
        let left = presence
            .iter()
            .any(|e| e["data"]["zone"] == "store" && e["data"]["event"] == "left");
        let greeted = central
            .of_type("storelink.prompt.v1")
            .iter()
            .any(|e| e["data"]["recognised"] == "presence");
        if left && greeted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no store-level left and presence prompt within 60 s: {presence:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Status: the goodbye on a graceful stop.
    agent.stop().await;
    eventually("the offline status", Duration::from_secs(10), || {
        central
            .of_type("storelink.status.v1")
            .iter()
            .any(|e| e["data"]["state"] == "offline")
    })
    .await;

    let received: Vec<Value> = central
        .all()
        .into_iter()
        .map(|r| r.event)
        .filter(contract::is_storelink_event)
        .collect();
    let missing: Vec<&str> = EventKind::ALL
        .iter()
        .map(|k| k.cloudevent_type())
        .filter(|t| !received.iter().any(|e| e["type"] == *t))
        .collect();
    assert!(missing.is_empty(), "never received: {missing:?}");
    for event in &received {
        let errors = contract::errors(event);
        assert!(errors.is_empty(), "{errors:#?}\n{event:#}");
    }
    // The variety the schemas must cover really arrived.
    let of = |t: &str| -> Vec<&Value> { received.iter().filter(|e| e["type"] == t).collect() };
    let formats: std::collections::BTreeSet<&str> = of("storelink.transaction.v1")
        .iter()
        .filter_map(|e| e["data"]["source_format"].as_str())
        .collect();
    assert_eq!(formats, ["jsonl", "poslog", "receipt"].into());
    assert!(
        of("storelink.transaction.v1")
            .iter()
            .any(|e| e["data"]["test"] == true && e["data"].get("sequence").is_none())
    );
    let groups: std::collections::BTreeSet<&str> = of("storelink.redemption.v1")
        .iter()
        .filter_map(|e| e["data"]["group"].as_str())
        .collect();
    assert_eq!(groups, ["control", "exposed"].into());
    assert!(of("storelink.offer.v1").iter().any(|e| {
        e["data"]["controls"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    }));
    let actions: std::collections::BTreeSet<&str> = of("storelink.prompt.v1")
        .iter()
        .filter_map(|e| e["data"]["action"].as_str())
        .collect();
    assert!(
        actions.contains("shown") && actions.contains("accepted"),
        "{actions:?}"
    );
    assert!(
        of("storelink.erasure.v1")
            .iter()
            .any(|e| e["data"].get("request_id").is_none())
    );
    let presence = of("storelink.presence.v1");
    assert!(presence.iter().any(|e| e["data"].get("lane").is_some()));
    assert!(
        presence
            .iter()
            .any(|e| e["data"].get("distance_m").is_some())
    );
    assert!(
        of("storelink.prompt.v1")
            .iter()
            .any(|e| e["data"].get("campaign").is_none()),
        "a prompt without an offer (the presence greeting)"
    );
    let states: std::collections::BTreeSet<&str> = of("storelink.status.v1")
        .iter()
        .filter_map(|e| e["data"]["state"].as_str())
        .collect();
    assert_eq!(states, ["offline", "online"].into());

    // Each schema refuses what breaks the contract.
    for event in &received {
        must_refuse_broken_variants(event);
    }
    for kind in EventKind::ALL {
        // The fullest event of each type, so every mutation has something to break.
        let events = of(kind.cloudevent_type());
        let fullest = events
            .iter()
            .max_by_key(|e| e["data"].to_string().len())
            .unwrap();
        must_refuse_specific_breakage(kind, fullest);
    }
}

/// Breakage that applies to every event: a missing envelope attribute, an extra one, a
/// missing required data field, an extra data field, the data of another type.
fn must_refuse_broken_variants(event: &Value) {
    let ty = event["type"].as_str().unwrap();
    let refuses = |what: &str, broken: &Value| {
        assert!(
            !contract::errors(broken).is_empty(),
            "the {ty} schema accepts {what}: {broken}"
        );
    };
    for attribute in [
        "specversion",
        "id",
        "source",
        "time",
        "datacontenttype",
        "data",
    ] {
        let mut broken = event.clone();
        broken.as_object_mut().unwrap().remove(attribute);
        refuses(&format!("an event without `{attribute}`"), &broken);
    }
    let mut broken = event.clone();
    broken["partitionkey"] = json!("s042");
    refuses("an unknown envelope attribute", &broken);
    let mut broken = event.clone();
    broken["time"] = json!("2026-11-22 10:00");
    refuses("a time that is not RFC 3339", &broken);
    let mut broken = event.clone();
    broken["source"] = json!("s042");
    refuses("a source that is not /stores/{store}", &broken);

    let optional = OPTIONAL.iter().find(|(t, _)| *t == ty).unwrap().1;
    for field in event["data"].as_object().unwrap().keys() {
        let mut broken = event.clone();
        broken["data"].as_object_mut().unwrap().remove(field);
        if contract::errors(&broken).is_empty() {
            assert!(
                optional.contains(&field.as_str()),
                "the {ty} schema does not require data.{field}, which the agent always sends \
                 (or add it to OPTIONAL if the code may leave it out)"
            );
        }
    }
    let mut broken = event.clone();
    broken["data"]["surprise"] = json!(1);
    refuses("an unknown data field", &broken);
    for other in EventKind::ALL {
        if other.cloudevent_type() != ty {
            let mut broken = event.clone();
            broken["type"] = json!(other.cloudevent_type());
            refuses(&format!("its data as {}", other.cloudevent_type()), &broken);
        }
    }
}

/// Breakage specific to each type: money as a float, a value outside an enum, a broken id.
fn must_refuse_specific_breakage(kind: EventKind, event: &Value) {
    let ty = kind.cloudevent_type();
    let refuses = |what: &str, mutate: &dyn Fn(&mut Value)| {
        let mut broken = event.clone();
        mutate(&mut broken);
        assert!(
            !contract::errors(&broken).is_empty(),
            "the {ty} schema accepts {what}: {broken}"
        );
    };
    match kind {
        EventKind::Transaction => {
            refuses("a total as a float", &|e| e["data"]["total"] = json!(12.5));
            refuses("a line amount as a float", &|e| {
                e["data"]["lines"][0]["amount"] = json!(1.99)
            });
            refuses("a quantity as a number", &|e| {
                e["data"]["lines"][0]["quantity"] = json!(0.5)
            });
            refuses("an unknown kind", &|e| e["data"]["kind"] = json!("refund"));
            refuses("a currency that is not ISO 4217", &|e| {
                e["data"]["currency"] = json!("euro")
            });
            refuses("an id that is not store:register:day:seq", &|e| {
                e["id"] = json!("tx-1")
            });
            refuses("test: false (absent instead)", &|e| {
                e["data"]["test"] = json!(false)
            });
        }
        EventKind::DeadLetter => {
            refuses("raw that is not base64", &|e| {
                e["data"]["raw"] = json!("not base64!")
            });
            refuses("a negative raw_len", &|e| e["data"]["raw_len"] = json!(-1));
            refuses("truncated as a string", &|e| {
                e["data"]["truncated"] = json!("no")
            });
        }
        EventKind::Presence => {
            refuses("a confidence above 1", &|e| {
                e["data"]["confidence"] = json!(1.5)
            });
            refuses("an unknown event", &|e| {
                e["data"]["event"] = json!("arrived")
            });
            refuses("a null lane", &|e| e["data"]["lane"] = Value::Null);
        }
        EventKind::Offer => {
            refuses("no offer and no control", &|e| {
                e["data"]["offers"] = json!([]);
                e["data"]["controls"] = json!([]);
            });
            refuses("an unknown trigger", &|e| {
                e["data"]["triggers"] = json!(["whenever"])
            });
            refuses("a score as a string", &|e| {
                if let Some(o) = e["data"]["offers"].get_mut(0) {
                    o["score"] = json!("high");
                } else {
                    e["data"]["controls"][0]["campaign"] = json!(7);
                }
            });
        }
        EventKind::Prompt => {
            refuses("an unknown action", &|e| {
                e["data"]["action"] = json!("clicked")
            });
            refuses("ask_for_card after a card was scanned", &|e| {
                e["data"]["ask_for_card"] = json!(true);
                e["data"]["recognised"] = json!("card");
            });
            refuses("an offer without its campaign", &|e| {
                e["data"].as_object_mut().unwrap().remove("campaign");
                e["data"]["offer"] = json!("games-20");
            });
        }
        EventKind::Redemption => {
            refuses("revenue as a float", &|e| {
                e["data"]["revenue"] = json!(59.99)
            });
            refuses("revenue as a string", &|e| {
                e["data"]["revenue"] = json!("5999")
            });
            refuses("an unknown group", &|e| {
                e["data"]["group"] = json!("treatment")
            });
            refuses("no qualifying lines", &|e| e["data"]["lines"] = json!([]));
        }
        EventKind::Status => {
            refuses("an unknown state", &|e| e["data"]["state"] = json!("away"));
            refuses("started_at as a number", &|e| {
                e["data"]["started_at"] = json!(1_700_000_000)
            });
        }
        EventKind::Erasure => {
            refuses("the customer id instead of its hash", &|e| {
                e["data"]["customer_ref"] = json!("c77")
            });
            refuses("a count as a float", &|e| {
                e["data"]["profile_records"] = json!(1.5)
            });
            refuses("a negative version", &|e| e["data"]["version"] = json!(-1));
        }
        EventKind::Customer => {
            refuses("revenue as a float", &|e| {
                e["data"]["revenue_12m"] = json!(120.5)
            });
            refuses("an unknown activity class", &|e| {
                e["data"]["activity"] = json!("dormant")
            });
            refuses("an RFM score of 6", &|e| {
                e["data"]["rfm"] = json!({"r": 6, "f": 1, "m": 1})
            });
            refuses("a day that is not a date", &|e| {
                e["data"]["as_of"] = json!("yesterday")
            });
        }
        EventKind::Trigger => {
            refuses("an unknown trigger", &|e| {
                e["data"]["trigger"] = json!("whenever")
            });
            refuses("days overdue as a string", &|e| {
                e["data"]["days_overdue"] = json!("16")
            });
            refuses("an unknown detection", &|e| {
                e["data"]["detected"] = json!("guess")
            });
        }
        EventKind::FollowUps => {
            refuses("a lift as a string", &|e| {
                e["data"]["pairs"][0]["lift"] = json!("high")
            });
            refuses("a confidence above 1", &|e| {
                e["data"]["pairs"][0]["confidence"] = json!(1.5)
            });
            refuses("no window", &|e| {
                e["data"].as_object_mut().unwrap().remove("window_days");
            });
        }
    }
}
