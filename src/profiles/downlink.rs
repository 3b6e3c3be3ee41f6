//! Applies what central sends down over MQTT: profile upserts on `…/{store}/profiles` and
//! erasure requests on `…/erasures`.
//!
//! Invariants:
//! - An upsert goes through [`ProfileStore::upsert`], so a stale one loses and one for an
//!   erased customer (at or below the tombstone) is refused.
//! - An erasure removes the profile, its KPIs and ledger, and its presence history together,
//!   and is durable (flushed) before it is counted as done.
//! - Customer ids are logged at debug level only.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Profile, ProfileStore, Upserted};
use crate::presence::history::History;
use crate::store::{Store, StoreError};
use crate::supervisor::Component;
use crate::uplink::mqtt::Downlink;

/// One erasure request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Erasure {
    pub customer_id: String,
    /// The profile version central erased at; later upserts at or below it are refused.
    #[serde(default)]
    pub version: u64,
}

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

/// Applies one message. Returns how many items it applied.
pub fn apply(
    message: &Downlink,
    profiles: &ProfileStore,
    history: &History,
) -> Result<usize, DownlinkError> {
    match message {
        Downlink::Profiles(bytes) => {
            let mut applied = 0;
            for p in items::<Profile>(bytes).map_err(DownlinkError::Malformed)? {
                tracing::debug!(customer = %p.customer_id, version = p.version, "profile upsert from central");
                match profiles.upsert(p)? {
                    Upserted::Applied => applied += 1,
                    Upserted::Stale | Upserted::Erased => {
                        metrics::counter!("storelink_profile_upserts_refused_total").increment(1);
                    }
                }
            }
            Ok(applied)
        }
        Downlink::Erasures(bytes) => {
            let requests = items::<Erasure>(bytes).map_err(DownlinkError::Malformed)?;
            for e in &requests {
                tracing::debug!(customer = %e.customer_id, "erasure from central");
                profiles.erase(&e.customer_id, e.version)?;
                history.erase(&e.customer_id)?;
                metrics::counter!("storelink_erasures_total").increment(1);
            }
            Ok(requests.len())
        }
    }
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
    profiles: ProfileStore,
    history: History,
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
        match apply(&message, &profiles, &history) {
            Ok(n) => {
                if matches!(message, Downlink::Erasures(_)) {
                    store.flush().await?;
                }
                component.success();
                let kind = match message {
                    Downlink::Profiles(_) => "profiles",
                    Downlink::Erasures(_) => "erasures",
                };
                tracing::info!(applied = n, kind, "applied central's message");
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
