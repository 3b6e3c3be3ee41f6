//! The same first path against a real mosquitto, the broker most stores' central teams run.
//! Needs the `mosquitto` binary: skipped loudly without it, failed under
//! `STORELINK_REQUIRE_EXTERNAL=1`.

use crate::common;

use std::time::Duration;

use common::*;
use jiff::Timestamp;
use storelink::sim::SimRegister;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_reach_mosquitto_and_survive_a_broker_restart() {
    if !require_external(
        "mosquitto",
        "transactions_reach_mosquitto_and_survive_a_broker_restart",
    ) {
        return;
    }
    let broker = Mosquitto::start();
    let addr = broker.addr;
    let central = Central::subscribe(addr, "storelink/v1/acme/#").await;
    // The agent goes through a proxy so central can resubscribe after the restart before the
    // agent sees the broker again.
    let proxy = Proxy::new(addr);
    proxy.open().await;
    let agent = TestAgent::start(proxy.addr, &["lane-1"]).await;
    let mut client = agent.client(0).await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 11);
    let start: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
    let mut ids = Vec::new();
    let mut send = async |n: i64, ids: &mut Vec<String>| {
        for i in 0..n {
            let tx = register.next(start + jiff::SignedDuration::from_secs(i));
            assert_eq!(client.submit(&tx).await.unwrap(), format!("ok {}", tx.id));
            ids.push(tx.id);
        }
    };

    // Phase 1: broker up.
    send(150, &mut ids).await;
    central
        .wait_for_ids("storelink.transaction.v1", 150, Duration::from_secs(30))
        .await;

    // Phase 2: broker down; the register is still acknowledged.
    drop(broker);
    proxy.close();
    send(150, &mut ids).await;
    assert!(agent.outbox.depth() >= 150);

    // Phase 3: broker back on the same port; the held events arrive.
    let _broker = Mosquitto::start_on(addr.port());
    let central_again = Central::subscribe(addr, "storelink/v1/acme/#").await;
    proxy.open().await;
    common::eventually("all 300 ids at central", Duration::from_secs(60), || {
        let mut got = central.ids("storelink.transaction.v1");
        got.extend(central_again.ids("storelink.transaction.v1"));
        ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    common::eventually("outbox drained", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;
    agent.stop().await;
}
