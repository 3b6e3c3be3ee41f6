//! The outbox: every event bound for central, held durably until central acknowledges it.
//!
//! Layout, in the `outbox` tree:
//! - `0x00 ‖ stream ‖ seq (u64 BE)` → entry (header ‖ CloudEvent bytes). Key order is send
//!   order: streams by priority, then oldest first within a stream.
//! - `0x02 ‖ event id` → first-seen time (i64 BE), followed by the entry key while the event is
//!   held; and `0x03 ‖ time ‖ event id` for expiry. Every id the outbox ever accepted is kept
//!   after delivery for [`Limits::seen_retention`] (at most [`Limits::max_seen`] ids); an id
//!   still held never expires. This is what makes counting exactly-once at the edge: a
//!   transaction a register sends again, even after it reached central and even after a
//!   restart, is recognised and not stored, counted or forwarded twice. It lives in this tree,
//!   written in the same atomic batch as the entry, because a "seen" mark that survived a crash
//!   without its entry would make the register's resend look like a duplicate and lose it.
//!
//! Invariants:
//! - An entry leaves only by [`Outbox::ack`] (central acknowledged it) or by the drop policy.
//! - Ids are unique: appending an id that is held, or was seen within the retention period, is a
//!   no-op that reports [`AppendOutcome::Duplicate`].
//! - The outbox holds at most `max_bytes`. When full, droppable streams (status, presence,
//!   offers and prompts, dead-letters) lose their oldest entries first, lowest priority first,
//!   and only to make room for an event of equal or higher priority. Transactions and
//!   redemptions are never dropped: when only they remain, new ones are refused, so the register
//!   is told `err` instead of being acknowledged. Every drop is counted and logged.
//! - Appending does not flush. The caller flushes the store before acknowledging anything
//!   (see [`crate::store`]).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use jiff::Timestamp;
use tokio::sync::Notify;

use crate::clock::SharedClock;
use crate::events::EventKind;
use crate::store::{Batch, Store, StoreError, Tree, TreeName, Value};

const ENTRY_PREFIX: u8 = 0x00;
const SEEN_PREFIX: u8 = 0x02;
const SEEN_BY_TIME_PREFIX: u8 = 0x03;
const FORMAT_V1: u8 = 1;
const HEADER_LEN: usize = 1 + 1 + 1 + 8 + 2;
/// Bytes an entry costs beyond its id and payload: keys, header, the entry key in its seen
/// record.
const OVERHEAD: u64 = 10 + HEADER_LEN as u64 + 10;

/// Outbox streams, in priority order (lower sends first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Stream {
    Transaction = 0,
    Redemption = 1,
    DeadLetter = 2,
    /// Offer decisions and cashier prompts.
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
            EventKind::Offer | EventKind::Prompt => Stream::Offer,
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

/// An event on its way into the outbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventKind,
    pub id: String,
    /// The serialised CloudEvent, exactly as central will receive it.
    pub payload: Vec<u8>,
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
    raw: Value,
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

impl Entry {
    pub fn stream(&self) -> Stream {
        self.key.stream()
    }

    /// The CloudEvent bytes.
    pub fn payload(&self) -> &[u8] {
        &self.raw[self.payload_at..]
    }

    fn size(&self) -> u64 {
        self.raw.len() as u64 + self.id.len() as u64 + OVERHEAD
    }

    fn decode(key: EntryKey, raw: Value) -> Option<Entry> {
        if raw.len() < HEADER_LEN || raw[0] != FORMAT_V1 {
            return None;
        }
        let kind = *EventKind::ALL.get(raw[2] as usize)?;
        let micros = i64::from_be_bytes(raw[3..11].try_into().ok()?);
        let id_len = u16::from_be_bytes(raw[11..13].try_into().ok()?) as usize;
        let id_end = HEADER_LEN.checked_add(id_len)?;
        let id = std::str::from_utf8(raw.get(HEADER_LEN..id_end)?)
            .ok()?
            .to_string();
        Some(Entry {
            key,
            kind,
            id,
            enqueued_at: Timestamp::from_microsecond(micros).ok()?,
            raw,
            payload_at: id_end,
        })
    }
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
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(SEEN_PREFIX);
    k.extend_from_slice(id.as_bytes());
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

/// Whether a seen record says the event is still held.
fn seen_is_held(value: &[u8]) -> bool {
    value.len() >= 8 + 10
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

/// Durable queue of events for central.
pub struct Outbox {
    tree: Tree,
    clock: SharedClock,
    max_bytes: u64,
    limits: Limits,
    state: Mutex<State>,
    changed: Notify,
    /// Entries a sender has taken and not yet acknowledged or released; no other sender sees
    /// them, so the MQTT and HTTPS paths never carry the same entry at once.
    claimed: Mutex<HashSet<EntryKey>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Outbox {
    /// Opens the outbox and counts what it holds from a previous run.
    pub fn open(store: &Store, limits: Limits, clock: SharedClock) -> Result<Outbox, StoreError> {
        let tree = store.tree(TreeName::Outbox)?;
        let mut state = State {
            next_seq: 1,
            streams: [StreamCounts::default(); STREAM_COUNT],
            seen: 0,
        };
        for item in tree.scan_prefix([SEEN_BY_TIME_PREFIX]) {
            item?;
            state.seen += 1;
        }
        let mut unreadable = Vec::new();
        for item in tree.scan_prefix([ENTRY_PREFIX]) {
            let (k, v) = item?;
            match EntryKey::from_bytes(&k).and_then(|key| Entry::decode(key, v)) {
                Some(entry) => {
                    let s = &mut state.streams[entry.stream() as usize];
                    s.depth += 1;
                    s.bytes += entry.size();
                    state.next_seq = state.next_seq.max(entry.key.seq() + 1);
                }
                None => unreadable.push(k),
            }
        }
        if !unreadable.is_empty() {
            // Only a bug or disk corruption gets here; such entries can never be sent.
            tracing::error!(
                count = unreadable.len(),
                "outbox holds unreadable entries; removing them"
            );
            let mut batch = Batch::default();
            for k in unreadable {
                batch.remove(k);
            }
            tree.apply(batch)?;
        }
        let outbox = Outbox {
            tree,
            clock,
            max_bytes: limits.max_bytes,
            limits,
            state: Mutex::new(state),
            changed: Notify::new(),
            claimed: Mutex::default(),
        };
        for stream in Stream::ALL {
            outbox.publish_metrics(stream, &state);
        }
        Ok(outbox)
    }

    /// Appends events atomically, skipping ids already held and applying the size cap.
    /// Nothing is durable until the caller flushes the store.
    pub fn append(&self, events: &[NewEvent]) -> Result<Vec<AppendOutcome>, StoreError> {
        let now = self.clock.now();
        let mut state = self.state.lock().expect("outbox lock");
        let mut next = *state;
        let mut total = next.total_bytes();
        let mut batch = Batch::default();
        let mut in_batch: HashSet<&str> = HashSet::with_capacity(events.len());
        let mut outcomes = Vec::with_capacity(events.len());
        let mut victims = Victims::default();
        let mut refused: HashMap<Stream, u64> = HashMap::new();

        for event in events {
            let stream = Stream::of(event.kind);
            if in_batch.contains(event.id.as_str()) || self.tree.contains(seen_key(&event.id))? {
                outcomes.push(AppendOutcome::Duplicate);
                continue;
            }
            let size = new_event_size(event);
            // An event bigger than the whole outbox must not cost anyone else their place.
            let fits_at_all = size <= self.max_bytes;
            while fits_at_all && total + size > self.max_bytes {
                let Some(victim) = victims.next_oldest(&self.tree, stream, &next)? else {
                    break;
                };
                // A dropped event stays "seen": the drop was the decision about it.
                batch.remove(victim.key.0);
                batch.insert(seen_key(&victim.id), seen_value(victim.enqueued_at, None));
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
            batch.insert(key.0, encode_entry(event, stream, now));
            batch.insert(seen_key(&event.id), seen_value(now, Some(&key)));
            batch.insert(seen_by_time_key(now, event.id.as_bytes()), []);
            next.seen += 1;
            let counts = &mut next.streams[stream as usize];
            counts.depth += 1;
            counts.bytes += size;
            total += size;
            in_batch.insert(&event.id);
            outcomes.push(AppendOutcome::Stored);
        }

        let stored = outcomes
            .iter()
            .filter(|o| **o == AppendOutcome::Stored)
            .count();
        self.forget_old_ids(&mut batch, &mut next, now, 2 * stored + 16)?;
        if !batch.is_empty() {
            self.tree.apply(batch)?;
        }
        for stream in Stream::ALL {
            let dropped =
                next.streams[stream as usize].dropped - state.streams[stream as usize].dropped;
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
        *state = next;
        for stream in Stream::ALL {
            self.publish_metrics(stream, &next);
        }
        Ok(outcomes)
    }

    /// Adds to `batch` the removal of up to `budget` remembered ids that are past the retention
    /// period or over the cap, oldest first. Bounded, so an append never stalls on a backlog of
    /// expiry; the budget outruns the rate of new ids, so the set converges.
    fn forget_old_ids(
        &self,
        batch: &mut Batch,
        state: &mut State,
        now: Timestamp,
        budget: usize,
    ) -> Result<(), StoreError> {
        let cutoff = now
            .checked_sub(
                jiff::SignedDuration::try_from(self.limits.seen_retention)
                    .unwrap_or(jiff::SignedDuration::MAX),
            )
            .unwrap_or(Timestamp::MIN);
        let mut forgotten = 0;
        for item in self.tree.scan_prefix([SEEN_BY_TIME_PREFIX]) {
            if forgotten >= budget {
                break;
            }
            let (key, _) = item?;
            let Some((at, id)) = parse_seen_by_time(&key) else {
                batch.remove(key);
                continue;
            };
            if at >= cutoff && state.seen <= self.limits.max_seen {
                break;
            }
            let mut sk = Vec::with_capacity(1 + id.len());
            sk.push(SEEN_PREFIX);
            sk.extend_from_slice(id);
            batch.remove(&key);
            forgotten += 1;
            if self.tree.get(&sk)?.is_some_and(|v| seen_is_held(&v)) {
                // Still waiting for central (a long outage): never forget it, look again later.
                batch.insert(seen_by_time_key(now, id), []);
                continue;
            }
            batch.remove(sk);
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
        for item in self.tree.scan_prefix([ENTRY_PREFIX]) {
            let (k, v) = item?;
            let Some(key) = EntryKey::from_bytes(&k) else {
                continue;
            };
            if skip(&key) {
                continue;
            }
            if let Some(entry) = Entry::decode(key, v) {
                out.push(entry);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Removes an entry that central acknowledged. Returns false when it was already gone
    /// (acknowledged twice, or dropped by the size cap while in flight).
    pub fn ack(&self, key: &EntryKey) -> Result<bool, StoreError> {
        let removed = self.remove_acked(key);
        // The claim goes only after the entry has left the tree: dropped first, a concurrent
        // claim by the other path could take the acknowledged entry and send it a second time.
        self.claimed.lock().expect("claims lock").remove(key);
        let acked = removed?;
        if acked {
            self.changed.notify_one();
        }
        Ok(acked)
    }

    fn remove_acked(&self, key: &EntryKey) -> Result<bool, StoreError> {
        let mut state = self.state.lock().expect("outbox lock");
        let Some(raw) = self.tree.get(key.0)? else {
            return Ok(false);
        };
        let Some(entry) = Entry::decode(*key, raw) else {
            self.tree.remove(key.0)?;
            return Ok(false);
        };
        let mut batch = Batch::default();
        batch.remove(key.0);
        batch.insert(seen_key(&entry.id), seen_value(entry.enqueued_at, None));
        self.tree.apply(batch)?;
        let counts = &mut state.streams[entry.stream() as usize];
        counts.depth = counts.depth.saturating_sub(1);
        counts.bytes = counts.bytes.saturating_sub(entry.size());
        metrics::counter!("storelink_outbox_acked_total", "stream" => entry.stream().name())
            .increment(1);
        let snapshot = *state;
        drop(state);
        self.publish_metrics(entry.stream(), &snapshot);
        Ok(true)
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
        let now = self.clock.now();
        let mut claimed = self.claimed.lock().expect("claims lock");
        let mut out = Vec::new();
        let mut expired = 0usize;
        let mut bytes = 0usize;
        let mut room = |entry: &Entry, out: &Vec<Entry>| {
            let fits = out.is_empty() || bytes + entry.payload().len() <= max_bytes;
            if fits {
                bytes += entry.payload().len();
            }
            fits
        };
        if limit == 0 {
            return Ok(out);
        }
        match take {
            Take::Front => {
                for item in self.tree.scan_prefix([ENTRY_PREFIX]) {
                    let (k, v) = item?;
                    let Some(key) = EntryKey::from_bytes(&k) else {
                        continue;
                    };
                    if claimed.contains(&key) {
                        continue;
                    }
                    let Some(entry) = Entry::decode(key, v) else {
                        continue;
                    };
                    if self.is_expired(&entry, now) {
                        expired += 1;
                        continue;
                    }
                    if !room(&entry, &out) {
                        break;
                    }
                    out.push(entry);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Take::Live { since } => {
                'streams: for stream in Stream::ALL {
                    // Newest first until the first older entry, then oldest first.
                    let mut live = Vec::new();
                    for item in self.tree.scan_prefix([ENTRY_PREFIX, stream as u8]).rev() {
                        let (k, v) = item?;
                        let Some(entry) =
                            EntryKey::from_bytes(&k).and_then(|key| Entry::decode(key, v))
                        else {
                            continue;
                        };
                        if entry.enqueued_at < since {
                            break;
                        }
                        if !claimed.contains(&entry.key) {
                            live.push(entry);
                        }
                    }
                    for entry in live.into_iter().rev() {
                        if out.len() >= limit || !room(&entry, &out) {
                            break 'streams;
                        }
                        out.push(entry);
                    }
                }
            }
        }
        claimed.extend(out.iter().map(|e| e.key));
        drop(claimed);
        // Skipped expired entries sit at the front of their stream; remove them now rather
        // than walk over them on every claim until the periodic sweep.
        if expired > 0 {
            self.expire()?;
        }
        Ok(out)
    }

    /// Hands claimed entries back, unsent, for any sender to take again.
    pub fn release<'a>(&self, keys: impl IntoIterator<Item = &'a EntryKey>) {
        let mut claimed = self.claimed.lock().expect("claims lock");
        for key in keys {
            claimed.remove(key);
        }
        drop(claimed);
        self.changed.notify_one();
    }

    /// Entries currently taken by a sender.
    pub fn claimed(&self) -> usize {
        self.claimed.lock().expect("claims lock").len()
    }

    fn is_expired(&self, entry: &Entry, now: Timestamp) -> bool {
        self.limits.ttl[entry.stream() as usize]
            .is_some_and(|ttl| now.duration_since(entry.enqueued_at).unsigned_abs() > ttl)
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
            let mut batch = Batch::default();
            let mut gone = Vec::new();
            for item in self.tree.scan_prefix([ENTRY_PREFIX, stream as u8]) {
                let (k, v) = item?;
                let Some(entry) = EntryKey::from_bytes(&k).and_then(|key| Entry::decode(key, v))
                else {
                    continue;
                };
                // Oldest first: the first one still fresh ends the scan.
                if !self.is_expired(&entry, now) {
                    break;
                }
                batch.remove(entry.key.0);
                batch.insert(seen_key(&entry.id), seen_value(entry.enqueued_at, None));
                gone.push(entry);
                if gone.len() >= 10_000 {
                    break;
                }
            }
            if gone.is_empty() {
                continue;
            }
            let mut state = self.state.lock().expect("outbox lock");
            self.tree.apply(batch)?;
            let counts = &mut state.streams[stream as usize];
            for entry in &gone {
                counts.depth = counts.depth.saturating_sub(1);
                counts.bytes = counts.bytes.saturating_sub(entry.size());
                counts.expired += 1;
            }
            let snapshot = *state;
            drop(state);
            self.publish_metrics(stream, &snapshot);
            metrics::counter!("storelink_outbox_expired_total", "stream" => stream.name())
                .increment(gone.len() as u64);
            tracing::warn!(
                stream = stream.name(),
                expired = gone.len(),
                ttl_s = self.limits.ttl[stream as usize].map(|d| d.as_secs()),
                "removed undelivered events older than the stream's TTL"
            );
            removed += gone.len() as u64;
        }
        self.stats()?;
        Ok(removed)
    }

    /// When the oldest held event was enqueued, over all streams.
    pub fn oldest_enqueued(&self) -> Result<Option<Timestamp>, StoreError> {
        let mut oldest: Option<Timestamp> = None;
        for stream in Stream::ALL {
            if self.state.lock().expect("outbox lock").streams[stream as usize].depth == 0 {
                continue;
            }
            for item in self.tree.scan_prefix([ENTRY_PREFIX, stream as u8]) {
                let (k, v) = item?;
                if let Some(entry) = EntryKey::from_bytes(&k).and_then(|key| Entry::decode(key, v))
                {
                    oldest = Some(oldest.map_or(entry.enqueued_at, |o| o.min(entry.enqueued_at)));
                    break;
                }
            }
        }
        Ok(oldest)
    }

    /// Whether an event id is currently held.
    pub fn contains(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .tree
            .get(seen_key(id))?
            .is_some_and(|v| seen_is_held(&v)))
    }

    pub fn depth(&self) -> u64 {
        let state = self.state.lock().expect("outbox lock");
        state.streams.iter().map(|s| s.depth).sum()
    }

    /// Age of the oldest entry of `stream`, by the injectable clock.
    pub fn oldest_age(&self, stream: Stream) -> Result<Option<std::time::Duration>, StoreError> {
        let now = self.clock.now();
        for item in self.tree.scan_prefix([ENTRY_PREFIX, stream as u8]) {
            let (k, v) = item?;
            if let Some(entry) = EntryKey::from_bytes(&k).and_then(|key| Entry::decode(key, v)) {
                let age = now.duration_since(entry.enqueued_at);
                return Ok(Some(age.unsigned_abs()));
            }
        }
        Ok(None)
    }

    pub fn stats(&self) -> Result<OutboxStats, StoreError> {
        let state = *self.state.lock().expect("outbox lock");
        let mut streams = Vec::with_capacity(STREAM_COUNT);
        for stream in Stream::ALL {
            let oldest = self.oldest_age(stream)?;
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
        tree: &Tree,
        incoming: Stream,
        state: &State,
    ) -> Result<Option<Entry>, StoreError> {
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
                None => vec![ENTRY_PREFIX, stream as u8],
            };
            let end = [ENTRY_PREFIX, stream as u8 + 1];
            for item in tree.range(start.as_slice()..&end[..]) {
                let (k, v) = item?;
                if let Some(entry) = EntryKey::from_bytes(&k).and_then(|key| Entry::decode(key, v))
                {
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
