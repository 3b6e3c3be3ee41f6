//! Framers: cut a register's byte stream into frames, each capped in size.
//!
//! - [`LineFramer`]: newline-delimited (jsonl).
//! - [`StxEtxFramer`]: `STX payload ETX [check byte]`, with an optional XOR or LRC checksum.
//! - [`super::escpos::CutFramer`]: ESC/POS receipts, ending at the paper cut or a trailer.
//! - [`XmlFramer`]: XML documents, ending with the closing tag of the root element (POSLog).
//! - [`Framer`] picks one from the register's config.
//!
//! Invariants:
//! - A frame never exceeds `max` bytes in memory. A longer one becomes [`Frame::Oversized`] with
//!   its first `max` bytes kept for the dead-letter store; the rest is skipped up to the next
//!   delimiter, where framing resynchronises.
//! - Bytes a framer cannot use (noise between STX/ETX frames, a bad checksum) come out as
//!   [`Frame::Rejected`] with the reason, so they reach the dead-letter store too.
//! - Framing is independent of how the bytes arrive: any split of the stream into reads yields
//!   the same frames (property tests check this for every framer).

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::escpos::CutFramer;
use crate::config::{Checksum, Framing};

/// Frames are capped at 1 MiB unless a register's config says otherwise.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// One unit of register input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Bytes),
    /// A frame longer than the cap: its head, and its full length.
    Oversized {
        head: Bytes,
        len: u64,
    },
    /// Bytes the framer could not use, and why.
    Rejected {
        raw: Bytes,
        reason: String,
    },
}

/// The framer a register's config asks for.
#[derive(Debug)]
pub enum Framer {
    Line(LineFramer),
    StxEtx(StxEtxFramer),
    Cut(CutFramer),
    Xml(XmlFramer),
}

impl Framer {
    pub fn new(framing: &Framing, max: usize) -> Framer {
        match framing {
            Framing::Newline => Framer::Line(LineFramer::new(max)),
            Framing::StxEtx { checksum } => Framer::StxEtx(StxEtxFramer::new(*checksum, max)),
            Framing::Cut { trailer } => Framer::Cut(CutFramer::new(
                trailer.as_ref().map(|t| t.as_bytes().to_vec()),
                max,
            )),
            Framing::Xml => Framer::Xml(XmlFramer::new(max)),
        }
    }
}

impl Decoder for Framer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        match self {
            Framer::Line(f) => f.decode(buf),
            Framer::StxEtx(f) => f.decode(buf),
            Framer::Cut(f) => f.decode(buf),
            Framer::Xml(f) => f.decode(buf),
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        match self {
            Framer::Line(f) => f.decode_eof(buf),
            Framer::StxEtx(f) => f.decode_eof(buf),
            Framer::Cut(f) => f.decode_eof(buf),
            Framer::Xml(f) => f.decode_eof(buf),
        }
    }
}

/// Newline-delimited frames. A trailing `\r` is removed; empty lines are skipped.
#[derive(Debug)]
pub struct LineFramer {
    max: usize,
    /// Bytes already searched for a newline, so a slow trickle is not rescanned.
    scanned: usize,
    discarding: Option<(Bytes, u64)>,
}

impl LineFramer {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            scanned: 0,
            discarding: None,
        }
    }
}

impl Decoder for LineFramer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            if let Some((_, skipped)) = &mut self.discarding {
                match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        *skipped += i as u64;
                        buf.advance(i + 1);
                        let (head, len) = self.discarding.take().expect("checked above");
                        return Ok(Some(Frame::Oversized { head, len }));
                    }
                    None => {
                        *skipped += buf.len() as u64;
                        buf.clear();
                        return Ok(None);
                    }
                }
            }
            let from = self.scanned.min(buf.len());
            match buf[from..].iter().position(|&b| b == b'\n') {
                Some(i) if from + i <= self.max => {
                    let mut line = buf.split_to(from + i + 1);
                    self.scanned = 0;
                    line.truncate(line.len() - 1);
                    if line.last() == Some(&b'\r') {
                        line.truncate(line.len() - 1);
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Ok(Some(Frame::Data(line.freeze())));
                }
                _ if buf.len() > self.max => {
                    let head = buf.split_to(self.max).freeze();
                    self.scanned = 0;
                    self.discarding = Some((head, self.max as u64));
                }
                _ => {
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if let Some((head, len)) = self.discarding.take() {
            return Ok(Some(Frame::Oversized { head, len }));
        }
        self.scanned = 0;
        // A last line without a newline is still a line: registers often close right after it.
        let rest = buf.split();
        if rest.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let mut rest = rest;
        if rest.last() == Some(&b'\r') {
            rest.truncate(rest.len() - 1);
        }
        Ok(Some(Frame::Data(rest.freeze())))
    }
}

const STX: u8 = 0x02;
const ETX: u8 = 0x03;

/// `STX payload ETX [check]`. Anything between frames is noise; a run of it is reported once
/// as [`Frame::Rejected`] when the next STX arrives (or at end of stream).
#[derive(Debug)]
pub struct StxEtxFramer {
    checksum: Checksum,
    max: usize,
    /// Skipping the rest of an oversized frame: its head and length so far.
    discarding: Option<(Bytes, u64)>,
}

impl StxEtxFramer {
    pub fn new(checksum: Checksum, max: usize) -> Self {
        Self {
            checksum,
            max,
            discarding: None,
        }
    }

    /// The check byte over `covered` (payload and ETX).
    pub fn check_byte(checksum: Checksum, covered: &[u8]) -> Option<u8> {
        match checksum {
            Checksum::None => None,
            Checksum::Xor => Some(covered.iter().fold(0u8, |a, b| a ^ b)),
            Checksum::Lrc => Some(
                covered
                    .iter()
                    .fold(0u8, |a, b| a.wrapping_add(*b))
                    .wrapping_neg(),
            ),
        }
    }

    fn trailer_len(&self) -> usize {
        usize::from(self.checksum != Checksum::None)
    }
}

impl Decoder for StxEtxFramer {
    type Item = Frame;
    type Error = std::io::Error;

    // Lengths reported for oversized frames are payload lengths (between STX and ETX), however
    // the bytes arrived; a new STX always ends a frame that was cut off.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        let trailer = self.trailer_len();
        if let Some((_, skipped)) = &mut self.discarding {
            match buf.iter().position(|&b| b == ETX || b == STX) {
                Some(i) if buf[i] == STX => {
                    let (head, len) = self.discarding.take().expect("checked above");
                    buf.advance(i);
                    return Ok(Some(Frame::Oversized {
                        head,
                        len: len + i as u64,
                    }));
                }
                Some(i) if buf.len() > i + trailer => {
                    let (head, len) = self.discarding.take().expect("checked above");
                    buf.advance(i + 1 + trailer);
                    return Ok(Some(Frame::Oversized {
                        head,
                        len: len + i as u64,
                    }));
                }
                // ETX found, check byte still to come.
                Some(_) => return Ok(None),
                None => {
                    *skipped += buf.len() as u64;
                    buf.clear();
                    return Ok(None);
                }
            }
        }
        // Noise before a frame: reported in runs that end at the next STX, at most `max` bytes
        // each, so the runs do not depend on how the bytes arrived.
        let noise = buf.iter().position(|&b| b == STX).unwrap_or(buf.len());
        if noise >= self.max || (noise > 0 && noise < buf.len()) {
            let raw = buf.split_to(noise.min(self.max)).freeze();
            return Ok(Some(Frame::Rejected {
                raw,
                reason: "noise outside an STX/ETX frame".into(),
            }));
        }
        if buf.is_empty() || noise > 0 {
            return Ok(None);
        }
        // buf[0] is STX.
        let body = &buf[1..];
        match body.iter().position(|&b| b == ETX || b == STX) {
            Some(i) if body[i] == STX => {
                let cut = buf.split_to(1 + i).freeze();
                if i > self.max {
                    return Ok(Some(Frame::Oversized {
                        head: cut.slice(1..1 + self.max),
                        len: i as u64,
                    }));
                }
                Ok(Some(Frame::Rejected {
                    raw: cut,
                    reason: "frame cut off: STX before ETX".into(),
                }))
            }
            Some(i) => {
                let total = 1 + i + 1 + trailer;
                if buf.len() < total {
                    return Ok(None);
                }
                let frame = buf.split_to(total).freeze();
                if i > self.max {
                    return Ok(Some(Frame::Oversized {
                        head: frame.slice(1..1 + self.max),
                        len: i as u64,
                    }));
                }
                let covered = &frame[1..1 + i + 1];
                if let Some(expected) = Self::check_byte(self.checksum, covered) {
                    let got = frame[total - 1];
                    if got != expected {
                        return Ok(Some(Frame::Rejected {
                            raw: frame.clone(),
                            reason: format!(
                                "bad checksum: got 0x{got:02x}, expected 0x{expected:02x}"
                            ),
                        }));
                    }
                }
                Ok(Some(Frame::Data(frame.slice(1..1 + i))))
            }
            None if body.len() > self.max => {
                let head = Bytes::copy_from_slice(&body[..self.max]);
                self.discarding = Some((head, body.len() as u64));
                buf.clear();
                Ok(None)
            }
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        // Lengths are payload lengths: up to an ETX whose check byte never came, or the end.
        if let Some((head, len)) = self.discarding.take() {
            let rest = buf.iter().position(|&b| b == ETX).unwrap_or(buf.len());
            buf.clear();
            return Ok(Some(Frame::Oversized {
                head,
                len: len + rest as u64,
            }));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        let raw = buf.split().freeze();
        if raw[0] != STX {
            return Ok(Some(Frame::Rejected {
                raw,
                reason: "noise outside an STX/ETX frame".into(),
            }));
        }
        let payload = raw[1..]
            .iter()
            .position(|&b| b == ETX)
            .unwrap_or(raw.len() - 1);
        if payload > self.max {
            return Ok(Some(Frame::Oversized {
                head: raw.slice(1..1 + self.max),
                len: payload as u64,
            }));
        }
        Ok(Some(Frame::Rejected {
            raw,
            reason: "frame cut off: stream ended before ETX".into(),
        }))
    }
}

/// XML documents back to back: a frame ends with the end tag that closes its root element.
///
/// The framer lexes one byte at a time with its state kept across reads, so where a frame ends
/// never depends on how the bytes arrived, and markup never has to be buffered to be
/// recognised. It knows tags (with quoted attribute values that may hold `>`), comments,
/// CDATA, processing instructions and `<!…>` declarations.
///
/// - Text before a document's first `<`, other than whitespace, is noise: a
///   [`Frame::Rejected`], in chunks of at most `max` bytes.
/// - An XML declaration (`<?xml …?>`) after a document has started means that document was cut
///   off: what came before becomes [`Frame::Rejected`] (or `Oversized`), and framing
///   resynchronises on the new document.
/// - A document over `max` bytes is skipped while its structure is still followed, so framing
///   picks up exactly after it.
#[derive(Debug)]
pub struct XmlFramer {
    max: usize,
    lex: Lex,
    /// Bytes of `buf` already lexed.
    fed: usize,
    depth: usize,
    /// The root element has opened.
    opened: bool,
    /// A document (its first `<`) has started in `buf` at 0.
    started: bool,
    /// Where the markup being lexed began, in `buf`.
    markup_at: usize,
    /// Skipping an oversized document: its head, and bytes already dropped from `buf`.
    discarding: Option<(Bytes, u64)>,
}

/// Declarations longer than this are not taken as the start of a new document.
const MAX_DECLARATION: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Text,
    /// Just after `<`.
    Lt,
    Tag {
        close: bool,
        last_slash: bool,
        quote: Option<u8>,
    },
    /// After `<?`: how much of `xml` matched (3 = matched; 4 = past it), whether it reads as a
    /// declaration, whether the last byte was `?`, and its length so far (counted here, not
    /// from buffer offsets, which skipping invalidates).
    Pi {
        matched: u8,
        decl: bool,
        last_q: bool,
        len: u32,
    },
    /// After `<!`: how much of `--` or `[CDATA[` matched.
    Bang {
        dashes: u8,
        cdata: u8,
    },
    Comment {
        dashes: u8,
    },
    CData {
        brackets: u8,
    },
    Declaration,
}

enum Markup {
    Open,
    Empty,
    Close,
    Other,
    XmlDeclaration,
}

impl XmlFramer {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            lex: Lex::Text,
            fed: 0,
            depth: 0,
            opened: false,
            started: false,
            markup_at: 0,
            discarding: None,
        }
    }

    fn reset(&mut self) {
        self.lex = Lex::Text;
        self.fed = 0;
        self.depth = 0;
        self.opened = false;
        self.started = false;
        self.markup_at = 0;
    }

    /// Advances the lexer by one byte; returns the markup that this byte completed.
    ///
    /// Long on purpose: one arm per lexer state, read as one transition table; the framer's
    /// correctness argument is that table, and splitting it would hide the states' edges.
    fn step(&mut self, b: u8, at: usize) -> Option<Markup> {
        let (next, done) = match self.lex {
            Lex::Text if b == b'<' => {
                self.markup_at = at;
                (Lex::Lt, None)
            }
            Lex::Text => (Lex::Text, None),
            Lex::Lt => match b {
                b'/' => (
                    Lex::Tag {
                        close: true,
                        last_slash: false,
                        quote: None,
                    },
                    None,
                ),
                b'?' => (
                    Lex::Pi {
                        matched: 0,
                        decl: false,
                        last_q: false,
                        len: 2,
                    },
                    None,
                ),
                b'!' => (
                    Lex::Bang {
                        dashes: 0,
                        cdata: 0,
                    },
                    None,
                ),
                b'>' => (Lex::Text, Some(Markup::Other)),
                _ => (
                    Lex::Tag {
                        close: false,
                        last_slash: false,
                        quote: None,
                    },
                    None,
                ),
            },
            Lex::Tag {
                close,
                last_slash,
                quote,
            } => match (quote, b) {
                (Some(q), b) if b == q => (
                    Lex::Tag {
                        close,
                        last_slash: false,
                        quote: None,
                    },
                    None,
                ),
                (Some(_), _) => (self.lex, None),
                (None, b'"' | b'\'') => (
                    Lex::Tag {
                        close,
                        last_slash: false,
                        quote: Some(b),
                    },
                    None,
                ),
                (None, b'>') => {
                    let kind = match (close, last_slash) {
                        (true, _) => Markup::Close,
                        (false, true) => Markup::Empty,
                        (false, false) => Markup::Open,
                    };
                    (Lex::Text, Some(kind))
                }
                (None, _) => (
                    Lex::Tag {
                        close,
                        last_slash: b == b'/',
                        quote: None,
                    },
                    None,
                ),
            },
            Lex::Pi {
                matched,
                decl,
                last_q,
                len,
            } => {
                let len = len.saturating_add(1);
                if last_q && b == b'>' {
                    let kind = if decl && len as usize <= MAX_DECLARATION {
                        Markup::XmlDeclaration
                    } else {
                        Markup::Other
                    };
                    (Lex::Text, Some(kind))
                } else {
                    let (matched, decl) = match matched {
                        0..=2 if b == b"xml"[matched as usize] => (matched + 1, false),
                        3 => (4, b.is_ascii_whitespace() || b == b'?'),
                        _ => (4, decl),
                    };
                    (
                        Lex::Pi {
                            matched,
                            decl,
                            last_q: b == b'?',
                            len,
                        },
                        None,
                    )
                }
            }
            Lex::Bang { dashes, cdata } => {
                const CDATA: &[u8] = b"[CDATA[";
                if cdata == 0 && b == b'-' {
                    if dashes == 1 {
                        (Lex::Comment { dashes: 0 }, None)
                    } else {
                        (
                            Lex::Bang {
                                dashes: 1,
                                cdata: 0,
                            },
                            None,
                        )
                    }
                } else if dashes == 0 && b == CDATA[cdata as usize] {
                    if cdata as usize + 1 == CDATA.len() {
                        (Lex::CData { brackets: 0 }, None)
                    } else {
                        (
                            Lex::Bang {
                                dashes: 0,
                                cdata: cdata + 1,
                            },
                            None,
                        )
                    }
                } else if b == b'>' {
                    (Lex::Text, Some(Markup::Other))
                } else {
                    (Lex::Declaration, None)
                }
            }
            Lex::Comment { dashes } => match b {
                b'-' => (
                    Lex::Comment {
                        dashes: (dashes + 1).min(2),
                    },
                    None,
                ),
                b'>' if dashes == 2 => (Lex::Text, Some(Markup::Other)),
                _ => (Lex::Comment { dashes: 0 }, None),
            },
            Lex::CData { brackets } => match b {
                b']' => (
                    Lex::CData {
                        brackets: (brackets + 1).min(2),
                    },
                    None,
                ),
                b'>' if brackets == 2 => (Lex::Text, Some(Markup::Other)),
                _ => (Lex::CData { brackets: 0 }, None),
            },
            Lex::Declaration if b == b'>' => (Lex::Text, Some(Markup::Other)),
            Lex::Declaration => (Lex::Declaration, None),
        };
        self.lex = next;
        done
    }

    /// Ends the current frame at `end` bytes into `buf`.
    fn finish(&mut self, buf: &mut BytesMut, end: usize, complete: bool) -> Frame {
        let bytes = buf.split_to(end).freeze();
        let frame = match self.discarding.take() {
            Some((head, dropped)) => Frame::Oversized {
                head,
                len: dropped + end as u64,
            },
            None if end > self.max => Frame::Oversized {
                head: bytes.slice(..self.max),
                len: end as u64,
            },
            None if complete => Frame::Data(bytes),
            None => Frame::Rejected {
                raw: bytes,
                reason: "XML document cut off by the next document".into(),
            },
        };
        self.reset();
        frame
    }
}

impl Decoder for XmlFramer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if !self.started && self.discarding.is_none() {
            // Between documents: skip whitespace, report other text as noise.
            let lead = buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(buf.len());
            buf.advance(lead);
            let noise = buf.iter().position(|&b| b == b'<').unwrap_or(buf.len());
            if noise >= self.max || (noise > 0 && noise < buf.len()) {
                let raw = buf.split_to(noise.min(self.max)).freeze();
                return Ok(Some(Frame::Rejected {
                    raw,
                    reason: "text outside an XML document".into(),
                }));
            }
            if buf.is_empty() || noise > 0 {
                return Ok(None);
            }
            self.started = true;
        }
        while self.fed < buf.len() {
            let at = self.fed;
            let b = buf[at];
            self.fed += 1;
            match self.step(b, at) {
                // Content came before it in this frame (kept, dropped, or a root opened).
                Some(Markup::XmlDeclaration)
                    if self.markup_at > 0 || self.opened || self.discarding.is_some() =>
                {
                    // A new document began: the one before it was cut off.
                    let cut = self.markup_at;
                    let frame = self.finish(buf, cut, false);
                    return Ok(Some(frame));
                }
                Some(Markup::Open) => {
                    self.depth += 1;
                    self.opened = true;
                }
                Some(Markup::Empty) if self.depth == 0 => self.opened = true,
                Some(Markup::Close) => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
            if self.opened && self.depth == 0 {
                let end = self.fed;
                return Ok(Some(self.finish(buf, end, true)));
            }
        }
        // The document is not complete yet. Past the cap, keep its head and drop what has been
        // lexed, except a declaration in progress, which may be where the next document starts.
        let keep_from = match self.lex {
            Lex::Lt => self.markup_at,
            Lex::Pi { len, .. } if len as usize <= MAX_DECLARATION => self.markup_at,
            _ => self.fed,
        };
        if self.discarding.is_none() && keep_from > self.max {
            let head = Bytes::copy_from_slice(&buf[..self.max]);
            self.discarding = Some((head, 0));
        }
        if let Some((_, dropped)) = &mut self.discarding {
            *dropped += keep_from as u64;
            buf.advance(keep_from);
            self.fed -= keep_from;
            self.markup_at = self.markup_at.saturating_sub(keep_from);
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if !self.started && self.discarding.is_none() {
            if buf.iter().all(u8::is_ascii_whitespace) {
                buf.clear();
                return Ok(None);
            }
            let raw = buf.split().freeze();
            return Ok(Some(Frame::Rejected {
                raw,
                reason: "text outside an XML document".into(),
            }));
        }
        let end = buf.len();
        let frame = match self.finish(buf, end, false) {
            Frame::Rejected { raw, .. } => Frame::Rejected {
                raw,
                reason: "stream ended inside an XML document".into(),
            },
            other => other,
        };
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(input: &[u8], cuts: &[usize], max: usize) -> Vec<Frame> {
        frames_with(&Framing::Newline, input, cuts, max)
    }

    fn frames_with(framing: &Framing, input: &[u8], cuts: &[usize], max: usize) -> Vec<Frame> {
        let mut framer = Framer::new(framing, max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.sort_unstable();
        points.push(input.len());
        for p in points {
            buf.extend_from_slice(&input[at..p.max(at)]);
            at = p.max(at);
            while let Some(f) = framer.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        while let Some(f) = framer.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn data(s: &str) -> Frame {
        Frame::Data(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn lines_crlf_blank_and_final_line_without_newline() {
        let got = frames(b"a\r\n\n  \nbb\nlast", &[], 100);
        assert_eq!(got, vec![data("a"), data("bb"), data("last")]);
    }

    #[test]
    fn oversized_line_is_cut_and_framing_resynchronises() {
        let mut input = vec![b'x'; 25];
        input.extend_from_slice(b"\nok\n");
        let got = frames(&input, &[3, 11, 12], 10);
        assert_eq!(
            got,
            vec![
                Frame::Oversized {
                    head: Bytes::from(vec![b'x'; 10]),
                    len: 25
                },
                data("ok")
            ]
        );
    }

    #[test]
    fn a_line_of_exactly_max_bytes_is_data() {
        let got = frames(b"0123456789\n", &[], 10);
        assert_eq!(got, vec![data("0123456789")]);
    }

    fn stx(payload: &[u8], checksum: Checksum) -> Vec<u8> {
        let mut v = vec![STX];
        v.extend_from_slice(payload);
        v.push(ETX);
        let mut covered = payload.to_vec();
        covered.push(ETX);
        v.extend(StxEtxFramer::check_byte(checksum, &covered));
        v
    }

    fn rejected(f: &Frame) -> Option<&str> {
        match f {
            Frame::Rejected { reason, .. } => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn stx_etx_frames_noise_and_checksums() {
        let xor = Framing::StxEtx {
            checksum: Checksum::Xor,
        };
        let mut input = b"\x00\xffnoise".to_vec();
        input.extend(stx(b"first", Checksum::Xor));
        let mut bad = stx(b"second", Checksum::Xor);
        *bad.last_mut().unwrap() ^= 0x55;
        input.extend(bad);
        input.extend(stx(b"third", Checksum::Xor));
        let got = frames_with(&xor, &input, &[4, 9, 17], 100);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(rejected(&got[0]), Some("noise outside an STX/ETX frame"));
        assert_eq!(got[1], data("first"));
        assert!(rejected(&got[2]).unwrap().starts_with("bad checksum"));
        assert_eq!(got[3], data("third"));
    }

    #[test]
    fn lrc_is_the_twos_complement_of_the_sum() {
        // 0x31 + 0x32 + ETX(0x03) = 0x66; two's complement 0x9a.
        assert_eq!(
            StxEtxFramer::check_byte(Checksum::Lrc, b"12\x03"),
            Some(0x9a)
        );
        assert_eq!(
            StxEtxFramer::check_byte(Checksum::Xor, b"12\x03"),
            Some(0x31 ^ 0x32 ^ 0x03)
        );
        let lrc = Framing::StxEtx {
            checksum: Checksum::Lrc,
        };
        assert_eq!(
            frames_with(&lrc, &stx(b"12", Checksum::Lrc), &[], 10),
            vec![data("12")]
        );
    }

    #[test]
    fn stx_etx_cut_off_frames_and_oversize_resynchronise() {
        let plain = Framing::StxEtx {
            checksum: Checksum::None,
        };
        let mut input = b"\x02half".to_vec();
        input.extend(stx(&[b'x'; 30], Checksum::None));
        input.extend(stx(b"ok", Checksum::None));
        input.extend(b"\x02tail");
        let got = frames_with(&plain, &input, &[3, 20, 40], 10);
        assert_eq!(rejected(&got[0]), Some("frame cut off: STX before ETX"));
        assert!(
            matches!(&got[1], Frame::Oversized { len: 30, head } if head.len() == 10),
            "{got:?}"
        );
        assert_eq!(got[2], data("ok"));
        assert_eq!(
            rejected(&got[3]),
            Some("frame cut off: stream ended before ETX")
        );
    }

    #[test]
    fn xml_documents_are_cut_at_the_root_end_tag() {
        let doc1 = r#"<?xml version="1.0" encoding="UTF-8"?>
<nrf:POSLog xmlns:nrf="urn:x"><nrf:Transaction a=">"><Empty/><!-- </nrf:POSLog> --><![CDATA[</nrf:POSLog>]]></nrf:Transaction></nrf:POSLog>"#;
        let doc2 = "<Transaction><SequenceNumber>2</SequenceNumber></Transaction>";
        let input = format!("  {doc1}\r\n{doc2}\n");
        let got = frames_with(&Framing::Xml, input.as_bytes(), &[5, 50, 51, 120], 4096);
        assert_eq!(got, vec![data(doc1), data(doc2)]);
    }

    #[test]
    fn xml_noise_and_truncation_are_rejected() {
        let got = frames_with(&Framing::Xml, b"garbage<a/>junk<b>unfinished", &[], 100);
        assert_eq!(rejected(&got[0]), Some("text outside an XML document"));
        assert_eq!(got[1], data("<a/>"));
        assert_eq!(rejected(&got[2]), Some("text outside an XML document"));
        assert_eq!(
            rejected(&got[3]),
            Some("stream ended inside an XML document")
        );
    }

    #[test]
    fn xml_oversized_document_resynchronises_at_the_next_declaration() {
        let big = format!("<?xml version=\"1.0\"?><a>{}</a>", "x".repeat(200));
        let input = format!("{big}<?xml version=\"1.0\"?><b/>");
        let got = frames_with(&Framing::Xml, input.as_bytes(), &[], 64);
        assert!(
            matches!(&got[0], Frame::Oversized { head, .. } if head.len() == 64),
            "{got:?}"
        );
        assert_eq!(got[1], data("<?xml version=\"1.0\"?><b/>"));
    }

    fn from_hex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Replays a fuzzer input: the first byte picks the checksum (low 2 bits) and the read size
    /// (the rest); whole and split must give the same frames.
    fn assert_split_invariant(framing: &Framing, data: &[u8]) {
        let (&selector, input) = data.split_first().unwrap();
        let chunk = ((selector >> 2) as usize).max(1);
        let cuts: Vec<usize> = (chunk..input.len()).step_by(chunk).collect();
        assert_eq!(
            frames_with(framing, input, &[], 64),
            frames_with(framing, input, &cuts, 64)
        );
    }

    #[test]
    fn fuzz_regression_stx_etx_oversized_frame_whose_check_byte_never_came() {
        let data = from_hex(
            "0360020e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e03",
        );
        assert_split_invariant(
            &Framing::StxEtx {
                checksum: Checksum::Lrc,
            },
            &data,
        );
    }

    #[test]
    fn fuzz_regression_a_long_processing_instruction_is_never_a_declaration() {
        // `<?xml …?>` longer than MAX_DECLARATION, inside an oversized document, read whole and
        // in 1-byte reads.
        let mut input = b"<a>".to_vec();
        input.extend(b"<?xml v");
        input.extend(vec![b'x'; MAX_DECLARATION + 10]);
        input.extend(b"?><b/></a><c/>");
        let whole = frames_with(&Framing::Xml, &input, &[], 64);
        let cuts: Vec<usize> = (1..input.len()).collect();
        assert_eq!(whole, frames_with(&Framing::Xml, &input, &cuts, 64));
        assert!(
            matches!(&whole[0], Frame::Oversized { len, .. } if *len as usize == input.len() - 4)
        );
        assert_eq!(whole[1], data("<c/>"));
    }

    #[test]
    fn fuzz_regression_xml_declaration_while_skipping_an_oversized_document() {
        let data = from_hex(
            "03d4deef2dd03c622fffffffffffffffff3e003c3f786d6c20766572dfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdfdf73223f3e3c3e003c3f786d6c2076657273223f3e3c08000064c427613e",
        );
        assert_split_invariant(&Framing::Xml, &data);
    }

    proptest! {
        #[test]
        fn stx_etx_any_split_gives_the_same_frames(
            parts in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..30), 0u8..4), 0..10),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
            mode in 0u8..3,
        ) {
            let checksum = [Checksum::None, Checksum::Xor, Checksum::Lrc][mode as usize];
            let mut input = Vec::new();
            for (payload, kind) in &parts {
                match kind {
                    0 => input.extend(payload.iter().filter(|&&b| b != STX && b != ETX)),
                    _ => input.extend(stx(&payload.iter().copied().filter(|&b| b != STX && b != ETX).collect::<Vec<_>>(), checksum)),
                }
            }
            let framing = Framing::StxEtx { checksum };
            prop_assert_eq!(frames_with(&framing, &input, &[], 16), frames_with(&framing, &input, &cuts, 16));
        }

        #[test]
        fn xml_any_split_gives_the_same_frames(
            docs in proptest::collection::vec(
                prop_oneof![
                    Just("<a><b x='>'/>text</a>".to_string()),
                    Just("<?xml version=\"1.0\"?><p:r xmlns:p='u'><p:t>1</p:t></p:r>".to_string()),
                    Just("<!-- c --><d><![CDATA[</d>]]></d>".to_string()),
                    "[a-z<>/ ]{0,20}",
                ],
                0..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let input = docs.concat();
            prop_assert_eq!(
                frames_with(&Framing::Xml, input.as_bytes(), &[], 48),
                frames_with(&Framing::Xml, input.as_bytes(), &cuts, 48)
            );
        }

        #[test]
        fn any_split_of_the_stream_gives_the_same_frames(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut input = Vec::new();
            for l in &lines {
                input.extend(l.iter().copied().filter(|&b| b != b'\n'));
                input.push(b'\n');
            }
            let whole = frames(&input, &[], 16);
            let split = frames(&input, &cuts, 16);
            prop_assert_eq!(whole, split);
        }
    }
}
