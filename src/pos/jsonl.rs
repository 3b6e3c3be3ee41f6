//! The `jsonl` register format: one canonical transaction JSON per line.
//!
//! The line is parsed as a [`Transaction`]; unknown fields are refused so that a register
//! integration with a typo fails loudly at the first receipt instead of losing a field forever.

use super::ParseError;
use crate::model::transaction::{SourceFormat, Transaction};

pub fn parse(line: &[u8]) -> Result<Transaction, ParseError> {
    let text = std::str::from_utf8(line).map_err(|e| {
        ParseError(format!(
            "not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    // Plain serde first: path tracking costs on every field, and only an error needs the path.
    if let Ok(mut tx) = serde_json::from_str::<Transaction>(text) {
        tx.source_format = SourceFormat::Jsonl;
        return Ok(tx);
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let mut tx: Transaction = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let what = describe_json_error(&inner);
        if path.is_empty() || path == "." {
            ParseError(format!("invalid transaction JSON: {what}"))
        } else {
            ParseError(format!("invalid transaction JSON at {path}: {what}"))
        }
    })?;
    deserializer.end().map_err(|_| {
        ParseError("invalid transaction JSON: trailing characters after the object".into())
    })?;
    tx.source_format = SourceFormat::Jsonl;
    Ok(tx)
}

/// serde_json's messages quote the offending value (`invalid type: string "4711…"`,
/// ``unknown variant `4711` ``), and a value may be a loyalty id. Field names and the expected
/// schema are safe and useful, so only the quoted value is redacted.
fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Syntax => format!("syntax error at {at}"),
        Category::Eof => format!("unexpected end of input at {at}"),
        Category::Io => format!("read error at {at}"),
        Category::Data => {
            let msg = e.to_string();
            let msg = msg
                .rsplit_once(" at line ")
                .map(|(m, _)| m.to_string())
                .unwrap_or(msg);
            let names_a_field = ["unknown field", "missing field", "duplicate field"]
                .iter()
                .any(|p| msg.starts_with(p));
            if names_a_field {
                return format!("{msg} (at {at})");
            }
            let (problem, expected) = match msg.split_once(", expected ") {
                Some((p, x)) => (p.to_string(), format!(", expected {x}")),
                None => (msg, String::new()),
            };
            format!("{}{expected} (at {at})", redact_quoted(&problem))
        }
    }
}

fn redact_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut open: Option<char> = None;
    for c in text.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '`' {
                    open = Some(c);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"sequence":7,"business_day":"2026-11-22","started_at":"2026-11-22T09:00:00Z","ended_at":"2026-11-22T09:01:10Z","kind":"sale","loyalty_id":"4711","lines":[{"sku":"1001","description":"Äpfel","quantity":"0.532","unit":"kg","unit_price":299,"amount":159}],"tenders":[{"kind":"cash","amount":159}],"total":159}"#;

    #[test]
    fn parses_a_canonical_line() {
        let tx = parse(GOOD.as_bytes()).unwrap();
        assert_eq!(tx.sequence, Some(7));
        assert_eq!(tx.lines[0].quantity.to_string(), "0.532");
        assert_eq!(tx.lines[0].description, "Äpfel");
        assert_eq!(tx.total, 159);
        assert_eq!(tx.source_format, SourceFormat::Jsonl);
    }

    #[test]
    fn errors_name_the_field_but_never_quote_values() {
        let bad = GOOD.replace(r#""kind":"sale""#, r#""kind":"4711-secret""#);
        let err = parse(bad.as_bytes()).unwrap_err().0;
        assert!(err.contains("at kind"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
        assert!(!err.contains("4711"), "{err}");
        let bad = GOOD.replace(r#""sequence":7"#, r#""sequence":"4711-secret""#);
        let err = parse(bad.as_bytes()).unwrap_err().0;
        assert!(
            err.contains("at sequence") && err.contains("invalid type"),
            "{err}"
        );
        assert!(!err.contains("4711"), "{err}");

        let err = parse(b"{\"sequence\": 1,").unwrap_err().0;
        assert!(err.contains("end of input"), "{err}");
        let err = parse(b"\xff\xfe").unwrap_err().0;
        assert!(err.contains("not UTF-8"), "{err}");
        let err = parse(format!("{GOOD} x").as_bytes()).unwrap_err().0;
        assert!(err.contains("trailing"), "{err}");
        let err = parse(GOOD.replace("\"total\"", "\"totl\"").as_bytes())
            .unwrap_err()
            .0;
        assert!(err.contains("unknown field"), "{err}");
    }
}
