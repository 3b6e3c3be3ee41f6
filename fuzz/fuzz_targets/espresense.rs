//! Any bytes as an MQTT message from a room scanner (topic, NUL, payload) and as a line of a
//! replay file. Neither parser panics; what they accept is a plausible sighting of the tenant's,
//! error messages stay short and quote nothing, and an accepted replay line survives being
//! written back out.
#![no_main]
use jiff::Timestamp;
use libfuzzer_sys::fuzz_target;
use storelink::presence::source::espresense::{self, MAX_ROOM};
use storelink::presence::source::replay::{self, ParsedLine, RSSI_RANGE};
use uuid::Uuid;

const TENANT: u128 = 0x6f3c1a52_8d1e_4c1b_9a7e_5b2d0c4e8f11;

fuzz_target!(|data: &[u8]| {
    let tenant = Uuid::from_u128(TENANT);
    let now = Timestamp::from_second(1_795_000_000).unwrap();

    let (topic, payload) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(topic) = std::str::from_utf8(topic) {
        // A leading '!' stands for "a report of the tenant's beacon from room <rest>", so the
        // fuzzer spends its time on payloads rather than on guessing the UUID.
        let topic = match topic.strip_prefix('!') {
            Some(room) => format!("espresense/devices/iBeacon:{tenant}-1-2/{room}"),
            None => topic.to_string(),
        };
        match espresense::parse(&topic, payload, &tenant, now) {
            Ok(Some(advert)) => {
                assert_eq!(advert.at, now);
                assert!(RSSI_RANGE.contains(&advert.rssi));
                assert!(advert.tx_power.is_none_or(|p| RSSI_RANGE.contains(&p)));
                assert!(advert.distance_m.is_none_or(|d| d.is_finite() && d >= 0.0));
                assert!(!advert.scanner.is_empty() && advert.scanner.len() <= MAX_ROOM);
                assert!(!advert.scanner.chars().any(char::is_control));
                assert!(topic.ends_with(&format!("/{}", advert.scanner)));
            }
            Ok(None) => {}
            Err(e) => {
                // Errors name the room (at most MAX_ROOM bytes, Debug-escaped: at most ten
                // characters a byte) and a category, nothing else.
                assert!(e.to_string().len() <= 200 + 10 * MAX_ROOM, "{e}");
            }
        }
    }

    if let Ok(line) = std::str::from_utf8(data) {
        match replay::parse_line(line, &tenant) {
            Ok(ParsedLine::Ours(advert)) => {
                let record = replay::read_line(line).unwrap().unwrap();
                let again = replay::parse_line(&replay::write_line(&record), &tenant).unwrap();
                assert_eq!(again, ParsedLine::Ours(advert));
            }
            Ok(ParsedLine::NotOurs { at }) => {
                let record = replay::read_line(line).unwrap().unwrap();
                assert_eq!(record.t, at);
                assert_eq!(record.advertisement(&tenant), None);
            }
            Ok(ParsedLine::Blank) => assert!(line.trim().is_empty()),
            Err(e) => assert!(e.to_string().chars().count() <= 80, "{e}"),
        }
    }
});
