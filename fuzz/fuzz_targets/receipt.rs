//! Any bytes as a captured receipt, against the shipped supermarket template: a transaction,
//! nothing, or an error, never a panic. A transaction that comes out adds up, and an error
//! names a line that `text_lines` shows.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use storelink::pos::receipt::{self, ReceiptTemplate};
use storelink::model::transaction::TransactionKind;

fn template() -> &'static ReceiptTemplate {
    static T: OnceLock<ReceiptTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/receipts/supermarket.toml"
        );
        ReceiptTemplate::load(std::path::Path::new(path)).expect("shipped template loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let lines = receipt::text_lines(data, template());
    match receipt::parse(data, template(), &jiff::tz::TimeZone::UTC) {
        Ok(Some(tx)) => {
            assert!(!lines.is_empty());
            if tx.kind != TransactionKind::Void {
                assert_eq!(tx.lines_total(), tx.total);
                if !tx.tenders.is_empty() {
                    assert_eq!(tx.tenders.iter().map(|t| t.amount).sum::<i64>(), tx.total);
                }
            }
            assert_eq!(tx.started_at, tx.ended_at);
        }
        Ok(None) => {}
        Err(e) => {
            if let Some(n) =
                e.0.strip_prefix("line ")
                    .and_then(|r| r.split(':').next())
                    .and_then(|n| n.parse::<usize>().ok())
            {
                assert!(n >= 1 && n <= lines.len(), "{e}");
            }
        }
    }
});
