//! Any bytes as a captured receipt, against the shipped supermarket template: a transaction,
//! nothing, or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use storelink::pos::receipt::{self, ReceiptTemplate};

fn template() -> &'static ReceiptTemplate {
    static T: OnceLock<ReceiptTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/receipts/supermarket.toml");
        ReceiptTemplate::load(std::path::Path::new(path)).expect("shipped template loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = receipt::parse(data, template(), &jiff::tz::TimeZone::UTC);
});
