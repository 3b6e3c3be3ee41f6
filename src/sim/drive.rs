//! `storelink sim`: drives a running agent through its real interfaces and checks what reaches
//! central.
//!
//! It reads the agent's status report to learn the store, its registers and where central's
//! feed is, subscribes to that feed as central ([`super::central`]), then sends:
//! - transactions to every register it can drive (`jsonl` over `tcp-listen`, pipelined as busy
//!   registers do, or over `http`), with Poisson arrivals at the configured rate;
//! - profiles for `phones` loyalty customers, as central's downlink would, and their phones'
//!   sightings as ESPresense room scanners report them (the agent's `mqtt-scanners` source);
//! - card scans at lanes through `POST /pos/v1/events`, timing the prompt that comes back.
//!
//! With `--smoke` it sends a handful of transactions marked `test` (central keeps them out of
//! reporting; they carry no loyalty card, so no customer's figures move) and checks that each
//! one reaches central.
//!
//! Invariants:
//! - Loss is counted against what the agent acknowledged: an `ok <id>` is the agent's promise,
//!   and every such id must arrive. Refusals and unanswered lines are reported apart.
//! - Sequence numbers start from the wall clock in milliseconds, so a rerun against the same
//!   agent never sends an id its exactly-once index has already seen.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::central::{Arrivals, Observer, Path};
use super::{JsonlClient, SimError, SimRegister};
use crate::cashier::api::RegisterInfo;
use crate::model::customer::{eid, ibeacon_major_minor, window_of};
use crate::presence::phones::{self, Phone};
use crate::profiles::Profile;

/// What to simulate and where.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The agent's local API.
    pub agent: String,
    /// Admin token, needed only off the gateway.
    pub token: Option<String>,
    /// Where to read central's feed; default the broker the agent reports.
    pub broker: Option<String>,
    /// Play central's HTTPS batch endpoint too, on this address, with this certificate and
    /// key (PEM); the agent's `central.https.base_url` must point here.
    pub https_listen: Option<String>,
    pub https_cert: Option<std::path::PathBuf>,
    pub https_key: Option<std::path::PathBuf>,
    /// The broker the room scanners publish to; default the central broker.
    pub scanner_broker: Option<String>,
    /// Stand in for serial registers whose device is absent, with a pseudo-terminal linked at
    /// the configured path (a path that exists and is not a link is left alone).
    pub serial_pty: bool,
    pub smoke: bool,
    /// Transactions per second over all registers (the day's mean with `day`).
    pub rate: f64,
    /// Play a trading day (8:00 to 20:00, with its lunch and after-work peaks) compressed into
    /// this long, over and over; without it the rate is flat.
    pub day: Option<Duration>,
    pub duration: Duration,
    /// Loyalty customers whose phones are in the store.
    pub phones: usize,
    /// Room names of the ESPresense scanners (the agent's zone scanners).
    pub scanners: Vec<String>,
    /// Topic the scanners publish under: `{scanner_topic}/{device id}/{room}`.
    pub scanner_topic: String,
    /// The loyalty app's service UUID (`presence.service_uuid`).
    pub service_uuid: uuid::Uuid,
    /// `presence.rotation_s`.
    pub rotation_s: u32,
    /// Card scans at lanes per second.
    pub card_scans: f64,
    /// How long to wait, after sending, for everything to reach central.
    pub settle: Duration,
    pub seed: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            agent: "http://127.0.0.1:8080".into(),
            token: None,
            broker: None,
            https_listen: None,
            https_cert: None,
            https_key: None,
            scanner_broker: None,
            serial_pty: false,
            smoke: false,
            rate: 10.0,
            day: None,
            duration: Duration::from_secs(60),
            phones: 0,
            scanners: ["entrance", "aisle", "lane-1", "lane-2", "lane-3"]
                .map(String::from)
                .to_vec(),
            scanner_topic: "espresense/devices".into(),
            service_uuid: uuid::Uuid::from_u128(0x6f3c1a52_8d1e_4c1b_9a7e_5b2d0c4e8f11),
            rotation_s: 900,
            card_scans: 0.0,
            settle: Duration::from_secs(60),
            seed: 42,
        }
    }
}

/// How many transactions a smoke test sends.
pub const SMOKE_TRANSACTIONS: usize = 3;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        // Nearest rank: the smallest sample with at least q of them at or below it.
        let at = |q: f64| {
            let rank = (q * samples.len() as f64).ceil() as usize;
            ms(samples[rank.clamp(1, samples.len()) - 1])
        };
        Percentiles {
            count: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: ms(*samples.last().expect("not empty")),
        }
    }
}

/// What the simulator sent and what central got.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub mode: &'static str,
    pub store: String,
    pub registers: Vec<String>,
    pub duration_s: f64,
    /// Transactions written to registers.
    pub sent: u64,
    /// Answered `ok <id>` by the agent: durable, and promised to central.
    pub acknowledged: u64,
    /// Answered `err …`.
    pub refused: u64,
    /// The first refusal's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Sent but never answered (the connection dropped).
    pub unanswered: u64,
    /// Written to serial registers, which never answer: checked at central all the same.
    pub serial_sent: u64,
    /// Acknowledged ids that reached central.
    pub delivered: u64,
    /// Of those, first or also over HTTPS.
    pub delivered_over_https: u64,
    /// Acknowledged ids that did not reach central before the settle time ran out.
    pub lost: u64,
    /// Up to 20 of them.
    pub lost_ids: Vec<String>,
    /// Arrivals beyond the first, same id (legal under at-least-once).
    pub duplicates: u64,
    /// Written → the agent's `ok`.
    pub ingest_ms: Percentiles,
    /// Written → arrived at central.
    pub end_to_end_ms: Percentiles,
    /// Card scanned → the prompt's effects answered.
    pub prompt_ms: Percentiles,
    pub prompts_shown: u64,
    pub phones: usize,
    pub scanner_reports: u64,
    /// Other events central received, per type.
    pub other_events: BTreeMap<String, u64>,
    /// The agent's uplink components at the end, `name: state (detail)`.
    pub uplink: Vec<String>,
}

impl SimReport {
    /// Everything acknowledged arrived, nothing was refused, something was sent.
    pub fn passed(&self) -> bool {
        self.acknowledged > 0
            && self.lost == 0
            && self.refused == 0
            && self.unanswered == 0
            && self.acknowledged + self.serial_sent == self.sent
    }

    /// A human summary, several lines.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(
            &mut s,
            format!(
                "storelink sim ({}) against store {} via {}",
                self.mode,
                self.store,
                self.registers.join(", ")
            ),
        );
        line(
            &mut s,
            format!(
                "  sent {}  acknowledged {}  refused {}  unanswered {}  delivered {} ({} over HTTPS)  lost {}  duplicates {}  in {:.1}s",
                self.sent,
                self.acknowledged,
                self.refused,
                self.unanswered,
                self.delivered,
                self.delivered_over_https,
                self.lost,
                self.duplicates,
                self.duration_s
            ),
        );
        let p = |name: &str, p: &Percentiles| {
            format!(
                "  {name:<12} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
                p.p50, p.p90, p.p99, p.max, p.count
            )
        };
        line(&mut s, p("ingest", &self.ingest_ms));
        line(&mut s, p("end to end", &self.end_to_end_ms));
        if self.prompt_ms.count > 0 {
            line(&mut s, p("card→prompt", &self.prompt_ms));
            line(&mut s, format!("  prompts shown {}", self.prompts_shown));
        }
        if self.serial_sent > 0 {
            line(
                &mut s,
                format!(
                    "  of those, {} written to serial lines (which never answer)",
                    self.serial_sent
                ),
            );
        }
        if self.phones > 0 {
            line(
                &mut s,
                format!(
                    "  phones {}  scanner reports {}",
                    self.phones, self.scanner_reports
                ),
            );
        }
        if let Some(r) = &self.refusal {
            line(&mut s, format!("  first refusal: {r}"));
        }
        if !self.lost_ids.is_empty() {
            line(
                &mut s,
                format!("  not at central: {}", self.lost_ids.join(", ")),
            );
        }
        for u in &self.uplink {
            line(&mut s, format!("  {u}"));
        }
        s
    }
}

/// The parts of the agent's status report the simulator reads.
#[derive(Debug, Deserialize)]
struct AgentView {
    agent: AgentFacts,
    #[serde(default)]
    components: BTreeMap<String, ComponentView>,
}

#[derive(Debug, Deserialize)]
struct AgentFacts {
    store: String,
    topic_prefix: String,
    #[serde(default)]
    central_mqtt: Option<String>,
    #[serde(default)]
    registers: Vec<RegisterInfo>,
}

#[derive(Debug, Deserialize)]
struct ComponentView {
    state: String,
    #[serde(default)]
    detail: Option<String>,
}

/// The agent's local API.
#[derive(Clone)]
struct AgentApi {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl AgentApi {
    fn new(base: &str, token: Option<String>) -> Result<AgentApi, SimError> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SimError::Setup(format!("HTTP client: {e}")))?;
        Ok(AgentApi {
            base: base.trim_end_matches('/').to_string(),
            token,
            client,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> SimError {
        SimError::Agent {
            url: self.base.clone(),
            detail: e.to_string(),
        }
    }

    async fn status(&self) -> Result<AgentView, SimError> {
        let response = self
            .request(reqwest::Method::GET, "/api/v1/status")
            .send()
            .await
            .map_err(|e| self.unreachable(format!("{e} (is the agent running? --agent)")))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(self.unreachable(format!("{status}: {}", body.trim())));
        }
        serde_json::from_str(&body).map_err(|e| {
            self.unreachable(format!(
                "the status report is not one this simulator understands ({e}); is the agent the same version?"
            ))
        })
    }

    async fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<String, String> {
        let response = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{status}: {}", text.trim()))
        }
    }

    /// Posts one transaction to an `http` register; the ids it stored, or why not.
    async fn post_transaction(
        &self,
        register: &str,
        format: Format,
        tx: &crate::model::transaction::Transaction,
    ) -> Result<Vec<String>, String> {
        #[derive(Deserialize)]
        struct Answer {
            accepted: Vec<String>,
        }
        let line = format.encode(tx);
        let response = self
            .request(reqwest::Method::POST, "/pos/v1/transactions")
            .query(&[("register", register)])
            .body(line)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {}", text.trim()));
        }
        let answer: Answer = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        Ok(answer.accepted)
    }
}

/// A register the simulator can drive.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    lane: Option<String>,
    format: Format,
    via: Via,
}

#[derive(Debug, Clone)]
enum Via {
    Tcp(SocketAddr),
    Http,
    /// A pseudo-terminal at the serial register's device path; no answers.
    Serial(std::path::PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jsonl,
    Poslog,
}

impl Format {
    /// One transaction as the register would send it.
    fn encode(self, tx: &crate::model::transaction::Transaction) -> Vec<u8> {
        let mut bytes = match self {
            Format::Jsonl => serde_json::to_vec(tx).unwrap_or_default(),
            Format::Poslog => crate::pos::poslog::writer::write(
                &crate::pos::poslog::writer::Document::plain(tx.clone()),
            )
            .into_bytes(),
        };
        bytes.push(b'\n');
        bytes
    }
}

/// The registers to drive: `jsonl` and `poslog` over `tcp-listen` (an unspecified bind
/// address means the agent's host) or `http`, and over `serial` with `serial_pty`. Journal
/// ports the agent connects to, and receipt printers, are left to real devices.
async fn targets(
    registers: &[RegisterInfo],
    agent_url: &str,
    serial_pty: bool,
) -> Result<Vec<Target>, SimError> {
    let agent_host = reqwest::Url::parse(agent_url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let mut out = Vec::new();
    for r in registers {
        let format = match r.format.as_str() {
            "jsonl" => Format::Jsonl,
            "poslog" => Format::Poslog,
            _ => continue,
        };
        let via = match (r.transport.as_str(), r.address.as_deref()) {
            ("http", _) => Via::Http,
            ("serial", Some(path)) if serial_pty => Via::Serial(path.into()),
            ("tcp-listen", Some(bind)) => {
                let addr: SocketAddr = match bind.parse::<SocketAddr>() {
                    Ok(a) if a.ip().is_unspecified() => {
                        let host = format!("{agent_host}:{}", a.port());
                        tokio::net::lookup_host(&host)
                            .await
                            .ok()
                            .and_then(|mut i| i.next())
                            .ok_or_else(|| SimError::Setup(format!("cannot resolve {host}")))?
                    }
                    Ok(a) => a,
                    Err(_) => tokio::net::lookup_host(bind)
                        .await
                        .ok()
                        .and_then(|mut i| i.next())
                        .ok_or_else(|| {
                            SimError::Setup(format!("register {}: cannot resolve {bind}", r.name))
                        })?,
                };
                Via::Tcp(addr)
            }
            _ => continue,
        };
        out.push(Target {
            name: r.name.clone(),
            lane: r.lane.clone(),
            format,
            via,
        });
    }
    if out.is_empty() {
        let listed = registers
            .iter()
            .map(|r| format!("{} ({} over {})", r.name, r.format, r.transport))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(SimError::Setup(format!(
            "the agent has no register the simulator can drive (jsonl or poslog over tcp-listen or http, or serial with --serial-pty); it has: {}",
            if listed.is_empty() { "none" } else { &listed }
        )));
    }
    Ok(out)
}

/// One transaction's journey, as far as the simulator saw it.
#[derive(Debug, Default)]
struct Ledger {
    sent: u64,
    refused: u64,
    refusal: Option<String>,
    unanswered: u64,
    /// Acknowledged id → when it was written; serial sends are in it too (they cannot be
    /// acknowledged, but must arrive all the same).
    acked: HashMap<String, Instant>,
    serial_sent: u64,
    ingest: Vec<Duration>,
}

impl Ledger {
    fn answer(&mut self, written: Instant, reply: Result<Vec<String>, String>) {
        match reply {
            Ok(ids) => {
                self.ingest.push(written.elapsed());
                for id in ids {
                    self.acked.insert(id, written);
                }
            }
            Err(why) => {
                self.refused += 1;
                self.refusal.get_or_insert(why);
            }
        }
    }
}

/// `ok <id>…` → the ids; `err …` → the reason.
fn parse_reply(reply: &str) -> Result<Vec<String>, String> {
    match reply.split_once(' ') {
        _ if reply == "ok" => Ok(Vec::new()),
        Some(("ok", ids)) => Ok(ids.split_whitespace().map(String::from).collect()),
        Some(("err", why)) => Err(why.to_string()),
        _ => Err(format!("unexpected reply {reply:?}")),
    }
}

/// Runs the simulation (or the smoke test) and reports; `Err` only when it could not start.
///
/// Long: it starts the simulated store's parts (registers, phones, card scans, central's
/// observers) beside each other and then settles and counts; they share the arrival records
/// by reference. Splitting the start-up from the report is the next step when it grows.
pub async fn run(options: &SimOptions, token: CancellationToken) -> Result<SimReport, SimError> {
    let api = AgentApi::new(&options.agent, options.token.clone())?;
    let view = api.status().await?;
    let facts = &view.agent;
    // `--broker none`: central is watched over HTTPS only.
    let broker = match options.broker.as_deref() {
        Some("none") => None,
        Some(b) => Some(b.to_string()),
        None => facts.central_mqtt.clone(),
    };
    let targets = targets(&facts.registers, &options.agent, options.serial_pty).await?;
    let arrivals = Arc::new(Arrivals::default());
    let observer = match &broker {
        Some(broker) => Some(
            Observer::start(
                broker,
                format!("{}/{}/events/#", facts.topic_prefix, facts.store),
                Duration::from_secs(10),
                {
                    let arrivals = arrivals.clone();
                    move |p: &rumqttc::Publish| arrivals.record_payload(&p.payload, Path::Mqtt)
                },
                token.child_token(),
            )
            .await?,
        ),
        None => None,
    };
    if let Some(bind) = &options.https_listen {
        let (Some(cert), Some(key)) = (&options.https_cert, &options.https_key) else {
            return Err(SimError::Setup(
                "--https-listen needs --https-cert and --https-key (PEM)".into(),
            ));
        };
        let config = super::https::server_config_from_files(cert, key).map_err(SimError::Setup)?;
        super::https::start(bind, config, arrivals.clone(), token.child_token()).await?;
    }
    if observer.is_none() && options.https_listen.is_none() {
        return Err(SimError::Setup(
            "nothing to watch central's feed with: the agent reports no MQTT broker; give --broker mqtt://host:port or --https-listen".into(),
        ));
    }
    let lines = plug_in_lines(&api, &targets).await?;
    let started = Instant::now();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut prompts = PromptLog::default();
    let mut scanner_reports = 0;
    if options.smoke {
        smoke(&api, &facts.store, &targets, &lines, &ledger, options.seed).await;
    } else {
        let population = phones::phones("sim", options.phones);
        let scanner_broker = options.scanner_broker.clone().or(broker.clone());
        if !population.is_empty() {
            let (Some(observer), Some(_)) = (&observer, &scanner_broker) else {
                return Err(SimError::Setup(
                    "--phones needs a broker: profiles go down and scanners report over MQTT"
                        .into(),
                ));
            };
            send_profiles(&api, observer, facts, &population).await?;
        }
        let stop = token.child_token();
        let scanners = (!population.is_empty()).then(|| {
            tokio::spawn(play_scanners(
                scanner_broker.clone().unwrap_or_default(),
                options.clone(),
                population.clone(),
                stop.clone(),
            ))
        });
        let cards = (options.card_scans > 0.0 && !population.is_empty()).then(|| {
            tokio::spawn(scan_cards(
                api.clone(),
                targets.clone(),
                population.len(),
                options.card_scans,
                options.seed,
                stop.clone(),
            ))
        });
        let per_register = options.rate / targets.len() as f64;
        let mut registers = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            registers.push(tokio::spawn(drive_register(
                api.clone(),
                facts.store.clone(),
                t.clone(),
                per_register,
                options.day,
                options.duration,
                population.len(),
                options.seed.wrapping_add(i as u64),
                lines.clone(),
                ledger.clone(),
                stop.clone(),
            )));
        }
        for r in registers {
            let _ = r.await;
        }
        stop.cancel();
        if let Some(s) = scanners {
            scanner_reports = s.await.unwrap_or(0);
        }
        if let Some(c) = cards {
            prompts = c.await.unwrap_or_default();
        }
    }
    let sending = started.elapsed();
    // Wait for everything acknowledged to reach central.
    let deadline = Instant::now() + options.settle;
    loop {
        let done = {
            let l = ledger.lock().expect("ledger lock");
            arrivals.has_all(l.acked.keys())
        };
        if done || Instant::now() >= deadline || token.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let others = arrivals.others();
    let arrivals = arrivals.transactions();
    if let Some(o) = observer {
        o.stop();
    }
    let uplink = match api.status().await {
        Ok(v) => v
            .components
            .iter()
            .filter(|(name, _)| name.starts_with("uplink"))
            .map(|(name, c)| {
                format!(
                    "{name}: {}{}",
                    c.state,
                    c.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                )
            })
            .collect(),
        Err(e) => vec![format!("agent status: {e}")],
    };
    let l = std::mem::take(&mut *ledger.lock().expect("ledger lock"));
    let mut lost_ids: Vec<String> = l
        .acked
        .keys()
        .filter(|id| !arrivals.contains_key(*id))
        .cloned()
        .collect();
    lost_ids.sort();
    let end_to_end = l
        .acked
        .iter()
        .filter_map(|(id, written)| {
            arrivals
                .get(id)
                .map(|a| a.first.saturating_duration_since(*written))
        })
        .collect();
    let duplicates = l
        .acked
        .keys()
        .filter_map(|id| arrivals.get(id))
        .map(|a| u64::from(a.count.saturating_sub(1)))
        .sum();
    Ok(SimReport {
        mode: if options.smoke { "smoke" } else { "load" },
        store: facts.store.clone(),
        registers: targets.iter().map(|t| t.name.clone()).collect(),
        duration_s: sending.as_secs_f64(),
        sent: l.sent,
        acknowledged: (l.acked.len() as u64).saturating_sub(l.serial_sent),
        serial_sent: l.serial_sent,
        refused: l.refused,
        refusal: l.refusal,
        unanswered: l.unanswered,
        delivered: (l.acked.len() - lost_ids.len()) as u64,
        delivered_over_https: l
            .acked
            .keys()
            .filter(|id| arrivals.get(*id).is_some_and(|a| a.https > 0))
            .count() as u64,
        lost: lost_ids.len() as u64,
        lost_ids: lost_ids.into_iter().take(20).collect(),
        duplicates,
        ingest_ms: Percentiles::of(l.ingest),
        end_to_end_ms: Percentiles::of(end_to_end),
        prompt_ms: Percentiles::of(prompts.latencies),
        prompts_shown: prompts.shown,
        phones: options.phones,
        scanner_reports,
        other_events: others.into_iter().collect(),
        uplink,
    })
}

/// A pseudo-terminal for every serial target, then a wait (up to 30 s) until the agent has
/// each register's line open.
async fn plug_in_lines(api: &AgentApi, targets: &[Target]) -> Result<Lines, SimError> {
    let mut lines = HashMap::new();
    for t in targets {
        if let Via::Serial(path) = &t.via {
            let line = super::serial::PtyLine::plug_in_at(path).map_err(|e| {
                SimError::Setup(format!(
                    "register {}: cannot stand in at {}: {e}",
                    t.name,
                    path.display()
                ))
            })?;
            lines.insert(t.name.clone(), line);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in lines.keys() {
        let component = format!("register.{name}");
        loop {
            let open = api.status().await.is_ok_and(|v| {
                v.components
                    .get(&component)
                    .is_some_and(|c| c.state == "running")
            });
            if open {
                break;
            }
            if Instant::now() >= deadline {
                return Err(SimError::Setup(format!(
                    "the agent did not open the simulated serial line for {name} within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(Arc::new(tokio::sync::Mutex::new(lines)))
}

/// Serial lines standing in for serial registers, by register name.
type Lines = Arc<tokio::sync::Mutex<HashMap<String, super::serial::PtyLine>>>;

/// Sends one transaction to `target` the way that register would, and books the answer: a
/// fresh connection for TCP, a POST for HTTP, a write on the line for serial (no answer).
async fn send_one(
    api: &AgentApi,
    target: &Target,
    tx: &crate::model::transaction::Transaction,
    lines: &Lines,
    ledger: &Mutex<Ledger>,
) {
    ledger.lock().expect("ledger lock").sent += 1;
    let written = Instant::now();
    let bytes = target.format.encode(tx);
    let reply = match &target.via {
        Via::Http => api.post_transaction(&target.name, target.format, tx).await,
        Via::Tcp(addr) => {
            let answer = async {
                let mut c = JsonlClient::connect(*addr).await?;
                c.send_raw(&bytes).await?;
                c.reply().await
            };
            match answer.await {
                Ok(line) => parse_reply(&line),
                Err(e) => Err(format!("register {} at {addr}: {e}", target.name)),
            }
        }
        Via::Serial(path) => {
            let mut lines = lines.lock().await;
            let sent = match lines.get_mut(&target.name) {
                Some(line) => line.send(&bytes).await,
                None => Err(std::io::Error::other("no line")),
            };
            let mut l = ledger.lock().expect("ledger lock");
            match sent {
                Ok(()) => {
                    l.acked.insert(tx.id.clone(), written);
                    l.serial_sent += 1;
                }
                Err(e) => {
                    l.unanswered += 1;
                    l.refusal
                        .get_or_insert(format!("serial line {}: {e}", path.display()));
                }
            }
            return;
        }
    };
    ledger.lock().expect("ledger lock").answer(written, reply);
}

/// A few test transactions, one per register in turn, each on its own connection as a
/// technician's test would be.
async fn smoke(
    api: &AgentApi,
    store: &str,
    targets: &[Target],
    lines: &Lines,
    ledger: &Mutex<Ledger>,
    seed: u64,
) {
    // Sequence numbers from the wall clock in microseconds: far above any register's own
    // numbering, so a test id never collides with a real one. No card, so no customer's
    // figures move.
    let first = jiff::Timestamp::now().as_microsecond().max(0) as u64;
    for i in 0..SMOKE_TRANSACTIONS {
        let t = &targets[i % targets.len()];
        let mut register = SimRegister::new(store, &t.name, t.lane.as_deref(), seed + i as u64)
            .with_sequence(first + i as u64);
        let mut tx = register.next(jiff::Timestamp::now());
        tx.loyalty_id = None;
        tx.test = true;
        send_one(api, t, &tx, lines, ledger).await;
    }
}

/// Hands the population's profiles to the agent as central would (over the downlink), and
/// waits until the agent knows the last one.
async fn send_profiles(
    api: &AgentApi,
    observer: &Observer,
    facts: &AgentFacts,
    population: &[Phone],
) -> Result<(), SimError> {
    let version = jiff::Timestamp::now().as_millisecond().max(1) as u64;
    let profiles: Vec<Profile> = population
        .iter()
        .enumerate()
        .map(|(i, phone)| {
            let mut p = Profile::new(phone.customer_id.clone());
            p.cards = vec![card_of(i)];
            p.tier = Some(["bronze", "silver", "gold"][i % 3].to_string());
            p.points = (i as i64 * 137) % 2500;
            p.consents.presence = true;
            p.consents.personalised_offers = true;
            p.presence_key = Some(phone.key);
            p.version = version;
            p
        })
        .collect();
    let topic = format!("{}/{}/profiles", facts.topic_prefix, facts.store);
    for chunk in profiles.chunks(200) {
        let body = serde_json::to_vec(chunk).map_err(|e| SimError::Setup(e.to_string()))?;
        observer.publish(topic.clone(), body, false).await?;
    }
    let last = &population[population.len() - 1].customer_id;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let known = api
            .request(reqwest::Method::GET, &format!("/api/v1/profiles/{last}"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if known {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SimError::Setup(format!(
                "the agent did not take the simulated customers' profiles from {topic} within 20s; is its MQTT downlink on?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Relative footfall per hour of a supermarket day, 8:00 to 20:00: a quiet opening, the lunch
/// peak, an afternoon lull and the after-work peak. Mean 1.
const HOURS: [f64; 12] = [
    0.45, 0.7, 0.9, 1.0, 1.45, 1.25, 0.8, 0.75, 0.95, 1.45, 1.5, 0.8,
];

/// The rate multiplier `elapsed` into a run whose trading day lasts `day` (flat without one).
fn hour_weight(day: Option<Duration>, elapsed: Duration) -> f64 {
    let Some(day) = day.filter(|d| !d.is_zero()) else {
        return 1.0;
    };
    let into = elapsed.as_secs_f64() % day.as_secs_f64() / day.as_secs_f64();
    HOURS[((into * HOURS.len() as f64) as usize).min(HOURS.len() - 1)]
}

/// A loyalty customer who is shopping: regulars come far more often than the rest (the
/// square of a uniform draw puts half the visits on the most frequent quarter).
fn regular(rng: &mut StdRng, customers: usize) -> usize {
    let u: f64 = rng.random_range(0.0..1.0);
    ((u * u * customers as f64) as usize).min(customers.saturating_sub(1))
}

/// Simulated customer `i`'s loyalty card.
fn card_of(i: usize) -> String {
    format!("SIM{i:07}")
}

/// One register: Poisson arrivals at `rate` per second (shaped by the trading day when there
/// is one) for `duration`, pipelined over TCP (the agent answers in order), a third of the
/// customers showing a loyalty card, regulars most often.
#[allow(clippy::too_many_arguments)]
async fn drive_register(
    api: AgentApi,
    store: String,
    target: Target,
    rate: f64,
    day: Option<Duration>,
    duration: Duration,
    customers: usize,
    seed: u64,
    lines: Lines,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let first_seq = jiff::Timestamp::now().as_millisecond().max(0) as u64 * 1000;
    let mut register = SimRegister::new(&store, &target.name, target.lane.as_deref(), seed)
        .with_sequence(first_seq);
    let end = tokio::time::Instant::now() + duration;
    let mut next = tokio::time::Instant::now();
    let tx_for = |rng: &mut StdRng, register: &mut SimRegister| {
        let now = jiff::Timestamp::now();
        if customers > 0 && rng.random_bool(1.0 / 3.0) {
            register.purchase(now, &card_of(regular(rng, customers)), None)
        } else {
            register.next(now)
        }
    };
    let started = tokio::time::Instant::now();
    let gap = |rng: &mut StdRng| {
        // Exponential inter-arrival times (customers arrive independently) at the rate the
        // hour of the simulated day calls for.
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        let now = rate * hour_weight(day, started.elapsed());
        Duration::from_secs_f64(-u.ln() / now.max(1e-3))
    };
    match &target.via {
        Via::Http | Via::Serial(_) => {
            while next < end && !stop.is_cancelled() {
                tokio::time::sleep_until(next).await;
                next += gap(&mut rng);
                let tx = tx_for(&mut rng, &mut register);
                send_one(&api, &target, &tx, &lines, &ledger).await;
            }
        }
        Via::Tcp(addr) => {
            let client = match JsonlClient::connect_patiently(*addr, Duration::from_secs(10)).await
            {
                Ok(c) => c,
                Err(e) => {
                    let mut l = ledger.lock().expect("ledger lock");
                    l.refusal
                        .get_or_insert(format!("register {} at {addr}: {e}", target.name));
                    return;
                }
            };
            let (mut sender, mut replies) = client.split();
            // Write instants of the lines still owed an answer; `None` marks the end.
            let in_flight: Arc<Mutex<VecDeque<Option<Instant>>>> = Arc::default();
            let reader = {
                let in_flight = in_flight.clone();
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    let at_end = || {
                        let q = in_flight.lock().expect("in-flight lock");
                        matches!(q.front(), Some(None))
                    };
                    while !at_end() {
                        let Ok(line) = replies.reply().await else {
                            break;
                        };
                        let Some(Some(written)) =
                            in_flight.lock().expect("in-flight lock").pop_front()
                        else {
                            break;
                        };
                        ledger
                            .lock()
                            .expect("ledger lock")
                            .answer(written, parse_reply(&line));
                    }
                })
            };
            while next < end && !stop.is_cancelled() {
                tokio::time::sleep_until(next).await;
                next += gap(&mut rng);
                let tx = tx_for(&mut rng, &mut register);
                in_flight
                    .lock()
                    .expect("in-flight lock")
                    .push_back(Some(Instant::now()));
                ledger.lock().expect("ledger lock").sent += 1;
                if let Err(e) = sender.send_raw(&target.format.encode(&tx)).await {
                    ledger
                        .lock()
                        .expect("ledger lock")
                        .refusal
                        .get_or_insert(format!("register {}: {e}", target.name));
                    break;
                }
            }
            // Everything is written; wait for the answers still owed, then hang up.
            in_flight.lock().expect("in-flight lock").push_back(None);
            let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
            let owed = in_flight
                .lock()
                .expect("in-flight lock")
                .iter()
                .filter(|w| w.is_some())
                .count();
            ledger.lock().expect("ledger lock").unanswered += owed as u64;
            drop(sender);
        }
    }
}

/// ESPresense room scanners hearing the population: each phone reported once a second by the
/// scanner of the room it is in, moving to another room every half minute or so. The device
/// id is the iBeacon form of the phone's current EID, as the app advertises it.
async fn play_scanners(
    broker: String,
    options: SimOptions,
    population: Vec<Phone>,
    stop: CancellationToken,
) -> u64 {
    let Ok((host, port)) = super::central::broker_address(&broker) else {
        return 0;
    };
    let mut mqtt = rumqttc::MqttOptions::new(
        format!("storelink-sim-scanners-{}", rand::random::<u32>()),
        host,
        port,
    );
    mqtt.set_keep_alive(Duration::from_secs(15));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(mqtt, 4096);
    let poller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    e = eventloop.poll() => if e.is_err() {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    },
                    _ = stop.cancelled() => return,
                }
            }
        })
    };
    let mut rng = StdRng::seed_from_u64(options.seed ^ 0x5ca7);
    let mut rooms: Vec<usize> = (0..population.len())
        .map(|_| rng.random_range(0..options.scanners.len().max(1)))
        .collect();
    let uuid = options.service_uuid.hyphenated().to_string();
    let mut reports = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let window = window_of(jiff::Timestamp::now(), options.rotation_s);
        for (i, phone) in population.iter().enumerate() {
            if rng.random_bool(1.0 / 30.0) {
                rooms[i] = rng.random_range(0..options.scanners.len().max(1));
            }
            let Some(room) = options.scanners.get(rooms[i]) else {
                continue;
            };
            let (major, minor) = ibeacon_major_minor(&eid(&phone.key, window));
            let id = format!("iBeacon:{uuid}-{major}-{minor}");
            let distance: f64 = rng.random_range(0.4..3.0);
            let rssi = -59.0 - 20.0 * distance.log10() + rng.random_range(-3.0..3.0);
            let payload = serde_json::json!({
                "id": id,
                "rssi@1m": -59,
                "rssi": (rssi * 100.0).round() / 100.0,
                "distance": (distance * 100.0).round() / 100.0,
            });
            let topic = format!("{}/{id}/{room}", options.scanner_topic);
            if client
                .try_publish(
                    topic,
                    rumqttc::QoS::AtMostOnce,
                    false,
                    payload.to_string().into_bytes(),
                )
                .is_ok()
            {
                reports += 1;
            }
        }
    }
    poller.abort();
    reports
}

#[derive(Debug, Default)]
struct PromptLog {
    latencies: Vec<Duration>,
    shown: u64,
}

/// Card scans at lanes: `customer_identified` with a simulated card, timed until the effects
/// (the prompt) come back, then `transaction_ended` to clear the lane.
async fn scan_cards(
    api: AgentApi,
    targets: Vec<Target>,
    customers: usize,
    rate: f64,
    seed: u64,
    stop: CancellationToken,
) -> PromptLog {
    let lanes: Vec<String> = targets.iter().filter_map(|t| t.lane.clone()).collect();
    let mut log = PromptLog::default();
    if lanes.is_empty() {
        return log;
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0xca4d);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let lane = &lanes[rng.random_range(0..lanes.len())];
        let card = card_of(regular(&mut rng, customers));
        let started = Instant::now();
        let answer = api
            .post_json(
                "/pos/v1/events",
                &serde_json::json!({"type": "customer_identified", "lane": lane, "loyalty_id": card}),
            )
            .await;
        if let Ok(body) = answer {
            log.latencies.push(started.elapsed());
            if serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|v| !v["prompt"].is_null())
            {
                log.shown += 1;
            }
        }
        let _ = api
            .post_json(
                "/pos/v1/events",
                &serde_json::json!({"type": "transaction_ended", "lane": lane}),
            )
            .await;
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms = |v: u64| Duration::from_millis(v);
        let p = Percentiles::of((1..=100).map(ms).collect());
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99, p.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let one = Percentiles::of(vec![ms(7)]);
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Percentiles::of(Vec::new()).count, 0);
    }

    #[test]
    fn the_trading_day_has_its_peaks_and_averages_the_rate() {
        let mean: f64 = HOURS.iter().sum::<f64>() / HOURS.len() as f64;
        assert!((mean - 1.0).abs() < 1e-9, "mean {mean}");
        let day = Some(Duration::from_secs(120));
        assert_eq!(hour_weight(None, Duration::from_secs(55)), 1.0);
        assert_eq!(hour_weight(day, Duration::from_secs(0)), 0.45, "8:00");
        assert_eq!(hour_weight(day, Duration::from_secs(41)), 1.45, "12:00");
        assert_eq!(
            hour_weight(day, Duration::from_secs(161)),
            1.45,
            "the next day, 12:00"
        );
        let mut rng = StdRng::seed_from_u64(1);
        let picks: Vec<usize> = (0..10_000).map(|_| regular(&mut rng, 100)).collect();
        assert!(picks.iter().all(|&i| i < 100));
        let top_quarter = picks.iter().filter(|&&i| i < 25).count();
        assert!((4500..5500).contains(&top_quarter), "{top_quarter}");
    }

    #[test]
    fn register_replies_are_read_as_ids_or_reasons() {
        assert_eq!(parse_reply("ok a b").unwrap(), ["a", "b"]);
        assert!(parse_reply("ok").unwrap().is_empty());
        assert_eq!(parse_reply("err disk full").unwrap_err(), "disk full");
        assert!(parse_reply("effects {}").is_err());
    }

    #[test]
    fn a_report_passes_only_when_everything_acknowledged_arrived() {
        let mut r = SimReport {
            mode: "smoke",
            store: "s1".into(),
            registers: vec!["lane-1".into()],
            duration_s: 1.0,
            sent: 3,
            acknowledged: 3,
            refused: 0,
            refusal: None,
            unanswered: 0,
            serial_sent: 0,
            delivered: 3,
            delivered_over_https: 0,
            lost: 0,
            lost_ids: Vec::new(),
            duplicates: 1,
            ingest_ms: Percentiles::default(),
            end_to_end_ms: Percentiles::default(),
            prompt_ms: Percentiles::default(),
            prompts_shown: 0,
            phones: 0,
            scanner_reports: 0,
            other_events: BTreeMap::new(),
            uplink: Vec::new(),
        };
        assert!(r.passed(), "duplicates are legal");
        r.lost = 1;
        assert!(!r.passed());
        r.lost = 0;
        r.refused = 1;
        assert!(!r.passed());
        r.refused = 0;
        r.acknowledged = 0;
        r.sent = 0;
        assert!(!r.passed(), "nothing sent proves nothing");
    }

    #[tokio::test]
    async fn registers_the_simulator_can_stand_in_for_are_driven() {
        let reg = |name: &str, format: &str, transport: &str, address: Option<&str>| RegisterInfo {
            name: name.into(),
            lane: Some("1".into()),
            format: format.into(),
            transport: transport.into(),
            address: address.map(Into::into),
        };
        let all = [
            reg("a", "jsonl", "tcp-listen", Some("0.0.0.0:5021")),
            reg("b", "poslog", "http", None),
            reg("c", "receipt", "serial", Some("/dev/ttyUSB0")),
            reg("d", "jsonl", "tcp-connect", Some("10.0.0.9:4000")),
            reg("e", "jsonl", "serial", Some("/dev/ttyS0")),
        ];
        let t = targets(&all, "http://127.0.0.1:8080", false).await.unwrap();
        assert_eq!(t.len(), 2);
        assert!(matches!(t[0].via, Via::Tcp(a) if a.to_string() == "127.0.0.1:5021"));
        assert_eq!(t[0].format, Format::Jsonl);
        assert!(matches!(t[1].via, Via::Http));
        assert_eq!(t[1].format, Format::Poslog);
        let with_pty = targets(&all, "http://127.0.0.1:8080", true).await.unwrap();
        assert!(matches!(&with_pty[2].via, Via::Serial(p) if p.to_str() == Some("/dev/ttyS0")));
        let e = targets(&all[2..4], "http://127.0.0.1:8080", true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("c (receipt over serial)"), "{e}");
    }
}
