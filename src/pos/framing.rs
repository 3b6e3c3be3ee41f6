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

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        let trailer = self.trailer_len();
        if let Some((_, skipped)) = &mut self.discarding {
            match buf.iter().position(|&b| b == ETX) {
                Some(i) if buf.len() > i + trailer => {
                    *skipped += (i + 1 + trailer) as u64;
                    buf.advance(i + 1 + trailer);
                    let (head, len) = self.discarding.take().expect("checked above");
                    return Ok(Some(Frame::Oversized { head, len }));
                }
                Some(_) => return Ok(None),
                None => {
                    *skipped += buf.len() as u64;
                    buf.clear();
                    return Ok(None);
                }
            }
        }
        // Noise before a frame: report it as one run once we know where it ends.
        match buf.iter().position(|&b| b == STX) {
            Some(0) => {}
            Some(i) => {
                let noise = buf.split_to(i).freeze();
                return Ok(Some(Frame::Rejected {
                    raw: noise,
                    reason: "noise outside an STX/ETX frame".into(),
                }));
            }
            None => {
                if buf.len() > self.max {
                    let noise = buf.split().freeze();
                    return Ok(Some(Frame::Rejected {
                        raw: noise,
                        reason: "noise outside an STX/ETX frame".into(),
                    }));
                }
                return Ok(None);
            }
        }
        // buf[0] is STX. A second STX before ETX means the first frame was cut off.
        let body = &buf[1..];
        let etx = body.iter().position(|&b| b == ETX || b == STX);
        match etx {
            Some(i) if body[i] == STX => {
                let cut = buf.split_to(i + 1).freeze();
                Ok(Some(Frame::Rejected {
                    raw: cut,
                    reason: "frame cut off: STX before ETX".into(),
                }))
            }
            Some(i) => {
                let payload_len = i;
                if payload_len > self.max {
                    let head = Bytes::copy_from_slice(&buf[1..1 + self.max]);
                    let total = 1 + i + 1 + self.trailer_len();
                    if buf.len() < total {
                        self.discarding = Some((head, buf.len() as u64));
                        buf.clear();
                        return Ok(None);
                    }
                    buf.advance(total);
                    return Ok(Some(Frame::Oversized {
                        head,
                        len: payload_len as u64,
                    }));
                }
                let total = 1 + i + 1 + self.trailer_len();
                if buf.len() < total {
                    return Ok(None);
                }
                let frame = buf.split_to(total).freeze();
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
            None if buf.len() > self.max + 1 => {
                let head = Bytes::copy_from_slice(&buf[1..1 + self.max]);
                self.discarding = Some((head, (buf.len() - 1) as u64));
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
        if let Some((head, len)) = self.discarding.take() {
            return Ok(Some(Frame::Oversized { head, len }));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        let raw = buf.split().freeze();
        let reason = if raw[0] == STX {
            "frame cut off: stream ended before ETX"
        } else {
            "noise outside an STX/ETX frame"
        };
        Ok(Some(Frame::Rejected {
            raw,
            reason: reason.into(),
        }))
    }
}

/// XML documents back to back: a frame ends with the end tag that closes its root element.
/// Declarations, comments, CDATA and processing instructions are skipped while counting.
/// Text before the first `<` other than whitespace is noise.
#[derive(Debug)]
pub struct XmlFramer {
    max: usize,
    /// Bytes of the current document already scanned.
    scanned: usize,
    depth: usize,
    opened: bool,
    discarding: Option<(Bytes, u64)>,
}

enum Markup {
    /// `<name …>`
    Open,
    /// `<name …/>`
    Empty,
    /// `</name>`
    Close,
    /// `<?…?>`, `<!--…-->`, `<![CDATA[…]]>`, `<!DOCTYPE …>`
    Other,
}

impl XmlFramer {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            scanned: 0,
            depth: 0,
            opened: false,
            discarding: None,
        }
    }

    /// Classifies the markup starting at `buf[at] == b'<'`; `None` if it has not all arrived.
    fn markup(buf: &[u8], at: usize) -> Option<(Markup, usize)> {
        let rest = &buf[at..];
        let find = |needle: &[u8], from: usize| {
            rest.get(from..)?
                .windows(needle.len())
                .position(|w| w == needle)
                .map(|i| from + i + needle.len())
        };
        if rest.len() < 2 {
            return None;
        }
        match rest[1] {
            b'?' => find(b"?>", 2).map(|e| (Markup::Other, e)),
            b'!' => {
                if rest.len() < 4 {
                    return None;
                }
                if rest.starts_with(b"<!--") {
                    find(b"-->", 4).map(|e| (Markup::Other, e))
                } else if rest.starts_with(b"<![CDATA[")
                    || b"<![CDATA[".starts_with(&rest[..rest.len().min(9)])
                {
                    if rest.len() < 9 {
                        return None;
                    }
                    find(b"]]>", 9).map(|e| (Markup::Other, e))
                } else {
                    find(b">", 2).map(|e| (Markup::Other, e))
                }
            }
            b'/' => find(b">", 2).map(|e| (Markup::Close, e)),
            _ => {
                // Find the '>' that ends the tag, ignoring any inside quoted attribute values.
                let mut quote = None;
                for (i, &b) in rest.iter().enumerate().skip(1) {
                    match (quote, b) {
                        (Some(q), b) if b == q => quote = None,
                        (Some(_), _) => {}
                        (None, b'"' | b'\'') => quote = Some(b),
                        (None, b'>') => {
                            let kind = if rest[i - 1] == b'/' {
                                Markup::Empty
                            } else {
                                Markup::Open
                            };
                            return Some((kind, i + 1));
                        }
                        _ => {}
                    }
                }
                None
            }
        }
    }
}

impl Decoder for XmlFramer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some((_, skipped)) = &mut self.discarding {
            // Skip to the next document start we can recognise: a `<?xml` declaration.
            match buf.windows(5).position(|w| w == b"<?xml") {
                Some(i) => {
                    *skipped += i as u64;
                    buf.advance(i);
                    let (head, len) = self.discarding.take().expect("checked");
                    return Ok(Some(Frame::Oversized { head, len }));
                }
                None => {
                    let drop = buf.len().saturating_sub(4);
                    *skipped += drop as u64;
                    buf.advance(drop);
                    return Ok(None);
                }
            }
        }
        if !self.opened && self.scanned == 0 {
            let lead = buf.iter().position(|&b| !b.is_ascii_whitespace());
            match lead {
                None => {
                    buf.clear();
                    return Ok(None);
                }
                Some(i) => buf.advance(i),
            }
            if buf[0] != b'<' {
                let end = buf.iter().position(|&b| b == b'<').unwrap_or(buf.len());
                if end == buf.len() && buf.len() <= self.max {
                    return Ok(None);
                }
                let noise = buf.split_to(end.min(self.max)).freeze();
                return Ok(Some(Frame::Rejected {
                    raw: noise,
                    reason: "text outside an XML document".into(),
                }));
            }
        }
        let mut i = self.scanned;
        while i < buf.len() {
            if buf[i] != b'<' {
                i += 1;
                continue;
            }
            let Some((kind, len)) = Self::markup(buf, i) else {
                break;
            };
            i += len;
            match kind {
                Markup::Open => {
                    self.depth += 1;
                    self.opened = true;
                }
                Markup::Empty if self.depth == 0 => {
                    self.opened = true;
                }
                Markup::Close => self.depth = self.depth.saturating_sub(1),
                Markup::Empty | Markup::Other => {}
            }
            self.scanned = i;
            if self.opened && self.depth == 0 {
                self.scanned = 0;
                self.opened = false;
                if i > self.max {
                    let head = buf.split_to(i).freeze().slice(..self.max);
                    return Ok(Some(Frame::Oversized {
                        head,
                        len: i as u64,
                    }));
                }
                return Ok(Some(Frame::Data(buf.split_to(i).freeze())));
            }
        }
        if buf.len() > self.max {
            let head = buf.split_to(self.max).freeze();
            self.discarding = Some((head, self.max as u64));
            self.scanned = 0;
            self.depth = 0;
            self.opened = false;
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if let Some((head, skipped)) = self.discarding.take() {
            let len = skipped + buf.len() as u64;
            buf.clear();
            return Ok(Some(Frame::Oversized { head, len }));
        }
        self.scanned = 0;
        self.depth = 0;
        self.opened = false;
        if buf.iter().all(u8::is_ascii_whitespace) {
            buf.clear();
            return Ok(None);
        }
        Ok(Some(Frame::Rejected {
            raw: buf.split().freeze(),
            reason: "stream ended inside an XML document".into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(input: &[u8], cuts: &[usize], max: usize) -> Vec<Frame> {
        let mut framer = LineFramer::new(max);
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

    proptest! {
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
