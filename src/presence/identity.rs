//! Recognising opted-in customers from the rotating identifier their app advertises.
//!
//! `EID = HMAC-SHA256(presence_key, "storelink-eid-v1" ‖ u32_be(window))[0..8]`, with
//! `window = floor(unix_time / rotation_s)` (docs/eid.md). The [`Resolver`] holds, for every
//! customer with presence consent and a key, the EIDs of the current window and its two
//! neighbours (phones' clocks drift), keyed for constant-time lookup. It is rebuilt when the
//! window turns and when profiles change.
//!
//! Invariants:
//! - Only consenting customers' keys are ever in the table; resolving is the only way a
//!   sighting becomes a customer.
//! - An iBeacon carries only 4 bytes of the EID. If two customers share those 4 bytes in the
//!   table, a sighting of them is ambiguous: it is dropped and counted, never guessed.
//! - Resolving allocates nothing and touches no state, so the flood of sightings that do not
//!   resolve leaves no trace.

use std::collections::HashMap;
use std::sync::Arc;

use jiff::Timestamp;

use super::advert::Payload;
pub use crate::model::customer::{PresenceKey, eid, hex, parse_key, window_of};

/// What a sighting is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// A consenting customer, by index into [`Resolver::customer`].
    Customer(u32),
    /// Not ours, or not anyone's right now.
    Unknown,
    /// An iBeacon whose 4 bytes fit more than one customer.
    Ambiguous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    One(u32),
    Many,
}

/// The lookup table for the current window.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    rotation_s: u32,
    /// The window the table is built around.
    window: u32,
    customers: Vec<Arc<str>>,
    keys: Vec<PresenceKey>,
    eids: HashMap<[u8; 8], Slot>,
    ibeacons: HashMap<[u8; 4], Slot>,
}

impl Resolver {
    /// Builds the table around the window of `now`. `customers` are the consenting customers
    /// and their keys.
    pub fn new(
        customers: impl IntoIterator<Item = (Arc<str>, PresenceKey)>,
        now: Timestamp,
        rotation_s: u32,
    ) -> Resolver {
        let (customers, keys) = customers.into_iter().unzip();
        let mut r = Resolver {
            rotation_s: rotation_s.max(1),
            window: window_of(now, rotation_s),
            customers,
            keys,
            eids: HashMap::new(),
            ibeacons: HashMap::new(),
        };
        r.rebuild();
        r
    }

    /// Rebuilds the table if `now` is in a new window. Returns whether it did.
    pub fn refresh(&mut self, now: Timestamp) -> bool {
        let window = window_of(now, self.rotation_s);
        if window == self.window {
            return false;
        }
        self.window = window;
        self.rebuild();
        true
    }

    fn rebuild(&mut self) {
        let n = self.keys.len() * 3;
        let mut eids = HashMap::with_capacity(n);
        let mut ibeacons = HashMap::with_capacity(n);
        let place = |slot: Option<&mut Slot>, idx: u32| match slot {
            Some(s) if *s != Slot::One(idx) => *s = Slot::Many,
            _ => {}
        };
        for (idx, key) in self.keys.iter().enumerate() {
            let idx = idx as u32;
            for window in [
                self.window.wrapping_sub(1),
                self.window,
                self.window.wrapping_add(1),
            ] {
                let e = eid(key, window);
                match eids.get_mut(&e) {
                    None => {
                        eids.insert(e, Slot::One(idx));
                    }
                    slot => place(slot, idx),
                }
                let short: [u8; 4] = e[..4].try_into().expect("8 > 4");
                match ibeacons.get_mut(&short) {
                    None => {
                        ibeacons.insert(short, Slot::One(idx));
                    }
                    slot => place(slot, idx),
                }
            }
        }
        self.eids = eids;
        self.ibeacons = ibeacons;
    }

    pub fn resolve(&self, payload: &Payload) -> Resolution {
        let slot = match payload {
            Payload::Eid(e) => self.eids.get(e),
            Payload::IBeacon(b) => self.ibeacons.get(b),
        };
        match slot {
            Some(Slot::One(idx)) => Resolution::Customer(*idx),
            Some(Slot::Many) => Resolution::Ambiguous,
            None => Resolution::Unknown,
        }
    }

    pub fn customer(&self, idx: u32) -> &Arc<str> {
        &self.customers[idx as usize]
    }

    /// Customers in the table.
    pub fn len(&self) -> usize {
        self.customers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.customers.is_empty()
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// How many 4-byte iBeacon identifiers are ambiguous in the current table.
    pub fn ambiguous_ibeacons(&self) -> usize {
        self.ibeacons.values().filter(|s| **s == Slot::Many).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PresenceKey {
        [n; 32]
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn windows_are_floor_of_time_over_rotation() {
        assert_eq!(window_of(at(0), 900), 0);
        assert_eq!(window_of(at(899), 900), 0);
        assert_eq!(window_of(at(900), 900), 1);
        assert_eq!(window_of(at(1_795_000_000), 900), 1_994_444);
    }

    #[test]
    fn resolves_current_and_neighbouring_windows_only() {
        let now = at(1_795_000_000);
        let w = window_of(now, 900);
        let r = Resolver::new(
            [(Arc::from("c1"), key(1)), (Arc::from("c2"), key(2))],
            now,
            900,
        );
        for window in [w - 1, w, w + 1] {
            assert_eq!(
                r.resolve(&Payload::Eid(eid(&key(2), window))),
                Resolution::Customer(1)
            );
        }
        assert_eq!(
            r.resolve(&Payload::Eid(eid(&key(2), w + 2))),
            Resolution::Unknown
        );
        assert_eq!(
            r.resolve(&Payload::Eid(eid(&key(2), w - 2))),
            Resolution::Unknown
        );
        assert_eq!(
            r.resolve(&Payload::Eid(eid(&key(3), w))),
            Resolution::Unknown
        );
        let short: [u8; 4] = eid(&key(1), w)[..4].try_into().unwrap();
        assert_eq!(r.resolve(&Payload::IBeacon(short)), Resolution::Customer(0));
        assert_eq!(&**r.customer(0), "c1");
    }

    #[test]
    fn refresh_moves_with_the_window() {
        let r0 = at(1_994_444 * 900);
        let mut r = Resolver::new([(Arc::from("c1"), key(1))], r0, 900);
        assert!(
            !r.refresh(r0 + jiff::SignedDuration::from_secs(899)),
            "same window"
        );
        let later = r0 + jiff::SignedDuration::from_secs(3 * 900);
        assert!(r.refresh(later));
        let w = window_of(later, 900);
        assert_eq!(
            r.resolve(&Payload::Eid(eid(&key(1), w))),
            Resolution::Customer(0)
        );
        assert_eq!(
            r.resolve(&Payload::Eid(eid(&key(1), w - 3))),
            Resolution::Unknown
        );
    }

    #[test]
    fn a_4_byte_collision_is_ambiguous_not_guessed() {
        // Search for two keys whose EIDs share the first 4 bytes in one window: with 2^16
        // candidates the birthday bound makes one likely.
        let w = 1234;
        let mut seen: HashMap<[u8; 4], u32> = HashMap::new();
        let (a, b) = (0u32..200_000)
            .find_map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                let short: [u8; 4] = eid(&k, w)[..4].try_into().unwrap();
                seen.insert(short, i).map(|j| (j, i))
            })
            .expect("a collision among 200,000 keys");
        let mk = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        };
        let now = Timestamp::from_second(i64::from(w) * 900).unwrap();
        let r = Resolver::new([(Arc::from("a"), mk(a)), (Arc::from("b"), mk(b))], now, 900);
        let short: [u8; 4] = eid(&mk(a), w)[..4].try_into().unwrap();
        assert_eq!(r.resolve(&Payload::IBeacon(short)), Resolution::Ambiguous);
        // The full EID still tells them apart.
        assert_eq!(
            r.resolve(&Payload::Eid(eid(&mk(b), w))),
            Resolution::Customer(1)
        );
        assert!(r.ambiguous_ibeacons() >= 1);
    }

    #[test]
    fn keys_parse_from_hex() {
        let k = parse_key(&"0f".repeat(32)).unwrap();
        assert_eq!(k, [0x0f; 32]);
        assert!(parse_key("abc").is_err());
        assert_eq!(hex(&[0xde, 0xad]), "dead");
    }
}
