//! The cashier's lane display and retail IT's endpoints, through the agent's real HTTP server:
//! - the lane page in real headless chromium (driven over WebDriver by chromedriver): idle,
//!   then a loyalty transaction started at lane 3 puts the customer's first name and offer on
//!   it live, "accepted" becomes a `storelink.prompt.v1` event at central, and stopping the
//!   agent raises the offline banner;
//! - lane tokens (401 for a wrong one, a cookie scoped to the lane for the right one) and the
//!   admin token for peers that are not the gateway itself;
//! - `/metrics` parsed as Prometheus text, its counters moving with traffic.
//!
//! WebDriver (fantoccini + Debian's chromedriver) rather than Playwright: the test stays in
//! Rust and in `cargo test`, needs no Node.js toolchain or npm download in CI, and drives the
//! same Debian chromium the probe checked.

use crate::common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Central, TestAgent, eventually, find_program, free_port, local, require_external};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use storelink::offers::live::Slot;
use storelink::sim::SimRegister;

fn campaign_set() -> Value {
    common::games_campaign(
        1,
        json!({"de": "-20% auf Spiele", "en": "20% off games"}),
        json!({"value": 1500}),
    )
}

async fn with_offers(broker: SocketAddr, registers: &[&str]) -> TestAgent {
    let agent = TestAgent::start(broker, registers).await;
    agent
        .profiles
        .upsert_many(vec![common::gamer()], &[])
        .unwrap();
    agent
        .offers
        .install(Slot::File, campaign_set().to_string().as_bytes())
        .unwrap();
    agent
}

async fn post_event(api: &str, body: Value) -> (reqwest::StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{api}/pos/v1/events"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// chromedriver on a free port, killed on drop.
struct ChromeDriver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let port = free_port();
        let child = Command::new(find_program("chromedriver").expect("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        common::wait_for_port(local(port), Duration::from_secs(20));
        ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn browser(&self) -> Client {
        let chromium = find_program("chromium").expect("chromium");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                // The flags the probe found necessary here: no sandbox as root, and nothing
                // that tries to reach Google through the closed network.
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", self._profile.path().display()),
                ]
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session through chromedriver")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn text_of(browser: &Client, id: &str) -> String {
    match browser.find(Locator::Id(id)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn body_has_class(browser: &Client, class: &str) -> bool {
    browser
        .execute(
            "return document.body.classList.contains(arguments[0]);",
            vec![json!(class)],
        )
        .await
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lane_display_shows_the_prompt_live_and_the_cashier_accepts_it() {
    const TEST: &str = "the_lane_display_shows_the_prompt_live_and_the_cashier_accepts_it";
    if !require_external("chromium", TEST) || !require_external("chromedriver", TEST) {
        return;
    }
    storelink::install_crypto_provider();
    let broker = common::start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/s042/events/#").await;
    let agent = with_offers(broker, &["lane-3"]).await;
    let api = agent.api();
    let token = agent.api.lanes.auth.token("3");

    let driver = ChromeDriver::start();
    let browser = driver.browser().await;
    browser
        .goto(&format!("{api}/lanes/3?token={token}&lang=en"))
        .await
        .unwrap();
    // Idle, calm, and connected.
    let deadline = Instant::now() + Duration::from_secs(10);
    while text_of(&browser, "idle-title").await != "Ready" {
        assert!(Instant::now() < deadline, "the idle state never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!body_has_class(&browser, "active").await);
    assert_eq!(text_of(&browser, "lane-label").await, "Lane 3");
    // The page's own requests carry the token in its cookie from here on.
    let cookie = browser.get_named_cookie("storelink_lane").await.unwrap();
    assert_eq!(cookie.value(), token);
    assert_eq!(cookie.path(), Some("/lanes/3"));
    assert_eq!(cookie.http_only(), Some(true));
    // Let the stream open before the prompt is pushed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while body_has_class(&browser, "offline").await
        || agent.api.lanes.offers.lane_prompt("3").is_some()
    {
        assert!(Instant::now() < deadline, "the display never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A loyalty transaction starts at lane 3's register.
    let pushed = Instant::now();
    let (status, effects) = post_event(
        &api,
        json!({"type": "transaction_started", "register": "lane-3", "loyalty_id": "9990001"}),
    )
    .await;
    assert_eq!(status, 200, "{effects}");
    loop {
        if text_of(&browser, "name").await == "Ada"
            && text_of(&browser, "offer-text").await == "20% off games"
        {
            break;
        }
        assert!(
            pushed.elapsed() < Duration::from_secs(1),
            "the prompt was not on the display within 1 s: name {:?}, offer {:?}",
            text_of(&browser, "name").await,
            text_of(&browser, "offer-text").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(body_has_class(&browser, "active").await);
    assert_eq!(text_of(&browser, "tier").await, "gold");
    assert_eq!(text_of(&browser, "points").await, "420 points");
    assert_eq!(text_of(&browser, "offer-code").await, "Code: GAMES20");
    assert!(
        !body_has_class(&browser, "ask").await,
        "the card was scanned: no need to ask for it"
    );
    // Nothing that identifies the customer beyond the first name reaches the display.
    let source = browser.source().await.unwrap();
    assert!(!source.contains("c77") && !source.contains("9990001"));

    // The cashier taps "Accepted": the prompt event reaches central through the outbox.
    browser
        .find(Locator::Id("accepted"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let prompt_id = effects["prompt"]["id"].as_str().unwrap().to_string();
    eventually(
        "the accepted prompt event at central",
        Duration::from_secs(10),
        || {
            central.of_type("storelink.prompt.v1").iter().any(|e| {
                e["data"]["action"] == "accepted" && e["data"]["prompt_id"] == prompt_id.as_str()
            })
        },
    )
    .await;
    assert!(!body_has_class(&browser, "failed").await);

    // The agent goes away: the banner says the display may be stale.
    agent.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !body_has_class(&browser, "offline").await {
        assert!(
            Instant::now() < deadline,
            "no offline banner after the agent stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        text_of(&browser, "offline")
            .await
            .starts_with("Agent unreachable")
    );
    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lane_tokens_and_the_admin_token_guard_the_server() {
    storelink::install_crypto_provider();
    let broker = common::start_rumqttd();
    let agent = with_offers(broker, &["lane-3", "lane-4"]).await;
    let api = agent.api();
    let auth = agent.api.lanes.auth.clone();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let status = |url: String| {
        let http = http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };

    // No token, a wrong one, and lane 4's token on lane 3: 401 for the page and the stream.
    assert_eq!(status(format!("{api}/lanes/3")).await, 401);
    assert_eq!(status(format!("{api}/lanes/3?token=00ff")).await, 401);
    let t4 = auth.token("4");
    assert_eq!(status(format!("{api}/lanes/3?token={t4}")).await, 401);
    assert_eq!(
        status(format!("{api}/lanes/3/events?token={t4}")).await,
        401
    );
    let r = http
        .post(format!("{api}/lanes/3/prompts/x/accepted?token={t4}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The right token opens the page and sets the lane-scoped cookie, which then suffices.
    let t3 = auth.token("3");
    let r = http
        .get(format!("{api}/lanes/3?token={t3}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("storelink_lane={t3};")),
        "{cookie}"
    );
    assert!(cookie.contains("Path=/lanes/3;") && cookie.contains("HttpOnly"));
    let r = http
        .get(format!("{api}/lanes/3/events"))
        .header("cookie", format!("storelink_lane={t3}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    drop(r);
    // A prompt that is not on the lane is a conflict, not a silent success.
    let r = http
        .post(format!("{api}/lanes/3/prompts/nope/accepted"))
        .header("cookie", format!("storelink_lane={t3}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // `shown` is the agent's to record, not the cashier's.
    let r = http
        .post(format!("{api}/lanes/3/prompts/nope/shown"))
        .header("cookie", format!("storelink_lane={t3}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Admin endpoints from the gateway itself (loopback): open.
    assert_eq!(status(format!("{api}/api/v1/status")).await, 200);
    assert_eq!(status(format!("{api}/metrics")).await, 200);
    let lanes: Value = http
        .get(format!("{api}/api/v1/lanes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(lanes["lanes"][0]["display"], format!("/lanes/3?token={t3}"));

    // The same router for a peer on the store network: the admin token or nothing. (The
    // machine has only loopback, so the peer address is declared; the requests are real.)
    let token = storelink::config::Secret::new("an-admin-token-long-enough");
    let mut state = agent.api.clone();
    state.admin = storelink::cashier::auth::AdminAuth::new(Some(&token));
    let lan_peer: SocketAddr = "192.168.7.20:40000".parse().unwrap();
    let router = storelink::cashier::api::router(state)
        .layer(axum::extract::connect_info::MockConnectInfo(lan_peer));
    let listener = tokio::net::TcpListener::bind(local(0)).await.unwrap();
    let lan = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    for path in [
        "/api/v1/status",
        "/metrics",
        "/api/v1/lanes",
        "/api/v1/offers/stats",
    ] {
        assert_eq!(status(format!("{lan}{path}")).await, 401, "{path}");
        let r = http
            .get(format!("{lan}{path}"))
            .bearer_auth("a-wrong-token-of-some-length")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = http
            .get(format!("{lan}{path}"))
            .bearer_auth("an-admin-token-long-enough")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = http
        .post(format!("{lan}/pos/v1/events"))
        .json(&json!({"type": "transaction_ended", "lane": "3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "registers off the gateway need the token too"
    );
    // Probes stay open: a load balancer or systemd check has no token.
    assert_eq!(status(format!("{lan}/healthz")).await, 200);
    assert_eq!(status(format!("{lan}/readyz")).await, 200);
    // Lane displays do not take the admin token instead of their own.
    assert_eq!(
        status(format!("{lan}/lanes/3?token=an-admin-token-long-enough")).await,
        401
    );
    agent.stop().await;
}

fn sample(families: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    families
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

async fn scrape(api: &str) -> prometheus_parse::Scrape {
    let text = reqwest::get(format!("{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("/metrics is Prometheus text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    storelink::install_crypto_provider();
    let broker = common::start_rumqttd();
    let agent = with_offers(broker, &["lane-7"]).await;
    let api = agent.api();
    let before = scrape(&api).await;
    let tx = |s: &prometheus_parse::Scrape| {
        sample(s, "storelink_transactions_total", &[("register", "lane-7")])
    };

    let mut register = SimRegister::new("s042", "lane-7", Some("7"), 5);
    let start: jiff::Timestamp = "2026-11-23T08:00:00Z".parse().unwrap();
    let ids = common::net::ring_up_with(&agent, &mut register, 25, start, || {}).await;
    assert_eq!(ids.len(), 25);
    let (status, _) = post_event(
        &api,
        json!({"type": "customer_identified", "register": "lane-7", "loyalty_id": "9990001"}),
    )
    .await;
    assert_eq!(status, 200);
    // A frame that is not a transaction: a dead letter.
    let mut client = agent.client(0).await;
    client.send_raw(b"{not json\n").await.unwrap();
    eventually("the dead letter", Duration::from_secs(5), || {
        agent.deadletters.len() == 1
    })
    .await;
    eventually("delivery to the broker", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;

    let after = scrape(&api).await;
    assert_eq!(tx(&after) - tx(&before), 25.0);
    assert!(
        sample(&after, "storelink_offer_decisions_total", &[])
            > sample(&before, "storelink_offer_decisions_total", &[])
    );
    assert!(
        sample(&after, "storelink_deadletters_total", &[])
            > sample(&before, "storelink_deadletters_total", &[])
    );
    assert!(
        sample(
            &after,
            "storelink_uplink_delivered_total",
            &[("path", "mqtt")]
        ) >= sample(
            &before,
            "storelink_uplink_delivered_total",
            &[("path", "mqtt")]
        ) + 25.0
    );
    // The recorder is process-wide and the other tests' agents in this binary connect and
    // stop meanwhile, so only the gauge's presence is this test's to check, not its value.
    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric == "storelink_uplink_connected"
                && s.labels.get("path") == Some("mqtt")),
        "MQTT connection state missing from /metrics"
    );
    // The families retail IT alerts on are all there, per stream where they are per stream.
    for family in [
        "storelink_outbox_depth",
        "storelink_outbox_oldest_age_seconds",
        "storelink_transactions_total",
        "storelink_deadletters_total",
        "storelink_offer_decisions_total",
    ] {
        assert!(
            after.samples.iter().any(|s| s.metric == family),
            "{family} missing from /metrics"
        );
    }
    // Per stream. (Their values are shared with the other agents in this test binary, so
    // the drained state is checked on this agent's own statistics.)
    for family in [
        "storelink_outbox_depth",
        "storelink_outbox_oldest_age_seconds",
    ] {
        assert!(
            after
                .samples
                .iter()
                .any(|s| s.metric == family && s.labels.get("stream") == Some("transaction")),
            "{family} is not per stream"
        );
    }
    let stats = agent.outbox.stats().unwrap();
    assert!(stats.streams.iter().all(|s| s.oldest_age_s.is_none()));
    agent.stop().await;
}

async fn status_of(url: &str) -> (i32, String, String) {
    let url = url.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(common::binary())
            .args(["status", "--url", &url, "--timeout-s", "3"])
            .env_remove("STORELINK_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storelink_status_exits_0_healthy_1_degraded_2_unreachable() {
    storelink::install_crypto_provider();
    let broker = common::start_rumqttd();
    let healthy = TestAgent::start(broker, &["lane-1"]).await;
    eventually("the uplink connected", Duration::from_secs(10), || {
        healthy.api.report().health == storelink::cashier::api::Health::Healthy
    })
    .await;
    let (code, out, err) = status_of(&healthy.api()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("· HEALTHY"), "{out}");
    assert!(
        out.contains("uplink.mqtt") && out.contains("central: last reached"),
        "{out}"
    );

    // Central's broker is not there: the agent runs, holds events, and says it is degraded.
    let nowhere = local(free_port());
    let degraded = TestAgent::start(nowhere, &["lane-2"]).await;
    let (code, out, err) = status_of(&degraded.api()).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("· DEGRADED"), "{out}");
    assert!(out.contains("central: not reached"), "{out}");

    // Nothing listens: unreachable.
    let (code, out, err) = status_of(&format!("http://{}", local(free_port()))).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("UNREACHABLE"), "{err}");
    healthy.stop().await;
    degraded.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_events_on_a_json_lines_connection_answer_with_effects() {
    storelink::install_crypto_provider();
    let broker = common::start_rumqttd();
    let agent = with_offers(broker, &["lane-3"]).await;
    let mut client = agent.client(0).await;
    // No register or lane in the event: the connection says which register it is.
    client
        .send_raw(b"{\"type\": \"customer_identified\", \"loyalty_id\": \"9990001\"}\n")
        .await
        .unwrap();
    let reply = client.reply().await.unwrap();
    let effects: Value = serde_json::from_str(
        reply
            .strip_prefix("effects ")
            .unwrap_or_else(|| panic!("not an effects reply: {reply}")),
    )
    .unwrap();
    assert_eq!(effects["lane"], "3");
    assert_eq!(effects["prompt"]["first_name"], "Ada");
    assert_eq!(effects["offers"][0]["code"], "GAMES20");
    // The same prompt is on the lane for its display.
    assert_eq!(
        agent.offers.lane_prompt("3").unwrap().id,
        effects["prompt"]["id"].as_str().unwrap()
    );
    // A transaction on the same connection still gets its usual reply.
    let mut register = SimRegister::new("s042", "lane-3", Some("3"), 9);
    let tx = register.next("2026-11-23T08:00:00Z".parse().unwrap());
    client.send(&tx).await.unwrap();
    assert_eq!(client.reply().await.unwrap(), format!("ok {}", tx.id));
    // An event for a lane nobody knows is refused on its line, not dead-lettered.
    client
        .send_raw(b"{\"type\": \"transaction_ended\", \"register\": \"nope\"}\n")
        .await
        .unwrap();
    let reply = client.reply().await.unwrap();
    assert!(reply.starts_with("err "), "{reply}");
    assert_eq!(agent.deadletters.len(), 0);
    agent.stop().await;
}

/// A sale of one line in `category`, `days_ago` days before now.
fn bought(
    reg: &mut SimRegister,
    who: &str,
    category: &str,
    days_ago: i64,
) -> storelink::model::transaction::Transaction {
    let at = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * days_ago);
    let mut tx = reg.purchase(at, who, None);
    tx.lines.truncate(1);
    tx.lines[0].category = Some(category.into());
    tx.business_day = at
        .to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
        .date();
    tx.total = tx.lines[0].net();
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_follow_up_reaches_the_console_buyer_not_the_shoe_buyer_and_the_display_names_it()
{
    const TEST: &str =
        "a_learned_follow_up_reaches_the_console_buyer_not_the_shoe_buyer_and_the_display_names_it";
    if !require_external("chromium", TEST) || !require_external("chromedriver", TEST) {
        return;
    }
    storelink::install_crypto_provider();
    let broker = common::start_rumqttd();
    let agent = TestAgent::start(broker, &["lane-3"]).await;
    // The store's history: 10% of 600 loyalty customers bought a console; 60% of those bought
    // games within 30 days, 5% of the others did.
    let mut reg = SimRegister::new("s042", "lane-3", Some("3"), 21);
    let mut history = Vec::new();
    for i in 0..600 {
        let who = format!("h{i:03}");
        let console = i % 10 == 0;
        history.push(bought(
            &mut reg,
            &who,
            if console { "consoles" } else { "shoes" },
            90,
        ));
        let games = if console { i % 50 < 30 } else { i % 20 == 1 };
        if games {
            history.push(bought(
                &mut reg,
                &who,
                "games",
                if console { 75 } else { 60 },
            ));
        }
    }
    agent.profiles.record_transactions(&history).unwrap();
    let top = agent.profiles.top_followups(1);
    assert_eq!(
        (&top[0].if_bought, &top[0].then),
        (
            &storelink::profiles::Item::Category("consoles".into()),
            &storelink::profiles::Item::Category("games".into())
        )
    );
    assert!(top[0].lift > 5.0, "{:?}", top[0]);

    // Two customers at the till: one bought a console three weeks ago, one shoes.
    let mut fan = common::gamer();
    fan.segments.clear();
    let mut walker = fan.clone();
    walker.customer_id = "c78".into();
    walker.first_name = Some("Ben".into());
    walker.cards = vec!["9990002".into()];
    agent.profiles.upsert_many(vec![fan, walker], &[]).unwrap();
    agent
        .profiles
        .record_transactions(&[
            bought(&mut reg, "c77", "consoles", 21),
            bought(&mut reg, "c78", "shoes", 21),
        ])
        .unwrap();
    let set = json!({
        "version": 1,
        "campaigns": [{
            "id": "follow-up-at-till",
            "name": "What the store's baskets say comes next",
            "valid_from": "2020-01-01T00:00:00Z",
            "valid_until": "2100-01-01T00:00:00Z",
            "trigger": {"kind": "transaction_started"},
            "audience": "'follow_up' in kpi && kpi.follow_up.suggest.category == 'games' && kpi.days_since['consoles'] <= 60",
            "offers": [{"id": "next-20", "texts": {"cashier": {"en": "20% off {suggestion}"}}}],
            "value": 1500
        }]
    });
    agent
        .offers
        .install(Slot::File, set.to_string().as_bytes())
        .unwrap();

    let api = agent.api();
    let token = agent.api.lanes.auth.token("3");
    let driver = ChromeDriver::start();
    let browser = driver.browser().await;
    browser
        .goto(&format!("{api}/lanes/3?token={token}&lang=en"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while text_of(&browser, "idle-title").await != "Ready"
        || body_has_class(&browser, "offline").await
    {
        assert!(Instant::now() < deadline, "the display never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, effects) = post_event(
        &api,
        json!({"type": "transaction_started", "register": "lane-3", "loyalty_id": "9990001"}),
    )
    .await;
    assert_eq!(status, 200, "{effects}");
    assert_eq!(
        effects["offers"][0]["campaign"], "follow-up-at-till",
        "{effects}"
    );
    let want = "Bought consoles 21 days ago: ask about games";
    let deadline = Instant::now() + Duration::from_secs(5);
    while text_of(&browser, "suggestion").await != want {
        assert!(
            Instant::now() < deadline,
            "the display never named the follow-up: {:?}",
            text_of(&browser, "suggestion").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(text_of(&browser, "offer-text").await, "20% off games");
    assert_eq!(
        text_of(&browser, "last-category").await,
        "Last bought: consoles"
    );
    assert_eq!(
        text_of(&browser, "last-visit").await,
        "Last purchase 21 days ago"
    );
    assert_eq!(text_of(&browser, "activity").await, "New customer");

    // The shoe buyer: no offer, and no question to ask.
    let (_, ended) = post_event(
        &api,
        json!({"type": "transaction_ended", "register": "lane-3"}),
    )
    .await;
    assert!(ended["prompt"].is_null(), "{ended}");
    let (status, effects) = post_event(
        &api,
        json!({"type": "transaction_started", "register": "lane-3", "loyalty_id": "9990002"}),
    )
    .await;
    assert_eq!(status, 200, "{effects}");
    assert_eq!(effects["offers"], json!([]), "{effects}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while text_of(&browser, "name").await != "Ben" {
        assert!(
            Instant::now() < deadline,
            "the shoe buyer's prompt never showed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(text_of(&browser, "suggestion").await, "");
    assert_eq!(
        text_of(&browser, "last-category").await,
        "Last bought: shoes"
    );
    browser.close().await.unwrap();
    agent.stop().await;
}
