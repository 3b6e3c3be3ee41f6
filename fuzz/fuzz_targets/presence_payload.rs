//! Any bytes as what a radio heard: service data, manufacturer data or an ESPresense device id.
//! The parsers never panic, and whatever they accept is exactly the tenant's payload: it
//! round-trips through the bytes it came from and through ESPresense's id form.
#![no_main]
use libfuzzer_sys::fuzz_target;
use storelink::presence::advert::{
    Payload, from_espresense_id, from_manufacturer_data, from_service_data,
};
use uuid::Uuid;

const TENANT: u128 = 0x6f3c1a52_8d1e_4c1b_9a7e_5b2d0c4e8f11;
const APPLE: u16 = 0x004c;

/// ESPresense's id for an iBeacon with the tenant's UUID and these four bytes.
fn espresense_id(tenant: &Uuid, mm: [u8; 4]) -> String {
    let major = u16::from_be_bytes([mm[0], mm[1]]);
    let minor = u16::from_be_bytes([mm[2], mm[3]]);
    format!("iBeacon:{tenant}-{major}-{minor}")
}

fuzz_target!(|data: &[u8]| {
    let tenant = Uuid::from_u128(TENANT);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Bit 7 puts the tenant's UUID where it belongs, so the fuzzer reaches past that check.
    let helped = mode & 0x80 != 0;
    match mode % 3 {
        0 => {
            let (service, body) = match rest.split_at_checked(16) {
                Some((uuid, body)) if !helped => (Uuid::from_slice(uuid).unwrap(), body),
                _ => (tenant, rest),
            };
            if let Some(payload) = from_service_data(&service, body, &tenant) {
                assert_eq!(service, tenant);
                let Payload::Eid(eid) = payload else {
                    panic!("service data yields a full EID, got {payload:?}");
                };
                assert_eq!(body[0], 0x01);
                assert_eq!(&body[1..], &eid[..]);
            }
        }
        1 => {
            let (company, mut body) = match rest.split_first_chunk::<2>() {
                Some((company, body)) => (u16::from_le_bytes(*company), body.to_vec()),
                None => (APPLE, Vec::new()),
            };
            let company = if helped { APPLE } else { company };
            if helped {
                let mut spliced = vec![0x02, 0x15];
                spliced.extend(tenant.as_bytes());
                spliced.extend(&body);
                body = spliced;
            }
            if let Some((payload, tx_power)) = from_manufacturer_data(company, &body, &tenant) {
                let Payload::IBeacon(mm) = payload else {
                    panic!("an iBeacon yields four bytes, got {payload:?}");
                };
                assert_eq!(company, APPLE);
                // 0x02 0x15, UUID, major, minor, power: the company id is not in the value.
                assert_eq!(body.len(), 23);
                assert_eq!(&body[..2], &[0x02, 0x15]);
                assert_eq!(&body[2..18], tenant.as_bytes());
                assert_eq!(&body[18..22], &mm[..]);
                assert_eq!(tx_power, Some(i16::from(body[22] as i8)));
                // A scanner reporting the same beacon by id finds the same payload.
                let id = espresense_id(&tenant, mm);
                assert_eq!(from_espresense_id(&id, &tenant), Some(payload));
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let id = if helped {
                format!("iBeacon:{tenant}-{text}")
            } else {
                text.to_string()
            };
            if let Some(payload) = from_espresense_id(&id, &tenant) {
                let Payload::IBeacon(mm) = payload else {
                    panic!("an ESPresense id yields four bytes, got {payload:?}");
                };
                assert!(id.starts_with("iBeacon:"));
                assert_eq!(
                    from_espresense_id(&espresense_id(&tenant, mm), &tenant),
                    Some(payload)
                );
            }
        }
    }
});
