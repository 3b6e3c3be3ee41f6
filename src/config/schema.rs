//! The TOML schema: one struct per table, with the defaults a bare config gets.

use super::*;

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

pub(super) fn default_presence_ttl_s() -> Option<u64> {
    Some(86_400)
}
pub(super) fn default_status_ttl_s() -> Option<u64> {
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
    /// A register with every default, for tools that parse a capture without a config file.
    pub fn new(name: &str, format: RegisterFormat, template: Option<PathBuf>) -> RegisterConfig {
        RegisterConfig {
            name: name.into(),
            lane: None,
            format,
            transport: Transport::Http,
            framing: None,
            template,
            max_frame_bytes: default_max_frame_bytes(),
            replies: None,
        }
    }

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
    pub replay: Option<ReplaySettings>,
    #[serde(default)]
    pub scanners: Option<ScannerSettings>,
    #[serde(default)]
    pub btleplug: Option<BtleSettings>,
    #[serde(default)]
    pub calibration: Vec<ScannerCalibration>,
    #[serde(default)]
    pub zones: Vec<ZoneSpec>,
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

pub(super) fn default_rotation_s() -> u32 {
    900
}

pub(super) fn default_retention_days() -> u32 {
    30
}

pub(super) fn default_store_away_s() -> u32 {
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

pub(super) fn default_path_loss_exponent() -> f32 {
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

pub(super) fn yes() -> bool {
    true
}
pub(super) fn default_campaign_poll_s() -> u64 {
    300
}
pub(super) fn default_prompt_ttl_s() -> u64 {
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
    pub kpi: KpiConfig,
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

pub(super) fn default_cache_entries() -> usize {
    DEFAULT_CACHE_ENTRIES
}
pub(super) fn default_sync_interval_s() -> u64 {
    300
}
pub(super) fn default_sync_page_size() -> u32 {
    1000
}
pub(super) fn default_rfm_interval_s() -> u64 {
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
    ("activity_new", "Neukunde", "New customer"),
    ("activity_loyal", "Stammkunde", "Loyal customer"),
    ("activity_passive", "Lange nicht da", "Not seen for a while"),
    (
        "last_visit",
        "Letzter Einkauf vor {days} Tagen",
        "Last purchase {days} days ago",
    ),
    (
        "last_category",
        "Zuletzt: {category}",
        "Last bought: {category}",
    ),
    (
        "suggestion",
        "Kaufte vor {days} Tagen {if_bought}: nach {suggest} fragen",
        "Bought {if_bought} {days} days ago: ask about {suggest}",
    ),
    (
        "suggestion_central",
        "Passt zu {if_bought}: nach {suggest} fragen",
        "Goes with {if_bought}: ask about {suggest}",
    ),
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

pub(super) fn default_timezone() -> String {
    "UTC".into()
}
pub(super) fn default_currency() -> String {
    "EUR".into()
}
pub(super) fn default_storage_path() -> PathBuf {
    PathBuf::from("/var/lib/storelink")
}
pub(super) fn default_max_outbox_bytes() -> u64 {
    2 * 1024 * 1024 * 1024
}
pub(super) fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}
/// The storage engines' memory, split in half by default: sled counts its cache in on-disk
/// bytes and holds several times that in memory (at 16 MiB the agent's RSS grew by 30 % over a
/// 30-minute soak; at 4 MiB it stops growing early, BENCHMARKS.md), and redb's cache holds the
/// outbox's hot pages, which a drained outbox keeps small.
pub(super) const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 8 * 1024 * 1024;
/// The log's share when only the profile cache's is configured.
pub(super) const DEFAULT_LOG_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// Least either engine is given.
pub(super) const MIN_CACHE_BYTES: u64 = 1024 * 1024;
pub(super) fn default_max_deadletter_bytes() -> u64 {
    64 * 1024 * 1024
}
pub(super) fn default_seen_retention_days() -> u64 {
    35
}
pub(super) fn default_max_seen_ids() -> u64 {
    1_000_000
}
pub(super) fn default_max_frame_bytes() -> usize {
    1024 * 1024
}
pub(super) fn default_baud() -> u32 {
    9600
}
pub(super) fn default_data_bits() -> u8 {
    8
}
pub(super) fn default_stop_bits() -> u8 {
    1
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_live_after_s() -> u64 {
    30
}
pub(super) fn default_backfill_after_s() -> u64 {
    600
}
pub(super) fn default_mqtt_down_after_s() -> u64 {
    300
}
pub(super) fn default_batch_events() -> usize {
    500
}
pub(super) fn default_batch_bytes() -> usize {
    1 << 20
}
pub(super) fn default_keep_alive_s() -> u64 {
    30
}
pub(super) fn default_inflight() -> u16 {
    100
}
pub(super) fn default_cashier_bind() -> String {
    // Loopback unless the config says otherwise: anything wider needs an admin token.
    "127.0.0.1:8080".into()
}
pub(super) fn default_language() -> String {
    "de".into()
}
