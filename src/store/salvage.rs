//! Salvage: every intact record of a damaged log file, found by scanning its bytes.
//!
//! redb refuses a file whose checksums fail, and a B-tree page lost in the middle hides every
//! record below it. The records themselves are framed (see [`super::log::frame`]): a magic, the
//! table, key and value, and a CRC-32. Scanning the raw bytes for frames therefore finds every
//! record that survived, wherever it sits, and only the damaged ones are lost.
//!
//! Invariants:
//! - Only frames whose CRC holds are returned; a frame that starts well but fails its CRC (or
//!   runs past the end of the file) is counted as unreadable, and the first of them are kept as
//!   raw bytes for the dead letter that reports the salvage.
//! - The same record can appear more than once (copy-on-write leaves older copies of a page
//!   until its space is reused); the caller de-duplicates by key. A record removed long ago can
//!   reappear the same way: an event central already has is then sent again with its stable id,
//!   which central de-duplicates, as after any resend.
//! - Memory stays bounded by the read window and the largest frame, not the file.

use std::io::Read;
use std::path::Path;

use super::log::{FrameRead, Framed, LogTable, MAGIC, MAX_FRAME, read_frame};

/// How much of the file is read at a time.
const WINDOW: usize = 8 << 20;

/// Raw bytes of unreadable frames kept for the report.
const SAMPLE_BYTES: usize = 64 << 10;

/// What a scan found besides the records it handed over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    /// Frames whose CRC held.
    pub records: u64,
    /// Frames that started like a record (magic and a known table) but were damaged.
    pub unreadable: u64,
    /// The first unreadable frames' bytes, up to 64 KiB.
    pub sample: Vec<u8>,
    /// Bytes scanned.
    pub bytes: u64,
}

/// Scans `file` and hands every intact record to `found`, in file order.
pub(super) fn scan(
    file: &Path,
    mut found: impl FnMut(Framed) -> Result<(), super::StoreError>,
) -> Result<ScanReport, super::StoreError> {
    let io = |source| super::StoreError::Io {
        path: file.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(file).map_err(io)?;
    let mut report = ScanReport {
        bytes: f.metadata().map_err(io)?.len(),
        ..ScanReport::default()
    };
    let mut buf: Vec<u8> = Vec::with_capacity(WINDOW);
    let mut eof = false;
    let finder = memchr::memmem::Finder::new(&MAGIC);
    // `buf[at..]` is what is still to be looked at.
    let mut at = 0usize;
    loop {
        if !eof && buf.len() - at < WINDOW / 2 {
            buf.drain(..at);
            at = 0;
            eof = fill(&mut f, &mut buf, WINDOW).map_err(io)?;
        }
        let Some(offset) = finder.find(&buf[at..]) else {
            if eof {
                return Ok(report);
            }
            // A magic may straddle the window's end: keep its first bytes.
            let keep = buf.len().saturating_sub(at).min(MAGIC.len() - 1);
            at = buf.len() - keep;
            continue;
        };
        let start = at + offset;
        match read_frame(&buf[start..]) {
            FrameRead::Record(record, len) => {
                report.records += 1;
                found(record)?;
                at = start + len;
            }
            FrameRead::Short(need) if !eof && need <= MAX_FRAME => {
                // Read on until the whole frame is in the buffer, then look again.
                buf.drain(..start);
                at = 0;
                while buf.len() < need && !eof {
                    let want = need - buf.len();
                    eof = fill(&mut f, &mut buf, want).map_err(io)?;
                }
            }
            FrameRead::Short(_) | FrameRead::Broken => {
                if looks_like_a_frame(&buf[start..]) {
                    report.unreadable += 1;
                    let room = SAMPLE_BYTES.saturating_sub(report.sample.len());
                    let end = buf.len().min(start + 256).min(start + room);
                    report.sample.extend_from_slice(&buf[start..end]);
                }
                at = start + 1;
            }
        }
    }
}

/// A magic followed by a table that holds framed records: a damaged record rather than the
/// magic's four bytes occurring by chance in other data.
fn looks_like_a_frame(bytes: &[u8]) -> bool {
    bytes
        .get(4)
        .and_then(|b| LogTable::from_id(*b))
        .is_some_and(|t| t.framed())
}

/// Appends up to `want` bytes; returns whether the file ended.
fn fill(f: &mut std::fs::File, buf: &mut Vec<u8>, want: usize) -> std::io::Result<bool> {
    let before = buf.len();
    f.by_ref().take(want as u64).read_to_end(buf)?;
    Ok(buf.len() - before < want)
}

#[cfg(test)]
mod tests {
    use super::super::log::frame;
    use super::*;

    fn records(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| {
                (
                    format!("k{i:05}").into_bytes(),
                    vec![b'a' + (i % 26) as u8; 50 + i * 37 % 3000],
                )
            })
            .collect()
    }

    #[test]
    fn finds_every_intact_frame_in_noise_and_counts_the_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let mut bytes = vec![0u8; 100];
        let recs = records(3000);
        let mut spans = Vec::new();
        for (k, v) in &recs {
            let start = bytes.len();
            bytes.extend_from_slice(&frame(LogTable::Outbox, k, v));
            spans.push(start..bytes.len());
            bytes.extend_from_slice(&[7u8; 13]);
        }
        // Damage one record in the middle.
        let damaged = spans[1500].clone();
        bytes[damaged.start + 20] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let mut got = Vec::new();
        let report = scan(&file, |r| {
            got.push((r.key, r.value));
            Ok(())
        })
        .unwrap();
        assert_eq!(report.records, 2999);
        assert_eq!(report.unreadable, 1);
        assert!(!report.sample.is_empty());
        let want: Vec<_> = recs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1500)
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(got, want, "in file order, across window boundaries");
    }

    #[test]
    fn a_frame_cut_off_by_the_end_of_the_file_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let mut bytes = frame(LogTable::Meta, b"a", b"one");
        let second = frame(LogTable::Meta, b"b", b"two");
        bytes.extend_from_slice(&second[..second.len() - 3]);
        std::fs::write(&file, &bytes).unwrap();
        let mut n = 0;
        let report = scan(&file, |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((n, report.unreadable), (1, 1));
    }
}
