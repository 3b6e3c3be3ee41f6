//! Simulated phones running the loyalty app: what they advertise along a simulated walk, as a
//! replay file the real `replay` source plays. The demo, the tests and the benchmarks use it,
//! so what they exercise is the agent's real input path.
//!
//! Invariants:
//! - A phone advertises exactly what docs/eid.md asks of the app: service data `0x01 ‖ EID`
//!   under the tenant's UUID, with the EID of the window its sample time falls in.
//! - Keys are derived from a name, so a scenario is reproducible; they are demo keys and are
//!   never used for a real customer.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::source::replay::{Hex, RecordedAdvert, write_line};
use super::walk::Sample;
use crate::model::customer::{PresenceKey, eid, service_data, window_of};

/// A simulated customer with the app: id and presence key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phone {
    pub customer_id: String,
    pub key: PresenceKey,
}

/// `n` phones whose keys derive from `seed` and their number.
pub fn phones(seed: &str, n: usize) -> Vec<Phone> {
    (0..n)
        .map(|i| {
            let key: PresenceKey = Sha256::digest(format!("storelink-sim-phone:{seed}:{i}")).into();
            Phone {
                customer_id: format!("{seed}-{:03}", i + 1),
                key,
            }
        })
        .collect()
}

/// The advertisements `phones` send for `samples` (a sample's `phone` indexes `phones`).
pub fn adverts(
    samples: &[Sample],
    phones: &[Phone],
    tenant: &uuid::Uuid,
    rotation_s: u32,
) -> Vec<RecordedAdvert> {
    // One HMAC per phone and window, not per sample: a demo hour is a million samples.
    let mut eids: std::collections::HashMap<(usize, u32), [u8; 8]> =
        std::collections::HashMap::new();
    samples
        .iter()
        .map(|s| {
            let i = s.phone % phones.len();
            let window = window_of(s.at, rotation_s);
            let e = *eids
                .entry((i, window))
                .or_insert_with(|| eid(&phones[i].key, window));
            let data = service_data(&e).to_vec();
            RecordedAdvert {
                t: s.at,
                scanner: s.scanner.to_string(),
                rssi: s.rssi,
                tx_power: None,
                distance: None,
                service_data: BTreeMap::from([(*tenant, Hex(data))]),
                manufacturer_data: BTreeMap::new(),
                device: None,
            }
        })
        .collect()
}

/// Writes advertisements as a replay file.
pub fn write_replay(path: &Path, adverts: &[RecordedAdvert]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for a in adverts {
        out.write_all(write_line(a).as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::advert::Payload;
    use crate::presence::identity::{Resolution, Resolver};
    use crate::presence::source::replay::read_line;
    use std::sync::Arc;

    #[test]
    fn what_a_phone_advertises_resolves_to_its_customer_through_the_replay_format() {
        let tenant = uuid::Uuid::from_u128(0x6f3c1a52_8d1e_4c1b_9a7e_5b2d0c4e8f11);
        let ps = phones("demo", 3);
        assert_ne!(ps[0].key, ps[1].key);
        assert_eq!(phones("demo", 3), ps, "derived, so reproducible");
        let at: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let samples = vec![Sample {
            phone: 1,
            scanner: "lane-1".into(),
            rssi: -60,
            at,
        }];
        let ads = adverts(&samples, &ps, &tenant, 900);
        let line = write_line(&ads[0]);
        let back = read_line(&line).unwrap().unwrap();
        let ad = back.advertisement(&tenant).unwrap();
        assert!(matches!(ad.payload, Payload::Eid(_)));
        let resolver = Resolver::new(
            ps.iter()
                .map(|p| (Arc::from(p.customer_id.as_str()), p.key)),
            at,
            900,
        );
        let Resolution::Customer(i) = resolver.resolve(&ad.payload) else {
            panic!("not resolved");
        };
        assert_eq!(&**resolver.customer(i), "demo-002");
    }
}
