//! `storelink bridge`'s email-tool sinks against a local HTTPS server (rustls, rcgen
//! certificates) that plays Klaviyo, HubSpot, Maileon and a webhook receiver. It checks each
//! tool's documented request shape (path, auth, headers, body fields, the webhook's HMAC),
//! answers 429 with Retry-After and 5xx at times, and records what it took.
//!
//! Triggers arrive over mosquitto as the stores send them, one of them twice and one from a
//! second store for the same occasion; central's contact table in a real PostgreSQL says who
//! each tool knows and who may be mailed. Each trigger must reach each tool that takes it
//! exactly once, and none may reach a tool for a customer without marketing consent.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::https::Pki;
use common::postgres::{Postgres, require_postgres};
use common::{Mosquitto, require_external};
use serde_json::{Value, json};
use storelink::bridge::config::BridgeConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::bridge::{publish_as_a_store, start_bridge};

const WEBHOOK_KEY: &str = "w-signing-key";

/// One request a tool took (answered 2xx).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Took {
    tool: &'static str,
    key: String,
    external_id: String,
    trigger: String,
}

#[derive(Default)]
struct Tools {
    /// Per tool, the statuses to answer next before taking anything (then 2xx).
    script: HashMap<&'static str, VecDeque<u16>>,
    took: Vec<Took>,
    /// Requests that broke a tool's documented shape.
    problems: Vec<String>,
    /// Requests answered, by tool and status.
    answered: BTreeMap<(&'static str, u16), usize>,
}

type Shared = Arc<Mutex<Tools>>;

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Checks the shape; on success the request is scripted or taken.
fn answer(
    tools: &Shared,
    tool: &'static str,
    shape: Result<Took, String>,
    success: StatusCode,
) -> Response {
    let mut t = tools.lock().unwrap();
    let took = match shape {
        Ok(took) => took,
        Err(problem) => {
            t.problems.push(format!("{tool}: {problem}"));
            *t.answered.entry((tool, 400)).or_default() += 1;
            return (StatusCode::BAD_REQUEST, problem).into_response();
        }
    };
    if let Some(status) = t.script.get_mut(tool).and_then(VecDeque::pop_front) {
        *t.answered.entry((tool, status)).or_default() += 1;
        let status = StatusCode::from_u16(status).unwrap();
        let mut r = (status, "scripted").into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
        }
        return r;
    }
    *t.answered.entry((tool, success.as_u16())).or_default() += 1;
    t.took.push(took);
    success.into_response()
}

fn need(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_string()) }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Klaviyo, Create Event: `POST /api/events`, JSON:API, private key, revision header.
async fn klaviyo(State(t): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    let shape = (|| {
        need(
            header(&h, "authorization") == "Klaviyo-API-Key k-secret",
            "auth",
        )?;
        need(header(&h, "revision") == "2024-10-15", "revision header")?;
        need(
            header(&h, "content-type").starts_with("application/vnd.api+json"),
            "content type",
        )?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let a = &v["data"]["attributes"];
        need(v["data"]["type"] == "event", "data.type")?;
        need(a["metric"]["data"]["type"] == "metric", "metric type")?;
        let trigger = text(&a["properties"]["trigger"]);
        need(
            a["metric"]["data"]["attributes"]["name"] == format!("storelink {trigger}").as_str(),
            "metric name",
        )?;
        need(a["profile"]["data"]["type"] == "profile", "profile type")?;
        need(a["time"].as_str().is_some(), "time")?;
        need(
            a["properties"].get("customer_id").is_none(),
            "central's customer id leaked",
        )?;
        Ok(Took {
            tool: "klaviyo",
            key: text(&a["unique_id"]),
            external_id: text(&a["profile"]["data"]["attributes"]["external_id"]),
            trigger,
        })
    })();
    answer(&t, "klaviyo", shape, StatusCode::ACCEPTED)
}

/// HubSpot, send a custom event occurrence: `POST /events/v3/send`, bearer token.
async fn hubspot(State(t): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    let shape = (|| {
        need(header(&h, "authorization") == "Bearer h-secret", "auth")?;
        need(
            header(&h, "content-type").starts_with("application/json"),
            "content type",
        )?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let trigger = text(&v["properties"]["trigger"]);
        need(
            v["eventName"] == format!("pe123_storelink_{trigger}").as_str(),
            "eventName",
        )?;
        need(v["occurredAt"].as_str().is_some(), "occurredAt")?;
        need(v.get("email").is_none(), "an email address travelled")?;
        Ok(Took {
            tool: "hubspot",
            key: text(&v["uuid"]),
            external_id: text(&v["objectId"]),
            trigger,
        })
    })();
    answer(&t, "hubspot", shape, StatusCode::NO_CONTENT)
}

/// Maileon, create transactions: `POST /1.0/transactions`, basic auth with the API key.
async fn maileon(State(t): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    let shape = (|| {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("m-secret");
        need(
            header(&h, "authorization") == format!("Basic {basic}"),
            "auth",
        )?;
        need(
            header(&h, "content-type").starts_with("application/vnd.maileon.api+json"),
            "content type",
        )?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let list = v.as_array().ok_or("not a list of transactions")?;
        need(list.len() == 1, "one transaction")?;
        let tx = &list[0];
        need(tx["type"] == 42, "transaction type id")?;
        Ok(Took {
            tool: "maileon",
            key: text(&tx["content"]["storelink_key"]),
            external_id: text(&tx["contact"]["external_id"]),
            trigger: text(&tx["content"]["trigger"]),
        })
    })();
    answer(&t, "maileon", shape, StatusCode::CREATED)
}

/// A webhook receiver that checks the signature as a receiver would: HMAC-SHA256 of
/// `{timestamp}.{body}` with the shared key.
async fn webhook(State(t): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    let shape = (|| {
        use hmac::Mac;
        let ts = header(&h, "x-storelink-timestamp");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_KEY.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&body);
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        need(
            header(&h, "x-storelink-signature") == format!("sha256={expected}"),
            "signature",
        )?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let key = header(&h, "idempotency-key").to_string();
        need(v["idempotency_key"] == key.as_str(), "idempotency key")?;
        need(v["properties"]["store"].is_string(), "properties")?;
        Ok(Took {
            tool: "webhook",
            key,
            external_id: text(&v["customer"]),
            trigger: text(&v["trigger"]),
        })
    })();
    answer(&t, "webhook", shape, StatusCode::OK)
}

fn trigger_event(
    store: &'static str,
    n: u32,
    customer: &str,
    trigger: &str,
    occasion: &str,
) -> (&'static str, Vec<u8>) {
    let mut data = json!({
        "store": store, "customer_id": customer, "trigger": trigger, "occasion": occasion,
        "activity": "loyal", "as_of": "2026-12-01", "detected": "schedule",
    });
    if trigger == "winback_due" {
        data["group"] = json!("coffee");
        data["due"] = json!("2026-11-01");
        data["days_overdue"] = json!(30);
    }
    let bytes = storelink::events::encode(
        storelink::events::EventKind::Trigger,
        &format!("{store}:trigger:{n:020x}"),
        store,
        jiff::Timestamp::now(),
        &data,
    );
    (store, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trigger_reaches_each_email_tool_once_and_none_without_consent() {
    let test = "bridge_email::each_trigger_reaches_each_email_tool_once";
    if !require_external("mosquitto", test) || !require_postgres(test) {
        return;
    }
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    // The recorder before anything counts (the CLI installs it before the bridge starts too).
    let metrics = storelink::telemetry::metrics_handle();
    let pg = Postgres::start();
    let broker = Mosquitto::start();

    // The tools, on one TLS server: every tool refuses its first requests.
    let tools: Shared = Arc::default();
    {
        let mut t = tools.lock().unwrap();
        t.script.insert("klaviyo", [429, 503].into());
        t.script.insert("hubspot", [503].into());
        t.script.insert("maileon", [429].into());
        t.script.insert("webhook", [500, 503].into());
    }
    let pki = Pki::generate();
    let server = storelink::sim::https::server_config(
        vec![pki.cert.clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let app = Router::new()
        .route("/api/events", post(klaviyo))
        .route("/events/v3/send", post(hubspot))
        .route("/1.0/transactions", post(maileon))
        .route("/hooks/storelink", post(webhook))
        .with_state(tools.clone());
    let stop_server = tokio_util::sync::CancellationToken::new();
    let _server = storelink::sim::https::serve_tls(listener, server, app, stop_server.clone());
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(dir.path());

    let text = format!(
        r#"
[broker]
url = "mqtt://{broker}"
client_id = "bridge-email"
shared = false

[postgres]
url = "{pg}"
batch_ms = 10

[[email]]
name = "klaviyo"
kind = "klaviyo"
url = "{base}"
token_env = "K"
ca_file = "{ca}"
rate_per_s = 50

[[email]]
name = "hubspot"
kind = "hubspot"
url = "{base}"
token_env = "H"
ca_file = "{ca}"
rate_per_s = 50
contact_wait_s = 2
events = {{ winback_due = "pe123_storelink_winback_due", birthday = "pe123_storelink_birthday", first_purchase = "pe123_storelink_first_purchase" }}

[[email]]
name = "maileon"
kind = "maileon"
url = "{base}"
token_env = "M"
ca_file = "{ca}"
rate_per_s = 50
events = {{ winback_due = "42" }}

[[email]]
name = "hooks"
kind = "webhook"
url = "{base}/hooks/storelink"
secret_env = "W"
ca_file = "{ca}"
rate_per_s = 50
"#,
        broker = broker.addr,
        pg = pg.url(),
        ca = ca.display(),
    );
    let env: HashMap<String, String> = [
        ("K", "k-secret"),
        ("H", "h-secret"),
        ("M", "m-secret"),
        ("W", WEBHOOK_KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = BridgeConfig::parse(&text, "bridge.toml", &env).unwrap();
    let bridge = start_bridge(config.clone()).await;

    // Central's CRM: c1 and c4 may be mailed; c2 is mapped but withdrew consent; c3 is known
    // to every tool but HubSpot.
    let db = pg.client().await;
    for (customer, tools_known, consent) in [
        ("c1", &["klaviyo", "hubspot", "maileon", "hooks"][..], true),
        ("c2", &["klaviyo", "hubspot", "maileon", "hooks"][..], false),
        ("c3", &["klaviyo", "maileon", "hooks"][..], true),
        ("c4", &["klaviyo", "hubspot", "maileon", "hooks"][..], true),
    ] {
        for tool in tools_known {
            db.execute(
                "INSERT INTO storelink.email_contacts (customer_id, tool, external_id, marketing)
                 VALUES ($1, $2, $3, $4)",
                &[&customer, tool, &format!("{tool}-{customer}"), &consent],
            )
            .await
            .unwrap();
        }
    }

    // The stores' triggers: c4's sent twice (a store's resend), c1's win-back from a second
    // store as well (the same occasion: one mail).
    let events = [
        trigger_event("s042", 1, "c1", "winback_due", "coffee:2026-10-01"),
        trigger_event("s042", 2, "c1", "birthday", "2026"),
        trigger_event("s042", 3, "c2", "winback_due", "coffee:2026-10-03"),
        trigger_event("s042", 4, "c3", "first_purchase", ""),
        trigger_event("s042", 5, "c4", "winback_due", "coffee:2026-10-05"),
        trigger_event("s042", 5, "c4", "winback_due", "coffee:2026-10-05"),
        trigger_event("s043", 6, "c1", "winback_due", "coffee:2026-10-01"),
    ];
    let messages: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|(store, e)| {
            (
                format!("storelink/v1/acme/{store}/events/trigger"),
                e.clone(),
            )
        })
        .collect();
    publish_as_a_store(broker.addr, &messages).await;

    // Queued, once per occasion: 5 each for Klaviyo, HubSpot (c3's waits for a contact that
    // never comes) and the webhook, 3 win-backs for Maileon.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let row = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE state = 'pending')
                 FROM storelink.email_queue",
                &[],
            )
            .await
            .unwrap();
        let (all, pending): (i64, i64) = (row.get(0), row.get(1));
        if all == 18 && pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not drain: {all} rows, {pending} pending; tools answered {:?}",
            tools.lock().unwrap().answered
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let states: BTreeMap<(String, String, String), String> = db
        .query(
            "SELECT sink, customer_id, trigger, state FROM storelink.email_queue",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect();
    let state = |sink: &str, c: &str, t: &str| {
        states
            .get(&(sink.to_string(), c.to_string(), t.to_string()))
            .cloned()
            .unwrap_or_else(|| format!("no row for {sink} {c} {t}: {states:?}"))
    };
    for sink in ["klaviyo", "hubspot", "maileon", "hooks"] {
        assert_eq!(state(sink, "c1", "winback_due"), "sent");
        assert_eq!(state(sink, "c2", "winback_due"), "no_consent");
        assert_eq!(state(sink, "c4", "winback_due"), "sent");
    }
    assert_eq!(state("hubspot", "c3", "first_purchase"), "no_contact");
    assert_eq!(state("klaviyo", "c3", "first_purchase"), "sent");

    let t = {
        let t = tools.lock().unwrap();
        Tools {
            script: HashMap::new(),
            took: t.took.clone(),
            problems: t.problems.clone(),
            answered: t.answered.clone(),
        }
    };
    assert!(t.problems.is_empty(), "request shapes: {:?}", t.problems);
    // Exactly once per tool and key, and the set each tool should have.
    let mut seen = BTreeSet::new();
    for took in &t.took {
        assert!(
            seen.insert((took.tool, took.key.clone())),
            "{took:?} arrived twice"
        );
        assert!(!took.external_id.ends_with("-c2"), "no consent: {took:?}");
    }
    let got: BTreeSet<(&str, String, String)> = t
        .took
        .iter()
        .map(|x| (x.tool, x.external_id.clone(), x.trigger.clone()))
        .collect();
    let mut want = BTreeSet::new();
    for (tool, sink) in [("klaviyo", "klaviyo"), ("webhook", "hooks")] {
        for (c, tr) in [
            ("c1", "winback_due"),
            ("c1", "birthday"),
            ("c3", "first_purchase"),
            ("c4", "winback_due"),
        ] {
            want.insert((tool, format!("{sink}-{c}"), tr.to_string()));
        }
    }
    for (c, tr) in [
        ("c1", "winback_due"),
        ("c1", "birthday"),
        ("c4", "winback_due"),
    ] {
        want.insert(("hubspot", format!("hubspot-{c}"), tr.to_string()));
    }
    for c in ["c1", "c4"] {
        want.insert(("maileon", format!("maileon-{c}"), "winback_due".to_string()));
    }
    assert_eq!(got, want);
    // Every tool's refusals were met: the 429s and 5xx were answered, and retried.
    for (tool, status) in [
        ("klaviyo", 429),
        ("klaviyo", 503),
        ("hubspot", 503),
        ("maileon", 429),
        ("webhook", 500),
        ("webhook", 503),
    ] {
        assert_eq!(
            t.answered.get(&(tool, status)),
            Some(&1),
            "{:?}",
            t.answered
        );
    }

    // The operator's view: the bridge's HTTP face on a free port, as `storelink bridge`
    // serves it, and the summary `storelink bridge status` prints from it.
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_url = format!("http://{}", ops.local_addr().unwrap());
    let state = storelink::bridge::ops::OpsState {
        subscribed: bridge.watch.subscribed.subscribe(),
        totals: bridge.watch.totals.subscribe(),
        started_at: jiff::Timestamp::now(),
        postgres: config.postgres.clone(),
        sinks: config.email.iter().map(|e| e.name.clone()).collect(),
        metrics,
    };
    let stop_ops = tokio_util::sync::CancellationToken::new();
    let _ops = storelink::bridge::ops::serve(ops, state, stop_ops.clone());
    for (path, want) in [("/healthz", 200), ("/readyz", 200)] {
        let r = common::get(format!("{ops_url}{path}")).await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
    let status: storelink::bridge::ops::Status = common::get(format!("{ops_url}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(status.subscribed && status.database.is_ok(), "{status:?}");
    // Seven messages: one an exact resend, so six new events.
    assert_eq!((status.received, status.new, status.duplicates), (7, 6, 1));
    let sink = |name: &str| {
        status
            .email
            .iter()
            .find(|e| e.sink == name)
            .unwrap()
            .clone()
    };
    let k = sink("klaviyo");
    assert_eq!((k.pending, k.sent, k.no_consent, k.failed), (0, 4, 1, 0));
    let h = sink("hubspot");
    assert_eq!((h.sent, h.no_consent, h.no_contact), (3, 1, 1));
    assert_eq!(sink("maileon").sent, 2);
    let summary = storelink::cli::bridge::summary(&status);
    assert!(summary.contains("broker:   subscribed"), "{summary}");
    assert!(
        summary.contains(
            "email hubspot: 0 pending, 3 sent, 1 without consent, 1 without contact, 0 failed"
        ),
        "{summary}"
    );
    let metrics = common::get(format!("{ops_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "storelink_bridge_events_total",
        "storelink_bridge_batch_events",
        "storelink_bridge_email_total{",
        "storelink_bridge_email_pending{",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(
        metrics.contains(r#"outcome="no_consent",sink="hubspot""#)
            || metrics.contains(r#"sink="hubspot",outcome="no_consent""#),
        "{metrics}"
    );
    bridge.stop().await;
    stop_ops.cancel();
    stop_server.cancel();
}
