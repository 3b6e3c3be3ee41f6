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

mod endpoint;
mod error;
mod kpi;
mod presence;
mod schema;
mod signals;
#[cfg(test)]
mod tests;
mod validate;

pub use endpoint::*;
pub use error::*;
pub use kpi::*;
pub use presence::*;
pub use schema::*;
pub use signals::*;

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
    #[serde(default)]
    pub signals: SignalsConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
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
        let mqtt = self.central.mqtt.as_mut().map(|s| s.tls_paths_mut());
        let https = self.central.https.as_mut().map(|s| s.tls_paths_mut());
        for f in mqtt.into_iter().chain(https).flatten().flatten() {
            resolve(f);
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
}
