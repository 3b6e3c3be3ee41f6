//! Profile delta sync from central's HTTPS API, against a real TLS server with certificates
//! generated per run: paging and gzip, a page cut off mid-body that is fetched again from the
//! same cursor, ETag and 304 once caught up, erasures in the feed with their
//! acknowledgement, bearer auth, an unknown issuer, and a real `storelink` process killed with
//! SIGKILL mid-page that resumes from its cursor after the restart.

use crate::common;
use crate::common::https;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use https::{CentralHttps, Fault, Feed, erase, synthetic_profile, upsert};
use serde_json::json;
use storelink::config::Secret;
use storelink::profiles::ProfileStore;
use storelink::profiles::erasure::{Eraser, customer_ref};
use storelink::profiles::sync::{self, SyncError, Syncer};
use storelink::store::{Store, StoreOptions};
use tokio_util::sync::CancellationToken;

fn feed(generated: usize) -> Feed {
    Feed {
        generated,
        token: Some("s3cret".into()),
        ..Default::default()
    }
}

struct Local {
    _dir: tempfile::TempDir,
    store: Store,
    profiles: ProfileStore,
}

fn local() -> Local {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data"), &StoreOptions::default()).unwrap();
    let profiles = ProfileStore::open(&store).unwrap();
    Local {
        _dir: dir,
        store,
        profiles,
    }
}

fn syncer(central: &CentralHttps, local: &Local, ca: Option<&std::path::Path>) -> Syncer {
    let history = storelink::presence::history::History::open(&local.store, 30).unwrap();
    Syncer {
        client: sync::client(&storelink::tls::TlsFiles {
            ca_file: ca,
            ..Default::default()
        })
        .unwrap(),
        base_url: central.base_url() + "/",
        store_id: "s042".into(),
        token: Some(Secret::new("s3cret")),
        page_size: 1000,
        store: local.store.clone(),
        eraser: Eraser {
            profiles: local.profiles.clone(),
            records: vec![
                std::sync::Arc::new(history),
                std::sync::Arc::new(
                    storelink::offers::ledger::OfferLedger::open(&local.store).unwrap(),
                ),
            ],
            store_id: "s042".into(),
            clock: storelink::clock::system(),
            ingest: None,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_gzip_sync_resumes_a_cut_page_from_its_cursor_and_ends_in_304() {
    let mut f = feed(2500);
    f.extra = vec![
        erase("g0000005", 1, "req-1"),
        upsert(
            json!({"customer_id": "g0000007", "tier": "platinum", "cards": ["9000000000007"], "version": 2}),
        ),
        // Stale: central's older copy, arriving late.
        upsert(json!({"customer_id": "g0000008", "tier": "bronze", "version": 0})),
        // Erased above at version 1, so this stale upsert must not resurrect them.
        upsert(json!({"customer_id": "g0000005", "tier": "gold", "version": 1})),
    ];
    f.model = Some(json!({"r": 0.24, "alpha": 4.41, "a": 0.79, "b": 2.43, "unit_days": 7.0}));
    // The second page is cut off halfway through its body.
    f.fault = Some((1000, Fault::Cut));
    let central = CentralHttps::start(f).await;
    let local = local();
    let dir = tempfile::tempdir().unwrap();
    let ca = central.pki.write_ca(dir.path());
    let syncer = syncer(&central, &local, Some(&ca));
    let token = CancellationToken::new();

    let err = syncer.sync(&token, |_| {}).await.unwrap_err();
    assert!(matches!(err, SyncError::Request { .. }), "{err}");
    let state = syncer.state().unwrap();
    assert_eq!(state.cursor.as_deref(), Some("1000"), "cursor after page 1");
    assert!(!state.loaded);
    assert_eq!(local.profiles.len(), 1000);

    let report = syncer.sync(&token, |_| {}).await.unwrap();
    assert_eq!(report.pages, 2, "{report:?}");
    assert_eq!(report.erasures, 1);
    let state = syncer.state().unwrap();
    assert!(state.loaded);
    assert_eq!(
        state.cursor.as_deref(),
        Some("2504"),
        "2500 generated and 4 more"
    );
    assert_eq!(local.profiles.len(), 2499, "2500 minus the erased one");
    assert_eq!(local.profiles.tombstone("g0000005").unwrap(), Some(1));
    assert!(local.profiles.get("g0000005").unwrap().is_none());
    let p7 = local.profiles.by_card("9000000000007").unwrap().unwrap();
    assert_eq!(
        (p7.customer_id.as_str(), p7.tier.as_deref()),
        ("g0000007", Some("platinum"))
    );
    assert_eq!(
        local
            .profiles
            .get("g0000008")
            .unwrap()
            .unwrap()
            .tier
            .as_deref(),
        Some("gold"),
        "the stale copy lost"
    );
    assert_eq!(local.profiles.model().unwrap().unwrap().alpha, 4.41);
    // Every third synthetic customer consents to presence; g0000005 is not one of them.
    assert_eq!(local.profiles.presence_keys().unwrap().len(), 834);

    let cursors: Vec<Option<String>> = central.seen().iter().map(|s| s.cursor.clone()).collect();
    let c = |s: &str| Some(s.to_string());
    assert_eq!(
        cursors,
        vec![None, c("1000"), c("1000"), c("2000")],
        "the cut page is asked for again from the same cursor"
    );
    assert!(
        central
            .seen()
            .iter()
            .all(|s| s.gzip && s.limit == Some(1000))
    );

    // Caught up: the next sync gets an empty page that leaves the cursor, then a 304.
    let report = syncer.sync(&token, |_| {}).await.unwrap();
    assert_eq!((report.pages, report.not_modified), (1, false));
    let report = syncer.sync(&token, |_| {}).await.unwrap();
    assert!(report.not_modified, "{report:?}");
    assert_eq!(central.seen().last().unwrap().status, 304);

    // Something new: the ETag no longer matches and the change arrives.
    central.feed.lock().unwrap().extra.push(upsert(
        json!({"customer_id": "g0000009", "tier": "platinum", "version": 3}),
    ));
    let report = syncer.sync(&token, |_| {}).await.unwrap();
    assert_eq!((report.pages, report.upserts), (1, 1));
    assert_eq!(
        local
            .profiles
            .get("g0000009")
            .unwrap()
            .unwrap()
            .tier
            .as_deref(),
        Some("platinum")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_unknown_issuer_are_clear_errors() {
    let central = CentralHttps::start(feed(10)).await;
    let local = local();
    let dir = tempfile::tempdir().unwrap();
    let ca = central.pki.write_ca(dir.path());
    let token = CancellationToken::new();

    let mut wrong = syncer(&central, &local, Some(&ca));
    wrong.token = Some(Secret::new("nope"));
    let err = wrong.sync(&token, |_| {}).await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
    assert!(
        !err.contains("nope"),
        "the token stays out of errors: {err}"
    );

    // The system roots do not know the test CA.
    let untrusting = syncer(&central, &local, None);
    let err = untrusting
        .sync(&token, |_| {})
        .await
        .unwrap_err()
        .to_string();
    eprintln!("unknown issuer: {err}");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(local.profiles.is_empty());
}

struct Process(Child);

impl Process {
    fn spawn(config: &std::path::Path) -> Process {
        Process(
            Command::new(binary())
                .args(["run", "--config"])
                .arg(config)
                .env("RUST_LOG", "warn,storelink::profiles=info")
                .env("CENTRAL_TOKEN", "s3cret")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

async fn stats(api: &str) -> Option<serde_json::Value> {
    let r = get(format!("{api}/api/v1/profiles/stats")).await.ok()?;
    r.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_page_resumes_from_its_cursor_and_acknowledges_erasures() {
    let mut f = feed(5000);
    f.extra = vec![erase("g0000003", 1, "req-7")];
    f.fault = Some((3000, Fault::Stall));
    let central = CentralHttps::start(f).await;
    let broker = start_rumqttd();
    let events = Central::subscribe(broker, "storelink/v1/acme/s042/events/#").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = central.pki.write_ca(dir.path());
    let api_port = free_port();
    let api = format!("http://127.0.0.1:{api_port}");
    let text = config_text(&dir.path().join("data"), broker, api_port, &[])
        + &format!(
            "\n[central.https]\nbase_url = \"{}\"\ntoken_env = \"CENTRAL_TOKEN\"\nca_file = \"{}\"\n\n[profiles]\nsync_page_size = 1000\n",
            central.base_url(),
            ca.display()
        );
    let config = dir.path().join("storelink.toml");
    std::fs::write(&config, text).unwrap();

    let agent = Process::spawn(&config);
    eventually(
        "the agent to be stuck in the middle of page 4",
        Duration::from_secs(30),
        || {
            central
                .seen()
                .iter()
                .any(|s| s.cursor.as_deref() == Some("3000"))
        },
    )
    .await;
    // Pages 1-3 are in; give the agent a moment to be well into the stalled body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(agent); // SIGKILL
    let before = central.seen().len();

    let _agent = Process::spawn(&config);
    let mut done = None;
    for _ in 0..300 {
        if let Some(s) = stats(&api).await
            && s["profiles"] == 4999
        {
            done = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = done.expect("all profiles after the restart");
    assert_eq!(s["tombstones"], 1);
    let after: Vec<Option<String>> = central.seen()[before..]
        .iter()
        .map(|s| s.cursor.clone())
        .collect();
    assert_eq!(
        after.first().cloned().flatten().as_deref(),
        Some("3000"),
        "the restarted agent asks from its cursor, not from the start: {after:?}"
    );
    assert!(
        !after.contains(&None) && !after.contains(&Some("1000".into())),
        "{after:?}"
    );

    // Central hears the erasure, by request id and hashed customer, not by the id itself.
    events
        .wait_for_ids("storelink.erasure.v1", 1, Duration::from_secs(10))
        .await;
    let ack = &events.of_type("storelink.erasure.v1")[0];
    assert_eq!(ack["data"]["request_id"], "req-7");
    assert_eq!(ack["data"]["customer_ref"], customer_ref("g0000003"));
    assert_eq!(
        ack["data"]["profile_records"], 3,
        "profile, presence key and card index entry"
    );
    assert!(!ack.to_string().contains("g0000003"));
    let profile = get(format!("{api}/api/v1/profiles/g0000003"))
        .await
        .unwrap();
    assert_eq!(profile.status(), 410);
    // A card scanned at a till finds its customer through the index.
    let by_card: serde_json::Value = get(format!("{api}/api/v1/profiles/9000000004242"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_card["profile"]["customer_id"], "g0004242");

    // Support's view from the command line: what the agent knows, the key never shown.
    let out = Command::new(binary())
        .args(["profiles", "show", "9000000004242", "--url", &api])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["profile"]["customer_id"], "g0004242");
    assert_eq!(shown["has_presence_key"], true, "4242 = 3 × 1414 consents");
    let key = synthetic_profile(4242)["presence_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&key));
    let out = Command::new(binary())
        .args(["profiles", "show", "g0004242", "--url", &api])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new(binary())
        .args(["profiles", "show", "g0000003", "--url", &api])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an erased customer is not shown");
    assert!(String::from_utf8_lossy(&out.stderr).contains("erased"));
    let out = Command::new(binary())
        .args(["profiles", "stats", "--url", &api])
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["profiles"], 4999);
    assert_eq!(stats["cards"], 4999);
    assert_eq!(
        by_card["profile"]["first_name"],
        synthetic_profile(4242)["first_name"]
    );
}
