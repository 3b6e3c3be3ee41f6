//! `bridge.toml`: where the bridge subscribes and where it writes.
//!
//! Invariants: parsed strictly (an unknown key is an error); every problem names the file and
//! the key, and all of them are reported at once; secrets come from `*_env` variables, never
//! from the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, Env, MqttEndpoint, MqttScheme, Problem, ProcessEnv, Secret};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    pub broker: BrokerSection,
    pub postgres: PostgresSection,
    /// Email tools that receive the stores' lifecycle triggers (`[[email]]`, any number).
    #[serde(default)]
    pub email: Vec<EmailSection>,
    /// Health, readiness, metrics and status over HTTP.
    #[serde(default)]
    pub http: HttpSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// `/healthz`, `/readyz`, `/metrics` and `/status` (what `storelink bridge status` reads).
    /// Loopback by default: the status names no customer, but it is for the operator.
    #[serde(default = "default_http_bind")]
    pub bind: String,
    #[serde(skip)]
    pub addr: Option<std::net::SocketAddr>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            bind: default_http_bind(),
            addr: None,
        }
    }
}

fn default_http_bind() -> String {
    "127.0.0.1:9400".into()
}

/// The email tools the bridge can feed, each by its own event API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailKind {
    /// Maileon's transactions API; the contact by external id.
    Maileon,
    /// HubSpot's custom behavioral events (`POST /events/v3/send`); the contact by record id.
    Hubspot,
    /// Klaviyo's Events API (`POST /api/events`); the profile by `external_id`.
    Klaviyo,
    /// Any HTTPS endpoint: a templated JSON body, signed with HMAC-SHA256.
    Webhook,
}

impl EmailKind {
    fn default_url(self) -> Option<&'static str> {
        match self {
            EmailKind::Maileon => Some("https://api.maileon.com"),
            EmailKind::Hubspot => Some("https://api.hubapi.com"),
            EmailKind::Klaviyo => Some("https://a.klaviyo.com"),
            EmailKind::Webhook => None,
        }
    }

    /// The tools' documented limits, or below them: Klaviyo's create-event steady rate is
    /// 3,500 a minute, HubSpot's private apps 100 requests per 10 s; Maileon's is not
    /// published per endpoint, so it is kept modest.
    fn default_rate(self) -> f64 {
        match self {
            EmailKind::Maileon => 5.0,
            EmailKind::Hubspot => 9.0,
            EmailKind::Klaviyo => 50.0,
            EmailKind::Webhook => 10.0,
        }
    }
}

/// Every trigger the stores send (`storelink.trigger.v1`).
pub const TRIGGERS: [&str; 6] = [
    "winback_due",
    "next_purchase_due",
    "became_passive",
    "birthday",
    "first_purchase",
    "points_expiring",
];

/// One email tool (`[[email]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSection {
    /// Unique among the sinks; the `tool` of `storelink.email_contacts` rows.
    pub name: String,
    pub kind: EmailKind,
    /// The API's base URL (each tool's public one by default); the webhook's whole URL.
    pub url: Option<String>,
    /// The API key or private-app token (Maileon, HubSpot, Klaviyo), or a bearer token for
    /// the webhook (optional there).
    pub token_env: Option<String>,
    /// The webhook's HMAC-SHA256 key.
    pub secret_env: Option<String>,
    /// The triggers this tool gets. Empty: every trigger with a name in `events` (HubSpot,
    /// Maileon, which need one), or every trigger (Klaviyo, webhook).
    #[serde(default)]
    pub triggers: Vec<String>,
    /// Per trigger, the tool's name for it: HubSpot's fully qualified event name
    /// (`pe{HubID}_…`), Maileon's transaction type id, Klaviyo's metric name (default
    /// `storelink {trigger}`).
    #[serde(default)]
    pub events: std::collections::BTreeMap<String, String>,
    /// Klaviyo's API revision header.
    #[serde(default = "default_klaviyo_revision")]
    pub revision: String,
    /// The webhook's body: JSON in which `"{{name}}"` stands for a value (see the example
    /// config); the default names the customer, trigger, occasion and properties.
    pub template: Option<String>,
    /// Requests per second (a token bucket; the tool's own 429 and Retry-After also hold).
    pub rate_per_s: Option<f64>,
    /// Requests that may go at once after a quiet spell.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Attempts before a trigger the tool keeps failing is given up (`failed`).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// How long a trigger waits for central to map its customer to this tool before it is
    /// given up (`no_contact`), in seconds.
    #[serde(default = "default_contact_wait")]
    pub contact_wait_s: u64,
    /// Per request, in seconds.
    #[serde(default = "default_email_timeout")]
    pub timeout_s: u64,
    /// A private CA for the tool's certificate (a test server, a proxy of central's).
    pub ca_file: Option<PathBuf>,
    #[serde(skip)]
    pub token: Option<Secret>,
    #[serde(skip)]
    pub secret: Option<Secret>,
}

impl EmailSection {
    /// The base URL, or the webhook's URL.
    pub fn url(&self) -> &str {
        self.url
            .as_deref()
            .or(self.kind.default_url())
            .unwrap_or_default()
    }

    pub fn rate(&self) -> f64 {
        self.rate_per_s.unwrap_or(self.kind.default_rate())
    }

    /// The triggers this sink takes (see `triggers`).
    pub fn takes(&self) -> Vec<&str> {
        if !self.triggers.is_empty() {
            return self.triggers.iter().map(String::as_str).collect();
        }
        match self.kind {
            EmailKind::Hubspot | EmailKind::Maileon => TRIGGERS
                .into_iter()
                .filter(|t| self.events.contains_key(*t))
                .collect(),
            EmailKind::Klaviyo | EmailKind::Webhook => TRIGGERS.to_vec(),
        }
    }

    fn validate(&mut self, i: usize, env: &dyn Env, problems: &mut Vec<Problem>) {
        let key = |k: &str| format!("email[{i}].{k}");
        if self.name.is_empty() || self.name.len() > 64 {
            problems.push(Problem::at(key("name"), "must be 1-64 characters"));
        }
        match self.url() {
            "" => problems.push(Problem::at(key("url"), "a webhook needs its https:// URL")),
            u if !u.starts_with("https://") => {
                problems.push(Problem::at(key("url"), "must be an https:// URL"))
            }
            u if reqwest::Url::parse(u).is_err() => {
                problems.push(Problem::at(key("url"), "is not a URL"))
            }
            _ => {}
        }
        for t in &self.triggers {
            if !TRIGGERS.contains(&t.as_str()) {
                problems.push(Problem::at(
                    key("triggers"),
                    format!("unknown trigger {t:?}; one of {}", TRIGGERS.join(", ")),
                ));
            }
        }
        for t in self.events.keys() {
            if !TRIGGERS.contains(&t.as_str()) {
                problems.push(Problem::at(
                    key("events"),
                    format!("unknown trigger {t:?}; one of {}", TRIGGERS.join(", ")),
                ));
            }
        }
        if matches!(self.kind, EmailKind::Hubspot | EmailKind::Maileon) {
            let what = if self.kind == EmailKind::Hubspot {
                "HubSpot's event name"
            } else {
                "Maileon's transaction type id"
            };
            if self.takes().is_empty() {
                problems.push(Problem::at(
                    key("events"),
                    format!("name at least one trigger's {what}"),
                ));
            }
            for t in self.takes() {
                if !self.events.contains_key(t) {
                    problems.push(Problem::at(
                        key("events"),
                        format!("{t} is in triggers but has no {what}"),
                    ));
                }
            }
        }
        if self.kind == EmailKind::Maileon {
            for (t, id) in &self.events {
                if id.parse::<u64>().is_err() {
                    problems.push(Problem::at(
                        key("events"),
                        format!("{t}: Maileon's transaction type is a number, not {id:?}"),
                    ));
                }
            }
        }
        self.token = secret(env, &key("token_env"), &self.token_env, problems);
        self.secret = secret(env, &key("secret_env"), &self.secret_env, problems);
        match self.kind {
            EmailKind::Webhook => {
                if self.secret_env.is_none() {
                    problems.push(Problem::at(
                        key("secret_env"),
                        "a webhook signs its requests: name the variable holding the key",
                    ));
                }
                if let Err(e) = super::template::Template::parse(self.template.as_deref()) {
                    problems.push(Problem::at(key("template"), e));
                }
            }
            _ => {
                if self.token_env.is_none() {
                    problems.push(Problem::at(
                        key("token_env"),
                        "name the variable holding the tool's API key",
                    ));
                }
                if self.template.is_some() {
                    problems.push(Problem::at(
                        key("template"),
                        "only a webhook has a template",
                    ));
                }
            }
        }
        let rate = self.rate();
        if !(rate.is_finite() && rate > 0.0 && rate <= 10_000.0) {
            problems.push(Problem::at(
                key("rate_per_s"),
                "must be above 0, at most 10000",
            ));
        }
        if self.burst == 0 {
            problems.push(Problem::at(key("burst"), "must be at least 1"));
        }
        if self.max_attempts == 0 {
            problems.push(Problem::at(key("max_attempts"), "must be at least 1"));
        }
        if !(1..=300).contains(&self.timeout_s) {
            problems.push(Problem::at(key("timeout_s"), "must be 1-300"));
        }
    }
}

fn default_klaviyo_revision() -> String {
    "2024-10-15".into()
}
fn default_burst() -> u32 {
    5
}
fn default_max_attempts() -> u32 {
    12
}
fn default_contact_wait() -> u64 {
    86_400
}
fn default_email_timeout() -> u64 {
    15
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// `mqtt://host:port` or `mqtts://host:port` (MQTT 5).
    pub url: String,
    /// Stable per instance: the broker keeps this client's session (and what arrives for it
    /// while it is down) under this id.
    pub client_id: String,
    /// The shared-subscription group: instances in one group share the feed.
    #[serde(default = "default_group")]
    pub group: String,
    /// Subscribe through the group (`$share/…`). Off: one instance alone, on a plain
    /// subscription, for a broker that forgets shared subscriptions when it restarts
    /// (mosquitto 2.0 keeps the session and its queue, not the shared subscription, so what
    /// arrives between its restart and the bridge's reconnect is dropped).
    #[serde(default = "default_true")]
    pub shared: bool,
    /// What the stores publish under: `{topic_prefix}/{tenant}/{store}/events/{type}`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// How long the broker keeps the session while the bridge is away, in seconds.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_s: u32,
    /// Most messages in flight (unacknowledged) at once: what the broker may send ahead.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub ca_file: Option<PathBuf>,
    #[serde(skip)]
    pub password: Option<Secret>,
    #[serde(skip)]
    pub endpoint: Option<MqttEndpoint>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// A libpq connection string (`host=… user=… dbname=…`) or URL, without a password.
    /// `sslmode=require` insists on TLS, `prefer` (the default) uses it when the server
    /// offers it, `disable` never; with TLS the server's certificate is always verified.
    pub url: String,
    pub password_env: Option<String>,
    /// The CA that signed the server's certificate (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Most events in one write (one transaction).
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Longest an event waits for its batch to fill, in milliseconds.
    #[serde(default = "default_batch_ms")]
    pub batch_ms: u64,
    /// Batches written at once, each on its own connection (acknowledged in arrival order
    /// all the same). PostgreSQL runs one core per connection.
    #[serde(default = "default_writers")]
    pub writers: usize,
    #[serde(skip)]
    pub password: Option<Secret>,
}

fn default_writers() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_group() -> String {
    "storelink-bridge".into()
}
fn default_prefix() -> String {
    "storelink/v1".into()
}
fn default_session_expiry() -> u32 {
    7 * 86_400
}
fn default_inflight() -> u16 {
    1_000
}
fn default_batch_max() -> usize {
    1_000
}
fn default_batch_ms() -> u64 {
    20
}

impl BridgeConfig {
    pub fn load(path: &Path) -> Result<BridgeConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        BridgeConfig::parse(&text, &file, &ProcessEnv)
    }

    pub fn parse(text: &str, file: &str, env: &dyn Env) -> Result<BridgeConfig, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            file: file.to_string(),
            problems,
        };
        let mut config: BridgeConfig =
            crate::config::deserialize_toml(text).map_err(|p| invalid(vec![p]))?;
        let problems = config.validate(env);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid(problems))
        }
    }

    fn validate(&mut self, env: &dyn Env) -> Vec<Problem> {
        let mut problems = Vec::new();
        let b = &mut self.broker;
        match MqttEndpoint::parse(&b.url) {
            Ok(e) if matches!(e.scheme, MqttScheme::Mqtt | MqttScheme::Mqtts) => {
                b.endpoint = Some(e)
            }
            Ok(_) => problems.push(Problem::at(
                "broker.url",
                "the bridge connects over mqtt:// or mqtts://",
            )),
            Err(e) => problems.push(Problem::at("broker.url", e)),
        }
        let topic_safe = |s: &str| !s.is_empty() && !s.contains(['+', '#', '/']);
        if !topic_safe(&b.group) {
            problems.push(Problem::at(
                "broker.group",
                "must be non-empty, without '+', '#' or '/'",
            ));
        }
        if b.client_id.is_empty() || b.client_id.len() > 64 {
            problems.push(Problem::at("broker.client_id", "must be 1-64 characters"));
        }
        if b.topic_prefix.is_empty()
            || b.topic_prefix.contains(['+', '#'])
            || b.topic_prefix.ends_with('/')
        {
            problems.push(Problem::at(
                "broker.topic_prefix",
                "must be a topic without wildcards or a trailing '/'",
            ));
        }
        if b.inflight == 0 {
            problems.push(Problem::at("broker.inflight", "must be at least 1"));
        }
        b.password = secret(env, "broker.password_env", &b.password_env, &mut problems);
        if b.password.is_some() && b.username.is_none() {
            problems.push(Problem::at(
                "broker.username",
                "a password needs a username",
            ));
        }
        let p = &mut self.postgres;
        if p.url.trim().is_empty() {
            problems.push(Problem::at("postgres.url", "must not be empty"));
        } else {
            match p.url.parse::<tokio_postgres::Config>() {
                Ok(c) if c.get_password().is_some() => problems.push(Problem::at(
                    "postgres.url",
                    "holds a password: put it in the variable named by postgres.password_env",
                )),
                Ok(_) => {}
                Err(e) => problems.push(Problem::at("postgres.url", e.to_string())),
            }
        }
        p.password = secret(env, "postgres.password_env", &p.password_env, &mut problems);
        if !(1..=10_000).contains(&p.batch_max) {
            problems.push(Problem::at("postgres.batch_max", "must be 1-10000"));
        }
        if !(1..=64).contains(&p.writers) {
            problems.push(Problem::at("postgres.writers", "must be 1-64"));
        }
        if !(1..=10_000).contains(&p.batch_ms) {
            problems.push(Problem::at("postgres.batch_ms", "must be 1-10000"));
        }
        match self.http.bind.parse() {
            Ok(addr) => self.http.addr = Some(addr),
            Err(_) => problems.push(Problem::at(
                "http.bind",
                "must be an address and port, like 127.0.0.1:9400",
            )),
        }
        let mut names = std::collections::HashSet::new();
        for (i, e) in self.email.iter_mut().enumerate() {
            e.validate(i, env, &mut problems);
            if !names.insert(e.name.clone()) {
                problems.push(Problem::at(
                    format!("email[{i}].name"),
                    format!("{:?} names another sink too", e.name),
                ));
            }
        }
        problems
    }

    /// Which sink takes which trigger, for the batch's queue rows.
    pub fn routes(&self) -> super::postgres::Routes {
        let mut routes = super::postgres::Routes::default();
        for e in &self.email {
            for t in e.takes() {
                routes.add(&e.name, t);
            }
        }
        routes
    }

    /// The subscription: `$share/{group}/{prefix}/+/+/events/#`, or without the group when
    /// not `shared`.
    pub fn filter(&self) -> String {
        let b = &self.broker;
        let topics = format!("{}/+/+/events/#", b.topic_prefix);
        if b.shared {
            format!("$share/{}/{topics}", b.group)
        } else {
            topics
        }
    }
}

fn secret(
    env: &dyn Env,
    key: &str,
    name: &Option<String>,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    let name = name.as_ref()?;
    match env.var(name) {
        Some(v) if !v.is_empty() => Some(Secret::new(v)),
        _ => {
            problems.push(Problem::at(
                key,
                format!("environment variable {name} is not set"),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const GOOD: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"
client_id = "bridge-1"

[postgres]
url = "host=127.0.0.1 port=5432 user=bi dbname=bi"
"#;

    #[test]
    fn a_good_file_parses_with_its_defaults_and_every_problem_is_named() {
        let env: HashMap<String, String> = HashMap::new();
        let c = BridgeConfig::parse(GOOD, "bridge.toml", &env).unwrap();
        assert_eq!(
            c.filter(),
            "$share/storelink-bridge/storelink/v1/+/+/events/#"
        );
        assert_eq!(c.postgres.batch_max, 1_000);

        let bad = GOOD
            .replace("mqtt://127.0.0.1:1883", "ws://127.0.0.1")
            .replace("user=bi", "user=bi password=hunter2")
            .replace(
                "client_id = \"bridge-1\"",
                "client_id = \"bridge-1\"\ngroup = \"a/b\"\npassword_env = \"NOPE\"",
            );
        let err = BridgeConfig::parse(&bad, "bridge.toml", &env).unwrap_err();
        let text = err.to_string();
        for key in [
            "bridge.toml: broker.url",
            "bridge.toml: broker.group",
            "bridge.toml: broker.password_env: environment variable NOPE",
            "bridge.toml: postgres.url: holds a password",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        assert!(!text.contains("hunter2"), "{text}");
        let typo = GOOD.replace("[postgres]", "[postgres]\nbatch_maxx = 3");
        let err = BridgeConfig::parse(&typo, "bridge.toml", &env).unwrap_err();
        assert!(err.to_string().contains("batch_maxx"), "{err}");
    }

    #[test]
    fn email_sinks_are_checked_key_by_key_and_route_their_triggers() {
        let env: HashMap<String, String> = [("K", "k"), ("W", "w")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let good = format!(
            "{GOOD}
[[email]]
name = \"crm\"
kind = \"hubspot\"
token_env = \"K\"
events = {{ birthday = \"pe1_bday\", winback_due = \"pe1_wb\" }}

[[email]]
name = \"hook\"
kind = \"webhook\"
url = \"https://hooks.example/storelink\"
secret_env = \"W\"
triggers = [\"first_purchase\"]
"
        );
        let c = BridgeConfig::parse(&good, "bridge.toml", &env).unwrap();
        assert_eq!(c.email[0].url(), "https://api.hubapi.com");
        assert_eq!(c.email[0].takes(), vec!["winback_due", "birthday"]);
        assert_eq!(c.email[1].takes(), vec!["first_purchase"]);
        assert_eq!(
            format!("{:?}", c.routes()),
            format!("{:?}", {
                let mut r = crate::bridge::postgres::Routes::default();
                r.add("crm", "winback_due");
                r.add("crm", "birthday");
                r.add("hook", "first_purchase");
                r
            })
        );

        let bad = format!(
            "{GOOD}
[[email]]
name = \"crm\"
kind = \"maileon\"
url = \"http://api.maileon.example\"
token_env = \"NOPE\"
triggers = [\"winback_due\", \"anniversary\"]
events = {{ winback_due = \"welcome\" }}
rate_per_s = 0

[[email]]
name = \"crm\"
kind = \"webhook\"
template = '{{\"to\": \"{{{{email}}}}\"}}'
"
        );
        let err = BridgeConfig::parse(&bad, "bridge.toml", &env).unwrap_err();
        let text = err.to_string();
        for key in [
            "bridge.toml: email[0].url: must be an https:// URL",
            "bridge.toml: email[0].triggers: unknown trigger \"anniversary\"",
            "bridge.toml: email[0].events: winback_due: Maileon's transaction type is a number",
            "bridge.toml: email[0].token_env: environment variable NOPE",
            "bridge.toml: email[0].rate_per_s",
            "bridge.toml: email[1].url: a webhook needs its https:// URL",
            "bridge.toml: email[1].secret_env",
            "bridge.toml: email[1].template: unknown placeholder email",
            "bridge.toml: email[1].name: \"crm\" names another sink too",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
    }

    /// The commented `[[email]]` examples in config/bridge.toml, uncommented, are a valid
    /// config: what the example tells an operator to write, the code accepts.
    #[test]
    fn the_example_email_sinks_parse_as_written() {
        let example = include_str!("../../config/bridge.toml");
        let at = example
            .find("# [[email]]")
            .expect("the example shows email sinks");
        let mut text = example[..at].to_string();
        for line in example[at..].lines() {
            if let Some(rest) = line.strip_prefix("# ")
                && !rest.starts_with('#')
            {
                text.push_str(rest);
                text.push('\n');
            }
        }
        let env: HashMap<String, String> = [
            "STORELINK_KLAVIYO_KEY",
            "STORELINK_HUBSPOT_TOKEN",
            "STORELINK_MAILEON_KEY",
            "STORELINK_HOOK_KEY",
        ]
        .into_iter()
        .map(|k| (k.to_string(), "x".to_string()))
        .collect();
        let c = BridgeConfig::parse(&text, "bridge.toml", &env).unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<EmailKind> = c.email.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EmailKind::Klaviyo,
                EmailKind::Hubspot,
                EmailKind::Maileon,
                EmailKind::Webhook
            ]
        );
        assert_eq!(c.email[3].takes(), vec!["winback_due", "first_purchase"]);
    }
}
