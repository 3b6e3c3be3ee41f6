//! Dead letters: input the agent could not use, kept with its raw bytes and the reason.
//!
//! Invariants:
//! - Every rejected frame is kept locally (the log's `deadletters` table) and also goes to central as a
//!   `storelink.deadletter.v1` event, so nothing disappears silently.
//! - The local store is capped in bytes; the oldest records go first, and that is counted.
//! - Raw bytes are never logged; only their length and the reason are.

use std::sync::Mutex;

use base64::Engine as _;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::store::{Commit, LogTable, LogWrite, Store, StoreError};

/// One rejected frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// CloudEvent id of the matching `storelink.deadletter.v1` event.
    pub id: String,
    /// What produced the bytes: `register:lane-3`, `scanner:entrance`, …
    pub source: String,
    pub reason: String,
    pub received_at: Timestamp,
    /// Length of the frame as received; `raw` may hold less when it was oversized.
    pub raw_len: u64,
    pub truncated: bool,
    #[serde(with = "base64_bytes")]
    pub raw: Vec<u8>,
}

impl DeadLetter {
    /// `raw` beyond `keep` bytes is cut, and the record says so.
    pub fn new(
        store: &str,
        source: impl Into<String>,
        reason: impl Into<String>,
        received_at: Timestamp,
        mut raw: Vec<u8>,
        raw_len: u64,
        keep: usize,
    ) -> DeadLetter {
        let truncated = raw.len() > keep || raw_len > raw.len() as u64;
        raw.truncate(keep);
        DeadLetter {
            id: format!(
                "dl:{store}:{}:{:016x}",
                received_at.as_microsecond(),
                rand::random::<u64>()
            ),
            source: source.into(),
            reason: reason.into(),
            received_at,
            raw_len,
            truncated,
            raw,
        }
    }
}

impl DeadLetter {
    /// Whether its raw bytes or its reason hold any of `needles` (an erased customer's id or
    /// one of their cards).
    pub fn mentions(&self, needles: &[String]) -> bool {
        let hit = |hay: &[u8]| {
            needles
                .iter()
                .map(|n| n.as_bytes())
                .filter(|n| !n.is_empty())
                .any(|n| hay.windows(n.len()).any(|w| w == n))
        };
        hit(&self.raw) || hit(self.reason.as_bytes())
    }
}

pub(crate) mod base64_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(raw: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(raw))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// The local dead-letter store, in the log's `deadletters` table.
pub struct DeadLetters {
    store: Store,
    max_bytes: u64,
    state: Mutex<DlState>,
}

#[derive(Debug, Clone, Copy)]
struct DlState {
    next_seq: u64,
    bytes: u64,
    count: u64,
    evicted: u64,
}

impl DeadLetters {
    pub fn open(store: &Store, max_bytes: u64) -> Result<DeadLetters, StoreError> {
        let view = store.view(LogTable::DeadLetters)?;
        let (mut bytes, mut count) = (0, 0);
        let mut next_seq = 1;
        for item in view.iter()? {
            let item = item?;
            bytes += (item.key().len() + item.value().len()) as u64;
            count += 1;
            if let Some(seq) = seq_of(item.key()) {
                next_seq = next_seq.max(seq + 1);
            }
        }
        Ok(DeadLetters {
            store: store.clone(),
            max_bytes,
            state: Mutex::new(DlState {
                next_seq,
                bytes,
                count,
                evicted: 0,
            }),
        })
    }

    /// Stores records in a transaction of their own, committed lazily: not durable until the
    /// store is flushed.
    pub fn record(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        self.store
            .write(Commit::Lazy, |w| self.record_in(w, letters))
    }

    /// Stores records within the caller's transaction, evicting the oldest to stay under the
    /// cap.
    pub fn record_in<'h>(
        &'h self,
        w: &mut LogWrite<'_, 'h>,
        letters: &[DeadLetter],
    ) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut next = *self.state.lock().expect("dead-letter lock");
        let table = w.table(LogTable::DeadLetters)?;
        for letter in letters {
            let value = serde_json::to_vec(letter).expect("dead letter serialises");
            next.bytes += 8 + value.len() as u64;
            next.count += 1;
            table.insert(&next.next_seq.to_be_bytes(), &value)?;
            next.next_seq += 1;
        }
        let mut evicted = 0u64;
        if next.bytes > self.max_bytes {
            let mut oldest = Vec::new();
            let mut bytes = next.bytes;
            for item in table.iter_all()? {
                if bytes <= self.max_bytes {
                    break;
                }
                let item = item?;
                bytes = bytes.saturating_sub((item.key().len() + item.value().len()) as u64);
                oldest.push(item.key().to_vec());
            }
            for k in &oldest {
                table.remove(k)?;
            }
            evicted = oldest.len() as u64;
            next.bytes = bytes;
            next.count -= evicted;
            next.evicted += evicted;
        }
        let recorded = letters.len() as u64;
        w.after_commit(move || {
            *self.state.lock().expect("dead-letter lock") = next;
            metrics::counter!("storelink_deadletters_total").increment(recorded);
            if evicted > 0 {
                metrics::counter!("storelink_deadletters_evicted_total").increment(evicted);
                tracing::warn!(
                    evicted,
                    max_bytes = self.max_bytes,
                    "dead-letter store full: removed the oldest local records (central has its copy)"
                );
            }
        });
        Ok(())
    }

    /// The most recent records, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let view = self.store.view(LogTable::DeadLetters)?;
        let mut out = Vec::new();
        for item in view.iter()?.rev().take(limit) {
            let item = item?;
            if let Ok(letter) = serde_json::from_slice(item.value()) {
                out.push(letter);
            }
        }
        Ok(out)
    }

    /// Removes the records that mention any of `needles` in their raw bytes or reason (an
    /// erased customer's id or card); returns how many. Committed durably: an erasure is
    /// acknowledged only after it.
    pub fn erase_mentioning(&self, needles: &[String]) -> Result<usize, StoreError> {
        self.remove_where(Commit::Durable, |letter| letter.mentions(needles))
    }

    /// Removes the records received before `before` (retention); returns how many.
    pub fn prune(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.remove_where(Commit::Lazy, |letter| letter.received_at < before)
    }

    fn remove_where(
        &self,
        commit: Commit,
        doomed: impl Fn(&DeadLetter) -> bool,
    ) -> Result<usize, StoreError> {
        let view = self.store.view(LogTable::DeadLetters)?;
        let mut gone: Vec<(Vec<u8>, u64)> = Vec::new();
        for item in view.iter()? {
            let item = item?;
            if serde_json::from_slice::<DeadLetter>(item.value()).is_ok_and(|l| doomed(&l)) {
                gone.push((item.key().to_vec(), 8 + item.value().len() as u64));
            }
        }
        drop(view);
        if gone.is_empty() {
            return Ok(0);
        }
        self.store.write(commit, |w| {
            let table = w.table(LogTable::DeadLetters)?;
            let mut freed = (0u64, 0u64);
            for (k, size) in &gone {
                if table.remove(k)? {
                    freed.0 += 1;
                    freed.1 += size;
                }
            }
            w.after_commit(move || {
                let mut state = self.state.lock().expect("dead-letter lock");
                state.count = state.count.saturating_sub(freed.0);
                state.bytes = state.bytes.saturating_sub(freed.1);
            });
            Ok(freed.0 as usize)
        })
    }

    pub fn len(&self) -> usize {
        self.state.lock().expect("dead-letter lock").count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn letter(raw: &[u8]) -> DeadLetter {
        DeadLetter::new(
            "s1",
            "register:r1",
            "not JSON",
            "2026-11-22T10:00:00Z".parse().unwrap(),
            raw.to_vec(),
            raw.len() as u64,
            1024,
        )
    }

    #[test]
    fn keeps_raw_bytes_and_evicts_oldest_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let dls = DeadLetters::open(&store, 2_000).unwrap();
        dls.record(&[letter(b"\x00\xffgarbage")]).unwrap();
        let got = dls.recent(10).unwrap();
        assert_eq!(got[0].raw, b"\x00\xffgarbage");
        assert_eq!(got[0].reason, "not JSON");
        for i in 0..40u8 {
            dls.record(&[letter(&[i; 64])]).unwrap();
        }
        assert!(dls.len() < 41, "older records were evicted");
        assert_eq!(dls.recent(1).unwrap()[0].raw, vec![39u8; 64], "newest kept");
        drop(dls);
        let reopened = DeadLetters::open(&store, 2_000).unwrap();
        reopened.record(&[letter(b"after")]).unwrap();
        assert_eq!(reopened.recent(1).unwrap()[0].raw, b"after");
    }

    #[test]
    fn an_erasure_removes_the_letters_that_mention_the_customer_and_retention_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let dls = DeadLetters::open(&store, 1 << 20).unwrap();
        dls.record(&[
            letter(br#"{"loyalty_id":"9990001","total":"12,50"}"#),
            letter(b"\x02nothing personal\x03"),
        ])
        .unwrap();
        assert_eq!(
            dls.erase_mentioning(&["c77".into(), "9990001".into()])
                .unwrap(),
            1
        );
        assert_eq!(dls.len(), 1);
        assert_eq!(dls.recent(10).unwrap()[0].raw, b"\x02nothing personal\x03");
        assert_eq!(
            dls.prune("2026-11-22T10:00:01Z".parse().unwrap()).unwrap(),
            1
        );
        assert!(dls.is_empty());
        assert!(DeadLetters::open(&store, 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn truncation_is_recorded() {
        let dl = DeadLetter::new(
            "s1",
            "x",
            "too long",
            Timestamp::UNIX_EPOCH,
            vec![1; 100],
            5000,
            10,
        );
        assert_eq!(dl.raw.len(), 10);
        assert!(dl.truncated);
        assert_eq!(dl.raw_len, 5000);
        let json = serde_json::to_string(&dl).unwrap();
        let back: DeadLetter = serde_json::from_str(&json).unwrap();
        assert_eq!(back, dl);
    }
}
