//! The outbox: every event bound for central, held durably until central acknowledges it.
//!
//! Layout, in the log (see [`crate::store`]):
//! - table `outbox`: `0x00 ‖ stream ‖ seq (u64 BE)` → entry (header ‖ CloudEvent bytes). Key
//!   order is send order: streams by priority, then oldest first within a stream.
//! - table `seen`: `0x02 ‖ event id` → first-seen time (i64 BE), followed by the entry key it
//!   was stored under (none when it was dropped on arrival); and `0x03 ‖ time ‖ event id` for
//!   expiry. The event is held while that entry exists: an acknowledgement removes the entry
//!   alone, one write, and the seen record keeps pointing at a key that is gone. Every id the outbox ever
//!   accepted is kept after delivery for [`Limits::seen_retention`] (at most
//!   [`Limits::max_seen`] ids); an id still held never expires. This is what makes counting
//!   exactly-once at the edge: a transaction a register sends again, even after it reached
//!   central and even after a restart, is recognised and not stored, counted or forwarded
//!   twice. It is written in the same transaction as the entry, because a "seen" mark that
//!   survived a crash without its entry would make the register's resend look like a duplicate
//!   and lose it.
//!
//! Invariants:
//! - An entry leaves only by [`Outbox::ack`] (central acknowledged it), the drop policy, or its
//!   stream's TTL.
//! - Ids are unique: appending an id that is held, or was seen within the retention period, is a
//!   no-op that reports [`AppendOutcome::Duplicate`].
//! - The outbox holds at most `max_bytes`. When full, droppable streams (status, presence,
//!   offers and prompts, dead-letters) lose their oldest entries first, lowest priority first,
//!   and only to make room for an event of equal or higher priority. Transactions and
//!   redemptions are never dropped: when only they remain, new ones are refused, so the register
//!   is told `err` instead of being acknowledged. Every drop is counted and logged.
//! - Appending is durable only with the transaction it is part of: [`Outbox::append_in`] joins
//!   the caller's (the engine commits its group durably); [`Outbox::append`] commits lazily and
//!   the caller flushes the store before acknowledging anything.
//! - In-memory counts and claims change only in commit hooks, so they always describe what is
//!   committed. A sender claims (under the claims lock, from a snapshot taken under it) only
//!   entries no one holds; an acknowledged entry's claim goes only after its removal is
//!   committed, so no snapshot can show it unclaimed.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use jiff::Timestamp;
use tokio::sync::Notify;

use crate::clock::SharedClock;
use crate::events::EventKind;
/// What the outbox takes; the type lives in the seams because every producer builds one.
pub use crate::model::ingest::NewEvent;
use crate::store::{Commit, LogTable, LogTableMut, LogView, LogWrite, Store, StoreError};

const ENTRY_PREFIX: u8 = 0x00;
const SEEN_PREFIX: u8 = 0x02;
const SEEN_BY_TIME_PREFIX: u8 = 0x03;
const FORMAT_V1: u8 = 1;
/// The next entry sequence number, in the log's meta table.
const NEXT_SEQ_KEY: &[u8] = b"outbox.next_seq";
const HEADER_LEN: usize = 1 + 1 + 1 + 8 + 2;
/// Bytes an entry costs beyond its id and payload: keys, header, the log's record frame, the
/// entry key in its seen record.
const OVERHEAD: u64 = 10 + HEADER_LEN as u64 + 25 + 10;

/// Outbox streams, in priority order (lower sends first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Stream {
    Transaction = 0,
    Redemption = 1,
    DeadLetter = 2,
    /// Offer decisions, cashier prompts and customer signals (snapshots, triggers,
    /// follow-ups).
    Offer = 3,
    Presence = 4,
    Status = 5,
}

const STREAM_COUNT: usize = 6;

impl Stream {
    pub const ALL: [Stream; STREAM_COUNT] = [
        Stream::Transaction,
        Stream::Redemption,
        Stream::DeadLetter,
        Stream::Offer,
        Stream::Presence,
        Stream::Status,
    ];

    pub fn of(kind: EventKind) -> Stream {
        match kind {
            EventKind::Transaction => Stream::Transaction,
            // An erasure acknowledgement is a compliance record: never dropped, sent early.
            EventKind::Redemption | EventKind::Erasure => Stream::Redemption,
            EventKind::DeadLetter => Stream::DeadLetter,
            // Marketing: offers, prompts and the customer signals for central's email tool.
            EventKind::Offer
            | EventKind::Prompt
            | EventKind::Customer
            | EventKind::Trigger
            | EventKind::FollowUps => Stream::Offer,
            EventKind::Presence => Stream::Presence,
            EventKind::Status => Stream::Status,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stream::Transaction => "transaction",
            Stream::Redemption => "redemption",
            Stream::DeadLetter => "deadletter",
            Stream::Offer => "offer",
            Stream::Presence => "presence",
            Stream::Status => "status",
        }
    }

    /// Whether the drop policy may remove this stream's events when the outbox is full.
    pub fn droppable(self) -> bool {
        !matches!(self, Stream::Transaction | Stream::Redemption)
    }

    fn from_u8(b: u8) -> Option<Stream> {
        Stream::ALL.get(b as usize).copied()
    }

    /// The first and one-past-the-last keys of this stream's entries.
    fn bounds(self) -> ([u8; 2], [u8; 2]) {
        ([ENTRY_PREFIX, self as u8], [ENTRY_PREFIX, self as u8 + 1])
    }
}

/// Key of one outbox entry; orders like the send order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey([u8; 10]);

impl EntryKey {
    fn new(stream: Stream, seq: u64) -> Self {
        let mut k = [0u8; 10];
        k[0] = ENTRY_PREFIX;
        k[1] = stream as u8;
        k[2..].copy_from_slice(&seq.to_be_bytes());
        EntryKey(k)
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        let k: [u8; 10] = b.try_into().ok()?;
        (k[0] == ENTRY_PREFIX && Stream::from_u8(k[1]).is_some()).then_some(EntryKey(k))
    }

    pub fn stream(&self) -> Stream {
        Stream::from_u8(self.0[1]).expect("validated at construction")
    }

    pub fn seq(&self) -> u64 {
        u64::from_be_bytes(self.0[2..].try_into().expect("8 bytes"))
    }
}

/// What an erasure changed in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxErased {
    /// Transactions and redemptions kept without the customer.
    pub redacted: u64,
    /// Events about the customer removed, and dead letters that mentioned them.
    pub dropped: u64,
}

/// What an erasure reaches of what is held for central: the outbox's events and the local dead
/// letters.
pub struct HeldForCentral {
    pub outbox: std::sync::Arc<Outbox>,
    pub deadletters: std::sync::Arc<crate::deadletter::DeadLetters>,
}

impl crate::model::customer::CustomerRecords for HeldForCentral {
    fn erase_customer(&self, ids: &[String]) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let held = self.outbox.erase_customer(ids)?;
        let letters = self.deadletters.erase_mentioning(ids)?;
        Ok(vec![
            ("outbox_redacted", held.redacted),
            ("outbox_dropped", held.dropped),
            ("dead_letters", letters as u64),
        ])
    }
}

/// What happened to one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored,
    /// The id is already in the outbox; nothing was written.
    Duplicate,
    /// The outbox is full of events that may not be dropped for this one.
    Refused,
}

/// An event held in the outbox.
#[derive(Clone)]
pub struct Entry {
    pub key: EntryKey,
    pub kind: EventKind,
    pub id: String,
    pub enqueued_at: Timestamp,
    /// The stored entry; shares one buffer with the other entries of a claim.
    raw: Bytes,
    payload_at: usize,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key)
            .field("kind", &self.kind)
            .field("id", &self.id)
            .finish()
    }
}

/// Parsed header of a stored entry: kind, enqueue time, id, and where the payload starts.
fn parse_entry(raw: &[u8]) -> Option<(EventKind, Timestamp, &str, usize)> {
    if raw.len() < HEADER_LEN || raw[0] != FORMAT_V1 {
        return None;
    }
    let kind = *EventKind::ALL.get(raw[2] as usize)?;
    let micros = i64::from_be_bytes(raw[3..11].try_into().ok()?);
    let id_len = u16::from_be_bytes(raw[11..13].try_into().ok()?) as usize;
    let id_end = HEADER_LEN.checked_add(id_len)?;
    let id = std::str::from_utf8(raw.get(HEADER_LEN..id_end)?).ok()?;
    Some((kind, Timestamp::from_microsecond(micros).ok()?, id, id_end))
}

impl Entry {
    pub fn stream(&self) -> Stream {
        self.key.stream()
    }

    /// The CloudEvent bytes.
    pub fn payload(&self) -> &[u8] {
        &self.raw[self.payload_at..]
    }

    /// The CloudEvent bytes, sharing the claim's buffer (no copy).
    pub fn payload_bytes(&self) -> Bytes {
        self.raw.slice(self.payload_at..)
    }

    fn size(&self) -> u64 {
        self.raw.len() as u64 + self.id.len() as u64 + OVERHEAD
    }

    fn decode(key: EntryKey, raw: Bytes) -> Option<Entry> {
        let (kind, enqueued_at, id, payload_at) = parse_entry(&raw)?;
        let id = id.to_string();
        Some(Entry {
            key,
            kind,
            id,
            enqueued_at,
            raw,
            payload_at,
        })
    }

    /// Decodes a stored entry, copying its bytes into `buf` (one buffer for many entries).
    fn read(key: &[u8], raw: &[u8], buf: &mut BytesMut) -> Option<Entry> {
        let key = EntryKey::from_bytes(key)?;
        parse_entry(raw)?;
        buf.extend_from_slice(raw);
        Entry::decode(key, buf.split().freeze())
    }
}

/// Size an entry costs, from its stored bytes alone.
fn stored_size(raw: &[u8]) -> Option<u64> {
    let (_, _, id, _) = parse_entry(raw)?;
    Some(raw.len() as u64 + id.len() as u64 + OVERHEAD)
}

fn encode_entry(event: &NewEvent, stream: Stream, now: Timestamp) -> Vec<u8> {
    let kind_index = EventKind::ALL
        .iter()
        .position(|k| *k == event.kind)
        .expect("every kind is in ALL") as u8;
    let mut v = Vec::with_capacity(HEADER_LEN + event.id.len() + event.payload.len());
    v.push(FORMAT_V1);
    v.push(stream as u8);
    v.push(kind_index);
    v.extend_from_slice(&now.as_microsecond().to_be_bytes());
    v.extend_from_slice(&(event.id.len() as u16).to_be_bytes());
    v.extend_from_slice(event.id.as_bytes());
    v.extend_from_slice(&event.payload);
    v
}

fn seen_key(id: &str) -> Vec<u8> {
    seen_key_bytes(id.as_bytes())
}

fn seen_key_bytes(id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(SEEN_PREFIX);
    k.extend_from_slice(id);
    k
}

fn seen_by_time_key(at: Timestamp, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + id.len());
    k.push(SEEN_BY_TIME_PREFIX);
    k.extend_from_slice(&at.as_microsecond().to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// A seen record: when the id was first accepted, and its entry while it is held.
fn seen_value(at: Timestamp, held: Option<&EntryKey>) -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(&at.as_microsecond().to_be_bytes());
    if let Some(k) = held {
        v.extend_from_slice(&k.0);
    }
    v
}

/// The entry key a seen record points at; the event is held while that entry exists.
fn held_key(value: &[u8]) -> Option<EntryKey> {
    EntryKey::from_bytes(value.get(8..18)?)
}

/// Splits a `0x03 ‖ time ‖ id` key.
fn parse_seen_by_time(key: &[u8]) -> Option<(Timestamp, &[u8])> {
    let micros = i64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    Some((Timestamp::from_microsecond(micros).ok()?, key.get(9..)?))
}

/// Bounds of the outbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of events held for central.
    pub max_bytes: u64,
    /// How long an accepted id is remembered after delivery.
    pub seen_retention: std::time::Duration,
    /// Most ids remembered; the oldest are forgotten first.
    pub max_seen: u64,
    /// Per stream (indexed by `Stream as usize`), how long an undelivered event is still worth
    /// sending. Never set for streams that may not be dropped.
    pub ttl: [Option<std::time::Duration>; STREAM_COUNT],
}

impl Limits {
    pub fn with_max_bytes(max_bytes: u64) -> Limits {
        Limits {
            max_bytes,
            seen_retention: std::time::Duration::from_secs(35 * 86_400),
            max_seen: 1_000_000,
            ttl: [None; STREAM_COUNT],
        }
    }

    /// Sets a stream's TTL; ignored for streams that are never dropped.
    pub fn with_ttl(mut self, stream: Stream, ttl: Option<std::time::Duration>) -> Limits {
        if stream.droppable() {
            self.ttl[stream as usize] = ttl;
        }
        self
    }
}

/// Which held events a sender takes.
#[derive(Debug, Clone, Copy)]
pub enum Take {
    /// The send order: streams by priority, oldest first.
    Front,
    /// Only events enqueued at or after `since`, by priority, oldest first: live traffic
    /// while a backlog drains.
    Live { since: Timestamp },
}

fn new_event_size(event: &NewEvent) -> u64 {
    (HEADER_LEN + event.id.len() + event.payload.len()) as u64 + event.id.len() as u64 + OVERHEAD
}

/// Depth, size and drops of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamCounts {
    pub depth: u64,
    pub bytes: u64,
    /// Events dropped by the size cap since the agent started.
    pub dropped: u64,
    /// Events removed unsent because they outlived the stream's TTL, since the agent started.
    pub expired: u64,
}

/// A snapshot for status and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxStats {
    pub max_bytes: u64,
    pub total_bytes: u64,
    pub depth: u64,
    pub streams: Vec<StreamStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStats {
    pub stream: &'static str,
    #[serde(flatten)]
    pub counts: StreamCounts,
    /// Age of the oldest entry, in seconds.
    pub oldest_age_s: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    next_seq: u64,
    streams: [StreamCounts; STREAM_COUNT],
    /// Ids remembered in the seen set.
    seen: u64,
}

impl State {
    fn total_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes).sum()
    }
}

/// What senders hold.
#[derive(Default)]
struct Claims {
    /// Entries a sender has taken and not yet acknowledged or released.
    keys: HashSet<EntryKey>,
    /// Every entry before this key is claimed (or gone): a claim from the front starts here
    /// instead of walking the whole in-flight window again. Lowered by releases and by appends
    /// of higher-priority events.
    frontier: Option<EntryKey>,
}

impl Claims {
    fn lower_frontier(&mut self, key: EntryKey) {
        if self.frontier.is_some_and(|f| key < f) {
            self.frontier = Some(key);
        }
    }
}

/// Durable queue of events for central.
pub struct Outbox {
    store: Store,
    clock: SharedClock,
    max_bytes: u64,
    limits: Limits,
    state: Mutex<State>,
    changed: Notify,
    /// Entries a sender has taken; no other sender sees them, so the MQTT and HTTPS paths never
    /// carry the same entry at once.
    claims: Mutex<Claims>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Outbox {
    /// Opens the outbox and counts what it holds from a previous run. Entries that cannot be
    /// read are removed. After a salvage, a held entry without its seen record gets one, and a
    /// second entry of an id already held is removed.
    pub fn open(store: &Store, limits: Limits, clock: SharedClock) -> Result<Outbox, StoreError> {
        let mut state = State {
            next_seq: 1,
            streams: [StreamCounts::default(); STREAM_COUNT],
            seen: 0,
        };
        if let Some(v) = store.view(LogTable::Meta)?.get(NEXT_SEQ_KEY)?
            && let Ok(b) = <[u8; 8]>::try_from(v.bytes())
        {
            state.next_seq = u64::from_be_bytes(b).max(1);
        }
        let seen = store.view(LogTable::Seen)?;
        for item in seen.range(&[SEEN_BY_TIME_PREFIX], Some(&[SEEN_BY_TIME_PREFIX + 1]))? {
            item?;
            state.seen += 1;
        }
        let mut unreadable = Vec::new();
        let mut unindexed: Vec<(EntryKey, String, Timestamp)> = Vec::new();
        {
            let entries = store.view(LogTable::Outbox)?;
            let mut held: HashSet<String> = HashSet::new();
            for item in entries.iter()? {
                let item = item?;
                let parsed = EntryKey::from_bytes(item.key())
                    .and_then(|key| Some((key, parse_entry(item.value())?)));
                let Some((key, (_, at, id, _))) = parsed else {
                    unreadable.push(item.key().to_vec());
                    continue;
                };
                // The index is written in the entry's own transaction; only a salvaged log
                // (records carried over one by one, the index rebuilt) needs checking.
                let indexed = !store.salvaged()
                    || seen
                        .get(&seen_key(id))?
                        .is_some_and(|v| v.bytes().get(8..18) == Some(&key.0[..]));
                if !indexed {
                    if !held.insert(id.to_string())
                        || seen_held_elsewhere(&seen, &entries, id, &key)?
                    {
                        unreadable.push(item.key().to_vec());
                        continue;
                    }
                    unindexed.push((key, id.to_string(), at));
                }
                let s = &mut state.streams[key.stream() as usize];
                s.depth += 1;
                s.bytes += stored_size(item.value()).unwrap_or(0);
                state.next_seq = state.next_seq.max(key.seq() + 1);
            }
        }
        if !unreadable.is_empty() || !unindexed.is_empty() {
            if !unreadable.is_empty() {
                // Only disk damage, a bug, or a salvage's second copy of an id gets here.
                tracing::error!(
                    count = unreadable.len(),
                    "outbox holds unreadable or repeated entries; removing them"
                );
            }
            store.write(Commit::Durable, |w| {
                let [entries, seen] = w.tables(LogTable::Outbox, LogTable::Seen)?;
                for k in &unreadable {
                    entries.remove(k)?;
                }
                for (key, id, at) in &unindexed {
                    seen.insert(&seen_key(id), &seen_value(*at, Some(key)))?;
                    seen.insert(&seen_by_time_key(*at, id.as_bytes()), &[])?;
                    state.seen += 1;
                }
                Ok(())
            })?;
        }
        let outbox = Outbox {
            store: store.clone(),
            clock,
            max_bytes: limits.max_bytes,
            limits,
            state: Mutex::new(state),
            changed: Notify::new(),
            claims: Mutex::default(),
        };
        for stream in Stream::ALL {
            outbox.publish_metrics(stream, &state);
        }
        Ok(outbox)
    }

    /// Appends events in a transaction of their own, committed lazily: nothing is durable until
    /// the caller flushes the store.
    pub fn append(&self, events: &[NewEvent]) -> Result<Vec<AppendOutcome>, StoreError> {
        self.store
            .write(Commit::Lazy, |w| self.append_in(w, events))
    }

    /// Appends events within the caller's transaction, skipping ids already held and applying
    /// the size cap. Counts change when the transaction commits.
    pub fn append_in<'h>(
        &'h self,
        w: &mut LogWrite<'_, 'h>,
        events: &[NewEvent],
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let now = self.clock.now();
        let before = *self.state.lock().expect("outbox lock");
        let mut next = before;
        let mut total = next.total_bytes();
        let mut in_batch: HashSet<&str> = HashSet::with_capacity(events.len());
        let mut outcomes = Vec::with_capacity(events.len());
        let mut victims = Victims::default();
        let mut dropped_keys = Vec::new();
        let mut refused: HashMap<Stream, u64> = HashMap::new();
        let mut lowest_new: Option<EntryKey> = None;

        for event in events {
            let stream = Stream::of(event.kind);
            if in_batch.contains(event.id.as_str())
                || w.table(LogTable::Seen)?.contains(&seen_key(&event.id))?
            {
                outcomes.push(AppendOutcome::Duplicate);
                continue;
            }
            let size = new_event_size(event);
            // An event bigger than the whole outbox must not cost anyone else their place.
            let fits_at_all = size <= self.max_bytes;
            while fits_at_all && total + size > self.max_bytes {
                let Some(victim) =
                    victims.next_oldest(w.table(LogTable::Outbox)?, stream, &next)?
                else {
                    break;
                };
                // A dropped event stays "seen": the drop was the decision about it.
                let [entries, seen] = w.tables(LogTable::Outbox, LogTable::Seen)?;
                entries.remove(&victim.key.0)?;
                seen.insert(&seen_key(&victim.id), &seen_value(victim.enqueued_at, None))?;
                dropped_keys.push(victim.key);
                let counts = &mut next.streams[victim.stream() as usize];
                counts.depth -= 1;
                counts.bytes -= victim.size();
                counts.dropped += 1;
                total -= victim.size();
            }
            if total + size > self.max_bytes {
                if stream.droppable() {
                    next.streams[stream as usize].dropped += 1;
                }
                *refused.entry(stream).or_default() += 1;
                outcomes.push(AppendOutcome::Refused);
                continue;
            }
            let key = EntryKey::new(stream, next.next_seq);
            next.next_seq += 1;
            let [entries, seen] = w.tables(LogTable::Outbox, LogTable::Seen)?;
            entries.insert(&key.0, &encode_entry(event, stream, now))?;
            seen.insert(&seen_key(&event.id), &seen_value(now, Some(&key)))?;
            seen.insert(&seen_by_time_key(now, event.id.as_bytes()), &[])?;
            next.seen += 1;
            let counts = &mut next.streams[stream as usize];
            counts.depth += 1;
            counts.bytes += size;
            total += size;
            in_batch.insert(&event.id);
            lowest_new = Some(lowest_new.map_or(key, |k| k.min(key)));
            outcomes.push(AppendOutcome::Stored);
        }

        let stored = outcomes
            .iter()
            .filter(|o| **o == AppendOutcome::Stored)
            .count();
        if next.next_seq != before.next_seq {
            // Sequence numbers are never reused, even once the outbox is empty: a seen record
            // keeps the key of an entry long gone, and must never point at a newer one.
            w.table(LogTable::Meta)?
                .insert(NEXT_SEQ_KEY, &next.next_seq.to_be_bytes())?;
        }
        self.forget_old_ids(w, &mut next, now, 2 * stored + 16)?;
        w.after_commit(move || {
            *self.state.lock().expect("outbox lock") = next;
            {
                let mut claims = self.claims.lock().expect("claims lock");
                for k in &dropped_keys {
                    claims.keys.remove(k);
                }
                if let Some(k) = lowest_new {
                    claims.lower_frontier(k);
                }
            }
            self.report_drops(&before, &next, &refused);
            for stream in Stream::ALL {
                self.publish_metrics(stream, &next);
            }
        });
        Ok(outcomes)
    }

    fn report_drops(&self, before: &State, next: &State, refused: &HashMap<Stream, u64>) {
        for stream in Stream::ALL {
            let dropped =
                next.streams[stream as usize].dropped - before.streams[stream as usize].dropped;
            let refused_here = refused.get(&stream).copied().unwrap_or(0);
            if dropped > 0 {
                metrics::counter!("storelink_outbox_dropped_total", "stream" => stream.name())
                    .increment(dropped);
            }
            if dropped > refused_here {
                tracing::warn!(
                    stream = stream.name(),
                    dropped = dropped - refused_here,
                    max_bytes = self.max_bytes,
                    "outbox full: dropped the oldest events of this stream to make room"
                );
            }
            if refused_here > 0 {
                tracing::warn!(
                    stream = stream.name(),
                    refused = refused_here,
                    max_bytes = self.max_bytes,
                    "outbox full: refused new events of this stream; only events that may not be dropped remain"
                );
            }
        }
    }

    /// Removes up to `budget` remembered ids that are past the retention period or over the
    /// cap, oldest first. Bounded, so an append never stalls on a backlog of expiry; the budget
    /// outruns the rate of new ids, so the set converges.
    fn forget_old_ids(
        &self,
        w: &mut LogWrite<'_, '_>,
        state: &mut State,
        now: Timestamp,
        budget: usize,
    ) -> Result<(), StoreError> {
        let [seen, entries] = w.tables(LogTable::Seen, LogTable::Outbox)?;
        let cutoff = now
            .checked_sub(
                jiff::SignedDuration::try_from(self.limits.seen_retention)
                    .unwrap_or(jiff::SignedDuration::MAX),
            )
            .unwrap_or(Timestamp::MIN);
        // Looked at first, changed after: a table cannot be walked and written at once.
        let mut oldest = Vec::new();
        let mut over = state.seen.saturating_sub(self.limits.max_seen);
        for item in seen.range(&[SEEN_BY_TIME_PREFIX], Some(&[SEEN_BY_TIME_PREFIX + 1]))? {
            if oldest.len() >= budget {
                break;
            }
            let item = item?;
            let stale = parse_seen_by_time(item.key()).is_none_or(|(at, _)| at < cutoff);
            if !stale && over == 0 {
                break;
            }
            over = over.saturating_sub(1);
            oldest.push(item.key().to_vec());
        }
        for key in oldest {
            seen.remove(&key)?;
            let Some((_, id)) = parse_seen_by_time(&key) else {
                continue;
            };
            let sk = seen_key_bytes(id);
            let held = match seen.get(&sk)? {
                Some(v) => held_key(v.bytes()),
                None => None,
            };
            if let Some(key) = held
                && entries.contains(&key.0)?
            {
                // Still waiting for central (a long outage): never forget it, look again later.
                seen.insert(&seen_by_time_key(now, id), &[])?;
                continue;
            }
            seen.remove(&sk)?;
            state.seen = state.seen.saturating_sub(1);
        }
        Ok(())
    }

    /// How many ids are remembered for de-duplication.
    pub fn seen_count(&self) -> u64 {
        self.state.lock().expect("outbox lock").seen
    }

    /// Wakes whoever sends from the outbox. Call after the appended events are durable.
    pub fn notify(&self) {
        self.changed.notify_one();
    }

    /// Resolves when something may have changed: new entries, or room freed by an ack.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Up to `limit` entries in send order, skipping those for which `skip` is true
    /// (the ones already in flight).
    pub fn peek(
        &self,
        limit: usize,
        mut skip: impl FnMut(&EntryKey) -> bool,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        if limit == 0 {
            return Ok(out);
        }
        let view = self.store.view(LogTable::Outbox)?;
        let mut buf = BytesMut::new();
        for item in view.iter()? {
            let item = item?;
            let Some(key) = EntryKey::from_bytes(item.key()) else {
                continue;
            };
            if skip(&key) {
                continue;
            }
            if let Some(entry) = Entry::read(item.key(), item.value(), &mut buf) {
                out.push(entry);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Removes an entry that central acknowledged (a lazy commit of its own). Returns false
    /// when it was already gone (acknowledged twice, or dropped by the size cap while in
    /// flight).
    pub fn ack(&self, key: &EntryKey) -> Result<bool, StoreError> {
        Ok(self.ack_many(std::slice::from_ref(key), Commit::Lazy)? == 1)
    }

    /// Removes entries central acknowledged, in one transaction. Lazy is right for a PUBACK:
    /// a removal lost to a power cut only means the event is sent again with its stable id.
    /// Returns how many were still there.
    pub fn ack_many(&self, keys: &[EntryKey], commit: Commit) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let result = self.store.write(commit, |w| self.ack_in(w, keys));
        if result.is_err() {
            // The entries stay and are sent again; they must not stay hidden behind a claim.
            self.release(keys);
        }
        let acked = result?;
        if acked > 0 {
            self.changed.notify_one();
        }
        Ok(acked)
    }

    /// Acknowledges within the caller's transaction: one removal per entry (its seen record
    /// stays as it is; see the module's layout).
    pub fn ack_in<'h>(
        &'h self,
        w: &mut LogWrite<'_, 'h>,
        keys: &[EntryKey],
    ) -> Result<usize, StoreError> {
        self.remove_in(w, keys, "storelink_outbox_acked_total")
    }

    /// Removes entries within the caller's transaction, counting them under `counter`.
    fn remove_in<'h>(
        &'h self,
        w: &mut LogWrite<'_, 'h>,
        keys: &[EntryKey],
        counter: &'static str,
    ) -> Result<usize, StoreError> {
        let mut gone: Vec<(Stream, u64)> = Vec::with_capacity(keys.len());
        let entries = w.table(LogTable::Outbox)?;
        // PUBACKs come mostly in order, so the keys form a few runs of consecutive sequence
        // numbers; each run goes in one pass (every key inside a run is one of `keys`).
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut run_start = 0;
        for i in 0..sorted.len() {
            let last = i + 1 == sorted.len()
                || sorted[i + 1].stream() != sorted[i].stream()
                || sorted[i].seq().checked_add(1) != Some(sorted[i + 1].seq());
            if !last {
                continue;
            }
            let stream = sorted[i].stream();
            entries.remove_range_with(&sorted[run_start].0, &sorted[i].0, |raw| {
                gone.push((stream, stored_size(raw).unwrap_or(0)));
            })?;
            run_start = i + 1;
        }
        let keys = sorted;
        let acked = gone.len();
        w.after_commit(move || {
            let snapshot = {
                let mut state = self.state.lock().expect("outbox lock");
                for (stream, size) in &gone {
                    let counts = &mut state.streams[*stream as usize];
                    counts.depth = counts.depth.saturating_sub(1);
                    counts.bytes = counts.bytes.saturating_sub(*size);
                }
                *state
            };
            // The claims go only now that the removal is committed: dropped first, a
            // concurrent claim from an older snapshot could take an acknowledged entry and
            // send it a second time.
            {
                let mut claims = self.claims.lock().expect("claims lock");
                for k in &keys {
                    claims.keys.remove(k);
                }
            }
            let mut per_stream = [0u64; STREAM_COUNT];
            for (stream, _) in &gone {
                per_stream[*stream as usize] += 1;
            }
            for stream in Stream::ALL {
                let n = per_stream[stream as usize];
                if n > 0 {
                    metrics::counter!(counter, "stream" => stream.name()).increment(n);
                    self.publish_metrics(stream, &snapshot);
                }
            }
        });
        Ok(acked)
    }

    /// Erases a customer from what is still held, known by id and card numbers (`ids`): a
    /// transaction loses its `loyalty_id`, a redemption its `customer_id`; presence, offer,
    /// prompt, customer and trigger events about them, and dead letters that mention them,
    /// are removed. Committed durably, since the erasure is acknowledged after it. An entry a
    /// sender has in flight at this moment may still arrive unredacted; it was sent before the
    /// request came.
    pub fn erase_customer(&self, ids: &[String]) -> Result<OutboxErased, StoreError> {
        let is_them =
            |v: &serde_json::Value| v.as_str().is_some_and(|s| ids.iter().any(|id| id == s));
        let mut doomed = Vec::new();
        let mut rewrites: Vec<(EntryKey, Vec<u8>, u64, u64)> = Vec::new();
        let view = self.store.view(LogTable::Outbox)?;
        for item in view.iter()? {
            let item = item?;
            let (Some(key), Some((kind, _, _, payload_at))) =
                (EntryKey::from_bytes(item.key()), parse_entry(item.value()))
            else {
                continue;
            };
            let raw = item.value();
            let Ok(mut event) = serde_json::from_slice::<serde_json::Value>(&raw[payload_at..])
            else {
                continue;
            };
            let field = match kind {
                EventKind::Transaction => "loyalty_id",
                EventKind::Redemption => "customer_id",
                EventKind::Presence
                | EventKind::Offer
                | EventKind::Prompt
                | EventKind::Customer
                | EventKind::Trigger => {
                    if is_them(&event["data"]["customer_id"]) {
                        doomed.push(key);
                    }
                    continue;
                }
                EventKind::DeadLetter => {
                    let letter = event.get("data").cloned().and_then(|d| {
                        serde_json::from_value::<crate::deadletter::DeadLetter>(d).ok()
                    });
                    if letter.is_some_and(|l| l.mentions(ids)) {
                        doomed.push(key);
                    }
                    continue;
                }
                EventKind::Status | EventKind::Erasure | EventKind::FollowUps => continue,
            };
            if !is_them(&event["data"][field]) {
                continue;
            }
            if let Some(data) = event["data"].as_object_mut() {
                data.remove(field);
            }
            let mut new_raw = raw[..payload_at].to_vec();
            new_raw.extend_from_slice(&serde_json::to_vec(&event).expect("JSON serialises"));
            let old = stored_size(raw).unwrap_or(0);
            let new = stored_size(&new_raw).unwrap_or(0);
            rewrites.push((key, new_raw, old, new));
        }
        drop(view);
        let erased = OutboxErased {
            redacted: rewrites.len() as u64,
            dropped: doomed.len() as u64,
        };
        if doomed.is_empty() && rewrites.is_empty() {
            return Ok(erased);
        }
        self.store.write(Commit::Durable, |w| {
            self.remove_in(w, &doomed, "storelink_outbox_erased_total")?;
            let entries = w.table(LogTable::Outbox)?;
            let mut delta: Vec<(Stream, i64)> = Vec::new();
            for (key, raw, old, new) in &rewrites {
                // Only where the entry is still held (an acknowledgement may have come).
                if entries.contains(&key.0)? {
                    entries.insert(&key.0, raw)?;
                    delta.push((key.stream(), *new as i64 - *old as i64));
                }
            }
            w.after_commit(move || {
                let mut state = self.state.lock().expect("outbox lock");
                for (stream, d) in delta {
                    let counts = &mut state.streams[stream as usize];
                    counts.bytes = counts.bytes.saturating_add_signed(d);
                }
            });
            Ok(())
        })?;
        Ok(erased)
    }

    /// Takes up to `limit` entries (and about `max_bytes` of payload, at least one entry) that
    /// no other sender holds, skipping those past their stream's TTL. They stay in the outbox
    /// until [`Outbox::ack`]; [`Outbox::release`] hands them back unsent.
    pub fn claim(
        &self,
        take: Take,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = self.clock.now();
        let mut claims = self.claims.lock().expect("claims lock");
        // The snapshot is taken under the claims lock: an ack's hook (which removes its claims
        // after its commit) cannot run in between, so every acknowledged entry this snapshot
        // still shows is still claimed.
        let view = self.store.view(LogTable::Outbox)?;
        let mut out: Vec<Entry> = Vec::new();
        let mut expired = 0usize;
        let mut bytes = 0usize;
        let mut buf = BytesMut::with_capacity(limit.min(256) * 1024);
        let mut room = |len: usize, out: &Vec<Entry>| {
            let fits = out.is_empty() || bytes + len <= max_bytes;
            if fits {
                bytes += len;
            }
            fits
        };
        match take {
            Take::Front => {
                let start = claims.frontier.map(|k| k.0.to_vec()).unwrap_or_default();
                // Whether every entry walked so far was claimed: the frontier may move past.
                let mut contiguous = true;
                for item in view.range(&start, None)? {
                    let item = item?;
                    let Some(key) = EntryKey::from_bytes(item.key()) else {
                        continue;
                    };
                    if claims.keys.contains(&key) {
                        if contiguous {
                            claims.frontier = Some(key);
                        }
                        continue;
                    }
                    let Some((_, at, _, payload_at)) = parse_entry(item.value()) else {
                        continue;
                    };
                    if self.is_expired(key.stream(), at, now) {
                        expired += 1;
                        contiguous = false;
                        continue;
                    }
                    if out.len() >= limit || !room(item.value().len() - payload_at, &out) {
                        break;
                    }
                    let Some(entry) = Entry::read(item.key(), item.value(), &mut buf) else {
                        continue;
                    };
                    if contiguous {
                        claims.frontier = Some(key);
                    }
                    claims.keys.insert(key);
                    out.push(entry);
                }
            }
            Take::Live { since } => {
                'streams: for stream in Stream::ALL {
                    let (from, to) = stream.bounds();
                    // Newest first until the first older entry, then oldest first.
                    let mut live = Vec::new();
                    for item in view.range(&from, Some(&to))?.rev() {
                        let item = item?;
                        let Some(entry) = Entry::read(item.key(), item.value(), &mut buf) else {
                            continue;
                        };
                        if entry.enqueued_at < since {
                            break;
                        }
                        if !claims.keys.contains(&entry.key) {
                            live.push(entry);
                        }
                    }
                    for entry in live.into_iter().rev() {
                        if out.len() >= limit || !room(entry.payload().len(), &out) {
                            break 'streams;
                        }
                        claims.keys.insert(entry.key);
                        out.push(entry);
                    }
                }
            }
        }
        drop(claims);
        drop(view);
        // Skipped expired entries sit at the front of their stream; remove them now rather
        // than walk over them on every claim until the periodic sweep.
        if expired > 0 {
            self.expire()?;
        }
        Ok(out)
    }

    /// Hands claimed entries back, unsent, for any sender to take again.
    pub fn release<'a>(&self, keys: impl IntoIterator<Item = &'a EntryKey>) {
        let mut claims = self.claims.lock().expect("claims lock");
        for key in keys {
            claims.keys.remove(key);
            claims.lower_frontier(*key);
        }
        drop(claims);
        self.changed.notify_one();
    }

    /// Entries currently taken by a sender.
    pub fn claimed(&self) -> usize {
        self.claims.lock().expect("claims lock").keys.len()
    }

    fn is_expired(&self, stream: Stream, enqueued_at: Timestamp, now: Timestamp) -> bool {
        self.limits.ttl[stream as usize]
            .is_some_and(|ttl| now.duration_since(enqueued_at).unsigned_abs() > ttl)
    }

    /// Removes unsent events that outlived their stream's TTL, counting and logging them, and
    /// refreshes the oldest-age gauges. Returns how many were removed.
    pub fn expire(&self) -> Result<u64, StoreError> {
        let now = self.clock.now();
        let mut removed = 0;
        for stream in Stream::ALL {
            if self.limits.ttl[stream as usize].is_none() {
                continue;
            }
            let gone = self.store.write(Commit::Lazy, |w| {
                let [entries, seen] = w.tables(LogTable::Outbox, LogTable::Seen)?;
                let (from, to) = stream.bounds();
                let mut gone: Vec<(Vec<u8>, String, Timestamp, u64)> = Vec::new();
                for item in entries.range(&from, Some(&to))? {
                    let item = item?;
                    let Some((_, at, id, _)) = parse_entry(item.value()) else {
                        continue;
                    };
                    // Oldest first: the first one still fresh ends the scan.
                    if !self.is_expired(stream, at, now) {
                        break;
                    }
                    let size = stored_size(item.value()).unwrap_or(0);
                    gone.push((item.key().to_vec(), id.to_string(), at, size));
                    if gone.len() >= 10_000 {
                        break;
                    }
                }
                for (key, id, at, _) in &gone {
                    entries.remove(key)?;
                    seen.insert(&seen_key(id), &seen_value(*at, None))?;
                }
                let sizes: Vec<u64> = gone.iter().map(|g| g.3).collect();
                let n = sizes.len();
                w.after_commit(move || {
                    let snapshot = {
                        let mut state = self.state.lock().expect("outbox lock");
                        let counts = &mut state.streams[stream as usize];
                        for size in &sizes {
                            counts.depth = counts.depth.saturating_sub(1);
                            counts.bytes = counts.bytes.saturating_sub(*size);
                            counts.expired += 1;
                        }
                        *state
                    };
                    if !sizes.is_empty() {
                        self.publish_metrics(stream, &snapshot);
                    }
                });
                Ok(n)
            })?;
            if gone == 0 {
                continue;
            }
            metrics::counter!("storelink_outbox_expired_total", "stream" => stream.name())
                .increment(gone as u64);
            tracing::warn!(
                stream = stream.name(),
                expired = gone,
                ttl_s = self.limits.ttl[stream as usize].map(|d| d.as_secs()),
                "removed undelivered events older than the stream's TTL"
            );
            removed += gone as u64;
        }
        self.stats()?;
        Ok(removed)
    }

    /// When the oldest held event was enqueued, over all streams.
    pub fn oldest_enqueued(&self) -> Result<Option<Timestamp>, StoreError> {
        let depths = self.state.lock().expect("outbox lock").streams;
        if depths.iter().all(|s| s.depth == 0) {
            return Ok(None);
        }
        let view = self.store.view(LogTable::Outbox)?;
        let mut oldest: Option<Timestamp> = None;
        for stream in Stream::ALL {
            if depths[stream as usize].depth == 0 {
                continue;
            }
            if let Some(at) = first_enqueued(&view, stream)? {
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        Ok(oldest)
    }

    /// Whether an event id is currently held.
    pub fn contains(&self, id: &str) -> Result<bool, StoreError> {
        let Some(key) = self
            .store
            .view(LogTable::Seen)?
            .get(&seen_key(id))?
            .and_then(|v| held_key(v.bytes()))
        else {
            return Ok(false);
        };
        self.store.view(LogTable::Outbox)?.contains(&key.0)
    }

    pub fn depth(&self) -> u64 {
        let state = self.state.lock().expect("outbox lock");
        state.streams.iter().map(|s| s.depth).sum()
    }

    /// Age of the oldest entry of `stream`, by the injectable clock.
    pub fn oldest_age(&self, stream: Stream) -> Result<Option<std::time::Duration>, StoreError> {
        let view = self.store.view(LogTable::Outbox)?;
        self.age_of_first(&view, stream)
    }

    fn age_of_first(
        &self,
        view: &LogView,
        stream: Stream,
    ) -> Result<Option<std::time::Duration>, StoreError> {
        let now = self.clock.now();
        Ok(first_enqueued(view, stream)?.map(|at| now.duration_since(at).unsigned_abs()))
    }

    pub fn stats(&self) -> Result<OutboxStats, StoreError> {
        let state = *self.state.lock().expect("outbox lock");
        let view = self.store.view(LogTable::Outbox)?;
        let mut streams = Vec::with_capacity(STREAM_COUNT);
        for stream in Stream::ALL {
            let oldest = self.age_of_first(&view, stream)?;
            // 0 for an empty stream: leaving the last value would show a drained outbox as
            // still holding an old event, and an alert on age would never clear.
            metrics::gauge!("storelink_outbox_oldest_age_seconds", "stream" => stream.name())
                .set(oldest.map_or(0.0, |age| age.as_secs_f64()));
            streams.push(StreamStats {
                stream: stream.name(),
                counts: state.streams[stream as usize],
                oldest_age_s: oldest.map(|d| d.as_secs_f64()),
            });
        }
        Ok(OutboxStats {
            max_bytes: self.max_bytes,
            total_bytes: state.total_bytes(),
            depth: state.streams.iter().map(|s| s.depth).sum(),
            streams,
        })
    }

    fn publish_metrics(&self, stream: Stream, state: &State) {
        let counts = state.streams[stream as usize];
        metrics::gauge!("storelink_outbox_depth", "stream" => stream.name())
            .set(counts.depth as f64);
        metrics::gauge!("storelink_outbox_bytes", "stream" => stream.name())
            .set(counts.bytes as f64);
    }
}

/// Whether the seen record of `id` names another entry than `key` that is still there: the
/// entry at `key` is then a second copy of the same event.
fn seen_held_elsewhere(
    seen: &LogView,
    entries: &LogView,
    id: &str,
    key: &EntryKey,
) -> Result<bool, StoreError> {
    let other = match seen.get(&seen_key(id))? {
        Some(v) => held_key(v.bytes()).filter(|k| k != key),
        None => None,
    };
    match other {
        Some(k) => entries.contains(&k.0),
        None => Ok(false),
    }
}

/// When the first (oldest) entry of `stream` was enqueued.
fn first_enqueued(view: &LogView, stream: Stream) -> Result<Option<Timestamp>, StoreError> {
    let (from, to) = stream.bounds();
    for item in view.range(&from, Some(&to))? {
        let item = item?;
        if let Some((_, at, _, _)) = parse_entry(item.value()) {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// Finds drop victims for one append: the oldest entries of droppable streams, lowest priority
/// first, never of higher priority than the event that needs the room.
#[derive(Default)]
struct Victims {
    /// Per stream, the key of the last entry already chosen in this append.
    after: HashMap<Stream, EntryKey>,
}

impl Victims {
    fn next_oldest(
        &mut self,
        entries: &LogTableMut<'_>,
        incoming: Stream,
        state: &State,
    ) -> Result<Option<Entry>, StoreError> {
        let mut buf = BytesMut::new();
        for stream in Stream::ALL.into_iter().rev() {
            if !stream.droppable() || stream < incoming || state.streams[stream as usize].depth == 0
            {
                continue;
            }
            let start = match self.after.get(&stream) {
                Some(k) => {
                    let mut next = k.0.to_vec();
                    next.push(0);
                    next
                }
                None => stream.bounds().0.to_vec(),
            };
            let end = stream.bounds().1;
            for item in entries.range(&start, Some(&end))? {
                let item = item?;
                if let Some(entry) = Entry::read(item.key(), item.value(), &mut buf) {
                    self.after.insert(stream, entry.key);
                    return Ok(Some(entry));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::StoreOptions;
    use std::sync::Arc;

    fn setup(max_bytes: u64) -> (tempfile::TempDir, Store, Outbox, ManualClock) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let clock = ManualClock::new("2026-11-22T10:00:00Z".parse().unwrap());
        let outbox = Outbox::open(
            &store,
            Limits::with_max_bytes(max_bytes),
            Arc::new(clock.clone()),
        )
        .unwrap();
        (dir, store, outbox, clock)
    }

    fn ev(kind: EventKind, id: &str, len: usize) -> NewEvent {
        NewEvent {
            kind,
            id: id.into(),
            payload: vec![b'x'; len],
        }
    }

    fn ids(outbox: &Outbox) -> Vec<String> {
        outbox
            .peek(usize::MAX, |_| false)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    #[test]
    fn peek_is_priority_then_fifo_and_ack_removes() {
        let (_d, _s, outbox, _c) = setup(1 << 20);
        let out = outbox
            .append(&[
                ev(EventKind::Presence, "p1", 10),
                ev(EventKind::Transaction, "t1", 10),
                ev(EventKind::Prompt, "o1", 10),
                ev(EventKind::Transaction, "t2", 10),
            ])
            .unwrap();
        assert!(out.iter().all(|o| *o == AppendOutcome::Stored));
        assert_eq!(ids(&outbox), ["t1", "t2", "o1", "p1"]);
        let first = outbox.peek(1, |_| false).unwrap().remove(0);
        assert_eq!(first.payload(), b"xxxxxxxxxx");
        assert_eq!(first.kind, EventKind::Transaction);
        assert!(outbox.ack(&first.key).unwrap());
        assert!(!outbox.ack(&first.key).unwrap(), "second ack is a no-op");
        assert_eq!(ids(&outbox), ["t2", "o1", "p1"]);
        assert!(!outbox.contains("t1").unwrap());
        // The skip predicate hides in-flight entries.
        let t2 = outbox.peek(1, |_| false).unwrap()[0].key;
        assert_eq!(outbox.peek(1, |k| *k == t2).unwrap()[0].id, "o1");
    }

    #[test]
    fn duplicate_ids_are_stored_once() {
        let (_d, _s, outbox, _c) = setup(1 << 20);
        let out = outbox
            .append(&[
                ev(EventKind::Transaction, "t1", 10),
                ev(EventKind::Transaction, "t1", 10),
            ])
            .unwrap();
        assert_eq!(out, [AppendOutcome::Stored, AppendOutcome::Duplicate]);
        let out = outbox
            .append(&[ev(EventKind::Transaction, "t1", 10)])
            .unwrap();
        assert_eq!(out, [AppendOutcome::Duplicate]);
        assert_eq!(outbox.depth(), 1);
    }

    #[test]
    fn an_id_delivered_long_ago_is_still_a_duplicate_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new("2026-11-22T10:00:00Z".parse().unwrap());
        let limits = Limits {
            max_bytes: 1 << 20,
            seen_retention: std::time::Duration::from_secs(86_400),
            max_seen: 1_000,
            ttl: [None; STREAM_COUNT],
        };
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let outbox = Outbox::open(&store, limits, Arc::new(clock.clone())).unwrap();
            outbox
                .append(&[ev(EventKind::Transaction, "t1", 10)])
                .unwrap();
            let key = outbox.peek(1, |_| false).unwrap()[0].key;
            outbox.ack(&key).unwrap();
            assert_eq!(outbox.depth(), 0);
            store.flush_blocking().unwrap();
        }
        // After a restart, the delivered id is still recognised.
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let outbox = Outbox::open(&store, limits, Arc::new(clock.clone())).unwrap();
        assert_eq!(outbox.seen_count(), 1);
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Transaction, "t1", 10)])
                .unwrap(),
            [AppendOutcome::Duplicate]
        );
        assert_eq!(outbox.depth(), 0);
        // Past the retention period it is forgotten (on the next append) and accepted again.
        clock.advance(std::time::Duration::from_secs(2 * 86_400));
        outbox
            .append(&[ev(EventKind::Transaction, "t2", 10)])
            .unwrap();
        assert_eq!(outbox.seen_count(), 1, "t1 forgotten, t2 remembered");
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Transaction, "t1", 10)])
                .unwrap(),
            [AppendOutcome::Stored]
        );
    }

    #[test]
    fn remembered_ids_are_capped_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let clock = ManualClock::new("2026-11-22T10:00:00Z".parse().unwrap());
        let limits = Limits {
            max_seen: 50,
            ..Limits::with_max_bytes(1 << 20)
        };
        let outbox = Outbox::open(&store, limits, Arc::new(clock.clone())).unwrap();
        for i in 0..200 {
            clock.advance(std::time::Duration::from_millis(1));
            outbox
                .append(&[ev(EventKind::Presence, &format!("p{i:03}"), 1)])
                .unwrap();
            // Delivered at once, so only the seen set can say "duplicate".
            let entry = outbox.peek(1, |_| false).unwrap().remove(0);
            outbox.ack(&entry.key).unwrap();
        }
        assert!(outbox.seen_count() <= 51, "{}", outbox.seen_count());
        // The newest are remembered, the oldest forgotten.
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Presence, "p199", 1)])
                .unwrap(),
            [AppendOutcome::Duplicate]
        );
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Presence, "p000", 1)])
                .unwrap(),
            [AppendOutcome::Stored]
        );
    }

    #[test]
    fn an_id_still_held_is_never_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let clock = ManualClock::new("2026-11-22T10:00:00Z".parse().unwrap());
        let limits = Limits {
            max_bytes: 1 << 20,
            seen_retention: std::time::Duration::from_secs(3600),
            max_seen: 1_000,
            ttl: [None; STREAM_COUNT],
        };
        let outbox = Outbox::open(&store, limits, Arc::new(clock.clone())).unwrap();
        outbox
            .append(&[ev(EventKind::Transaction, "held", 10)])
            .unwrap();
        // A week-long outage: far past the retention period, still undelivered.
        for day in 0..7 {
            clock.advance(std::time::Duration::from_secs(86_400));
            outbox
                .append(&[ev(EventKind::Presence, &format!("p{day}"), 1)])
                .unwrap();
        }
        assert!(outbox.contains("held").unwrap());
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Transaction, "held", 10)])
                .unwrap(),
            [AppendOutcome::Duplicate],
            "a resend during the outage is recognised"
        );
        assert_eq!(ids(&outbox).iter().filter(|i| *i == "held").count(), 1);
    }

    #[test]
    fn survives_reopen_with_counts_and_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new("2026-11-22T10:00:00Z".parse().unwrap()));
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let outbox =
                Outbox::open(&store, Limits::with_max_bytes(1 << 20), clock.clone()).unwrap();
            outbox
                .append(&[
                    ev(EventKind::Transaction, "t1", 10),
                    ev(EventKind::Presence, "p1", 10),
                ])
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let outbox = Outbox::open(&store, Limits::with_max_bytes(1 << 20), clock).unwrap();
        assert_eq!(outbox.depth(), 2);
        outbox
            .append(&[ev(EventKind::Transaction, "t2", 10)])
            .unwrap();
        assert_eq!(ids(&outbox), ["t1", "t2", "p1"]);
        let stats = outbox.stats().unwrap();
        assert_eq!(stats.streams[Stream::Transaction as usize].counts.depth, 2);
    }

    #[test]
    fn full_outbox_drops_presence_then_offers_oldest_first_never_transactions() {
        let one = new_event_size(&ev(EventKind::Transaction, "t00", 100));
        let (_d, _s, outbox, _c) = setup(one * 4);
        outbox
            .append(&[
                ev(EventKind::Prompt, "o00", 100),
                ev(EventKind::Presence, "p00", 100),
                ev(EventKind::Presence, "p01", 100),
                ev(EventKind::Transaction, "t00", 100),
            ])
            .unwrap();
        // Room for a transaction comes from the oldest presence event.
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Transaction, "t01", 100)])
                .unwrap(),
            [AppendOutcome::Stored]
        );
        assert_eq!(ids(&outbox), ["t00", "t01", "o00", "p01"]);
        // A presence event may push out an older presence event, but not an offer.
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Presence, "p02", 100)])
                .unwrap(),
            [AppendOutcome::Stored]
        );
        assert_eq!(ids(&outbox), ["t00", "t01", "o00", "p02"]);
        // Two more transactions take the presence and then the offer.
        outbox
            .append(&[
                ev(EventKind::Transaction, "t02", 100),
                ev(EventKind::Transaction, "t03", 100),
            ])
            .unwrap();
        assert_eq!(ids(&outbox), ["t00", "t01", "t02", "t03"]);
        // Only transactions remain: a new one is refused, a presence event is dropped on arrival.
        assert_eq!(
            outbox
                .append(&[
                    ev(EventKind::Transaction, "t04", 100),
                    ev(EventKind::Presence, "p03", 100)
                ])
                .unwrap(),
            [AppendOutcome::Refused, AppendOutcome::Refused]
        );
        let stats = outbox.stats().unwrap();
        let dropped = |s: Stream| stats.streams[s as usize].counts.dropped;
        assert_eq!(
            dropped(Stream::Presence),
            4,
            "p00, p01, p02 and the refused p03"
        );
        assert_eq!(dropped(Stream::Offer), 1);
        assert_eq!(dropped(Stream::Transaction), 0);
        assert!(stats.total_bytes <= stats.max_bytes);
        assert_eq!(ids(&outbox), ["t00", "t01", "t02", "t03"]);
    }

    #[test]
    fn an_event_larger_than_the_cap_is_refused_without_evicting_anything() {
        let (_d, _s, outbox, _c) = setup(4096);
        outbox
            .append(&[ev(EventKind::Presence, "p1", 100)])
            .unwrap();
        let out = outbox
            .append(&[ev(EventKind::Transaction, "huge", 10_000)])
            .unwrap();
        assert_eq!(out, [AppendOutcome::Refused]);
        assert_eq!(ids(&outbox), ["p1"]);
    }

    #[test]
    fn oldest_age_follows_the_clock() {
        let (_d, _s, outbox, clock) = setup(1 << 20);
        outbox
            .append(&[ev(EventKind::Transaction, "t1", 1)])
            .unwrap();
        clock.advance(std::time::Duration::from_secs(3600));
        outbox
            .append(&[ev(EventKind::Transaction, "t2", 1)])
            .unwrap();
        let age = outbox.oldest_age(Stream::Transaction).unwrap().unwrap();
        assert_eq!(age.as_secs(), 3600);
        assert_eq!(outbox.oldest_age(Stream::Presence).unwrap(), None);
    }

    #[test]
    fn acknowledgements_out_of_order_across_streams_remove_exactly_their_entries() {
        let (_d, _s, outbox, _c) = setup(1 << 20);
        let mut events: Vec<NewEvent> = (0..10)
            .map(|i| ev(EventKind::Transaction, &format!("t{i}"), 10 + i))
            .collect();
        events.extend((0..3).map(|i| ev(EventKind::Presence, &format!("p{i}"), 7)));
        outbox.append(&events).unwrap();
        let claimed = outbox.claim(Take::Front, 100, usize::MAX).unwrap();
        let key = |id: &str| claimed.iter().find(|e| e.id == id).unwrap().key;
        // Runs, gaps, a repeat, another stream, and the order PUBACKs may come in.
        let acked: Vec<EntryKey> = ["t8", "t0", "t2", "t1", "p1", "t5", "t7", "t1", "p2"]
            .iter()
            .map(|id| key(id))
            .collect();
        assert_eq!(outbox.ack_many(&acked, Commit::Durable).unwrap(), 8);
        let mut left = ids(&outbox);
        left.sort();
        assert_eq!(left, ["p0", "t3", "t4", "t6", "t9"]);
        assert_eq!(outbox.depth(), 5);
        let stats = outbox.stats().unwrap();
        let bytes: u64 = ["t3", "t4", "t6", "t9", "p0"]
            .iter()
            .map(|id| {
                let e = events.iter().find(|e| e.id == *id).unwrap();
                new_event_size(e)
            })
            .sum();
        assert_eq!(
            stats.total_bytes, bytes,
            "the byte count follows what was removed"
        );
        // Acknowledging again finds nothing and changes nothing.
        assert_eq!(outbox.ack_many(&acked, Commit::Durable).unwrap(), 0);
        assert_eq!(outbox.depth(), 5);
    }

    #[test]
    fn claims_hide_entries_from_other_senders_until_acked_or_released() {
        let (_d, _s, outbox, _c) = setup(1 << 20);
        outbox
            .append(&[
                ev(EventKind::Transaction, "t1", 10),
                ev(EventKind::Transaction, "t2", 10),
                ev(EventKind::Presence, "p1", 10),
            ])
            .unwrap();
        let a = outbox.claim(Take::Front, 2, usize::MAX).unwrap();
        assert_eq!(
            a.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["t1", "t2"]
        );
        let b = outbox.claim(Take::Front, 10, usize::MAX).unwrap();
        assert_eq!(b.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["p1"]);
        assert!(
            outbox
                .claim(Take::Front, 10, usize::MAX)
                .unwrap()
                .is_empty()
        );
        outbox.ack(&a[0].key).unwrap();
        outbox.release([&a[1].key]);
        let c = outbox.claim(Take::Front, 10, usize::MAX).unwrap();
        assert_eq!(c.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["t2"]);
        assert_eq!(outbox.claimed(), 2);
    }

    #[test]
    fn an_acknowledged_entry_is_never_claimed_again_by_a_concurrent_sender() {
        let (_d, _s, outbox, _c) = setup(64 << 20);
        let n = 4000;
        let events: Vec<_> = (0..n)
            .map(|i| ev(EventKind::Transaction, &format!("t{i:05}"), 10))
            .collect();
        outbox.append(&events).unwrap();
        // Two senders claim and acknowledge in small batches at once, as MQTT and HTTPS do
        // during a backfill; every entry must go to exactly one of them.
        let sender = || {
            let mut got = Vec::new();
            loop {
                let batch = outbox.claim(Take::Front, 3, usize::MAX).unwrap();
                if batch.is_empty() && outbox.depth() == 0 {
                    return got;
                }
                for e in batch {
                    outbox.ack(&e.key).unwrap();
                    got.push(e.id);
                }
            }
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(sender);
            let b = s.spawn(sender);
            (a.join().unwrap(), b.join().unwrap())
        });
        let mut all: Vec<_> = a.iter().chain(&b).cloned().collect();
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "every entry sent");
        assert_eq!(total, n, "no entry sent by both senders");
        assert_eq!(outbox.claimed(), 0);
    }

    #[test]
    fn claims_respect_the_byte_budget_but_always_take_one() {
        let (_d, _s, outbox, _c) = setup(1 << 20);
        outbox
            .append(&[
                ev(EventKind::Transaction, "t1", 600),
                ev(EventKind::Transaction, "t2", 600),
            ])
            .unwrap();
        assert_eq!(outbox.claim(Take::Front, 10, 100).unwrap().len(), 1);
        assert_eq!(outbox.claim(Take::Front, 10, 1000).unwrap().len(), 1);
    }

    #[test]
    fn live_takes_only_recent_entries_by_priority_oldest_first() {
        let (_d, _s, outbox, clock) = setup(1 << 20);
        for i in 0..5 {
            outbox
                .append(&[ev(EventKind::Transaction, &format!("old{i}"), 10)])
                .unwrap();
        }
        clock.advance(std::time::Duration::from_secs(3600));
        let since = crate::clock::Clock::now(&clock);
        outbox
            .append(&[
                ev(EventKind::Presence, "p-live", 10),
                ev(EventKind::Transaction, "t-live1", 10),
                ev(EventKind::Transaction, "t-live2", 10),
            ])
            .unwrap();
        let live = outbox.claim(Take::Live { since }, 2, usize::MAX).unwrap();
        assert_eq!(
            live.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["t-live1", "t-live2"]
        );
        let rest = outbox.claim(Take::Live { since }, 10, usize::MAX).unwrap();
        assert_eq!(
            rest.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["p-live"]
        );
        let front = outbox.claim(Take::Front, 1, usize::MAX).unwrap();
        assert_eq!(front[0].id, "old0");
        assert_eq!(
            outbox.oldest_enqueued().unwrap(),
            Some(since - jiff::SignedDuration::from_secs(3600))
        );
    }

    #[test]
    fn expired_events_are_not_sent_and_are_removed_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let clock = ManualClock::new("2026-11-22T10:00:00Z".parse().unwrap());
        let limits = Limits::with_max_bytes(1 << 20)
            .with_ttl(Stream::Presence, Some(std::time::Duration::from_secs(600)))
            .with_ttl(Stream::Transaction, Some(std::time::Duration::from_secs(1)));
        let outbox = Outbox::open(&store, limits, Arc::new(clock.clone())).unwrap();
        outbox
            .append(&[
                ev(EventKind::Presence, "p-old", 10),
                ev(EventKind::Transaction, "t-old", 10),
            ])
            .unwrap();
        clock.advance(std::time::Duration::from_secs(601));
        outbox
            .append(&[ev(EventKind::Presence, "p-new", 10)])
            .unwrap();
        let sent: Vec<String> = outbox
            .claim(Take::Front, 10, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(sent, ["t-old", "p-new"], "transactions never expire");
        assert_eq!(
            outbox.expire().unwrap(),
            0,
            "the claim that skipped it already removed it"
        );
        let stats = outbox.stats().unwrap();
        assert_eq!(stats.streams[Stream::Presence as usize].counts.expired, 1);
        assert_eq!(stats.streams[Stream::Presence as usize].counts.depth, 1);
        assert!(!outbox.contains("p-old").unwrap());
        assert_eq!(
            outbox
                .append(&[ev(EventKind::Presence, "p-old", 10)])
                .unwrap(),
            [AppendOutcome::Duplicate],
            "an expired id stays seen"
        );
    }
}
