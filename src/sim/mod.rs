//! The store simulator: realistic transactions, phones and card scans, sent through the
//! agent's real interfaces. `storelink sim` ([`drive`]) drives a running agent and checks what
//! reaches central ([`central`]); the demo, the tests and the benchmarks use the same parts.
//!
//! Baskets come from a small German supermarket catalogue with weighed produce, loyalty and
//! anonymous customers, line discounts and the occasional return. Every transaction is
//! internally consistent: lines add up to the total, tenders pay it.

use std::net::SocketAddr;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub mod central;
pub mod drive;
pub mod https;
pub mod serial;

use crate::model::transaction::{
    Line, Money, Quantity, SourceFormat, Tender, Transaction, TransactionKind, transaction_id,
};

/// Why the simulator could not run or finish; shared by the driver, central's subscriber and
/// central's HTTPS intake, so none of them imports another for it.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach the agent at {url}: {detail}")]
    Agent { url: String, detail: String },
}

/// Minor units as a decimal amount for people to read (`-1250` is `-12.50`).
pub fn format_money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", minor.abs() / 100, minor.abs() % 100)
}

/// One catalogue item.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub sku: &'static str,
    pub gtin: &'static str,
    pub description: &'static str,
    pub category: &'static str,
    /// Per piece, or per kg for weighed items.
    pub price: Money,
    pub cost: Money,
    pub weighed: bool,
}

const fn p(
    sku: &'static str,
    gtin: &'static str,
    description: &'static str,
    category: &'static str,
    price: Money,
    cost: Money,
    weighed: bool,
) -> Product {
    Product {
        sku,
        gtin,
        description,
        category,
        price,
        cost,
        weighed,
    }
}

pub const CATALOGUE: &[Product] = &[
    p(
        "100201",
        "4000417025005",
        "Bio Vollmilch 3,8% 1L",
        "dairy",
        149,
        98,
        false,
    ),
    p(
        "100214",
        "4008452011004",
        "Joghurt Natur 500g",
        "dairy",
        89,
        51,
        false,
    ),
    p(
        "100377",
        "4002468123456",
        "Gouda jung Scheiben 400g",
        "dairy",
        329,
        210,
        false,
    ),
    p(
        "200110",
        "2000000001101",
        "Äpfel Elstar lose",
        "produce",
        299,
        160,
        true,
    ),
    p(
        "200125",
        "2000000001255",
        "Bananen lose",
        "produce",
        199,
        110,
        true,
    ),
    p(
        "200190",
        "2000000001903",
        "Tomaten Rispe lose",
        "produce",
        399,
        230,
        true,
    ),
    p(
        "300501",
        "4009233003440",
        "Roggenbrot 750g",
        "bakery",
        279,
        140,
        false,
    ),
    p(
        "300512",
        "4009233004119",
        "Laugenbrezel",
        "bakery",
        69,
        22,
        false,
    ),
    p(
        "400880",
        "4006040001234",
        "Kaffee Crema Bohnen 1kg",
        "coffee",
        1499,
        980,
        false,
    ),
    p(
        "400891",
        "4006040005678",
        "Espresso gemahlen 250g",
        "coffee",
        499,
        310,
        false,
    ),
    p(
        "500300",
        "5449000000996",
        "Mineralwasser 6x1,5L",
        "drinks",
        329,
        180,
        false,
    ),
    p(
        "500330",
        "4014400900059",
        "Apfelschorle 1L",
        "drinks",
        119,
        60,
        false,
    ),
    p(
        "600710",
        "4005900123456",
        "Duschgel Sensitive 250ml",
        "drugstore",
        195,
        95,
        false,
    ),
    p(
        "700020",
        "0711719541028",
        "PlayStation 5 Slim",
        "consoles",
        44999,
        39500,
        false,
    ),
    p(
        "700041",
        "0711719577201",
        "EA Sports FC 26 (PS5)",
        "games",
        6999,
        4900,
        false,
    ),
    p(
        "700055",
        "0711719599999",
        "DualSense Controller",
        "accessories",
        6999,
        5100,
        false,
    ),
];

/// Loyalty customers of the demo store.
pub const LOYALTY_IDS: &[&str] = &[
    "4711000001",
    "4711000002",
    "4711000003",
    "4711000004",
    "4711000005",
    "4711000006",
    "4711000007",
    "4711000008",
];

/// Generates one register's transactions.
#[derive(Debug)]
pub struct SimRegister {
    pub store: String,
    pub register: String,
    pub lane: Option<String>,
    pub currency: String,
    pub tz: TimeZone,
    /// Share of transactions with a loyalty card, 0..=1.
    pub loyalty_share: f64,
    /// Share of transactions that are returns, 0..=1.
    pub return_share: f64,
    seq: u64,
    rng: StdRng,
}

impl SimRegister {
    pub fn new(store: &str, register: &str, lane: Option<&str>, seed: u64) -> Self {
        Self {
            store: store.into(),
            register: register.into(),
            lane: lane.map(Into::into),
            currency: "EUR".into(),
            tz: TimeZone::UTC,
            loyalty_share: 0.4,
            return_share: 0.05,
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Sequence numbers continue from `seq` (for a register that restarts mid-day).
    pub fn with_sequence(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }

    pub fn next(&mut self, ended_at: Timestamp) -> Transaction {
        self.seq += 1;
        let business_day = ended_at.to_zoned(self.tz.clone()).date();
        let kind = if self.rng.random_bool(self.return_share) {
            TransactionKind::Return
        } else {
            TransactionKind::Sale
        };
        let loyalty_id = self
            .rng
            .random_bool(self.loyalty_share)
            .then(|| LOYALTY_IDS[self.rng.random_range(0..LOYALTY_IDS.len())].to_string());
        let count = match kind {
            TransactionKind::Return => 1,
            _ => self.rng.random_range(1..=8),
        };
        let mut lines = Vec::with_capacity(count);
        for _ in 0..count {
            // Consoles are rare; everyday goods common.
            let product = loop {
                let candidate = CATALOGUE[self.rng.random_range(0..CATALOGUE.len())];
                if candidate.price < 10_000 || self.rng.random_bool(0.1) {
                    break candidate;
                }
            };
            lines.push(self.line(&product));
        }
        let total: Money = lines.iter().map(Line::net).sum();
        let tenders = if kind == TransactionKind::Sale && total > 2000 && self.rng.random_bool(0.2)
        {
            let voucher = 1000;
            vec![
                Tender {
                    kind: "voucher".into(),
                    amount: voucher,
                },
                Tender {
                    kind: "card".into(),
                    amount: total - voucher,
                },
            ]
        } else {
            let kind = if self.rng.random_bool(0.6) {
                "card"
            } else {
                "cash"
            };
            vec![Tender {
                kind: kind.into(),
                amount: total,
            }]
        };
        let duration = self.rng.random_range(20..240);
        Transaction {
            id: transaction_id(&self.store, &self.register, business_day, self.seq),
            store: self.store.clone(),
            register: self.register.clone(),
            lane: self.lane.clone(),
            sequence: Some(self.seq),
            business_day,
            started_at: ended_at - jiff::SignedDuration::from_secs(duration),
            ended_at,
            kind,
            currency: self.currency.clone(),
            loyalty_id,
            lines,
            tenders,
            total,
            source_format: SourceFormat::Jsonl,
            test: false,
        }
    }

    /// A sale by `loyalty_id` with one product of `category` (when the catalogue has one)
    /// and up to three other lines: a customer buying what they were offered.
    pub fn purchase(
        &mut self,
        ended_at: Timestamp,
        loyalty_id: &str,
        category: Option<&str>,
    ) -> Transaction {
        let mut tx = self.next(ended_at);
        tx.kind = TransactionKind::Sale;
        tx.loyalty_id = Some(loyalty_id.to_string());
        tx.lines.truncate(3);
        if let Some(product) = category.and_then(|c| CATALOGUE.iter().find(|p| p.category == c)) {
            let line = self.line(product);
            tx.lines.push(line);
        }
        tx.total = tx.lines.iter().map(Line::net).sum();
        tx.tenders = vec![Tender {
            kind: "card".into(),
            amount: tx.total,
        }];
        tx
    }

    fn line(&mut self, product: &Product) -> Line {
        let (quantity, unit) = if product.weighed {
            let grams = self.rng.random_range(180..=2400);
            (Quantity(Decimal::new(grams, 3)), Some("kg".to_string()))
        } else {
            (Quantity(Decimal::from(self.rng.random_range(1..=3))), None)
        };
        let amount = round_money(quantity.0 * Decimal::from(product.price));
        let cost = round_money(quantity.0 * Decimal::from(product.cost));
        let discount = if self.rng.random_bool(0.1) {
            amount / 5
        } else {
            0
        };
        Line {
            sku: product.sku.into(),
            gtin: Some(product.gtin.into()),
            description: product.description.into(),
            category: Some(product.category.into()),
            quantity,
            unit,
            unit_price: product.price,
            amount,
            discount,
            cost: Some(cost),
            voided: false,
        }
    }
}

/// Rounds half away from zero to whole minor units, as registers do.
fn round_money(d: Decimal) -> Money {
    use rust_decimal::prelude::ToPrimitive;
    d.round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
        .to_i64()
        .unwrap_or(0)
}

/// A register connection speaking the `jsonl` protocol: one transaction per line, one reply
/// line each.
#[derive(Debug)]
pub struct JsonlClient {
    replies: JsonlReplies,
    sender: JsonlSender,
}

/// The sending half of a [`JsonlClient`], for a register that pipelines.
#[derive(Debug)]
pub struct JsonlSender(tokio::net::tcp::OwnedWriteHalf);

/// The reply half of a [`JsonlClient`]: replies come in the order the lines were sent.
#[derive(Debug)]
pub struct JsonlReplies(BufReader<tokio::net::tcp::OwnedReadHalf>);

impl JsonlSender {
    /// Sends raw bytes as they are (for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes).await
    }

    pub async fn send(&mut self, tx: &Transaction) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(tx).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.0.write_all(&line).await
    }
}

impl JsonlReplies {
    /// Reads one reply line (`ok <id>` or `err <reason>`).
    pub async fn reply(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.0.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "agent closed the connection",
            ));
        }
        Ok(line.trim_end().to_string())
    }
}

impl JsonlClient {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(Self {
            replies: JsonlReplies(BufReader::new(r)),
            sender: JsonlSender(w),
        })
    }

    /// Connects, retrying for up to `patience` while the agent starts.
    pub async fn connect_patiently(addr: SocketAddr, patience: Duration) -> std::io::Result<Self> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match Self::connect(addr).await {
                Ok(c) => return Ok(c),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Sends raw bytes as they are (for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sender.send_raw(bytes).await
    }

    pub async fn send(&mut self, tx: &Transaction) -> std::io::Result<()> {
        self.sender.send(tx).await
    }

    /// Reads one reply line (`ok <id>` or `err <reason>`).
    pub async fn reply(&mut self) -> std::io::Result<String> {
        self.replies.reply().await
    }

    /// Sends one transaction and waits for its reply.
    pub async fn submit(&mut self, tx: &Transaction) -> std::io::Result<String> {
        self.send(tx).await?;
        self.reply().await
    }

    /// The two halves, for sending ahead of the replies.
    pub fn split(self) -> (JsonlSender, JsonlReplies) {
        (self.sender, self.replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_transactions_are_consistent_and_valid() {
        let mut reg = SimRegister::new("s042", "lane-1", Some("1"), 7);
        let start: Timestamp = "2026-11-22T09:00:00Z".parse().unwrap();
        let mut kinds = std::collections::HashSet::new();
        let mut loyalty = 0;
        for i in 0..500 {
            let t = reg.next(start + jiff::SignedDuration::from_secs(i * 60));
            t.validate().unwrap();
            assert_eq!(t.lines_total(), t.total);
            assert_eq!(t.tenders.iter().map(|x| x.amount).sum::<Money>(), t.total);
            assert_eq!(t.sequence, Some(i as u64 + 1));
            kinds.insert(t.kind);
            loyalty += t.loyalty_id.is_some() as u32;
        }
        assert!(kinds.contains(&TransactionKind::Return));
        assert!((100..300).contains(&loyalty), "{loyalty}");
    }

    #[test]
    fn money_rounds_half_away_from_zero() {
        assert_eq!(round_money(Decimal::new(1005, 1)), 101);
        assert_eq!(round_money(Decimal::new(-1005, 1)), -101);
        // 0.532 kg at 2.99 €/kg = 159.068 cents
        assert_eq!(round_money(Decimal::new(532, 3) * Decimal::from(299)), 159);
    }
}

#[cfg(test)]
mod poslog_tests {
    use super::*;
    use crate::pos::poslog::{self, writer};

    #[test]
    fn simulated_transactions_written_as_poslog_read_back_the_same() {
        let mut reg = SimRegister::new("s042", "lane-2", Some("2"), 11);
        let start: Timestamp = "2026-11-23T09:00:00Z".parse().unwrap();
        for i in 0..300 {
            let mut tx = reg.next(start + jiff::SignedDuration::from_secs(i * 45));
            tx.test = i % 7 == 0;
            let xml = writer::write(&writer::Document::plain(tx.clone()));
            let mut back = poslog::parse(xml.as_bytes(), &TimeZone::UTC, "EUR").unwrap();
            assert_eq!(back.len(), 1);
            let mut back = back.remove(0).unwrap();
            back.id = tx.id.clone();
            back.store = tx.store.clone();
            back.lane = tx.lane.clone();
            tx.source_format = SourceFormat::Poslog;
            // POSLog carries no unit cost: margins need a jsonl register or central's catalogue.
            for line in &mut tx.lines {
                line.cost = None;
            }
            assert_eq!(back, tx, "{xml}");
        }
    }
}
