//! The core's ingest stage: turns what sources deliver into durable outbox entries.
//!
//! Sources hand over [`Ingest`] items on one bounded channel and wait for the reply before they
//! acknowledge anything to a register. The engine takes whatever is queued (up to
//! [`MAX_BATCH`]), writes it all in one log transaction committed durably (group commit), and
//! only then replies.
//!
//! Invariants:
//! - No reply says "ok" before the record is durable in the log (see [`crate::store`]).
//! - The profile cache's share of a loyalty transaction (KPIs, offer attribution) is journaled
//!   in the same commit and applied idempotently; what a power cut left owed is finished by
//!   [`Engine::recover`] before the sources start.
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
use crate::store::{Commit, LogWrite, Store, StoreError};
use crate::supervisor::Component;
use crate::uplink::outbox::{AppendOutcome, NewEvent, Outbox};

/// Most items written under one flush.
pub const MAX_BATCH: usize = 1024;

/// Journal record tag: a loyalty transaction whose cache share (KPIs, attribution) is owed,
/// followed by its CloudEvent (already encoded for the outbox, so nothing is serialised twice).
const JOURNAL_TRANSACTION: u8 = b'T';

fn journal_record(event: &NewEvent) -> Vec<u8> {
    let mut record = Vec::with_capacity(1 + event.payload.len());
    record.push(JOURNAL_TRANSACTION);
    record.extend_from_slice(&event.payload);
    record
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
    /// Answered once every item queued before it is committed: proof the core loop is alive,
    /// for the systemd watchdog.
    Probe { reply: oneshot::Sender<()> },
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

fn reply_all(item: Ingest, reply: IngestReply) {
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
        Ingest::DeadLetter { reply: None, .. } | Ingest::Event { .. } => {}
    }
}

/// Takes the probes out of a batch: they write nothing and are answered after it.
fn take_probes(batch: &mut Vec<Ingest>) -> Vec<oneshot::Sender<()>> {
    let mut probes = Vec::new();
    batch.retain_mut(|item| {
        if let Ingest::Probe { reply } = item {
            let (dummy, _) = oneshot::channel();
            probes.push(std::mem::replace(reply, dummy));
            false
        } else {
            true
        }
    });
    probes
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
    /// Free space kept on the store's filesystem; see [`Engine::with_reserve`].
    min_free_bytes: u64,
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
            min_free_bytes: 0,
        }
    }

    /// Refuses batches while the store's filesystem has less than `min_free_bytes` free.
    /// The database must never meet a full disk mid-write: sled keeps the first I/O error and
    /// fails everything after it until reopened, so refusing early, with the reason, is what
    /// keeps the agent answering and lets it resume by itself once space is back.
    pub fn with_reserve(mut self, min_free_bytes: u64) -> Self {
        self.min_free_bytes = min_free_bytes;
        self
    }

    /// Why the next batch must be refused for lack of space, if it must.
    fn short_of_space(&self) -> Option<String> {
        if self.min_free_bytes == 0 {
            return None;
        }
        match self.store.free_bytes() {
            Ok(free) if free < self.min_free_bytes => Some(format!(
                "disk nearly full: {:.1} MiB free at {}, {:.1} MiB kept in reserve; free some space (or move storage.path); data is taken again by itself once there is room",
                free as f64 / 1048576.0,
                self.store.path().display(),
                self.min_free_bytes as f64 / 1048576.0
            )),
            Ok(_) => None,
            // Not knowing is no reason to refuse; the write itself will tell.
            Err(_) => None,
        }
    }

    /// Attributes loyalty transactions to earlier offers (redemptions go into the same
    /// durable step as the transaction) and tells the offers service of each one.
    pub fn with_offers(mut self, ledger: OfferLedger, completed: mpsc::Sender<Completed>) -> Self {
        self.offers = Some(ledger);
        self.completed = Some(completed);
        self
    }

    /// The durable step of a group commit: dead letters, outbox entries, the cache's share
    /// (KPIs and offer attribution, journaled), and the redemptions it yields, in one log
    /// transaction committed durably. Nothing is acknowledged before this returns.
    fn write_batch(
        &self,
        batch: &[Ingest],
    ) -> Result<(Vec<AppendOutcome>, Vec<Completed>), StoreError> {
        let mut events = Vec::with_capacity(batch.len());
        let mut letters = Vec::new();
        for item in batch {
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
                // Taken out by `commit_answering_probes`: every item here has an event, so
                // outcomes line up with the batch.
                Ingest::Probe { .. } => unreachable!("probes never reach commit"),
            }
        }
        self.store.write(Commit::Durable, |w| {
            self.deadletters.record_in(w, &letters)?;
            let outcomes = self.outbox.append_in(w, &events)?;
            // Duplicates go to the cache too: a register resends what it was never told `ok`
            // about, and the cache's share of the first copy may be what a crash lost (a
            // store migrated from before the journal). The ledger's own check keeps an update
            // from counting twice.
            let mut loyal: Vec<(&Transaction, bool)> = Vec::new();
            for ((item, outcome), event) in batch.iter().zip(&outcomes).zip(&events) {
                if let (
                    Ingest::Transaction { tx, .. },
                    AppendOutcome::Stored | AppendOutcome::Duplicate,
                ) = (item, outcome)
                    && tx.loyalty_id.is_some()
                {
                    w.journal(&journal_record(event))?;
                    loyal.push((tx.as_ref(), matches!(outcome, AppendOutcome::Stored)));
                }
            }
            let completed = self.apply_to_cache(w, &loyal)?;
            Ok((outcomes, completed))
        })
    }

    /// The cache's share of loyalty transactions: KPI updates (one sled batch for the group)
    /// and offer attribution, whose redemptions join the log transaction `w`. Idempotent, so
    /// that the journal can replay it. Returns the completions of the transactions marked new.
    fn apply_to_cache<'h>(
        &'h self,
        w: &mut LogWrite<'_, 'h>,
        loyal: &[(&Transaction, bool)],
    ) -> Result<Vec<Completed>, StoreError> {
        // One sled batch for the whole group: a batch per transaction costs two log writes.
        self.profiles
            .record_transactions(loyal.iter().map(|(tx, _)| *tx))?;
        let mut redemptions = Vec::new();
        let mut completed = Vec::new();
        for (tx, new) in loyal {
            let Some(card) = tx.loyalty_id.as_deref() else {
                continue;
            };
            if !crate::profiles::Profile::valid_id(card) {
                continue;
            }
            let customer = self.profiles.resolve_card(card)?;
            if let Some(ledger) = &self.offers {
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
                    if *new {
                        let group = match r.group {
                            crate::offers::ledger::Group::Exposed => "exposed",
                            crate::offers::ledger::Group::Control => "control",
                        };
                        metrics::counter!("storelink_redemptions_total", "campaign" => r.campaign.clone(), "group" => group).increment(1);
                    }
                }
            }
            if *new && self.offers.is_some() {
                completed.push(Completed {
                    customer_id: customer,
                    lane: tx.lane.clone(),
                    at: tx.ended_at,
                });
            }
        }
        if !redemptions.is_empty() {
            self.outbox.append_in(w, &redemptions)?;
        }
        Ok(completed)
    }

    /// Finishes what the cache journal still holds (a power cut came before the cache was on
    /// disk), then checkpoints. Run once at start, before any source is started.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let pending = self.store.journal()?;
        if pending.is_empty() {
            return Ok(0);
        }
        let txs: Vec<Transaction> = pending
            .iter()
            .filter_map(|(_, record)| match record.split_first() {
                Some((&JOURNAL_TRANSACTION, event)) => events::decode_data(event),
                _ => None,
            })
            .collect();
        let engine = self.clone();
        let replayed = tokio::task::spawn_blocking(move || {
            let loyal: Vec<(&Transaction, bool)> = txs.iter().map(|tx| (tx, false)).collect();
            engine
                .store
                .write(Commit::Durable, |w| engine.apply_to_cache(w, &loyal))
                .map(|_| txs.len())
        })
        .await
        .map_err(|e| StoreError::Engine {
            path: self.store.path().to_path_buf(),
            detail: format!("journal replay failed: {e}"),
        })??;
        self.store.checkpoint().await?;
        tracing::info!(
            transactions = replayed,
            "finished the profile cache's share of transactions a power cut interrupted"
        );
        Ok(replayed)
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
                    self.commit_answering_probes(&mut batch, component).await;
                }
                _ = token.cancelled() => break,
            }
        }
        rx.close();
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.commit_answering_probes(&mut batch, component).await;
        }
        Ok(())
    }

    async fn commit_answering_probes(&self, batch: &mut Vec<Ingest>, component: &Component) {
        let probes = take_probes(batch);
        if !batch.is_empty() {
            self.commit(std::mem::take(batch), component).await;
        }
        for probe in probes {
            let _ = probe.send(());
        }
    }

    /// Writes one batch in one durable log commit, then replies to every item.
    async fn commit(&self, batch: Vec<Ingest>, component: &Component) {
        if let Some(why) = self.short_of_space() {
            if component.state() == Some(crate::supervisor::ComponentState::Running) {
                tracing::error!(reason = %why, "refusing new data: the storage filesystem is nearly full");
            }
            metrics::counter!("storelink_ingest_refused_total", "reason" => "disk_full")
                .increment(batch.len() as u64);
            component.degraded(format!("storage: {why}"));
            for item in batch {
                reply_all(item, Err(IngestError::Storage(why.clone())));
            }
            return;
        }
        // The commit waits on an fsync: off the async threads, so sources keep reading.
        let engine = self.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let written = engine.write_batch(&batch);
            (batch, written)
        })
        .await;
        let (batch, written) = match joined {
            Ok(done) => done,
            Err(e) => {
                // The batch went with the task; its sources see their reply channels close and
                // tell their registers `err`.
                tracing::error!(error = %e, "the storage task failed; the batch was not stored");
                component.degraded(format!("storage: the storage task failed: {e}"));
                return;
            }
        };
        let (outcomes, completed) = match written {
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
                Ingest::Probe { reply } => {
                    let _ = reply.send(());
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
