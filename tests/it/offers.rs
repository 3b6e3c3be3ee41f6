//! Offers end to end through a real broker and the agent's real interfaces: a campaign set
//! retained on the broker goes live; a loyalty card scanned at a till (`POST /pos/v1/events`)
//! answers with the prompt and the offer as effects and puts the prompt on the lane; the
//! purchase that follows over the register's TCP connection is attributed as one redemption
//! with its revenue and margin; campaign statistics show it; and the last good set survives a
//! restart with central unreachable. Campaign sets also come over HTTPS (real TLS, generated
//! certificates) with ETag and 304, and a bad body leaves the last good set in force.

use crate::common;
use crate::common::https;

use std::time::Duration;

use common::{Central, TestAgent, eventually, free_port, local, start_rumqttd};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};
use storelink::model::transaction::{Line, TransactionKind};
use storelink::sim::SimRegister;

fn campaign_set(version: u64) -> Value {
    common::games_campaign(
        version,
        json!({"de": "{first_name} ({tier}, {points} P.): -20% auf Spiele", "en": "{first_name}: 20% off games"}),
        json!({"value": 1500, "caps": [{"max": 1, "per": "day"}]}),
    )
}

fn line(sku: &str, category: &str, amount: i64, cost: Option<i64>) -> Line {
    serde_json::from_value(json!({
        "sku": sku,
        "category": category,
        "quantity": "1",
        "unit_price": amount,
        "amount": amount,
        "cost": cost,
    }))
    .unwrap()
}

async fn central(broker: std::net::SocketAddr) -> AsyncClient {
    let options = MqttOptions::new("central-offers", broker.ip().to_string(), broker.port());
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

async fn post_event(api: &str, body: Value) -> (reqwest::StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{api}/pos/v1/events"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_scan_gets_the_offer_and_the_purchase_is_attributed() {
    storelink::install_crypto_provider();
    let broker = start_rumqttd();
    let central = central(broker).await;
    // Retained before the agent exists: it arrives on subscribe, as after any reconnect.
    central
        .publish(
            "storelink/v1/acme/campaigns",
            QoS::AtLeastOnce,
            true,
            campaign_set(1).to_string(),
        )
        .await
        .unwrap();
    let events = Central::subscribe(broker, "storelink/v1/acme/s042/events/#").await;
    let agent = TestAgent::start(broker, &["lane-1"]).await;
    agent
        .profiles
        .upsert_many(vec![common::gamer()], &[])
        .unwrap();
    eventually(
        "the retained campaign set goes live",
        Duration::from_secs(10),
        || agent.offers.campaigns().version == 1,
    )
    .await;
    let api = agent.api();

    // The card is scanned at lane 1's register: the answer carries the prompt and the offer.
    let (status, effects) = post_event(
        &api,
        json!({"type": "customer_identified", "register": "lane-1", "loyalty_id": "9990001"}),
    )
    .await;
    assert_eq!(status, 200, "{effects}");
    assert_eq!(effects["lane"], "1");
    assert_eq!(effects["customer_known"], true);
    let prompt = &effects["prompt"];
    assert_eq!(prompt["first_name"], "Ada");
    assert_eq!(prompt["tier"], "gold");
    assert_eq!(prompt["points"], 420);
    assert_eq!(prompt["ask_for_card"], false, "the card was scanned");
    assert_eq!(
        prompt["offer"]["text"]["de"],
        "Ada (gold, 420 P.): -20% auf Spiele"
    );
    assert_eq!(effects["offers"][0]["code"], "GAMES20");
    // The same prompt is on the lane for the display.
    let on_lane: Value = common::get(format!("{api}/api/v1/lanes/1/prompt"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(on_lane["id"], prompt["id"]);
    // transaction_started for the same card in the same transaction decides nothing new.
    let (_, again) = post_event(
        &api,
        json!({"type": "transaction_started", "lane": "1", "loyalty_id": "9990001"}),
    )
    .await;
    assert_eq!(again["prompt"]["id"], prompt["id"]);

    // The purchase: a game (with cost) and milk; the game is the redemption.
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 9);
    let mut tx = register.next(storelink::clock::system().now());
    tx.kind = TransactionKind::Sale;
    tx.loyalty_id = Some("9990001".into());
    tx.lines = vec![
        line("G-1", "games", 5999, Some(4100)),
        line("M-1", "dairy", 149, None),
    ];
    tx.total = 6148;
    tx.tenders.clear();
    let mut client = agent.client(0).await;
    for _ in 0..2 {
        // Sent twice, as a register does after a lost acknowledgement.
        assert!(client.submit(&tx).await.unwrap().starts_with("ok "));
    }
    events
        .wait_for_ids("storelink.redemption.v1", 1, Duration::from_secs(10))
        .await;
    let r = &events.of_type("storelink.redemption.v1")[0]["data"];
    assert_eq!(r["campaign"], "games-at-till");
    assert_eq!(r["group"], "exposed");
    assert_eq!(r["customer_id"], "c77");
    assert_eq!(r["revenue"], 5999);
    assert_eq!(r["margin"], 5999 - 4100);
    assert_eq!(r["lines"].as_array().unwrap().len(), 1);
    events
        .wait_for_ids("storelink.offer.v1", 1, Duration::from_secs(5))
        .await;
    let offer = &events.of_type("storelink.offer.v1")[0]["data"];
    assert_eq!(offer["triggers"], json!(["transaction_started"]));
    assert_eq!(offer["offers"][0]["campaign"], "games-at-till");
    events
        .wait_for_ids("storelink.prompt.v1", 1, Duration::from_secs(5))
        .await;
    assert_eq!(
        events.of_type("storelink.prompt.v1")[0]["data"]["action"],
        "shown"
    );

    // The completed transaction clears the lane.
    eventually("the lane goes idle", Duration::from_secs(5), || {
        agent.offers.lane_prompt("1").is_none()
    })
    .await;
    let stats: Value = common::get(format!("{api}/api/v1/offers/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats[0]["campaign"], "games-at-till");
    assert_eq!(stats[0]["shown"], 1);
    assert_eq!(
        stats[0]["redeemed"], 1,
        "the duplicate was not counted again"
    );
    assert_eq!(stats[0]["revenue"], 5999);
    let metrics = common::get(format!("{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("storelink_campaign_redeemed{campaign=\"games-at-till\",variant=\"\"} 1"),
        "{metrics}"
    );

    // `storelink offers explain` now says the cap holds the campaign back.
    let out = tokio::task::spawn_blocking({
        let api = api.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_storelink"))
                .args([
                    "offers",
                    "explain",
                    "9990001",
                    "--trigger",
                    "transaction_started",
                    "--lane",
                    "1",
                    "--url",
                    &api,
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("games-at-till  frequency cap reached (1 per day)"),
        "{text}"
    );

    // A restart with central unreachable decides from the persisted set.
    let dir = agent.stop_keep().await;
    let offline = TestAgent::start_in(dir, local(free_port()), &["lane-1"], "").await;
    assert_eq!(offline.offers.campaigns().version, 1);
    assert_eq!(offline.offers.campaigns().live.len(), 1);
    offline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_events_are_checked_and_explained() {
    let agent = TestAgent::start(local(free_port()), &["lane-1"]).await;
    let api = agent.api();
    let (status, body) = post_event(&api, json!({"type": "customer_identified"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_event(
        &api,
        json!({"type": "customer_identified", "register": "nowhere", "loyalty_id": "1"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("nowhere"),
        "{body}"
    );
    // An unknown card still gets an answer, with no prompt and no offer.
    let (status, body) = post_event(
        &api,
        json!({"type": "customer_identified", "lane": "1", "loyalty_id": "unknown-card"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["customer_known"], false);
    assert!(body["prompt"].is_null() && body["offers"] == json!([]));
    let (status, _) = post_event(&api, json!({"type": "transaction_ended", "lane": "1"})).await;
    assert_eq!(status, 200);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_over_https_use_etags_and_a_bad_body_keeps_the_last_good_set() {
    use storelink::offers::live::{Installed, Offers, Settings};
    use storelink::offers::sync::CampaignSync;
    let central = https::CentralHttps::start(https::Feed {
        campaigns: Some(campaign_set(4).to_string().into_bytes()),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = central.pki.write_ca(dir.path());
    let store =
        storelink::store::Store::open(&dir.path().join("data"), &Default::default()).unwrap();
    let offers = Offers::open(
        Settings {
            store_id: "s042".into(),
            tz: jiff::tz::TimeZone::UTC,
            kpi: Default::default(),
            register_lanes: Default::default(),
            prompt_ttl: Duration::from_secs(60),
            enabled: true,
        },
        storelink::clock::system(),
        storelink::profiles::ProfileStore::open(&store).unwrap(),
        storelink::offers::ledger::OfferLedger::open(&store).unwrap(),
        storelink::occasions::Occasions::new(&store),
        None,
    )
    .unwrap();
    let sync = CampaignSync {
        client: storelink::profiles::sync::client(&storelink::tls::TlsFiles {
            ca_file: Some(&ca),
            ..Default::default()
        })
        .unwrap(),
        base_url: central.base_url(),
        store_id: "s042".into(),
        token: None,
        offers: offers.clone(),
    };
    assert!(matches!(
        sync.poll().await.unwrap(),
        Some(Installed::Live {
            version: 4,
            live: 1,
            ..
        })
    ));
    assert_eq!(sync.poll().await.unwrap(), None, "unchanged: 304");
    let requests = central.feed.lock().unwrap().campaign_requests.clone();
    assert_eq!(requests[0], (None, 200));
    assert_eq!(requests[1].1, 304);
    assert!(
        requests[1].0.is_some(),
        "the second asks with If-None-Match"
    );

    central.feed.lock().unwrap().campaigns = Some(b"{\"version\": 5, \"campaigns\": [tru".to_vec());
    let e = sync.poll().await.unwrap_err().to_string();
    assert!(e.contains("not a campaign set"), "{e}");
    assert!(e.contains("/v1/stores/s042/campaigns"), "{e}");
    assert_eq!(offers.campaigns().version, 4, "the last good set stays");

    central.feed.lock().unwrap().campaigns = Some(campaign_set(5).to_string().into_bytes());
    sync.poll().await.unwrap();
    assert_eq!(offers.campaigns().version, 5);
}
