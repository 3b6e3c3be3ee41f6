//! Remote room scanners: ESPresense nodes reporting what they hear over MQTT.
//!
//! An ESPresense node publishes one report per device it hears on
//! `espresense/devices/{id}/{room}` (firmware 3.x and 4.x alike), a JSON object such as
//! `{"mac":"…","id":"iBeacon:{uuid}-{major}-{minor}","rssi@1m":-59,"rssi":-63.38,
//! "distance":1.27,…}`. 3.x sends `rssi` as an integer and adds `raw`, `speed` and `interval`;
//! 4.x smooths `rssi` into a float and adds `rxAdj`, `rssiVar`, `var` and `int`. Only `rssi`,
//! `rssi@1m` and `distance` are read; the room (last topic level) becomes the scanner id.
//!
//! Invariants:
//! - Whether a report is ours is decided from the topic's device id alone, with
//!   [`advert::from_espresense_id`]; the payload of anything else is never parsed, so a phone's
//!   report leaves no trace.
//! - The `mac` field, and every other field but the three above, is never deserialised: an
//!   address cannot reach a struct, a log line or an error message. Error messages carry the
//!   room and a category, never payload text, and never the topic (ESPresense uses public
//!   addresses as device ids).
//! - The subscription is QoS 0 on a clean session: a sighting is worth nothing a few seconds
//!   later, so nothing is queued for us at the broker while we are away.
//! - While the broker is unreachable the component is degraded and the connection is retried
//!   with backoff inside the task; only a refused subscription or bad settings are errors.

use std::sync::Arc;
use std::time::Duration;

use super::replay::RSSI_RANGE;
use super::{Feed, Source, SourceError, count_received, send};
use crate::config::ScannerSettings;
use crate::presence::advert::{self, Advertisement};
use crate::supervisor::Backoff;
use jiff::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde::Deserialize;

impl ScannerSettings {
    fn password(&self) -> Result<Option<String>, SourceError> {
        let Some(name) = &self.password_env else {
            return Ok(None);
        };
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => Ok(Some(value)),
            _ => Err(SourceError::Config(crate::config::Problem::at(
                "presence.scanners.password_env",
                format!("environment variable {name} is not set"),
            ))),
        }
    }
}

/// Why a report of ours was refused. Never holds payload text or the topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EspresenseError {
    #[error("report from room {room:?} is not a JSON report ({category} error at {line}:{column})")]
    Payload {
        room: String,
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("report from room {room:?} has no rssi")]
    MissingRssi { room: String },
    #[error("report from room {room:?} has an implausible rssi of {rssi} dBm")]
    ImplausibleRssi { room: String, rssi: f64 },
    #[error("report with an empty room in its topic")]
    EmptyRoom,
    #[error("report with a room name longer than {MAX_ROOM} bytes")]
    RoomTooLong,
    #[error("report with control characters in its room name")]
    RoomNotPrintable,
}

/// Room names are scanner ids in every presence event; a longer one is a misconfigured or
/// hostile publisher.
pub const MAX_ROOM: usize = 64;

/// The three fields presence uses; everything else in a report (the address above all) is
/// skipped by serde without being stored.
#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    rssi: Option<f64>,
    #[serde(default, rename = "rssi@1m")]
    rssi_at_1m: Option<f64>,
    #[serde(default)]
    distance: Option<f64>,
}

/// One MQTT message from a scanner: `Ok(None)` for anything that is not a device report of the
/// tenant's presence identifier (other devices, sub-reports, other topics).
pub fn parse(
    topic: &str,
    payload: &[u8],
    tenant: &uuid::Uuid,
    now: Timestamp,
) -> Result<Option<Advertisement>, EspresenseError> {
    // `…/devices/{id}/{room}`, whatever the prefix; a sub-report (`…/{room}/{report}`) or a
    // room's own topic does not end that way.
    let mut levels = topic.rsplitn(4, '/');
    let (Some(room), Some(id), Some("devices")) = (levels.next(), levels.next(), levels.next())
    else {
        return Ok(None);
    };
    let Some(payload_id) = advert::from_espresense_id(id, tenant) else {
        return Ok(None);
    };
    if room.is_empty() {
        return Err(EspresenseError::EmptyRoom);
    }
    if room.len() > MAX_ROOM {
        return Err(EspresenseError::RoomTooLong);
    }
    // The room becomes the scanner id of presence events and appears in logs.
    if room.chars().any(char::is_control) {
        return Err(EspresenseError::RoomNotPrintable);
    }
    let report: Report = serde_json::from_slice(payload).map_err(|e| EspresenseError::Payload {
        room: room.to_string(),
        category: match e.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "truncated",
        },
        line: e.line(),
        column: e.column(),
    })?;
    let rssi = report.rssi.ok_or_else(|| EspresenseError::MissingRssi {
        room: room.to_string(),
    })?;
    let rssi = dbm(rssi).ok_or_else(|| EspresenseError::ImplausibleRssi {
        room: room.to_string(),
        rssi,
    })?;
    Ok(Some(Advertisement {
        at: now,
        scanner: Arc::from(room),
        rssi,
        // Some firmware sent rssi@1m with the wrong sign (+58 for -58); an implausible
        // calibration is dropped rather than the sighting.
        tx_power: report.rssi_at_1m.and_then(dbm),
        distance_m: report
            .distance
            .filter(|d| d.is_finite() && *d >= 0.0 && *d <= f64::from(f32::MAX))
            .map(|d| d as f32),
        payload: payload_id,
    }))
}

/// A plausible signal strength, rounded to whole dBm (4.x reports smoothed fractions).
fn dbm(value: f64) -> Option<i16> {
    let rounded = value.round();
    (rounded >= f64::from(*RSSI_RANGE.start()) && rounded <= f64::from(*RSSI_RANGE.end()))
        .then_some(rounded as i16)
}

/// Reports are a few hundred bytes; anything much larger is not from ESPresense.
const MAX_PACKET: usize = 256 * 1024;

impl Source for ScannerSettings {
    /// Subscribes to the scanners' reports and hands on the tenant's sightings until cancelled.
    async fn run(&self, feed: Feed) -> Result<(), SourceError> {
        let endpoint = self.validate()?;
        let password = self.password()?;
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("storelink-scanners-{:08x}", rand::random::<u32>()));
        let mut options = MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some(user) = &self.username {
            options.set_credentials(user.clone(), password.unwrap_or_default());
        }
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let broker = format!("{}:{}", endpoint.host, endpoint.port);
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        feed.component.degraded(format!("connecting to {broker}"));

        loop {
            let event = tokio::select! {
                _ = feed.token.cancelled() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    tracing::info!(%broker, topic = %self.topic, "connected to the scanners' broker");
                    // Clean session: every connection subscribes anew.
                    if let Err(e) = client.try_subscribe(self.topic.clone(), QoS::AtMostOnce) {
                        feed.component
                            .degraded(format!("{broker}: could not subscribe: {e}"));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        let e = SourceError::SubscriptionRefused(self.topic.clone());
                        feed.component.degraded(&e);
                        return Err(e);
                    }
                    feed.component
                        .running(Some(format!("subscribed to {} on {broker}", self.topic)));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    match parse(&p.topic, &p.payload, &feed.tenant, feed.clock.now()) {
                        Ok(Some(advert)) => {
                            count_received("scanners");
                            feed.component.success();
                            // Waiting here also stops reading from the broker: backpressure reaches
                            // the scanners' QoS 0 stream, where the broker sheds it.
                            if !send(&feed.out, advert, &feed.token).await? {
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            metrics::counter!("storelink_presence_scanner_rejected_total")
                                .increment(1);
                            tracing::warn!(error = %e, "skipping a scanner report");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%broker, error = %e, retry_in_ms = delay.as_millis() as u64, "scanners' broker unreachable");
                    feed.component.degraded(format!("{broker}: {e}"));
                    tokio::select! {
                        _ = feed.token.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> uuid::Uuid {
        uuid::Uuid::parse_str("6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11").unwrap()
    }

    fn topic(room: &str) -> String {
        format!("espresense/devices/iBeacon:{}-1-2/{room}", tenant())
    }

    fn now() -> Timestamp {
        "2026-11-22T08:00:00Z".parse().unwrap()
    }

    #[test]
    fn other_topics_and_sub_reports_are_not_ours() {
        let t = tenant();
        let body = br#"{"rssi":-60}"#;
        assert_eq!(
            parse("espresense/rooms/lane-3/status", b"online", &t, now()),
            Ok(None)
        );
        let sub = format!("{}/battery", topic("lane-3"));
        assert_eq!(parse(&sub, b"97", &t, now()), Ok(None));
        assert!(parse(&topic("lane-3"), body, &t, now()).unwrap().is_some());
        let bridged = format!("store-42/{}", topic("lane-3"));
        assert!(parse(&bridged, body, &t, now()).unwrap().is_some());
        let short = format!("devices/iBeacon:{t}-1-2/lane-3");
        assert!(parse(&short, body, &t, now()).unwrap().is_some());
    }

    #[test]
    fn errors_never_quote_the_payload() {
        let t = tenant();
        let payload = br#"{"rssi":"aa:bb:cc:dd:ee:ff"}"#;
        let e = parse(&topic("lane-3"), payload, &t, now()).unwrap_err();
        assert!(matches!(
            e,
            EspresenseError::Payload {
                category: "data",
                ..
            }
        ));
        assert!(!e.to_string().contains("aa:bb"), "{e}");
    }

    #[test]
    fn rssi_is_rounded_and_range_checked_and_a_wrong_sign_calibration_dropped() {
        let t = tenant();
        let a = parse(
            &topic("x"),
            br#"{"rssi":-63.5,"rssi@1m":58,"distance":-2}"#,
            &t,
            now(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.rssi, -64);
        assert_eq!(a.tx_power, None);
        assert_eq!(a.distance_m, None);
        assert!(matches!(
            parse(&topic("x"), br#"{"rssi":-400}"#, &t, now()),
            Err(EspresenseError::ImplausibleRssi { .. })
        ));
        assert!(matches!(
            parse(&topic("x"), br#"{"distance":1}"#, &t, now()),
            Err(EspresenseError::MissingRssi { .. })
        ));
    }

    #[test]
    fn rooms_must_be_named_and_short() {
        let t = tenant();
        let body = br#"{"rssi":-60}"#;
        assert_eq!(
            parse(&topic(""), body, &t, now()),
            Err(EspresenseError::EmptyRoom)
        );
        assert_eq!(
            parse(&topic(&"r".repeat(MAX_ROOM + 1)), body, &t, now()),
            Err(EspresenseError::RoomTooLong)
        );
        assert_eq!(
            parse(&topic("lane-3\u{1b}[2J"), body, &t, now()),
            Err(EspresenseError::RoomNotPrintable)
        );
    }

    #[test]
    fn settings_defaults_and_validation() {
        let s: ScannerSettings = toml::from_str("").unwrap();
        assert_eq!(s, ScannerSettings::default());
        assert_eq!(s.validate().unwrap().port, 1883);
        assert!(toml::from_str::<ScannerSettings>("host = \"x\"").is_err());
        let bad = ScannerSettings {
            url: "mqtts://x:8883".into(),
            ..ScannerSettings::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .starts_with("presence.scanners.url: ")
        );
        let missing = ScannerSettings {
            username: Some("u".into()),
            password_env: Some("STORELINK_TEST_SURELY_UNSET_PASSWORD".into()),
            ..ScannerSettings::default()
        };
        assert!(
            missing
                .password()
                .unwrap_err()
                .to_string()
                .contains("is not set")
        );
    }
}
