//! The agent's configuration: one TOML file, parsed strictly, validated fully.
//!
//! Invariants:
//! - Unknown keys are errors (`deny_unknown_fields` everywhere), so a typo never silently falls
//!   back to a default on a gateway nobody looks at.
//! - Every error names the file and the key path (`FILE: key.path: what is wrong`); retail IT
//!   scripts grep for that shape, and `storelink check-config` exits 2 with it.
//! - Validation collects every problem it can find after parsing, not just the first.
//! - Secrets never live in the file: `*_env` keys name environment variables, which are read
//!   here once, and the values are redacted from `Debug`.
//! - Nothing in this module binds a port or opens a store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub store: StoreSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub registers: Vec<RegisterConfig>,
    #[serde(default)]
    pub presence: PresenceSection,
    #[serde(default)]
    pub profiles: ProfilesSection,
    #[serde(default)]
    pub offers: OffersSection,
    pub central: CentralSection,
    #[serde(default)]
    pub cashier: CashierSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Store id as central knows it; part of every event id and topic.
    pub id: String,
    /// Retailer (tenant) id; part of the default topic prefix.
    pub tenant: String,
    /// IANA time zone of the store; decides the business day.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// ISO 4217 currency used when a register does not say.
    #[serde(default = "default_currency")]
    pub currency: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// Cap on the bytes held in the outbox (payloads and headers).
    #[serde(default = "default_max_outbox_bytes")]
    pub max_outbox_bytes: u64,
    /// What the storage engines may hold in memory: the log's page cache (redb) and the
    /// profile cache's (sled) together. Default 8 MiB, or `cache_bytes` + 4 MiB when only that
    /// is given.
    #[serde(default)]
    pub memory_budget_bytes: Option<u64>,
    /// The profile cache's (sled's) share of the budget; default half of it.
    #[serde(default)]
    pub cache_bytes: Option<u64>,
    /// Cap on the bytes kept in the local dead-letter store; the oldest go first.
    #[serde(default = "default_max_deadletter_bytes")]
    pub max_deadletter_bytes: u64,
    /// How long accepted event ids are remembered to recognise a register's resend.
    #[serde(default = "default_seen_retention_days")]
    pub seen_retention_days: u64,
    /// Most event ids remembered; the oldest are forgotten first.
    #[serde(default = "default_max_seen_ids")]
    pub max_seen_ids: u64,
    /// Per stream, how long an undelivered event is still worth sending (seconds).
    #[serde(default)]
    pub ttl_s: StreamTtls,
    /// Free space kept on the storage filesystem: below it, new data is refused (registers are
    /// told why) before the database itself runs out of room.
    #[serde(default = "default_min_free_bytes")]
    pub min_free_bytes: u64,
}

/// Time-to-live of held events per outbox stream; none means kept until delivered (or dropped
/// by the size cap). Transactions, redemptions and erasure acknowledgements have no TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamTtls {
    #[serde(default = "default_presence_ttl_s")]
    pub presence: Option<u64>,
    #[serde(default)]
    pub offer: Option<u64>,
    #[serde(default = "default_status_ttl_s")]
    pub status: Option<u64>,
    #[serde(default)]
    pub deadletter: Option<u64>,
    /// Only here to be refused with a clear message.
    #[serde(default)]
    pub transaction: Option<u64>,
    #[serde(default)]
    pub redemption: Option<u64>,
}

impl Default for StreamTtls {
    fn default() -> Self {
        StreamTtls {
            presence: default_presence_ttl_s(),
            offer: None,
            status: default_status_ttl_s(),
            deadletter: None,
            transaction: None,
            redemption: None,
        }
    }
}

fn default_presence_ttl_s() -> Option<u64> {
    Some(86_400)
}
fn default_status_ttl_s() -> Option<u64> {
    Some(3600)
}

impl StorageSection {
    /// The whole storage memory budget, as configured or by default.
    pub fn memory_budget(&self) -> u64 {
        match (self.memory_budget_bytes, self.cache_bytes) {
            (Some(budget), _) => budget,
            (None, Some(cache)) => cache + DEFAULT_LOG_CACHE_BYTES,
            (None, None) => DEFAULT_MEMORY_BUDGET_BYTES,
        }
    }

    /// The engines' settings: the budget split between the profile cache and the log.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        let budget = self.memory_budget();
        let cache = self.cache_bytes.unwrap_or(budget / 2);
        crate::store::StoreOptions {
            cache_bytes: cache,
            log_cache_bytes: budget.saturating_sub(cache).max(MIN_CACHE_BYTES),
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            path: default_storage_path(),
            max_outbox_bytes: default_max_outbox_bytes(),
            memory_budget_bytes: None,
            cache_bytes: None,
            max_deadletter_bytes: default_max_deadletter_bytes(),
            seen_retention_days: default_seen_retention_days(),
            max_seen_ids: default_max_seen_ids(),
            ttl_s: StreamTtls::default(),
            min_free_bytes: default_min_free_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// Register name; unique in the store, part of every transaction id.
    pub name: String,
    /// Lane the register serves, for prompts and presence.
    #[serde(default)]
    pub lane: Option<String>,
    pub format: RegisterFormat,
    pub transport: Transport,
    /// How the byte stream is cut into frames; the format's usual framing when absent.
    #[serde(default)]
    pub framing: Option<Framing>,
    /// Receipt template (TOML) for `format = "receipt"`.
    #[serde(default)]
    pub template: Option<PathBuf>,
    /// Largest frame accepted, in bytes. Default 1 MiB.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Whether the agent answers each frame with `ok <ids>` / `err <reason>`. Default: yes for
    /// tcp-listen, no for tcp-connect (journal ports do not expect answers); serial never
    /// answers (a printer tap is read-only).
    #[serde(default)]
    pub replies: Option<bool>,
}

impl RegisterConfig {
    /// The framing in force: configured, or the format's usual one.
    pub fn framing(&self) -> Framing {
        self.framing.clone().unwrap_or(match self.format {
            RegisterFormat::Jsonl => Framing::Newline,
            RegisterFormat::Poslog => Framing::Xml,
            RegisterFormat::Receipt => Framing::Cut { trailer: None },
        })
    }

    /// Whether frames are answered on the connection.
    pub fn replies(&self) -> bool {
        match self.transport {
            Transport::Serial { .. } | Transport::Http => false,
            Transport::TcpListen { .. } => self.replies.unwrap_or(true),
            Transport::TcpConnect { .. } => self.replies.unwrap_or(false),
        }
    }
}

/// What the bytes on a register connection mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegisterFormat {
    /// One canonical transaction JSON per frame.
    Jsonl,
    /// ARTS/NRF POSLog XML documents.
    Poslog,
    /// ESC/POS receipt-printer output, parsed with a template.
    Receipt,
}

/// How the agent talks to a register.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Transport {
    /// The register connects to the agent.
    TcpListen { bind: String },
    /// The agent connects to the register's (or POS server's) journal port.
    TcpConnect { addr: String },
    /// A serial line (RS-232 or USB-serial), for example a receipt-printer tap.
    Serial {
        port: PathBuf,
        #[serde(default = "default_baud")]
        baud: u32,
        #[serde(default = "default_data_bits")]
        data_bits: u8,
        #[serde(default)]
        parity: Parity,
        #[serde(default = "default_stop_bits")]
        stop_bits: u8,
        #[serde(default)]
        flow_control: FlowControl,
    },
    /// The register posts to `POST /pos/v1/transactions?register={name}` on `cashier.bind`.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

/// How a byte stream is cut into frames.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Framing {
    /// One frame per line.
    Newline,
    /// `STX payload ETX [checksum]`; bytes outside a frame are noise and skipped.
    StxEtx {
        #[serde(default)]
        checksum: Checksum,
    },
    /// Receipts: a frame ends at the paper cut (`GS V …`), or at `trailer` if given.
    Cut {
        #[serde(default)]
        trailer: Option<String>,
    },
    /// XML documents: a frame ends with the closing tag of its root element.
    Xml,
}

/// The check byte after ETX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Checksum {
    #[default]
    None,
    /// XOR of every byte after STX up to and including ETX (what most POS and payment
    /// protocols call the LRC).
    Xor,
    /// Two's complement of the 8-bit sum of the same bytes (Modbus-style LRC).
    Lrc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceSection {
    #[serde(default)]
    pub source: PresenceSource,
    /// The tenant's service UUID the loyalty app advertises under (128-bit, or 16-bit such as
    /// `FEAA`). Required unless `source = "none"`.
    #[serde(default)]
    pub service_uuid: Option<String>,
    /// Filled in by validation from `service_uuid`.
    #[serde(skip)]
    pub service: Option<uuid::Uuid>,
    /// Seconds per EID rotation window; the app must use the same value.
    #[serde(default = "default_rotation_s")]
    pub rotation_s: u32,
    /// Days presence history is kept in the store.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Seconds without any sighting after which a customer has left the store.
    #[serde(default = "default_store_away_s")]
    pub store_away_s: u32,
    #[serde(default)]
    pub replay: Option<crate::presence::source::ReplaySettings>,
    #[serde(default)]
    pub scanners: Option<crate::presence::source::ScannerSettings>,
    #[serde(default)]
    pub btleplug: Option<crate::presence::source::BtleSettings>,
    #[serde(default)]
    pub calibration: Vec<ScannerCalibration>,
    #[serde(default)]
    pub zones: Vec<crate::presence::zones::ZoneSpec>,
}

impl Default for PresenceSection {
    fn default() -> Self {
        Self {
            source: PresenceSource::None,
            service_uuid: None,
            service: None,
            rotation_s: default_rotation_s(),
            retention_days: default_retention_days(),
            store_away_s: default_store_away_s(),
            replay: None,
            scanners: None,
            btleplug: None,
            calibration: Vec::new(),
            zones: Vec::new(),
        }
    }
}

fn default_rotation_s() -> u32 {
    900
}

fn default_retention_days() -> u32 {
    30
}

fn default_store_away_s() -> u32 {
    60
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PresenceSource {
    #[default]
    None,
    /// The gateway's own Bluetooth adapter, through BlueZ.
    Btleplug,
    /// A JSON-lines file of advertisements (tests, demos, recorded sessions).
    Replay,
    /// Remote ESPresense room scanners publishing to an MQTT broker.
    MqttScanners,
}

/// Signal calibration of one scanner: what it reads at 1 m, and how fast the signal falls off
/// in that spot (2 in open space, 2.5-4 among shelves and people).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScannerCalibration {
    pub scanner: String,
    pub ref_rssi_1m: f32,
    #[serde(default = "default_path_loss_exponent")]
    pub path_loss_exponent: f32,
}

fn default_path_loss_exponent() -> f32 {
    2.0
}

/// Offers: where campaigns come from besides central, and how often central is asked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffersSection {
    /// Decide offers at all. Off, presence and registers work as before and no offer or
    /// prompt event is produced.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A campaign set (JSON, as central ships it) loaded at start when central has not sent
    /// a newer one: for a store that runs without central, or to seed a fresh gateway.
    #[serde(default)]
    pub campaigns_file: Option<PathBuf>,
    /// Seconds between `GET /v1/stores/{store}/campaigns` polls (with `If-None-Match`), when
    /// `central.https` is set.
    #[serde(default = "default_campaign_poll_s")]
    pub campaign_poll_s: u64,
    /// Seconds a cashier prompt stays on a lane with nothing happening before it is cleared.
    #[serde(default = "default_prompt_ttl_s")]
    pub prompt_ttl_s: u64,
}

impl Default for OffersSection {
    fn default() -> Self {
        OffersSection {
            enabled: true,
            campaigns_file: None,
            campaign_poll_s: default_campaign_poll_s(),
            prompt_ttl_s: default_prompt_ttl_s(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_campaign_poll_s() -> u64 {
    300
}
fn default_prompt_ttl_s() -> u64 {
    300
}

/// Customer profiles: the cache, sync from central, and the KPI settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesSection {
    /// Hot profiles kept in memory in front of sled (0 turns the cache off).
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Seconds between delta syncs from central's HTTPS API once caught up. Needs
    /// `central.https`; without it, profiles arrive over the MQTT downlink only.
    #[serde(default = "default_sync_interval_s")]
    pub sync_interval_s: u64,
    /// Profiles asked for per page.
    #[serde(default = "default_sync_page_size")]
    pub sync_page_size: u32,
    /// Seconds between recomputations of the store's RFM distribution.
    #[serde(default = "default_rfm_interval_s")]
    pub rfm_interval_s: u64,
    #[serde(default)]
    pub kpi: crate::profiles::kpi::KpiConfig,
}

impl Default for ProfilesSection {
    fn default() -> Self {
        ProfilesSection {
            cache_entries: default_cache_entries(),
            sync_interval_s: default_sync_interval_s(),
            sync_page_size: default_sync_page_size(),
            rfm_interval_s: default_rfm_interval_s(),
            kpi: Default::default(),
        }
    }
}

fn default_cache_entries() -> usize {
    crate::profiles::DEFAULT_CACHE_ENTRIES
}
fn default_sync_interval_s() -> u64 {
    300
}
fn default_sync_page_size() -> u32 {
    1000
}
fn default_rfm_interval_s() -> u64 {
    6 * 3600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralSection {
    /// While the oldest held event is older than this (seconds), the outbox is draining a
    /// backlog, and a share of every sending window goes to events newer than this, so live
    /// traffic is not stuck behind the backlog.
    #[serde(default = "default_live_after_s")]
    pub live_after_s: u64,
    #[serde(default)]
    pub mqtt: Option<MqttSection>,
    #[serde(default)]
    pub https: Option<HttpsSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `mqtt://host:port`.
    pub url: String,
    /// Defaults to `storelink-{tenant}-{store}`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Defaults to `storelink/v1/{tenant}`.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    /// Name of the environment variable holding the MQTT password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Publishes sent before their PUBACK arrives.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// `"3.1.1"` (default) or `"5"`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Start every connection with a fresh session. With `false` the broker keeps the
    /// subscriptions and queues central's downlink (erasures, profiles) while the store is away.
    #[serde(default = "default_true")]
    pub clean_session: bool,
    /// An HTTP CONNECT proxy (`http://[user:pass@]host:port`). Default: `HTTPS_PROXY`
    /// (`HTTP_PROXY` for ws://) for WebSocket urls, none for TCP ones; `NO_PROXY` is honoured.
    #[serde(default)]
    pub proxy: Option<String>,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// The proxy in force, resolved from `proxy` or the environment.
    #[serde(skip)]
    pub resolved_proxy: Option<ProxyUrl>,
}

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

/// An HTTP proxy for the MQTT connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({}:{})", self.host, self.port)
    }
}

impl HttpsSection {
    pub fn tls_files(&self) -> crate::tls::TlsFiles<'_> {
        crate::tls::TlsFiles {
            ca_file: self.ca_file.as_deref(),
            cert_file: self.cert_file.as_deref(),
            key_file: self.key_file.as_deref(),
        }
    }
}

impl ProxyUrl {
    /// `http://[user:pass@]host[:port][/]`. Only plain-HTTP CONNECT proxies: what stores run.
    pub fn parse(url: &str) -> Result<ProxyUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// (CONNECT) proxies are supported"))?;
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((auth, hp)) => (Some(auth), hp),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("proxy port {p:?} is not a number"))?,
            ),
            None => (hostport, 80),
        };
        if host.is_empty() || host.contains(['/', '?', '#']) {
            return Err(format!("{host:?} is not a proxy host name"));
        }
        let (username, password) = match auth.map(|a| a.split_once(':').unwrap_or((a, ""))) {
            Some((u, p)) => (Some(u.to_string()), Some(Secret::new(p))),
            None => (None, None),
        };
        Ok(ProxyUrl {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
            username,
            password,
        })
    }
}

/// Whether `NO_PROXY` (comma-separated host suffixes, or `*`) exempts `host`.
fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    no_proxy.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        entry == "*"
            || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsSection {
    pub base_url: String,
    /// Name of the environment variable holding central's bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS, instead of or besides the bearer token.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Send events over `POST /v1/stores/{store}/events:batch` when MQTT cannot keep up (see
    /// `backfill_after_s`, `mqtt_down_after_s`). Default true.
    #[serde(default = "default_true")]
    pub uplink: bool,
    /// HTTPS backfill starts when the oldest held event is older than this (seconds).
    #[serde(default = "default_backfill_after_s")]
    pub backfill_after_s: u64,
    /// …or when MQTT has been unreachable for longer than this (seconds).
    #[serde(default = "default_mqtt_down_after_s")]
    pub mqtt_down_after_s: u64,
    /// Most events in one batch.
    #[serde(default = "default_batch_events")]
    pub batch_events: usize,
    /// Most bytes (uncompressed) in one batch.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    #[serde(skip)]
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CashierSection {
    /// Where the local HTTP server (lane displays, register API, status, metrics) listens.
    /// `STORELINK_CASHIER_BIND` in the environment overrides it.
    #[serde(default = "default_cashier_bind")]
    pub bind: String,
    /// Name of the environment variable holding the admin token for `/api/v1/*`, `/metrics`
    /// and `/pos/v1/*`. Required when `bind` is not a loopback address.
    #[serde(default)]
    pub admin_token_env: Option<String>,
    /// Name of the environment variable holding the secret each lane's display token is
    /// derived from. Unset: the agent makes a secret once and keeps it in its store.
    #[serde(default)]
    pub lane_secret_env: Option<String>,
    /// The lane displays' language: a key of `texts` ("de" and "en" are built in).
    #[serde(default = "default_language")]
    pub language: String,
    /// Display texts per language, over the built-in German and English ones; a new language
    /// must give every key.
    #[serde(default)]
    pub texts: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(skip)]
    pub admin_token: Option<Secret>,
    #[serde(skip)]
    pub lane_secret: Option<Secret>,
}

impl Default for CashierSection {
    fn default() -> Self {
        Self {
            bind: default_cashier_bind(),
            admin_token_env: None,
            lane_secret_env: None,
            language: default_language(),
            texts: BTreeMap::new(),
            admin_token: None,
            lane_secret: None,
        }
    }
}

/// The lane display's texts, by key: German and English built in.
pub const LANE_TEXTS: &[(&str, &str, &str)] = &[
    // (key, de, en)
    ("lane", "Kasse", "Lane"),
    ("idle", "Bereit", "Ready"),
    (
        "idle_hint",
        "Kein Stammkunde an dieser Kasse",
        "No loyalty customer at this lane",
    ),
    ("welcome", "Willkommen zurück", "Welcome back"),
    (
        "ask_for_card",
        "Bitte nach der Kundenkarte fragen",
        "Ask for the loyalty card",
    ),
    ("points", "Punkte", "points"),
    ("offer", "Angebot", "Offer"),
    ("code", "Code", "Code"),
    ("accept", "Angenommen", "Accepted"),
    ("dismiss", "Ablehnen", "Dismiss"),
    ("redeemed", "Eingelöst", "Redeemed"),
    (
        "offline",
        "Keine Verbindung zum Agenten – Anzeige evtl. veraltet",
        "Agent unreachable – display may be out of date",
    ),
    (
        "failed",
        "Aktion nicht gespeichert, bitte erneut tippen",
        "Action not saved, please tap again",
    ),
];

impl CashierSection {
    /// The texts for `language`: the built-in ones with the config's over them.
    pub fn texts_for(&self, language: &str) -> Option<BTreeMap<String, String>> {
        let column = match language {
            "de" => Some(1),
            "en" => Some(2),
            _ => None,
        };
        let builtin = column.map(|c| {
            LANE_TEXTS
                .iter()
                .map(move |t| (t.0.to_string(), if c == 1 { t.1 } else { t.2 }.to_string()))
        });
        let given = self.texts.get(language);
        if builtin.is_none() && given.is_none() {
            return None;
        }
        let mut texts: BTreeMap<String, String> = builtin.into_iter().flatten().collect();
        if let Some(given) = given {
            texts.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Some(texts)
    }

    /// Every language a display can be shown in.
    pub fn languages(&self) -> Vec<String> {
        let mut all: Vec<String> = ["de", "en"].iter().map(|s| s.to_string()).collect();
        all.extend(self.texts.keys().cloned());
        all.sort();
        all.dedup();
        all
    }
}

/// A secret read from the environment. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn default_timezone() -> String {
    "UTC".into()
}
fn default_currency() -> String {
    "EUR".into()
}
fn default_storage_path() -> PathBuf {
    PathBuf::from("/var/lib/storelink")
}
fn default_max_outbox_bytes() -> u64 {
    2 * 1024 * 1024 * 1024
}
fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}
/// The storage engines' memory, split in half by default: sled counts its cache in on-disk
/// bytes and holds several times that in memory (at 16 MiB the agent's RSS grew by 30 % over a
/// 30-minute soak; at 4 MiB it stops growing early, BENCHMARKS.md), and redb's cache holds the
/// outbox's hot pages, which a drained outbox keeps small.
const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 8 * 1024 * 1024;
/// The log's share when only the profile cache's is configured.
const DEFAULT_LOG_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// Least either engine is given.
const MIN_CACHE_BYTES: u64 = 1024 * 1024;
fn default_max_deadletter_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_seen_retention_days() -> u64 {
    35
}
fn default_max_seen_ids() -> u64 {
    1_000_000
}
fn default_max_frame_bytes() -> usize {
    1024 * 1024
}
fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_true() -> bool {
    true
}
fn default_live_after_s() -> u64 {
    30
}
fn default_backfill_after_s() -> u64 {
    600
}
fn default_mqtt_down_after_s() -> u64 {
    300
}
fn default_batch_events() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    1 << 20
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_inflight() -> u16 {
    100
}
fn default_cashier_bind() -> String {
    // Loopback unless the config says otherwise: anything wider needs an admin token.
    "127.0.0.1:8080".into()
}
fn default_language() -> String {
    "de".into()
}

/// One thing wrong with a config file, at one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `registers[0].transport.bind`. Empty for syntax errors.
    pub key: String,
    pub message: String,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the file: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

fn render_problems(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| {
            if p.key.is_empty() {
                format!("{file}: {}", p.message)
            } else {
                format!("{file}: {}: {}", p.key, p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads the environment; injectable so tests need not touch the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Config {
    /// Reads, parses and validates `path`, taking secrets from the process environment.
    /// Relative file paths in it (receipt templates, certificates) are relative to the
    /// directory that holds `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty());
        Config::parse_in(&text, &file, base, &ProcessEnv)
    }

    /// Parses and validates `text`; `file` is only used in error messages. Relative paths
    /// stay relative to the working directory.
    pub fn parse(text: &str, file: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        Config::parse_in(text, file, None, env)
    }

    /// Parses and validates `text`, resolving relative paths against `base`.
    pub fn parse_in(
        text: &str,
        file: &str,
        base: Option<&Path>,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            file: file.to_string(),
            problems,
        };
        let mut config = parse_toml(text).map_err(|p| invalid(vec![p]))?;
        if let Some(base) = base {
            config.resolve_paths(base);
        }
        let problems = config.validate(env);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid(problems))
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for register in &mut self.registers {
            if let Some(t) = &mut register.template {
                resolve(t);
            }
        }
        if let Some(mqtt) = &mut self.central.mqtt {
            for f in [&mut mqtt.ca_file, &mut mqtt.cert_file, &mut mqtt.key_file]
                .into_iter()
                .flatten()
            {
                resolve(f);
            }
        }
        if let Some(https) = &mut self.central.https {
            for f in [
                &mut https.ca_file,
                &mut https.cert_file,
                &mut https.key_file,
            ]
            .into_iter()
            .flatten()
            {
                resolve(f);
            }
        }
        if let Some(replay) = &mut self.presence.replay {
            resolve(&mut replay.file);
        }
        if let Some(f) = &mut self.offers.campaigns_file {
            resolve(f);
        }
    }

    /// The MQTT topic prefix in force.
    pub fn topic_prefix(&self) -> String {
        self.central
            .mqtt
            .as_ref()
            .and_then(|m| m.topic_prefix.clone())
            .unwrap_or_else(|| format!("storelink/v1/{}", self.store.tenant))
    }

    /// The MQTT client id in force.
    pub fn mqtt_client_id(&self) -> String {
        self.central
            .mqtt
            .as_ref()
            .and_then(|m| m.client_id.clone())
            .unwrap_or_else(|| format!("storelink-{}-{}", self.store.tenant, self.store.id))
    }

    /// The store's time zone. Validation guarantees it resolves.
    pub fn time_zone(&self) -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get(&self.store.timezone).unwrap_or(jiff::tz::TimeZone::UTC)
    }

    fn validate(&mut self, env: &dyn Env) -> Vec<Problem> {
        let mut v = Validator::default();

        v.name("store.id", &self.store.id, 64);
        v.name("store.tenant", &self.store.tenant, 64);
        if jiff::tz::TimeZone::get(&self.store.timezone).is_err() {
            v.problem(
                "store.timezone",
                format!(
                    "unknown time zone {:?} (use an IANA name such as \"Europe/Berlin\")",
                    self.store.timezone
                ),
            );
        }
        v.currency("store.currency", &self.store.currency);

        if self.storage.path.as_os_str().is_empty() {
            v.problem("storage.path", "must not be empty");
        }
        if self.storage.max_outbox_bytes < 1024 * 1024 {
            v.problem(
                "storage.max_outbox_bytes",
                format!(
                    "{} is too small; use at least 1048576 (1 MiB)",
                    self.storage.max_outbox_bytes
                ),
            );
        }
        if let Some(cache) = self.storage.cache_bytes
            && cache < MIN_CACHE_BYTES
        {
            v.problem(
                "storage.cache_bytes",
                "too small; use at least 1048576 (1 MiB)",
            );
        }
        let budget = self.storage.memory_budget();
        if budget < 2 * MIN_CACHE_BYTES {
            v.problem(
                "storage.memory_budget_bytes",
                format!("{budget} is too small; use at least 2097152 (2 MiB)"),
            );
        } else if let Some(cache) = self.storage.cache_bytes
            && cache > budget - MIN_CACHE_BYTES
        {
            v.problem(
                "storage.cache_bytes",
                format!(
                    "{cache} leaves less than 1 MiB of storage.memory_budget_bytes ({budget}) for the outbox's log; lower it or raise the budget"
                ),
            );
        }
        if self.storage.max_deadletter_bytes < 64 * 1024 {
            v.problem(
                "storage.max_deadletter_bytes",
                "too small; use at least 65536 (64 KiB)",
            );
        }

        if !(1..=3650).contains(&self.storage.seen_retention_days) {
            v.problem(
                "storage.seen_retention_days",
                format!(
                    "{} is out of range 1-3650",
                    self.storage.seen_retention_days
                ),
            );
        }
        if self.storage.max_seen_ids < 1000 {
            v.problem("storage.max_seen_ids", "too small; use at least 1000");
        }

        if let Some(bind) = env.var("STORELINK_CASHIER_BIND").filter(|b| !b.is_empty()) {
            self.cashier.bind = bind;
        }
        let cashier_bind = v.bind("cashier.bind", &self.cashier.bind);
        self.validate_cashier(&mut v, cashier_bind, env);
        let mut binds: Vec<(SocketAddr, String)> = cashier_bind
            .map(|a| vec![(a, "cashier.bind".to_string())])
            .unwrap_or_default();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, register) in self.registers.iter().enumerate() {
            let at = format!("registers[{i}]");
            v.name(&format!("{at}.name"), &register.name, 64);
            if let Some(previous) = names.insert(&register.name, i) {
                v.problem(
                    format!("{at}.name"),
                    format!(
                        "{:?} is already used by registers[{previous}]",
                        register.name
                    ),
                );
            }
            if let Some(lane) = &register.lane {
                v.name(&format!("{at}.lane"), lane, 32);
            }
            match &register.transport {
                Transport::TcpListen { bind } => {
                    let key = format!("{at}.transport.bind");
                    if let Some(addr) = v.bind(&key, bind) {
                        if let Some((_, other)) = binds.iter().find(|(a, _)| {
                            a.port() == addr.port()
                                && (a.ip() == addr.ip()
                                    || a.ip().is_unspecified()
                                    || addr.ip().is_unspecified())
                        }) {
                            v.problem(&key, format!("{bind} overlaps with {other}"));
                        }
                        binds.push((addr, key));
                    }
                }
                Transport::TcpConnect { addr } => {
                    let ok = addr.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    });
                    if !ok {
                        v.problem(
                            format!("{at}.transport.addr"),
                            format!("{addr:?} is not host:port with a port of 1-65535"),
                        );
                    }
                }
                Transport::Serial {
                    port,
                    baud,
                    data_bits,
                    stop_bits,
                    ..
                } => {
                    if port.as_os_str().is_empty() {
                        v.problem(format!("{at}.transport.port"), "must name a device");
                    }
                    if !(50..=4_000_000).contains(baud) {
                        v.problem(
                            format!("{at}.transport.baud"),
                            format!("{baud} is out of range 50-4000000"),
                        );
                    }
                    if !(5..=8).contains(data_bits) {
                        v.problem(
                            format!("{at}.transport.data_bits"),
                            format!("{data_bits} is not 5, 6, 7 or 8"),
                        );
                    }
                    if !(1..=2).contains(stop_bits) {
                        v.problem(
                            format!("{at}.transport.stop_bits"),
                            format!("{stop_bits} is not 1 or 2"),
                        );
                    }
                }
                Transport::Http => {}
            }
            if !(1024..=64 * 1024 * 1024).contains(&register.max_frame_bytes) {
                v.problem(
                    format!("{at}.max_frame_bytes"),
                    format!("{} is out of range 1024-67108864", register.max_frame_bytes),
                );
            }
            if let Some(Framing::Cut { trailer: Some(t) }) = &register.framing
                && (t.is_empty() || !t.is_ascii())
            {
                // The printer sends its code page, not UTF-8: only ASCII means the same bytes.
                v.problem(
                    format!("{at}.framing.trailer"),
                    "must be non-empty ASCII (the printer's code page differs from UTF-8 elsewhere)",
                );
            }
            match (register.format, &register.template) {
                (RegisterFormat::Receipt, None) => v.problem(
                    format!("{at}.template"),
                    "missing required key: receipts are parsed with a template (see config/receipts/)",
                ),
                (RegisterFormat::Receipt, Some(path)) => {
                    if let Err(e) = crate::pos::receipt::ReceiptTemplate::load(path) {
                        v.problem(format!("{at}.template"), e);
                    }
                }
                (_, Some(_)) => v.problem(
                    format!("{at}.template"),
                    "only receipt registers use a template",
                ),
                (_, None) => {}
            }
            if register.replies.is_some()
                && matches!(
                    register.transport,
                    Transport::Serial { .. } | Transport::Http
                )
            {
                v.problem(
                    format!("{at}.replies"),
                    "serial and http registers cannot take reply lines",
                );
            }
        }

        self.validate_presence(&mut v);
        self.validate_profiles(&mut v);
        self.validate_offers(&mut v);

        match (&mut self.central.mqtt, &mut self.central.https) {
            (None, _) => v.problem(
                "central.mqtt",
                "missing required table: the MQTT uplink is how events reach central",
            ),
            (Some(mqtt), _) => {
                v.mqtt_url("central.mqtt.url", &mqtt.url);
                if let Some(id) = &mqtt.client_id
                    && (id.is_empty() || id.len() > 128)
                {
                    v.problem("central.mqtt.client_id", "must be 1 to 128 characters");
                }
                if let Some(prefix) = &mqtt.topic_prefix
                    && (prefix.is_empty()
                        || prefix.ends_with('/')
                        || prefix.contains(['+', '#', '\0']))
                {
                    v.problem(
                        "central.mqtt.topic_prefix",
                        "must be non-empty, must not end with '/' and must not contain '+', '#' or NUL",
                    );
                }
                let endpoint = MqttEndpoint::parse(&mqtt.url).ok();
                if endpoint.as_ref().is_some_and(|e| !e.scheme.tls()) {
                    for (key, file) in [
                        ("central.mqtt.ca_file", &mqtt.ca_file),
                        ("central.mqtt.cert_file", &mqtt.cert_file),
                        ("central.mqtt.key_file", &mqtt.key_file),
                    ] {
                        if file.is_some() {
                            v.problem(key, "TLS settings need an mqtts:// or wss:// url");
                        }
                    }
                }
                v.tls_files(
                    "central.mqtt",
                    &mqtt.ca_file,
                    &mqtt.cert_file,
                    &mqtt.key_file,
                );
                mqtt.resolved_proxy = match (&mqtt.proxy, &endpoint) {
                    (Some(url), _) => match ProxyUrl::parse(url) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            v.problem("central.mqtt.proxy", e);
                            None
                        }
                    },
                    (None, Some(endpoint)) if endpoint.scheme.websocket() => {
                        let names: &[&str] = if endpoint.scheme.tls() {
                            &["HTTPS_PROXY", "https_proxy"]
                        } else {
                            &["HTTP_PROXY", "http_proxy"]
                        };
                        let exempt = ["NO_PROXY", "no_proxy"]
                            .iter()
                            .filter_map(|n| env.var(n))
                            .any(|np| no_proxy_matches(&np, &endpoint.host));
                        match names.iter().find_map(|n| env.var(n).map(|u| (*n, u))) {
                            Some((name, url)) if !exempt && !url.is_empty() => {
                                match ProxyUrl::parse(&url) {
                                    Ok(p) => Some(p),
                                    Err(e) => {
                                        v.problem(
                                            "central.mqtt.proxy",
                                            format!("from the environment variable {name}: {e}"),
                                        );
                                        None
                                    }
                                }
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                if mqtt.keep_alive_s < 5 || mqtt.keep_alive_s > 3600 {
                    v.problem(
                        "central.mqtt.keep_alive_s",
                        format!("{} is out of range 5-3600", mqtt.keep_alive_s),
                    );
                }
                if mqtt.inflight == 0 || mqtt.inflight > 1000 {
                    v.problem(
                        "central.mqtt.inflight",
                        format!("{} is out of range 1-1000", mqtt.inflight),
                    );
                }
                if mqtt.password_env.is_some() && mqtt.username.is_none() {
                    v.problem(
                        "central.mqtt.password_env",
                        "a password needs central.mqtt.username",
                    );
                }
                mqtt.password = v.secret("central.mqtt.password_env", &mqtt.password_env, env);
            }
        }
        if let Some(https) = &mut self.central.https {
            if !https.base_url.starts_with("https://") {
                v.problem(
                    "central.https.base_url",
                    format!("{:?} must start with https://", https.base_url),
                );
            }
            https.token = v.secret("central.https.token_env", &https.token_env, env);
            v.tls_files(
                "central.https",
                &https.ca_file,
                &https.cert_file,
                &https.key_file,
            );
            let mut range = |key: &str, value: u64, lo: u64, hi: u64| {
                if !(lo..=hi).contains(&value) {
                    v.problem(
                        format!("central.https.{key}"),
                        format!("{value} is out of range {lo}-{hi}"),
                    );
                }
            };
            range("backfill_after_s", https.backfill_after_s, 10, 30 * 86_400);
            range("mqtt_down_after_s", https.mqtt_down_after_s, 5, 30 * 86_400);
            range("batch_events", https.batch_events as u64, 1, 10_000);
            range("batch_bytes", https.batch_bytes as u64, 4096, 64 << 20);
        }
        let ttl = &self.storage.ttl_s;
        for (name, value) in [
            ("transaction", ttl.transaction),
            ("redemption", ttl.redemption),
        ] {
            if value.is_some() {
                v.problem(
                    format!("storage.ttl_s.{name}"),
                    "has no TTL: these events are kept until central acknowledges them",
                );
            }
        }
        for (name, value) in [
            ("presence", ttl.presence),
            ("offer", ttl.offer),
            ("status", ttl.status),
            ("deadletter", ttl.deadletter),
        ] {
            if let Some(s) = value
                && s != 0
                && !(60..=365 * 86_400).contains(&s)
            {
                v.problem(
                    format!("storage.ttl_s.{name}"),
                    format!("{s} is out of range: 0 (no TTL) or 60-31536000"),
                );
            }
        }
        if !(5..=86_400).contains(&self.central.live_after_s) {
            v.problem(
                "central.live_after_s",
                format!("{} is out of range 5-86400", self.central.live_after_s),
            );
        }

        v.problems
    }
}

impl Config {
    fn validate_cashier(&mut self, v: &mut Validator, bind: Option<SocketAddr>, env: &dyn Env) {
        let c = &mut self.cashier;
        c.admin_token = v.secret("cashier.admin_token_env", &c.admin_token_env, env);
        c.lane_secret = v.secret("cashier.lane_secret_env", &c.lane_secret_env, env);
        if let Some(addr) = bind
            && !addr.ip().is_loopback()
            && c.admin_token_env.is_none()
        {
            v.problem(
                "cashier.admin_token_env",
                format!(
                    "required when cashier.bind ({addr}) is not a loopback address: name the environment variable that holds the admin token, or bind to 127.0.0.1"
                ),
            );
        }
        if let Some(token) = &c.admin_token
            && token.expose().len() < 16
        {
            v.problem(
                "cashier.admin_token_env",
                "the admin token is shorter than 16 characters",
            );
        }
        if let Some(secret) = &c.lane_secret
            && secret.expose().len() < 16
        {
            v.problem(
                "cashier.lane_secret_env",
                "the lane secret is shorter than 16 characters",
            );
        }
        let known: HashSet<&str> = LANE_TEXTS.iter().map(|(k, _, _)| *k).collect();
        for (language, texts) in &c.texts {
            for key in texts.keys() {
                if !known.contains(key.as_str()) {
                    v.problem(
                        format!("cashier.texts.{language}.{key}"),
                        format!(
                            "not a display text; known: {}",
                            LANE_TEXTS
                                .iter()
                                .map(|(k, _, _)| *k)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
            }
            if !["de", "en"].contains(&language.as_str()) {
                let missing: Vec<&str> = LANE_TEXTS
                    .iter()
                    .map(|(k, _, _)| *k)
                    .filter(|k| !texts.contains_key(*k))
                    .collect();
                if !missing.is_empty() {
                    v.problem(
                        format!("cashier.texts.{language}"),
                        format!(
                            "a new language needs every text; missing: {}",
                            missing.join(", ")
                        ),
                    );
                }
            }
        }
        if c.texts_for(&c.language).is_none() {
            v.problem(
                "cashier.language",
                format!(
                    "{:?} has no texts; use one of {}",
                    c.language,
                    c.languages().join(", ")
                ),
            );
        }
    }

    fn validate_profiles(&self, v: &mut Validator) {
        let p = &self.profiles;
        let mut range = |key: &str, value: f64, lo: f64, hi: f64| {
            if !(lo..=hi).contains(&value) {
                v.problem(
                    format!("profiles.{key}"),
                    format!("{value} is out of range {lo}-{hi}"),
                );
            }
        };
        range("cache_entries", p.cache_entries as f64, 0.0, 10_000_000.0);
        range("sync_interval_s", p.sync_interval_s as f64, 10.0, 86_400.0);
        range(
            "sync_page_size",
            f64::from(p.sync_page_size),
            1.0,
            100_000.0,
        );
        range(
            "rfm_interval_s",
            p.rfm_interval_s as f64,
            60.0,
            7.0 * 86_400.0,
        );
        let k = &p.kpi;
        range("kpi.new_days", f64::from(k.new_days), 1.0, 3650.0);
        range(
            "kpi.passive_after_days",
            f64::from(k.passive_after_days),
            1.0,
            3650.0,
        );
        range("kpi.overdue_factor", k.overdue_factor, 1.0, 10.0);
        range(
            "kpi.expected_lifetime_years",
            k.expected_lifetime_years,
            0.1,
            50.0,
        );
        range(
            "kpi.clv_horizon_days",
            f64::from(k.clv_horizon_days),
            1.0,
            3650.0,
        );
    }

    fn validate_offers(&self, v: &mut Validator) {
        let o = &self.offers;
        if !(10..=86_400).contains(&o.campaign_poll_s) {
            v.problem(
                "offers.campaign_poll_s",
                format!("{} is out of range 10-86400", o.campaign_poll_s),
            );
        }
        if !(5..=86_400).contains(&o.prompt_ttl_s) {
            v.problem(
                "offers.prompt_ttl_s",
                format!("{} is out of range 5-86400", o.prompt_ttl_s),
            );
        }
        if let Some(f) = &o.campaigns_file {
            match std::fs::read(f) {
                Err(e) => v.problem(
                    "offers.campaigns_file",
                    format!("cannot read {}: {e}", f.display()),
                ),
                Ok(bytes) => {
                    if let Err(e) =
                        serde_json::from_slice::<crate::offers::campaign::CampaignSet>(&bytes)
                    {
                        v.problem(
                            "offers.campaigns_file",
                            format!("{} is not a campaign set: {e}", f.display()),
                        );
                    }
                }
            }
        }
    }

    fn validate_presence(&mut self, v: &mut Validator) {
        let p = &mut self.presence;
        match (&p.service_uuid, p.source) {
            (None, PresenceSource::None) => {}
            (None, _) => v.problem(
                "presence.service_uuid",
                "missing required key: the loyalty app's service UUID is how its phones are found",
            ),
            (Some(text), _) => match crate::presence::advert::parse_service_uuid(text) {
                Ok(u) => p.service = Some(u),
                Err(e) => v.problem("presence.service_uuid", e),
            },
        }
        if !(30..=86_400).contains(&p.rotation_s) {
            v.problem(
                "presence.rotation_s",
                format!("{} is out of range 30-86400", p.rotation_s),
            );
        }
        if !(1..=3650).contains(&p.retention_days) {
            v.problem(
                "presence.retention_days",
                format!("{} is out of range 1-3650", p.retention_days),
            );
        }
        if !(5..=86_400).contains(&p.store_away_s) {
            v.problem(
                "presence.store_away_s",
                format!("{} is out of range 5-86400", p.store_away_s),
            );
        }
        let tables = [
            ("replay", p.replay.is_some(), PresenceSource::Replay),
            (
                "scanners",
                p.scanners.is_some(),
                PresenceSource::MqttScanners,
            ),
            ("btleplug", p.btleplug.is_some(), PresenceSource::Btleplug),
        ];
        for (table, present, wants) in tables {
            if present && p.source != wants {
                v.problem(
                    format!("presence.{table}"),
                    format!("only used when presence.source = {:?}", source_name(wants)),
                );
            }
        }
        match p.source {
            PresenceSource::Replay => match &p.replay {
                None => v.problem(
                    "presence.replay",
                    "missing required table: source = \"replay\" needs [presence.replay] with a file",
                ),
                Some(r) => {
                    if let Err(e) = std::fs::metadata(&r.file) {
                        v.problem(
                            "presence.replay.file",
                            format!("cannot read {}: {e}", r.file.display()),
                        );
                    }
                    if let Err(e) = r.validate() {
                        v.source_problem("presence.replay", e);
                    }
                }
            },
            PresenceSource::MqttScanners => {
                if let Some(Err(e)) = p.scanners.as_ref().map(|s| s.validate()) {
                    v.source_problem("presence.scanners", e);
                }
            }
            PresenceSource::Btleplug | PresenceSource::None => {}
        }

        let mut scanners: HashMap<&str, usize> = HashMap::new();
        for (i, c) in p.calibration.iter().enumerate() {
            let at = format!("presence.calibration[{i}]");
            v.name(&format!("{at}.scanner"), &c.scanner, 64);
            if let Some(previous) = scanners.insert(&c.scanner, i) {
                v.problem(
                    format!("{at}.scanner"),
                    format!(
                        "{:?} is already calibrated in presence.calibration[{previous}]",
                        c.scanner
                    ),
                );
            }
            if !(-120.0..=0.0).contains(&c.ref_rssi_1m) {
                v.problem(
                    format!("{at}.ref_rssi_1m"),
                    format!("{} dBm is out of range -120 to 0", c.ref_rssi_1m),
                );
            }
            if !(1.0..=6.0).contains(&c.path_loss_exponent) {
                v.problem(
                    format!("{at}.path_loss_exponent"),
                    format!("{} is out of range 1-6", c.path_loss_exponent),
                );
            }
        }

        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, z) in p.zones.iter().enumerate() {
            let at = format!("presence.zones[{i}]");
            v.name(&format!("{at}.name"), &z.name, 64);
            if z.name == "store" {
                v.problem(
                    format!("{at}.name"),
                    "\"store\" is reserved for store-level presence",
                );
            }
            if let Some(previous) = names.insert(&z.name, i) {
                v.problem(
                    format!("{at}.name"),
                    format!("{:?} is already used by presence.zones[{previous}]", z.name),
                );
            }
            if let Some(lane) = &z.lane {
                v.name(&format!("{at}.lane"), lane, 32);
            }
            if z.scanners.is_empty() {
                v.problem(
                    format!("{at}.scanners"),
                    "must name at least one scanner that covers the zone",
                );
            }
            for (j, s) in z.scanners.iter().enumerate() {
                v.name(&format!("{at}.scanners[{j}]"), s, 64);
            }
            if !(z.enter_m > 0.0 && z.enter_m <= 100.0) {
                v.problem(
                    format!("{at}.enter_m"),
                    format!("{} is out of range (0, 100] metres", z.enter_m),
                );
            }
            if !(z.exit_m > z.enter_m && z.exit_m <= 100.0) {
                v.problem(
                    format!("{at}.exit_m"),
                    format!(
                        "{} must be greater than enter_m ({}) and at most 100: the gap is what stops a zone from flapping",
                        z.exit_m, z.enter_m
                    ),
                );
            }
            if z.dwell_s > 86_400 {
                v.problem(
                    format!("{at}.dwell_s"),
                    format!("{} is out of range 0-86400", z.dwell_s),
                );
            }
            if !(1..=86_400).contains(&z.away_s) {
                v.problem(
                    format!("{at}.away_s"),
                    format!("{} is out of range 1-86400", z.away_s),
                );
            }
        }
    }
}

fn source_name(source: PresenceSource) -> &'static str {
    match source {
        PresenceSource::None => "none",
        PresenceSource::Btleplug => "btleplug",
        PresenceSource::Replay => "replay",
        PresenceSource::MqttScanners => "mqtt-scanners",
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    /// A source's own check, under its config key.
    fn source_problem(&mut self, table: &str, e: crate::presence::source::SourceError) {
        match e {
            crate::presence::source::SourceError::Config { key, reason } => {
                self.problem(key, reason)
            }
            other => self.problem(table, other.to_string()),
        }
    }

    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Names end up in event ids (`store:register:day:seq`) and MQTT topics, so they must not
    /// carry separators or wildcards.
    fn name(&mut self, key: &str, value: &str, max: usize) {
        let ok = !value.is_empty()
            && value.len() <= max
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            self.problem(
                key,
                format!("{value:?} must be 1 to {max} characters of A-Z, a-z, 0-9, '-' or '_'"),
            );
        }
    }

    fn currency(&mut self, key: &str, value: &str) {
        if value.len() != 3 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
            self.problem(
                key,
                format!("{value:?} is not an ISO 4217 code such as \"EUR\""),
            );
        }
    }

    fn bind(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match parse_socket_addr(value) {
            Ok(addr) => Some(addr),
            Err(message) => {
                self.problem(key, message);
                None
            }
        }
    }

    fn mqtt_url(&mut self, key: &str, value: &str) {
        if let Err(message) = MqttEndpoint::parse(value) {
            self.problem(key, message);
        }
    }

    /// Reads the PEM files a TLS client will load, so a bad file stops the start with its key.
    fn tls_files(
        &mut self,
        section: &str,
        ca: &Option<PathBuf>,
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
    ) {
        if let Some(ca) = ca
            && let Err(e) = crate::tls::read_certs(ca)
        {
            self.problem(format!("{section}.ca_file"), e);
        }
        match (cert, key) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::read_identity(cert, key) {
                    self.problem(format!("{section}.{}", e.key), e.message);
                }
            }
            (Some(_), None) => self.problem(
                format!("{section}.key_file"),
                "a client certificate needs its key (cert_file and key_file go together)",
            ),
            (None, Some(_)) => self.problem(
                format!("{section}.cert_file"),
                "a client key needs its certificate (cert_file and key_file go together)",
            ),
            (None, None) => {}
        }
    }

    fn secret(&mut self, key: &str, name: &Option<String>, env: &dyn Env) -> Option<Secret> {
        let name = name.as_ref()?;
        match env.var(name) {
            Some(value) if !value.is_empty() => Some(Secret::new(value)),
            _ => {
                self.problem(key, format!("environment variable {name} is not set"));
                None
            }
        }
    }
}

/// Parses `host:port` for a listener, with the port range checked so that `:70000` says so.
pub fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("{value:?} is not an address of the form host:port"));
    };
    let port: u64 = port
        .parse()
        .map_err(|_| format!("{value:?}: port {port:?} is not a number"))?;
    if port > 65535 {
        return Err(format!("port {port} is out of range 0-65535"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address (listeners bind to an IP)"))?;
    Ok(SocketAddr::new(ip, port as u16))
}

/// How the MQTT connection is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttScheme {
    /// `mqtt://`: plain TCP, default port 1883.
    Mqtt,
    /// `mqtts://`: TLS, default port 8883.
    Mqtts,
    /// `ws://`: WebSocket, default port 80.
    Ws,
    /// `wss://`: WebSocket over TLS, default port 443, for stores whose firewall passes only 443.
    Wss,
}

impl MqttScheme {
    pub fn tls(self) -> bool {
        matches!(self, MqttScheme::Mqtts | MqttScheme::Wss)
    }

    pub fn websocket(self) -> bool {
        matches!(self, MqttScheme::Ws | MqttScheme::Wss)
    }

    fn prefix(self) -> &'static str {
        match self {
            MqttScheme::Mqtt => "mqtt://",
            MqttScheme::Mqtts => "mqtts://",
            MqttScheme::Ws => "ws://",
            MqttScheme::Wss => "wss://",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            MqttScheme::Mqtt => 1883,
            MqttScheme::Mqtts => 8883,
            MqttScheme::Ws => 80,
            MqttScheme::Wss => 443,
        }
    }
}

/// Where the MQTT uplink connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub scheme: MqttScheme,
    pub host: String,
    pub port: u16,
    /// The WebSocket path (`/mqtt` unless the url names one); empty for TCP schemes.
    pub path: String,
}

impl MqttEndpoint {
    pub fn parse(url: &str) -> Result<MqttEndpoint, String> {
        let schemes = [
            MqttScheme::Mqtt,
            MqttScheme::Mqtts,
            MqttScheme::Ws,
            MqttScheme::Wss,
        ];
        let Some((scheme, rest)) = schemes
            .into_iter()
            .find_map(|s| url.strip_prefix(s.prefix()).map(|rest| (s, rest)))
        else {
            return Err(format!(
                "{url:?} must start with mqtt://, mqtts://, ws:// or wss://"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = if scheme.websocket() {
            if path.is_empty() || path == "/" {
                "/mqtt".to_string()
            } else {
                path.to_string()
            }
        } else {
            if !path.trim_end_matches('/').is_empty() {
                return Err(format!(
                    "{url:?}: a path ({path:?}) only makes sense for ws:// and wss://"
                ));
            }
            String::new()
        };
        // IPv6 literals are bracketed: [::1] or [::1]:1884.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("{url:?}: unclosed '[' in the host"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => scheme.default_port(),
            Some(port) => {
                let port: u64 = port
                    .parse()
                    .map_err(|_| format!("{url:?}: port {port:?} is not a number"))?;
                if port == 0 || port > 65535 {
                    return Err(format!("{url:?}: port {port} is out of range 1-65535"));
                }
                port as u16
            }
        };
        if host.is_empty() || host.contains(['/', '?', '#', '@', '[', ']']) {
            return Err(format!("{url:?}: {host:?} is not a host name"));
        }
        Ok(MqttEndpoint {
            scheme,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// `host:port`, with IPv6 literals bracketed.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The url as rumqttc's WebSocket transport wants it (scheme, authority and path).
    pub fn websocket_url(&self) -> String {
        format!("{}{}{}", self.scheme.prefix(), self.authority(), self.path)
    }
}

impl std::fmt::Display for MqttEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}{}",
            self.scheme.prefix(),
            self.authority(),
            self.path
        )
    }
}

fn parse_toml(text: &str) -> Result<Config, Problem> {
    deserialize_toml(text)
}

/// Reads any TOML document strictly; the error names the key (`key.path`) and the line. Shared
/// by the config and the files it points to (receipt templates).
pub(crate) fn deserialize_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Problem> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| syntax_problem(text, &e))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        key_problem(text, &path, &inner)
    })
}

fn syntax_problem(text: &str, error: &toml::de::Error) -> Problem {
    let line = error
        .span()
        .map(|s| format!("line {}: ", line_of(text, s.start)))
        .unwrap_or_default();
    Problem {
        key: String::new(),
        message: format!("{line}{}", error.message().trim()),
    }
}

/// Turns serde's messages into the key-first shape. serde reports an unknown or missing field
/// against the table that holds it, so the field name moves into the path.
fn key_problem(text: &str, path: &str, error: &toml::de::Error) -> Problem {
    let message = error.message().trim();
    // serde_path_to_error already ends the path with an unknown field, but not a missing one.
    let join = |field: &str| {
        if path.is_empty() || path == "." {
            field.to_string()
        } else if path == field || path.ends_with(&format!(".{field}")) {
            path.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    let line = error
        .span()
        .map(|s| format!(" (line {})", line_of(text, s.start)))
        .unwrap_or_default();
    if let Some(field) = backticked_after(message, "unknown field ") {
        let expected = message
            .split_once(", expected ")
            .map(|(_, e)| format!(" (expected {})", e.replace('`', "")))
            .unwrap_or_default();
        return Problem {
            key: join(field),
            message: format!("unknown key{expected}{line}"),
        };
    }
    if let Some(field) = backticked_after(message, "missing field ") {
        return Problem {
            key: join(field),
            message: "missing required key".into(),
        };
    }
    let key = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    Problem {
        key,
        message: format!("{message}{line}"),
    }
}

fn backticked_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split_once('`').map(|(field, _)| field)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[store]
id = "s042"
tenant = "acme"

[central.mqtt]
url = "mqtt://127.0.0.1:1883"
"#;

    fn env() -> HashMap<String, String> {
        HashMap::new()
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text, "t.toml", &env()) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.problems().to_vec(),
        }
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn the_storage_memory_budget_is_split_between_the_engines() {
        let options = |extra: &str| {
            let text = format!("{MINIMAL}\n[storage]\n{extra}");
            Config::parse(&text, "t.toml", &env())
                .unwrap()
                .storage
                .store_options()
        };
        let o = options("");
        assert_eq!((o.cache_bytes, o.log_cache_bytes), (4 << 20, 4 << 20));
        let o = options("memory_budget_bytes = 33554432\n");
        assert_eq!((o.cache_bytes, o.log_cache_bytes), (16 << 20, 16 << 20));
        // A config from before the budget keeps its cache and gets the log's default on top.
        let o = options("cache_bytes = 16777216\n");
        assert_eq!((o.cache_bytes, o.log_cache_bytes), (16 << 20, 4 << 20));
        let o = options("memory_budget_bytes = 8388608\ncache_bytes = 6291456\n");
        assert_eq!((o.cache_bytes, o.log_cache_bytes), (6 << 20, 2 << 20));
        let p = problems(&format!(
            "{MINIMAL}\n[storage]\nmemory_budget_bytes = 4194304\ncache_bytes = 4194304\n"
        ));
        assert_eq!(keys(&p), ["storage.cache_bytes"]);
        assert!(p[0].message.contains("less than 1 MiB"), "{:?}", p[0]);
        let p = problems(&format!(
            "{MINIMAL}\n[storage]\nmemory_budget_bytes = 1000\n"
        ));
        assert_eq!(keys(&p), ["storage.memory_budget_bytes"]);
    }

    #[test]
    fn presence_defaults_and_a_valid_zone() {
        let text = format!(
            "{MINIMAL}\n[presence]\nsource = \"btleplug\"\nservice_uuid = \"FEAA\"\n\
             [[presence.zones]]\nname = \"lane-3\"\nlane = \"3\"\nscanners = [\"local\"]\nenter_m = 1.5\nexit_m = 2.5\n"
        );
        let c = Config::parse(&text, "t.toml", &env()).unwrap();
        assert_eq!(c.presence.rotation_s, 900);
        assert_eq!(c.presence.retention_days, 30);
        assert_eq!(
            c.presence.service.unwrap().to_string(),
            "0000feaa-0000-1000-8000-00805f9b34fb"
        );
        assert_eq!(c.presence.zones[0].lane.as_deref(), Some("3"));
    }

    #[test]
    fn profiles_settings_have_defaults_and_named_problems() {
        let c = Config::parse(MINIMAL, "t.toml", &env()).unwrap();
        assert_eq!(c.profiles.kpi.new_days, 90);
        assert_eq!(c.profiles.kpi.passive_after_days, 180);
        assert_eq!(c.profiles.sync_page_size, 1000);
        let c = Config::parse(
            &format!("{MINIMAL}\n[profiles.kpi]\nnew_days = 60\n"),
            "t.toml",
            &env(),
        )
        .unwrap();
        assert_eq!(c.profiles.kpi.new_days, 60);

        let p = problems(&format!(
            "{MINIMAL}\n[profiles]\nsync_interval_s = 1\n[profiles.kpi]\noverdue_factor = 0.5\n"
        ));
        assert_eq!(
            keys(&p),
            ["profiles.sync_interval_s", "profiles.kpi.overdue_factor"]
        );
        let p = problems(&format!("{MINIMAL}\n[profiles.kpi]\nnew_dayz = 3\n"));
        assert_eq!(keys(&p), ["profiles.kpi.new_dayz"]);
        assert!(p[0].message.contains("expected one of new_days"), "{p:?}");

        let p = problems(&format!(
            "{MINIMAL}\n[central.https]\nbase_url = \"https://c.example\"\nca_file = \"/nonexistent/ca.pem\"\n"
        ));
        assert_eq!(keys(&p), ["central.https.ca_file"]);
    }

    #[test]
    fn presence_problems_name_their_keys() {
        let p = problems(&format!("{MINIMAL}\n[presence]\nsource = \"btleplug\"\n"));
        assert_eq!(keys(&p), ["presence.service_uuid"]);

        let p = problems(&format!(
            "{MINIMAL}\n[presence]\nsource = \"replay\"\nservice_uuid = \"nope\"\nrotation_s = 5\n"
        ));
        assert_eq!(
            keys(&p),
            [
                "presence.service_uuid",
                "presence.rotation_s",
                "presence.replay"
            ]
        );

        let p = problems(&format!(
            "{MINIMAL}\n[presence]\nsource = \"none\"\n[presence.replay]\nfile = \"x.jsonl\"\n"
        ));
        assert_eq!(keys(&p), ["presence.replay"]);

        let p = problems(&format!(
            "{MINIMAL}\n[presence]\nsource = \"replay\"\nservice_uuid = \"FEAA\"\n\
             [presence.replay]\nfile = \"/nonexistent/walk.jsonl\"\nspeed = -1.0\n"
        ));
        assert_eq!(keys(&p), ["presence.replay.file", "presence.replay.speed"]);

        let zone = "[[presence.zones]]\nname = \"a\"\nscanners = [\"s\"]\nenter_m = 2.0\nexit_m = 1.0\n\
                    [[presence.zones]]\nname = \"a\"\nscanners = []\nenter_m = 1.0\nexit_m = 2.0\n\
                    [[presence.calibration]]\nscanner = \"s\"\nref_rssi_1m = 10\npath_loss_exponent = 9\n";
        let p = problems(&format!("{MINIMAL}\n{zone}"));
        assert_eq!(
            keys(&p),
            [
                "presence.calibration[0].ref_rssi_1m",
                "presence.calibration[0].path_loss_exponent",
                "presence.zones[0].exit_m",
                "presence.zones[1].name",
                "presence.zones[1].scanners",
            ]
        );

        let p = problems(&format!(
            "{MINIMAL}\n[[presence.zones]]\nname = \"a\"\nscanners = [\"s\"]\nenter_m = 1.0\nexit_m = 2.0\nradius = 3\n"
        ));
        assert_eq!(keys(&p), ["presence.zones[0].radius"]);
        assert!(p[0].message.starts_with("unknown key"), "{p:?}");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL, "t.toml", &env()).unwrap();
        assert_eq!(c.store.timezone, "UTC");
        assert_eq!(c.store.currency, "EUR");
        assert_eq!(c.storage.path, PathBuf::from("/var/lib/storelink"));
        assert_eq!(c.storage.max_outbox_bytes, 2_147_483_648);
        assert_eq!(c.cashier.bind, "127.0.0.1:8080");
        assert_eq!(c.topic_prefix(), "storelink/v1/acme");
        assert_eq!(c.mqtt_client_id(), "storelink-acme-s042");
    }

    #[test]
    fn unknown_key_is_named_with_its_table() {
        let p = problems(&MINIMAL.replace("tenant = \"acme\"", "tenant = \"acme\"\ncolour = 3"));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "store.colour");
        assert!(p[0].message.starts_with("unknown key"), "{p:?}");
    }

    #[test]
    fn unknown_key_inside_transport_is_named() {
        let text = format!(
            "{MINIMAL}\n[[registers]]\nname = \"lane-3\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-listen\", bnd = \"0.0.0.0:5020\" }}\n"
        );
        let p = problems(&text);
        assert_eq!(p[0].key, "registers[0].transport.bnd", "{p:?}");
    }

    #[test]
    fn missing_key_and_wrong_type_are_named() {
        let p = problems(&MINIMAL.replace("id = \"s042\"\n", ""));
        assert_eq!(p[0].key, "store.id");
        assert_eq!(p[0].message, "missing required key");

        let p = problems(&MINIMAL.replace("id = \"s042\"", "id = 42"));
        assert_eq!(p[0].key, "store.id");
        assert!(p[0].message.contains("invalid type"), "{p:?}");
    }

    #[test]
    fn port_out_of_range_is_an_invalid_value() {
        let p = problems(&format!("{MINIMAL}\n[cashier]\nbind = \"0.0.0.0:70000\"\n"));
        assert_eq!(p[0].key, "cashier.bind");
        assert!(p[0].message.contains("70000 is out of range"), "{p:?}");
        let p = problems(&MINIMAL.replace("1883", "70000"));
        assert_eq!(p[0].key, "central.mqtt.url");
    }

    #[test]
    fn every_validation_problem_is_reported_at_once() {
        let text = MINIMAL.replace(
            "tenant = \"acme\"",
            "tenant = \"a/b\"\ntimezone = \"Mars/Olympus\"\ncurrency = \"euro\"",
        );
        let keys: Vec<_> = problems(&text).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["store.tenant", "store.timezone", "store.currency"]);
    }

    #[test]
    fn duplicate_registers_and_overlapping_binds_are_refused() {
        let reg = |bind: &str| {
            format!(
                "[[registers]]\nname = \"lane-1\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-listen\", bind = \"{bind}\" }}\n"
            )
        };
        let text = format!("{MINIMAL}{}{}", reg("0.0.0.0:5020"), reg("127.0.0.1:5020"));
        let p = problems(&text);
        assert_eq!(p[0].key, "registers[1].name");
        assert_eq!(p[1].key, "registers[1].transport.bind");
    }

    #[test]
    fn relative_template_paths_resolve_next_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("receipts")).unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/receipts/supermarket.toml"
            ),
            dir.path().join("receipts/s.toml"),
        )
        .unwrap();
        let text = format!(
            "{MINIMAL}\n[[registers]]\nname = \"r\"\nformat = \"receipt\"\ntemplate = \"receipts/s.toml\"\ntransport = {{ kind = \"http\" }}\n"
        );
        let file = dir.path().join("storelink.toml");
        std::fs::write(&file, &text).unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(
            c.registers[0].template.as_deref(),
            Some(dir.path().join("receipts/s.toml").as_path())
        );
        // The same text, read from elsewhere, does not find the template, and says which key.
        let p = problems(&text);
        assert_eq!(p[0].key, "registers[0].template");
    }

    #[test]
    fn receipt_trailers_must_be_ascii() {
        let text = format!(
            "{MINIMAL}\n[[registers]]\nname = \"r\"\nformat = \"jsonl\"\nframing = {{ kind = \"cut\", trailer = \"Tschüß\" }}\ntransport = {{ kind = \"http\" }}\n"
        );
        assert_eq!(problems(&text)[0].key, "registers[0].framing.trailer");
    }

    #[test]
    fn secrets_come_from_the_environment_and_are_redacted() {
        let text = MINIMAL.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtt://127.0.0.1:1883\"\nusername = \"s042\"\npassword_env = \"MQTT_PW\"",
        );
        let p = problems(&text);
        assert_eq!(p[0].key, "central.mqtt.password_env");
        assert!(p[0].message.contains("MQTT_PW is not set"));

        let env: HashMap<String, String> = [("MQTT_PW".to_string(), "hunter2".to_string())].into();
        let c = Config::parse(&text, "t.toml", &env).unwrap();
        let mqtt = c.central.mqtt.unwrap();
        assert_eq!(mqtt.password.as_ref().unwrap().expose(), "hunter2");
        assert!(!format!("{mqtt:?}").contains("hunter2"));
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let p = problems("[store\nid = 1");
        assert!(p[0].key.is_empty());
        assert!(p[0].message.starts_with("line 1:"), "{p:?}");
    }

    #[test]
    fn rendered_error_has_file_key_message_shape() {
        let err = Config::parse(
            &MINIMAL.replace("id = \"s042\"", "id = 42"),
            "/etc/x.toml",
            &env(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/etc/x.toml: store.id: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn mqtt_urls() {
        assert_eq!(
            MqttEndpoint::parse("mqtt://broker.local").unwrap(),
            MqttEndpoint {
                scheme: MqttScheme::Mqtt,
                host: "broker.local".into(),
                port: 1883,
                path: String::new(),
            }
        );
        let tls = MqttEndpoint::parse("mqtts://broker.local").unwrap();
        assert_eq!((tls.scheme, tls.port), (MqttScheme::Mqtts, 8883));
        let ws = MqttEndpoint::parse("wss://central.example").unwrap();
        assert_eq!((ws.port, ws.path.as_str()), (443, "/mqtt"));
        assert_eq!(ws.websocket_url(), "wss://central.example:443/mqtt");
        let ws = MqttEndpoint::parse("ws://[::1]:8080/x/mqtt").unwrap();
        assert_eq!(ws.websocket_url(), "ws://[::1]:8080/x/mqtt");
        assert!(MqttEndpoint::parse("mqtts://host:8883/path").is_err());
        assert_eq!(
            MqttEndpoint::parse("mqtt://[::1]:1884").unwrap().host,
            "::1"
        );
        assert!(MqttEndpoint::parse("http://x").is_err());
        assert!(MqttEndpoint::parse("mqtt://:1883").is_err());
    }

    proptest::proptest! {
        #[test]
        fn endpoint_urls_never_panic_and_valid_ones_round_trip(url in "(mqtts?|wss?|http)://[a-z0-9.:\\[\\]/@]{0,30}") {
            if let Ok(e) = MqttEndpoint::parse(&url) {
                let again = MqttEndpoint::parse(&e.to_string()).unwrap();
                proptest::prop_assert_eq!(again, e);
            }
        }

        #[test]
        fn proxy_urls_never_panic(url in "\\PC{0,40}") {
            if let Ok(p) = ProxyUrl::parse(&url) {
                proptest::prop_assert!(!p.host.is_empty());
            }
        }
    }

    #[test]
    fn proxies_come_from_config_or_environment_and_no_proxy_exempts() {
        let with = |url: &str, env: &[(&str, &str)]| {
            let text = MINIMAL.replace(
                "url = \"mqtt://127.0.0.1:1883\"",
                &format!("url = \"{url}\""),
            );
            let env: std::collections::HashMap<String, String> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::parse(&text, "t.toml", &env)
        };
        let proxy = |c: Config| c.central.mqtt.unwrap().resolved_proxy;
        let env = [("HTTPS_PROXY", "http://user:pw@proxy.lan:3128")];
        let p = proxy(with("wss://central.example/mqtt", &env).unwrap()).unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.lan", 3128));
        assert_eq!(p.username.as_deref(), Some("user"));
        assert!(
            !format!("{p:?}").contains("pw"),
            "the password stays out of logs"
        );
        assert_eq!(proxy(with("mqtts://central.example", &env).unwrap()), None);
        let exempt = [env[0], ("NO_PROXY", ".example")];
        assert_eq!(proxy(with("wss://central.example", &exempt).unwrap()), None);
        let bad = with("wss://central.example", &[("HTTPS_PROXY", "socks5://x:1")]).unwrap_err();
        assert!(bad.to_string().contains("central.mqtt.proxy"), "{bad}");
        let e = with(
            "mqtt://central.example\"\nca_file = \"/nonexistent.pem",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("central.mqtt.ca_file"), "{e}");
    }
}
