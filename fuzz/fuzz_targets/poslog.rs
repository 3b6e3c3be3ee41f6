//! Any bytes as a POSLog document: transactions or errors, never a panic. Every transaction it
//! yields survives a JSON round trip and is safe to validate; a return never has a negative
//! tender; and no error message is long, which is how the fuzzer notices one that echoes the
//! document's text (a loyalty id may be in it) instead of naming elements and positions.
#![no_main]
use libfuzzer_sys::fuzz_target;
use storelink::pos::poslog;
use storelink::model::transaction::{Transaction, TransactionKind};

/// Element paths, byte offsets and names cut to 40 characters fit well inside this.
const MAX_MESSAGE: usize = 400;

fuzz_target!(|data: &[u8]| {
    match poslog::parse(data, &jiff::tz::TimeZone::UTC, "EUR") {
        Err(e) => assert!(e.0.len() <= MAX_MESSAGE, "{e}"),
        Ok(results) => {
            for result in results {
                let tx = match result {
                    Ok(tx) => tx,
                    Err(e) => {
                        assert!(e.0.len() <= MAX_MESSAGE, "{e}");
                        continue;
                    }
                };
                let _ = tx.validate();
                let _ = tx.derive_id();
                // (A computed total may still be negative: discounts larger than the amounts
                // refunded are summed as the register wrote them.)
                if tx.kind == TransactionKind::Return {
                    assert!(tx.tenders.iter().all(|t| t.amount >= 0));
                }
                let json = serde_json::to_vec(&tx).expect("serialises");
                let back: Transaction = serde_json::from_slice(&json).expect("parses back");
                assert_eq!(back, tx);
            }
        }
    }
});
