//! The core's ingest stage: turns what sources deliver into durable outbox entries.
//!
//! Sources hand over [`Ingest`] items on one bounded channel and wait for the reply before they
//! acknowledge anything to a register. The engine takes whatever is queued (up to
//! [`MAX_BATCH`]), writes it all in one log transaction committed durably (group commit), and
//! only then replies.
//!
//! Invariants:
//! - No reply says "ok" before the record is durable in the log (see [`crate::store`]).
//! - The rest of a loyalty transaction's durable step is done by the [`CommitHook`]s the agent
//!   registered (profile KPIs, then offer attribution): the engine names neither. Their share
//!   is journaled in the same commit and applied idempotently; what a power cut left owed is
//!   finished by [`Engine::recover`] before the sources start.
//! - An id already in the outbox is acknowledged again but not stored or counted twice.
//! - On shutdown the engine stops taking new items, finishes what is queued, and replies to
//!   every item it took; sources tell their registers `err` for anything refused.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::deadletter::DeadLetters;
use crate::events::{self, EventKind};
use crate::model::ingest::{
    Accepted, CommitHook, Committed, Ingest, IngestError, NewEvent, StepOutput, reply_all,
};
use crate::model::transaction::Transaction;
use crate::occasions;
use crate::store::{Commit, LogWrite, Store, StoreError};
use crate::supervisor::Component;
use crate::uplink::outbox::{AppendOutcome, Outbox};

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

/// The ingest stage.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    outbox: Arc<Outbox>,
    deadletters: Arc<DeadLetters>,
    store_id: String,
    /// The durable step's other work (profile KPIs, offer attribution), in the order it runs.
    hooks: Vec<Arc<dyn CommitHook>>,
    /// Free space kept on the store's filesystem; see [`Engine::with_reserve`].
    min_free_bytes: u64,
}

impl Engine {
    pub fn new(
        store: Store,
        outbox: Arc<Outbox>,
        deadletters: Arc<DeadLetters>,
        store_id: String,
    ) -> Self {
        Self {
            store,
            outbox,
            deadletters,
            store_id,
            hooks: Vec::new(),
            min_free_bytes: 0,
        }
    }

    /// Registers work that joins the durable step of every group with loyalty transactions
    /// (see [`CommitHook`]). Hooks run in the order they were registered.
    pub fn with_hook(mut self, hook: Arc<dyn CommitHook>) -> Self {
        self.hooks.push(hook);
        self
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

    /// The durable step of a group commit: dead letters, outbox entries, the hooks' share of
    /// the loyalty transactions (journaled) and the events it yields, in one log transaction
    /// committed durably. Nothing is acknowledged before this returns; what the hooks want
    /// done after it comes back to run once it is durable.
    fn write_batch(
        &self,
        batch: &[Ingest],
    ) -> Result<(Vec<AppendOutcome>, StepOutput), StoreError> {
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
                Ingest::Event { event } | Ingest::Once { event, .. } => {
                    events.push(event.as_ref().clone())
                }
                // Taken out by `commit_answering_probes`: every item here has an event, so
                // outcomes line up with the batch.
                Ingest::Probe { .. } => unreachable!("probes never reach commit"),
            }
        }
        self.store.write(Commit::Durable, |w| {
            self.deadletters.record_in(w, &letters)?;
            let outcomes = self.append_once(w, batch, &events)?;
            // Duplicates go to the cache too: a register resends what it was never told `ok`
            // about, and the cache's share of the first copy may be what a crash lost (a
            // store migrated from before the journal). The ledger's own check keeps an update
            // from counting twice.
            let mut loyal: Vec<Committed<'_>> = Vec::new();
            for ((item, outcome), event) in batch.iter().zip(&outcomes).zip(&events) {
                if let (
                    Ingest::Transaction { tx, .. },
                    AppendOutcome::Stored | AppendOutcome::Duplicate,
                ) = (item, outcome)
                    && tx.loyalty_id.is_some()
                {
                    w.journal(&journal_record(event))?;
                    loyal.push(Committed {
                        tx: tx.as_ref(),
                        new: matches!(outcome, AppendOutcome::Stored),
                    });
                }
            }
            let step = self.run_hooks(w, &loyal)?;
            Ok((outcomes, step))
        })
    }

    /// Appends the batch's events, except those of an occasion already remembered (or
    /// remembered earlier in this batch), which are [`AppendOutcome::Duplicate`]; remembers
    /// the occasions of the ones stored, in the same transaction.
    fn append_once<'h>(
        &'h self,
        w: &mut LogWrite<'_, 'h>,
        batch: &[Ingest],
        events: &[NewEvent],
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        if !batch.iter().any(|i| matches!(i, Ingest::Once { .. })) {
            return self.outbox.append_in(w, events);
        }
        let mut fresh = Vec::with_capacity(events.len());
        let mut keep = Vec::with_capacity(events.len());
        let mut this_batch = std::collections::HashSet::new();
        for (item, event) in batch.iter().zip(events) {
            let new = match item {
                Ingest::Once {
                    occasion, token, ..
                } => !occasions::is_claimed_in(w, occasion, *token)? && this_batch.insert(occasion),
                _ => true,
            };
            keep.push(new);
            if new {
                fresh.push(event.clone());
            }
        }
        let mut stored = self.outbox.append_in(w, &fresh)?.into_iter();
        let mut outcomes = Vec::with_capacity(events.len());
        for (item, new) in batch.iter().zip(keep) {
            let outcome = if new {
                stored.next().expect("one outcome per fresh event")
            } else {
                AppendOutcome::Duplicate
            };
            if let (
                Ingest::Once {
                    occasion,
                    token,
                    at,
                    ..
                },
                AppendOutcome::Stored,
            ) = (item, outcome)
            {
                occasions::claim_in(w, occasion, *token, *at)?;
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// The hooks' share of loyalty transactions, inside the log transaction `w`: the events
    /// they yield join it. Idempotent as the hooks are, so that the journal can replay it.
    fn run_hooks<'h>(
        &'h self,
        w: &mut LogWrite<'_, 'h>,
        group: &[Committed<'_>],
    ) -> Result<StepOutput, StoreError> {
        let mut step = StepOutput::default();
        if group.is_empty() {
            return Ok(step);
        }
        for hook in &self.hooks {
            hook.committed(group, &mut step)?;
        }
        if !step.events.is_empty() {
            self.outbox.append_in(w, &step.events)?;
            step.events.clear();
        }
        Ok(step)
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
            let group: Vec<Committed<'_>> =
                txs.iter().map(|tx| Committed { tx, new: false }).collect();
            // What the hooks would do after a live commit is not done again: it was done, or
            // its moment (a prompt at the till) has passed.
            engine
                .store
                .write(Commit::Durable, |w| engine.run_hooks(w, &group))
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
        let (outcomes, step) = match written {
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
        for after in step.after {
            after();
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
                Ingest::Event { event } | Ingest::Once { event, .. } => {
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
