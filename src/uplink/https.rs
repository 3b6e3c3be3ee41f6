//! The HTTPS path: batches of held events to `POST {base}/v1/stores/{store}/events:batch`
//! (`application/cloudevents-batch+json`, gzip), for backfill after long outages and whenever
//! MQTT has been unreachable for a while.
//!
//! Policy (documented in docs/central.md): the path is on standby while MQTT keeps up. It takes
//! over the *oldest* events when the oldest held event is older than `backfill_after`, or when
//! MQTT has been down longer than `mqtt_down_after`; MQTT meanwhile carries live traffic
//! (see [`super::mqtt`]). Both paths claim what they send, so an event is never on both at once.
//!
//! Invariants:
//! - A batch leaves the outbox only on a 2xx. Its `Idempotency-Key` is derived from its ids, so
//!   a retry of the same batch carries the same key.
//! - Retryable answers (408, 425, 429, 5xx, network errors) release the batch and wait: the
//!   backoff with jitter, or `Retry-After` when central says longer (at most an hour).
//! - Central refusing the content (400, 415, 422, or 413 for a single event) moves the batch's
//!   events to the dead-letter store with the reason, and a `storelink.deadletter.v1` event
//!   tells central; nothing is dropped silently. 413 for several events halves the batch.
//! - Answers that say the path itself is wrong (401, 403, 404, …) never cost data: the events
//!   stay, the status says what to fix, and the path retries slowly.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::{Config, Secret, TlsSection};
use crate::deadletter::{DeadLetter, DeadLetters};
use crate::events::{self, EventKind};
use crate::model::ingest::NewEvent;
use crate::store::{Commit, Store, StoreError};
use crate::supervisor::{Backoff, Component};
use crate::uplink::PathState;
use crate::uplink::outbox::{Entry, Outbox, Stream, Take};

/// The batch content type of the CloudEvents JSON format.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the standby path looks at the backlog and the MQTT path.
const STANDBY_TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct HttpsSettings {
    pub client: reqwest::Client,
    /// Central's base url, without a trailing slash.
    pub base_url: String,
    pub store: String,
    pub token: Option<Secret>,
    pub backfill_after: Duration,
    pub mqtt_down_after: Duration,
    pub batch_events: usize,
    pub batch_bytes: usize,
}

impl HttpsSettings {
    /// None when `[central.https]` is absent or its uplink is off.
    pub fn from_config(config: &Config) -> Result<Option<HttpsSettings>, String> {
        let Some(https) = config.central.https.as_ref().filter(|h| h.uplink) else {
            return Ok(None);
        };
        let client = crate::tls::https_client(&https.tls_files(), REQUEST_TIMEOUT)
            .map_err(|e| format!("central.https.{e}"))?;
        Ok(Some(HttpsSettings {
            client,
            base_url: https.base_url.trim_end_matches('/').to_string(),
            store: config.store.id.clone(),
            token: https.token.clone(),
            backfill_after: Duration::from_secs(https.backfill_after_s),
            mqtt_down_after: Duration::from_secs(https.mqtt_down_after_s),
            batch_events: https.batch_events,
            batch_bytes: https.batch_bytes,
        }))
    }

    pub fn batch_url(&self) -> String {
        format!("{}/v1/stores/{}/events:batch", self.base_url, self.store)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpsUplinkError {
    #[error("outbox: {0}")]
    Outbox(#[from] StoreError),
}

/// The JSON array of the batch's CloudEvents, as they are held (no re-serialisation).
pub fn batch_body(entries: &[Entry]) -> Vec<u8> {
    let len = entries.iter().map(|e| e.payload().len() + 1).sum::<usize>() + 2;
    let mut body = Vec::with_capacity(len);
    body.push(b'[');
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e.payload());
    }
    body.push(b']');
    body
}

pub fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::new(6),
    );
    enc.write_all(body).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Derived from the batch's event ids in order: the same batch always has the same key, and
/// central can answer a retry from its idempotency store.
pub fn idempotency_key<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update([b'\n']);
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("sl1-{hex}")
}

/// What central's answer means for the batch.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Delivered,
    /// Send again later; central may say how much later.
    Retry {
        after: Option<Duration>,
    },
    /// Too large: send fewer events at once.
    Split,
    /// Central will never take these events: dead-letter them.
    Refused,
    /// The path itself is misconfigured (auth, url): keep the events, retry slowly.
    Misconfigured,
}

fn verdict(status: StatusCode, batch_len: usize, retry_after: Option<Duration>) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Delivered,
        408 | 425 | 429 | 500..=599 => Verdict::Retry { after: retry_after },
        413 if batch_len > 1 => Verdict::Split,
        400 | 413 | 415 | 422 => Verdict::Refused,
        _ => Verdict::Misconfigured,
    }
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap, now: jiff::Timestamp) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    Some(at.duration_since(now).unsigned_abs()).filter(|_| at > now)
}

/// Why the path is active, for the status and the logs.
fn reason_to_send(
    settings: &HttpsSettings,
    outbox: &Outbox,
    paths: &PathState,
    now: jiff::Timestamp,
) -> Result<Option<String>, StoreError> {
    if let Some(since) = paths.mqtt_down_since() {
        let down = now.duration_since(since).unsigned_abs();
        if down >= settings.mqtt_down_after {
            return Ok(Some(format!("MQTT unreachable for {} s", down.as_secs())));
        }
    }
    if let Some(oldest) = outbox.oldest_enqueued()? {
        let age = now.duration_since(oldest).unsigned_abs();
        if age >= settings.backfill_after {
            return Ok(Some(format!("backlog {} s old", age.as_secs())));
        }
    }
    Ok(None)
}

/// Everything the path needs besides its settings.
pub struct HttpsUplink {
    pub settings: HttpsSettings,
    pub outbox: Arc<Outbox>,
    pub deadletters: Arc<DeadLetters>,
    pub store: Store,
    pub clock: SharedClock,
    pub paths: Arc<PathState>,
}

impl HttpsUplink {
    /// Runs until cancelled; only an outbox (storage) failure ends it early.
    pub async fn run(
        &self,
        component: Component,
        token: CancellationToken,
    ) -> Result<(), HttpsUplinkError> {
        let s = &self.settings;
        let url = s.batch_url();
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut limit = s.batch_events;
        let mut active: Option<String> = None;
        component.running(Some("standby: MQTT carries the traffic".to_string()));
        loop {
            if token.is_cancelled() {
                return Ok(());
            }
            let now = self.clock.now();
            let reason = reason_to_send(s, &self.outbox, &self.paths, now)?;
            if reason != active {
                match &reason {
                    Some(why) => {
                        tracing::info!(reason = %why, "HTTPS backfill taking the oldest events");
                        component.running(Some(format!("backfilling: {why}")));
                    }
                    None => {
                        tracing::info!("HTTPS backfill done; back on standby");
                        component.running(Some("standby: MQTT carries the traffic".to_string()));
                    }
                }
                metrics::gauge!("storelink_uplink_backfill_active").set(if reason.is_some() {
                    1.0
                } else {
                    0.0
                });
                active = reason;
            }
            let batch = if active.is_some() {
                self.outbox.claim(Take::Front, limit, s.batch_bytes)?
            } else {
                Vec::new()
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_TICK) => {}
                    _ = token.cancelled() => return Ok(()),
                }
                continue;
            }
            let outcome = tokio::select! {
                o = self.send(&url, &batch) => o,
                _ = token.cancelled() => {
                    self.outbox.release(batch.iter().map(|e| &e.key));
                    return Ok(());
                }
            };
            let wait = match outcome {
                Ok((Verdict::Delivered, _)) => {
                    let keys: Vec<_> = batch.iter().map(|e| e.key).collect();
                    self.outbox.ack_many(&keys, Commit::Lazy)?;
                    for e in &batch {
                        metrics::counter!("storelink_uplink_delivered_total", "path" => "https", "stream" => e.stream().name())
                            .increment(1);
                    }
                    backoff.reset();
                    limit = s.batch_events;
                    component.success();
                    None
                }
                Ok((Verdict::Split, _)) => {
                    self.outbox.release(batch.iter().map(|e| &e.key));
                    limit = (batch.len() / 2).max(1);
                    tracing::info!(
                        events = batch.len(),
                        next = limit,
                        "central found the batch too large; halving it"
                    );
                    None
                }
                Ok((Verdict::Refused, why)) => {
                    self.dead_letter(&batch, &why).await?;
                    component.degraded(format!("central refused a batch: {why}"));
                    None
                }
                Ok((Verdict::Retry { after }, why)) => {
                    self.outbox.release(batch.iter().map(|e| &e.key));
                    let delay = backoff.next_delay();
                    let delay = after
                        .map(|a| delay.max(a.min(Duration::from_secs(3600))))
                        .unwrap_or(delay);
                    tracing::warn!(%url, reason = %why, retry_in_ms = delay.as_millis() as u64, "HTTPS batch not accepted; will send it again");
                    component.degraded(format!("{url}: {why}"));
                    Some(delay)
                }
                Ok((Verdict::Misconfigured, why)) => {
                    self.outbox.release(batch.iter().map(|e| &e.key));
                    let delay = backoff.next_delay().max(Duration::from_secs(30));
                    tracing::error!(%url, reason = %why, retry_in_ms = delay.as_millis() as u64, "central rejects the HTTPS path itself; events stay in the outbox");
                    component.degraded(format!("{url}: {why}; check central.https"));
                    Some(delay)
                }
                Err(why) => {
                    self.outbox.release(batch.iter().map(|e| &e.key));
                    let delay = backoff.next_delay();
                    tracing::warn!(%url, error = %why, retry_in_ms = delay.as_millis() as u64, "HTTPS batch failed; will send it again");
                    component.degraded(format!("{url}: {why}"));
                    Some(delay)
                }
            };
            if let Some(delay) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = token.cancelled() => return Ok(()),
                }
            }
        }
    }

    /// One POST; `Err` is a transport failure (explained), `Ok` central's verdict and why.
    async fn send(&self, url: &str, batch: &[Entry]) -> Result<(Verdict, String), String> {
        let body = gzip(&batch_body(batch));
        let key = idempotency_key(batch.iter().map(|e| e.id.as_str()));
        let mut request = self
            .settings
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .header(reqwest::header::CONTENT_ENCODING, "gzip")
            .header("Idempotency-Key", &key)
            .body(body);
        if let Some(token) = &self.settings.token {
            request = request.bearer_auth(token.expose());
        }
        let response = request.send().await.map_err(|e| {
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_default();
            crate::tls::explain(&e, &host, "central.https").unwrap_or_else(|| crate::tls::chain(&e))
        })?;
        let status = response.status();
        let after = retry_after(response.headers(), self.clock.now());
        let verdict = verdict(status, batch.len(), after);
        let why = if verdict == Verdict::Delivered {
            String::new()
        } else {
            // A short excerpt of central's explanation; bodies of error pages can be large.
            let text = response.text().await.unwrap_or_default();
            let excerpt: String = text.chars().take(300).collect();
            format!("central answered {status}: {}", excerpt.trim())
        };
        Ok((verdict, why))
    }

    /// Moves refused events to the dead-letter store, tells central with dead-letter events
    /// (except for dead letters themselves, which would loop), and only then removes them.
    async fn dead_letter(&self, batch: &[Entry], why: &str) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut letters = Vec::with_capacity(batch.len());
        let mut events_out = Vec::new();
        for e in batch {
            let raw = e.payload().to_vec();
            let len = raw.len() as u64;
            let letter = DeadLetter::new(
                &self.settings.store,
                format!("uplink:https:{}", e.stream().name()),
                format!("{why} (event {})", e.id),
                now,
                raw,
                len,
                usize::MAX,
            );
            if e.stream() != Stream::DeadLetter {
                events_out.push(NewEvent {
                    kind: EventKind::DeadLetter,
                    id: letter.id.clone(),
                    payload: events::encode(
                        EventKind::DeadLetter,
                        &letter.id,
                        &self.settings.store,
                        now,
                        &letter,
                    ),
                });
            }
            letters.push(letter);
        }
        // One durable transaction: the local records, the events telling central, and the
        // removal of what was refused; a cut leaves either all of it or none.
        let keys: Vec<_> = batch.iter().map(|e| e.key).collect();
        let (store, deadletters, outbox) = (
            self.store.clone(),
            self.deadletters.clone(),
            self.outbox.clone(),
        );
        let moved = keys.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.write(Commit::Durable, |w| {
                deadletters.record_in(w, &letters)?;
                outbox.append_in(w, &events_out)?;
                outbox.ack_in(w, &moved)
            })
        })
        .await
        .map_err(|e| StoreError::Engine {
            path: self.store.path().to_path_buf(),
            detail: format!("dead-lettering task failed: {e}"),
        })
        .and_then(|r| r);
        if let Err(e) = written {
            // They stay in the outbox; they must not stay hidden behind this sender's claim.
            self.outbox.release(keys.iter());
            return Err(e);
        }
        self.outbox.notify();
        metrics::counter!("storelink_uplink_deadlettered_total", "path" => "https")
            .increment(batch.len() as u64);
        tracing::error!(
            events = batch.len(),
            reason = why,
            "central refused a batch; its events are in the dead-letter store"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_contract() {
        let s = |c: u16| StatusCode::from_u16(c).unwrap();
        assert_eq!(verdict(s(200), 5, None), Verdict::Delivered);
        assert_eq!(verdict(s(202), 5, None), Verdict::Delivered);
        let after = Some(Duration::from_secs(7));
        assert_eq!(verdict(s(503), 5, after), Verdict::Retry { after });
        assert_eq!(verdict(s(429), 5, None), Verdict::Retry { after: None });
        assert_eq!(verdict(s(413), 5, None), Verdict::Split);
        assert_eq!(verdict(s(413), 1, None), Verdict::Refused);
        assert_eq!(verdict(s(400), 5, None), Verdict::Refused);
        assert_eq!(verdict(s(422), 5, None), Verdict::Refused);
        assert_eq!(verdict(s(401), 5, None), Verdict::Misconfigured);
        assert_eq!(verdict(s(404), 5, None), Verdict::Misconfigured);
    }

    #[test]
    fn the_key_depends_on_the_ids_and_their_order_only() {
        let a = idempotency_key(["t1", "t2"]);
        assert_eq!(a, idempotency_key(["t1", "t2"]));
        assert_ne!(a, idempotency_key(["t2", "t1"]));
        assert_ne!(a, idempotency_key(["t1t2"]));
        assert!(a.starts_with("sl1-") && a.len() == 4 + 32);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Mon, 23 Nov 2026 10:01:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(60)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
    }
}
