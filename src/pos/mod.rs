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

pub mod framing;
pub mod jsonl;
pub mod tcp;
pub mod transaction;

use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::{Config, RegisterConfig, RegisterFormat, Transport};
use crate::deadletter::DeadLetter;
use crate::engine::{IngestError, IngestHandle, IngestReply};
use crate::supervisor::Component;
use framing::Frame;
use transaction::{InvalidTransaction, Transaction, transaction_id};

/// Everything a register source needs to know about where its bytes come from.
#[derive(Debug, Clone)]
pub struct RegisterContext {
    pub store: String,
    pub register: String,
    pub lane: Option<String>,
    pub currency: String,
    pub format: RegisterFormat,
    pub max_frame: usize,
    pub clock: SharedClock,
    pub ingest: IngestHandle,
}

impl RegisterContext {
    pub fn new(
        config: &Config,
        register: &RegisterConfig,
        ingest: IngestHandle,
        clock: SharedClock,
    ) -> Self {
        Self {
            store: config.store.id.clone(),
            register: register.name.clone(),
            lane: register.lane.clone(),
            currency: config.store.currency.clone(),
            format: register.format,
            max_frame: framing::DEFAULT_MAX_FRAME,
            clock,
            ingest,
        }
    }

    /// Parses one frame and hands it to the core. The returned [`Pending`] resolves to the
    /// line to send back once the outcome is durable.
    pub async fn submit(&self, frame: Frame) -> Pending {
        let parsed = match &frame {
            Frame::Data(bytes) => self.parse(bytes),
            Frame::Oversized { len, .. } => Err(format!(
                "frame of {len} bytes exceeds the {} byte limit",
                self.max_frame
            )),
        };
        match parsed {
            Ok(tx) => {
                tracing::debug!(id = %tx.id, total = tx.total, "transaction received");
                Pending::Transaction(self.ingest.transaction(tx).await)
            }
            Err(reason) => {
                let (raw, raw_len) = match frame {
                    Frame::Data(b) => {
                        let len = b.len() as u64;
                        (b.to_vec(), len)
                    }
                    Frame::Oversized { head, len } => (head.to_vec(), len),
                };
                metrics::counter!("storelink_register_frames_rejected_total", "register" => self.register.clone())
                    .increment(1);
                tracing::warn!(bytes = raw_len, %reason, "rejected a register frame; kept as a dead letter");
                let letter = DeadLetter::new(
                    &self.store,
                    format!("register:{}", self.register),
                    reason.clone(),
                    self.clock.now(),
                    raw,
                    raw_len,
                    self.max_frame,
                );
                Pending::Rejected {
                    reason,
                    durable: self.ingest.dead_letter(letter).await,
                }
            }
        }
    }

    fn parse(&self, bytes: &[u8]) -> Result<Transaction, String> {
        let tx = match self.format {
            RegisterFormat::Jsonl => jsonl::parse(bytes).map_err(|e| e.0)?,
        };
        normalize(tx, self).map_err(|e| e.0)
    }
}

/// Fills what the register left out and derives the id.
pub fn normalize(
    mut tx: Transaction,
    ctx: &RegisterContext,
) -> Result<Transaction, InvalidTransaction> {
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
    tx.id = transaction_id(&tx.store, &tx.register, tx.business_day, tx.sequence);
    tx.validate()?;
    Ok(tx)
}

/// A reply owed to the register, in the order frames arrived.
#[derive(Debug)]
pub enum Pending {
    Transaction(oneshot::Receiver<IngestReply>),
    Rejected {
        reason: String,
        durable: oneshot::Receiver<IngestReply>,
    },
}

impl Pending {
    /// Waits for the outcome and renders the reply line (without the newline).
    pub async fn reply_line(self) -> String {
        match self {
            Pending::Transaction(rx) => match rx.await {
                Ok(Ok(accepted)) => format!("ok {}", accepted.id),
                Ok(Err(e)) => format!("err {}", one_line(&e.to_string())),
                Err(_) => format!("err {}", IngestError::ShuttingDown),
            },
            Pending::Rejected { reason, durable } => {
                // The reason is sent either way; waiting keeps replies in order and makes sure
                // the dead letter is on disk before the register moves on.
                let _ = durable.await;
                format!("err {}", one_line(&reason))
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
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
    match &register.transport {
        Transport::TcpListen { bind } => tcp::listen(bind, ctx, component, token).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::system;

    fn ctx() -> RegisterContext {
        RegisterContext {
            store: "s042".into(),
            register: "lane-3".into(),
            lane: Some("3".into()),
            currency: "EUR".into(),
            format: RegisterFormat::Jsonl,
            max_frame: 1024,
            clock: system(),
            ingest: crate::engine::channel().0,
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
