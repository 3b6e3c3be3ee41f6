//! Advertisements as the presence pipeline sees them, and the parsers that find a presence
//! identifier in what a radio heard.
//!
//! Invariants:
//! - An [`Advertisement`] has no device address: sources reduce what they hear to the presence
//!   payload before anything else happens, so an address cannot reach a map, a log line or a
//!   metric by accident.
//! - Advertisements without a presence payload (every phone that is not running the loyalty
//!   app, every headset, every beacon) are dropped by the source, at the edge.

use std::sync::Arc;

use jiff::Timestamp;

/// What the loyalty app advertises (docs/eid.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Payload {
    /// Service data `0x01 ‖ EID` under the tenant's service UUID: the full 8-byte EID.
    Eid([u8; 8]),
    /// iBeacon with the tenant's service UUID as proximity UUID: `major ‖ minor` is `EID[0..4]`.
    IBeacon([u8; 4]),
}

/// One sighting of a presence identifier.
#[derive(Debug, Clone, PartialEq)]
pub struct Advertisement {
    /// When it was heard (by the scanner's clock, or the agent's when it has none).
    pub at: Timestamp,
    /// Which scanner heard it: a zone's scanner id, an ESPresense room, `local`.
    pub scanner: Arc<str>,
    pub rssi: i16,
    /// Calibrated transmit power the advertisement carried, if any.
    pub tx_power: Option<i16>,
    /// The scanner's own distance estimate in metres (ESPresense sends one), if any.
    pub distance_m: Option<f32>,
    pub payload: Payload,
}

/// Apple's Bluetooth company id, under which iBeacons travel.
const APPLE: u16 = 0x004c;

/// A presence payload in BLE service data: `0x01 ‖ EID` under the tenant's service UUID.
/// Anything else (another UUID, another version byte, another length) is not ours.
pub fn from_service_data(
    service: &uuid::Uuid,
    data: &[u8],
    tenant: &uuid::Uuid,
) -> Option<Payload> {
    if service != tenant {
        return None;
    }
    match data {
        [crate::model::customer::SERVICE_DATA_VERSION, eid @ ..] => {
            eid.try_into().ok().map(Payload::Eid)
        }
        _ => None,
    }
}

/// A presence payload in manufacturer data: an iBeacon (`0x02 0x15 ‖ UUID ‖ major ‖ minor ‖
/// tx power`) whose proximity UUID is the tenant's. Returns the calibrated tx power too.
pub fn from_manufacturer_data(
    company: u16,
    data: &[u8],
    tenant: &uuid::Uuid,
) -> Option<(Payload, Option<i16>)> {
    if company != APPLE {
        return None;
    }
    let [0x02, 0x15, rest @ ..] = data else {
        return None;
    };
    if rest.len() != 16 + 4 + 1 || rest[..16] != tenant.as_bytes()[..] {
        return None;
    }
    let major_minor: [u8; 4] = rest[16..20].try_into().ok()?;
    Some((
        Payload::IBeacon(major_minor),
        Some(i16::from(rest[20] as i8)),
    ))
}

/// A presence payload in an ESPresense device id: `iBeacon:{uuid}-{major}-{minor}` with the
/// tenant's UUID (major and minor in decimal, as ESPresense writes them).
pub fn from_espresense_id(id: &str, tenant: &uuid::Uuid) -> Option<Payload> {
    let rest = id.strip_prefix("iBeacon:")?;
    // The UUID has four hyphens of its own; major and minor follow the fifth and sixth.
    let mut parts = rest.rsplitn(3, '-');
    let minor: u16 = parts.next()?.parse().ok()?;
    let major: u16 = parts.next()?.parse().ok()?;
    let uuid = uuid::Uuid::parse_str(parts.next()?).ok()?;
    if &uuid != tenant {
        return None;
    }
    let mut mm = [0u8; 4];
    mm[..2].copy_from_slice(&major.to_be_bytes());
    mm[2..].copy_from_slice(&minor.to_be_bytes());
    Some(Payload::IBeacon(mm))
}

pub use crate::config::parse_service_uuid;

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> uuid::Uuid {
        uuid::Uuid::parse_str("6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11").unwrap()
    }

    #[test]
    fn service_data_must_be_ours_version_1_and_nine_bytes() {
        let t = tenant();
        let eid = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut data = vec![0x01];
        data.extend(eid);
        assert_eq!(from_service_data(&t, &data, &t), Some(Payload::Eid(eid)));
        let other = uuid::Uuid::nil();
        assert_eq!(from_service_data(&other, &data, &t), None);
        data[0] = 0x02;
        assert_eq!(from_service_data(&t, &data, &t), None);
        assert_eq!(from_service_data(&t, &[0x01, 1, 2], &t), None);
    }

    #[test]
    fn ibeacon_in_manufacturer_data() {
        let t = tenant();
        let mut data = vec![0x02, 0x15];
        data.extend(t.as_bytes());
        data.extend([0xab, 0xcd, 0x01, 0x02, 0xc5]);
        assert_eq!(
            from_manufacturer_data(APPLE, &data, &t),
            Some((Payload::IBeacon([0xab, 0xcd, 0x01, 0x02]), Some(-59)))
        );
        assert_eq!(from_manufacturer_data(0x0006, &data, &t), None);
        assert_eq!(from_manufacturer_data(APPLE, &data[..10], &t), None);
    }

    #[test]
    fn espresense_ids() {
        let t = tenant();
        let id = format!("iBeacon:{t}-43981-258");
        assert_eq!(
            from_espresense_id(&id, &t),
            Some(Payload::IBeacon([0xab, 0xcd, 0x01, 0x02]))
        );
        assert_eq!(
            from_espresense_id("iBeacon:e5ca1ade-f007-ba11-0000-000000000000-1-2", &t),
            None
        );
        assert_eq!(from_espresense_id("apple:1005:9-26", &t), None);
        assert_eq!(
            from_espresense_id(&format!("iBeacon:{t}-70000-1"), &t),
            None
        );
    }

    #[test]
    fn service_uuids_in_both_forms() {
        assert_eq!(
            parse_service_uuid("0xFEAA").unwrap().to_string(),
            "0000feaa-0000-1000-8000-00805f9b34fb"
        );
        assert_eq!(
            parse_service_uuid("6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11").unwrap(),
            tenant()
        );
        assert!(parse_service_uuid("nope").is_err());
    }
}
