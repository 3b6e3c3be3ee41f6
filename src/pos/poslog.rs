//! ARTS/NRF POSLog XML. (Being written: until then every document is refused with a reason,
//! so frames are dead-lettered rather than lost.)

use jiff::tz::TimeZone;

use super::ParseError;
use super::transaction::Transaction;

/// Parses one POSLog document into its transactions. The outer error is for a document that
/// cannot be read at all; an inner error is for one transaction in an otherwise good document.
/// Date-times without a UTC offset are read in `tz`, the store's time zone.
pub fn parse(
    _doc: &[u8],
    _tz: &TimeZone,
) -> Result<Vec<Result<Transaction, ParseError>>, ParseError> {
    Err(ParseError("POSLog is not supported by this build".into()))
}
