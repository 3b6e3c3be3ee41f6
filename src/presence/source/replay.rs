//! Replay: a JSON-lines file of recorded advertisements, played back as if heard live.
//!
//! One line per advertisement, the format `storelink ble record` writes ([`RecordedAdvert`],
//! [`write_line`]) and this source reads ([`parse_line`]):
//! `{"t":"2026-11-22T08:00:00.25Z","scanner":"lane-3","rssi":-61,"tx_power":-59,"distance":1.2,
//! "service_data":{"<uuid>":"<hex>"},"manufacturer_data":{"76":"<hex>"},"device":"<salted hash>"}`
//! where everything after `rssi` is optional. Unknown keys are ignored so that an older agent
//! can replay a newer recorder's files.
//!
//! Invariants:
//! - Lines are played in file order, paced by their timestamps: a line is handed on at
//!   `start + (t - t_first) / speed` (speed 0: at once). Skipping a line never shifts the
//!   schedule of the ones after it.
//! - With `rebase_to_now`, every timestamp is shifted by one constant so the first line happens
//!   "now" by the agent's clock; the gaps between lines stay as recorded whatever the speed, so
//!   dwell times mean the same in a fast replay.
//! - A malformed line is skipped with a warning naming its line number, never more than 80
//!   characters of the reason, and counted in `storelink_presence_replay_malformed_total`.
//!   A line that is well formed but not ours is the normal case and is skipped silently.
//! - The `device` field is never read into an [`Advertisement`]: presence has no device identity.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Feed, Source, SourceError, count_received, send};
use crate::clock::SharedClock;
use crate::config::ReplaySettings;
use crate::presence::advert::{self, Advertisement, Payload};

/// Bytes written as lower-case hex in the file (upper case is accepted when reading).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hex(pub Vec<u8>);

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        from_hex(&text)
            .map(Hex)
            .ok_or_else(|| serde::de::Error::custom("expected an even number of hex digits"))
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// One advertisement as a line of a recording: what a radio heard, not yet judged ours or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedAdvert {
    /// When it was heard (RFC 3339).
    pub t: Timestamp,
    /// Which scanner heard it.
    pub scanner: String,
    pub rssi: i16,
    /// Calibrated transmit power the scanner reported, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_power: Option<i16>,
    /// The scanner's own distance estimate in metres, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance: Option<f32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_data: BTreeMap<uuid::Uuid, Hex>,
    /// Keyed by the Bluetooth company id, in decimal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub manufacturer_data: BTreeMap<u16, Hex>,
    /// A salted hash that tells devices in one recording apart, for the developer reading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Plausible received signal strengths in dBm; anything else is a broken or hostile line.
pub const RSSI_RANGE: std::ops::RangeInclusive<i16> = -127..=20;

impl RecordedAdvert {
    /// The presence payload in this line, if it carries the tenant's: service data first, then
    /// an iBeacon in manufacturer data. The device field is left behind.
    pub fn advertisement(&self, tenant: &uuid::Uuid) -> Option<Advertisement> {
        let found = self
            .service_data
            .iter()
            .find_map(|(service, data)| advert::from_service_data(service, &data.0, tenant))
            .map(|payload| (payload, self.tx_power))
            .or_else(|| {
                self.manufacturer_data.iter().find_map(|(company, data)| {
                    advert::from_manufacturer_data(*company, &data.0, tenant)
                        .map(|(payload, measured)| (payload, measured.or(self.tx_power)))
                })
            });
        let (payload, tx_power): (Payload, Option<i16>) = found?;
        Some(Advertisement {
            at: self.t,
            scanner: Arc::from(self.scanner.as_str()),
            rssi: self.rssi,
            tx_power,
            distance_m: self.distance.filter(|d| d.is_finite() && *d >= 0.0),
            payload,
        })
    }
}

/// Why a line was skipped. The reason never holds more than 80 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReplayError(String);

impl ReplayError {
    fn new(reason: impl fmt::Display) -> ReplayError {
        let mut reason = reason.to_string();
        if reason.len() > 80 {
            let mut cut = 77;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push_str("...");
        }
        ReplayError(reason)
    }
}

/// What one line of a replay file is.
#[derive(Debug, Clone, PartialEq)]
pub enum ParsedLine {
    /// Empty, or only whitespace.
    Blank,
    /// A well-formed advertisement without the tenant's payload; its time still counts for
    /// rebasing.
    NotOurs {
        at: Timestamp,
    },
    Ours(Advertisement),
}

/// Reads one line as a [`RecordedAdvert`]; `Ok(None)` for a blank line.
pub fn read_line(line: &str) -> Result<Option<RecordedAdvert>, ReplayError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(line)
        .map(Some)
        .map_err(ReplayError::new)
}

/// One line of a recording, newline included.
pub fn write_line(record: &RecordedAdvert) -> String {
    let mut line = serde_json::to_string(record).expect("a recorded advertisement serialises");
    line.push('\n');
    line
}

/// Parses one line of a replay file for `tenant`.
pub fn parse_line(line: &str, tenant: &uuid::Uuid) -> Result<ParsedLine, ReplayError> {
    let Some(record) = read_line(line)? else {
        return Ok(ParsedLine::Blank);
    };
    if !RSSI_RANGE.contains(&record.rssi) {
        return Err(ReplayError::new(format!(
            "rssi {} dBm is outside {}..={}",
            record.rssi,
            RSSI_RANGE.start(),
            RSSI_RANGE.end()
        )));
    }
    Ok(match record.advertisement(tenant) {
        Some(advert) => ParsedLine::Ours(advert),
        None => ParsedLine::NotOurs { at: record.t },
    })
}

/// Longest line read; a longer one is skipped as malformed rather than buffered.
const MAX_LINE: usize = 64 * 1024;

/// How one pass through the file ended.
enum Pass {
    /// End of file, with how many advertisements were handed on.
    Finished(u64),
    Cancelled,
}

impl Source for ReplaySettings {
    /// Plays the file until the token is cancelled. At the end of a file that does not loop, the
    /// source idles (a replay that ends is not a failure the supervisor should restart).
    async fn run(&self, feed: Feed) -> Result<(), SourceError> {
        self.validate()?;
        feed.component.running(Some(format!(
            "replaying {} at {}x",
            self.file.display(),
            self.speed
        )));
        loop {
            let sent =
                match play_once(self, &feed.tenant, &feed.out, &feed.clock, &feed.token).await? {
                    Pass::Cancelled => return Ok(()),
                    Pass::Finished(sent) => sent,
                };
            if self.loop_ && sent > 0 {
                continue;
            }
            if self.loop_ {
                // Looping a file with nothing of ours would spin without end.
                tracing::warn!(file = %self.file.display(), "replay file has no advertisements for this feed.tenant; not looping");
            }
            feed.component.running(Some(format!(
                "replay of {} finished: {sent} advertisements",
                self.file.display()
            )));
            feed.token.cancelled().await;
            return Ok(());
        }
    }
}

async fn play_once(
    settings: &ReplaySettings,
    tenant: &uuid::Uuid,
    out: &mpsc::Sender<Advertisement>,
    clock: &SharedClock,
    token: &CancellationToken,
) -> Result<Pass, SourceError> {
    let file_error = |source| SourceError::ReplayFile {
        path: settings.file.clone(),
        source,
    };
    let file = tokio::fs::File::open(&settings.file)
        .await
        .map_err(file_error)?;
    let mut reader = tokio::io::BufReader::new(file);
    let started = tokio::time::Instant::now();
    let base = clock.now();
    let mut first: Option<Timestamp> = None;
    let mut sent = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(file_error)?;
        if n == 0 {
            return Ok(Pass::Finished(sent));
        }
        line_no += 1;
        if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
            skip_rest_of_line(&mut reader).await.map_err(file_error)?;
            malformed(
                settings,
                line_no,
                &ReplayError::new("line longer than 64 KiB"),
            );
            continue;
        }
        let parsed = match std::str::from_utf8(&buf) {
            Ok(text) => parse_line(text, tenant),
            Err(_) => Err(ReplayError::new("not UTF-8")),
        };
        let mut advert = match parsed {
            Ok(ParsedLine::Blank) => continue,
            Ok(ParsedLine::NotOurs { at }) => {
                first.get_or_insert(at);
                continue;
            }
            Ok(ParsedLine::Ours(advert)) => advert,
            Err(e) => {
                malformed(settings, line_no, &e);
                continue;
            }
        };
        let offset = advert.at.duration_since(*first.get_or_insert(advert.at));
        if settings.speed > 0.0 && offset.is_positive() {
            let due = Duration::try_from_secs_f64(offset.as_secs_f64() / settings.speed)
                .ok()
                .and_then(|wait| started.checked_add(wait));
            tokio::select! {
                _ = token.cancelled() => return Ok(Pass::Cancelled),
                _ = sleep_until(due) => {}
            }
        }
        if settings.rebase_to_now {
            advert.at = rebase(base, offset).unwrap_or(advert.at);
        }
        count_received("replay");
        if !send(out, advert, token).await? {
            return Ok(Pass::Cancelled);
        }
        sent += 1;
        if line_no.is_multiple_of(256) {
            // At speed 0 with a fast consumer nothing else would make this task yield.
            tokio::task::yield_now().await;
        }
    }
}

/// Sleeps until `due`; a time beyond what the runtime can represent never comes.
async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

fn rebase(base: Timestamp, offset: SignedDuration) -> Option<Timestamp> {
    base.checked_add(offset).ok()
}

async fn skip_rest_of_line(
    reader: &mut tokio::io::BufReader<tokio::fs::File>,
) -> std::io::Result<()> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(());
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = available.len();
                reader.consume(n);
            }
        }
    }
}

fn malformed(settings: &ReplaySettings, line: u64, error: &ReplayError) {
    metrics::counter!("storelink_presence_replay_malformed_total").increment(1);
    tracing::warn!(file = %settings.file.display(), line, error = %error, "skipping a malformed replay line");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> uuid::Uuid {
        uuid::Uuid::parse_str("6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11").unwrap()
    }

    #[test]
    fn hex_reads_both_cases_and_refuses_odd_lengths() {
        assert_eq!(from_hex("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
        assert_eq!(to_hex(&[0x0a, 0xff]), "0aff");
    }

    #[test]
    fn reasons_are_cut_at_80_characters() {
        let long = "é".repeat(100);
        let e = ReplayError::new(&long);
        assert!(e.to_string().len() <= 80, "{}", e.to_string().len());
        assert!(e.to_string().ends_with("..."));
    }

    #[test]
    fn an_ibeacon_line_takes_the_beacons_calibrated_power() {
        let t = tenant();
        let mut data = vec![0x02, 0x15];
        data.extend(t.as_bytes());
        data.extend([0xab, 0xcd, 0x01, 0x02, 0xc5]);
        let line = format!(
            r#"{{"t":"2026-11-22T08:00:00Z","scanner":"lane-3","rssi":-70,"tx_power":-50,"manufacturer_data":{{"76":"{}"}}}}"#,
            to_hex(&data)
        );
        let ParsedLine::Ours(advert) = parse_line(&line, &t).unwrap() else {
            panic!("the tenant's iBeacon is ours");
        };
        assert_eq!(advert.payload, Payload::IBeacon([0xab, 0xcd, 0x01, 0x02]));
        assert_eq!(advert.tx_power, Some(-59));
        assert_eq!(&*advert.scanner, "lane-3");
    }

    #[test]
    fn implausible_rssi_and_negative_distance() {
        let t = tenant();
        let line = |rssi: i16, distance: f32| {
            format!(
                r#"{{"t":"2026-11-22T08:00:00Z","scanner":"x","rssi":{rssi},"distance":{distance},"service_data":{{"{t}":"010102030405060708"}}}}"#
            )
        };
        assert!(parse_line(&line(300, 1.0), &t).is_err());
        let ParsedLine::Ours(advert) = parse_line(&line(-60, -1.0), &t).unwrap() else {
            panic!("ours");
        };
        assert_eq!(advert.distance_m, None);
    }

    #[test]
    fn invalid_speeds_are_refused() {
        let mut s = ReplaySettings::new("x.jsonl");
        assert!(s.validate().is_ok());
        for speed in [-1.0, f64::NAN, f64::INFINITY] {
            s.speed = speed;
            let e = s.validate().unwrap_err().to_string();
            assert!(e.starts_with("presence.replay.speed: "), "{e}");
        }
    }

    #[test]
    fn settings_defaults_and_the_loop_key() {
        let s: ReplaySettings = toml::from_str("file = \"a.jsonl\"").unwrap();
        assert_eq!(s, ReplaySettings::new("a.jsonl"));
        let s: ReplaySettings =
            toml::from_str("file = \"a.jsonl\"\nloop = true\nspeed = 0.0").unwrap();
        assert!(s.loop_);
        assert_eq!(s.speed, 0.0);
        assert!(toml::from_str::<ReplaySettings>("file = \"a\"\nloop_ = true").is_err());
    }
}
