//! Captures of a register's raw output, for retail IT: record a real register, replay it at an
//! agent, and check a format or receipt template against it offline.
//!
//! A capture file is JSON lines, one per read: `{"t": "<RFC 3339>", "raw": "<base64>"}`. It
//! holds the bytes exactly as they came off the wire (delimiters, control codes, noise), so a
//! replay reproduces the register byte for byte. `pos parse` also takes a plain binary capture
//! (for example `cat /dev/ttyUSB0 > capture.bin`).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::framing::Frame;
use super::{FrameParser, Identity, serial};
use crate::config::Transport;
use crate::model::transaction::Transaction;

/// One read from the register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub t: Timestamp,
    #[serde(with = "crate::deadletter::base64_bytes")]
    pub raw: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error("capture file line {line}: {reason}")]
    Format { line: usize, reason: String },
}

/// Whether `bytes` is a capture file rather than raw register output.
pub fn is_capture(bytes: &[u8]) -> bool {
    bytes.starts_with(b"{\"t\":")
}

/// The chunks of a capture file.
pub fn read_chunks(bytes: &[u8]) -> Result<Vec<Chunk>, CaptureError> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| {
            serde_json::from_slice(line).map_err(|e| CaptureError::Format {
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// The register's byte stream in a file: a capture's chunks joined, or the file as it is.
pub fn stream_of(bytes: &[u8]) -> Result<Vec<u8>, CaptureError> {
    if is_capture(bytes) {
        Ok(read_chunks(bytes)?
            .into_iter()
            .flat_map(|c| c.raw)
            .collect())
    } else {
        Ok(bytes.to_vec())
    }
}

/// Records what a register sends over its configured transport into `out`, without ingesting
/// anything, until `token` is cancelled. `on_chunk` sees each read (the CLI prints verdicts).
/// Returns the bytes recorded.
pub async fn record(
    transport: &Transport,
    out: &Path,
    token: &CancellationToken,
    mut on_chunk: impl FnMut(&Chunk),
) -> Result<u64, CaptureError> {
    let mut file = std::fs::File::create(out)?;
    let mut total = 0u64;
    let mut write = |raw: &[u8]| -> Result<(), CaptureError> {
        let chunk = Chunk {
            t: Timestamp::now(),
            raw: raw.to_vec(),
        };
        let mut line = serde_json::to_vec(&chunk).expect("chunks serialise");
        line.push(b'\n');
        file.write_all(&line)?;
        file.flush()?;
        total += raw.len() as u64;
        on_chunk(&chunk);
        Ok(())
    };
    match transport {
        Transport::TcpListen { bind } => {
            let addr = crate::config::parse_socket_addr(bind).map_err(CaptureError::Unsupported)?;
            let listener = tokio::net::TcpListener::bind(addr).await?;
            // One register connection after another, until cancelled.
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a?,
                    _ = token.cancelled() => break,
                };
                read_all(accepted.0, token, &mut write).await?;
            }
        }
        Transport::TcpConnect { addr } => {
            let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
            read_all(stream, token, &mut write).await?;
        }
        Transport::Serial { .. } => {
            let builder = serial::builder(transport).expect("a serial transport");
            let port = serial::open(builder)
                .await
                .map_err(|e| CaptureError::Unsupported(format!("cannot open the port: {e}")))?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (reader, thread) = serial::byte_stream(port, stop.clone(), "capture".into());
            read_all(reader, token, &mut write).await?;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = thread.await;
        }
        Transport::Http => {
            return Err(CaptureError::Unsupported(
                "an HTTP register posts to the agent; its rejected bodies are in the dead-letter store".into(),
            ));
        }
    }
    Ok(total)
}

async fn read_all(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    token: &CancellationToken,
    write: &mut impl FnMut(&[u8]) -> Result<(), CaptureError>,
) -> Result<(), CaptureError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = reader.read(&mut buf) => n?,
            _ = token.cancelled() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        write(&buf[..n])?;
    }
}

/// How fast a replay goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// As fast as the connection takes it.
    Fast,
    /// With the gaps between reads as recorded.
    AsRecorded,
}

/// Sends a capture (or a raw file) to `to` over TCP, byte for byte. Returns bytes sent.
pub async fn replay(
    file: &Path,
    to: &str,
    pace: Pace,
    token: &CancellationToken,
) -> Result<u64, CaptureError> {
    let bytes = std::fs::read(file)?;
    let chunks = if is_capture(&bytes) {
        read_chunks(&bytes)?
    } else {
        vec![Chunk {
            t: Timestamp::now(),
            raw: bytes,
        }]
    };
    let mut stream = tokio::net::TcpStream::connect(to).await?;
    // Replies (if the listener sends them) are drained so the agent never blocks on us.
    let (mut read, mut write) = stream.split();
    let drain = async {
        let mut sink = vec![0u8; 4096];
        while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let send = async {
        let mut sent = 0u64;
        let mut previous: Option<Timestamp> = None;
        for chunk in &chunks {
            if let (Pace::AsRecorded, Some(p)) = (pace, previous) {
                let gap = chunk
                    .t
                    .duration_since(p)
                    .unsigned_abs()
                    .min(Duration::from_secs(60));
                tokio::select! {
                    _ = tokio::time::sleep(gap) => {}
                    _ = token.cancelled() => break,
                }
            }
            previous = Some(chunk.t);
            write.write_all(&chunk.raw).await?;
            sent += chunk.raw.len() as u64;
        }
        write.shutdown().await?;
        Ok::<u64, std::io::Error>(sent)
    };
    let (sent, ()) = tokio::join!(send, async {
        // Stop draining a little after the last byte; the agent answers quickly.
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    });
    Ok(sent?)
}

/// What one frame of a capture holds.
#[derive(Debug)]
pub struct ParsedFrame {
    /// 1-based position in the capture.
    pub index: usize,
    pub bytes: usize,
    pub frame: Frame,
    pub result: Result<Vec<Result<Transaction, String>>, String>,
}

/// Frames and parses a capture offline, as the agent would.
pub fn parse(
    bytes: &[u8],
    parser: &FrameParser,
    id: &Identity,
) -> Result<Vec<ParsedFrame>, CaptureError> {
    let stream = stream_of(bytes)?;
    Ok(parser
        .frames(&stream)
        .into_iter()
        .enumerate()
        .map(|(i, frame)| {
            let bytes = match &frame {
                Frame::Data(b) | Frame::Rejected { raw: b, .. } => b.len(),
                Frame::Oversized { len, .. } => *len as usize,
            };
            ParsedFrame {
                index: i + 1,
                bytes,
                result: parser.parse_frame(&frame, id),
                frame,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Framing, RegisterFormat};

    fn parser() -> FrameParser {
        FrameParser {
            format: RegisterFormat::Jsonl,
            framing: Framing::Newline,
            template: None,
            tz: jiff::tz::TimeZone::UTC,
            max_frame: 4096,
        }
    }

    fn id() -> Identity {
        Identity {
            store: "s1".into(),
            register: "r1".into(),
            lane: None,
            currency: "EUR".into(),
        }
    }

    const LINE: &[u8] = br#"{"sequence":1,"business_day":"2026-11-22","started_at":"2026-11-22T09:00:00Z","ended_at":"2026-11-22T09:01:00Z","total":0}"#;

    #[test]
    fn capture_files_and_raw_files_give_the_same_stream() {
        let mut raw = LINE.to_vec();
        raw.extend_from_slice(b"\ngarbage\n");
        let chunks = [
            Chunk {
                t: Timestamp::UNIX_EPOCH,
                raw: raw[..10].to_vec(),
            },
            Chunk {
                t: Timestamp::UNIX_EPOCH,
                raw: raw[10..].to_vec(),
            },
        ];
        let capture: Vec<u8> = chunks
            .iter()
            .flat_map(|c| {
                let mut l = serde_json::to_vec(c).unwrap();
                l.push(b'\n');
                l
            })
            .collect();
        assert!(is_capture(&capture));
        assert!(!is_capture(&raw));
        assert_eq!(stream_of(&capture).unwrap(), raw);

        let parsed = parse(&capture, &parser(), &id()).unwrap();
        assert_eq!(parsed.len(), 2);
        let first = parsed[0].result.as_ref().unwrap();
        assert_eq!(first[0].as_ref().unwrap().id, "s1:r1:20261122:1");
        assert!(parsed[1].result.as_ref().unwrap()[0].is_err());
    }

    #[test]
    fn a_broken_capture_line_is_named() {
        let err =
            read_chunks(b"{\"t\":\"2026-01-01T00:00:00Z\",\"raw\":\"AA==\"}\n{\"t\": nope}\n")
                .unwrap_err();
        assert!(err.to_string().starts_with("capture file line 2:"), "{err}");
    }
}
