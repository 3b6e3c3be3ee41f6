//! Privacy by design, shown on state: a flood of 100,000 advertisements from devices that are
//! not consenting customers leaves no trace in the tracker, in sled, in the outbox, in the
//! metrics' labels or in the logs of a running agent.
//!
//! Its own test binary, apart from `tests/it`, because it installs the process-wide log
//! subscriber at trace level to read every log line the agent writes, on every thread: in the
//! shared binary it would capture (and slow down) every other test running beside it.

#[path = "../it/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TENANT_UUID, TestAgent, free_port, get, local};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storelink::presence::identity;
use storelink::profiles::{Profile, ProfileStore};
use storelink::store::{Store, StoreOptions, TreeName};

const FLOOD: usize = 100_000;

/// Everything any part of the agent logs, at every level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    identity::hex(bytes)
}

/// Random advertisements in the replay format: our service UUID with random EIDs, other
/// services, random iBeacons under our UUID and others', each with a random device hash.
/// Returns the file's text and every random token in it (payloads, device hashes).
fn flood(rng: &mut StdRng, start: jiff::Timestamp) -> (String, HashSet<String>) {
    let ours = uuid::Uuid::parse_str(TENANT_UUID).unwrap();
    let mut text = String::new();
    let mut tokens = HashSet::new();
    for i in 0..FLOOD {
        let device: [u8; 8] = rng.random();
        let t = start + jiff::SignedDuration::from_micros(i as i64 * 10);
        let mut line = serde_json::json!({
            "t": t.to_string(),
            "scanner": "lane-1",
            "rssi": rng.random_range(-95..-40),
            "device": hex(&device),
        });
        tokens.insert(hex(&device));
        match i % 4 {
            0 => {
                let eid: [u8; 8] = rng.random();
                tokens.insert(hex(&eid));
                line["service_data"] =
                    serde_json::json!({ ours.to_string(): format!("01{}", hex(&eid)) });
            }
            1 => {
                let data: [u8; 12] = rng.random();
                tokens.insert(hex(&data));
                let other = uuid::Uuid::from_bytes(rng.random());
                line["service_data"] = serde_json::json!({ other.to_string(): hex(&data) });
            }
            2 => {
                let mm: [u8; 4] = rng.random();
                tokens.insert(hex(&mm));
                let mut data = vec![0x02, 0x15];
                data.extend(ours.as_bytes());
                data.extend(mm);
                data.push(0xc5);
                line["manufacturer_data"] = serde_json::json!({ "76": hex(&data) });
            }
            _ => {
                let data: [u8; 20] = rng.random();
                tokens.insert(hex(&data));
                line["manufacturer_data"] = serde_json::json!({ "6": hex(&data) });
            }
        }
        text.push_str(&line.to_string());
        text.push('\n');
    }
    (text, tokens)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_devices_leaves_no_trace() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace,rumqttc=off,sled=off,hyper=off,reqwest=off")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);

    // Ten consenting customers, so the identity table is live while the flood passes.
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let profiles = ProfileStore::open(&store).unwrap();
        for i in 0..10 {
            let mut p = Profile::new(format!("c{i}"));
            p.consents.presence = true;
            p.presence_key = Some(rng.random());
            profiles.upsert(p).unwrap();
        }
        store.flush_blocking().unwrap();
    }
    let (text, tokens) = flood(&mut rng, jiff::Timestamp::now());
    let file = dir.path().join("flood.jsonl");
    std::fs::write(&file, text).unwrap();

    // Central is unreachable, so whatever the agent queued stays in the outbox to be seen.
    let nowhere = local(free_port());
    let extra = format!(
        r#"
[presence]
source = "replay"
service_uuid = "{TENANT_UUID}"

[presence.replay]
file = "{}"
speed = 0.0

[[presence.zones]]
name = "lane-1"
lane = "1"
scanners = ["lane-1"]
enter_m = 1.5
exit_m = 2.5
"#,
        file.display()
    );
    let agent = TestAgent::start_in(dir, nowhere, &[], &extra).await;
    let url = format!("{}/metrics", agent.api());
    let mut unrecognised = 0.0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while unrecognised < (FLOOD / 2) as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood was not consumed: {unrecognised} of {FLOOD}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let text = get(&url).await.unwrap().text().await.unwrap();
        unrecognised = metric(&text, "storelink_presence_unrecognised_total").unwrap_or(0.0);
    }
    let metrics_text = get(&url).await.unwrap().text().await.unwrap();
    // Exactly the half under our UUID reached the resolver (the source drops the rest at the
    // edge), and none of it was recognised.
    assert_eq!(unrecognised, (FLOOD / 2) as f64);
    assert_eq!(
        metric(&metrics_text, "storelink_presence_recognised_total"),
        None
    );
    assert_eq!(
        metric(&metrics_text, "storelink_presence_tracked"),
        Some(0.0)
    );

    // Let a few ticks pass, so anything time-based would have had its chance.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // State, not output: the tracker holds nobody, no tree holds presence, the outbox holds
    // no presence event, and no dead letter was made of an advertisement.
    let status = agent.board.get("presence").unwrap();
    assert!(
        status.detail.as_deref().unwrap_or("").contains("0 present"),
        "{status:?}"
    );
    assert_eq!(agent.store.tree(TreeName::Presence).unwrap().len(), 0);
    let stats = agent.outbox.stats().unwrap();
    let presence = stats
        .streams
        .iter()
        .find(|s| s.stream == "presence")
        .unwrap();
    assert_eq!(presence.counts.depth, 0, "{stats:?}");
    assert!(agent.deadletters.is_empty());

    // No random token (device hash, EID, iBeacon major/minor, foreign payload) in any log
    // line or metric.
    let store_dir = agent.stop_keep().await;
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logs.contains("storelink"), "the log capture works");
    // Any 8 hex digits of a token in a log line or metric would be a trace.
    let pieces: HashSet<&str> = tokens
        .iter()
        .flat_map(|t| (0..=t.len().saturating_sub(8)).map(move |i| &t[i..i + 8]))
        .collect();
    for (what, text) in [("logs", &logs), ("metrics", &metrics_text)] {
        let lower = text.to_ascii_lowercase();
        for word in lower.split(|c: char| !c.is_ascii_hexdigit()) {
            for i in 0..=word.len().saturating_sub(8) {
                if word.len() >= 8 {
                    assert!(
                        !pieces.contains(&word[i..i + 8]),
                        "{what} carry a token of an unknown device: {word}"
                    );
                }
            }
        }
    }
    // And none in the database files: the flood's tokens are not anywhere on disk, in any form.
    let mut on_disk = Vec::new();
    for entry in walk(store_dir.path()) {
        if entry.extension().is_some_and(|e| e == "jsonl") {
            continue; // the replay file itself
        }
        on_disk.extend(std::fs::read(&entry).unwrap_or_default());
    }
    // Tokens of 8 bytes or more, by their first 8 bytes: shorter ones would match by chance.
    let wanted: HashSet<[u8; 8]> = tokens
        .iter()
        .filter(|t| t.len() >= 16)
        .map(|t| {
            let mut b = [0u8; 8];
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap();
            }
            b
        })
        .collect();
    assert!(wanted.len() > FLOOD / 2);
    assert!(on_disk.len() > 1000, "the store has files");
    // As raw bytes, and as hex text (which is how JSON in the store would carry them).
    let wanted_hex: HashSet<Vec<u8>> = wanted.iter().map(|b| hex(b).into_bytes()).collect();
    for w in on_disk.windows(8) {
        assert!(
            !wanted.contains(<&[u8; 8]>::try_from(w).unwrap()),
            "the store holds bytes of an unknown device"
        );
    }
    for w in on_disk.windows(16) {
        assert!(
            !wanted_hex.contains(w),
            "the store holds the hex of an unknown device's bytes"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
