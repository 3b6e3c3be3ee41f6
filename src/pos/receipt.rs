//! Receipts captured from the printer line. (Being written: until then every receipt is
//! refused with a reason, so frames are dead-lettered rather than lost.)

use std::path::Path;

use jiff::tz::TimeZone;

use super::ParseError;
use super::transaction::Transaction;

/// A per-register receipt layout.
#[derive(Debug, Clone)]
pub struct ReceiptTemplate {}

impl ReceiptTemplate {
    /// Loads a template file; the error names what is wrong (the caller adds file and key).
    pub fn load(path: &Path) -> Result<ReceiptTemplate, String> {
        std::fs::read_to_string(path)
            .map(|_| ReceiptTemplate {})
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    }
}

/// Parses one receipt frame. `Ok(None)` means the frame holds no receipt text.
pub fn parse(
    _frame: &[u8],
    _template: &ReceiptTemplate,
    _tz: &TimeZone,
) -> Result<Option<Transaction>, ParseError> {
    Err(ParseError(
        "receipts are not supported by this build".into(),
    ))
}

/// The decoded text lines of a receipt frame, numbered as parse errors number them.
pub fn text_lines(_frame: &[u8], _template: &ReceiptTemplate) -> Vec<String> {
    Vec::new()
}
