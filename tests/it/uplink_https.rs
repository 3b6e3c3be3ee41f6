//! The HTTPS path against a real TLS server (rcgen certificates): it takes over when MQTT has
//! been down a while, honours 503 + Retry-After and sends the same batch again under the same
//! Idempotency-Key, dead-letters a batch central refuses with 400, and backfills the oldest
//! events while MQTT carries live ones.

use crate::common;
use crate::common::https;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine as _;
use common::net::{agent_with_clock, agent_with_mqtt, ring_up_with};
use common::*;
use https::{CentralHttps, Feed};
use jiff::Timestamp;
use storelink::clock::ManualClock;
use storelink::sim::SimRegister;

fn https_lines(central: &CentralHttps, ca: &std::path::Path, extra: &str) -> String {
    format!(
        "\n[central.https]\nbase_url = \"{}\"\nca_file = \"{}\"\ntoken_env = \"CENTRAL_TOKEN\"\n{extra}",
        central.base_url(),
        ca.display()
    )
}

/// Central's HTTPS API answering the first batch with `first`, and an agent whose MQTT broker
/// is unreachable, so HTTPS takes over after 5 s. The CA's directory lives as long as the test.
async fn https_only(
    first: (u16, Option<&'static str>, &'static str),
) -> (CentralHttps, TestAgent, tempfile::TempDir) {
    let central = CentralHttps::start(Feed::default()).await;
    central.feed.lock().unwrap().batch_script.push_back(first);
    let dir = tempfile::tempdir().unwrap();
    let ca = central.pki.write_ca(dir.path());
    // Nothing listens on port 1.
    let extra = https_lines(&central, &ca, "mqtt_down_after_s = 5\n");
    let agent = agent_with_mqtt("url = \"mqtt://127.0.0.1:1\"", &["lane-1"], &extra, &env()).await;
    (central, agent, dir)
}

fn env() -> HashMap<String, String> {
    HashMap::from([("CENTRAL_TOKEN".to_string(), "s3cret".to_string())])
}

fn start() -> Timestamp {
    "2026-11-23T08:00:00Z".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mqtt_down_https_takes_over_and_a_503_is_retried_with_the_same_key() {
    let (central, agent, _dir) = https_only((503, Some("1"), "busy, come back in a second")).await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 41);
    let ids = ring_up_with(&agent, &mut register, 20, start(), || {}).await;

    eventually("a 503 and then a 200", Duration::from_secs(30), || {
        central.feed.lock().unwrap().batches.len() >= 2
    })
    .await;
    let batches = central.feed.lock().unwrap().batches.clone();
    let (first, second) = (&batches[0], &batches[1]);
    assert_eq!((first.status, second.status), (503, 200));
    assert_eq!(first.ids(), ids, "the oldest events, in order");
    assert_eq!(second.ids(), first.ids(), "the same batch again");
    assert!(first.idempotency_key.is_some());
    assert_eq!(first.idempotency_key, second.idempotency_key);
    assert_eq!(first.store, "s042");
    assert_eq!(
        first.content_type.as_deref(),
        Some("application/cloudevents-batch+json")
    );
    assert!(first.gzip);
    assert_eq!(first.authorization.as_deref(), Some("Bearer s3cret"));
    for event in &second.events {
        assert_eq!(event["type"], "storelink.transaction.v1");
    }
    eventually("the outbox empties", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;
    let status = agent.board.get("uplink.https").unwrap();
    assert!(status.last_success_at.is_some(), "{status:?}");
    assert!(
        status
            .detail
            .unwrap_or_default()
            .contains("MQTT unreachable"),
        "the status says why HTTPS is sending"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_dead_letters_the_batch_and_tells_central() {
    let (central, agent, _dir) = https_only((400, None, "data.total: expected an integer")).await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 43);
    let ids = ring_up_with(&agent, &mut register, 3, start(), || {}).await;

    eventually(
        "the refusal, then the dead letters",
        Duration::from_secs(30),
        || central.feed.lock().unwrap().batches.len() >= 2,
    )
    .await;
    let batches = central.feed.lock().unwrap().batches.clone();
    assert_eq!(batches[0].status, 400);
    assert_eq!(batches[0].ids(), ids);
    assert_eq!(
        agent.deadletters.len(),
        3,
        "kept locally with the raw bytes"
    );
    let letters = agent.deadletters.recent(10).unwrap();
    assert!(
        letters.iter().all(|l| l.reason.contains("400")),
        "{letters:?}"
    );
    // Central hears about it: the next batch carries the dead-letter events, each with the
    // refused event's bytes and the reason.
    assert_eq!(batches[1].status, 200);
    let mut held = HashSet::new();
    for event in &batches[1].events {
        assert_eq!(event["type"], "storelink.deadletter.v1");
        assert!(
            event["data"]["reason"]
                .as_str()
                .unwrap()
                .contains("expected an integer")
        );
        let raw = base64::engine::general_purpose::STANDARD
            .decode(event["data"]["raw"].as_str().unwrap())
            .unwrap();
        let original: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        held.insert(original["id"].as_str().unwrap().to_string());
    }
    assert_eq!(held, ids.iter().cloned().collect::<HashSet<_>>());
    eventually("the outbox empties", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_backlog_goes_over_https_while_mqtt_carries_live_events() {
    let central = CentralHttps::start(Feed::default()).await;
    let broker = start_rumqttd();
    let mqtt_central = Central::subscribe(broker, "storelink/v1/acme/+/events/#").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = central.pki.write_ca(dir.path());
    // The broker is unreachable for the agent until the proxy opens.
    let proxy = Proxy::new(broker);
    let clock = ManualClock::new(start());
    let extra = https_lines(
        &central,
        &ca,
        "backfill_after_s = 600\nmqtt_down_after_s = 86400\nbatch_events = 200\n",
    );
    let agent = agent_with_clock(
        &format!("url = \"mqtt://{}\"", proxy.addr),
        &["lane-1"],
        &extra,
        &env(),
        std::sync::Arc::new(clock.clone()),
    )
    .await;
    // Two hours of business while the broker is away.
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 47);
    let c = clock.clone();
    let backlog = ring_up_with(&agent, &mut register, 2000, start(), move || {
        c.advance(Duration::from_secs(360))
    })
    .await;
    // The backlog is older than backfill_after_s: HTTPS starts on it while MQTT is still away.
    eventually("HTTPS backfilling", Duration::from_secs(20), || {
        central
            .feed
            .lock()
            .unwrap()
            .batches
            .iter()
            .any(|b| b.status == 200)
    })
    .await;
    proxy.open().await;
    let mut live = Vec::new();
    for _ in 0..5 {
        live.extend(ring_up_with(&agent, &mut register, 1, start(), || {}).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: Vec<String> = backlog.iter().chain(&live).cloned().collect();
    let delivered = || {
        let mut got: HashSet<String> = mqtt_central
            .ids("storelink.transaction.v1")
            .into_keys()
            .collect();
        for b in central.feed.lock().unwrap().batches.iter() {
            if b.status == 200 {
                got.extend(b.ids());
            }
        }
        got
    };
    eventually(
        "every event over one path or the other",
        Duration::from_secs(60),
        || {
            let got = delivered();
            all.iter().all(|id| got.contains(id))
        },
    )
    .await;
    let https_ids: Vec<String> = central
        .feed
        .lock()
        .unwrap()
        .batches
        .iter()
        .flat_map(|b| b.ids())
        .collect();
    let mqtt_ids = mqtt_central.ids("storelink.transaction.v1");
    assert_eq!(
        https_ids.first(),
        backlog.first(),
        "HTTPS starts with the oldest event"
    );
    let live_over_mqtt = live.iter().filter(|id| mqtt_ids.contains_key(*id)).count();
    let both: Vec<_> = https_ids
        .iter()
        .filter(|id| mqtt_ids.contains_key(*id))
        .collect();
    assert!(both.is_empty(), "claims keep the paths apart: {both:?}");
    assert!(
        !mqtt_ids.is_empty(),
        "MQTT carried part of the traffic once back"
    );
    eprintln!(
        "backfill: {} events over HTTPS in {} batches, {} over MQTT; {live_over_mqtt} of {} live events over MQTT",
        https_ids.len(),
        central.feed.lock().unwrap().batches.len(),
        mqtt_ids.len(),
        live.len()
    );
    agent.stop().await;
}
