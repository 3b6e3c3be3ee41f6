//! The core's ingest stage: turns what sources deliver into durable outbox entries.
//!
//! Sources hand over [`Ingest`] items on one bounded channel and wait for the reply before they
//! acknowledge anything to a register. The engine takes whatever is queued (up to
//! [`MAX_BATCH`]), writes it all, flushes the store once (group commit), and only then replies.
//!
//! Invariants:
//! - No reply says "ok" before the record is on disk.
//! - An id already in the outbox is acknowledged again but not stored or counted twice.
//! - On shutdown the engine stops taking new items, finishes what is queued, and replies to
//!   every item it took; sources tell their registers `err` for anything refused.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::deadletter::{DeadLetter, DeadLetters};
use crate::events::{self, EventKind};
use crate::offers::ledger::OfferLedger;
use crate::offers::live::Completed;
use crate::pos::transaction::Transaction;
use crate::profiles::ProfileStore;
use crate::store::{Store, StoreError};
use crate::supervisor::Component;
use crate::uplink::outbox::{AppendOutcome, NewEvent, Outbox};

/// Most items written under one flush.
pub const MAX_BATCH: usize = 1024;

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

    async fn send(&self, item: Ingest) {
        if let Err(mpsc::error::SendError(item)) = self.tx.send(item).await {
            reply_all(item, Err(IngestError::ShuttingDown));
        }
    }
}

fn reply_all(item: Ingest, reply: IngestReply) {
    match item {
        Ingest::Transaction { reply: r, .. } => {
            let _ = r.send(reply);
        }
        Ingest::DeadLetter { reply: Some(r), .. } => {
            let _ = r.send(reply);
        }
        Ingest::DeadLetter { reply: None, .. } | Ingest::Event { .. } => {}
    }
}

/// Creates the ingest channel.
pub fn channel() -> (IngestHandle, mpsc::Receiver<Ingest>) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    (IngestHandle { tx }, rx)
}

/// The ingest stage.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    outbox: Arc<Outbox>,
    deadletters: Arc<DeadLetters>,
    profiles: ProfileStore,
    store_id: String,
    /// Attribution of loyalty transactions to the offers before them.
    offers: Option<OfferLedger>,
    /// Completed loyalty transactions for the `transaction_completed` trigger.
    completed: Option<mpsc::Sender<Completed>>,
}

impl Engine {
    pub fn new(
        store: Store,
        outbox: Arc<Outbox>,
        deadletters: Arc<DeadLetters>,
        profiles: ProfileStore,
        store_id: String,
    ) -> Self {
        Self {
            store,
            outbox,
            deadletters,
            profiles,
            store_id,
            offers: None,
            completed: None,
        }
    }

    /// Attributes loyalty transactions to earlier offers (redemptions go into the same
    /// durable step as the transaction) and tells the offers service of each one.
    pub fn with_offers(mut self, ledger: OfferLedger, completed: mpsc::Sender<Completed>) -> Self {
        self.offers = Some(ledger);
        self.completed = Some(completed);
        self
    }

    /// Runs until cancelled, then drains what is queued. Storage failures are answered per item
    /// and reported; they do not end the loop, because the next batch may well succeed.
    pub async fn run(
        &self,
        rx: &mut mpsc::Receiver<Ingest>,
        component: &Component,
        token: &CancellationToken,
    ) -> Result<(), StoreError> {
        component.running(Some("accepting".to_string()));
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return Ok(());
                    }
                    self.commit(std::mem::take(&mut batch), component).await;
                }
                _ = token.cancelled() => break,
            }
        }
        rx.close();
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.commit(std::mem::take(&mut batch), component).await;
        }
        Ok(())
    }

    /// Writes one batch, flushes once, then replies to every item.
    async fn commit(&self, batch: Vec<Ingest>, component: &Component) {
        let mut events = Vec::with_capacity(batch.len());
        let mut letters = Vec::new();
        for item in &batch {
            match item {
                Ingest::Transaction { tx, .. } => events.push(NewEvent {
                    kind: EventKind::Transaction,
                    id: tx.id.clone(),
                    payload: events::encode(
                        EventKind::Transaction,
                        &tx.id,
                        &self.store_id,
                        tx.ended_at,
                        tx.as_ref(),
                    ),
                }),
                Ingest::DeadLetter { letter, .. } => {
                    events.push(NewEvent {
                        kind: EventKind::DeadLetter,
                        id: letter.id.clone(),
                        payload: events::encode(
                            EventKind::DeadLetter,
                            &letter.id,
                            &self.store_id,
                            letter.received_at,
                            letter.as_ref(),
                        ),
                    });
                    letters.push(letter.as_ref().clone());
                }
                Ingest::Event { event } => events.push(event.as_ref().clone()),
            }
        }

        let written = self
            .deadletters
            .record(&letters)
            .and_then(|()| self.outbox.append(&events));
        // A loyalty transaction stored for the first time updates its customer's KPIs and is
        // attributed to earlier offers before the flush, so all of it is durable in the same
        // step; a duplicate changes nothing.
        let mut completed = Vec::new();
        let written = written.and_then(|outcomes| {
            let mut redemptions = Vec::new();
            for (item, outcome) in batch.iter().zip(&outcomes) {
                if let (Ingest::Transaction { tx, .. }, AppendOutcome::Stored) = (item, outcome)
                    && let Some(card) = tx.loyalty_id.as_deref()
                {
                    self.profiles.record_transaction(tx)?;
                    if let Some(ledger) = &self.offers
                        && crate::profiles::Profile::valid_id(card)
                    {
                        let customer = self.profiles.resolve_card(card)?;
                        for r in ledger.attribute(&customer, &self.store_id, tx)? {
                            let id = r.event_id();
                            redemptions.push(NewEvent {
                                kind: EventKind::Redemption,
                                payload: events::encode(
                                    EventKind::Redemption,
                                    &id,
                                    &self.store_id,
                                    r.transaction_at,
                                    &r,
                                ),
                                id,
                            });
                            let group = match r.group {
                                crate::offers::ledger::Group::Exposed => "exposed",
                                crate::offers::ledger::Group::Control => "control",
                            };
                            metrics::counter!("storelink_redemptions_total", "campaign" => r.campaign.clone(), "group" => group).increment(1);
                        }
                        completed.push(Completed {
                            customer_id: customer,
                            lane: tx.lane.clone(),
                            at: tx.ended_at,
                        });
                    }
                }
            }
            if !redemptions.is_empty() {
                self.outbox.append(&redemptions)?;
            }
            Ok(outcomes)
        });
        let outcomes = match written {
            Ok(outcomes) => match self.store.flush().await {
                Ok(()) => Ok(outcomes),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, items = batch.len(), "could not make a batch durable; refusing it");
                component.degraded(format!("storage: {e}"));
                for item in batch {
                    reply_all(item, Err(IngestError::Storage(e.to_string())));
                }
                return;
            }
        };
        if component.state() != Some(crate::supervisor::ComponentState::Running) {
            component.running(Some("accepting".to_string()));
        }
        self.outbox.notify();
        if let Some(tx) = &self.completed {
            for done in completed {
                if tx.try_send(done).is_err() {
                    metrics::counter!("storelink_offer_triggers_dropped_total", "source" => "transactions").increment(1);
                }
            }
        }

        // Counted per register once per batch: a label lookup per transaction is measurable.
        let mut counts: Vec<(String, u64, u64)> = Vec::new();
        for (item, outcome) in batch.into_iter().zip(outcomes) {
            match item {
                Ingest::Transaction { tx, reply } => {
                    let (stored, duplicate) = match outcome {
                        AppendOutcome::Stored => (1, 0),
                        AppendOutcome::Duplicate => (0, 1),
                        AppendOutcome::Refused => (0, 0),
                    };
                    match counts.iter_mut().find(|(r, ..)| *r == tx.register) {
                        Some(c) => {
                            c.1 += stored;
                            c.2 += duplicate;
                        }
                        None => counts.push((tx.register.clone(), stored, duplicate)),
                    }
                    let result = match outcome {
                        AppendOutcome::Stored | AppendOutcome::Duplicate => Ok(Accepted {
                            id: tx.id,
                            duplicate: outcome == AppendOutcome::Duplicate,
                        }),
                        AppendOutcome::Refused => Err(IngestError::OutboxFull),
                    };
                    let _ = reply.send(result);
                }
                Ingest::Event { event } => {
                    if outcome == AppendOutcome::Refused {
                        tracing::debug!(kind = event.kind.name(), "outbox full; event not kept");
                    }
                }
                Ingest::DeadLetter { letter, reply } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(Accepted {
                            id: letter.id,
                            duplicate: false,
                        }));
                    }
                }
            }
        }
        for (register, stored, duplicate) in counts {
            if stored > 0 {
                metrics::counter!("storelink_transactions_total", "register" => register.clone())
                    .increment(stored);
            }
            if duplicate > 0 {
                metrics::counter!("storelink_transactions_duplicate_total", "register" => register)
                    .increment(duplicate);
            }
        }
    }
}
