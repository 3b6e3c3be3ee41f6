//! Any bytes as a POSLog document: transactions or errors, never a panic; every transaction
//! it yields survives a JSON round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use storelink::pos::poslog;

fuzz_target!(|data: &[u8]| {
    if let Ok(results) = poslog::parse(data, &jiff::tz::TimeZone::UTC) {
        for tx in results.into_iter().flatten() {
            let json = serde_json::to_vec(&tx).expect("serialises");
            let back: storelink::pos::transaction::Transaction =
                serde_json::from_slice(&json).expect("parses back");
            assert_eq!(back, tx);
        }
    }
});
