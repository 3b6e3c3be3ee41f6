//! ARTS/NRF POSLog XML: the standard transaction log of retail registers, read into canonical
//! [`Transaction`]s.
//!
//! The document is read as a stream of XML events (quick-xml), never as a tree, so memory stays
//! proportional to one transaction rather than to the document. Elements are matched by local
//! name only: un-namespaced documents, the NRF default namespace and any prefix (`nrf:`,
//! `poslog:`) read the same. Structural elements count only in their place (a `LineItem` is one
//! only directly inside `Transaction/RetailTransaction`); anything unknown is skipped.
//!
//! Invariants:
//! - The outer error is for a document that cannot be read at all: malformed XML, a root that
//!   is neither `POSLog` nor `Transaction`, a document that is not UTF-8. An inner error is for
//!   one transaction; the others in the document still come through. Transactions that are not
//!   retail sales (`ControlTransaction` such as sign-on, `TenderControlTransaction`, anything
//!   without a `RetailTransaction`) yield nothing at all.
//! - Money is exact: amounts are read as decimals and become minor units only if they fit the
//!   currency (2 decimals by default, 0 for JPY and friends, 3 for KWD and friends; trailing
//!   zeros do not count, so `1.500` is fine in EUR). The one exception is the unit price
//!   (`RegularSalesUnitPrice`, or `ActualSalesUnitPrice` without it), which registers often
//!   carry at sub-cent precision; it is rounded half away from zero. Amounts the register did
//!   not send but that can be derived (a line amount from unit price times quantity) are
//!   computed from the exact unit price and rounded the same way.
//! - Error messages name the transaction (its position among the document's `Transaction`
//!   elements), the element path and the byte offset, never the element's text: a loyalty id
//!   may be in it.
//!
//! Mapping decisions that are not obvious from the element names:
//! - Store is left empty (the agent's config says which store it is); `RetailStoreID` is
//!   ignored. A missing `CurrencyCode` means the store's currency, which also decides how
//!   many decimals amounts may have.
//! - Kind and signs: a transaction flagged void or cancelled (`TransactionStatus` Voided,
//!   PostVoided, Canceled; `CancelFlag`/`VoidFlag`), or left suspended (Suspended,
//!   SuspendedDeleted: the sale is completed, and counted, in the transaction that retrieves
//!   it), is a void. Otherwise, when every item line is a `Return` it is a return, and
//!   quantities, amounts, discounts, tenders and the total are the positive values refunded.
//!   When sales and returns are mixed (an exchange) it is a sale and each return line carries
//!   negative quantity, amount and discount, so that [`Line::net`] is the line's signed
//!   contribution. Voided lines do not decide the kind unless every item line is voided.
//!   Return lines are read as magnitudes whatever sign the register wrote.
//! - A tender's amount is its `Amount` less any `TenderChange`; a `TypeCode` of Refund makes it
//!   negative in a sale (money handed back in an exchange).
//! - The line discount is the sum of the line's `RetailPriceModifier` amounts (Action Subtract,
//!   or no Action; Add counts negative; Replace is a price override already in
//!   `ExtendedAmount`), or `DiscountAmount` when there are no modifiers. `ExtendedAmount` is
//!   read as the amount before discounts. `ExtendedDiscountAmount` is ignored: vendors disagree
//!   on whether it is the discount or the discounted amount.
//! - Without a `TransactionGrandAmount` total, the total is the counted lines' net amounts less
//!   transaction-level `Discount` line items. Add-on sales tax is not in that figure; a register
//!   that adds tax on top of prices must send the grand total.
//! - `TrainingModeFlag` marks the transaction as a test, which keeps it out of reporting.
//! - Without `BusinessDayDate`, the business day is the calendar day the transaction began in
//!   the store's time zone. Without `BeginDateTime` or `EndDateTime`, the other one (or
//!   `ReceiptDateTime`) stands in.

use std::borrow::Cow;

use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use quick_xml::XmlVersion;
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::reader::Reader;
use rust_decimal::{Decimal, RoundingStrategy};

use super::ParseError;
use crate::model::transaction::{
    Line, MAX_MONEY, Money, Quantity, SourceFormat, Tender, Transaction, TransactionKind,
};

/// Parses one POSLog document into its transactions. The outer error is for a document that
/// cannot be read at all; an inner error is for one transaction in an otherwise good document.
/// Date-times without a UTC offset are read in `tz`, the store's time zone.
pub fn parse(
    doc: &[u8],
    tz: &TimeZone,
    currency: &str,
) -> Result<Vec<Result<Transaction, ParseError>>, ParseError> {
    if doc.starts_with(&[0xFF, 0xFE]) || doc.starts_with(&[0xFE, 0xFF]) {
        return Err(ParseError(
            "not UTF-8: the document is UTF-16; the register must send UTF-8".into(),
        ));
    }
    // quick-xml reports positions from where it started reading; the BOM is counted back in so
    // that byte offsets in errors match the bytes the register sent.
    let (body, base) = match doc.strip_prefix(b"\xEF\xBB\xBF") {
        Some(rest) => (rest, 3),
        None => (doc, 0),
    };
    let mut reader = Reader::from_reader(body);
    let mut walker = Walker::new(tz, currency);
    loop {
        let at = base + reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| malformed(base + reader.error_position(), &describe(&e)))?;
        match event {
            Event::Start(e) => walker.open(&e, at)?,
            Event::Empty(e) => {
                walker.open(&e, at)?;
                walker.close(at)?;
            }
            Event::End(_) => walker.close(at)?,
            Event::Text(t) => walker.text(&t.xml10_content(), at)?,
            Event::CData(c) => walker.text(&c.xml10_content(), at)?,
            Event::GeneralRef(r) => {
                let c = resolve_reference(&r).ok_or_else(|| {
                    malformed(at, "unknown entity or invalid character reference")
                })?;
                walker.text(c.encode_utf8(&mut [0; 4]), at)?;
            }
            Event::Decl(d) => {
                // Without a transcoder, only UTF-8 (and ASCII, which any of the usual
                // single-byte encodings is identical to) can be read correctly.
                if let Some(Ok(encoding)) = d.encoding()
                    && !matches!(
                        encoding.to_ascii_lowercase().as_str(),
                        "utf-8" | "utf8" | "us-ascii" | "ascii"
                    )
                    && !body.is_ascii()
                {
                    return Err(ParseError(
                        "not UTF-8: the document declares another encoding and is not plain \
                         ASCII; the register must send UTF-8"
                            .into(),
                    ));
                }
            }
            Event::Eof => return walker.finish(base + body.len() as u64),
            Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
}

fn malformed(at: u64, what: &str) -> ParseError {
    ParseError(format!("malformed XML at byte {at}: {what}"))
}

/// quick-xml's own messages, minus anything taken from the document's text.
fn describe(e: &quick_xml::Error) -> String {
    use quick_xml::Error as E;
    use quick_xml::errors::IllFormedError as I;
    match e {
        E::Syntax(s) => s.to_string(),
        E::IllFormed(I::MismatchedEndTag { expected, found }) => format!(
            "end tag </{}> does not close <{}>",
            short(found),
            short(expected)
        ),
        E::IllFormed(I::UnmatchedEndTag(tag)) => {
            format!("end tag </{}> without a start tag", short(tag))
        }
        E::IllFormed(I::MissingEndTag(tag)) => {
            format!("<{}> is not closed before the end", short(tag))
        }
        E::IllFormed(other) => other.to_string(),
        E::Encoding(_) => "not UTF-8".into(),
        E::Escape(_) => "unknown entity or invalid character reference".into(),
        E::InvalidAttr(_) => "malformed attribute".into(),
        E::Namespace(_) => "invalid namespace declaration".into(),
        E::Io(_) => "read error".into(),
    }
}

/// Element names are markup, not data, but a hostile document can make them arbitrarily long.
fn short(name: &str) -> Cow<'_, str> {
    const MAX: usize = 40;
    match name.char_indices().nth(MAX) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &name[..cut])),
        None => Cow::Borrowed(name),
    }
}

/// The five predefined entities and character references; a document cannot define more
/// without a DTD, which is not read.
fn resolve_reference(r: &BytesRef<'_>) -> Option<char> {
    if r.is_char_ref() {
        return r.resolve_char_ref().ok().flatten();
    }
    match &**r {
        "lt" => Some('<'),
        "gt" => Some('>'),
        "amp" => Some('&'),
        "apos" => Some('\''),
        "quot" => Some('"'),
        _ => None,
    }
}

/// The elements the mapping looks at; everything else is [`Tag::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    PosLog,
    Transaction,
    RetailTransaction,
    LineItem,
    Sale,
    Return,
    Tender,
    TenderChange,
    Amount,
    RetailPriceModifier,
    Discount,
    Total,
    ItemId,
    PosIdentity,
    PosItemId,
    Description,
    MerchandiseHierarchy,
    Quantity,
    RegularSalesUnitPrice,
    ActualSalesUnitPrice,
    ExtendedAmount,
    DiscountAmount,
    SequenceNumber,
    WorkstationId,
    BusinessDayDate,
    BeginDateTime,
    EndDateTime,
    ReceiptDateTime,
    CurrencyCode,
    TransactionStatus,
    CancelFlag,
    VoidFlag,
    TrainingModeFlag,
    LoyaltyAccount,
    LoyaltyAccountId,
    CustomerAccount,
    CustomerAccountId,
    Customer,
    CustomerId,
    TenderType,
    TypeCode,
    Other,
}

impl Tag {
    fn of(local_name: &str) -> Tag {
        match local_name {
            "POSLog" => Tag::PosLog,
            "Transaction" => Tag::Transaction,
            "RetailTransaction" => Tag::RetailTransaction,
            "LineItem" => Tag::LineItem,
            "Sale" => Tag::Sale,
            "Return" => Tag::Return,
            "Tender" => Tag::Tender,
            "TenderChange" => Tag::TenderChange,
            "Amount" => Tag::Amount,
            "RetailPriceModifier" => Tag::RetailPriceModifier,
            "Discount" => Tag::Discount,
            "Total" => Tag::Total,
            "ItemID" => Tag::ItemId,
            "POSIdentity" => Tag::PosIdentity,
            "POSItemID" => Tag::PosItemId,
            "Description" => Tag::Description,
            "MerchandiseHierarchy" => Tag::MerchandiseHierarchy,
            "Quantity" => Tag::Quantity,
            "RegularSalesUnitPrice" => Tag::RegularSalesUnitPrice,
            "ActualSalesUnitPrice" => Tag::ActualSalesUnitPrice,
            "ExtendedAmount" => Tag::ExtendedAmount,
            "DiscountAmount" => Tag::DiscountAmount,
            "SequenceNumber" => Tag::SequenceNumber,
            "WorkstationID" => Tag::WorkstationId,
            "BusinessDayDate" => Tag::BusinessDayDate,
            "BeginDateTime" => Tag::BeginDateTime,
            "EndDateTime" => Tag::EndDateTime,
            "ReceiptDateTime" => Tag::ReceiptDateTime,
            "CurrencyCode" => Tag::CurrencyCode,
            "TransactionStatus" => Tag::TransactionStatus,
            "CancelFlag" => Tag::CancelFlag,
            "VoidFlag" => Tag::VoidFlag,
            "TrainingModeFlag" => Tag::TrainingModeFlag,
            "LoyaltyAccount" => Tag::LoyaltyAccount,
            "LoyaltyAccountID" => Tag::LoyaltyAccountId,
            "CustomerAccount" => Tag::CustomerAccount,
            "CustomerAccountID" => Tag::CustomerAccountId,
            "Customer" => Tag::Customer,
            "CustomerID" => Tag::CustomerId,
            "TenderType" => Tag::TenderType,
            "TypeCode" => Tag::TypeCode,
            _ => Tag::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Tag::PosLog => "POSLog",
            Tag::Transaction => "Transaction",
            Tag::RetailTransaction => "RetailTransaction",
            Tag::LineItem => "LineItem",
            Tag::Sale => "Sale",
            Tag::Return => "Return",
            Tag::Tender => "Tender",
            Tag::TenderChange => "TenderChange",
            Tag::Amount => "Amount",
            Tag::RetailPriceModifier => "RetailPriceModifier",
            Tag::Discount => "Discount",
            Tag::Total => "Total",
            Tag::ItemId => "ItemID",
            Tag::PosIdentity => "POSIdentity",
            Tag::PosItemId => "POSItemID",
            Tag::Description => "Description",
            Tag::MerchandiseHierarchy => "MerchandiseHierarchy",
            Tag::Quantity => "Quantity",
            Tag::RegularSalesUnitPrice => "RegularSalesUnitPrice",
            Tag::ActualSalesUnitPrice => "ActualSalesUnitPrice",
            Tag::ExtendedAmount => "ExtendedAmount",
            Tag::DiscountAmount => "DiscountAmount",
            Tag::SequenceNumber => "SequenceNumber",
            Tag::WorkstationId => "WorkstationID",
            Tag::BusinessDayDate => "BusinessDayDate",
            Tag::BeginDateTime => "BeginDateTime",
            Tag::EndDateTime => "EndDateTime",
            Tag::ReceiptDateTime => "ReceiptDateTime",
            Tag::CurrencyCode => "CurrencyCode",
            Tag::TransactionStatus => "TransactionStatus",
            Tag::CancelFlag => "CancelFlag",
            Tag::VoidFlag => "VoidFlag",
            Tag::TrainingModeFlag => "TrainingModeFlag",
            Tag::LoyaltyAccount => "LoyaltyAccount",
            Tag::LoyaltyAccountId => "LoyaltyAccountID",
            Tag::CustomerAccount => "CustomerAccount",
            Tag::CustomerAccountId => "CustomerAccountID",
            Tag::Customer => "Customer",
            Tag::CustomerId => "CustomerID",
            Tag::TenderType => "TenderType",
            Tag::TypeCode => "TypeCode",
            Tag::Other => "*",
        }
    }

    /// Structural elements count only where the standard puts them, so that a `LineItem` in a
    /// vendor extension cannot be mistaken for a receipt line.
    fn placed(self, parent: Option<Tag>) -> Tag {
        use Tag::*;
        match (self, parent) {
            (RetailTransaction, Some(Transaction))
            | (LineItem, Some(RetailTransaction))
            | (Sale | Return | Tender | Discount, Some(LineItem))
            | (RetailPriceModifier | PosIdentity, Some(Sale | Return))
            | (TenderChange, Some(Tender)) => self,
            (
                PosLog | Transaction | RetailTransaction | LineItem | Sale | Return | Tender
                | Discount | RetailPriceModifier | PosIdentity | TenderChange,
                _,
            ) => Other,
            _ => self,
        }
    }

    /// Elements whose text the mapping reads.
    fn has_text(self) -> bool {
        use Tag::*;
        !matches!(
            self,
            PosLog
                | Transaction
                | RetailTransaction
                | LineItem
                | Sale
                | Return
                | Tender
                | RetailPriceModifier
                | Discount
                | PosIdentity
                | LoyaltyAccount
                | CustomerAccount
                | Customer
                | Other
        )
    }
}

/// The attributes the mapping reads, whatever element they are on. Prefixed attributes are
/// vendor extensions (or `xsi:type`) and are not read.
#[derive(Debug, Default)]
struct Attrs {
    currency_code: Option<String>,
    cancel_flag: Option<String>,
    void_flag: Option<String>,
    training_mode_flag: Option<String>,
    transaction_status: Option<String>,
    tender_type: Option<String>,
    type_code: Option<String>,
    type_: Option<String>,
    unit_of_measure_code: Option<String>,
    pos_id_type: Option<String>,
    total_type: Option<String>,
    action: Option<String>,
}

impl Attrs {
    /// Reads (and so checks) every attribute of the element.
    fn read(e: &BytesStart<'_>, at: u64) -> Result<Attrs, ParseError> {
        let mut attrs = Attrs::default();
        for attr in e.attributes() {
            let attr = attr.map_err(|_| malformed(at, "malformed attribute"))?;
            let value = attr
                .normalized_value(XmlVersion::Implicit1_0)
                .map_err(|_| malformed(at, "unknown entity or invalid character reference"))?;
            if attr.key.prefix().is_some() {
                continue;
            }
            let slot = match attr.key.local_name().as_ref() {
                "CurrencyCode" => &mut attrs.currency_code,
                "CancelFlag" => &mut attrs.cancel_flag,
                "VoidFlag" => &mut attrs.void_flag,
                "TrainingModeFlag" => &mut attrs.training_mode_flag,
                "TransactionStatus" => &mut attrs.transaction_status,
                "TenderType" => &mut attrs.tender_type,
                "TypeCode" => &mut attrs.type_code,
                "Type" | "type" => &mut attrs.type_,
                "UnitOfMeasureCode" => &mut attrs.unit_of_measure_code,
                "POSIDType" => &mut attrs.pos_id_type,
                "TotalType" => &mut attrs.total_type,
                "Action" => &mut attrs.action,
                _ => continue,
            };
            *slot = Some(value.into_owned());
        }
        Ok(attrs)
    }
}

/// One open element.
#[derive(Debug)]
struct Open {
    tag: Tag,
    at: u64,
    /// Text of an element the mapping reads, inside a transaction; `None` otherwise.
    text: Option<String>,
    /// The one attribute the element's mapping needs once it closes (a `Quantity`'s unit, a
    /// `Total`'s type).
    attr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    None,
    Open,
    Closed,
}

struct Walker<'t> {
    tz: &'t TimeZone,
    /// The store's currency, for documents that name none: it decides the decimal places.
    currency: &'t str,
    stack: Vec<Open>,
    /// The tags of `stack`, for matching element paths with slice patterns.
    tags: Vec<Tag>,
    root: Root,
    root_currency: Option<String>,
    /// `Transaction` elements seen so far, retail or not: the number in error messages.
    seen: usize,
    tx: Option<Draft>,
    out: Vec<Result<Transaction, ParseError>>,
}

impl<'t> Walker<'t> {
    fn new(tz: &'t TimeZone, currency: &'t str) -> Self {
        Walker {
            tz,
            currency,
            stack: Vec::new(),
            tags: Vec::new(),
            root: Root::None,
            root_currency: None,
            seen: 0,
            tx: None,
            out: Vec::new(),
        }
    }

    fn open(&mut self, e: &BytesStart<'_>, at: u64) -> Result<(), ParseError> {
        let attrs = Attrs::read(e, at)?;
        let name = Tag::of(e.local_name().as_ref());
        let parent = self.tags.last().copied();
        let tag = if self.stack.is_empty() {
            match (self.root, name) {
                (Root::None, Tag::PosLog) => {
                    self.root = Root::Open;
                    self.root_currency = attrs.currency_code.clone();
                    Tag::PosLog
                }
                (Root::None, Tag::Transaction) => {
                    self.root = Root::Open;
                    self.begin_transaction(at);
                    Tag::Transaction
                }
                (Root::None, _) => {
                    return Err(ParseError(format!(
                        "not a POSLog document: the root element at byte {at} is <{}>, \
                         expected POSLog or Transaction",
                        short(e.name().as_ref())
                    )));
                }
                _ => return Err(malformed(at, "a second root element")),
            }
        } else if name == Tag::Transaction && self.tx.is_none() {
            // Transactions may sit in vendor wrappers below the POSLog root.
            self.begin_transaction(at);
            Tag::Transaction
        } else {
            name.placed(parent)
        };
        let mut attr = None;
        if let Some(tx) = &mut self.tx {
            attr = tx.open(tag, &self.tags, &attrs, at);
        }
        let text = (self.tx.is_some() && tag.has_text()).then(String::new);
        self.stack.push(Open {
            tag,
            at,
            text,
            attr,
        });
        self.tags.push(tag);
        Ok(())
    }

    fn begin_transaction(&mut self, at: u64) {
        self.seen += 1;
        self.tx = Some(Draft::new(self.seen, at, self.stack.len()));
    }

    fn close(&mut self, at: u64) -> Result<(), ParseError> {
        if let Some(tx) = &mut self.tx {
            if self.stack.len() == tx.depth + 1 {
                if let Some(tx) = self.tx.take()
                    && let Some(result) =
                        tx.finish(self.root_currency.as_deref(), self.currency, self.tz)
                {
                    self.out.push(result);
                }
            } else if let Some(open) = self.stack.last() {
                tx.close(open, &self.tags, self.tz);
            }
        }
        if self.stack.pop().is_none() {
            return Err(malformed(at, "an end tag without a start tag"));
        }
        self.tags.pop();
        if self.stack.is_empty() {
            self.root = Root::Closed;
        }
        Ok(())
    }

    fn text(&mut self, text: &str, at: u64) -> Result<(), ParseError> {
        match self.stack.last_mut() {
            Some(open) => {
                if let Some(buf) = &mut open.text {
                    buf.push_str(text);
                }
                Ok(())
            }
            None if text.trim_matches(is_xml_space).is_empty() => Ok(()),
            None => Err(malformed(at, "text outside the root element")),
        }
    }

    fn finish(self, end: u64) -> Result<Vec<Result<Transaction, ParseError>>, ParseError> {
        match (self.root, self.stack.last()) {
            (Root::None, _) => Err(ParseError(
                "not a POSLog document: there is no root element".into(),
            )),
            (_, Some(open)) => Err(malformed(
                end,
                &format!(
                    "the document ends inside <{}> opened at byte {}",
                    open.tag.name(),
                    open.at
                ),
            )),
            _ => Ok(self.out),
        }
    }
}

fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// A decimal from the document and where it was.
#[derive(Debug, Clone)]
struct Num {
    value: Decimal,
    at: u64,
    path: String,
}

#[derive(Debug, Default)]
struct ItemDraft {
    is_return: bool,
    at: u64,
    sku: Option<String>,
    /// `(rank, id)`: GTIN-typed identities beat untyped ones, which beat other types.
    gtin: Option<(u8, String)>,
    identity_rank: u8,
    description: Option<String>,
    category: Option<String>,
    quantity: Option<(Num, Option<String>)>,
    regular_price: Option<Num>,
    actual_price: Option<Num>,
    extended: Option<Num>,
    discount_amount: Option<Num>,
    modifiers: Vec<Modifier>,
}

#[derive(Debug, Default)]
struct Modifier {
    void: bool,
    /// `+1` takes money off, `-1` adds it, `0` does not count (a price override).
    sign: i8,
    amount: Option<Num>,
}

#[derive(Debug, Default)]
struct TenderDraft {
    at: u64,
    kind: Option<String>,
    refund: bool,
    amount: Option<Num>,
    change: Vec<Num>,
    /// A `TenderChange` had an `Amount` child, so its own text is layout.
    change_from_child: bool,
}

#[derive(Debug, Default)]
struct LineDraft {
    void: bool,
    item: Option<ItemDraft>,
    tender: Option<TenderDraft>,
    /// A transaction-level discount (`LineItem/Discount/Amount`).
    discount: Option<Num>,
}

/// One `Transaction` element while it is being read.
#[derive(Debug)]
struct Draft {
    number: usize,
    at: u64,
    /// Stack depth of the `Transaction` element.
    depth: usize,
    retail: bool,
    /// The first problem found; the rest of the transaction is still read to stay in step.
    error: Option<String>,
    register: Option<String>,
    sequence: Option<u64>,
    business_day: Option<Date>,
    begin: Option<Timestamp>,
    end: Option<Timestamp>,
    receipt: Option<Timestamp>,
    currency: Option<(String, u64)>,
    void: bool,
    training: bool,
    /// Loyalty account, customer account, customer: the first one present wins.
    loyalty: [Option<String>; 3],
    lines: Vec<LineDraft>,
    total: Option<Num>,
}

impl Draft {
    fn new(number: usize, at: u64, depth: usize) -> Self {
        Draft {
            number,
            at,
            depth,
            retail: false,
            error: None,
            register: None,
            sequence: None,
            business_day: None,
            begin: None,
            end: None,
            receipt: None,
            currency: None,
            void: false,
            training: false,
            loyalty: [None, None, None],
            lines: Vec::new(),
            total: None,
        }
    }

    fn fail(&mut self, why: String) {
        if self.error.is_none() {
            self.error = Some(why);
        }
    }

    /// `RetailTransaction/LineItem[2]/Sale/ExtendedAmount`: the path below `Transaction`.
    fn path(&self, tags: &[Tag]) -> String {
        let mut path = String::new();
        for tag in tags.iter().skip(self.depth + 1) {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(tag.name());
            if *tag == Tag::LineItem {
                path.push_str(&format!("[{}]", self.lines.len()));
            }
        }
        path
    }

    fn flag(&mut self, value: Option<&str>, what: &str, at: u64) -> bool {
        match value.map(parse_bool) {
            None => false,
            Some(Some(b)) => b,
            Some(None) => {
                self.fail(format!("{what} at byte {at} is not true or false"));
                false
            }
        }
    }

    fn status(&mut self, status: &str) {
        let status = status.trim().to_ascii_lowercase();
        if status.contains("void")
            || status.contains("cancel")
            || status == "suspended"
            || status == "suspendeddeleted"
        {
            self.void = true;
        }
    }

    /// Handles a start tag inside the transaction (`tags` are its ancestors). Returns the
    /// attribute the element needs when it closes.
    fn open(&mut self, tag: Tag, tags: &[Tag], attrs: &Attrs, at: u64) -> Option<String> {
        use Tag::*;
        match tag {
            Transaction | RetailTransaction => {
                if tag == RetailTransaction {
                    self.retail = true;
                }
                let path = if tag == Transaction {
                    "Transaction"
                } else {
                    "RetailTransaction"
                };
                let cancel = self.flag(
                    attrs.cancel_flag.as_deref(),
                    &format!("{path}/@CancelFlag"),
                    at,
                );
                let void = self.flag(attrs.void_flag.as_deref(), &format!("{path}/@VoidFlag"), at);
                self.void |= cancel || void;
                if tag == Transaction {
                    self.training |= self.flag(
                        attrs.training_mode_flag.as_deref(),
                        "Transaction/@TrainingModeFlag",
                        at,
                    );
                }
                if let Some(status) = &attrs.transaction_status {
                    self.status(status);
                }
                if let Some(code) = &attrs.currency_code {
                    self.set_currency(code, at);
                }
                None
            }
            LineItem => {
                let void = self.flag(attrs.void_flag.as_deref(), "LineItem/@VoidFlag", at);
                self.lines.push(LineDraft {
                    void,
                    ..LineDraft::default()
                });
                None
            }
            Sale | Return => {
                if let Some(line) = self.lines.last_mut()
                    && line.item.is_none()
                    && line.tender.is_none()
                {
                    line.item = Some(ItemDraft {
                        is_return: tag == Return,
                        at,
                        ..ItemDraft::default()
                    });
                }
                None
            }
            Tender => {
                if let Some(line) = self.lines.last_mut()
                    && line.item.is_none()
                    && line.tender.is_none()
                {
                    let mut tender = TenderDraft {
                        at,
                        ..TenderDraft::default()
                    };
                    tender_type(&mut tender, attrs.tender_type.as_deref());
                    tender_type(&mut tender, attrs.type_.as_deref());
                    tender_type(&mut tender, attrs.type_code.as_deref());
                    line.tender = Some(tender);
                }
                None
            }
            RetailPriceModifier => {
                let void = self.flag(
                    attrs.void_flag.as_deref(),
                    "RetailPriceModifier/@VoidFlag",
                    at,
                );
                if let Some(item) = self.item() {
                    item.modifiers.push(Modifier {
                        void,
                        sign: 1,
                        amount: None,
                    });
                }
                None
            }
            PosIdentity => {
                let rank = match attrs.pos_id_type.as_deref().map(str::trim) {
                    Some(t) if is_gtin_type(t) => 3,
                    None | Some("") => 2,
                    Some(_) => 1,
                };
                if let Some(item) = self.item() {
                    item.identity_rank = rank;
                }
                None
            }
            ItemId => {
                // An `ItemID` typed as a GTIN is one, as well as the SKU.
                attrs
                    .type_
                    .as_deref()
                    .filter(|t| is_gtin_type(t.trim()))
                    .map(|_| "gtin".to_string())
            }
            Amount => {
                if let [.., RetailPriceModifier] = tags {
                    let sign = match attrs.action.as_deref().map(str::trim) {
                        None | Some("Subtract") => 1,
                        Some("Add") => -1,
                        Some(_) => 0,
                    };
                    if let Some(m) = self.item().and_then(|i| i.modifiers.last_mut()) {
                        m.sign = sign;
                    }
                }
                None
            }
            Quantity => attrs.unit_of_measure_code.clone(),
            Total => attrs.total_type.clone(),
            _ => None,
        }
    }

    fn item(&mut self) -> Option<&mut ItemDraft> {
        self.lines.last_mut().and_then(|l| l.item.as_mut())
    }

    fn tender(&mut self) -> Option<&mut TenderDraft> {
        self.lines.last_mut().and_then(|l| l.tender.as_mut())
    }

    fn set_currency(&mut self, code: &str, at: u64) {
        if self.currency.is_none() {
            self.currency = Some((code.trim().to_ascii_uppercase(), at));
        }
    }

    /// Reads a decimal, or records why it cannot.
    fn num(&mut self, text: &str, tags: &[Tag], at: u64) -> Option<Num> {
        match parse_decimal(text) {
            Some(value) => Some(Num {
                value,
                at,
                path: self.path(tags),
            }),
            None => {
                let path = self.path(tags);
                self.fail(format!("{path} at byte {at} is not a decimal number"));
                None
            }
        }
    }

    /// Handles the end of an element inside the transaction; `tags` ends with its own tag.
    ///
    /// Long on purpose: one match arm per POSLog element a transaction can hold, so the
    /// grammar reads as one table; split up, the arms would share all of `self` anyway.
    fn close(&mut self, open: &Open, tags: &[Tag], tz: &TimeZone) {
        use Tag::*;
        let Some(raw) = &open.text else { return };
        let text = raw.trim();
        let at = open.at;
        let nonempty = || (!text.is_empty()).then(|| text.to_string());
        match tags {
            [.., Transaction, SequenceNumber] if self.sequence.is_none() => {
                match text.parse::<u64>() {
                    Ok(n) => self.sequence = Some(n),
                    Err(_) => {
                        self.fail(format!("SequenceNumber at byte {at} is not a whole number"))
                    }
                }
            }
            [.., Transaction, WorkstationId] if self.register.is_none() => {
                // The register is part of the transaction id, `store:register:day:sequence`.
                if text.len() > 64 || text.contains(':') {
                    self.fail(format!(
                        "WorkstationID at byte {at} must be at most 64 characters without ':'"
                    ));
                } else {
                    self.register = nonempty();
                }
            }
            [.., Transaction, BusinessDayDate] if self.business_day.is_none() => {
                match parse_date(text) {
                    Some(d) => self.business_day = Some(d),
                    None => self.fail(format!("BusinessDayDate at byte {at} is not a date")),
                }
            }
            [.., Transaction, BeginDateTime | EndDateTime]
            | [.., RetailTransaction, ReceiptDateTime] => {
                let Some(&tag) = tags.last() else { return };
                let taken = match tag {
                    BeginDateTime => self.begin.is_some(),
                    EndDateTime => self.end.is_some(),
                    _ => self.receipt.is_some(),
                };
                if !taken {
                    match (parse_time(text, tz), tag) {
                        (Some(t), BeginDateTime) => self.begin = Some(t),
                        (Some(t), EndDateTime) => self.end = Some(t),
                        (Some(t), _) => self.receipt = Some(t),
                        (None, _) => {
                            self.fail(format!("{} at byte {at} is not a date-time", tag.name()))
                        }
                    }
                }
            }
            [.., Transaction | RetailTransaction, CurrencyCode] => self.set_currency(text, at),
            [.., Transaction | RetailTransaction, TransactionStatus] => self.status(text),
            [.., Transaction | RetailTransaction, CancelFlag | VoidFlag] => {
                let what = self.path(tags);
                self.void |= self.flag(Some(text), &what, at);
            }
            [.., Transaction, TrainingModeFlag] => {
                self.training |= self.flag(Some(text), "TrainingModeFlag", at);
            }
            [.., LoyaltyAccount, LoyaltyAccountId] => set_first(&mut self.loyalty[0], nonempty()),
            [.., CustomerAccount, CustomerAccountId] => set_first(&mut self.loyalty[1], nonempty()),
            [.., Customer, CustomerId] => set_first(&mut self.loyalty[2], nonempty()),
            [.., RetailTransaction, Total] => {
                let grand = open.attr.as_deref().map(str::trim) == Some("TransactionGrandAmount");
                if grand && self.total.is_none() {
                    self.total = self.num(text, tags, at);
                }
            }
            [.., RetailTransaction, LineItem, VoidFlag] => {
                let void = self.flag(Some(text), "LineItem/VoidFlag", at);
                if let Some(line) = self.lines.last_mut() {
                    line.void |= void;
                }
            }
            [.., Sale | Return, ItemId] => {
                let gtin = open.attr.is_some();
                if let Some(item) = self.item() {
                    if item.sku.is_none() {
                        item.sku = nonempty();
                    }
                    if gtin
                        && let Some(id) = nonempty()
                        && item.gtin.as_ref().is_none_or(|(rank, _)| *rank < 3)
                    {
                        item.gtin = Some((3, id));
                    }
                }
            }
            [.., Sale | Return, PosIdentity, PosItemId] => {
                if let Some(item) = self.item()
                    && let Some(id) = nonempty()
                    && item
                        .gtin
                        .as_ref()
                        .is_none_or(|(rank, _)| *rank < item.identity_rank)
                {
                    item.gtin = Some((item.identity_rank, id));
                }
            }
            [.., Sale | Return, Description] => {
                if let Some(item) = self.item() {
                    set_first(&mut item.description, nonempty());
                }
            }
            [.., Sale | Return, MerchandiseHierarchy] => {
                if let Some(item) = self.item() {
                    set_first(&mut item.category, nonempty());
                }
            }
            [.., Sale | Return, Quantity] if self.item().is_some_and(|i| i.quantity.is_none()) => {
                let num = self.num(text, tags, at);
                let unit = open.attr.clone();
                if let (Some(item), Some(num)) = (self.item(), num) {
                    item.quantity = Some((num, unit));
                }
            }
            [
                ..,
                Sale | Return,
                RegularSalesUnitPrice | ActualSalesUnitPrice | ExtendedAmount | DiscountAmount,
            ] => {
                let num = self.num(text, tags, at);
                if let (Some(item), Some(num), Some(&tag)) = (self.item(), num, tags.last()) {
                    let slot = match tag {
                        RegularSalesUnitPrice => &mut item.regular_price,
                        ActualSalesUnitPrice => &mut item.actual_price,
                        ExtendedAmount => &mut item.extended,
                        _ => &mut item.discount_amount,
                    };
                    set_first(slot, Some(num));
                }
            }
            [.., Sale | Return, RetailPriceModifier, Amount] => {
                let num = self.num(text, tags, at);
                if let Some(m) = self.item().and_then(|i| i.modifiers.last_mut()) {
                    set_first(&mut m.amount, num);
                }
            }
            [.., LineItem, Tender, Amount] => {
                let num = self.num(text, tags, at);
                if let Some(tender) = self.tender() {
                    set_first(&mut tender.amount, num);
                }
            }
            [.., LineItem, Tender, TenderType] => {
                if let Some(tender) = self.tender() {
                    tender_type(tender, Some(text));
                }
            }
            [.., LineItem, Tender, TypeCode] => {
                if let Some(tender) = self.tender() {
                    tender_type(tender, Some(text));
                }
            }
            [.., Tender, TenderChange, Amount] => {
                let num = self.num(text, tags, at);
                if let (Some(tender), Some(num)) = (self.tender(), num) {
                    tender.change.push(num);
                    tender.change_from_child = true;
                }
            }
            [.., Tender, TenderChange] => {
                let from_child = self.tender().is_some_and(|t| t.change_from_child);
                if !from_child && !text.is_empty() {
                    let num = self.num(text, tags, at);
                    if let (Some(tender), Some(num)) = (self.tender(), num) {
                        tender.change.push(num);
                    }
                }
                if let Some(tender) = self.tender() {
                    tender.change_from_child = false;
                }
            }
            [.., LineItem, Discount, Amount] => {
                let num = self.num(text, tags, at);
                if let Some(line) = self.lines.last_mut() {
                    set_first(&mut line.discount, num);
                }
            }
            _ => {}
        }
    }
}

/// How a currency's amounts become minor units.
struct Currency<'a> {
    code: &'a str,
    digits: u32,
}

impl Currency<'_> {
    /// An amount that must fit the currency exactly.
    fn exact(&self, n: &Num) -> Result<Money, String> {
        let value = n.value.normalize();
        if value.scale() > self.digits {
            return Err(format!(
                "{} at byte {} has {} decimal places, more than the {} for {}",
                n.path,
                n.at,
                value.scale(),
                self.digits,
                self.code
            ));
        }
        to_minor(value, self.digits).ok_or_else(|| out_of_range(n))
    }

    /// A unit price or a derived amount: rounded half away from zero to the currency.
    fn rounded(&self, value: Decimal) -> Option<Money> {
        to_minor(
            value.round_dp_with_strategy(self.digits, RoundingStrategy::MidpointAwayFromZero),
            self.digits,
        )
    }
}

fn out_of_range(n: &Num) -> String {
    format!("{} at byte {} is out of range", n.path, n.at)
}

fn to_minor(value: Decimal, digits: u32) -> Option<Money> {
    let value = value.normalize();
    let factor = 10i128.checked_pow(digits.checked_sub(value.scale())?)?;
    let minor = value.mantissa().checked_mul(factor)?;
    (minor.abs() <= i128::from(MAX_MONEY)).then_some(minor as Money)
}

/// ISO 4217 minor units, for the currencies that do not have two.
fn minor_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

impl Draft {
    /// The finished transaction, `None` for one that is not a retail transaction.
    fn finish(
        self,
        root_currency: Option<&str>,
        store_currency: &str,
        tz: &TimeZone,
    ) -> Option<Result<Transaction, ParseError>> {
        if !self.retail {
            return None;
        }
        let number = self.number;
        Some(
            self.build(root_currency, store_currency, tz)
                .map_err(|why| ParseError(format!("transaction {number}: {why}"))),
        )
    }

    fn build(
        self,
        root_currency: Option<&str>,
        store_currency: &str,
        tz: &TimeZone,
    ) -> Result<Transaction, String> {
        if let Some(why) = self.error {
            return Err(why);
        }
        let at = self.at;
        let sequence = self
            .sequence
            .ok_or_else(|| format!("missing SequenceNumber (Transaction at byte {at})"))?;
        let currency = match (&self.currency, root_currency) {
            (Some((code, at)), _) => checked_currency(code, &format!("CurrencyCode at byte {at}"))?,
            (None, Some(code)) => {
                checked_currency(&code.trim().to_ascii_uppercase(), "POSLog/@CurrencyCode")?
            }
            // The document names no currency: it is in the store's, and its decimal places
            // must be the store's (a JPY store's 1500 is not 15.00).
            (None, None) => store_currency.to_string(),
        };
        let cur = Currency {
            code: &currency,
            digits: minor_digits(&currency),
        };
        let started_at = self.begin.or(self.end).or(self.receipt).ok_or_else(|| {
            format!("missing BeginDateTime and EndDateTime (Transaction at byte {at})")
        })?;
        let ended_at = self.end.or(self.receipt).unwrap_or(started_at);
        let business_day = self
            .business_day
            .unwrap_or_else(|| started_at.to_zoned(tz.clone()).date());

        // Voided lines decide the kind only when there is nothing else to go by.
        let counted: Vec<&ItemDraft> = self
            .lines
            .iter()
            .filter(|l| !l.void)
            .filter_map(|l| l.item.as_ref())
            .collect();
        let basis: Vec<&ItemDraft> = if counted.is_empty() {
            self.lines.iter().filter_map(|l| l.item.as_ref()).collect()
        } else {
            counted
        };
        let all_returns = !basis.is_empty() && basis.iter().all(|i| i.is_return);

        let mut lines = Vec::new();
        let mut tenders = Vec::new();
        let mut transaction_discount: Money = 0;
        for (i, line) in self.lines.iter().enumerate() {
            if let Some(item) = &line.item {
                lines.push(item_line(item, line.void, i + 1, all_returns, &cur)?);
            } else if line.void {
                // A voided tender or discount never happened.
            } else if let Some(tender) = &line.tender {
                tenders.push(tender_of(tender, i + 1, all_returns, &cur)?);
            } else if let Some(discount) = &line.discount {
                transaction_discount =
                    transaction_discount.saturating_add(cur.exact(discount)?.saturating_abs());
            }
        }

        let total = match &self.total {
            Some(n) if all_returns => cur.exact(n)?.saturating_abs(),
            Some(n) => cur.exact(n)?,
            None => {
                let sum: i128 = lines.iter().map(|l| i128::from(l.net())).sum::<i128>()
                    - i128::from(transaction_discount);
                Money::try_from(sum)
                    .ok()
                    .filter(|t| t.abs() <= MAX_MONEY)
                    .ok_or_else(|| {
                        format!("the total computed from the lines is out of range (Transaction at byte {at})")
                    })?
            }
        };
        let kind = if self.void {
            TransactionKind::Void
        } else if all_returns {
            TransactionKind::Return
        } else {
            TransactionKind::Sale
        };
        let [loyalty, account, customer] = self.loyalty;
        Ok(Transaction {
            id: String::new(),
            store: String::new(),
            register: self.register.unwrap_or_default(),
            lane: None,
            sequence: Some(sequence),
            business_day,
            started_at,
            ended_at,
            kind,
            currency,
            loyalty_id: loyalty.or(account).or(customer),
            lines,
            tenders,
            total,
            source_format: SourceFormat::Poslog,
            test: self.training,
        })
    }
}

fn checked_currency(code: &str, what: &str) -> Result<String, String> {
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(code.to_string())
    } else {
        Err(format!("{what} is not an ISO 4217 currency code"))
    }
}

/// One `Sale` or `Return` line. In a transaction of returns only, return lines are positive
/// (the amounts refunded); anywhere else they are negative.
fn item_line(
    item: &ItemDraft,
    voided: bool,
    index: usize,
    all_returns: bool,
    cur: &Currency<'_>,
) -> Result<Line, String> {
    let part = if item.is_return { "Return" } else { "Sale" };
    let here = format!(
        "RetailTransaction/LineItem[{index}]/{part} at byte {}",
        item.at
    );
    let gtin = item.gtin.as_ref().map(|(_, id)| id.clone());
    let sku = item
        .sku
        .clone()
        .or_else(|| gtin.clone())
        .ok_or_else(|| format!("{here}: missing ItemID"))?;
    let (mut quantity, unit) = match &item.quantity {
        Some((n, code)) => (n.value, code.as_deref().and_then(unit_of)),
        None => (Decimal::ONE, None),
    };
    let price = item.regular_price.as_ref().or(item.actual_price.as_ref());
    let mut amount = match (&item.extended, price) {
        (Some(n), _) => cur.exact(n)?,
        (None, Some(p)) => p
            .value
            .checked_mul(quantity)
            .and_then(|a| cur.rounded(a))
            .ok_or_else(|| format!("{here}: unit price times quantity is out of range"))?,
        (None, None) => return Err(format!("{here}: missing ExtendedAmount")),
    };
    let mut unit_price = match price {
        Some(p) => cur.rounded(p.value).ok_or_else(|| out_of_range(p))?,
        // Without a unit price, the amount per unit in minor units, rounded like one.
        None if !quantity.is_zero() => Decimal::from(amount)
            .checked_div(quantity)
            .map(|p| p.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero))
            .and_then(|p| to_minor(p, 0))
            .ok_or_else(|| format!("{here}: unit price is out of range"))?,
        None => amount,
    };
    let mut discount: Money = 0;
    if item.modifiers.is_empty() {
        if let Some(n) = &item.discount_amount {
            discount = cur.exact(n)?;
        }
    } else {
        for m in item.modifiers.iter().filter(|m| !m.void && m.sign != 0) {
            if let Some(n) = &m.amount {
                discount = discount.saturating_add(cur.exact(n)?.saturating_mul(m.sign.into()));
            }
        }
    }
    if item.is_return {
        quantity = quantity.abs();
        unit_price = unit_price.saturating_abs();
        if amount < 0 {
            amount = -amount;
            discount = -discount;
        }
        if !all_returns {
            quantity = -quantity;
            amount = -amount;
            discount = -discount;
        }
    }
    Ok(Line {
        sku,
        gtin,
        description: item.description.clone().unwrap_or_default(),
        category: item.category.clone(),
        quantity: Quantity(quantity),
        unit,
        unit_price,
        amount,
        discount,
        cost: None,
        voided,
    })
}

fn tender_of(
    tender: &TenderDraft,
    index: usize,
    all_returns: bool,
    cur: &Currency<'_>,
) -> Result<Tender, String> {
    let amount = tender.amount.as_ref().ok_or_else(|| {
        format!(
            "RetailTransaction/LineItem[{index}]/Tender at byte {}: missing Amount",
            tender.at
        )
    })?;
    let mut amount = cur.exact(amount)?;
    for change in &tender.change {
        amount = amount.saturating_sub(cur.exact(change)?);
    }
    if tender.refund {
        amount = -amount;
    }
    if all_returns {
        amount = amount.saturating_abs();
    }
    Ok(Tender {
        kind: tender.kind.clone().unwrap_or_else(|| "other".into()),
        amount,
    })
}

/// A tender type names the kind (`Cash` → `cash`); a `TypeCode` of Sale or Refund is the
/// direction of the money instead.
fn tender_type(tender: &mut TenderDraft, value: Option<&str>) {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return;
    };
    let kind = value.to_lowercase();
    match kind.as_str() {
        "refund" | "return" => tender.refund = true,
        "sale" | "payment" => {}
        _ => set_first(&mut tender.kind, Some(kind)),
    }
}

fn is_gtin_type(kind: &str) -> bool {
    let kind: String = kind
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    kind.starts_with("GTIN")
        || kind.starts_with("EAN")
        || kind.starts_with("UPC")
        || kind == "JAN"
        || kind == "ITF14"
}

/// UN/ECE Recommendation 20 codes (what POSLog uses) as the canonical unit; pieces have none.
fn unit_of(code: &str) -> Option<String> {
    let code = code.trim();
    let unit = match code.to_ascii_uppercase().as_str() {
        "" | "EA" | "EACH" | "PCE" | "PC" | "PCS" | "C62" | "H87" | "ST" | "UN" | "UNIT" => {
            return None;
        }
        "KGM" | "KG" => "kg",
        "GRM" | "G" | "GR" => "g",
        "LTR" | "L" | "LT" => "l",
        "MLT" | "ML" => "ml",
        "MTR" | "M" => "m",
        "CMT" | "CM" => "cm",
        "MTK" | "M2" => "m2",
        "LBR" | "LB" => "lb",
        "ONZ" | "OZ" => "oz",
        _ => return Some(code.to_lowercase()),
    };
    Some(unit.to_string())
}

fn set_first<T>(slot: &mut Option<T>, value: Option<T>) {
    if slot.is_none() {
        *slot = value;
    }
}

/// An `xs:decimal`: optional sign, digits, optional fraction. Stricter than `Decimal`'s own
/// parser, which also takes `1_000`.
fn parse_decimal(text: &str) -> Option<Decimal> {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let well_formed = !(whole.is_empty() && fraction.is_empty())
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit());
    if !well_formed {
        return None;
    }
    let digits = if whole.is_empty() {
        Cow::Owned(format!("0{digits}"))
    } else if fraction.is_empty() {
        Cow::Borrowed(whole)
    } else {
        Cow::Borrowed(digits)
    };
    let value = Decimal::from_str_exact(&digits).ok()?;
    Some(if negative { -value } else { value })
}

/// `xs:boolean`.
fn parse_bool(text: &str) -> Option<bool> {
    match text.trim() {
        t if t.eq_ignore_ascii_case("true") || t == "1" => Some(true),
        t if t.eq_ignore_ascii_case("false") || t == "0" => Some(false),
        _ => None,
    }
}

/// `xs:date`; some registers write a date-time here, whose date is the business day.
fn parse_date(text: &str) -> Option<Date> {
    text.parse::<Date>()
        .ok()
        .or_else(|| text.parse::<DateTime>().ok().map(|dt| dt.date()))
}

/// With an offset (or `Z`) the instant is as given; without one it is a wall-clock time in the
/// store's zone (the earlier instant when clocks go back, the later one when they skip).
fn parse_time(text: &str, tz: &TimeZone) -> Option<Timestamp> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Some(t);
    }
    let civil = text.parse::<DateTime>().ok()?;
    civil.to_zoned(tz.clone()).ok().map(|z| z.timestamp())
}

/// Writes transactions as POSLog documents: `storelink sim`'s POSLog registers, and the
/// property test that reads back what it writes in every spelling the reader must accept.
pub mod writer {
    use jiff::Timestamp;
    use jiff::tz::TimeZone;
    use rust_decimal::Decimal;

    use super::minor_digits;
    use crate::model::transaction::{Money, Transaction, TransactionKind};

    /// How element names are spelled.
    #[derive(Debug, Clone, Copy)]
    pub enum Naming {
        Plain,
        DefaultNamespace,
        Prefixed(&'static str),
    }

    /// A transaction and the writer's free choices; none of them may change what is read.
    #[derive(Debug, Clone)]
    pub struct Document {
        pub tx: Transaction,
        /// Lines are written as `Return` elements (a return, or a voided return).
        pub returns: bool,
        pub naming: Naming,
        pub bare_root: bool,
        pub civil_times: bool,
        pub offset_hours: i8,
        pub omit_total: bool,
        /// Per line: discount as price modifier or `DiscountAmount`, GTIN typed or not,
        /// description as CDATA, an unrelated `Tax/Amount` inside the item.
        pub line_style: Vec<[bool; 4]>,
        /// Per tender: change handed back, refund by TypeCode.
        pub tender_style: Vec<(Money, bool)>,
        pub loyalty_style: usize,
    }

    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&apos;")
    }

    fn money_text(m: Money, digits: u32) -> String {
        Decimal::new(m, digits).to_string()
    }

    /// The POSLog XML for `case`.
    ///
    /// Long on purpose: it writes the document top to bottom in element order, mirroring
    /// what `close` reads, so the two can be compared side by side.
    pub fn write(case: &Document) -> String {
        let tx = &case.tx;
        let digits = minor_digits(&tx.currency);
        let n = |name: &str| match case.naming {
            Naming::Prefixed(p) => format!("{p}:{name}"),
            _ => name.to_string(),
        };
        let mut x = String::new();
        let el = |x: &mut String, name: &str, attrs: &str, text: &str| {
            let name = n(name);
            x.push_str(&format!("<{name}{attrs}>{text}</{name}>\n"));
        };
        let ns = match case.naming {
            Naming::Plain => String::new(),
            Naming::DefaultNamespace => {
                " xmlns=\"http://www.nrf-arts.org/IXRetail/namespace/\"".to_string()
            }
            Naming::Prefixed(p) => {
                format!(" xmlns:{p}=\"http://www.nrf-arts.org/IXRetail/namespace/\"")
            }
        };
        x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        if !case.bare_root {
            x.push_str(&format!("<{}{ns}>\n", n("POSLog")));
        }
        let training = if tx.test {
            " TrainingModeFlag=\"true\""
        } else {
            ""
        };
        let root_ns = if case.bare_root { ns.as_str() } else { "" };
        x.push_str(&format!("<{}{root_ns}{training}>\n", n("Transaction")));
        el(&mut x, "RetailStoreID", "", "ignored");
        if !tx.register.is_empty() {
            el(&mut x, "WorkstationID", "", &esc(&tx.register));
        }
        if let Some(seq) = tx.sequence {
            el(&mut x, "SequenceNumber", "", &seq.to_string());
        }
        el(&mut x, "BusinessDayDate", "", &tx.business_day.to_string());
        let tz = TimeZone::fixed(jiff::tz::offset(case.offset_hours));
        let time = |t: Timestamp| {
            if case.civil_times {
                t.to_zoned(tz.clone()).datetime().to_string()
            } else {
                t.to_string()
            }
        };
        el(&mut x, "BeginDateTime", "", &time(tx.started_at));
        el(&mut x, "EndDateTime", "", &time(tx.ended_at));
        if !tx.currency.is_empty() {
            el(&mut x, "CurrencyCode", "", &tx.currency);
        }
        let status = if tx.kind == TransactionKind::Void {
            " TransactionStatus=\"Voided\""
        } else {
            ""
        };
        x.push_str(&format!("<{}{status}>\n", n("RetailTransaction")));
        for (line, style) in tx.lines.iter().zip(&case.line_style) {
            let void = if line.voided {
                " VoidFlag=\"true\""
            } else {
                ""
            };
            x.push_str(&format!("<{}{void}>\n", n("LineItem")));
            let is_return = case.returns || line.quantity.0.is_sign_negative();
            let part = if is_return { "Return" } else { "Sale" };
            x.push_str(&format!("<{}>\n", n(part)));
            el(&mut x, "ItemID", "", &esc(&line.sku));
            if let Some(gtin) = &line.gtin {
                let kind = if style[1] { " POSIDType=\"GTIN\"" } else { "" };
                let id = format!("<{0}>{gtin}</{0}>", n("POSItemID"));
                el(&mut x, "POSIdentity", kind, &id);
            }
            if let Some(category) = &line.category {
                el(
                    &mut x,
                    "MerchandiseHierarchy",
                    " Level=\"Department\"",
                    &esc(category),
                );
            }
            if style[2] {
                el(
                    &mut x,
                    "Description",
                    "",
                    &format!("<![CDATA[{}]]>", line.description),
                );
            } else {
                el(&mut x, "Description", "", &esc(&line.description));
            }
            el(
                &mut x,
                "RegularSalesUnitPrice",
                "",
                &money_text(line.unit_price, digits),
            );
            el(
                &mut x,
                "ExtendedAmount",
                "",
                &money_text(line.amount.abs(), digits),
            );
            let uom = match line.unit.as_deref() {
                Some("kg") => " UnitOfMeasureCode=\"KGM\"",
                Some("l") => " UnitOfMeasureCode=\"LTR\"",
                Some("g") => " UnitOfMeasureCode=\"GRM\"",
                Some("m") => " UnitOfMeasureCode=\"MTR\"",
                _ if style[1] => " UnitOfMeasureCode=\"EA\"",
                _ => "",
            };
            el(&mut x, "Quantity", uom, &line.quantity.0.abs().to_string());
            let discount = money_text(line.discount.abs(), digits);
            if style[0] {
                let amount = format!("<{0} Action=\"Subtract\">{discount}</{0}>", n("Amount"));
                el(&mut x, "RetailPriceModifier", "", &amount);
            } else {
                el(&mut x, "DiscountAmount", "", &discount);
            }
            if style[3] {
                let amount = format!("<{0}>0.01</{0}>", n("Amount"));
                el(&mut x, "Tax", " TaxType=\"VAT\"", &amount);
            }
            x.push_str(&format!("</{}>\n</{}>\n", n(part), n("LineItem")));
        }
        for (t, (change, refund)) in tx.tenders.iter().zip(&case.tender_style) {
            x.push_str(&format!("<{}>\n", n("LineItem")));
            let (amount, code) = if *refund {
                (-t.amount, " TypeCode=\"Refund\"")
            } else {
                (t.amount, " TypeCode=\"Sale\"")
            };
            x.push_str(&format!(
                "<{} TenderType=\"{}\"{code}>\n",
                n("Tender"),
                t.kind
            ));
            el(&mut x, "Amount", "", &money_text(amount + change, digits));
            if *change != 0 {
                let inner = format!("<{0}>{1}</{0}>", n("Amount"), money_text(*change, digits));
                el(&mut x, "TenderChange", "", &inner);
            }
            x.push_str(&format!("</{}>\n</{}>\n", n("Tender"), n("LineItem")));
        }
        if !case.omit_total {
            el(&mut x, "Total", " TotalType=\"TransactionNetAmount\"", "0");
            el(
                &mut x,
                "Total",
                " TotalType=\"TransactionGrandAmount\"",
                &money_text(tx.total, digits),
            );
        }
        if let Some(id) = &tx.loyalty_id {
            let (outer, inner) = [
                ("LoyaltyAccount", "LoyaltyAccountID"),
                ("CustomerAccount", "CustomerAccountID"),
                ("Customer", "CustomerID"),
            ][case.loyalty_style];
            el(
                &mut x,
                outer,
                "",
                &format!("<{0}>{1}</{0}>", n(inner), esc(id)),
            );
        }
        x.push_str(&format!(
            "</{}>\n</{}>\n",
            n("RetailTransaction"),
            n("Transaction")
        ));
        if !case.bare_root {
            x.push_str(&format!("</{}>\n", n("POSLog")));
        }
        x
    }

    impl Document {
        /// The plainest spelling: the NRF namespace, UTC times, totals, a loyalty account.
        pub fn plain(tx: Transaction) -> Document {
            Document {
                returns: tx.kind == TransactionKind::Return,
                naming: Naming::DefaultNamespace,
                bare_root: false,
                civil_times: false,
                offset_hours: 0,
                omit_total: false,
                line_style: vec![[false, true, false, false]; tx.lines.len()],
                tender_style: tx.tenders.iter().map(|_| (0, false)).collect(),
                loyalty_style: 0,
                tx,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{Document as Case, Naming, write};
    use super::*;
    use proptest::prelude::*;

    fn berlin() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    fn all(doc: &[u8]) -> Vec<Result<Transaction, ParseError>> {
        parse(doc, &berlin(), "EUR").unwrap()
    }

    fn one(doc: &[u8]) -> Transaction {
        let mut txs = all(doc);
        assert_eq!(txs.len(), 1, "{txs:?}");
        txs.remove(0).unwrap()
    }

    fn inner_error(doc: &[u8]) -> String {
        let mut txs = all(doc);
        assert_eq!(txs.len(), 1, "{txs:?}");
        txs.remove(0).unwrap_err().0
    }

    fn outer_error(doc: &[u8]) -> String {
        parse(doc, &berlin(), "EUR").unwrap_err().0
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn qty(s: &str) -> Quantity {
        s.parse().unwrap()
    }

    fn line(sku: &str, quantity: &str, unit_price: Money, amount: Money) -> Line {
        Line {
            sku: sku.into(),
            gtin: None,
            description: String::new(),
            category: None,
            quantity: qty(quantity),
            unit: None,
            unit_price,
            amount,
            discount: 0,
            cost: None,
            voided: false,
        }
    }

    fn tender(kind: &str, amount: Money) -> Tender {
        Tender {
            kind: kind.into(),
            amount,
        }
    }

    /// The byte offset of `needle` in `doc`: where an error message must point.
    fn offset(doc: &[u8], needle: &str) -> usize {
        doc.windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap()
    }

    const SALE: &[u8] = include_bytes!("../../tests/fixtures/poslog/sale.xml");
    const RETURN: &[u8] = include_bytes!("../../tests/fixtures/poslog/return.xml");
    const VOID: &[u8] = include_bytes!("../../tests/fixtures/poslog/void.xml");
    const VOIDED_LINE: &[u8] = include_bytes!("../../tests/fixtures/poslog/voided_line.xml");
    const LOYALTY: &[u8] = include_bytes!("../../tests/fixtures/poslog/loyalty.xml");
    const WEIGHTED: &[u8] = include_bytes!("../../tests/fixtures/poslog/weighted.xml");
    const MULTI_TENDER: &[u8] = include_bytes!("../../tests/fixtures/poslog/multi_tender.xml");
    const DISCOUNT: &[u8] = include_bytes!("../../tests/fixtures/poslog/discount.xml");
    const PREFIXED: &[u8] = include_bytes!("../../tests/fixtures/poslog/prefixed.xml");
    const TRANSACTION_ROOT: &[u8] =
        include_bytes!("../../tests/fixtures/poslog/transaction_root.xml");
    const SEVERAL: &[u8] = include_bytes!("../../tests/fixtures/poslog/several.xml");
    const BAD_MALFORMED: &[u8] = include_bytes!("../../tests/fixtures/poslog/bad_malformed.xml");
    const BAD_MISSING_SEQUENCE: &[u8] =
        include_bytes!("../../tests/fixtures/poslog/bad_missing_sequence.xml");
    const BAD_DECIMALS: &[u8] = include_bytes!("../../tests/fixtures/poslog/bad_decimals.xml");

    #[test]
    fn a_document_without_a_currency_is_read_in_the_stores_currency() {
        let doc = br#"<POSLog><Transaction><WorkstationID>1</WorkstationID><SequenceNumber>9</SequenceNumber>
<BusinessDayDate>2026-11-22</BusinessDayDate><BeginDateTime>2026-11-22T10:00:00</BeginDateTime>
<RetailTransaction><LineItem><Sale><ItemID>1</ItemID><Quantity>1</Quantity>
<RegularSalesUnitPrice>1500</RegularSalesUnitPrice><ExtendedAmount>1500</ExtendedAmount></Sale></LineItem>
<Total TotalType="TransactionGrandAmount">1500</Total></RetailTransaction></Transaction></POSLog>"#;
        let yen = parse(doc, &berlin(), "JPY").unwrap().remove(0).unwrap();
        assert_eq!(
            (yen.currency.as_str(), yen.total),
            ("JPY", 1500),
            "¥1500, not ¥15.00"
        );
        let euro = parse(doc, &berlin(), "EUR").unwrap().remove(0).unwrap();
        assert_eq!((euro.currency.as_str(), euro.total), ("EUR", 150_000));
    }

    #[test]
    fn a_sale_maps_every_field() {
        let expected = Transaction {
            id: String::new(),
            store: String::new(),
            register: "lane-3".into(),
            lane: None,
            sequence: Some(4711),
            business_day: "2026-11-22".parse().unwrap(),
            // Store time in Berlin, winter: UTC+1.
            started_at: ts("2026-11-22T08:00:00Z"),
            ended_at: ts("2026-11-22T08:01:10Z"),
            kind: TransactionKind::Sale,
            currency: "EUR".into(),
            loyalty_id: None,
            lines: vec![
                Line {
                    gtin: Some("4006381333931".into()),
                    description: "Vollmilch 1 l & Co".into(),
                    category: Some("Dairy".into()),
                    ..line("100234", "2", 119, 238)
                },
                Line {
                    description: "Brot <Roggen>".into(),
                    ..line("200017", "1", 349, 349)
                },
            ],
            tenders: vec![tender("creditdebit", 587)],
            total: 587,
            source_format: SourceFormat::Poslog,
            test: false,
        };
        assert_eq!(one(SALE), expected);
    }

    #[test]
    fn a_return_is_positive_whatever_sign_the_register_wrote() {
        let tx = one(RETURN);
        assert_eq!(tx.kind, TransactionKind::Return);
        assert_eq!(tx.sequence, Some(4712));
        assert_eq!(tx.started_at, ts("2026-11-22T09:15:00Z"));
        assert_eq!(tx.ended_at, ts("2026-11-22T09:16:30Z"));
        assert_eq!(
            tx.lines,
            vec![Line {
                gtin: Some("4012345678901".into()),
                description: "Wasserkocher".into(),
                ..line("300555", "1", 2499, 2499)
            }]
        );
        assert_eq!(tx.tenders, vec![tender("cash", 2499)]);
        assert_eq!(tx.total, 2499);
        assert_eq!(tx.lines_total(), tx.total);
    }

    #[test]
    fn a_voided_transaction_is_a_void_and_keeps_its_lines() {
        let tx = one(VOID);
        assert_eq!(tx.kind, TransactionKind::Void);
        assert_eq!(
            tx.currency, "EUR",
            "the store's currency when the document names none"
        );
        assert_eq!(tx.started_at, ts("2026-11-22T10:00:00Z"));
        assert_eq!(tx.ended_at, ts("2026-11-22T10:02:00Z"));
        assert_eq!(tx.lines, vec![line("100234", "1", 119, 119)]);
        assert!(tx.tenders.is_empty());
        assert_eq!(tx.total, 119);
    }

    #[test]
    fn a_voided_line_is_kept_but_not_counted_and_a_voided_tender_is_dropped() {
        let tx = one(VOIDED_LINE);
        assert_eq!(tx.kind, TransactionKind::Sale);
        assert_eq!(
            tx.lines,
            vec![
                Line {
                    description: "Kaffee".into(),
                    ..line("400001", "1", 699, 699)
                },
                Line {
                    description: "Tee".into(),
                    voided: true,
                    ..line("400002", "1", 329, 329)
                },
            ]
        );
        assert_eq!(tx.tenders, vec![tender("cash", 699)]);
        assert_eq!(tx.total, 699, "computed from the counted lines");
    }

    #[test]
    fn the_loyalty_account_wins_over_the_customer_id() {
        let tx = one(LOYALTY);
        assert_eq!(tx.loyalty_id.as_deref(), Some("DE4711000042"));
        assert_eq!(
            tx.lines,
            vec![Line {
                description: "Schokolade".into(),
                ..line("500100", "2", 199, 398)
            }]
        );
        assert_eq!(tx.tenders, vec![tender("cash", 398)]);
        assert_eq!(tx.total, 398);
    }

    #[test]
    fn weighed_goods_keep_exact_quantities_and_units() {
        let tx = one(WEIGHTED);
        assert_eq!(
            tx.lines,
            vec![
                Line {
                    gtin: Some("4133".into()),
                    description: "Äpfel Elstar".into(),
                    category: Some("Obst".into()),
                    unit: Some("kg".into()),
                    // 2.995 per kg, rounded half away from zero.
                    ..line("2100001", "0.532", 300, 159)
                },
                Line {
                    description: "Milch lose".into(),
                    unit: Some("l".into()),
                    ..line("2200002", "1.5", 110, 165)
                },
            ]
        );
        assert_eq!(tx.lines[0].quantity.to_string(), "0.532");
        assert_eq!(tx.tenders, vec![tender("cash", 324)]);
        assert_eq!(tx.total, 324);
    }

    #[test]
    fn change_is_taken_off_the_tender_it_was_given_for() {
        let tx = one(MULTI_TENDER);
        assert_eq!(
            tx.tenders,
            vec![
                tender("voucher", 500),
                tender("creditdebit", 1000),
                tender("cash", 1249)
            ]
        );
        assert_eq!(tx.tenders.iter().map(|t| t.amount).sum::<Money>(), tx.total);
        assert_eq!(tx.total, 2749);
    }

    #[test]
    fn discounts_come_from_price_modifiers_and_discount_lines() {
        let tx = one(DISCOUNT);
        assert_eq!(
            tx.lines,
            vec![
                Line {
                    description: "Waschmittel".into(),
                    // 1.50 off; the voided 0.50 and the price override do not count.
                    discount: 150,
                    ..line("700700", "2", 500, 1000)
                },
                Line {
                    description: "Spülschwamm".into(),
                    discount: 40,
                    ..line("700701", "1", 400, 400)
                },
            ]
        );
        // 8.50 + 3.60 - 1.00 off the whole transaction.
        assert_eq!(tx.total, 1110);
        assert_eq!(tx.tenders, vec![tender("cash", 1110)]);
    }

    #[test]
    fn prefixed_elements_read_like_unprefixed_ones() {
        let tx = one(PREFIXED);
        assert_eq!(tx.currency, "CHF");
        assert_eq!(tx.sequence, Some(4719));
        assert_eq!(tx.register, "lane-3");
        assert_eq!(tx.started_at, ts("2026-11-22T17:00:00Z"));
        assert_eq!(tx.ended_at, ts("2026-11-22T17:00:30Z"));
        assert_eq!(
            tx.lines,
            vec![Line {
                description: "Käse".into(),
                ..line("800800", "1", 890, 890)
            }]
        );
        // The prefixed (vendor) attribute is not the standard one.
        assert_eq!(tx.tenders, vec![tender("creditdebit", 890)]);
        assert_eq!(tx.total, 890);
    }

    #[test]
    fn a_bare_transaction_root_in_yen() {
        let tx = one(TRANSACTION_ROOT);
        assert_eq!(tx.currency, "JPY");
        assert_eq!(tx.sequence, Some(4720));
        assert_eq!(tx.started_at, ts("2026-11-22T09:00:00Z"));
        assert_eq!(
            tx.lines,
            vec![Line {
                description: "お茶".into(),
                ..line("900900", "2", 150, 300)
            }]
        );
        assert_eq!(
            tx.tenders,
            vec![tender("cash", 300)],
            "1000 less 700 change"
        );
        assert_eq!(tx.total, 300);
    }

    #[test]
    fn a_register_log_yields_its_retail_transactions_only() {
        let txs: Vec<Transaction> = all(SEVERAL).into_iter().map(Result::unwrap).collect();
        let sequences: Vec<_> = txs.iter().map(|t| t.sequence).collect();
        assert_eq!(sequences, vec![Some(101), Some(102), Some(104)]);

        assert_eq!(txs[0].kind, TransactionKind::Sale);
        assert_eq!(txs[0].tenders, vec![tender("cash", 119)]);
        assert_eq!(txs[0].total, 119);

        // An exchange: a sale whose return line is negative.
        let exchange = &txs[1];
        assert_eq!(exchange.kind, TransactionKind::Sale);
        assert_eq!(
            exchange.lines,
            vec![
                Line {
                    description: "Hemd M".into(),
                    ..line("310001", "-1", 2499, -2499)
                },
                Line {
                    description: "Hemd L".into(),
                    ..line("310002", "1", 2999, 2999)
                },
            ]
        );
        assert_eq!(exchange.lines_total(), 500);
        assert_eq!(exchange.total, 500);
        assert_eq!(exchange.tenders, vec![tender("cash", 500)]);

        let training = &txs[2];
        assert!(training.test, "training mode stays out of reporting");
        // No quantity means one; no unit price means the amount per unit.
        assert_eq!(training.lines, vec![line("100234", "1", 119, 119)]);
        assert!(!txs[0].test && !txs[1].test);
    }

    #[test]
    fn malformed_xml_fails_the_document_with_its_position() {
        let err = outer_error(BAD_MALFORMED);
        let at = offset(BAD_MALFORMED, "</Extended>");
        assert!(err.starts_with("malformed XML at byte "), "{err}");
        let reported: usize = err["malformed XML at byte ".len()..]
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (at..at + "</Extended>".len()).contains(&reported),
            "{err} (the end tag is at {at})"
        );
        assert!(err.contains("ExtendedAmount"), "{err}");
    }

    #[test]
    fn a_missing_sequence_fails_that_transaction_only() {
        let txs = all(BAD_MISSING_SEQUENCE);
        assert_eq!(txs.len(), 2);
        let err = &txs[0].as_ref().unwrap_err().0;
        let at = offset(BAD_MISSING_SEQUENCE, "<Transaction>");
        assert_eq!(
            err,
            &format!("transaction 1: missing SequenceNumber (Transaction at byte {at})")
        );
        assert_eq!(txs[1].as_ref().unwrap().sequence, Some(4722));
    }

    #[test]
    fn money_with_too_many_decimals_is_refused_not_rounded() {
        let err = inner_error(BAD_DECIMALS);
        let at = offset(BAD_DECIMALS, "<ExtendedAmount>");
        assert_eq!(
            err,
            format!(
                "transaction 1: RetailTransaction/LineItem[1]/Sale/ExtendedAmount at byte {at} \
                 has 3 decimal places, more than the 2 for EUR"
            )
        );
    }

    /// A one-transaction document in the default namespace around `body` (the inside of
    /// `RetailTransaction`), with `head` before it.
    fn doc(head: &str, body: &str) -> Vec<u8> {
        format!(
            r#"<POSLog xmlns="http://www.nrf-arts.org/IXRetail/namespace/"><Transaction>
            <SequenceNumber>9</SequenceNumber><BusinessDayDate>2026-03-29</BusinessDayDate>
            <BeginDateTime>2026-03-29T10:00:00Z</BeginDateTime>{head}
            <RetailTransaction>{body}</RetailTransaction></Transaction></POSLog>"#
        )
        .into_bytes()
    }

    fn sale(inner: &str) -> String {
        format!("<LineItem><Sale><ItemID>1</ItemID>{inner}</Sale></LineItem>")
    }

    #[test]
    fn errors_never_quote_the_text_they_refuse() {
        let secret = "SECRET-4711";
        for doc in [
            BAD_DECIMALS.to_vec(),
            BAD_MISSING_SEQUENCE.to_vec(),
            doc(
                &format!("<CurrencyCode>{secret}</CurrencyCode>"),
                &sale("<ExtendedAmount>1</ExtendedAmount>"),
            ),
            doc(
                "",
                &sale(&format!("<ExtendedAmount>{secret}</ExtendedAmount>")),
            ),
            doc("", &sale(&format!("<Quantity>{secret}</Quantity>"))),
            doc(&format!("<WorkstationID>{secret}:1</WorkstationID>"), ""),
            doc(&format!("<EndDateTime>{secret}</EndDateTime>"), ""),
            doc(
                &format!("<TrainingModeFlag>{secret}</TrainingModeFlag>"),
                "",
            ),
        ] {
            for result in all(&doc) {
                if let Err(e) = result {
                    assert!(!e.0.contains(secret), "{e}");
                    assert!(e.0.contains("byte"), "{e}");
                }
            }
            assert!(all(&doc).iter().any(Result::is_err));
        }
        for doc in [
            format!("<POSLog><Transaction>&{secret};</Transaction></POSLog>"),
            format!("<POSLog><Transaction a=\"&{secret};\"/></POSLog>"),
            format!("<POSLog>{secret}</POSLOG>"),
        ] {
            let err = outer_error(doc.as_bytes());
            assert!(!err.contains(secret), "{err}");
            assert!(err.contains("malformed XML at byte"), "{err}");
        }
    }

    #[test]
    fn documents_that_are_not_poslog_are_refused_whole() {
        assert!(outer_error(b"").contains("no root element"));
        assert!(outer_error(b"  <?xml version=\"1.0\"?>\n ").contains("no root element"));
        let err = outer_error(b"<Invoice><Transaction/></Invoice>");
        assert!(
            err.contains("not a POSLog document") && err.contains("<Invoice>"),
            "{err}"
        );
        assert!(outer_error(b"<POSLog>").contains("ends inside <POSLog>"));
        assert!(outer_error(b"<POSLog/><POSLog/>").contains("second root"));
        assert!(outer_error(b"<POSLog/>junk").contains("text outside"));
        assert!(outer_error(b"\xff\xfe<\x00").contains("UTF-16"));
        assert!(outer_error(b"<POSLog>\xff</POSLog>").contains("not UTF-8"));
        let latin1 = b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><POSLog>\xc4</POSLog>";
        assert!(outer_error(latin1).contains("not UTF-8"));
        // Declared Latin-1 but plain ASCII reads the same in UTF-8.
        let ascii = b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><POSLog/>";
        assert_eq!(parse(ascii, &berlin(), "EUR").unwrap(), vec![]);
        // A BOM is fine, and counted in byte positions.
        let bom = b"\xEF\xBB\xBF<POSLog><Transaction></POSLog>";
        let err = outer_error(bom);
        assert!(err.starts_with("malformed XML at byte 24:"), "{err}");
    }

    #[test]
    fn non_retail_and_unknown_content_yield_nothing_and_break_nothing() {
        assert_eq!(all(b"<POSLog/>"), vec![]);
        assert_eq!(
            all(b"<POSLog><Transaction><ControlTransaction/></Transaction></POSLog>"),
            vec![]
        );
        // Unknown elements, comments and processing instructions anywhere.
        let doc = doc(
            "<!-- c --><?pi x?><Vendor><SequenceNumber>77</SequenceNumber></Vendor>",
            &format!(
                "<Extension><LineItem><Sale><ItemID>X</ItemID></Sale></LineItem></Extension>{}",
                sale("<ExtendedAmount>1.00</ExtendedAmount><Tax><Amount>0.07</Amount></Tax>")
            ),
        );
        let tx = one(&doc);
        assert_eq!(
            tx.sequence,
            Some(9),
            "a SequenceNumber elsewhere is not the one"
        );
        assert_eq!(tx.lines, vec![line("1", "1", 100, 100)]);
        assert_eq!(tx.total, 100);
    }

    #[test]
    fn times_without_an_offset_are_store_time_across_dst() {
        // 2026-03-29 02:30 does not exist in Berlin; 2026-10-25 02:30 happens twice.
        let tx = one(&doc(
            "<EndDateTime>2026-03-29T02:30:00</EndDateTime>",
            &sale("<ExtendedAmount>1</ExtendedAmount>"),
        ));
        assert_eq!(tx.ended_at, ts("2026-03-29T01:30:00Z"), "skips forward");
        let tx = one(
            &String::from_utf8(doc("", &sale("<ExtendedAmount>1</ExtendedAmount>")))
                .unwrap()
                .replace("2026-03-29T10:00:00Z", "2026-10-25T02:30:00")
                .into_bytes(),
        );
        assert_eq!(tx.started_at, ts("2026-10-25T00:30:00Z"), "the earlier one");
        assert_eq!(tx.ended_at, tx.started_at, "no end time: the begin time");
    }

    #[test]
    fn without_a_business_day_the_day_it_began_in_the_store() {
        let doc = b"<Transaction><SequenceNumber>1</SequenceNumber>
            <BeginDateTime>2026-11-22T23:30:00Z</BeginDateTime>
            <RetailTransaction/></Transaction>";
        let tx = one(doc);
        assert_eq!(tx.business_day, "2026-11-23".parse().unwrap());
        assert_eq!(tx.kind, TransactionKind::Sale);
        assert_eq!(tx.total, 0);
        let no_time =
            b"<Transaction><SequenceNumber>1</SequenceNumber><RetailTransaction/></Transaction>";
        assert!(inner_error(no_time).contains("missing BeginDateTime and EndDateTime"));
    }

    #[test]
    fn transaction_level_void_cancel_and_suspend() {
        let body = sale("<ExtendedAmount>1</ExtendedAmount>");
        for (head, tx_attr, kind) in [
            ("<CancelFlag>true</CancelFlag>", "", TransactionKind::Void),
            ("", " CancelFlag=\"true\"", TransactionKind::Void),
            ("", " VoidFlag=\"1\"", TransactionKind::Void),
            ("", " CancelFlag=\"false\"", TransactionKind::Sale),
            (
                "<TransactionStatus>Canceled</TransactionStatus>",
                "",
                TransactionKind::Void,
            ),
            (
                "<TransactionStatus>PostVoided</TransactionStatus>",
                "",
                TransactionKind::Void,
            ),
            (
                "<TransactionStatus>Suspended</TransactionStatus>",
                "",
                TransactionKind::Void,
            ),
            (
                "<TransactionStatus>Finished</TransactionStatus>",
                "",
                TransactionKind::Sale,
            ),
            (
                "<TransactionStatus>SuspendedRetrieved</TransactionStatus>",
                "",
                TransactionKind::Sale,
            ),
        ] {
            let text = String::from_utf8(doc(head, &body)).unwrap().replacen(
                "<Transaction>",
                &format!("<Transaction{tx_attr}>"),
                1,
            );
            assert_eq!(one(text.as_bytes()).kind, kind, "{head}{tx_attr}");
        }
        let err = inner_error(&doc("<CancelFlag>maybe</CancelFlag>", &body));
        assert!(
            err.contains("CancelFlag") && err.contains("not true or false"),
            "{err}"
        );
    }

    #[test]
    fn a_refund_tender_in_an_exchange_is_negative() {
        let body = format!(
            "{}<LineItem><Return><ItemID>2</ItemID><ExtendedAmount>30</ExtendedAmount></Return></LineItem>
             <LineItem><Tender TenderType=\"Cash\" TypeCode=\"Refund\"><Amount>20</Amount></Tender></LineItem>
             <LineItem><Tender><TenderType>GiftCard</TenderType><Amount>-1</Amount></Tender></LineItem>
             <LineItem><Tender><Amount>1</Amount></Tender></LineItem>",
            sale("<ExtendedAmount>10</ExtendedAmount>")
        );
        let tx = one(&doc("", &body));
        assert_eq!(tx.kind, TransactionKind::Sale);
        assert_eq!(
            tx.tenders,
            vec![
                tender("cash", -2000),
                tender("giftcard", -100),
                tender("other", 100)
            ]
        );
        assert_eq!(tx.total, -2000, "computed: 10 - 30");
    }

    #[test]
    fn items_without_some_fields_fall_back_or_fail_by_name() {
        // The amount from the exact unit price; a GTIN-typed identity over an untyped one.
        let tx = one(&doc(
            "",
            "<LineItem><Sale>
               <POSIdentity><POSItemID>111</POSItemID></POSIdentity>
               <POSIdentity POSIDType=\"EAN13\"><POSItemID>4000000000001</POSItemID></POSIdentity>
               <RegularSalesUnitPrice>0.333</RegularSalesUnitPrice>
               <Quantity UnitOfMeasureCode=\"PCE\">3</Quantity></Sale></LineItem>",
        ));
        assert_eq!(
            tx.lines,
            vec![Line {
                gtin: Some("4000000000001".into()),
                ..line("4000000000001", "3", 33, 100)
            }]
        );
        // An ItemID typed as a GTIN is the GTIN too, over an untyped identity; an empty one
        // takes nothing away.
        let tx = one(&doc(
            "",
            "<LineItem><Sale><ItemID Type=\"GTIN\"/><ItemID Type=\"GTIN\">4000000000002</ItemID>
               <POSIdentity><POSItemID>111</POSItemID></POSIdentity>
               <ExtendedAmount>1</ExtendedAmount></Sale></LineItem>",
        ));
        assert_eq!(tx.lines[0].sku, "4000000000002");
        assert_eq!(tx.lines[0].gtin.as_deref(), Some("4000000000002"));
        let err = inner_error(&doc(
            "",
            "<LineItem><Sale><ExtendedAmount>1</ExtendedAmount></Sale></LineItem>",
        ));
        assert!(
            err.contains("RetailTransaction/LineItem[1]/Sale at byte")
                && err.ends_with("missing ItemID"),
            "{err}"
        );
        let err = inner_error(&doc("", &sale("")));
        assert!(err.ends_with("missing ExtendedAmount"), "{err}");
        let err = inner_error(&doc(
            "",
            "<LineItem><Tender TenderType=\"Cash\"/></LineItem>",
        ));
        assert!(
            err.contains("LineItem[1]/Tender at byte") && err.ends_with("missing Amount"),
            "{err}"
        );
    }

    #[test]
    fn registers_and_currencies_are_checked() {
        let body = sale("<ExtendedAmount>1</ExtendedAmount>");
        let long = "r".repeat(65);
        for head in [
            format!("<WorkstationID>{long}</WorkstationID>"),
            "<WorkstationID>a:b</WorkstationID>".to_string(),
        ] {
            let err = inner_error(&doc(&head, &body));
            assert!(err.contains("WorkstationID at byte"), "{err}");
        }
        assert_eq!(
            one(&doc(
                &format!("<WorkstationID>{}</WorkstationID>", &long[1..]),
                &body
            ))
            .register,
            long[1..]
        );
        let err = inner_error(&doc("<CurrencyCode>EURO</CurrencyCode>", &body));
        assert!(
            err.contains("CurrencyCode at byte") && err.contains("ISO 4217"),
            "{err}"
        );
        assert_eq!(
            one(&doc("<CurrencyCode> eur </CurrencyCode>", &body)).currency,
            "EUR"
        );

        // Three decimals in dinars; whole yen only; trailing zeros are not decimals.
        let fils = sale("<ExtendedAmount>1.234</ExtendedAmount>");
        assert_eq!(
            one(&doc("<CurrencyCode>KWD</CurrencyCode>", &fils)).total,
            1234
        );
        let err = inner_error(&doc("<CurrencyCode>JPY</CurrencyCode>", &fils));
        assert!(err.contains("more than the 0 for JPY"), "{err}");
        let zeros = sale("<ExtendedAmount>120.000</ExtendedAmount>");
        assert_eq!(
            one(&doc("<CurrencyCode>JPY</CurrencyCode>", &zeros)).total,
            120
        );
        let err = inner_error(&doc("", &fils));
        assert!(err.contains("more than the 2 for EUR"), "{err}");
        // The root's currency attribute applies when a transaction has none.
        let text = String::from_utf8(doc("", &fils)).unwrap().replacen(
            "<POSLog ",
            "<POSLog CurrencyCode=\"BHD\" ",
            1,
        );
        assert_eq!(one(text.as_bytes()).currency, "BHD");
    }

    #[test]
    fn amounts_out_of_range_are_refused() {
        let err = inner_error(&doc(
            "",
            &sale("<ExtendedAmount>10000000000.01</ExtendedAmount>"),
        ));
        assert!(
            err.contains("ExtendedAmount at byte") && err.ends_with("out of range"),
            "{err}"
        );
        let huge = "9".repeat(40);
        let err = inner_error(&doc(
            "",
            &sale(&format!("<ExtendedAmount>{huge}</ExtendedAmount>")),
        ));
        assert!(err.contains("is not a decimal number"), "{err}");
        let err = inner_error(&doc(
            "",
            &sale(
                "<RegularSalesUnitPrice>9999999999</RegularSalesUnitPrice><Quantity>999999</Quantity>",
            ),
        ));
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn decimals_follow_the_xml_schema_grammar() {
        for (text, value) in [
            ("1", "1"),
            ("-1.50", "-1.50"),
            ("+2.5", "2.5"),
            (".5", "0.5"),
            ("5.", "5"),
            ("007", "7"),
        ] {
            assert_eq!(parse_decimal(text), Some(value.parse().unwrap()), "{text}");
        }
        for text in [
            "", "-", ".", "1_000", "1e3", "1,5", " 1", "--1", "1.2.3", "NaN",
        ] {
            assert_eq!(parse_decimal(text), None, "{text:?}");
        }
    }

    #[test]
    fn units_follow_un_ece_codes() {
        assert_eq!(unit_of("KGM").as_deref(), Some("kg"));
        assert_eq!(unit_of("LTR").as_deref(), Some("l"));
        assert_eq!(unit_of("MTR").as_deref(), Some("m"));
        assert_eq!(unit_of("EA"), None);
        assert_eq!(unit_of("PCE"), None);
        assert_eq!(unit_of("Bund").as_deref(), Some("bund"));
    }

    // ---- Property test: canonical transactions written as POSLog read back the same. ----

    fn arb_text() -> impl Strategy<Value = String> {
        // Markup characters, quotes and umlauts; no ']' so CDATA cannot end early.
        "[a-zA-Z0-9 äöüß€<>&\"'-]{0,16}".prop_map(|s| s.trim().to_string())
    }

    fn arb_magnitude() -> impl Strategy<Value = Money> {
        0..=MAX_MONEY
    }

    fn arb_quantity() -> impl Strategy<Value = Decimal> {
        (0u32..=3)
            .prop_flat_map(|s| (1..=999_999 * 10i64.pow(s)).prop_map(move |m| Decimal::new(m, s)))
    }

    prop_compose! {
        /// A line as magnitudes and whether it is a return.
        fn arb_item()(sku in "[0-9A-Z]{1,12}", gtin in proptest::option::of("[0-9]{13}"),
                      description in arb_text(),
                      category in proptest::option::of(arb_text().prop_filter("nonempty", |s| !s.is_empty())),
                      quantity in arb_quantity(), unit in proptest::option::of("kg|l|g|m"),
                      unit_price in arb_magnitude(), amount in arb_magnitude(), discount in arb_magnitude(),
                      voided in any::<bool>(), is_return in any::<bool>(), style in any::<[bool; 4]>())
                      -> (Line, bool, [bool; 4]) {
            (Line { sku, gtin, description, category, quantity: Quantity(quantity), unit, unit_price,
                    amount, discount, cost: None, voided }, is_return, style)
        }
    }

    prop_compose! {
        fn arb_case()(kind in 0u8..4, items in proptest::collection::vec(arb_item(), 0..5),
                      tenders in proptest::collection::vec(
                          ("[a-z]{1,10}".prop_filter("a tender type", |k| !matches!(k.as_str(), "sale" | "refund" | "return" | "payment")),
                           -MAX_MONEY..=MAX_MONEY, 0..1000i64, any::<bool>()), 0..4),
                      register in "[A-Za-z0-9-]{0,12}", sequence in any::<u64>(),
                      day in 0i32..3650, start in 0i64..86_400, len in 0i64..3_600,
                      currency in prop_oneof![Just(""), Just("EUR"), Just("JPY"), Just("KWD")],
                      loyalty_id in proptest::option::of("[0-9A-Za-z]{1,16}"), loyalty_style in 0usize..3,
                      total in -MAX_MONEY..=MAX_MONEY, omit_total in any::<bool>(), test in any::<bool>(),
                      naming in prop_oneof![Just(Naming::Plain), Just(Naming::DefaultNamespace),
                                            Just(Naming::Prefixed("nrf")), Just(Naming::Prefixed("poslog"))],
                      bare_root in any::<bool>(), civil_times in any::<bool>(), offset_hours in -12i8..=14)
                      -> Case {
            // kind: 0 sale, 1 return, 2 voided sale, 3 voided return.
            let returns = (kind == 1 || kind == 3) && !items.is_empty();
            let kind = match kind {
                2 | 3 => TransactionKind::Void,
                1 if returns => TransactionKind::Return,
                _ => TransactionKind::Sale,
            };
            let mut lines = Vec::new();
            let mut line_style = Vec::new();
            let any_return = items.iter().any(|(_, r, _)| *r);
            for (i, (mut line, is_return, style)) in items.into_iter().enumerate() {
                // In a sale with returns, one counted sale line keeps it a sale.
                let negative = !returns && is_return && !(i == 0 && any_return);
                if i == 0 && any_return && !returns {
                    line.voided = false;
                }
                if negative {
                    line.quantity = Quantity(-line.quantity.0);
                    line.amount = -line.amount;
                    line.discount = -line.discount;
                }
                lines.push(line);
                line_style.push(style);
            }
            let positive = returns;
            let tender_style = tenders.iter().map(|(_, amount, change, refund)| {
                let change = if *amount >= 0 && amount + change <= MAX_MONEY { *change } else { 0 };
                (change, *refund)
            }).collect();
            let tenders = tenders.into_iter().map(|(kind, amount, _, _)| Tender {
                kind, amount: if positive { amount.abs() } else { amount },
            }).collect();
            let business_day = Date::constant(2020, 1, 1).checked_add(jiff::Span::new().days(day)).unwrap();
            let started_at = Timestamp::from_second(1_577_836_800 + i64::from(day) * 86_400 + start).unwrap();
            let ended_at = Timestamp::from_second(started_at.as_second() + len).unwrap();
            let mut tx = Transaction {
                id: String::new(), store: String::new(), register, lane: None, sequence: Some(sequence),
                business_day, started_at, ended_at, kind, currency: currency.to_string(), loyalty_id,
                lines, tenders, total: if positive { total.abs() } else { total },
                source_format: SourceFormat::Poslog, test,
            };
            let computed = tx.lines_total();
            let omit_total = omit_total && computed.abs() <= MAX_MONEY;
            if omit_total {
                tx.total = computed;
            }
            Case { tx, returns, naming, bare_root, civil_times, offset_hours, omit_total,
                   line_style, tender_style, loyalty_style }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn written_as_poslog_it_reads_back_the_same(case in arb_case()) {
            let xml = write(&case);
            let tz = TimeZone::fixed(jiff::tz::offset(case.offset_hours));
            let parsed = parse(xml.as_bytes(), &tz, "EUR");
            prop_assert!(parsed.is_ok(), "{parsed:?}\n{xml}");
            let mut txs = parsed.unwrap();
            prop_assert_eq!(txs.len(), 1);
            let back = txs.remove(0);
            // Written without a CurrencyCode, it is read in the store's currency.
            let mut expected = case.tx.clone();
            if expected.currency.is_empty() {
                expected.currency = "EUR".into();
            }
            prop_assert_eq!(back.as_ref(), Ok(&expected), "{}", xml);
        }

        #[test]
        fn any_bytes_give_transactions_or_errors(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes, &TimeZone::UTC, "EUR");
        }
    }
}
