//! Framers: cut a register's byte stream into frames, each capped in size.
//!
//! Invariants:
//! - A frame never exceeds `max` bytes in memory. A longer one becomes [`Frame::Oversized`] with
//!   its first `max` bytes kept for the dead-letter store; the rest is skipped up to the next
//!   delimiter, where framing resynchronises.
//! - Framing is independent of how the bytes arrive: any split of the stream into reads yields
//!   the same frames (a property test checks this).

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

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
