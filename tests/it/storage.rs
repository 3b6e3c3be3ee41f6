//! The store across versions and damage, through a running agent:
//! - a store written by the previous version (schema 1: everything in sled) is upgraded on
//!   first start, and every event it held reaches central with its id;
//! - a log file damaged in the middle is salvaged: every record that can still be read is
//!   delivered, and only the damaged ones are lost.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use storelink::sim::SimRegister;

const FEED: &str = "storelink/v1/acme/+/events/#";
const TX: &str = "storelink.transaction.v1";

/// `tests/fixtures/schema1-store.tar.gz` was written by storelink at commit 006f0c71 (the last
/// version with the outbox in sled): `storelink run` with central unreachable, 120 `jsonl`
/// transactions on register lane-1 (sequence 1-120, business day 2026-11-22, every third with
/// a loyalty card 47110000{0..6}), and one line that is not JSON; stopped with SIGTERM, then
/// started and stopped once more. Its outbox held 121 events (the transactions and the dead
/// letter), and its lane-1 display token was the one below.
const SCHEMA1_LANE_TOKEN: &str = "03c3a2568d79631ba26065b90f82fdcc";

fn unpack_schema1_store(into: &Path) {
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema1-store.tar.gz"))
        .arg("--strip-components=1")
        .arg("-C")
        .arg(into)
        .status()
        .expect("tar runs");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_outbox_of_the_previous_version_is_upgraded_with_nothing_lost() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, FEED).await;
    let dir = tempfile::tempdir().unwrap();
    unpack_schema1_store(dir.path());
    let agent = TestAgent::start_in(dir, broker, &["lane-1"], "").await;
    let migrated = agent
        .store
        .migrated()
        .expect("the schema-1 store was migrated");
    assert_eq!((migrated.entries, migrated.deadletters), (121, 1));

    central.wait_for_ids(TX, 120, Duration::from_secs(30)).await;
    let want: BTreeSet<String> = (1..=120)
        .map(|i| format!("s042:lane-1:20261122:{i}"))
        .collect();
    let got: BTreeSet<String> = central.ids(TX).into_keys().collect();
    assert_eq!(got, want, "every held transaction, with its id");
    eventually(
        "the dead letter reached central",
        Duration::from_secs(10),
        || central.of_type("storelink.deadletter.v1").len() == 1,
    )
    .await;
    eventually("the outbox drained", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;
    assert_eq!(
        agent.deadletters.len(),
        1,
        "the local dead letter came along"
    );

    // The rest of the old store is still there: KPIs in the cache, the lane secret in the
    // log, and the seen ids, so a resend is recognised.
    let kpis = agent
        .profiles
        .kpis("4711000003")
        .unwrap()
        .expect("KPIs of a loyalty customer");
    assert_eq!(kpis.purchases, 6);
    let lanes: serde_json::Value = get(format!("{}/api/v1/lanes", agent.api()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        lanes["lanes"][0]["display"],
        format!("/lanes/1?token={SCHEMA1_LANE_TOKEN}"),
        "display URLs survive the upgrade"
    );
    let mut client = agent.client(0).await;
    let mut again = SimRegister::new("s042", "lane-1", Some("1"), 1).next(jiff::Timestamp::now());
    again.id = "s042:lane-1:20261122:5".into();
    again.sequence = Some(5);
    again.business_day = "2026-11-22".parse().unwrap();
    assert_eq!(
        client.submit(&again).await.unwrap(),
        format!("ok {}", again.id)
    );
    assert_eq!(
        agent.outbox.depth(),
        0,
        "a resend of a migrated id is a duplicate"
    );

    // A second start finds nothing left to migrate.
    let dir = agent.stop_keep().await;
    let agent = TestAgent::start_in(dir, broker, &["lane-1"], "").await;
    assert!(agent.store.migrated().is_none());
    assert_eq!(agent.outbox.depth(), 0);
    agent.stop().await;
}

/// Intact frames of the log file (the documented layout: magic, table, key length, key, value
/// length, value, CRC-32 of table to value) with their table and the transaction ids each holds, read independently
/// of the agent.
fn frames_with_ids(bytes: &[u8]) -> Vec<(std::ops::Range<usize>, u8, Vec<String>)> {
    const MAGIC: [u8; 4] = [0xF3, 0x5A, 0x1C, 0xE7];
    let id = regex::bytes::Regex::new(r#""id":"(s042:lane-1:[0-9]+:[0-9]+)""#).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        if bytes[at..at + 4] != MAGIC {
            at += 1;
            continue;
        }
        let frame = (|| {
            let key_len = u16::from_be_bytes(bytes.get(at + 5..at + 7)?.try_into().ok()?) as usize;
            let value_at = at + 7 + key_len + 4;
            let value_len =
                u32::from_be_bytes(bytes.get(value_at - 4..value_at)?.try_into().ok()?) as usize;
            let end = value_at + value_len + 4;
            let value = bytes.get(value_at..value_at + value_len)?;
            let crc = u32::from_le_bytes(bytes.get(end - 4..end)?.try_into().ok()?);
            if crc32fast::hash(&bytes[at + 4..end - 4]) != crc {
                return None;
            }
            let ids = id
                .captures_iter(value)
                .map(|c| String::from_utf8_lossy(&c[1]).into_owned())
                .collect();
            Some((at..end, bytes[at + 4], ids))
        })();
        match frame {
            Some(f) if f.0.end <= bytes.len() => {
                at = f.0.end;
                out.push(f);
            }
            _ => at += 1,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_damaged_in_the_middle_still_delivers_every_readable_record() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, FEED).await;
    // Central is away while the store takes a day's business.
    let link = Proxy::new(broker);
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_in(dir, link.addr, &["lane-1"], "").await;
    let mut client = agent.client(0).await;
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 1);
    let mut acked = Vec::new();
    for _ in 0..2000 {
        let tx = register.next(jiff::Timestamp::now());
        assert_eq!(client.submit(&tx).await.unwrap(), format!("ok {}", tx.id));
        acked.push(tx.id);
    }
    drop(client);
    let dir = agent.stop_keep().await;

    // The card fails under five records in the middle of the day: every copy of each of them
    // (copy-on-write can leave older ones) gets a run of garbage inside it.
    let file = dir.path().join("outbox.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    let damaged: BTreeSet<String> = acked[1000..1005].iter().cloned().collect();
    let frames = frames_with_ids(&bytes);
    let mut hit = 0;
    for (span, _, ids) in &frames {
        if ids.iter().any(|i| damaged.contains(i)) {
            let mid = span.start + (span.end - span.start) / 2;
            for b in &mut bytes[mid..mid + 32] {
                *b ^= 0xA5;
            }
            hit += 1;
        }
    }
    assert!(
        hit >= damaged.len(),
        "each damaged record was found in the file"
    );
    std::fs::write(&file, &bytes).unwrap();
    // What a reader of the documented format can still read, and so must be delivered: every
    // transaction with at least one intact copy of its outbox entry (table 0).
    let readable: BTreeSet<String> = frames_with_ids(&bytes)
        .into_iter()
        .filter(|(_, table, _)| *table == 0)
        .flat_map(|(_, _, ids)| ids)
        .collect();
    assert!(readable.is_disjoint(&damaged));

    link.open().await;
    let agent = TestAgent::start_in(dir, link.addr, &["lane-1"], "").await;
    let status: serde_json::Value = get(format!("{}/api/v1/status", agent.api()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["health"], "degraded", "{status}");
    assert!(
        status["components"]["storage"]
            .to_string()
            .contains("salvaged"),
        "{status}"
    );
    let expected: BTreeSet<String> = acked
        .iter()
        .filter(|id| readable.contains(*id))
        .cloned()
        .collect();
    assert_eq!(expected.len(), acked.len() - damaged.len());
    central
        .wait_for_ids(TX, expected.len(), Duration::from_secs(60))
        .await;
    let got: BTreeSet<String> = central.ids(TX).into_keys().collect();
    let missing: Vec<&String> = expected.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "readable records not delivered: {missing:?}"
    );
    assert!(
        got.is_disjoint(&damaged),
        "the damaged records are the ones lost"
    );
    // Central hears how many were salvaged and how many could not be read.
    eventually(
        "central told of the salvage",
        Duration::from_secs(20),
        || {
            central.of_type("storelink.deadletter.v1").iter().any(|e| {
                let reason = e["data"]["reason"].as_str().unwrap_or("");
                reason.contains("salvaged") && reason.contains("could not be read")
            })
        },
    )
    .await;
    let letter = central
        .of_type("storelink.deadletter.v1")
        .into_iter()
        .find(|e| e["data"]["source"] == "storage")
        .unwrap();
    let reason = letter["data"]["reason"].as_str().unwrap().to_string();
    let unreadable: u64 = regex::Regex::new(r"(\d+) damaged records could not be read")
        .unwrap()
        .captures(&reason)
        .and_then(|c| c[1].parse().ok())
        .unwrap_or(0);
    assert!(unreadable >= damaged.len() as u64, "{reason}");
    agent.stop().await;
}
