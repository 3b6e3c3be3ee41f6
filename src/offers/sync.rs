//! Campaign sets from central's HTTPS API: `GET {base_url}/v1/stores/{store}/campaigns`, polled
//! with `If-None-Match` so an unchanged set costs central a 304.
//!
//! Invariants:
//! - The ETag is kept only once the set it belongs to is installed (or found stale), so a
//!   crash between the two fetches the set again rather than skipping it.
//! - A body that is not a campaign set changes nothing: the last good set stays in force.
//! - The token never reaches the logs.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::live::{Installed, Offers, OffersError, Slot};
use crate::config::Secret;
use crate::profiles::sync::{SyncError, conditional_get, poll_until_cancelled};
use crate::store::StoreError;
use crate::supervisor::Component;

const ETAG_FACT: &str = "campaigns.etag";

#[derive(Clone)]
pub struct CampaignSync {
    pub client: reqwest::Client,
    pub base_url: String,
    pub store_id: String,
    pub token: Option<Secret>,
    pub offers: Offers,
}

impl CampaignSync {
    pub fn url(&self) -> String {
        format!(
            "{}/v1/stores/{}/campaigns",
            self.base_url.trim_end_matches('/'),
            self.store_id
        )
    }

    /// One poll: `None` when central says nothing changed.
    pub async fn poll(&self) -> Result<Option<Installed>, SyncError> {
        let url = self.url();
        let ledger_etag = self
            .offers
            .fact(ETAG_FACT)?
            .and_then(|v| String::from_utf8(v).ok());
        let mut request = self.client.get(&url);
        if let Some(etag) = &ledger_etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        if let Some(t) = &self.token {
            request = request.bearer_auth(t.expose());
        }
        let Some((body, etag)) = conditional_get(request, &url).await? else {
            return Ok(None);
        };
        let installed = match self.offers.install(Slot::Store, &body) {
            Ok(i) => i,
            Err(OffersError::Malformed(e)) => {
                return Err(SyncError::Malformed {
                    url,
                    // serde's message can quote values; say only where and what kind.
                    message: format!(
                        "not a campaign set: {:?} error at line {} column {}",
                        e.classify(),
                        e.line(),
                        e.column()
                    ),
                });
            }
            Err(OffersError::Store(e)) => return Err(SyncError::Store(e)),
            Err(OffersError::BadRequest(m)) => {
                return Err(SyncError::Malformed { url, message: m });
            }
        };
        if let Some(etag) = etag {
            self.offers.set_fact(ETAG_FACT, etag.as_bytes())?;
        }
        Ok(Some(installed))
    }
}

/// Polls until cancelled; failures back off (honouring `Retry-After`) and leave the last good
/// set in force.
pub async fn run(
    sync: CampaignSync,
    interval: Duration,
    component: Component,
    token: CancellationToken,
) -> Result<(), StoreError> {
    let failed = |e: &SyncError, delay: Duration| {
        metrics::counter!("storelink_campaign_sync_failures_total").increment(1);
        tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "campaign sync failed; the last good set stays in force");
        component.degraded(format!("{e}; retrying in {}s", delay.as_secs()));
    };
    let round = || async {
        let outcome = sync.poll().await?;
        component.success();
        let live = sync.offers.campaigns();
        if let Some(Installed::Live { rejected, .. }) = &outcome
            && !rejected.is_empty()
        {
            component.degraded(format!(
                "campaign set {}: {} live, {} rejected (first: {})",
                live.version,
                live.live.len(),
                rejected.len(),
                rejected[0]
            ));
        } else {
            component.running(Some(format!(
                "campaign set {}: {} live",
                live.version,
                live.live.len()
            )));
        }
        Ok(())
    };
    poll_until_cancelled(interval, &token, round, failed).await
}
