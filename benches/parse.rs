//! Parse throughput per register format and framer (criterion).
//!
//! `cargo bench --bench parse`

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use storelink::config::{Checksum, Framing};
use storelink::pos::framing::{Framer, StxEtxFramer};
use storelink::pos::receipt::{self, ReceiptTemplate};
use storelink::pos::{jsonl, poslog};
use storelink::sim::SimRegister;
use tokio_util::codec::Decoder;

fn lines(n: usize) -> Vec<Vec<u8>> {
    let mut sim = SimRegister::new("s042", "lane-1", Some("1"), 7);
    let start: jiff::Timestamp = "2026-11-22T08:00:00Z".parse().unwrap();
    (0..n)
        .map(|i| {
            serde_json::to_vec(&sim.next(start + jiff::SignedDuration::from_secs(i as i64)))
                .unwrap()
        })
        .collect()
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn formats(c: &mut Criterion) {
    let lines = lines(1000);
    let bytes: usize = lines.iter().map(Vec::len).sum();
    eprintln!(
        "jsonl: {} bytes per transaction on average",
        bytes / lines.len()
    );
    let mut g = c.benchmark_group("format");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("jsonl/1000 transactions", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(jsonl::parse(black_box(l)).unwrap());
            }
        })
    });

    let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    // A typical document: a sale with several lines, discounts, loyalty and tenders.
    let doc = fixture("tests/fixtures/poslog/discount.xml");
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("poslog/one document ({} bytes)", doc.len()), |b| {
        b.iter(|| black_box(poslog::parse(black_box(&doc), &tz, "EUR").unwrap()))
    });

    let template = ReceiptTemplate::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/receipts/supermarket.toml"
    )))
    .unwrap();
    let capture = fixture("tests/fixtures/receipts/supermarket_sale.bin");
    g.bench_function(
        format!("receipt/one capture ({} bytes)", capture.len()),
        |b| b.iter(|| black_box(receipt::parse(black_box(&capture), &template, &tz).unwrap())),
    );
    g.finish();
}

fn framers(c: &mut Criterion) {
    let lines = lines(1000);
    let mut newline = Vec::new();
    let mut stx = Vec::new();
    let mut xml = Vec::new();
    for l in &lines {
        newline.extend_from_slice(l);
        newline.push(b'\n');
        let mut covered = l.clone();
        covered.push(0x03);
        stx.push(0x02);
        stx.extend_from_slice(&covered);
        stx.extend(StxEtxFramer::check_byte(Checksum::Xor, &covered));
        xml.extend_from_slice(b"<Transaction><Note>");
        xml.extend(l.iter().filter(|&&b| b != b'<' && b != b'&'));
        xml.extend_from_slice(b"</Note></Transaction>\n");
    }
    let receipt = fixture("tests/fixtures/receipts/supermarket_sale.bin");
    let receipts: Vec<u8> = (0..200).flat_map(|_| receipt.iter().copied()).collect();
    let mut g = c.benchmark_group("framer");
    for (name, framing, stream, frames) in [
        ("newline", Framing::Newline, &newline, 1000),
        (
            "stx-etx-xor",
            Framing::StxEtx {
                checksum: Checksum::Xor,
            },
            &stx,
            1000,
        ),
        ("xml", Framing::Xml, &xml, 1000),
        ("escpos-cut", Framing::Cut { trailer: None }, &receipts, 200),
    ] {
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut framer = Framer::new(&framing, 1 << 20);
                // Arrive in 4 KiB reads, as from a socket.
                let mut buf = BytesMut::new();
                let mut n = 0;
                for chunk in stream.chunks(4096) {
                    buf.extend_from_slice(chunk);
                    while let Some(f) = framer.decode(&mut buf).unwrap() {
                        black_box(f);
                        n += 1;
                    }
                }
                assert_eq!(n, frames);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, formats, framers);
criterion_main!(benches);
