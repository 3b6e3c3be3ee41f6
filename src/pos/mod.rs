//! Register sources: bytes from cash registers become canonical [`Transaction`]s.
//!
//! A source owns a transport (today: `tcp-listen`), cuts the stream into frames
//! ([`framing`]), parses each frame with the register's format ([`jsonl`]), normalises it
//! ([`normalize`]), and hands it to the core's ingest stage. It answers the register only after
//! the core says the transaction is durable.
//!
//! Invariants:
//! - A frame that cannot be used is never dropped: it becomes a dead letter with its raw bytes
//!   and the reason, the register is told `err <reason>`, and the connection goes on.
//! - Store, register and lane come from the agent's config unless the register names them; a
//!   transaction for another store is refused.
//! - Sources never crash the daemon: errors are retried inside the source or escalated to the
//!   supervisor, which restarts it.
//!
//! One import cycle inside this module, on purpose: `framing` and `escpos` name each other.
//! The framer set (`framing::Framer`) includes the paper-cut framer, which must read ESC/POS
//! command lengths to know that a cut byte inside an image is not a cut, so it lives in
//! `escpos` with the rest of that knowledge; and it yields `framing::Frame` like every framer.

pub mod capture;
pub mod escpos;
pub mod framing;
pub mod jsonl;
pub mod poslog;
pub mod receipt;
pub mod serial;
pub mod tcp;

use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use jiff::tz::TimeZone;

use crate::clock::SharedClock;
use crate::config::{Config, RegisterConfig, RegisterFormat, Transport};
use crate::deadletter::DeadLetter;
use crate::model::ingest::{IngestError, IngestHandle, IngestReply};
use crate::model::register::{LiveEvents, RegisterEvent};
use crate::model::transaction::{InvalidTransaction, Transaction};
use crate::supervisor::Component;
use framing::{Frame, Framer};
use receipt::ReceiptTemplate;

/// Why a frame (or one transaction in it) could not be read. The message never quotes input
/// values, which may be loyalty ids; it names fields, rules and positions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Who a register is: what normalisation fills in when the register leaves it out.
#[derive(Debug, Clone)]
pub struct Identity {
    pub store: String,
    pub register: String,
    pub lane: Option<String>,
    pub currency: String,
}

impl Identity {
    /// Whose bytes a configured register's are.
    pub fn of(config: &Config, register: &RegisterConfig) -> Identity {
        Identity {
            store: config.store.id.clone(),
            register: register.name.clone(),
            lane: register.lane.clone(),
            currency: config.store.currency.clone(),
        }
    }
}

/// How a register's bytes become transactions: framing, format, template. Needs nothing
/// running, so tools (`storelink pos parse`) use it too.
#[derive(Debug, Clone)]
pub struct FrameParser {
    pub format: RegisterFormat,
    pub framing: crate::config::Framing,
    pub template: Option<Arc<ReceiptTemplate>>,
    pub tz: TimeZone,
    pub max_frame: usize,
}

impl FrameParser {
    /// A fresh framer for one connection, one open of a serial port, or one file.
    pub fn framer(&self) -> Framer {
        Framer::new(&self.framing, self.max_frame)
    }

    /// Every frame in `bytes`, as a framer cuts it.
    pub fn frames(&self, bytes: &[u8]) -> Vec<Frame> {
        let mut stream = self.stream();
        let mut frames = stream.push(bytes);
        frames.extend(stream.finish());
        frames
    }

    /// A framer for bytes that arrive in chunks (a recording as the register prints).
    pub fn stream(&self) -> FrameStream {
        FrameStream {
            framer: self.framer(),
            buf: bytes::BytesMut::new(),
        }
    }

    /// The transactions in one frame's bytes, each parsed but not yet normalised. `currency`
    /// is the store's, for sources that do not say.
    pub fn decode(
        &self,
        bytes: &[u8],
        currency: &str,
    ) -> Result<Vec<Result<Transaction, String>>, String> {
        match self.format {
            RegisterFormat::Jsonl => Ok(vec![jsonl::parse(bytes).map_err(|e| e.0)]),
            RegisterFormat::Poslog => poslog::parse(bytes, &self.tz, currency)
                .map(|txs| txs.into_iter().map(|r| r.map_err(|e| e.0)).collect())
                .map_err(|e| e.0),
            RegisterFormat::Receipt => {
                let template = self
                    .template
                    .as_ref()
                    .ok_or_else(|| "receipt register without a template".to_string())?;
                match receipt::parse(bytes, template, &self.tz) {
                    Ok(Some(tx)) => Ok(vec![Ok(tx)]),
                    Ok(None) => Ok(Vec::new()),
                    Err(e) => Err(e.0),
                }
            }
        }
    }

    /// What a frame holds: its transactions, normalised, or why it is unusable.
    pub fn parse_frame(
        &self,
        frame: &Frame,
        id: &Identity,
    ) -> Result<Vec<Result<Transaction, String>>, String> {
        let results = match frame {
            Frame::Data(bytes) => self.decode(bytes, &id.currency)?,
            Frame::Oversized { len, .. } => {
                return Err(format!(
                    "frame of {len} bytes exceeds the {} byte limit",
                    self.max_frame
                ));
            }
            Frame::Rejected { reason, .. } => return Err(reason.clone()),
        };
        let many = results.len() > 1;
        Ok(results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.and_then(|tx| normalize(tx, id).map_err(|e| e.0))
                    .map_err(|e| {
                        if many {
                            format!("transaction {}: {e}", i + 1)
                        } else {
                            e
                        }
                    })
            })
            .collect())
    }
}

impl FrameParser {
    /// The parser a configured register uses; fails only when its template cannot be loaded.
    pub fn for_register(register: &RegisterConfig, tz: TimeZone) -> Result<Self, String> {
        let template = match &register.template {
            Some(path) => Some(Arc::new(ReceiptTemplate::load(path).map_err(|e| {
                format!(
                    "register {}: template {}: {e}",
                    register.name,
                    path.display()
                )
            })?)),
            None => None,
        };
        Ok(FrameParser {
            format: register.format,
            framing: register.framing(),
            template,
            tz,
            max_frame: register.max_frame_bytes,
        })
    }
}

/// Frames cut from a stream as it arrives; the same cuts [`FrameParser::frames`] makes of the
/// whole.
pub struct FrameStream {
    framer: Framer,
    buf: bytes::BytesMut,
}

impl FrameStream {
    /// The frames `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        use tokio_util::codec::Decoder;
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        while let Ok(Some(frame)) = self.framer.decode(&mut self.buf) {
            frames.push(frame);
        }
        frames
    }

    /// What the end of the stream completes: a last frame without its delimiter.
    pub fn finish(mut self) -> Vec<Frame> {
        use tokio_util::codec::Decoder;
        let mut frames = Vec::new();
        while let Ok(Some(frame)) = self.framer.decode_eof(&mut self.buf) {
            frames.push(frame);
        }
        frames
    }
}

/// Everything a register source needs to know about where its bytes come from.
#[derive(Debug, Clone)]
pub struct RegisterContext {
    pub id: Identity,
    pub parser: FrameParser,
    pub clock: SharedClock,
    pub ingest: IngestHandle,
    /// Live register events (`customer_identified`, …) on a JSON-lines connection go here;
    /// the reply line carries the effects.
    pub live: Option<std::sync::Arc<dyn LiveEvents>>,
}

impl RegisterContext {
    /// Fails only when a receipt template cannot be loaded.
    pub fn new(
        config: &Config,
        register: &RegisterConfig,
        ingest: IngestHandle,
        clock: SharedClock,
    ) -> Result<Self, String> {
        Ok(Self {
            id: Identity::of(config, register),
            parser: FrameParser::for_register(register, config.time_zone())?,
            clock,
            ingest,
            live: None,
        })
    }

    pub fn framer(&self) -> Framer {
        self.parser.framer()
    }

    /// Parses one frame and hands what it holds to the core. The returned [`Pending`]
    /// resolves, once every outcome is durable, to the reply for the register.
    pub async fn submit(&self, frame: Frame) -> Pending {
        if let Some(event) = self.register_event(&frame) {
            return Pending::Effects(self.on_register_event(event).await);
        }
        let (transactions, problems) = match self.parser.parse_frame(&frame, &self.id) {
            Ok(results) => {
                let mut ok = Vec::new();
                let mut problems = Vec::new();
                for result in results {
                    match result {
                        Ok(tx) => ok.push(tx),
                        Err(e) => problems.push(e),
                    }
                }
                (ok, problems)
            }
            Err(reason) => (Vec::new(), vec![reason]),
        };
        if transactions.is_empty() && problems.is_empty() {
            // A status query, a bare cut, a card-terminal slip: nothing to count, worth a trace.
            tracing::debug!("frame holds no transaction");
            metrics::counter!("storelink_register_frames_without_transaction_total", "register" => self.id.register.clone())
                .increment(1);
        }
        let mut accepted = Vec::with_capacity(transactions.len());
        for tx in transactions {
            tracing::debug!(id = %tx.id, total = tx.total, "transaction received");
            accepted.push(self.ingest.transaction(tx).await);
        }
        let rejected = if problems.is_empty() {
            None
        } else {
            let reason = problems.join("; ");
            Some((reason.clone(), self.dead_letter(frame, reason).await))
        };
        Pending::Frame { accepted, rejected }
    }

    /// A JSON-lines frame that is a live register event rather than a transaction. Checked
    /// for the `"type"` key first, so transactions pay one scan and no second parse.
    fn register_event(&self, frame: &Frame) -> Option<RegisterEvent> {
        self.live.as_ref()?;
        let Frame::Data(bytes) = frame else {
            return None;
        };
        if self.parser.format != RegisterFormat::Jsonl
            || memchr::memmem::find(bytes, b"\"type\"").is_none()
        {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    async fn on_register_event(&self, mut event: RegisterEvent) -> Result<String, String> {
        // The connection says which register this is when the event does not.
        event.default_register(&self.id.register);
        let live = self.live.as_ref().ok_or("offers are not running")?;
        live.answer(event).await
    }

    async fn dead_letter(&self, frame: Frame, reason: String) -> oneshot::Receiver<IngestReply> {
        let (raw, raw_len) = match frame {
            Frame::Data(b) | Frame::Rejected { raw: b, .. } => {
                let len = b.len() as u64;
                (b.to_vec(), len)
            }
            Frame::Oversized { head, len } => (head.to_vec(), len),
        };
        metrics::counter!("storelink_register_frames_rejected_total", "register" => self.id.register.clone())
            .increment(1);
        tracing::warn!(bytes = raw_len, %reason, "rejected a register frame; kept as a dead letter");
        let letter = DeadLetter::new(
            &self.id.store,
            format!("register:{}", self.id.register),
            reason,
            self.clock.now(),
            raw,
            raw_len,
            self.parser.max_frame,
        );
        self.ingest.dead_letter(letter).await
    }

    /// Frames a whole body (an HTTP request) and submits every frame, returning each frame's
    /// outcome once durable.
    pub async fn submit_all(&self, body: &[u8]) -> Vec<FrameOutcome> {
        let mut pending = Vec::new();
        for frame in self.parser.frames(body) {
            pending.push(self.submit(frame).await);
        }
        let mut outcomes = Vec::with_capacity(pending.len());
        for p in pending {
            outcomes.push(p.outcome().await);
        }
        outcomes
    }
}

/// Fills what the register left out and derives the id.
pub fn normalize(mut tx: Transaction, ctx: &Identity) -> Result<Transaction, InvalidTransaction> {
    if tx.store.is_empty() {
        tx.store = ctx.store.clone();
    } else if tx.store != ctx.store {
        return Err(InvalidTransaction(format!(
            "transaction is for store {:?}, this agent serves {:?}",
            tx.store, ctx.store
        )));
    }
    if tx.register.is_empty() {
        tx.register = ctx.register.clone();
    }
    if tx.register.contains(':') || tx.register.len() > 64 {
        return Err(InvalidTransaction(
            "register must be at most 64 characters without ':'".into(),
        ));
    }
    if tx.lane.is_none() {
        tx.lane = ctx.lane.clone();
    }
    if tx.currency.is_empty() {
        tx.currency = ctx.currency.clone();
    }
    tx.id = tx.derive_id();
    tx.validate()?;
    Ok(tx)
}

/// What a register is owed for one frame, in the order frames arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameOutcome {
    /// Ids stored (or already held) durably.
    pub ids: Vec<String>,
    /// Why the frame, or part of it, is bad input (it is kept as a dead letter).
    pub refused: Option<String>,
    /// Why the agent could not take good input right now (outbox full, storage failing,
    /// shutting down); the register should send it again later.
    pub failed: Option<String>,
}

impl FrameOutcome {
    fn error(&self) -> Option<String> {
        match (&self.refused, &self.failed) {
            (None, None) => None,
            (Some(r), None) => Some(r.clone()),
            (None, Some(f)) => Some(f.clone()),
            (Some(r), Some(f)) => Some(format!("{r}; {f}")),
        }
    }
}

/// The outcomes of one frame, resolving once they are durable.
#[derive(Debug)]
pub enum Pending {
    Frame {
        accepted: Vec<oneshot::Receiver<IngestReply>>,
        rejected: Option<(String, oneshot::Receiver<IngestReply>)>,
    },
    /// A live register event, already answered: the effects as JSON, or why not.
    Effects(Result<String, String>),
}

impl Pending {
    /// Waits until everything from the frame is durable (or refused).
    pub async fn outcome(self) -> FrameOutcome {
        let (accepted, rejected) = match self {
            Pending::Frame { accepted, rejected } => (accepted, rejected),
            Pending::Effects(answer) => {
                return FrameOutcome {
                    ids: Vec::new(),
                    refused: answer.err(),
                    failed: None,
                };
            }
        };
        let mut ids = Vec::with_capacity(accepted.len());
        let mut failures = Vec::new();
        for rx in accepted {
            match rx.await {
                Ok(Ok(a)) => ids.push(a.id),
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(_) => failures.push(IngestError::ShuttingDown.to_string()),
            }
        }
        let refused = match rejected {
            Some((reason, durable)) => {
                // Waiting keeps replies in order and makes sure the dead letter is on disk
                // before the register moves on.
                let _ = durable.await;
                Some(reason)
            }
            None => None,
        };
        failures.dedup();
        FrameOutcome {
            ids,
            refused,
            failed: (!failures.is_empty()).then(|| failures.join("; ")),
        }
    }

    /// The reply line (without the newline): `ok <id>…` when everything in the frame is
    /// durable, otherwise `err <reason>` (what was good is stored all the same, so a resend of
    /// the whole frame is harmless).
    pub async fn reply_line(self) -> String {
        if let Pending::Effects(Ok(effects)) = &self {
            return format!("effects {effects}");
        }
        let outcome = self.outcome().await;
        match outcome.error() {
            None if outcome.ids.is_empty() => "ok".to_string(),
            None => format!("ok {}", outcome.ids.join(" ")),
            Some(e) => format!("err {}", one_line(&e)),
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// Replies a connection may owe before the source stops reading (backpressure on a
/// pipelining register).
pub const PIPELINE_DEPTH: usize = 1024;

/// Feeds every frame from `reader` to the core until the stream ends or `token` is cancelled,
/// keeping up to [`PIPELINE_DEPTH`] frames in flight. Each frame's outcome is awaited in order;
/// with a `writer`, it is answered there (`ok <ids>` / `err <reason>`).
pub async fn pump<R, W>(
    reader: R,
    writer: Option<W>,
    ctx: &RegisterContext,
    token: &CancellationToken,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    let mut frames = tokio_util::codec::FramedRead::new(reader, ctx.framer());
    let (owed_tx, mut owed_rx) = tokio::sync::mpsc::channel::<Pending>(PIPELINE_DEPTH);

    let read = async {
        loop {
            let next = tokio::select! {
                f = frames.next() => f,
                _ = token.cancelled() => break,
            };
            match next {
                Some(Ok(frame)) => {
                    let pending = ctx.submit(frame).await;
                    if owed_tx.send(pending).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "register stream read failed");
                    break;
                }
                None => break,
            }
        }
        drop(owed_tx);
    };

    let answer = async {
        let mut out = writer.map(tokio::io::BufWriter::new);
        while let Some(pending) = owed_rx.recv().await {
            let mut line = pending.reply_line().await;
            let Some(w) = out.as_mut() else { continue };
            line.push('\n');
            // Keep resolving after the peer is gone: every frame still gets its durable outcome.
            let broken = w.write_all(line.as_bytes()).await.is_err()
                || (owed_rx.is_empty() && w.flush().await.is_err());
            if broken {
                out = None;
            }
        }
        if let Some(mut w) = out {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        }
    };

    tokio::join!(read, answer);
}

/// How long a source waits before retrying a transport that failed to start.
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Why a register source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid address {0}")]
    Address(String),
}

/// Runs one register's source until cancelled.
pub async fn run(
    register: RegisterConfig,
    ctx: RegisterContext,
    component: Component,
    token: CancellationToken,
) -> Result<(), SourceError> {
    let replies = register.replies();
    match &register.transport {
        Transport::TcpListen { bind } => tcp::listen(bind, replies, ctx, component, token).await,
        Transport::TcpConnect { addr } => {
            tcp::connect(addr, replies, ctx, component, token).await;
            Ok(())
        }
        Transport::Serial { .. } => {
            serial::run(&register.transport, ctx, component, token).await;
            Ok(())
        }
        Transport::Http => {
            // Frames arrive through the local API, which shares this context; the task only
            // reports where to send them.
            component.running(Some(format!(
                "POST /pos/v1/transactions?register={}",
                ctx.id.register
            )));
            token.cancelled().await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Identity {
        Identity {
            store: "s042".into(),
            register: "lane-3".into(),
            lane: Some("3".into()),
            currency: "EUR".into(),
        }
    }

    fn tx() -> Transaction {
        jsonl::parse(br#"{"sequence":7,"business_day":"2026-11-22","started_at":"2026-11-22T09:00:00Z","ended_at":"2026-11-22T09:01:10Z","total":0}"#).unwrap()
    }

    #[test]
    fn normalize_fills_from_config_and_derives_the_id() {
        let t = normalize(tx(), &ctx()).unwrap();
        assert_eq!(t.store, "s042");
        assert_eq!(t.register, "lane-3");
        assert_eq!(t.lane.as_deref(), Some("3"));
        assert_eq!(t.currency, "EUR");
        assert_eq!(t.id, "s042:lane-3:20261122:7");
    }

    #[test]
    fn normalize_hashes_content_when_there_is_no_sequence() {
        let mut t = tx();
        t.sequence = None;
        let a = normalize(t.clone(), &ctx()).unwrap();
        let b = normalize(t, &ctx()).unwrap();
        assert!(a.id.starts_with("s042:lane-3:20261122:h"), "{}", a.id);
        assert_eq!(a.id, b.id);
    }

    #[test]
    fn normalize_keeps_what_the_register_says_but_refuses_another_store() {
        let mut t = tx();
        t.register = "pos-server-7".into();
        t.currency = "CHF".into();
        let n = normalize(t, &ctx()).unwrap();
        assert_eq!(n.id, "s042:pos-server-7:20261122:7");
        assert_eq!(n.currency, "CHF");

        let mut t = tx();
        t.store = "s999".into();
        assert!(normalize(t, &ctx()).unwrap_err().0.contains("s999"));
    }
}

#[cfg(test)]
mod stream_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::RegisterConfig;

    fn parser(format: RegisterFormat) -> FrameParser {
        let mut register = RegisterConfig::new("r", format, None);
        register.max_frame_bytes = 64;
        FrameParser::for_register(&register, TimeZone::UTC).unwrap()
    }

    proptest! {
        /// However the bytes arrive, a stream cuts the frames the whole does: `pos record`
        /// shows a technician what `pos parse` of the recording will show.
        #[test]
        fn chunked_streams_cut_what_the_whole_cuts(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'<'), Just(b'>'), Just(b'/'), any::<u8>()],
                0..400,
            ),
            cuts in proptest::collection::vec(0usize..400, 0..8),
            xml in any::<bool>(),
        ) {
            let p = parser(if xml { RegisterFormat::Poslog } else { RegisterFormat::Jsonl });
            let whole = p.frames(&bytes);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut stream = p.stream();
            let mut chunked = Vec::new();
            let mut from = 0;
            for to in cuts.into_iter().chain([bytes.len()]) {
                chunked.extend(stream.push(&bytes[from..to]));
                from = to;
            }
            chunked.extend(stream.finish());
            prop_assert_eq!(format!("{whole:?}"), format!("{chunked:?}"));
        }
    }

    #[test]
    fn receipt_errors_name_their_line() {
        assert_eq!(receipt::error_line("line 7: no price"), Some(7));
        assert_eq!(receipt::error_line("transaction 2: line 12: x"), Some(12));
        assert_eq!(receipt::error_line("no total rule matched any line"), None);
    }
}
