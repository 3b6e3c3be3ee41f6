//! Any byte stream, cut into reads at fuzzer-chosen points: the framer yields the same frames
//! however the stream is split, and never holds a frame over its cap.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use storelink::pos::framing::{Frame, LineFramer};
use tokio_util::codec::Decoder;

const MAX: usize = 64;

fn frames(input: &[u8], chunk: usize) -> Vec<Frame> {
    let mut framer = LineFramer::new(MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(f) = framer.decode(&mut buf).unwrap() {
            out.push(f);
        }
    }
    while let Some(f) = framer.decode_eof(&mut buf).unwrap() {
        out.push(f);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else { return };
    let whole = frames(input, input.len());
    let split = frames(input, chunk as usize);
    assert_eq!(whole, split);
    for f in &whole {
        match f {
            Frame::Data(d) => assert!(d.len() <= MAX),
            Frame::Oversized { head, len } => assert!(head.len() == MAX && *len > MAX as u64),
            Frame::Rejected { .. } => panic!("the line framer rejects nothing"),
        }
    }
});
