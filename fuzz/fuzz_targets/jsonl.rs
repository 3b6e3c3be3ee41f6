//! Any bytes on a jsonl register line: the parser returns a transaction or an error, never
//! panics, and what it accepts survives a JSON round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use storelink::pos::jsonl;

fuzz_target!(|data: &[u8]| {
    if let Ok(tx) = jsonl::parse(data) {
        let _ = tx.validate();
        let json = serde_json::to_vec(&tx).expect("a parsed transaction serialises");
        let back = jsonl::parse(&json).expect("a serialised transaction parses");
        assert_eq!(back, tx);
    }
});
