//! A store's day through `storelink bridge`, end to end: the real agent binary, mosquitto
//! (persistent), a real PostgreSQL and the bridge. Loyalty customers get a campaign's offer
//! or are held out at the till, half of them buy the offered category, anonymous sales go on
//! in between; midway the agent is killed (SIGKILL) and started again on its data, the bridge
//! is stopped and started again, and the broker is restarted once.
//!
//! Every transaction the agent acknowledged is exactly once in `sales`, with the lines and
//! total the register sent; and docs/bi.md's uplift query gives what `storelink offers stats`
//! says at the store.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::postgres::{Postgres, require_postgres};
use common::process::{AgentProcess, write_config};
use common::{Mosquitto, free_port, require_external};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};
use storelink::bridge::config::BridgeConfig;
use storelink::model::transaction::Transaction;
use storelink::sim::{JsonlClient, SimRegister};

use crate::bridge::{all_in_sales, count, start_bridge};

const CUSTOMERS: usize = 24;

/// Half the customers held out: the uplift needs a control group.
fn campaigns() -> Value {
    common::games_campaign(
        1,
        json!({"en": "{first_name}: 20% off games"}),
        json!({"holdout_bp": 5000, "caps": [{"max": 1, "per": "day"}]}),
    )
}

fn profile(i: usize) -> Value {
    json!({
        "customer_id": format!("c{i}"),
        "version": 1,
        "first_name": format!("Kim{i}"),
        "cards": [format!("99900{i:02}")],
        "segments": ["gamers"],
        "consents": {"personalised_offers": true},
    })
}

async fn central(broker: std::net::SocketAddr) -> AsyncClient {
    let options = MqttOptions::new("central-day", "127.0.0.1", broker.port());
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

/// The agent binary, its local API and its register.
struct Store {
    agent: Option<AgentProcess>,
    config: std::path::PathBuf,
    api: String,
    register: std::net::SocketAddr,
}

impl Store {
    fn start(config: std::path::PathBuf, api: String, register: std::net::SocketAddr) -> Store {
        Store {
            agent: Some(AgentProcess::spawn(&config)),
            config,
            api,
            register,
        }
    }

    /// SIGKILL, then the same binary on the same config and data.
    async fn kill_and_restart(&mut self) {
        self.agent.take().expect("running").kill9();
        self.agent = Some(AgentProcess::spawn(&self.config));
        self.ready().await;
    }

    async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !common::get(format!("{}/readyz", self.api))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn register(&self) -> JsonlClient {
        JsonlClient::connect_patiently(self.register, Duration::from_secs(10))
            .await
            .unwrap()
    }

    async fn scan_card(&self, card: &str) -> Value {
        let r = reqwest::Client::new()
            .post(format!("{}/pos/v1/events", self.api))
            .json(&json!({"type": "customer_identified", "register": "lane-1", "loyalty_id": card}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "card scan: {}", r.status());
        r.json().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_with_offers_survives_an_agent_kill_a_bridge_restart_and_a_broker_restart() {
    let test = "bridge_day::a_day_with_offers_survives";
    if !require_external("mosquitto", test) || !require_postgres(test) {
        return;
    }
    storelink::install_crypto_provider();
    let pg = Postgres::start();
    let mut broker = Mosquitto::start_persistent();
    let db = pg.client().await;

    let bridge_text = format!(
        r#"
[broker]
url = "mqtt://{}"
client_id = "bridge-day"
shared = false

[postgres]
url = "{}"
batch_ms = 10
"#,
        broker.addr,
        pg.url()
    );
    let bridge_config = BridgeConfig::parse(&bridge_text, "bridge.toml", &HashMap::new()).unwrap();
    let mut bridge = Some(start_bridge(bridge_config.clone()).await);

    // Central: the campaign set (retained) and the customers' profiles.
    let c = central(broker.addr).await;
    c.publish(
        "storelink/v1/acme/campaigns",
        QoS::AtLeastOnce,
        true,
        campaigns().to_string(),
    )
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (api_port, register_port) = (free_port(), free_port());
    let config = write_config(
        dir.path(),
        &common::config_text(
            &dir.path().join("data"),
            broker.addr,
            api_port,
            &[("lane-1", register_port)],
        ),
    );
    let api = format!("http://127.0.0.1:{api_port}");
    let mut store = Store::start(config, api, common::local(register_port));
    store.ready().await;
    let profiles: Vec<Value> = (1..=CUSTOMERS).map(profile).collect();
    c.publish(
        "storelink/v1/acme/s042/profiles",
        QoS::AtLeastOnce,
        false,
        Value::Array(profiles).to_string(),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let known = common::get(format!("{}/api/v1/profiles/c{CUSTOMERS}", store.api))
            .await
            .is_ok_and(|r| r.status().is_success());
        let campaigns: Value = common::get(format!("{}/api/v1/offers/campaigns", store.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        if known && campaigns["version"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "profiles and campaigns did not arrive: {campaigns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut reg = SimRegister::new("s042", "lane-1", Some("1"), 17);
    let mut sent: BTreeMap<String, Transaction> = BTreeMap::new();
    let mut client = store.register().await;
    for i in 1..=CUSTOMERS {
        match i {
            // The agent dies mid-day, and comes back on its own data. A quiet moment first:
            // what the agent acknowledged is durable at once, but its offer statistics are a
            // cache in sled, written out every 500 ms (`store::BACKGROUND_FLUSH_MS`).
            9 => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(client);
                store.kill_and_restart().await;
                client = store.register().await;
            }
            // The bridge goes away for a while; the broker keeps its session.
            13 => {
                bridge.take().unwrap().stop().await;
            }
            17 => {
                bridge = Some(start_bridge(bridge_config.clone()).await);
            }
            // The broker restarts once.
            20 => {
                broker = broker.restart();
            }
            _ => {}
        }
        let card = format!("99900{i:02}");
        store.scan_card(&card).await;
        // Every other customer buys a game (a redemption, or a control's qualifying
        // purchase); the rest buy bread. An anonymous sale between customers.
        let category = if i % 2 == 0 { "games" } else { "bakery" };
        let tx = reg.purchase(jiff::Timestamp::now(), &card, Some(category));
        let reply = client.submit(&tx).await.unwrap();
        assert!(reply.starts_with("ok"), "{reply}");
        sent.insert(tx.id.clone(), tx);
        let tx = reg.next(jiff::Timestamp::now());
        if client.submit(&tx).await.unwrap().starts_with("ok") {
            sent.insert(tx.id.clone(), tx);
        }
    }

    // Everything acknowledged is in sales once, with what the register sent.
    all_in_sales(&db, &sent).await;
    let rows = db
        .query(
            "SELECT s.transaction_id, s.total, count(l.*),
                 coalesce(string_agg(l.sku || ':' || l.amount, ',' ORDER BY l.line), '')
             FROM storelink.sales s LEFT JOIN storelink.sales_lines l USING (transaction_id)
             GROUP BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    for r in rows {
        let id: String = r.get(0);
        let tx = &sent[&id];
        assert_eq!(r.get::<_, i64>(1), tx.total, "{id}: total");
        assert_eq!(r.get::<_, i64>(2), tx.lines.len() as i64, "{id}: lines");
        let lines: Vec<String> = tx
            .lines
            .iter()
            .map(|l| format!("{}:{}", l.sku, l.amount))
            .collect();
        assert_eq!(r.get::<_, String>(3), lines.join(","), "{id}: the lines");
    }

    // The store's campaign statistics, and the BI database's uplift query over the same day.
    let stats: Value = common::get(format!("{}/api/v1/offers/stats", store.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stats = stats
        .as_array()
        .and_then(|a| a.iter().find(|s| s["campaign"] == "games-at-till"))
        .cloned()
        .unwrap_or_else(|| panic!("no statistics for the campaign: {stats}"));
    let n = |k: &str| stats[k].as_i64().unwrap();
    assert!(n("shown") > 0 && n("controls") > 0, "both groups: {stats}");
    assert!(n("redeemed") > 0, "{stats}");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/bi.md")).unwrap();
    let uplift_sql = doc
        .split("```sql")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|q| q.contains("AS uplift"))
        .expect("docs/bi.md has the uplift query");
    // As it stands in the document, with its numeric uplift as a float for comparison.
    let uplift_sql = format!(
        "SELECT campaign, exposed, redeemed, control, control_purchases, uplift::float8 AS uplift
         FROM ({}) q",
        uplift_sql.trim().trim_end_matches(';')
    );
    // Events may still be on their way: the figures must meet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let row = loop {
        let rows = db.query(&uplift_sql, &[]).await.unwrap();
        let row = rows
            .iter()
            .find(|r| r.get::<_, String>("campaign") == "games-at-till")
            .map(|r| {
                (
                    r.get::<_, i64>("exposed"),
                    r.get::<_, i64>("redeemed"),
                    r.get::<_, i64>("control"),
                    r.get::<_, i64>("control_purchases"),
                    r.get::<_, f64>("uplift"),
                )
            });
        if let Some(row) = &row
            && (row.0, row.1, row.2, row.3)
                == (
                    n("shown"),
                    n("redeemed"),
                    n("controls"),
                    n("control_purchases"),
                )
        {
            break *row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the BI figures {row:?} never met the store's {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "the day: {} transactions; the store's statistics {stats}; the BI uplift row {row:?}",
        sent.len()
    );
    let store_uplift = stats["uplift"]["difference"].as_f64().unwrap();
    assert!(
        (row.4 - store_uplift).abs() < 1e-9,
        "uplift: BI {} against the store's {store_uplift}",
        row.4
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM storelink.dead_letters").await,
        0
    );

    bridge.take().unwrap().stop().await;
    drop(store);
    drop(broker);
}
