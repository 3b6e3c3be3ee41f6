//! The ingest seam: what sources, the core's producers and the engine pass each other.
//!
//! Sources hold an [`IngestHandle`] and wait on its replies before they acknowledge anything;
//! the engine holds the receiving end. [`CommitHook`]s are how work that belongs to the
//! durable step (profile KPIs, offer attribution) joins it without the engine naming it.
//!
//! Invariants:
//! - The channel is bounded ([`CHANNEL_CAPACITY`]): a full core is backpressure on the
//!   sources, never an unbounded queue.
//! - Every item taken is answered, with the outcome or [`IngestError::ShuttingDown`].

use tokio::sync::{mpsc, oneshot};

use crate::deadletter::DeadLetter;
use crate::events::EventKind;
use crate::model::transaction::Transaction;
use crate::occasions::OccasionKey;
use crate::store::StoreError;

/// An event on its way into the outbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventKind,
    pub id: String,
    /// The serialised CloudEvent, exactly as central will receive it.
    pub payload: Vec<u8>,
}

/// Capacity of the ingest channel: sources wait (backpressure) when it is full.
pub const CHANNEL_CAPACITY: usize = 4096;

/// What sources hand to the core.
#[derive(Debug)]
pub enum Ingest {
    Transaction {
        tx: Box<Transaction>,
        reply: oneshot::Sender<IngestReply>,
    },
    DeadLetter {
        letter: Box<DeadLetter>,
        reply: Option<oneshot::Sender<IngestReply>>,
    },
    /// An event the core produced (presence, offers, prompts), already encoded. Nothing waits
    /// on it: a refusal under a full outbox is the drop policy at work and is counted there.
    Event { event: Box<NewEvent> },
    /// A core event that may be sent once per occasion (a `storelink.trigger.v1`): stored,
    /// with its occasion remembered in the same transaction, only if the occasion is not
    /// remembered yet (see [`crate::occasions`]). Nothing waits on it.
    Once {
        event: Box<NewEvent>,
        occasion: OccasionKey,
        /// What makes it new again: the snapshot's digest; 0 for a trigger.
        token: u64,
        at: jiff::Timestamp,
    },
    /// Answered once every item queued before it is committed: proof the core loop is alive,
    /// for the systemd watchdog.
    Probe { reply: oneshot::Sender<()> },
}

impl Ingest {
    fn once(event: NewEvent, occasion: OccasionKey, token: u64, at: jiff::Timestamp) -> Ingest {
        Ingest::Once {
            event: Box::new(event),
            occasion,
            token,
            at,
        }
    }
}

/// A durable acceptance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    /// The id was already held; nothing new was stored.
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("outbox full: only transactions remain and the cap is reached")]
    OutboxFull,
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("agent is shutting down")]
    ShuttingDown,
}

pub type IngestReply = Result<Accepted, IngestError>;

/// The sending side, cloned into every source.
#[derive(Debug, Clone)]
pub struct IngestHandle {
    tx: mpsc::Sender<Ingest>,
}

impl IngestHandle {
    /// Queues a transaction; the receiver resolves once it is durable (or refused).
    pub async fn transaction(&self, tx: Transaction) -> oneshot::Receiver<IngestReply> {
        let (reply, rx) = oneshot::channel();
        let item = Ingest::Transaction {
            tx: Box::new(tx),
            reply,
        };
        self.send(item).await;
        rx
    }

    /// Queues a dead letter; the receiver resolves once it is durable.
    pub async fn dead_letter(&self, letter: DeadLetter) -> oneshot::Receiver<IngestReply> {
        let (reply, rx) = oneshot::channel();
        let item = Ingest::DeadLetter {
            letter: Box::new(letter),
            reply: Some(reply),
        };
        self.send(item).await;
        rx
    }

    /// Queues a core event for the outbox. Waits only for room in the channel, which is the
    /// backpressure a producer should feel.
    pub async fn event(&self, event: NewEvent) -> Result<(), IngestError> {
        self.tx
            .send(Ingest::Event {
                event: Box::new(event),
            })
            .await
            .map_err(|_| IngestError::ShuttingDown)
    }

    /// Queues a core event that is sent once per occasion; waits only for room in the channel.
    pub async fn once(
        &self,
        event: NewEvent,
        occasion: OccasionKey,
        token: u64,
        at: jiff::Timestamp,
    ) -> Result<(), IngestError> {
        self.tx
            .send(Ingest::once(event, occasion, token, at))
            .await
            .map_err(|_| IngestError::ShuttingDown)
    }

    /// The same, from a blocking thread (the daily trigger run): waits for room in the
    /// channel, so a run over many customers is paced by the engine and never outruns it.
    pub fn once_blocking(
        &self,
        event: NewEvent,
        occasion: OccasionKey,
        token: u64,
        at: jiff::Timestamp,
    ) -> Result<(), IngestError> {
        self.tx
            .blocking_send(Ingest::once(event, occasion, token, at))
            .map_err(|_| IngestError::ShuttingDown)
    }

    /// Items waiting in the channel now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues a core event from a blocking thread.
    pub fn event_blocking(&self, event: NewEvent) -> Result<(), IngestError> {
        self.tx
            .blocking_send(Ingest::Event {
                event: Box::new(event),
            })
            .map_err(|_| IngestError::ShuttingDown)
    }

    /// Resolves when the core loop has worked through everything queued before it.
    pub async fn probe(&self) -> Result<(), IngestError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Ingest::Probe { reply })
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        rx.await.map_err(|_| IngestError::ShuttingDown)
    }

    async fn send(&self, item: Ingest) {
        if let Err(mpsc::error::SendError(item)) = self.tx.send(item).await {
            reply_all(item, Err(IngestError::ShuttingDown));
        }
    }
}

/// Answers whatever waits on `item`.
pub fn reply_all(item: Ingest, reply: IngestReply) {
    match item {
        Ingest::Transaction { reply: r, .. } => {
            let _ = r.send(reply);
        }
        Ingest::DeadLetter { reply: Some(r), .. } => {
            let _ = r.send(reply);
        }
        Ingest::Probe { reply } => {
            let _ = reply.send(());
        }
        Ingest::DeadLetter { reply: None, .. } | Ingest::Event { .. } | Ingest::Once { .. } => {}
    }
}

/// Creates the ingest channel.
pub fn channel() -> (IngestHandle, mpsc::Receiver<Ingest>) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    (IngestHandle { tx }, rx)
}

/// One loyalty transaction of a durable step, as the commit hooks see it.
#[derive(Debug, Clone, Copy)]
pub struct Committed<'a> {
    pub tx: &'a Transaction,
    /// Stored for the first time: not a register's resend, not a replay after a power cut.
    pub new: bool,
}

/// What a hook adds to a durable step.
#[derive(Default)]
pub struct StepOutput {
    /// Events that join the same log transaction as the transactions themselves.
    pub events: Vec<NewEvent>,
    /// Run once the step is durable, in order; never on a replay.
    pub after: Vec<Box<dyn FnOnce() + Send>>,
}

/// Work that belongs to the durable step of a group commit: registered with the engine, which
/// calls every hook, in the order they were registered, for the loyalty transactions of each
/// group, and again for what the journal still holds after a power cut.
///
/// A hook must be idempotent (a replay or a resend calls it again for the same transaction),
/// and must not fail for one bad transaction: an error refuses the whole group.
pub trait CommitHook: Send + Sync {
    fn committed(&self, group: &[Committed<'_>], out: &mut StepOutput) -> Result<(), StoreError>;
}
