//! Applies what central sends down over MQTT: profile upserts on `…/{store}/profiles` and
//! erasure requests on `…/erasures`. Campaign sets are handed to the offers service through
//! the `campaigns` callback, so this module does not depend on it.
//!
//! Invariants:
//! - An upsert goes through [`ProfileStore::upsert`], so a stale one loses and one for an
//!   erased customer (at or below the tombstone) is refused.
//! - An erasure removes the profile, its KPIs and ledger, and its presence history together
//!   (see [`super::erasure`]), and is durable (flushed) before it is acknowledged to central.
//! - Customer ids are logged at debug level only.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

pub use super::erasure::Erasure;
use super::erasure::{Eraser, ErasureAck};
use super::{Profile, Upserted};
use crate::model::downlink::Downlink;
use crate::store::{Store, StoreError};
use crate::supervisor::Component;

/// A message body: one item or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

fn items<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<Vec<T>, serde_json::Error> {
    Ok(match serde_json::from_slice(bytes)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(t) => vec![t],
    })
}

/// What one message did.
#[derive(Debug, Default)]
pub struct Applied {
    pub upserts: usize,
    /// Erasures carried out, to acknowledge once they are flushed.
    pub erasures: Vec<ErasureAck>,
}

/// Applies one message.
pub fn apply(message: &Downlink, eraser: &Eraser) -> Result<Applied, DownlinkError> {
    let mut applied = Applied::default();
    match message {
        Downlink::Profiles(bytes) => {
            let page = items::<Profile>(bytes).map_err(DownlinkError::Malformed)?;
            for p in &page {
                tracing::debug!(customer = %p.customer_id, version = p.version, "profile upsert from central");
            }
            applied.upserts = count_applied(&eraser.profiles.upsert_many(page, &[])?);
        }
        Downlink::Erasures(bytes) => {
            for e in items::<Erasure>(bytes).map_err(DownlinkError::Malformed)? {
                applied.erasures.push(eraser.erase(&e)?);
            }
        }
        Downlink::Campaigns { .. } => {}
    }
    Ok(applied)
}

/// Counts the applied upserts and the refused ones (stale, erased, invalid) in metrics.
pub fn count_applied(outcomes: &[Upserted]) -> usize {
    let applied = outcomes.iter().filter(|o| **o == Upserted::Applied).count();
    let refused = outcomes.len() - applied;
    if refused > 0 {
        metrics::counter!("storelink_profile_upserts_refused_total").increment(refused as u64);
    }
    metrics::counter!("storelink_profile_upserts_total").increment(applied as u64);
    applied
}

#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error("not a profile or erasure message: {0}")]
    Malformed(serde_json::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs until cancelled: applies each message and flushes after erasures, so an erasure is on
/// disk before the next message. Malformed messages are logged (without their content) and
/// skipped.
pub async fn run(
    rx: Arc<Mutex<mpsc::Receiver<Downlink>>>,
    store: Store,
    eraser: Eraser,
    campaigns: impl Fn(bool, &[u8]),
    component: Component,
    token: CancellationToken,
) -> Result<(), StoreError> {
    let mut rx = rx.lock().await;
    component.running(Some("waiting for central".into()));
    loop {
        let message = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return Ok(()),
            },
            _ = token.cancelled() => return Ok(()),
        };
        if let Downlink::Campaigns { tenant_wide, body } = &message {
            campaigns(*tenant_wide, body);
            continue;
        }
        match apply(&message, &eraser) {
            Ok(applied) => {
                let erasures = applied.erasures.len();
                if erasures > 0 {
                    store.flush().await?;
                    eraser.acknowledge(applied.erasures).await;
                }
                component.success();
                tracing::info!(
                    upserts = applied.upserts,
                    erasures,
                    "applied central's message"
                );
            }
            Err(DownlinkError::Malformed(e)) => {
                metrics::counter!("storelink_downlink_malformed_total").increment(1);
                // serde's message can quote values (names, ids); say only where and what kind.
                tracing::warn!(
                    category = ?e.classify(),
                    line = e.line(),
                    column = e.column(),
                    "ignored a malformed message from central"
                );
            }
            Err(DownlinkError::Store(e)) => return Err(e),
        }
    }
}
