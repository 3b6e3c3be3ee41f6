//! The canonical transaction: what every register format becomes, and the `data` of
//! `storelink.transaction.v1`.
//!
//! Invariants:
//! - Money is `i64` minor units (cents). A JSON float in a money field is refused, never rounded.
//! - Quantities are exact decimals ([`Quantity`]); `0.532` kg stays `0.532`.
//! - A return or a void is a [`TransactionKind`], not a sale with negative amounts: amounts on a
//!   return are the (positive) values refunded.
//! - The id is derived from store, register, business day and sequence
//!   ([`transaction_id`]), so a resend carries the same id and central can de-duplicate on it.
//!   A source without a sequence (some receipt printers) gets a hash of the content instead
//!   ([`Transaction::derive_id`]): the same receipt captured twice has the same id.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use jiff::civil::Date;
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Minor units of the transaction's currency (cents for EUR).
pub type Money = i64;

/// A completed register transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transaction {
    /// `{store}:{register}:{yyyymmdd}:{sequence}` (or `…:h{hash}` without a sequence);
    /// recomputed on ingest, never trusted.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub store: String,
    #[serde(default)]
    pub register: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// The register's receipt or transaction number within the business day; absent when the
    /// source does not number its transactions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    pub business_day: Date,
    pub started_at: Timestamp,
    pub ended_at: Timestamp,
    #[serde(default)]
    pub kind: TransactionKind,
    /// ISO 4217; the store's currency when the register does not say.
    #[serde(default)]
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loyalty_id: Option<String>,
    #[serde(default)]
    pub lines: Vec<Line>,
    #[serde(default)]
    pub tenders: Vec<Tender>,
    /// What the customer paid (sale) or got back (return), in minor units.
    pub total: Money,
    #[serde(default)]
    pub source_format: SourceFormat,
    /// Set by smoke tests so that central can keep test traffic out of reporting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub test: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionKind {
    #[default]
    Sale,
    Return,
    /// Cancelled before completion; recorded for audit, never counted as revenue.
    Void,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    #[default]
    Jsonl,
    Poslog,
    Receipt,
}

impl SourceFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Jsonl => "jsonl",
            SourceFormat::Poslog => "poslog",
            SourceFormat::Receipt => "receipt",
        }
    }
}

/// One line of a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub sku: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtin: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub quantity: Quantity,
    /// Unit of measure for `quantity` (`"kg"`, `"l"`); absent means pieces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub unit_price: Money,
    /// Extended amount before the line discount.
    pub amount: Money,
    /// Line discount, as a positive value taken off `amount`.
    #[serde(default)]
    pub discount: Money,
    /// Cost of goods, when the register knows it; lets attribution report margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Money>,
    /// A line voided within the transaction; kept for audit, not counted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub voided: bool,
}

impl Line {
    /// What the line contributes to the total.
    pub fn net(&self) -> Money {
        if self.voided {
            0
        } else {
            self.amount.saturating_sub(self.discount)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tender {
    /// `cash`, `card`, `voucher`, … as the register names it.
    pub kind: String,
    pub amount: Money,
}

/// An exact decimal quantity. Serialised as a JSON string so no consumer parses it as a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(pub Decimal);

impl Quantity {
    pub const ONE: Quantity = Quantity(Decimal::ONE);

    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.normalize())
    }
}

impl FromStr for Quantity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Decimal::from_str_exact(s.trim())
            .map(Quantity)
            .map_err(|e| format!("{s:?} is not a decimal quantity: {e}"))
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal quantity such as \"0.532\" or 2")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(Decimal::from(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(Decimal::from(v)))
            }
            // A JSON number with a fraction arrives as f64. Rust prints an f64 as the shortest
            // text that reads back to the same value, which is the text the register wrote for
            // any quantity with up to 15 significant digits.
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                if !v.is_finite() {
                    return Err(E::custom("quantity must be finite"));
                }
                v.to_string().parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The stable id of a transaction: one fact, one id, however often it is sent.
pub fn transaction_id(store: &str, register: &str, business_day: Date, sequence: u64) -> String {
    format!(
        "{store}:{register}:{:04}{:02}{:02}:{sequence}",
        business_day.year(),
        business_day.month(),
        business_day.day()
    )
}

/// Hex digits of content hash in an id: 64 bits, ample for one register's business day.
const HASH_HEX: usize = 16;

/// Upper bound on any money value: ten billion in major units. Anything larger is a parse error
/// upstream, and keeping sums far from `i64::MAX` means totals never overflow.
pub const MAX_MONEY: Money = 1_000_000_000_000;

/// Why a transaction was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTransaction(pub String);

impl Transaction {
    /// The stable id of this transaction: from the sequence when there is one, otherwise from
    /// a hash of everything else, so the same content always gets the same id.
    pub fn derive_id(&self) -> String {
        match self.sequence {
            Some(seq) => transaction_id(&self.store, &self.register, self.business_day, seq),
            None => {
                use sha2::Digest;
                let mut content = self.clone();
                content.id = String::new();
                let json = serde_json::to_vec(&content).expect("transactions serialise");
                let digest = sha2::Sha256::digest(&json);
                let hex: String = digest
                    .iter()
                    .take(HASH_HEX / 2)
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!(
                    "{}:{}:{:04}{:02}{:02}:h{hex}",
                    self.store,
                    self.register,
                    self.business_day.year(),
                    self.business_day.month(),
                    self.business_day.day()
                )
            }
        }
    }

    /// Checks what a parser cannot: ranges, required text and structure.
    pub fn validate(&self) -> Result<(), InvalidTransaction> {
        let bad = |m: String| Err(InvalidTransaction(m));
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad(format!(
                "currency {:?} is not an ISO 4217 code",
                self.currency
            ));
        }
        if self.ended_at < self.started_at {
            return bad("ended_at is before started_at".into());
        }
        let money_ok = |m: Money| (-MAX_MONEY..=MAX_MONEY).contains(&m);
        if !money_ok(self.total) {
            return bad(format!("total {} is out of range", self.total));
        }
        for (i, line) in self.lines.iter().enumerate() {
            if line.sku.trim().is_empty() {
                return bad(format!("lines[{i}].sku is empty"));
            }
            for (field, value) in [
                ("unit_price", line.unit_price),
                ("amount", line.amount),
                ("discount", line.discount),
                ("cost", line.cost.unwrap_or(0)),
            ] {
                if !money_ok(value) {
                    return bad(format!("lines[{i}].{field} {value} is out of range"));
                }
            }
            if line.quantity.0.abs() > Decimal::from(1_000_000) {
                return bad(format!(
                    "lines[{i}].quantity {} is out of range",
                    line.quantity
                ));
            }
        }
        for (i, tender) in self.tenders.iter().enumerate() {
            if !money_ok(tender.amount) {
                return bad(format!(
                    "tenders[{i}].amount {} is out of range",
                    tender.amount
                ));
            }
        }
        if self.lines.len() > 10_000 || self.tenders.len() > 1_000 {
            return bad("too many lines or tenders".into());
        }
        Ok(())
    }

    /// Sum of the counted lines' net amounts.
    pub fn lines_total(&self) -> Money {
        self.lines.iter().map(Line::net).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn id_is_stable_and_readable() {
        let day: Date = "2026-11-22".parse().unwrap();
        assert_eq!(
            transaction_id("s042", "lane-3", day, 17),
            "s042:lane-3:20261122:17"
        );
    }

    #[test]
    fn without_a_sequence_the_id_is_a_stable_content_hash() {
        let mut t = arb_fixed();
        t.sequence = None;
        let id = t.derive_id();
        assert!(
            id.starts_with("s1:r1:20260101:h") && id.len() == "s1:r1:20260101:h".len() + 16,
            "{id}"
        );
        t.id = "whatever".into();
        assert_eq!(t.derive_id(), id, "the id field itself does not count");
        t.total += 1;
        assert_ne!(t.derive_id(), id, "different content, different id");
    }

    #[test]
    fn quantity_reads_strings_integers_and_floats_exactly() {
        let q: Quantity = serde_json::from_str("\"0.532\"").unwrap();
        assert_eq!(q.to_string(), "0.532");
        let q: Quantity = serde_json::from_str("0.532").unwrap();
        assert_eq!(q.to_string(), "0.532");
        let q: Quantity = serde_json::from_str("3").unwrap();
        assert_eq!(q, Quantity(Decimal::from(3)));
        assert!(serde_json::from_str::<Quantity>("\"abc\"").is_err());
        assert_eq!(
            serde_json::to_string(&Quantity(Decimal::new(1500, 3))).unwrap(),
            "\"1.5\""
        );
    }

    #[test]
    fn money_refuses_floats() {
        let json = r#"{"sku":"1","quantity":1,"unit_price":1.5,"amount":150}"#;
        let err = serde_json::from_str::<Line>(json).unwrap_err();
        assert!(err.to_string().contains("floating point"), "{err}");
    }

    #[test]
    fn voided_lines_do_not_count() {
        let line = |amount, discount, voided| Line {
            sku: "1".into(),
            gtin: None,
            description: String::new(),
            category: None,
            quantity: Quantity::ONE,
            unit: None,
            unit_price: amount,
            amount,
            discount,
            cost: None,
            voided,
        };
        let mut t = arb_fixed();
        t.lines = vec![line(1000, 100, false), line(500, 0, true)];
        assert_eq!(t.lines_total(), 900);
    }

    fn arb_fixed() -> Transaction {
        Transaction {
            id: String::new(),
            store: "s1".into(),
            register: "r1".into(),
            lane: None,
            sequence: Some(1),
            business_day: "2026-01-01".parse().unwrap(),
            started_at: "2026-01-01T10:00:00Z".parse().unwrap(),
            ended_at: "2026-01-01T10:01:00Z".parse().unwrap(),
            kind: TransactionKind::Sale,
            currency: "EUR".into(),
            loyalty_id: None,
            lines: vec![],
            tenders: vec![],
            total: 0,
            source_format: SourceFormat::Jsonl,
            test: false,
        }
    }

    fn arb_text() -> impl Strategy<Value = String> {
        // Includes umlauts, quotes and control characters that JSON must escape.
        "[a-zA-Z0-9 äöüß€\"\\\\\t\n-]{0,16}"
    }

    fn arb_money() -> impl Strategy<Value = Money> {
        -MAX_MONEY..=MAX_MONEY
    }

    fn arb_quantity() -> impl Strategy<Value = Quantity> {
        // Up to ±999,999.9999, the range validation allows, at 0 to 4 decimal places.
        (0u32..=4).prop_flat_map(|s| {
            let bound = 999_999 * 10i64.pow(s);
            (-bound..=bound).prop_map(move |m| Quantity(Decimal::new(m, s)))
        })
    }

    prop_compose! {
        fn arb_line()(sku in "[0-9A-Z]{1,12}", gtin in proptest::option::of("[0-9]{13}"),
                      description in arb_text(), category in proptest::option::of(arb_text()),
                      quantity in arb_quantity(), unit in proptest::option::of("kg|l|m"),
                      unit_price in arb_money(), amount in arb_money(), discount in arb_money(),
                      cost in proptest::option::of(arb_money()), voided in any::<bool>()) -> Line {
            Line { sku, gtin, description, category, quantity, unit, unit_price, amount, discount, cost, voided }
        }
    }

    prop_compose! {
        fn arb_transaction()(sequence in proptest::option::of(any::<u64>()), day in 0i32..3650, start in 0i64..86_400,
                             len in 0i64..3_600, kind in prop_oneof![Just(TransactionKind::Sale), Just(TransactionKind::Return), Just(TransactionKind::Void)],
                             loyalty_id in proptest::option::of("[0-9]{6,16}"),
                             lines in proptest::collection::vec(arb_line(), 0..6),
                             tenders in proptest::collection::vec(("cash|card|voucher", arb_money()), 0..3),
                             total in arb_money(), lane in proptest::option::of("[0-9]{1,2}"),
                             format in prop_oneof![Just(SourceFormat::Jsonl), Just(SourceFormat::Poslog), Just(SourceFormat::Receipt)],
                             test in any::<bool>()) -> Transaction {
            let business_day = Date::constant(2020, 1, 1).checked_add(jiff::Span::new().days(day)).unwrap();
            let started_at = Timestamp::from_second(1_577_836_800 + day as i64 * 86_400 + start).unwrap();
            let ended_at = Timestamp::from_second(started_at.as_second() + len).unwrap();
            let mut t = Transaction {
                id: String::new(),
                store: "s042".into(), register: "lane-3".into(), lane, sequence, business_day,
                started_at, ended_at, kind, currency: "EUR".into(), loyalty_id, lines,
                tenders: tenders.into_iter().map(|(kind, amount)| Tender { kind: kind.to_string(), amount }).collect(),
                total, source_format: format, test,
            };
            t.id = t.derive_id();
            t
        }
    }

    proptest! {
        #[test]
        fn json_round_trip_is_lossless(t in arb_transaction()) {
            let json = serde_json::to_string(&t).unwrap();
            let back: Transaction = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &t);
            prop_assert!(back.validate().is_ok());
            // Quantities never travel as JSON numbers.
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            for line in value["lines"].as_array().unwrap() {
                prop_assert!(line["quantity"].is_string());
            }
        }
    }
}
