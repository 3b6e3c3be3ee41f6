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
    pub url: String,
    pub password_env: Option<String>,
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
        problems
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
}
