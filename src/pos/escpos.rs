//! ESC/POS: the command language of receipt printers, as tapped from the printer line.
//!
//! - [`Tokenizer`] splits a stream into text, commands and command data. It knows how long each
//!   command is, including the data blocks of images, barcodes and 2D codes, so that argument
//!   and image bytes are never read as text or as a cut.
//! - [`CutFramer`] cuts the stream into receipts at the paper cut (or at a configured trailer),
//!   built on the tokenizer.
//! - [`printed_lines`] is what the printer would print: the text lines of one receipt, decoded
//!   from the code page in force (`ESC t` switches it mid-stream) to UTF-8.
//!
//! Invariants:
//! - The tokenizer is incremental: it only consumes a command once all of its header has
//!   arrived, and carries the rest of a data block over to the next read. The same bytes give the
//!   same tokens however they are split into reads, and so the framer gives the same frames.
//! - A byte that cannot start or continue a command (line noise, a command introducer followed by
//!   a control byte) is a one-byte [`Command::Control`]; tokenizing resumes at the next byte.
//! - A command whose declared data block is larger than the tokenizer's limit (the frame cap)
//!   cannot belong to a receipt we could keep. It is taken as noise: its introducer becomes a
//!   lone byte, instead of swallowing megabytes of later receipts as "image data".
//! - An `ESC`, `GS` or `FS` command this tokenizer does not know is taken to have one argument
//!   byte, as most commands of those families do.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::framing::Frame;

const NUL: u8 = 0x00;
const EOT: u8 = 0x04;
const ENQ: u8 = 0x05;
const HT: u8 = 0x09;
const LF: u8 = 0x0a;
const FF: u8 = 0x0c;
const CR: u8 = 0x0d;
const DLE: u8 = 0x10;
const DC4: u8 = 0x14;
const CAN: u8 = 0x18;
const ESC: u8 = 0x1b;
const FS: u8 = 0x1c;
const GS: u8 = 0x1d;

/// What a command does, as far as reading receipts is concerned. Arguments that change what
/// the text *says* (code page) are kept; arguments that only change how it looks mostly are too,
/// for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `ESC @`: clears the print buffer and resets every mode, the code page included.
    Init,
    /// `LF`: prints the line.
    LineFeed,
    /// `CR`: prints the line on printers with automatic line feed, otherwise ignored. Taken as a
    /// line end: with `CR LF` the empty line in between is dropped anyway.
    CarriageReturn,
    /// `HT`: moves to the next tab stop.
    Tab,
    /// `FF`: prints (page mode) or feeds to the next page; ends the line either way.
    FormFeed,
    /// `ESC d n`, `ESC J n`, `ESC e n`, `ESC K n`: prints the line, then feeds.
    Feed,
    /// `ESC a n`.
    Align(u8),
    /// `ESC E n`.
    Emphasis(u8),
    /// `ESC ! n`.
    PrintMode(u8),
    /// `ESC - n`.
    Underline(u8),
    /// `ESC G n`.
    DoubleStrike(u8),
    /// `GS ! n`.
    CharSize(u8),
    /// `ESC t n`: selects the character code table for the text that follows.
    CodePage(u8),
    /// `ESC p m t1 t2`: opens the cash drawer.
    DrawerPulse,
    /// `GS k`, both forms; its data follows as [`Token::Data`].
    Barcode,
    /// `GS H`, `GS h`, `GS w`, `GS f`: barcode and HRI settings.
    BarcodeSetup,
    /// `GS ( k`: QR code, PDF417 and other 2D symbols.
    TwoD,
    /// Raster, column and graphics images: `GS v 0`, `ESC *`, `GS ( L`, `GS 8 L`, `GS *`,
    /// `GS /`, `FS p`, `FS q`, `GS Q 0`.
    Image,
    /// `GS V` (all functions), and the older `ESC i` / `ESC m`.
    Cut { partial: bool },
    /// Status requests and replies set-up: `DLE EOT`, `DLE ENQ`, `DLE DC4`, `GS I`, `GS r`,
    /// `GS a`, `GS j`, `ESC v`.
    Status,
    /// Everything else this tokenizer knows: spacing, margins, positions, fonts, page mode,
    /// macros, user-defined characters, beeper.
    Setting,
    /// An `ESC`, `GS` or `FS` command this tokenizer does not know, taken with one argument.
    Unknown,
    /// A byte that starts no command: NUL, BEL, a stray introducer, noise.
    Control(u8),
}

/// One piece of an ESC/POS stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// Printable bytes (0x20 and up), in the code page in force.
    Text(&'a [u8]),
    /// A command with its arguments, without any data block.
    Command(Command, &'a [u8]),
    /// (Part of) the data block of the command before it: image bits, barcode digits, a QR
    /// payload. Never text, never a command.
    Data(&'a [u8]),
}

impl Token<'_> {
    /// Bytes this token covers.
    pub fn len(&self) -> usize {
        match self {
            Token::Text(b) | Token::Command(_, b) | Token::Data(b) => b.len(),
        }
    }

    /// Never true: every token covers at least one byte (so a tokenizing loop always advances).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the tokenizer is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Between commands.
    Free,
    /// `left` more bytes of a data block, then `then`.
    Data { left: u64, then: Then },
    /// `GS k` form 1: printable data up to a NUL.
    BarcodeText,
    /// `ESC D`: tab positions up to a NUL, at most `left` more.
    TabStops(u8),
    /// `ESC &`: the width byte of the next of `left` user-defined characters, `y` bytes a column.
    UserChar { y: u8, left: u8 },
    /// `FS q`: the size header of the next of `left` NV images.
    NvImage { left: u8 },
}

/// Where a command with several data blocks goes on after one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Free,
    UserChar { y: u8, left: u8 },
    NvImage { left: u8 },
}

impl From<Then> for Pending {
    fn from(t: Then) -> Pending {
        match t {
            Then::Free => Pending::Free,
            Then::UserChar { y, left } => Pending::UserChar { y, left },
            Then::NvImage { left } => Pending::NvImage { left },
        }
    }
}

/// A command header read from the front of a buffer.
enum Header {
    /// More bytes are needed to know the command and its length.
    NeedMore,
    /// The introducer starts no command; it stands alone.
    Lone,
    /// The command, its header length, and what follows it.
    Command(Command, usize, Pending),
}

fn data(command: Command, len: usize, data: u64) -> Header {
    let pending = if data == 0 {
        Pending::Free
    } else {
        Pending::Data {
            left: data,
            then: Then::Free,
        }
    };
    Header::Command(command, len, pending)
}

fn fixed(command: Command, len: usize) -> Header {
    Header::Command(command, len, Pending::Free)
}

fn le16(lo: u8, hi: u8) -> u64 {
    u64::from(lo) | u64::from(hi) << 8
}

/// An incremental ESC/POS tokenizer. Feed it the unconsumed bytes; it returns the token at
/// their front and remembers any data block still to come.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pending: Pending,
    max_data: u64,
}

impl Tokenizer {
    /// `max_data` is the largest data block taken as real; see the module's invariants.
    pub fn new(max_data: u64) -> Self {
        Self {
            pending: Pending::Free,
            max_data,
        }
    }

    /// Forgets any command in progress (at a frame boundary).
    pub fn reset(&mut self) {
        self.pending = Pending::Free;
    }

    /// Whether the next byte starts a token of its own (text or a command), rather than
    /// continuing a command's data.
    pub fn is_free(&self) -> bool {
        self.pending == Pending::Free
    }

    /// The token at the front of `buf`, or `None` when `buf` is empty or holds only the first
    /// part of a command header (nothing is consumed then: call again with more bytes).
    pub fn next<'a>(&mut self, buf: &'a [u8]) -> Option<Token<'a>> {
        let &first = buf.first()?;
        match self.pending {
            Pending::Free => {}
            Pending::Data { left, then } => {
                let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                let left = left - n as u64;
                self.pending = if left == 0 {
                    then.into()
                } else {
                    Pending::Data { left, then }
                };
                return Some(Token::Data(&buf[..n]));
            }
            Pending::BarcodeText => {
                // The printer ends form-1 data at NUL; any other control byte cannot be barcode
                // data, so it ends the barcode too (and is read as what it is), which keeps a
                // missing NUL from eating the rest of the receipt.
                match buf.iter().position(|&b| b < 0x20 || b == 0x7f) {
                    Some(i) if buf[i] == NUL => {
                        self.pending = Pending::Free;
                        return Some(Token::Data(&buf[..=i]));
                    }
                    Some(0) => self.pending = Pending::Free,
                    Some(i) => {
                        self.pending = Pending::Free;
                        return Some(Token::Data(&buf[..i]));
                    }
                    None => return Some(Token::Data(buf)),
                }
            }
            Pending::TabStops(left) => {
                let take = buf.len().min(usize::from(left));
                if let Some(i) = buf[..take].iter().position(|&b| b == NUL) {
                    self.pending = Pending::Free;
                    return Some(Token::Data(&buf[..=i]));
                }
                let left = left - take as u8;
                self.pending = if left == 0 {
                    Pending::Free
                } else {
                    Pending::TabStops(left)
                };
                return Some(Token::Data(&buf[..take]));
            }
            Pending::UserChar { y, left } => {
                let then = match left - 1 {
                    0 => Then::Free,
                    left => Then::UserChar { y, left },
                };
                let bytes = u64::from(y) * u64::from(first);
                self.pending = if bytes == 0 {
                    then.into()
                } else {
                    Pending::Data { left: bytes, then }
                };
                return Some(Token::Data(&buf[..1]));
            }
            Pending::NvImage { left } => {
                if buf.len() < 4 {
                    return None;
                }
                let (x, y) = (le16(buf[0], buf[1]), le16(buf[2], buf[3]));
                let then = match left - 1 {
                    0 => Then::Free,
                    left => Then::NvImage { left },
                };
                if (1..=1023).contains(&x) && (1..=288).contains(&y) && x * y * 8 <= self.max_data {
                    self.pending = Pending::Data {
                        left: x * y * 8,
                        then,
                    };
                    return Some(Token::Data(&buf[..4]));
                }
                // Sizes out of the printer's range: the command ends here, and the bytes are
                // read afresh.
                self.pending = Pending::Free;
            }
        }
        self.free(buf)
    }

    /// A token that starts at `buf[0]`, between commands.
    fn free<'a>(&mut self, buf: &'a [u8]) -> Option<Token<'a>> {
        let first = buf[0];
        if first >= 0x20 {
            let end = buf.iter().position(|&b| b < 0x20).unwrap_or(buf.len());
            return Some(Token::Text(&buf[..end]));
        }
        let header = match first {
            LF => fixed(Command::LineFeed, 1),
            CR => fixed(Command::CarriageReturn, 1),
            HT => fixed(Command::Tab, 1),
            FF => fixed(Command::FormFeed, 1),
            CAN => fixed(Command::Setting, 1),
            ESC => esc(buf),
            GS => gs(buf),
            FS => fs(buf),
            DLE => dle(buf),
            other => fixed(Command::Control(other), 1),
        };
        match header {
            Header::NeedMore => None,
            Header::Command(command, len, pending) if self.plausible(pending) => {
                self.pending = pending;
                Some(Token::Command(command, &buf[..len]))
            }
            Header::Command(..) | Header::Lone => {
                Some(Token::Command(Command::Control(first), &buf[..1]))
            }
        }
    }

    fn plausible(&self, pending: Pending) -> bool {
        match pending {
            Pending::Data { left, .. } => left <= self.max_data,
            _ => true,
        }
    }
}

/// `ESC/GS/FS x` with one argument byte: the common shape of both known and unknown commands.
fn one_arg(buf: &[u8], command: Command) -> Header {
    if buf.len() < 3 {
        Header::NeedMore
    } else {
        fixed(command, 3)
    }
}

/// A command of exactly `len` bytes.
fn exactly(buf: &[u8], command: Command, len: usize) -> Header {
    if buf.len() < len {
        Header::NeedMore
    } else {
        fixed(command, len)
    }
}

/// `x ( fn pL pH data`: the length-prefixed shape of `ESC (`, `GS (` and `FS (`.
fn length_prefixed(buf: &[u8], command: Command) -> Header {
    if buf.len() < 5 {
        return Header::NeedMore;
    }
    data(command, 5, le16(buf[3], buf[4]))
}

/// The function byte after an introducer, or why there is none.
fn function(buf: &[u8]) -> Result<u8, Header> {
    match buf.get(1) {
        None => Err(Header::NeedMore),
        // Every ESC/GS/FS function byte is printable (ESC FF and GS FF aside, handled by the
        // callers): a control byte here means the introducer was noise.
        Some(&f) => Ok(f),
    }
}

fn esc(buf: &[u8]) -> Header {
    let f = match function(buf) {
        Ok(f) => f,
        Err(h) => return h,
    };
    match f {
        FF => fixed(Command::FormFeed, 2),
        0x00..=0x1f => Header::Lone,
        b'@' => fixed(Command::Init, 2),
        b'i' | b'm' => fixed(Command::Cut { partial: true }, 2),
        b'2' | b'<' | b'S' | b'L' => fixed(Command::Setting, 2),
        b'v' => fixed(Command::Status, 2),
        b'a' => one_arg(buf, Command::Align(*buf.get(2).unwrap_or(&0))),
        b'E' => one_arg(buf, Command::Emphasis(*buf.get(2).unwrap_or(&0))),
        b'!' => one_arg(buf, Command::PrintMode(*buf.get(2).unwrap_or(&0))),
        b'-' => one_arg(buf, Command::Underline(*buf.get(2).unwrap_or(&0))),
        b'G' => one_arg(buf, Command::DoubleStrike(*buf.get(2).unwrap_or(&0))),
        b't' => one_arg(buf, Command::CodePage(*buf.get(2).unwrap_or(&0))),
        b'd' | b'J' | b'e' | b'K' => one_arg(buf, Command::Feed),
        b'p' => exactly(buf, Command::DrawerPulse, 5),
        b'$' | b'\\' | b'c' | b'f' => exactly(buf, Command::Setting, 4),
        b'W' => exactly(buf, Command::Setting, 10),
        b'(' => length_prefixed(buf, Command::Setting),
        b'*' => {
            if buf.len() < 5 {
                return Header::NeedMore;
            }
            let columns = le16(buf[3], buf[4]);
            match buf[2] {
                0 | 1 => data(Command::Image, 5, columns),
                32 | 33 => data(Command::Image, 5, columns * 3),
                _ => Header::Lone,
            }
        }
        b'&' => {
            if buf.len() < 5 {
                return Header::NeedMore;
            }
            let (y, c1, c2) = (buf[2], buf[3], buf[4]);
            if !(1..=6).contains(&y) || !(32..=126).contains(&c1) || !(c1..=126).contains(&c2) {
                return Header::Lone;
            }
            Header::Command(
                Command::Setting,
                5,
                Pending::UserChar {
                    y,
                    left: c2 - c1 + 1,
                },
            )
        }
        b'D' => Header::Command(Command::Setting, 2, Pending::TabStops(32)),
        _ => one_arg(buf, Command::Unknown),
    }
}

fn gs(buf: &[u8]) -> Header {
    let f = match function(buf) {
        Ok(f) => f,
        Err(h) => return h,
    };
    match f {
        FF => fixed(Command::FormFeed, 2),
        0x00..=0x1f => Header::Lone,
        b'!' => one_arg(buf, Command::CharSize(*buf.get(2).unwrap_or(&0))),
        b'H' | b'h' | b'w' | b'f' => one_arg(buf, Command::BarcodeSetup),
        b'I' | b'r' | b'a' | b'j' => one_arg(buf, Command::Status),
        b'/' => one_arg(buf, Command::Image),
        b':' | b'<' | b'c' => fixed(Command::Setting, 2),
        b'L' | b'W' | b'P' | b'$' | b'\\' => exactly(buf, Command::Setting, 4),
        b'^' | b'z' => exactly(buf, Command::Setting, 5),
        b'g' => exactly(buf, Command::Setting, 6),
        b'V' => {
            let Some(&m) = buf.get(2) else {
                return Header::NeedMore;
            };
            match m {
                0 | 48 => fixed(Command::Cut { partial: false }, 3),
                1 | 49 => fixed(Command::Cut { partial: true }, 3),
                65 | 97 | 103 => exactly(buf, Command::Cut { partial: false }, 4),
                66 | 98 | 104 => exactly(buf, Command::Cut { partial: true }, 4),
                // Not a cut function: the printer ignores it, and so do we.
                _ => fixed(Command::Unknown, 3),
            }
        }
        b'k' => {
            let Some(&m) = buf.get(2) else {
                return Header::NeedMore;
            };
            match m {
                0..=6 => Header::Command(Command::Barcode, 3, Pending::BarcodeText),
                65..=79 => match buf.get(3) {
                    None => Header::NeedMore,
                    Some(&n) => data(Command::Barcode, 4, u64::from(n)),
                },
                _ => fixed(Command::Unknown, 3),
            }
        }
        b'(' => {
            let command = match buf.get(2) {
                None => return Header::NeedMore,
                Some(b'k') => Command::TwoD,
                Some(b'L') => Command::Image,
                Some(_) => Command::Setting,
            };
            length_prefixed(buf, command)
        }
        b'8' => {
            if buf.len() < 7 {
                return Header::NeedMore;
            }
            let len = u64::from_le_bytes([buf[3], buf[4], buf[5], buf[6], 0, 0, 0, 0]);
            data(Command::Image, 7, len)
        }
        b'v' => {
            if buf.len() < 8 {
                return Header::NeedMore;
            }
            if buf[2] != b'0' || !matches!(buf[3], 0..=3 | 48..=51) {
                return Header::Lone;
            }
            data(
                Command::Image,
                8,
                le16(buf[4], buf[5]) * le16(buf[6], buf[7]),
            )
        }
        b'*' => {
            if buf.len() < 4 {
                return Header::NeedMore;
            }
            data(Command::Image, 4, u64::from(buf[2]) * u64::from(buf[3]) * 8)
        }
        b'Q' => {
            // GS Q 0 m xL xH yL yH: a variable vertical size image, x × y bytes.
            if buf.len() < 8 {
                return Header::NeedMore;
            }
            if buf[2] != b'0' {
                return Header::Lone;
            }
            data(
                Command::Image,
                8,
                le16(buf[4], buf[5]) * le16(buf[6], buf[7]),
            )
        }
        _ => one_arg(buf, Command::Unknown),
    }
}

fn fs(buf: &[u8]) -> Header {
    let f = match function(buf) {
        Ok(f) => f,
        Err(h) => return h,
    };
    match f {
        0x00..=0x1f => Header::Lone,
        b'&' | b'.' => fixed(Command::Setting, 2),
        b'!' | b'-' | b'C' | b'W' => one_arg(buf, Command::Setting),
        b'S' => exactly(buf, Command::Setting, 4),
        b'p' => exactly(buf, Command::Image, 4),
        b'(' => length_prefixed(buf, Command::Setting),
        b'q' => match buf.get(2) {
            None => Header::NeedMore,
            Some(0) => Header::Lone,
            Some(&n) => Header::Command(Command::Image, 3, Pending::NvImage { left: n }),
        },
        _ => one_arg(buf, Command::Unknown),
    }
}

fn dle(buf: &[u8]) -> Header {
    let Some(&f) = buf.get(1) else {
        return Header::NeedMore;
    };
    match f {
        EOT | ENQ => exactly(buf, Command::Status, 3),
        DC4 => match buf.get(2) {
            None => Header::NeedMore,
            Some(1..=3) => exactly(buf, Command::Status, 5),
            Some(7) => exactly(buf, Command::Status, 4),
            Some(8) => exactly(buf, Command::Status, 10),
            Some(_) => exactly(buf, Command::Status, 3),
        },
        _ => Header::Lone,
    }
}

/// A character code table a printer can be switched to with `ESC t n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodePage {
    /// A DOS code page, by number (437, 850, 858, …), decoded with `oem_cp`.
    Oem(u16),
    /// Epson's WPC1252: Windows-1252.
    Windows1252,
    /// A table we cannot decode (Katakana, user-defined, …): bytes from 0x80 up become U+FFFD.
    Unknown(u8),
}

impl CodePage {
    /// The table `ESC t n` selects, per Epson's numbering.
    pub fn from_esc_t(n: u8) -> CodePage {
        match n {
            0 => CodePage::Oem(437),
            2 => CodePage::Oem(850),
            3 => CodePage::Oem(860),
            4 => CodePage::Oem(863),
            5 => CodePage::Oem(865),
            13 => CodePage::Oem(857),
            14 => CodePage::Oem(737),
            16 => CodePage::Windows1252,
            17 => CodePage::Oem(866),
            18 => CodePage::Oem(852),
            19 => CodePage::Oem(858),
            n => CodePage::Unknown(n),
        }
    }

    /// The names a template may use for its default code page.
    pub const NAMES: &'static str =
        "cp437, cp737, cp850, cp852, cp857, cp858, cp860, cp863, cp865, cp866, wpc1252";

    /// A code page by its template name (`cp858`, `wpc1252`, …).
    pub fn from_name(name: &str) -> Option<CodePage> {
        let name = name.to_ascii_lowercase();
        if name == "wpc1252" || name == "cp1252" || name == "windows-1252" {
            return Some(CodePage::Windows1252);
        }
        let number: u16 = name.strip_prefix("cp")?.parse().ok()?;
        matches!(
            number,
            437 | 737 | 850 | 852 | 857 | 858 | 860 | 863 | 865 | 866
        )
        .then_some(CodePage::Oem(number))
    }

    /// Appends `bytes` (printable bytes in this code page) to `out` as UTF-8, leaving out control
    /// characters, which print nothing.
    pub fn decode_into(self, bytes: &[u8], out: &mut String) {
        let decoded = match self {
            CodePage::Oem(n) => match oem_cp::code_table::DECODING_TABLE_CP_MAP.get(&n) {
                Some(table) => table.decode_string_lossy(bytes),
                None => String::from_utf8_lossy(bytes).into_owned(),
            },
            CodePage::Windows1252 => encoding_rs::WINDOWS_1252
                .decode_without_bom_handling(bytes)
                .0
                .into_owned(),
            CodePage::Unknown(_) => bytes
                .iter()
                .map(|&b| if b < 0x80 { char::from(b) } else { '\u{fffd}' })
                .collect(),
        };
        out.extend(decoded.chars().filter(|c| !c.is_control()));
    }
}

/// The text lines a printer prints for `frame`, decoded to UTF-8: commands and their data are
/// left out, `LF`, `CR`, `FF` and the feed commands end a line, `HT` stays a tab, `ESC @`
/// discards the unprinted line and returns to `default` (the printer's configured code page),
/// `ESC t` switches the code page. Trailing blanks are trimmed and blank lines dropped, so that
/// line numbers count printed lines only.
pub fn printed_lines(frame: &[u8], default: CodePage) -> Vec<String> {
    let mut tokenizer = Tokenizer::new(frame.len() as u64);
    let mut page = default;
    let mut line = String::new();
    let mut lines = Vec::new();
    let mut flush = |line: &mut String| {
        let printed = line.trim_end();
        if !printed.trim_start().is_empty() {
            lines.push(printed.to_string());
        }
        line.clear();
    };
    let mut at = 0;
    while let Some(token) = tokenizer.next(&frame[at..]) {
        at += token.len();
        match token {
            Token::Text(bytes) => page.decode_into(bytes, &mut line),
            Token::Command(command, _) => match command {
                Command::LineFeed
                | Command::CarriageReturn
                | Command::FormFeed
                | Command::Feed
                | Command::Cut { .. } => flush(&mut line),
                Command::Tab => line.push('\t'),
                Command::Init => {
                    line.clear();
                    page = default;
                }
                Command::CodePage(n) => page = CodePage::from_esc_t(n),
                _ => {}
            },
            Token::Data(_) => {}
        }
    }
    // A frame that ends mid-command (the stream stopped) leaves its last bytes unread: they are
    // an unfinished command, not text.
    flush(&mut line);
    lines
}

/// ESC/POS receipts: a frame runs up to and including the paper cut (`GS V`, `ESC i`,
/// `ESC m`). With a configured trailer, that byte string ends a frame instead and cuts do not
/// (for printers that cut mid-receipt, or never): the trailer counts only where a token may
/// start, never inside a command's arguments or data. Frames are capped at `max` bytes (see
/// [`Frame::Oversized`]); at end of stream a receipt without its cut is handed on as it is.
#[derive(Debug)]
pub struct CutFramer {
    trailer: Option<Vec<u8>>,
    max: usize,
    tokenizer: Tokenizer,
    /// Bytes at the front of the buffer already tokenized, all part of the current frame.
    scanned: usize,
    /// Skipping the rest of an oversized frame: its head, and the bytes dropped so far.
    oversized: Option<(Bytes, u64)>,
}

enum Scan {
    /// The current frame ends here (exclusive).
    End(usize),
    /// Not yet: wait for more bytes.
    More,
}

impl CutFramer {
    pub fn new(trailer: Option<Vec<u8>>, max: usize) -> Self {
        Self {
            trailer: trailer.filter(|t| !t.is_empty()),
            max,
            tokenizer: Tokenizer::new(max as u64),
            scanned: 0,
            oversized: None,
        }
    }

    /// Whether the trailer is at `buf[at..]`: `Some(true)` yes, `Some(false)` no, `None` cannot
    /// tell yet (the buffer ends inside what could be the trailer).
    fn trailer_at(trailer: &[u8], buf: &[u8], at: usize) -> Option<bool> {
        let rest = &buf[at..];
        if rest.len() >= trailer.len() {
            Some(rest.starts_with(trailer))
        } else if trailer.starts_with(rest) {
            None
        } else {
            Some(false)
        }
    }

    /// Tokenizes on from `self.scanned` until the frame ends or the bytes run out.
    fn scan(&mut self, buf: &[u8]) -> Scan {
        let mut at = self.scanned;
        loop {
            if let Some(trailer) = &self.trailer
                && self.tokenizer.is_free()
                && at < buf.len()
            {
                match Self::trailer_at(trailer, buf, at) {
                    Some(true) => return Scan::End(at + trailer.len()),
                    Some(false) => {}
                    None => {
                        self.scanned = at;
                        return Scan::More;
                    }
                }
            }
            let Some(token) = self.tokenizer.next(&buf[at..]) else {
                self.scanned = at;
                return Scan::More;
            };
            match (token, &self.trailer) {
                (Token::Command(Command::Cut { .. }, bytes), None) => {
                    return Scan::End(at + bytes.len());
                }
                (Token::Text(run), Some(trailer)) => {
                    // The trailer may start anywhere in a run of text; the run's first byte
                    // was checked above.
                    for i in at + 1..at + run.len() {
                        match Self::trailer_at(trailer, buf, i) {
                            Some(true) => return Scan::End(i + trailer.len()),
                            Some(false) => {}
                            None => {
                                self.scanned = i;
                                return Scan::More;
                            }
                        }
                    }
                    at += run.len();
                }
                (token, _) => at += token.len(),
            }
        }
    }

    fn end_frame(&mut self) {
        self.scanned = 0;
        self.tokenizer.reset();
    }
}

impl Decoder for CutFramer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        match self.scan(buf) {
            Scan::End(end) => {
                self.end_frame();
                if let Some((head, dropped)) = self.oversized.take() {
                    buf.advance(end);
                    return Ok(Some(Frame::Oversized {
                        head,
                        len: dropped + end as u64,
                    }));
                }
                let frame = buf.split_to(end).freeze();
                if end > self.max {
                    return Ok(Some(Frame::Oversized {
                        head: frame.slice(..self.max),
                        len: end as u64,
                    }));
                }
                Ok(Some(Frame::Data(frame)))
            }
            Scan::More => {
                // Everything in the buffer belongs to the current frame here.
                if self.oversized.is_none() && buf.len() > self.max {
                    self.oversized = Some((Bytes::copy_from_slice(&buf[..self.max]), 0));
                }
                if let Some((_, dropped)) = &mut self.oversized {
                    buf.advance(self.scanned);
                    *dropped += self.scanned as u64;
                    self.scanned = 0;
                }
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        self.end_frame();
        if let Some((head, dropped)) = self.oversized.take() {
            let len = dropped + buf.len() as u64;
            buf.clear();
            return Ok(Some(Frame::Oversized { head, len }));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        // A receipt without its cut: the stream ended (printer off, cable pulled). Hand it on;
        // the parser decides whether it is a whole receipt.
        Ok(Some(Frame::Data(buf.split().freeze())))
    }
}

/// A small ESC/POS writer for tests: what a register sends to its printer.
#[cfg(test)]
pub(crate) mod testing {
    use super::{ESC, GS, LF};

    #[derive(Debug, Default, Clone)]
    pub struct Printer {
        pub out: Vec<u8>,
    }

    impl Printer {
        pub fn new() -> Self {
            Self::default()
        }

        pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
            self.out.extend_from_slice(bytes);
            self
        }

        pub fn init(&mut self) -> &mut Self {
            self.raw(&[ESC, b'@'])
        }

        /// `ESC t 19`, CP858: the page [`Printer::text`] encodes in.
        pub fn cp858(&mut self) -> &mut Self {
            self.raw(&[ESC, b't', 19])
        }

        pub fn text(&mut self, s: &str) -> &mut Self {
            let bytes = oem_cp::encode_string_lossy(s, &oem_cp::code_table::ENCODING_TABLE_CP858);
            self.raw(&bytes)
        }

        pub fn line(&mut self, s: &str) -> &mut Self {
            self.text(s).raw(&[LF])
        }

        /// A line `width` wide with `left` and `right` flush to either side.
        pub fn cols(&mut self, left: &str, right: &str) -> &mut Self {
            let gap = 48usize
                .saturating_sub(left.chars().count() + right.chars().count())
                .max(2);
            self.line(&format!("{left}{}{right}", " ".repeat(gap)))
        }

        /// `GS v 0`: a raster image of `data.len() / width` rows.
        pub fn raster(&mut self, width: u8, data: &[u8]) -> &mut Self {
            let rows = (data.len() / usize::from(width.max(1))) as u16;
            let [yl, yh] = rows.to_le_bytes();
            self.raw(&[GS, b'v', b'0', 0, width, 0, yl, yh]);
            self.raw(&data[..usize::from(width) * usize::from(rows)])
        }

        /// `GS k` form 2, CODE128, which may carry any byte below 0x80.
        pub fn code128(&mut self, data: &[u8]) -> &mut Self {
            self.raw(&[GS, b'k', 73, data.len() as u8]).raw(data)
        }

        /// `GS V 66 0`: feed and partial cut.
        pub fn cut(&mut self) -> &mut Self {
            self.raw(&[GS, b'V', 66, 0])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Printer;
    use super::*;
    use proptest::prelude::*;

    /// All tokens of `input`, tokenized whole, as (kind, bytes) for easy comparison.
    fn tokens(input: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut t = Tokenizer::new(1 << 20);
        let mut at = 0;
        let mut out = Vec::new();
        while let Some(token) = t.next(&input[at..]) {
            at += token.len();
            let (kind, bytes) = match token {
                Token::Text(b) => ("text".to_string(), b),
                Token::Command(c, b) => (format!("{c:?}"), b),
                Token::Data(b) => ("data".to_string(), b),
            };
            out.push((kind, bytes.to_vec()));
        }
        assert_eq!(at, input.len(), "tokenizing stopped early");
        out
    }

    fn kinds(input: &[u8]) -> Vec<String> {
        tokens(input).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn text_and_line_ends() {
        assert_eq!(
            tokens(b"ab\r\n\tc\x0c"),
            vec![
                ("text".into(), b"ab".to_vec()),
                ("CarriageReturn".into(), b"\r".to_vec()),
                ("LineFeed".into(), b"\n".to_vec()),
                ("Tab".into(), b"\t".to_vec()),
                ("text".into(), b"c".to_vec()),
                ("FormFeed".into(), b"\x0c".to_vec()),
            ]
        );
    }

    #[test]
    fn init_alignment_emphasis_and_print_modes() {
        let input = [
            ESC, b'@', ESC, b'a', 1, ESC, b'E', 1, ESC, b'!', 0x38, ESC, b'-', 2, ESC, b'G', 1, GS,
            b'!', 0x11,
        ];
        assert_eq!(
            kinds(&input),
            [
                "Init",
                "Align(1)",
                "Emphasis(1)",
                "PrintMode(56)",
                "Underline(2)",
                "DoubleStrike(1)",
                "CharSize(17)"
            ]
        );
    }

    #[test]
    fn arguments_that_look_like_commands_stay_arguments() {
        // ESC ! 0x1d and ESC E 0x0a: the argument bytes are GS and LF, but they are arguments.
        let input = [ESC, b'!', GS, b'V', 0, ESC, b'E', LF];
        assert_eq!(
            kinds(&input),
            ["PrintMode(29)", "text", "Control(0)", "Emphasis(10)"]
        );
        assert_eq!(tokens(&input)[1].1, b"V");
    }

    #[test]
    fn code_page_feeds_and_drawer() {
        let input = [
            ESC, b't', 19, ESC, b'd', 3, ESC, b'J', 40, ESC, b'p', 0, 25, 250, b'x',
        ];
        assert_eq!(
            tokens(&input),
            vec![
                ("CodePage(19)".into(), vec![ESC, b't', 19]),
                ("Feed".into(), vec![ESC, b'd', 3]),
                ("Feed".into(), vec![ESC, b'J', 40]),
                ("DrawerPulse".into(), vec![ESC, b'p', 0, 25, 250]),
                ("text".into(), b"x".to_vec()),
            ]
        );
    }

    #[test]
    fn barcodes_both_forms_and_hri_settings() {
        let mut input = vec![GS, b'H', 2, GS, b'h', 80, GS, b'w', 2, GS, b'f', 0];
        // Form 1: EAN-13 digits up to NUL.
        input.extend_from_slice(&[GS, b'k', 2]);
        input.extend_from_slice(b"4006381333931\0");
        // Form 2: CODE128 with a length byte; its data may hold any byte, a cut included.
        let code = [b'{', b'B', GS, b'V', 0, b'1'];
        input.extend_from_slice(&[GS, b'k', 73, code.len() as u8]);
        input.extend_from_slice(&code);
        input.push(b'z');
        assert_eq!(
            tokens(&input),
            vec![
                ("BarcodeSetup".into(), vec![GS, b'H', 2]),
                ("BarcodeSetup".into(), vec![GS, b'h', 80]),
                ("BarcodeSetup".into(), vec![GS, b'w', 2]),
                ("BarcodeSetup".into(), vec![GS, b'f', 0]),
                ("Barcode".into(), vec![GS, b'k', 2]),
                ("data".into(), b"4006381333931\0".to_vec()),
                ("Barcode".into(), vec![GS, b'k', 73, 6]),
                ("data".into(), code.to_vec()),
                ("text".into(), b"z".to_vec()),
            ]
        );
    }

    #[test]
    fn a_form_1_barcode_without_its_nul_ends_at_a_control_byte() {
        let input = [GS, b'k', 4, b'A', b'B', LF, b'x'];
        assert_eq!(kinds(&input), ["Barcode", "data", "LineFeed", "text"]);
    }

    #[test]
    fn qr_codes_carry_their_payload_as_data() {
        let payload = [b'1', b'P', b'0', GS, b'V', 0, ESC, b'@', LF];
        let mut input = vec![GS, b'(', b'k', 4, 0, 49, 65, 50, 0];
        input.extend_from_slice(&[GS, b'(', b'k', payload.len() as u8, 0]);
        input.extend_from_slice(&payload);
        input.extend_from_slice(&[GS, b'(', b'k', 3, 0, 49, 81, 48]);
        assert_eq!(
            kinds(&input),
            ["TwoD", "data", "TwoD", "data", "TwoD", "data"]
        );
    }

    #[test]
    fn images_of_every_kind_hide_cuts_and_line_feeds() {
        let bits = [0xff, GS, b'V', 0, LF, ESC, b'@', ESC, b'i'];
        // GS v 0: 3 bytes wide, 3 rows.
        let mut raster = vec![GS, b'v', b'0', 0, 3, 0, 3, 0];
        raster.extend_from_slice(&bits);
        // ESC * 33: 24-dot columns, 3 bytes each.
        let mut column = vec![ESC, b'*', 33, 3, 0];
        column.extend_from_slice(&bits);
        // GS ( L with a 2-byte length; GS 8 L with a 4-byte length.
        let mut graphics = vec![GS, b'(', b'L', bits.len() as u8, 0];
        graphics.extend_from_slice(&bits);
        let mut large = vec![GS, b'8', b'L', bits.len() as u8, 0, 0, 0];
        large.extend_from_slice(&bits);
        // GS * 1 1: a downloaded image of 1 × 1 × 8 bytes.
        let mut downloaded = vec![GS, b'*', 1, 1];
        downloaded.extend_from_slice(&bits[..8]);
        for image in [raster, column, graphics, large, downloaded] {
            let mut input = image.clone();
            input.extend_from_slice(b"ok");
            let got = tokens(&input);
            assert_eq!(got.len(), 3, "{got:?}");
            assert_eq!(got[0].0, "Image");
            assert_eq!(got[1].0, "data");
            assert_eq!(got[2], ("text".to_string(), b"ok".to_vec()));
        }
    }

    #[test]
    fn every_cut_form() {
        let cuts: [(&[u8], bool); 14] = [
            (&[GS, b'V', 0], false),
            (&[GS, b'V', 48], false),
            (&[GS, b'V', 1], true),
            (&[GS, b'V', 49], true),
            (&[GS, b'V', 65, 3], false),
            (&[GS, b'V', 66, 0], true),
            (&[GS, b'V', 97, 5], false),
            (&[GS, b'V', 98, 5], true),
            (&[GS, b'V', 103, 5], false),
            (&[GS, b'V', 104, 5], true),
            (&[ESC, b'i'], true),
            (&[ESC, b'm'], true),
            // The cut's own argument may look like a command byte.
            (&[GS, b'V', 65, ESC], false),
            (&[GS, b'V', 66, LF], true),
        ];
        for (bytes, partial) in cuts {
            let mut input = bytes.to_vec();
            input.push(b'x');
            let got = tokens(&input);
            assert_eq!(
                got[0],
                (format!("{:?}", Command::Cut { partial }), bytes.to_vec())
            );
            assert_eq!(got[1], ("text".to_string(), b"x".to_vec()));
        }
        // GS V with a function the printer does not know is no cut.
        assert_eq!(kinds(&[GS, b'V', 2, b'x']), ["Unknown", "text"]);
    }

    #[test]
    fn unknown_commands_take_one_argument() {
        assert_eq!(
            tokens(&[ESC, b'y', GS, b'a', b'b']),
            vec![
                ("Unknown".into(), vec![ESC, b'y', GS]),
                ("text".into(), b"ab".to_vec())
            ]
        );
        assert_eq!(kinds(&[GS, b'y', 0, FS, b'y', 7]), ["Unknown", "Unknown"]);
    }

    #[test]
    fn noise_resynchronises_at_the_next_byte() {
        // An introducer before a control byte starts nothing; NUL and BEL are lone bytes.
        assert_eq!(
            kinds(&[ESC, LF, GS, ESC, b'@', 0, 7, b'a']),
            [
                "Control(27)",
                "LineFeed",
                "Control(29)",
                "Init",
                "Control(0)",
                "Control(7)",
                "text"
            ]
        );
        // DLE EOT is a status request; DLE before anything else is noise.
        assert_eq!(
            kinds(&[DLE, EOT, 1, DLE, b'x']),
            ["Status", "Control(16)", "text"]
        );
    }

    #[test]
    fn an_implausible_data_length_is_noise_not_a_swallowed_stream() {
        // GS v 0 declaring 255 × 255 bytes, with a tokenizer capped at 1000 bytes.
        let mut t = Tokenizer::new(1000);
        let input = [GS, b'v', b'0', 0, 255, 0, 255, 0, b'x'];
        let first = t.next(&input).unwrap();
        assert_eq!(first, Token::Command(Command::Control(GS), &[GS]));
        assert!(t.is_free());
        assert_eq!(t.next(&input[1..]), Some(Token::Text(b"v0")));
    }

    #[test]
    fn a_header_split_across_reads_waits_for_the_rest() {
        let mut t = Tokenizer::new(1 << 20);
        assert_eq!(t.next(&[GS, b'v', b'0', 0, 2]), None);
        assert_eq!(t.next(&[ESC]), None);
        let full = [GS, b'v', b'0', 0, 2, 0, 1, 0, 0xaa];
        assert!(matches!(t.next(&full), Some(Token::Command(Command::Image, b)) if b.len() == 8));
        assert_eq!(t.next(&full[8..]), Some(Token::Data(&[0xaa, 0][..1])));
    }

    #[test]
    fn multi_block_commands() {
        // ESC & 2 65 66: two user characters, widths 1 and 2, 2 bytes per column.
        let input = [
            ESC, b'&', 2, 65, 66, 1, GS, b'V', 2, 0xaa, 0xbb, 0xcc, 0xdd, b'z',
        ];
        let got = kinds(&input);
        assert_eq!(got.first().map(String::as_str), Some("Setting"));
        assert_eq!(got.last().map(String::as_str), Some("text"));
        assert!(got[1..got.len() - 1].iter().all(|k| k == "data"), "{got:?}");
        // ESC D: tab stops up to NUL.
        assert_eq!(
            kinds(&[ESC, b'D', 8, 16, 24, 0, b'z']),
            ["Setting", "data", "text"]
        );
        // FS q 1: one NV image of 1 × 1 × 8 bytes.
        let mut nv = vec![FS, b'q', 1, 1, 0, 1, 0];
        nv.extend_from_slice(&[GS, b'V', 0, 1, 2, 3, 4, 5]);
        nv.push(b'z');
        assert_eq!(kinds(&nv), ["Image", "data", "data", "text"]);
    }

    #[test]
    fn code_pages_by_esc_t_and_name() {
        let mut s = String::new();
        CodePage::from_esc_t(0).decode_into(&[0x81, 0x9a, 0xe1], &mut s);
        CodePage::from_esc_t(2).decode_into(&[0xd5], &mut s);
        CodePage::from_esc_t(19).decode_into(&[0xd5], &mut s);
        CodePage::from_esc_t(16).decode_into(&[0x80, 0xe4], &mut s);
        CodePage::from_esc_t(1).decode_into(&[b'a', 0xb1], &mut s);
        assert_eq!(s, "üÜßı€€äa\u{fffd}");
        assert_eq!(CodePage::from_name("CP858"), Some(CodePage::Oem(858)));
        assert_eq!(CodePage::from_name("wpc1252"), Some(CodePage::Windows1252));
        assert_eq!(CodePage::from_name("cp999"), None);
        assert_eq!(CodePage::from_name("latin1"), None);
    }

    #[test]
    fn printed_lines_switch_code_pages_mid_receipt() {
        let mut p = Printer::new();
        p.init()
            .raw(&[ESC, b't', 2])
            .raw(b"A \xd5 ")
            .raw(&[ESC, b't', 19])
            .raw(b"\xd5\n")
            .raw(&[ESC, b't', 0])
            .raw(b"Gr\xe1\x84e\n")
            .raw(&[ESC, b't', 16])
            .raw(b"\x80 5\n");
        assert_eq!(
            printed_lines(&p.out, CodePage::Oem(858)),
            ["A ı €", "Grßäe", "€ 5"]
        );
    }

    #[test]
    fn printed_lines_leave_out_commands_images_and_blank_lines() {
        let mut p = Printer::new();
        p.raw(b"lost before init")
            .init()
            .raw(&[ESC, b't', 2])
            .raw(&[ESC, b'a', 1])
            .raster(2, &[b'X', b'Y', LF, GS])
            .line("  M\u{fc}ller  ")
            .raw(&[LF, LF])
            .raw(b"a\tb")
            .raw(&[ESC, b'd', 2])
            .raw(b"partial");
        // ESC @ drops the unprinted line and returns to the default code page (CP858: ü = 0x81).
        assert_eq!(
            printed_lines(&p.out, CodePage::Oem(858)),
            ["  Müller", "a\tb", "partial"]
        );
    }

    // ---- CutFramer

    /// Frames from `input` fed in pieces cut at `cuts`, then end of stream.
    fn frames(trailer: Option<&[u8]>, input: &[u8], cuts: &[usize], max: usize) -> Vec<Frame> {
        let mut framer = CutFramer::new(trailer.map(<[u8]>::to_vec), max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.sort_unstable();
        points.push(input.len());
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&input[at..p.max(at)]);
            at = p.max(at);
            while let Some(f) = framer.decode(&mut buf).expect("framing never fails") {
                out.push(f);
            }
        }
        while let Some(f) = framer.decode_eof(&mut buf).expect("framing never fails") {
            out.push(f);
        }
        out
    }

    fn data(bytes: &[u8]) -> Frame {
        Frame::Data(Bytes::copy_from_slice(bytes))
    }

    fn receipt(n: u32, logo: &[u8]) -> Vec<u8> {
        let mut p = Printer::new();
        p.init()
            .cp858()
            .raster(4, logo)
            .line(&format!("Bon {n} Grüße"))
            .code128(&[b'{', b'B', GS, b'V', 0])
            .cut();
        p.out
    }

    #[test]
    fn frames_end_at_each_cut_and_image_data_never_cuts() {
        let logo = [GS, b'V', 0, LF, ESC, b'i', GS, b'V', 65, 0, 1, 2];
        let (a, b) = (receipt(1, &logo), receipt(2, &logo));
        let input = [a.clone(), b.clone()].concat();
        assert_eq!(frames(None, &input, &[], 4096), vec![data(&a), data(&b)]);
        for i in 0..input.len() {
            assert_eq!(
                frames(None, &input, &[i], 4096),
                vec![data(&a), data(&b)],
                "split at {i}"
            );
        }
    }

    #[test]
    fn a_receipt_without_its_cut_is_handed_on_at_end_of_stream() {
        let input = b"\x1b@Bon 1\n\x1dV\x00\x1b@Bon 2\n";
        assert_eq!(
            frames(None, input, &[], 4096),
            vec![data(b"\x1b@Bon 1\n\x1dV\x00"), data(b"\x1b@Bon 2\n")]
        );
        assert_eq!(frames(None, b"", &[], 4096), vec![]);
    }

    #[test]
    fn a_trailer_ends_frames_instead_of_the_cut_but_not_inside_image_data() {
        let trailer = b"*** ENDE ***";
        let mut p = Printer::new();
        p.init()
            .raster(12, b"*** ENDE ***")
            .line("Bon 1")
            .cut()
            .line("Coupon")
            .raw(b"*** ENDE ***");
        let first = p.out.clone();
        let input = [first.clone(), b"\n\x1b@Bon 2 *** EN".to_vec()].concat();
        let expect = vec![data(&first), data(b"\n\x1b@Bon 2 *** EN")];
        for i in 0..input.len() {
            assert_eq!(
                frames(Some(trailer), &input, &[i], 4096),
                expect,
                "split at {i}"
            );
        }
    }

    #[test]
    fn an_oversized_receipt_keeps_its_head_and_framing_resynchronises() {
        let mut p = Printer::new();
        p.init().raster(10, &[0x55; 200]).line("long").cut();
        let big = p.out.clone();
        let small = receipt(2, &[1, 2, 3, 4]);
        let input = [big.clone(), small.clone()].concat();
        let expect = vec![
            Frame::Oversized {
                head: Bytes::copy_from_slice(&big[..64]),
                len: big.len() as u64,
            },
            data(&small),
        ];
        for i in (0..input.len()).step_by(7) {
            assert_eq!(frames(None, &input, &[i, i + 50], 64), expect);
        }
        // Without a cut after it, the oversized frame runs to the end of the stream.
        assert_eq!(
            frames(None, &big[..big.len() - 4], &[5], 64),
            vec![Frame::Oversized {
                head: Bytes::copy_from_slice(&big[..64]),
                len: big.len() as u64 - 4,
            }]
        );
    }

    #[test]
    fn a_frame_of_exactly_max_bytes_is_data() {
        let r = receipt(1, &[]);
        assert_eq!(frames(None, &r, &[3], r.len()), vec![data(&r)]);
        assert!(matches!(
            frames(None, &r, &[3], r.len() - 1)[..],
            [Frame::Oversized { .. }]
        ));
    }

    /// A receipt, and the size of its largest data block (image or barcode).
    fn arb_receipt() -> impl Strategy<Value = (Vec<u8>, usize)> {
        (
            0u32..100_000,
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>().prop_map(|b| b & 0x7f), 0..20),
        )
            .prop_map(|(n, logo, code)| {
                let mut p = Printer::new();
                p.init()
                    .cp858()
                    .raster(8, &logo)
                    .line(&format!("Bon {n} Müller"))
                    .code128(&code)
                    .cut();
                (p.out, (logo.len() / 8 * 8).max(code.len()))
            })
    }

    proptest! {
        #[test]
        fn any_split_of_a_receipt_stream_gives_the_same_frames(
            receipts in proptest::collection::vec(arb_receipt(), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            max in 16usize..400,
        ) {
            let input: Vec<u8> = receipts.iter().flat_map(|(r, _)| r.iter().copied()).collect();
            let whole = frames(None, &input, &[], max);
            let split = frames(None, &input, &cuts, max);
            prop_assert_eq!(&whole, &split);
            // A data block larger than the cap is taken as noise (see the module's invariants),
            // so a cut-like byte inside it may end a frame; only otherwise is each receipt
            // exactly one frame, image and barcode bytes never cut.
            if receipts.iter().any(|(_, block)| *block > max) {
                return Ok(());
            }
            let receipts: Vec<Vec<u8>> = receipts.into_iter().map(|(r, _)| r).collect();
            prop_assert_eq!(whole.len(), receipts.len());
            for (frame, r) in whole.iter().zip(&receipts) {
                match frame {
                    Frame::Data(d) => prop_assert_eq!(&d[..], &r[..]),
                    Frame::Oversized { head, len } => {
                        prop_assert!(r.len() > max);
                        prop_assert_eq!(&head[..], &r[..max]);
                        prop_assert_eq!(*len, r.len() as u64);
                    }
                    Frame::Rejected { .. } => prop_assert!(false, "cut framing rejects nothing"),
                }
            }
        }

        #[test]
        fn any_split_of_any_bytes_gives_the_same_frames(
            input in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            max in 1usize..200,
            trailer in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..4)),
        ) {
            let whole = frames(trailer.as_deref(), &input, &[], max);
            let split = frames(trailer.as_deref(), &input, &cuts, max);
            prop_assert_eq!(&whole, &split);
            let mut covered = 0u64;
            for frame in &whole {
                match frame {
                    Frame::Data(d) => {
                        prop_assert!(!d.is_empty() && d.len() <= max);
                        covered += d.len() as u64;
                    }
                    Frame::Oversized { head, len } => {
                        prop_assert!(head.len() == max && *len > max as u64);
                        covered += len;
                    }
                    Frame::Rejected { .. } => prop_assert!(false, "cut framing rejects nothing"),
                }
            }
            // Nothing is lost: the frames account for every byte.
            prop_assert_eq!(covered, input.len() as u64);
        }
    }
}
