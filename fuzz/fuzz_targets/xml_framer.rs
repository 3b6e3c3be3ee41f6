//! Any stream into the XML document framer: any split of the stream gives the same frames.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use storelink::config::Framing;
use storelink::pos::framing::{Frame, Framer};
use tokio_util::codec::Decoder;

const MAX: usize = 64;

fn frames(framing: &Framing, input: &[u8], chunk: usize) -> Vec<Frame> {
    let mut framer = Framer::new(framing, MAX);
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
    let Some((&selector, input)) = data.split_first() else { return };
    let framing = {
        let _ = selector & 3;
        Framing::Xml
    };
    let whole = frames(&framing, input, input.len());
    let split = frames(&framing, input, (selector >> 2) as usize);
    assert_eq!(whole, split);
    for f in &whole {
        match f {
            Frame::Data(d) => assert!(d.len() <= MAX + 8),
            Frame::Oversized { head, len } => assert!(head.len() <= MAX && *len > MAX as u64),
            Frame::Rejected { .. } => {}
        }
    }
});
