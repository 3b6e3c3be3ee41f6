//! ESC/POS: the command language of receipt printers, as tapped from the printer line.
//!
//! [`CutFramer`] cuts the stream into receipts at the paper-cut command.
//! TODO(receipt): replace the byte scan below with a tokenizer that knows command lengths, so
//! that image data and command arguments can never be mistaken for a cut.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::framing::Frame;

const GS: u8 = 0x1d;
const ESC: u8 = 0x1b;

/// ESC/POS receipts: a frame runs up to and including the paper cut. Recognised cuts are
/// `GS V m` (m = 0, 1, 48, 49), `GS V m n` (m = 65, 66, 97, 98: feed then cut), and the older
/// `ESC i` / `ESC m`. With a configured trailer, that byte string ends a frame instead.
#[derive(Debug)]
pub struct CutFramer {
    trailer: Option<Vec<u8>>,
    max: usize,
    scanned: usize,
    discarding: Option<(Bytes, u64)>,
}

impl CutFramer {
    pub fn new(trailer: Option<Vec<u8>>, max: usize) -> Self {
        Self {
            trailer,
            max,
            scanned: 0,
            discarding: None,
        }
    }

    /// Where the first complete frame ends (exclusive), if one does. `Err(at)` means a cut
    /// command starts at `at` but its bytes have not all arrived.
    fn frame_end(&self, buf: &[u8], from: usize) -> Result<Option<usize>, usize> {
        if let Some(trailer) = &self.trailer {
            let start = from.saturating_sub(trailer.len().saturating_sub(1));
            return Ok(buf[start..]
                .windows(trailer.len())
                .position(|w| w == trailer.as_slice())
                .map(|i| start + i + trailer.len()));
        }
        let start = from.saturating_sub(3);
        let mut i = start;
        while i < buf.len() {
            match buf[i] {
                GS => match buf.get(i + 1) {
                    None => return Err(i),
                    Some(b'V') => match buf.get(i + 2) {
                        None => return Err(i),
                        Some(0 | 1 | 48 | 49) => return Ok(Some(i + 3)),
                        Some(65 | 66 | 97 | 98) => {
                            return if buf.len() > i + 3 {
                                Ok(Some(i + 4))
                            } else {
                                Err(i)
                            };
                        }
                        Some(_) => {}
                    },
                    Some(_) => {}
                },
                ESC => match buf.get(i + 1) {
                    None => return Err(i),
                    Some(b'i' | b'm') => return Ok(Some(i + 2)),
                    // Skip ESC's argument so that e.g. `ESC ! 0x1d` is not read as a GS.
                    Some(_) => i += 1,
                },
                _ => {}
            }
            i += 1;
        }
        Ok(None)
    }
}

impl Decoder for CutFramer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            if self.discarding.is_some() {
                return match self.frame_end(buf, 0) {
                    Ok(Some(end)) => {
                        let (head, skipped) = self.discarding.take().expect("checked");
                        buf.advance(end);
                        Ok(Some(Frame::Oversized {
                            head,
                            len: skipped + end as u64,
                        }))
                    }
                    Ok(None) => {
                        if let Some((_, skipped)) = &mut self.discarding {
                            // Keep a possible partial trailer for the next read.
                            let keep = self.trailer.as_ref().map_or(3, |t| t.len());
                            let drop = buf.len().saturating_sub(keep);
                            *skipped += drop as u64;
                            buf.advance(drop);
                        }
                        Ok(None)
                    }
                    Err(_) => Ok(None),
                };
            }
            match self.frame_end(buf, self.scanned) {
                Ok(Some(end)) if end <= self.max => {
                    self.scanned = 0;
                    let frame = buf.split_to(end).freeze();
                    return Ok(Some(Frame::Data(frame)));
                }
                Ok(Some(_)) | Ok(None) | Err(_) if buf.len() > self.max => {
                    let head = buf.split_to(self.max).freeze();
                    self.scanned = 0;
                    self.discarding = Some((head, self.max as u64));
                }
                Ok(_) => {
                    self.scanned = buf.len();
                    return Ok(None);
                }
                Err(at) => {
                    self.scanned = at;
                    return Ok(None);
                }
            }
        }
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
        if buf.is_empty() {
            return Ok(None);
        }
        // A receipt without its cut: the stream ended (printer off, cable pulled). Hand it on;
        // the parser decides whether it is a whole receipt.
        Ok(Some(Frame::Data(buf.split().freeze())))
    }
}
