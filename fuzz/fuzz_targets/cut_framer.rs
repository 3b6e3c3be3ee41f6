//! Any stream into the ESC/POS cut framer, with and without a trailer: any split gives the same
//! frames, no frame exceeds its cap, and the frames account for every byte.
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
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let framing = Framing::Cut {
        trailer: (selector & 1 == 1).then(|| "*** ENDE ***".to_string()),
    };
    let whole = frames(&framing, input, input.len());
    let split = frames(&framing, input, (selector >> 2) as usize);
    assert_eq!(whole, split);
    let mut covered = 0u64;
    for f in &whole {
        match f {
            Frame::Data(d) => {
                assert!(!d.is_empty() && d.len() <= MAX);
                covered += d.len() as u64;
            }
            Frame::Oversized { head, len } => {
                assert!(head.len() == MAX && *len > MAX as u64);
                covered += len;
            }
            Frame::Rejected { .. } => panic!("cut framing rejects nothing"),
        }
    }
    assert_eq!(covered, input.len() as u64);
});
