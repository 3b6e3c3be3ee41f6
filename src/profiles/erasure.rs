//! Customer erasure (GDPR art. 17), from either path central uses: the MQTT `…/erasures`
//! topic or the HTTPS sync's `erased` list.
//!
//! Invariants:
//! - One request removes the profile, presence key, card index entries, KPIs and ledger (one
//!   atomic batch in the profiles tree), and leaves a tombstone so a stale upsert cannot bring
//!   them back. Every other keeper registered with the eraser ([`CustomerRecords`]) does its
//!   share, by the customer's id and card numbers: presence history, offer history, trigger
//!   memory, and what is still held for central (transactions lose the loyalty id; presence,
//!   offer, prompt, customer and trigger events are dropped; dead letters that mention the
//!   customer are removed).
//! - The acknowledgement (`storelink.erasure.v1`) is queued only after the caller flushed the
//!   erasure to disk, so central never hears "erased" about something a crash could undo.
//! - The acknowledgement does not carry the customer id: it echoes central's `request_id`
//!   and names the customer by `customer_ref`, the SHA-256 of the id in hex, which central
//!   computes from the ids it asked about. The store's outbox therefore does not hold the
//!   erased id at rest.
//! - Its CloudEvent id is stable per (store, customer, version): a repeated request is
//!   acknowledged once; central de-duplicates on the id as for every event.

use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ProfileStore;
use crate::clock::SharedClock;
use crate::events::{self, EventKind};
use crate::model::customer::CustomerRecords;
use crate::model::ingest::{IngestHandle, NewEvent};
use crate::store::StoreError;

/// One erasure request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    pub customer_id: String,
    /// The profile version central erased at; later upserts at or below it are refused.
    #[serde(default)]
    pub version: u64,
    /// Central's reference for the request, echoed in the acknowledgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The `data` of `storelink.erasure.v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErasureAck {
    pub store: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// SHA-256 of the customer id, lowercase hex.
    pub customer_ref: String,
    /// The tombstone's version.
    pub version: u64,
    pub erased_at: Timestamp,
    /// What was removed: profile records (profile, presence key, KPIs, cards) and ledger
    /// entries; then each keeper's counts (`presence_records`, `offer_records`,
    /// `trigger_records`, `outbox_redacted`, `outbox_dropped`, `dead_letters`). All zero
    /// when the store never knew the customer.
    pub profile_records: u64,
    pub ledger_entries: u64,
    #[serde(flatten)]
    pub records: std::collections::BTreeMap<&'static str, u64>,
}

/// The SHA-256 of a customer id, as acknowledgements name the customer.
pub fn customer_ref(customer_id: &str) -> String {
    crate::model::customer::hex(&Sha256::digest(customer_id.as_bytes()))
}

/// Carries out erasures and acknowledges them to central.
#[derive(Clone)]
pub struct Eraser {
    pub profiles: ProfileStore,
    /// Every other keeper of customer-linked records (presence and offer history, trigger
    /// memory, the outbox and dead letters).
    pub records: Vec<Arc<dyn CustomerRecords>>,
    pub store_id: String,
    pub clock: SharedClock,
    /// Where acknowledgements go; `None` in tools that only clean up.
    pub ingest: Option<IngestHandle>,
}

impl Eraser {
    /// Erases one customer everywhere the agent keeps them. Not durable until the store
    /// flushes; acknowledge only after that.
    pub fn erase(&self, request: &Erasure) -> Result<ErasureAck, StoreError> {
        tracing::debug!(customer = %request.customer_id, "erasing customer");
        // The cards go with the profile; what else names the customer may name them by card.
        let mut ids = vec![request.customer_id.clone()];
        if let Some(p) = self.profiles.get(&request.customer_id)? {
            ids.extend(p.cards.into_iter().filter(|c| !c.is_empty()));
        }
        let erased = self.profiles.erase(&request.customer_id, request.version)?;
        let mut records = std::collections::BTreeMap::new();
        for keeper in &self.records {
            for (name, n) in keeper.erase_customer(&ids)? {
                *records.entry(name).or_insert(0) += n;
            }
        }
        metrics::counter!("storelink_erasures_total").increment(1);
        Ok(ErasureAck {
            store: self.store_id.clone(),
            request_id: request.request_id.clone(),
            customer_ref: customer_ref(&request.customer_id),
            version: erased.version,
            erased_at: self.clock.now(),
            profile_records: erased.records,
            ledger_entries: erased.ledger_entries,
            records,
        })
    }

    /// Queues the acknowledgements of erasures that are on disk.
    pub async fn acknowledge(&self, acks: Vec<ErasureAck>) {
        let Some(ingest) = &self.ingest else { return };
        for ack in acks {
            let id = format!(
                "erasure:{}:{}:{}",
                self.store_id,
                &ack.customer_ref[..32],
                ack.version
            );
            let payload =
                events::encode(EventKind::Erasure, &id, &self.store_id, ack.erased_at, &ack);
            let event = NewEvent {
                kind: EventKind::Erasure,
                id,
                payload,
            };
            if ingest.event(event).await.is_err() {
                tracing::warn!(
                    "agent stopping: an erasure acknowledgement was not queued; central will ask again"
                );
                return;
            }
        }
    }
}
