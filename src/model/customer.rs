//! Who a customer is at the edge: the presence key and the EID scheme it yields, and the seam
//! an erasure reaches every customer-linked record through.
//!
//! The EID scheme is a wire contract with the customer's app (docs/eid.md): change nothing
//! here without a new context string.

use hmac::{Hmac, Mac};
use jiff::Timestamp;
use sha2::Sha256;

use crate::store::StoreError;

/// Domain separation for EIDs, so a presence key is never usable for anything else.
const EID_CONTEXT: &[u8] = b"storelink-eid-v1";

/// A customer's 32-byte presence key.
pub type PresenceKey = [u8; 32];

/// The EID a key yields in `window`.
pub fn eid(key: &PresenceKey, window: u32) -> [u8; 8] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(EID_CONTEXT);
    mac.update(&window.to_be_bytes());
    let out = mac.finalize().into_bytes();
    out[..8].try_into().expect("SHA-256 is 32 bytes")
}

/// The byte that opens the service data the app advertises: `0x01 ‖ EID`.
pub const SERVICE_DATA_VERSION: u8 = 0x01;

/// The service data a phone advertises under the tenant's service UUID: `0x01 ‖ EID`.
pub fn service_data(eid: &[u8; 8]) -> [u8; 9] {
    let mut data = [SERVICE_DATA_VERSION; 9];
    data[1..].copy_from_slice(eid);
    data
}

/// The iBeacon major and minor a phone advertises: `EID[0..2]` and `EID[2..4]`, big-endian.
pub fn ibeacon_major_minor(eid: &[u8; 8]) -> (u16, u16) {
    (
        u16::from_be_bytes([eid[0], eid[1]]),
        u16::from_be_bytes([eid[2], eid[3]]),
    )
}

/// The rotation window `at` falls in.
pub fn window_of(at: Timestamp, rotation_s: u32) -> u32 {
    let secs = at.as_second().max(0) as u64;
    (secs / u64::from(rotation_s.max(1))) as u32
}

/// Parses a presence key from 64 hex digits.
pub fn parse_key(hex: &str) -> Result<PresenceKey, String> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a presence key is 64 hex digits (32 bytes)".into());
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(key)
}

/// Lowercase hex, as keys, EIDs and customer references are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A keeper of customer-linked records that an erasure must reach (presence history, offer
/// history, trigger memory, what the outbox still holds). Registered with the eraser, so the
/// profile store names none of them.
pub trait CustomerRecords: Send + Sync {
    /// Removes (or redacts) every record of the customer, known by `ids`: their id first,
    /// then the loyalty card numbers that were theirs. Returns what it did, each count under
    /// the name the erasure acknowledgement gives it.
    fn erase_customer(&self, ids: &[String]) -> Result<Vec<(&'static str, u64)>, StoreError>;
}
