//! `storelink bridge` end to end: a running agent publishes to mosquitto, the bridge writes
//! into a real PostgreSQL. The bridge is stopped mid-run (the broker keeps its session), the
//! broker is restarted once, a schema violation is published among the events: every
//! transaction the agent acknowledged is exactly once in `sales`, with the lines and total the
//! register sent, and the bad event is a dead letter with its bytes.
//!
//! Needs mosquitto and PostgreSQL: skipped loudly without them, failed under
//! `STORELINK_REQUIRE_EXTERNAL=1`.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::postgres::{Postgres, require_postgres};
use common::{Mosquitto, TestAgent, require_external};
use storelink::bridge::config::BridgeConfig;
use storelink::model::transaction::Transaction;
use storelink::sim::SimRegister;
use tokio_util::sync::CancellationToken;

/// A bridge's config; `shared` subscribes through the group `bi`.
pub(crate) fn bridge_config(
    broker: std::net::SocketAddr,
    pg: &Postgres,
    client_id: &str,
    shared: bool,
) -> BridgeConfig {
    let text = format!(
        r#"
[broker]
url = "mqtt://{broker}"
client_id = "{client_id}"
group = "bi"
shared = {shared}

[postgres]
url = "{}"
batch_max = 200
batch_ms = 10
"#,
        pg.url()
    );
    BridgeConfig::parse(&text, "bridge.toml", &HashMap::new()).unwrap()
}

/// Publishes each (topic, bytes) at QoS 1 as a store would, and returns once the broker
/// acknowledged them all.
pub(crate) async fn publish_as_a_store(
    broker: std::net::SocketAddr,
    messages: &[(String, Vec<u8>)],
) {
    let mut options = rumqttc::MqttOptions::new("a-store", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, messages.len() + 4);
    for (topic, bytes) in messages {
        client
            .publish(
                topic.clone(),
                rumqttc::QoS::AtLeastOnce,
                false,
                bytes.clone(),
            )
            .await
            .unwrap();
    }
    let published = async {
        let mut acks = 0;
        while acks < messages.len() {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = eventloop.poll().await
            {
                acks += 1;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), published)
        .await
        .expect("the broker acknowledges what a store publishes");
}

pub(crate) struct Running {
    token: CancellationToken,
    /// What the bridge shows (its HTTP face reads the same).
    pub(crate) watch: storelink::bridge::Watch,
    task:
        tokio::task::JoinHandle<Result<storelink::bridge::Totals, storelink::bridge::BridgeError>>,
}

/// Starts a bridge and waits until the broker has granted its subscription: from then on,
/// what the stores publish is kept for it.
pub(crate) async fn start_bridge(config: BridgeConfig) -> Running {
    let token = CancellationToken::new();
    let watch = storelink::bridge::Watch::default();
    let mut ready = watch.subscribed.subscribe();
    let task = tokio::spawn(storelink::bridge::run_with(
        config,
        token.clone(),
        watch.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|s| *s))
        .await
        .expect("the bridge subscribes")
        .unwrap();
    Running { token, watch, task }
}

impl Running {
    pub(crate) async fn stop(self) -> storelink::bridge::Totals {
        self.token.cancel();
        self.task.await.unwrap().unwrap()
    }
}

/// Submits `n` transactions through the register, every third with a loyalty card; returns
/// those the agent answered `ok`, by id.
async fn ring_up(
    agent: &TestAgent,
    reg: &mut SimRegister,
    n: usize,
    sent: &mut BTreeMap<String, Transaction>,
) {
    let mut client = agent.client(0).await;
    for i in 0..n {
        let now = jiff::Timestamp::now();
        let tx = if i % 3 == 0 {
            reg.purchase(now, &format!("c{}", i % 7), None)
        } else {
            reg.next(now)
        };
        let reply = client.submit(&tx).await.unwrap();
        if reply.starts_with("ok") {
            sent.insert(tx.id.clone(), tx);
        }
    }
}

/// Waits (a minute at most) until `sales` holds a row.
async fn until_a_sale(db: &tokio_postgres::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(db, "SELECT count(*) FROM storelink.sales").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sale reached PostgreSQL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn count(pg: &tokio_postgres::Client, sql: &str) -> i64 {
    pg.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until `sales` holds as many transactions as were acknowledged, then checks it holds
/// exactly those.
pub(crate) async fn all_in_sales(
    db: &tokio_postgres::Client,
    sent: &BTreeMap<String, Transaction>,
) {
    let want = sent.len() as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let have = count(db, "SELECT count(*) FROM storelink.sales").await;
        if have >= want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{have} of {want} acknowledged transactions in sales"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<String> = db
        .query("SELECT transaction_id FROM storelink.sales ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acknowledged: Vec<&String> = sent.keys().collect();
    assert_eq!(
        ids.iter().collect::<Vec<_>>(),
        acknowledged,
        "exactly the acknowledged ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_transaction_is_once_in_sales_across_a_bridge_restart_and_a_broker_restart()
 {
    let test = "bridge::every_acknowledged_transaction_is_once_in_sales";
    if !require_external("mosquitto", test) || !require_postgres(test) {
        return;
    }
    let pg = Postgres::start();
    let broker = Mosquitto::start_persistent();
    // mosquitto 2.0 forgets shared subscriptions when it restarts (config/bridge.toml).
    let config = bridge_config(broker.addr, &pg, "bridge-test-1", false);
    let bridge = start_bridge(config.clone()).await;
    let agent = TestAgent::start(broker.addr, &["lane-1"]).await;
    let mut reg = SimRegister::new("s042", "lane-1", Some("1"), 11);
    let mut sent = BTreeMap::new();
    ring_up(&agent, &mut reg, 60, &mut sent).await;

    // A schema violation among the events, on a store's topic.
    let bad = br#"{"specversion":"1.0","id":"x","type":"storelink.transaction.v1","data":{}}"#;
    // Valid by the schema, refused by PostgreSQL (there is no year 0 in its calendar): the
    // database's refusal is a dead letter too, and the rest of its batch is written.
    let mut year_zero = SimRegister::new("s999", "r9", Some("9"), 3).next(jiff::Timestamp::now());
    year_zero.business_day = jiff::civil::date(0, 1, 1);
    year_zero.id = format!("s999:r9:00000101:{}", year_zero.sequence.unwrap());
    let refused_by_db = storelink::events::encode(
        storelink::events::EventKind::Transaction,
        &year_zero.id,
        "s999",
        year_zero.ended_at,
        &year_zero,
    );
    let topic = "storelink/v1/acme/s999/events/transaction".to_string();
    publish_as_a_store(
        broker.addr,
        &[
            (topic.clone(), bad.to_vec()),
            (topic, refused_by_db.clone()),
        ],
    )
    .await;
    let db = pg.client().await;

    // The bridge goes away while the store keeps selling; the broker holds the session.
    until_a_sale(&db).await;
    let first = bridge.stop().await;
    assert!(first.received > 0, "{first:?}");
    ring_up(&agent, &mut reg, 60, &mut sent).await;
    let bridge = start_bridge(config.clone()).await;
    ring_up(&agent, &mut reg, 30, &mut sent).await;

    // The broker restarts once (persistent: sessions and queued messages survive).
    let broker = broker.restart();
    ring_up(&agent, &mut reg, 30, &mut sent).await;

    all_in_sales(&db, &sent).await;
    let rows = db
        .query(
            "SELECT s.transaction_id, s.total, s.loyalty_id, count(l.line),
                    coalesce(sum(l.amount - l.discount) FILTER (WHERE NOT l.voided), 0)::bigint
             FROM storelink.sales s LEFT JOIN storelink.sales_lines l USING (transaction_id)
             GROUP BY 1, 2, 3",
            &[],
        )
        .await
        .unwrap();
    for r in &rows {
        let id: String = r.get(0);
        let tx = sent
            .get(&id)
            .unwrap_or_else(|| panic!("{id} was never acknowledged"));
        assert_eq!(r.get::<_, i64>(1), tx.total, "{id}: total");
        assert_eq!(
            r.get::<_, Option<String>>(2),
            tx.loyalty_id,
            "{id}: loyalty id"
        );
        assert_eq!(r.get::<_, i64>(3), tx.lines.len() as i64, "{id}: lines");
        let net: i64 = tx
            .lines
            .iter()
            .filter(|l| !l.voided)
            .map(|l| l.amount - l.discount)
            .sum();
        assert_eq!(r.get::<_, i64>(4), net, "{id}: line amounts");
    }
    // The bad event is a dead letter with its bytes and reason; the bridge went on.
    let dead = db
        .query(
            "SELECT topic, reason, raw FROM storelink.dead_letters ORDER BY reason DESC",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let reason: String = dead[1].get(1);
    assert!(reason.starts_with("refused by the database: "), "{reason}");
    assert_eq!(dead[1].get::<_, Vec<u8>>(2), refused_by_db);
    assert_eq!(
        dead[0].get::<_, String>(0),
        "storelink/v1/acme/s999/events/transaction"
    );
    assert!(
        dead[0]
            .get::<_, String>(1)
            .starts_with("storelink.transaction.v1: at ")
    );
    assert_eq!(dead[0].get::<_, Vec<u8>>(2), bad.to_vec());
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM storelink.stores WHERE store = 's042'"
        )
        .await,
        1
    );
    // The revenue query of docs/bi.md gives the register's figure; every query there runs.
    let revenue: i64 = sent
        .values()
        .map(|t| match t.kind {
            storelink::model::transaction::TransactionKind::Sale => t.total,
            storelink::model::transaction::TransactionKind::Return => -t.total,
            _ => 0,
        })
        .sum();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/bi.md")).unwrap();
    fn sql_blocks(text: &str) -> Vec<&str> {
        text.split("```sql")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|q| !q.contains("$1"))
            .collect()
    }
    let five = doc
        .split("## Five questions")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/bi.md has its five questions");
    let queries = sql_blocks(five);
    assert_eq!(queries.len(), 5, "docs/bi.md's five questions");
    // Every query the document shows runs on the schema the bridge made.
    for q in sql_blocks(&doc) {
        db.simple_query(q)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{q}"));
    }
    let by_day = db.query(queries[0], &[]).await.unwrap();
    let total: i64 = by_day.iter().map(|r| r.get::<_, i64>("revenue")).sum();
    assert_eq!(total, revenue, "revenue by store and day");

    let second = bridge.stop().await;
    assert!(second.received > 0, "{second:?}");
    agent.stop().await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_in_one_group_share_the_feed_and_write_each_event_once() {
    let test = "bridge::two_bridges_in_one_group_share_the_feed";
    if !require_external("mosquitto", test) || !require_postgres(test) {
        return;
    }
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let one = start_bridge(bridge_config(broker.addr, &pg, "bridge-a", true)).await;
    let two = start_bridge(bridge_config(broker.addr, &pg, "bridge-b", true)).await;
    let agent = TestAgent::start(broker.addr, &["lane-1"]).await;
    let mut reg = SimRegister::new("s042", "lane-1", Some("1"), 5);
    let mut sent = BTreeMap::new();
    ring_up(&agent, &mut reg, 200, &mut sent).await;
    let db = pg.client().await;
    all_in_sales(&db, &sent).await;
    let (a, b) = (one.stop().await, two.stop().await);
    // mosquitto hands a group's messages out in turn: each instance took a share.
    assert!(a.new > 0 && b.new > 0, "{a:?} {b:?}");
    let events = count(&db, "SELECT count(*) FROM storelink.events").await;
    assert_eq!((a.new + b.new) as i64, events, "{a:?} {b:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_writes_over_verified_tls_and_refuses_a_server_its_ca_does_not_vouch_for() {
    let test = "bridge::the_bridge_writes_over_verified_tls";
    if !require_external("mosquitto", test) || !require_postgres(test) {
        return;
    }
    let pki = common::https::Pki::generate();
    let pg = Postgres::start_tls(&pki.cert_pem, &pki.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(dir.path());
    let url = format!("{} sslmode=require", pg.url());

    // A server certificate from a CA the bridge was not given: refused at once, naming the
    // key that mends it, not retried as if the server were down.
    let stranger = tempfile::tempdir().unwrap();
    let other_ca = common::https::Pki::generate().write_ca(stranger.path());
    let err = match storelink::bridge::postgres::connect(&url, None, Some(&other_ca)).await {
        Ok(_) => panic!("a server signed by another CA was accepted"),
        Err(e) => e,
    };
    assert!(!err.transient(), "{err}");
    assert!(err.to_string().contains("postgres.ca_file"), "{err}");

    let broker = Mosquitto::start();
    let text = format!(
        r#"
[broker]
url = "mqtt://{}"
client_id = "bridge-tls"
shared = false

[postgres]
url = "{url}"
ca_file = "{}"
batch_ms = 10
"#,
        broker.addr,
        ca.display()
    );
    let config = BridgeConfig::parse(&text, "bridge.toml", &HashMap::new()).unwrap();
    let bridge = start_bridge(config).await;
    let tx = SimRegister::new("s042", "r1", Some("1"), 7).next(jiff::Timestamp::now());
    let event = storelink::events::encode(
        storelink::events::EventKind::Transaction,
        &tx.id,
        "s042",
        tx.ended_at,
        &tx,
    );
    publish_as_a_store(
        broker.addr,
        &[("storelink/v1/acme/s042/events/transaction".into(), event)],
    )
    .await;
    let db = pg.client().await;
    until_a_sale(&db).await;
    // And it came over TLS: the server says so for the bridge's own connection.
    let over_tls = count(
        &db,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'storelink-bridge' AND s.ssl",
    )
    .await;
    assert!(over_tls >= 1, "no bridge connection uses TLS");
    bridge.stop().await;
}
