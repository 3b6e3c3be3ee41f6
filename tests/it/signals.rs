//! Customer signals on the agent's manual clock, checked on the outbox itself (the broker is
//! never there, so everything the agent would send is still held): a win-back fires once per
//! occasion across runs, a restart and a replay, and ends with a purchase; without marketing
//! consent nothing about the customer is queued; with it, a snapshot follows a class change.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{TestAgent, config_text, free_port, local};
use jiff::Timestamp;
use serde_json::Value;
use storelink::clock::ManualClock;
use storelink::model::transaction::{Tender, Transaction};
use storelink::profiles::Profile;
use storelink::sim::SimRegister;

/// A sale of one line in `category` by `customer`.
fn sale(reg: &mut SimRegister, at: Timestamp, customer: &str, category: &str) -> Transaction {
    let mut tx = reg.purchase(at, customer, None);
    tx.lines.truncate(1);
    tx.lines[0].category = Some(category.into());
    tx.total = tx.lines[0].net();
    tx.tenders = vec![Tender {
        kind: "card".into(),
        amount: tx.total,
    }];
    tx
}

fn customer(id: &str, marketing: bool) -> Profile {
    let mut p = Profile::new(id);
    p.consents.marketing = marketing;
    p.consents.personalised_offers = true;
    p.version = 1;
    p
}

/// An agent on the manual clock whose broker never answers.
async fn agent_in(dir: tempfile::TempDir, clock: &ManualClock) -> TestAgent {
    let port = free_port();
    let dead_broker = local(free_port());
    let text = config_text(dir.path(), dead_broker, free_port(), &[("lane-1", port)])
        + "\n[signals]\ndaily_at = \"06:00\"\n";
    TestAgent::from_text(
        dir,
        &[("lane-1", port)],
        &text,
        &HashMap::new(),
        Arc::new(clock.clone()),
    )
    .await
}

/// The held events of a CloudEvent type, oldest first.
fn held(agent: &TestAgent, ty: &str) -> Vec<Value> {
    agent
        .outbox
        .peek(usize::MAX, |_| false)
        .unwrap()
        .iter()
        .map(|e| serde_json::from_slice::<Value>(e.payload()).unwrap())
        .filter(|e| e["type"] == ty)
        .collect()
}

fn about<'a>(events: &'a [Value], customer: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["data"]["customer_id"] == customer)
        .collect()
}

async fn daily_run(agent: &TestAgent) -> storelink::signals::RunReport {
    let signals = agent.signals.clone();
    let report = tokio::task::spawn_blocking(move || signals.daily_run())
        .await
        .unwrap()
        .unwrap();
    // Everything the run queued is committed once a probe comes back through the engine.
    settle(agent).await;
    report
}

/// Waits until the engine has committed what is queued before now.
async fn settle(agent: &TestAgent) {
    let signals = agent.signals.clone();
    tokio::task::spawn_blocking(move || signals.flush())
        .await
        .unwrap()
        .unwrap();
    agent.signals.probe().await;
}

fn winbacks(agent: &TestAgent, customer: &str, group: &str) -> Vec<Value> {
    held(agent, "storelink.trigger.v1")
        .into_iter()
        .filter(|e| {
            e["data"]["customer_id"] == customer
                && e["data"]["trigger"] == "winback_due"
                && e["data"]["group"] == group
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winback_fires_once_per_occasion_across_runs_restarts_and_replays_and_a_purchase_ends_it()
{
    let clock = ManualClock::new("2026-01-05T10:00:00Z".parse().unwrap());
    let agent = agent_in(tempfile::tempdir().unwrap(), &clock).await;
    agent.profiles.upsert(customer("c1", true)).unwrap();
    // The gateway has its daily run from the first day, so what becomes due later is news
    // (a first run would leave anything older than `catch_up_days` to the snapshot).
    daily_run(&agent).await;
    let mut reg = SimRegister::new("s042", "lane-1", Some("1"), 7);
    // A 14-day rhythm in shoes: Jan 5, Jan 19, Feb 2.
    let mut sent = Vec::new();
    for at in [
        "2026-01-05T10:00:00Z",
        "2026-01-19T10:00:00Z",
        "2026-02-02T10:00:00Z",
    ] {
        let at: Timestamp = at.parse().unwrap();
        clock.set(at);
        let tx = sale(&mut reg, at, "c1", "shoes");
        let reply = agent.client(0).await.submit(&tx).await.unwrap();
        assert!(reply.starts_with("ok"), "{reply}");
        sent.push(tx);
    }
    let kpis = agent.profiles.kpis("c1").unwrap().unwrap();
    assert_eq!(kpis.groups["shoes"].median_interval_days, Some(14.0));

    // Thirty days without buying: due on Feb 16, overdue by 16 days on Mar 4.
    clock.set("2026-03-04T07:00:00Z".parse().unwrap());
    daily_run(&agent).await;
    let fired = winbacks(&agent, "c1", "shoes");
    assert_eq!(fired.len(), 1, "{fired:#?}");
    let data = &fired[0]["data"];
    assert_eq!(data["days_overdue"], 16);
    assert_eq!(data["due"], "2026-02-16");
    assert_eq!(data["interval_days"], 14.0);
    assert_eq!(data["detected"], "schedule");

    // The next day's run, and a second run the same day, find the same occasion.
    daily_run(&agent).await;
    clock.set("2026-03-05T07:00:00Z".parse().unwrap());
    daily_run(&agent).await;
    assert_eq!(winbacks(&agent, "c1", "shoes").len(), 1);

    // A restart, and the register replaying the old transactions.
    let dir = agent.stop_keep().await;
    let agent = agent_in(dir, &clock).await;
    for tx in &sent {
        let reply = agent.client(0).await.submit(tx).await.unwrap();
        assert!(reply.starts_with("ok"), "{reply}");
    }
    daily_run(&agent).await;
    assert_eq!(winbacks(&agent, "c1", "shoes").len(), 1, "no second one");

    // A purchase in shoes ends it: the next runs find nothing overdue in shoes.
    let at: Timestamp = "2026-03-05T12:00:00Z".parse().unwrap();
    clock.set(at);
    let reply = agent
        .client(0)
        .await
        .submit(&sale(&mut reg, at, "c1", "shoes"))
        .await
        .unwrap();
    assert!(reply.starts_with("ok"), "{reply}");
    for day in ["2026-03-06T07:00:00Z", "2026-03-12T07:00:00Z"] {
        clock.set(day.parse().unwrap());
        daily_run(&agent).await;
    }
    assert_eq!(winbacks(&agent, "c1", "shoes").len(), 1);
    let today = "2026-03-12".parse().unwrap();
    let kpis = agent.profiles.kpis("c1").unwrap().unwrap();
    assert!(!kpis.groups["shoes"].overdue(today, 1.5));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_marketing_consent_nothing_is_queued_and_with_it_a_snapshot_follows_a_class_change()
{
    let clock = ManualClock::new("2026-01-05T10:00:00Z".parse().unwrap());
    let agent = agent_in(tempfile::tempdir().unwrap(), &clock).await;
    agent.profiles.upsert(customer("quiet", false)).unwrap();
    agent.profiles.upsert(customer("mailable", true)).unwrap();
    let mut reg = SimRegister::new("s042", "lane-1", Some("1"), 9);
    let mut client = agent.client(0).await;
    for (day, category) in [("2026-01-05", "shoes"), ("2026-01-19", "shoes")] {
        let at: Timestamp = format!("{day}T10:00:00Z").parse().unwrap();
        clock.set(at);
        for who in ["quiet", "mailable"] {
            let reply = client
                .submit(&sale(&mut reg, at, who, category))
                .await
                .unwrap();
            assert!(reply.starts_with("ok"), "{reply}");
        }
        settle(&agent).await;
    }
    // Both are New; the consenting one has a snapshot saying so, and a welcome.
    let snapshots = held(&agent, "storelink.customer.v1");
    let mine = about(&snapshots, "mailable");
    assert!(!mine.is_empty());
    assert_eq!(mine.last().unwrap()["data"]["activity"], "new");
    assert_eq!(mine.last().unwrap()["data"]["activity_since"], "2026-01-05");
    let triggers = held(&agent, "storelink.trigger.v1");
    assert_eq!(
        about(&triggers, "mailable")
            .iter()
            .filter(|t| t["data"]["trigger"] == "first_purchase")
            .count(),
        1
    );

    // 91 days after the first purchase both become Loyal; months later, overdue and Passive.
    for day in ["2026-04-06", "2026-04-07", "2026-08-01"] {
        clock.set(format!("{day}T07:00:00Z").parse().unwrap());
        let report = daily_run(&agent).await;
        assert_eq!((report.customers, report.consenting), (2, 1));
    }
    let snapshots = held(&agent, "storelink.customer.v1");
    let classes: Vec<(&str, &str)> = about(&snapshots, "mailable")
        .iter()
        .map(|e| {
            (
                e["data"]["activity"].as_str().unwrap(),
                e["data"]["activity_since"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        classes.last(),
        Some(&("passive", "2026-07-19")),
        "{classes:?}"
    );
    assert!(classes.contains(&("loyal", "2026-04-06")), "{classes:?}");
    // The unchanged day in between (Apr 7) sent nothing new for the class.
    assert_eq!(
        classes.iter().filter(|c| c.0 == "loyal").count(),
        1,
        "{classes:?}"
    );
    let triggers = held(&agent, "storelink.trigger.v1");
    let names: Vec<&str> = about(&triggers, "mailable")
        .iter()
        .map(|t| t["data"]["trigger"].as_str().unwrap())
        .collect();
    for t in ["winback_due", "next_purchase_due", "became_passive"] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }

    // Nothing at all about the customer without marketing consent, on the outbox itself.
    for ty in ["storelink.customer.v1", "storelink.trigger.v1"] {
        assert!(about(&held(&agent, ty), "quiet").is_empty(), "{ty}");
    }
    // Still a customer of the store: their transactions and KPIs are there.
    assert_eq!(agent.profiles.kpis("quiet").unwrap().unwrap().purchases, 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_while_the_broker_is_down_leaves_central_only_the_ack_and_the_redacted_transaction()
 {
    use common::https::{CentralHttps, Feed, erase, upsert};
    let mut profile = serde_json::json!({
        "customer_id": "c77", "first_name": "Ada", "cards": ["9990001"], "version": 3,
        "consents": {"marketing": true, "personalised_offers": true}
    });
    let central_https = CentralHttps::start(Feed {
        extra: vec![upsert(profile.take())],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = central_https.pki.write_ca(dir.path());
    // The broker's port, with no broker on it until the erasure is done.
    let broker = local(free_port());
    let port = free_port();
    let text = config_text(
        &dir.path().join("data"),
        broker,
        free_port(),
        &[("lane-1", port)],
    ) + &format!(
        "\n[central.https]\nbase_url = \"{}\"\nca_file = \"{}\"\nuplink = false\n\n[profiles]\nsync_interval_s = 10\n",
        central_https.base_url(),
        ca.display()
    );
    let agent = TestAgent::from_text(
        dir,
        &[("lane-1", port)],
        &text,
        &HashMap::new(),
        storelink::clock::system(),
    )
    .await;
    common::eventually(
        "the profile to sync",
        std::time::Duration::from_secs(20),
        || agent.profiles.get("c77").unwrap().is_some(),
    )
    .await;

    // The customer buys by card, and so does someone else; a garbled line names the card.
    let mut reg = SimRegister::new("s042", "lane-1", Some("1"), 3);
    let mut client = agent.client(0).await;
    let now = Timestamp::now();
    let theirs = sale(&mut reg, now, "9990001", "consoles");
    let other = sale(&mut reg, now, "c88", "shoes");
    for tx in [&theirs, &other] {
        assert!(client.submit(tx).await.unwrap().starts_with("ok"));
    }
    client
        .send_raw(b"{\"loyalty_id\":\"9990001\",\"total\":\"12,50\"}\n")
        .await
        .unwrap();
    assert!(client.reply().await.unwrap().starts_with("err"));
    settle(&agent).await;
    // In the event's text, or in a dead letter's raw bytes (base64 on the wire).
    let mentions = |e: &Value| {
        use base64::Engine as _;
        let raw = e["data"]["raw"]
            .as_str()
            .and_then(|r| base64::engine::general_purpose::STANDARD.decode(r).ok())
            .map(|r| String::from_utf8_lossy(&r).into_owned())
            .unwrap_or_default();
        let text = e.to_string() + &raw;
        text.contains("c77") || text.contains("9990001")
    };
    let before: Vec<Value> = [
        "storelink.customer.v1",
        "storelink.trigger.v1",
        "storelink.deadletter.v1",
    ]
    .iter()
    .flat_map(|ty| held(&agent, ty))
    .filter(mentions)
    .collect();
    assert!(
        before.len() >= 3,
        "a snapshot, a welcome and the dead letter are held: {before:#?}"
    );

    // Central erases the customer over HTTPS while the broker is still away.
    central_https
        .feed
        .lock()
        .unwrap()
        .extra
        .push(erase("c77", 3, "req-1"));
    // The acknowledgement is queued only once every keeper has done its share and the
    // erasure is on disk.
    common::eventually(
        "the erasure's acknowledgement",
        std::time::Duration::from_secs(30),
        || !held(&agent, "storelink.erasure.v1").is_empty(),
    )
    .await;
    assert!(agent.profiles.tombstone("c77").unwrap().is_some());
    assert!(
        agent.deadletters.is_empty(),
        "the dead letter named the card"
    );

    // The broker comes back; everything held is delivered.
    storelink::demo::start_broker(broker).unwrap();
    let central = common::Central::subscribe(broker, "storelink/v1/acme/s042/events/#").await;
    central
        .wait_for_ids(
            "storelink.erasure.v1",
            1,
            std::time::Duration::from_secs(30),
        )
        .await;
    common::eventually(
        "the outbox to empty",
        std::time::Duration::from_secs(30),
        || agent.outbox.depth() == 0,
    )
    .await;
    let received: Vec<Value> = central.all().into_iter().map(|r| r.event).collect();
    let about_them: Vec<&Value> = received.iter().filter(|e| mentions(e)).collect();
    assert!(about_them.is_empty(), "{about_them:#?}");
    let transactions = central.of_type("storelink.transaction.v1");
    let redacted = transactions
        .iter()
        .find(|t| t["id"] == theirs.id.as_str())
        .expect("the customer's transaction, redacted");
    assert!(redacted["data"].get("loyalty_id").is_none());
    assert_eq!(redacted["data"]["total"], theirs.total);
    assert!(
        transactions
            .iter()
            .any(|t| t["data"]["loyalty_id"] == "c88"),
        "other customers are untouched"
    );
    // Besides the two transactions, the acknowledgement is all.
    let others: Vec<&str> = received
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|t| *t != "storelink.transaction.v1")
        .collect();
    assert_eq!(others, ["storelink.erasure.v1"]);
    let ack = &central.of_type("storelink.erasure.v1")[0]["data"];
    assert_eq!(ack["outbox_redacted"], 1, "{ack}");
    assert!(ack["outbox_dropped"].as_u64().unwrap() >= 3, "{ack}");
    assert_eq!(ack["dead_letters"], 1, "{ack}");
    agent.stop().await;
}
