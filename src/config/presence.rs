//! The presence tables (`[presence.replay]`, `[presence.scanners]`, `[presence.btleplug]`,
//! `[[presence.zones]]`) and the service UUID: their schema and their checks live here, so
//! that validating a config never reaches into the presence sources; the sources take these
//! settings as they are handed over.

use super::*;

/// `[presence.replay]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySettings {
    /// The JSON-lines file to play.
    pub file: PathBuf,
    /// Playback speed: 2.0 plays twice as fast as recorded; 0 plays as fast as the pipeline
    /// takes advertisements.
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// Shift timestamps so that the first line happens now by the agent's clock.
    #[serde(default = "default_true")]
    pub rebase_to_now: bool,
    /// Start again from the top at the end of the file (each pass rebased anew).
    #[serde(default, rename = "loop")]
    pub loop_: bool,
}

fn default_speed() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

impl ReplaySettings {
    /// Settings for `file` with every default.
    pub fn new(file: impl Into<PathBuf>) -> ReplaySettings {
        ReplaySettings {
            file: file.into(),
            speed: default_speed(),
            rebase_to_now: true,
            loop_: false,
        }
    }

    /// What the config check reports; the replay source refuses the same.
    pub fn validate(&self) -> Result<(), Problem> {
        if !(self.speed.is_finite() && self.speed >= 0.0) {
            return Err(Problem::at(
                "presence.replay.speed",
                format!(
                    "{} is not a speed: use 1.0 for real time, 0 for as fast as possible",
                    self.speed
                ),
            ));
        }
        Ok(())
    }
}

/// `[presence.scanners]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScannerSettings {
    /// The broker the scanners publish to, `mqtt://host:port`.
    #[serde(default = "default_url")]
    pub url: String,
    /// What to subscribe to. Reports are recognised by their topic ending in
    /// `devices/{id}/{room}`, so a bridged prefix (`store-42/espresense/devices/#`) works too.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Defaults to `storelink-scanners-` and a random suffix (the session is clean anyway).
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// Name of the environment variable holding the broker password.
    #[serde(default)]
    pub password_env: Option<String>,
}

fn default_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}

fn default_topic() -> String {
    "espresense/devices/#".into()
}

impl Default for ScannerSettings {
    fn default() -> Self {
        ScannerSettings {
            url: default_url(),
            topic: default_topic(),
            client_id: None,
            username: None,
            password_env: None,
        }
    }
}

impl ScannerSettings {
    /// What the config check reports; the scanner source refuses the same.
    pub fn validate(&self) -> Result<MqttEndpoint, Problem> {
        if self.topic.is_empty() {
            return Err(Problem::at("presence.scanners.topic", "must not be empty"));
        }
        let endpoint = MqttEndpoint::parse(&self.url)
            .map_err(|reason| Problem::at("presence.scanners.url", reason))?;
        if endpoint.scheme != MqttScheme::Mqtt {
            // Scanners sit on the store LAN next to their broker; TLS there buys nothing.
            return Err(Problem::at(
                "presence.scanners.url",
                format!(
                    "{:?}: the scanners' broker is reached over mqtt:// only",
                    self.url
                ),
            ));
        }
        Ok(endpoint)
    }
}

/// `[presence.btleplug]`. Which service UUID is ours is `presence.service_uuid`, applied by the
/// agent to what the adapter hears.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BtleSettings {
    /// Adapter name as BlueZ calls it (`hci0`); the first adapter when absent.
    #[serde(default)]
    pub adapter: Option<String>,
    /// A tracked peripheral not heard for this long is forgotten.
    #[serde(default = "default_age_out_s")]
    pub age_out_s: u32,
    /// Restart the scan when nothing at all was heard for this long while customers were about.
    #[serde(default = "default_watchdog_s")]
    pub watchdog_s: u32,
}

fn default_age_out_s() -> u32 {
    30
}

fn default_watchdog_s() -> u32 {
    120
}

impl Default for BtleSettings {
    fn default() -> Self {
        BtleSettings {
            adapter: None,
            age_out_s: default_age_out_s(),
            watchdog_s: default_watchdog_s(),
        }
    }
}

/// One zone, as `[[presence.zones]]` configures it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    pub name: String,
    /// The checkout lane this zone is, if it is one.
    #[serde(default)]
    pub lane: Option<String>,
    /// Scanner ids that cover the zone; the customer's distance to the zone is the distance to
    /// the nearest of them.
    pub scanners: Vec<String>,
    pub enter_m: f32,
    pub exit_m: f32,
    #[serde(default = "default_dwell_s")]
    pub dwell_s: u32,
    #[serde(default = "default_away_s")]
    pub away_s: u32,
}

impl ZoneSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name: a zone needs a name".into());
        }
        if self.scanners.is_empty() {
            return Err("scanners: a zone needs at least one scanner id".into());
        }
        if let Some(i) = self.scanners.iter().position(|s| s.trim().is_empty()) {
            return Err(format!("scanners[{i}]: a scanner id cannot be empty"));
        }
        if !(self.enter_m > 0.0 && self.enter_m.is_finite()) {
            return Err(format!(
                "enter_m = {}: must be a distance above 0 m",
                self.enter_m
            ));
        }
        if !(self.exit_m > self.enter_m && self.exit_m.is_finite()) {
            return Err(format!(
                "exit_m = {}: must be larger than enter_m ({}), or the zone flaps at its edge",
                self.exit_m, self.enter_m
            ));
        }
        if self.away_s == 0 {
            return Err("away_s: must be at least 1 s, or every lost packet is a departure".into());
        }
        Ok(())
    }
}

fn default_dwell_s() -> u32 {
    5
}

fn default_away_s() -> u32 {
    10
}

/// Parses a service UUID from config: 128-bit, or 16-bit (`FEAA`, `0xFEAA`) on the Bluetooth
/// base UUID.
pub fn parse_service_uuid(text: &str) -> Result<uuid::Uuid, String> {
    let t = text.trim();
    let short = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if short.len() == 4 {
        let v =
            u16::from_str_radix(short, 16).map_err(|_| format!("{text:?} is not a 16-bit UUID"))?;
        return Ok(uuid::Uuid::from_u128(
            0x0000_0000_0000_1000_8000_0080_5f9b_34fb | (u128::from(v) << 96),
        ));
    }
    uuid::Uuid::parse_str(t).map_err(|e| format!("{text:?} is not a UUID: {e}"))
}
