//! Delta sync of profiles from central's HTTPS API:
//! `GET {base_url}/v1/stores/{store}/profiles?cursor=…&limit=…`.
//!
//! A page is JSON: `{"profiles": [Profile…], "erased": [Erasure…], "next_cursor": "…",
//! "has_more": bool, "model": ModelParams?}`, gzip when the server likes. The first sync has no
//! cursor and is the full load; each later one asks from the last cursor. When the agent is
//! caught up it sends `If-None-Match` with the ETag of the last page it got for that cursor, so
//! central can answer 304 without building a page.
//!
//! Invariants:
//! - A page's profiles, its model parameters and the cursor that follows it are written in one
//!   atomic sled batch. Killed mid-page (mid-download or mid-write), the agent still holds the
//!   previous cursor and fetches the same page again; re-applying it changes nothing, because
//!   upserts are versioned and erasures idempotent.
//! - Erasures in a page are applied before its profiles, so an erasure and a newer
//!   re-registration in one page end with the re-registration, and a stale profile loses to
//!   the tombstone whatever the order in the page.
//! - Erasures are flushed before they are acknowledged.
//! - Neither the token nor profile contents reach the logs; errors name the URL and status.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::downlink::count_applied;
use super::erasure::{Eraser, Erasure};
use super::kpi::ModelParams;
use super::{MODEL_FACT, Profile};
use crate::config::Secret;
use crate::store::{Store, StoreError};
use crate::supervisor::{Backoff, Component};

/// The fact holding the sync position.
const STATE_FACT: &str = "sync";

/// Longest a request may take, the whole page included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the sync is, kept with the profiles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The cursor to ask from next; `None` before the first page of the full load.
    pub cursor: Option<String>,
    /// The ETag of the last answer for `cursor`, when the last page left it unchanged.
    pub etag: Option<String>,
    /// Whether the initial full load finished.
    pub loaded: bool,
    /// Pages and profiles applied since the agent first synced.
    pub pages: u64,
    pub profiles: u64,
}

/// One page from central.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub profiles: Vec<Profile>,
    #[serde(default)]
    pub erased: Vec<Erasure>,
    pub next_cursor: String,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelParams>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot read the CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("cannot build the HTTPS client: {0}")]
    Client(String),
    #[error("{url}: {message}")]
    Request { url: String, message: String },
    #[error("{url}: central answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        /// `Retry-After` in seconds, honoured by the backoff.
        retry_after: Option<Duration>,
    },
    #[error("{url}: {message}")]
    Malformed { url: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SyncError {
    /// How long to wait before the next attempt: the backoff's next delay, or central's
    /// `Retry-After` when that is longer (at most an hour).
    pub(crate) fn retry_delay(&self, backoff: &mut Backoff) -> Duration {
        let delay = backoff.next_delay();
        match self {
            SyncError::Status {
                retry_after: Some(after),
                ..
            } => delay.max(*after).min(Duration::from_secs(3600)),
            _ => delay,
        }
    }
}

pub(crate) use crate::tls::chain;

/// An HTTPS client for central: the shared TLS setup of `[central.https]` (CA file or system
/// roots, client certificate for mTLS).
pub fn client(files: &crate::tls::TlsFiles<'_>) -> Result<reqwest::Client, SyncError> {
    crate::tls::https_client(files, REQUEST_TIMEOUT).map_err(|e| match e.key {
        "ca_file" => SyncError::CaFile {
            path: files
                .ca_file
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            message: e.message,
        },
        _ => SyncError::Client(e.to_string()),
    })
}

/// Sends a conditional GET: `None` for 304, else the body and the ETag. A status that is not
/// a success is an error carrying `Retry-After`.
pub(crate) async fn conditional_get(
    request: reqwest::RequestBuilder,
    url: &str,
) -> Result<Option<(bytes::Bytes, Option<String>)>, SyncError> {
    let request_error = |e: reqwest::Error| SyncError::Request {
        url: url.to_string(),
        message: chain(&e),
    };
    let response = request.send().await.map_err(request_error)?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    if !status.is_success() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_secs);
        return Err(SyncError::Status {
            url: url.to_string(),
            status,
            retry_after,
        });
    }
    let etag = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.bytes().await.map_err(request_error)?;
    Ok(Some((body, etag)))
}

/// What one pass of [`Syncer::sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub pages: u64,
    pub upserts: u64,
    pub erasures: u64,
    /// Central answered 304: nothing new.
    pub not_modified: bool,
}

/// Pulls profiles from central.
#[derive(Clone)]
pub struct Syncer {
    pub client: reqwest::Client,
    /// `https://central.example/` (a trailing slash or not).
    pub base_url: String,
    pub store_id: String,
    pub token: Option<Secret>,
    pub page_size: u32,
    pub store: Store,
    pub eraser: Eraser,
}

impl Syncer {
    fn url(&self) -> String {
        format!(
            "{}/v1/stores/{}/profiles",
            self.base_url.trim_end_matches('/'),
            self.store_id
        )
    }

    /// The sync position as persisted.
    pub fn state(&self) -> Result<SyncState, StoreError> {
        Ok(self
            .eraser
            .profiles
            .fact(STATE_FACT)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    /// Fetches and applies pages until central has nothing more, calling `progress` after
    /// each page with the state so far.
    pub async fn sync(
        &self,
        token: &CancellationToken,
        mut progress: impl FnMut(&SyncState),
    ) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        loop {
            if token.is_cancelled() {
                return Ok(report);
            }
            let state = self.state()?;
            let Some((page, etag)) = self.fetch(&state).await? else {
                report.not_modified = true;
                return Ok(report);
            };
            let has_more = page.has_more;
            let (upserts, erasures) = self.apply(state, page, etag).await?;
            report.pages += 1;
            report.upserts += upserts;
            report.erasures += erasures;
            progress(&self.state()?);
            if !has_more {
                return Ok(report);
            }
        }
    }

    /// One page, or `None` for 304.
    async fn fetch(&self, state: &SyncState) -> Result<Option<(Page, Option<String>)>, SyncError> {
        let url = self.url();
        let mut request = self
            .client
            .get(&url)
            .query(&[("limit", self.page_size.to_string())]);
        if let Some(cursor) = &state.cursor {
            request = request.query(&[("cursor", cursor)]);
        }
        if let Some(etag) = &state.etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        if let Some(t) = &self.token {
            request = request.bearer_auth(t.expose());
        }
        let Some((body, etag)) = conditional_get(request, &url).await? else {
            return Ok(None);
        };
        let page: Page = serde_json::from_slice(&body).map_err(|e| SyncError::Malformed {
            url: url.clone(),
            // serde's message can quote values; say only where and what kind.
            message: format!(
                "not a profile page: {:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })?;
        Ok(Some((page, etag)))
    }

    /// Applies a page and moves the cursor past it; see the module invariants for the order.
    async fn apply(
        &self,
        mut state: SyncState,
        page: Page,
        etag: Option<String>,
    ) -> Result<(u64, u64), SyncError> {
        let mut acks = Vec::with_capacity(page.erased.len());
        for e in &page.erased {
            acks.push(self.eraser.erase(e)?);
        }
        let count = page.profiles.len() as u64;
        // The ETag is worth sending only while the cursor stays where it was (caught up).
        state.etag = etag.filter(|_| state.cursor.as_deref() == Some(&page.next_cursor));
        state.cursor = Some(page.next_cursor);
        state.pages += 1;
        state.profiles += count;
        if !page.has_more {
            state.loaded = true;
        }
        let mut facts = vec![(
            STATE_FACT,
            serde_json::to_vec(&state).expect("sync state serialises"),
        )];
        if let Some(model) = &page.model {
            facts.push((
                MODEL_FACT,
                serde_json::to_vec(model).expect("params serialise"),
            ));
        }
        let outcomes = self.eraser.profiles.upsert_many(page.profiles, &facts)?;
        let upserts = count_applied(&outcomes) as u64;
        self.store.flush().await?;
        let erasures = acks.len() as u64;
        self.eraser.acknowledge(acks).await;
        Ok((upserts, erasures))
    }
}

/// Runs until cancelled: syncs, then waits `interval`; on failure backs off (1 s doubling to
/// 5 min, with jitter) and says why in status. The initial full load logs its progress.
pub async fn run(
    syncer: Syncer,
    interval: Duration,
    component: Component,
    token: CancellationToken,
) -> Result<(), StoreError> {
    let failed = |e: &SyncError, delay: Duration| {
        metrics::counter!("storelink_profile_sync_failures_total").increment(1);
        tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "profile sync failed");
        component.degraded(format!("{e}; retrying in {}s", delay.as_secs()));
    };
    let round = || async {
        let initial = !syncer.state()?.loaded;
        if initial {
            component.running(Some("initial profile load".into()));
            tracing::info!(url = %syncer.url(), "initial profile load from central");
        }
        let started = Instant::now();
        let mut last_log = Instant::now();
        let report = syncer
            .sync(&token, |state| {
                if initial && last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    tracing::info!(
                        profiles = state.profiles,
                        pages = state.pages,
                        elapsed_s = started.elapsed().as_secs(),
                        "initial profile load in progress"
                    );
                }
            })
            .await?;
        let state = syncer.state()?;
        if initial && state.loaded {
            tracing::info!(
                profiles = state.profiles,
                pages = state.pages,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "initial profile load complete"
            );
        } else if report.pages > 0 {
            tracing::info!(
                pages = report.pages,
                upserts = report.upserts,
                erasures = report.erasures,
                "profile sync applied changes"
            );
        }
        metrics::counter!("storelink_profile_sync_pages_total").increment(report.pages);
        component.success();
        component.running(Some(format!(
            "caught up; {} profiles synced in {} pages",
            state.profiles, state.pages
        )));
        Ok(())
    };
    poll_until_cancelled(interval, &token, round, failed).await
}

/// The polling loop both syncs with central share (profiles here, campaigns in
/// `offers::sync`): runs `round`, then waits `interval` after a success or the backoff's delay
/// (or central's `Retry-After`) after a failure, which `failed` reports. Returns `Ok` once
/// the token is cancelled, and a storage error at once: that is the supervisor's to handle.
pub(crate) async fn poll_until_cancelled<R, Fut, F>(
    interval: Duration,
    token: &CancellationToken,
    mut round: R,
    mut failed: F,
) -> Result<(), StoreError>
where
    R: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), SyncError>>,
    F: FnMut(&SyncError, Duration),
{
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        let result = tokio::select! {
            r = round() => r,
            _ = token.cancelled() => return Ok(()),
        };
        let wait = match result {
            Ok(()) => {
                backoff.reset();
                interval
            }
            Err(SyncError::Store(e)) => return Err(e),
            Err(e) => {
                let delay = e.retry_delay(&mut backoff);
                failed(&e, delay);
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = token.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_lengthens_the_backoff_up_to_an_hour() {
        let status = |after: Option<u64>| SyncError::Status {
            url: "https://central/v1".into(),
            status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
            retry_after: after.map(Duration::from_secs),
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(
            status(Some(120)).retry_delay(&mut backoff),
            Duration::from_secs(120)
        );
        assert_eq!(
            status(Some(7200)).retry_delay(&mut backoff),
            Duration::from_secs(3600)
        );
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let plain = status(None).retry_delay(&mut backoff);
        assert!(plain <= Duration::from_secs(300), "{plain:?}");
        let request = SyncError::Request {
            url: "https://central/v1".into(),
            message: "connection refused".into(),
        };
        assert!(request.retry_delay(&mut backoff) <= Duration::from_secs(300));
    }
}
