//! The production MQTT paths against a real mosquitto: mqtts with client certificates (mTLS),
//! WebSocket over TLS, through an HTTP CONNECT proxy, MQTT 5; TLS failures explained; and the
//! no-loss guarantees under a proxy that cuts and stalls and a broker restarted in a loop.
//! Needs `mosquitto`: skipped loudly without it, failed under `STORELINK_REQUIRE_EXTERNAL=1`.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::net::{
    ConnectProxy, FaultProxy, TlsFiles, TlsMosquitto, agent_with_mqtt, ring_up_with,
};
use common::*;
use jiff::Timestamp;
use storelink::sim::SimRegister;

const TX: &str = "storelink.transaction.v1";

/// Sends `n` transactions, pipelined, and returns their ids in order.
async fn ring_up(agent: &TestAgent, register: &mut SimRegister, n: usize) -> Vec<String> {
    let start: Timestamp = "2026-11-23T08:00:00Z".parse().unwrap();
    ring_up_with(agent, register, n, start, || {}).await
}

/// Waits until the uplink's status says `needle` in its last error.
async fn uplink_error_says(agent: &TestAgent, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = agent.board.get("uplink.mqtt").expect("uplink component");
        let error = status.last_error.clone().unwrap_or_default();
        if error.contains(needle) {
            eprintln!("uplink.mqtt says: {error}");
            return error;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "uplink never reported {needle:?}; last error: {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tls_lines(url: &str, ca: &std::path::Path, identity: Option<&TlsFiles>) -> String {
    let mut lines = format!("url = \"{url}\"\nca_file = \"{}\"\n", ca.display());
    if let Some(pki) = identity {
        lines += &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.client_cert.display(),
            pki.client_key.display()
        );
    }
    lines
}

/// Delivers 30 transactions through the agent and checks they all reached central. Each path
/// gets its own sequence range: with shared ids, the first path's deliveries would satisfy the
/// wait for every later one, and a path that delivered nothing would pass.
async fn delivers(agent: &TestAgent, central: &Central, seed: u64) {
    let mut register =
        SimRegister::new("s042", "lane-1", Some("1"), seed).with_sequence(seed * 1000);
    let ids = ring_up(agent, &mut register, 30).await;
    eventually(
        "all transactions at central",
        Duration::from_secs(30),
        || {
            let got = central.ids(TX);
            ids.iter().all(|id| got.contains_key(id))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_websocket_proxy_and_mqtt5_paths_deliver() {
    if !require_external("mosquitto", "mtls_websocket_proxy_and_mqtt5_paths_deliver") {
        return;
    }
    let pki = TlsFiles::generate();
    let broker = TlsMosquitto::start(&pki);
    let central = Central::subscribe(broker.plain, "storelink/v1/acme/#").await;
    let none = HashMap::new();

    // mqtts with a client certificate (the listener requires one).
    let url = format!("mqtts://127.0.0.1:{}", broker.mtls.port());
    let agent = agent_with_mqtt(
        &tls_lines(&url, &pki.ca, Some(&pki)),
        &["lane-1"],
        "",
        &none,
    )
    .await;
    delivers(&agent, &central, 1).await;
    let status = agent.board.get("uplink.mqtt").unwrap();
    assert!(
        status
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("connected to mqtts://"),
        "{status:?}"
    );
    agent.stop().await;

    // The same over MQTT 5.
    let lines = tls_lines(&url, &pki.ca, Some(&pki)) + "protocol = \"5\"\n";
    let agent = agent_with_mqtt(&lines, &["lane-1"], "", &none).await;
    delivers(&agent, &central, 2).await;
    agent.stop().await;

    // WebSocket over TLS, the path for stores that pass only 443.
    let url = format!("wss://127.0.0.1:{}/mqtt", broker.wss.port());
    let agent = agent_with_mqtt(&tls_lines(&url, &pki.ca, None), &["lane-1"], "", &none).await;
    delivers(&agent, &central, 3).await;
    agent.stop().await;

    // wss through the store's HTTP proxy, found in HTTPS_PROXY as on a real gateway.
    let proxy = ConnectProxy::start().await;
    let env = HashMap::from([("HTTPS_PROXY".to_string(), format!("http://{}", proxy.addr))]);
    let agent = agent_with_mqtt(&tls_lines(&url, &pki.ca, None), &["lane-1"], "", &env).await;
    delivers(&agent, &central, 4).await;
    assert!(
        proxy
            .targets
            .lock()
            .unwrap()
            .contains(&format!("127.0.0.1:{}", broker.wss.port())),
        "the proxy carried the connection: {:?}",
        proxy.targets.lock().unwrap()
    );
    agent.stop().await;

    // Plain WebSocket, with NO_PROXY exempting the broker.
    let env = HashMap::from([
        ("HTTP_PROXY".to_string(), "http://127.0.0.1:1".to_string()),
        ("NO_PROXY".to_string(), "127.0.0.1".to_string()),
    ]);
    let url = format!("ws://127.0.0.1:{}", broker.ws.port());
    let agent = agent_with_mqtt(&format!("url = \"{url}\"\n"), &["lane-1"], "", &env).await;
    delivers(&agent, &central, 5).await;
    agent.stop().await;

    // Every event arrived once per id, whatever the path.
    let dupes: Vec<_> = central
        .ids(TX)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(dupes.is_empty(), "no duplicates on clean paths: {dupes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_explained_and_nothing_is_lost() {
    if !require_external(
        "mosquitto",
        "tls_failures_are_explained_and_nothing_is_lost",
    ) {
        return;
    }
    let pki = TlsFiles::generate();
    let none = HashMap::new();
    let broker = TlsMosquitto::start(&pki);
    let url = format!("mqtts://127.0.0.1:{}", broker.mtls.port());

    // The wrong CA: the broker's certificate has an unknown issuer.
    let agent = agent_with_mqtt(
        &tls_lines(&url, &pki.stranger_ca, Some(&pki)),
        &["lane-1"],
        "",
        &none,
    )
    .await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 9);
    ring_up(&agent, &mut register, 5).await;
    let error = uplink_error_says(&agent, "unknown CA").await;
    assert!(error.contains("central.mqtt.ca_file"), "{error}");
    assert_eq!(agent.outbox.depth(), 5, "held, not lost");
    agent.stop().await;

    // No client certificate for a listener that requires one.
    let agent = agent_with_mqtt(&tls_lines(&url, &pki.ca, None), &["lane-1"], "", &none).await;
    let error = uplink_error_says(&agent, "TLS").await;
    assert!(
        error.contains("client certificate") || error.contains("refused the handshake"),
        "{error}"
    );
    agent.stop().await;
    drop(broker);

    // A broker certificate without a subjectAltName, and an expired one.
    for ((cert, key), needle) in [
        (&pki.no_san_cert, "no subjectAltName"),
        (&pki.expired_cert, "expired at 2021-01-01"),
    ] {
        let broker = TlsMosquitto::start_serving(&pki, (cert, key));
        let url = format!("mqtts://127.0.0.1:{}", broker.mtls.port());
        let agent = agent_with_mqtt(
            &tls_lines(&url, &pki.ca, Some(&pki)),
            &["lane-1"],
            "",
            &none,
        )
        .await;
        uplink_error_says(&agent, needle).await;
        agent.stop().await;
    }
}

/// The first arrival of each id, in arrival order.
fn first_arrivals(central: &Central) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    central
        .of_type(TX)
        .into_iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

fn assert_no_loss_in_order(central: &Central, ids: &[String], what: &str) {
    let counts: BTreeMap<String, usize> = central.ids(TX);
    let missing: Vec<_> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    let strangers: Vec<_> = counts.keys().filter(|id| !ids.contains(id)).collect();
    assert!(
        strangers.is_empty(),
        "{what}: ids nobody sent: {strangers:?}"
    );
    assert_eq!(
        first_arrivals(central),
        ids,
        "{what}: first arrivals in order"
    );
    let dupes: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "{what}: {} sent, {} distinct at central, {dupes} duplicates (same id)",
        ids.len(),
        counts.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cuts_and_stalls_loses_nothing() {
    if !require_external("mosquitto", "a_proxy_that_cuts_and_stalls_loses_nothing") {
        return;
    }
    let broker = Mosquitto::start();
    let central = Central::subscribe(broker.addr, "storelink/v1/acme/+/events/#").await;
    let proxy = FaultProxy::start(broker.addr).await;
    let agent = TestAgent::start(proxy.addr, &["lane-1"]).await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 21);

    let faults = async {
        for round in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.cut();
            if round == 3 {
                // A stall longer than the keepalive (5 s): the agent must notice on its own.
                proxy.stall(true);
                tokio::time::sleep(Duration::from_secs(9)).await;
                proxy.stall(false);
            }
        }
    };
    let (ids, ()) = tokio::join!(ring_up(&agent, &mut register, 3000), faults);
    eventually(
        "every transaction at central",
        Duration::from_secs(60),
        || central.ids(TX).len() >= ids.len(),
    )
    .await;
    assert!(proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 6);
    assert_no_loss_in_order(&central, &ids, "cut and stall");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_in_a_loop_lose_nothing_and_keep_order() {
    if !require_external(
        "mosquitto",
        "broker_restarts_in_a_loop_lose_nothing_and_keep_order",
    ) {
        return;
    }
    // A persistent broker and a persistent subscriber, so central misses nothing across the
    // restarts either: the broker keeps central's queue on disk (SIGTERM saves it).
    let broker = Mosquitto::start_persistent();
    let addr = broker.addr;
    let central =
        Central::subscribe_persistent(addr, "storelink/v1/acme/+/events/#", "central-restarts")
            .await;
    let agent = TestAgent::start(addr, &["lane-1"]).await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 31);

    let restarts = async {
        let mut broker = Some(broker);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let b = broker.take().unwrap();
            broker = Some(b.restart());
        }
        broker
    };
    let (ids, broker) = tokio::join!(ring_up(&agent, &mut register, 10_000), restarts);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while central.ids(TX).len() < ids.len() {
        // Say which side holds the gap: still in the agent's outbox, or acknowledged by the
        // broker and never passed on to central.
        assert!(
            tokio::time::Instant::now() < deadline,
            "central has {} of {} transactions; the agent still holds {} ({} claimed)",
            central.ids(TX).len(),
            ids.len(),
            agent.outbox.depth(),
            agent.outbox.claimed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_loss_in_order(&central, &ids, "broker restarts");
    agent.stop().await;
    drop(broker);
}
