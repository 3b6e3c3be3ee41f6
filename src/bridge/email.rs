//! The email-tool sinks: lifecycle triggers from the stores into Maileon, HubSpot, Klaviyo or
//! a signed webhook, each by the tool's own event API.
//!
//! The batch that stores a `storelink.trigger.v1` event queues one row per sink that takes its
//! trigger (`storelink.email_queue`, same transaction; see [`super::postgres`]). One sender
//! per sink works that queue:
//! claim due rows → look the customer up in `storelink.email_contacts` → send → record.
//!
//! Invariants:
//! - Email addresses never travel from the stores: a tool learns a customer only by the id
//!   central's CRM maps for it (`email_contacts.external_id`). No customer id is logged above
//!   debug.
//! - Consent is checked again at sending time, against central's current row: without
//!   `marketing` the trigger is not sent, is marked `no_consent` and counted.
//! - Once per occasion: the queue's key is (sink, customer, trigger, occasion), and a row
//!   leaves `pending` only by being recorded after the tool answered. Each request carries
//!   a key derived from customer, trigger and occasion (HubSpot's `uuid`, Klaviyo's
//!   `unique_id`, the webhook's `Idempotency-Key`), so a resend after a lost answer is one
//!   event at the tool, not two (Maileon has no such field; see docs/bi.md).
//! - Rows are claimed with `FOR UPDATE SKIP LOCKED` under a lease (`next_at`), so several
//!   bridges share a queue without sending a row twice, and a row claimed by a bridge that
//!   died goes again when the lease runs out.
//! - The tool's limits hold: a token bucket per sink, and a 429's `Retry-After` pauses the
//!   whole sink, not just the row. Neither counts as a failed attempt.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::config::{EmailKind, EmailSection, PostgresSection};
use super::postgres::PgError;
use super::template::Template;

/// How long a claimed row is held before another sender may take it: longer than working
/// through a whole claim at the sink's rate.
const LEASE_S: f64 = 300.0;
/// How often an empty queue is looked at again.
const POLL: Duration = Duration::from_millis(250);
/// The longest wait between attempts at a failing tool.
const MAX_BACKOFF_S: f64 = 3_600.0;
/// How often a sender tells `/metrics` its backlog.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// A 429 without a usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A queued trigger, with central's contact row for it when there is one.
#[derive(Debug, Clone)]
pub struct Item {
    pub customer_id: String,
    pub trigger: String,
    pub occasion: String,
    pub event_id: String,
    /// The trigger event's time, RFC 3339 UTC.
    pub at: String,
    /// The trigger's `data`.
    pub data: Value,
    pub attempts: i32,
    /// Seconds since the row was queued.
    pub age_s: f64,
    pub external_id: Option<String>,
    pub marketing: Option<bool>,
}

impl Item {
    /// The idempotency key: a UUID (version 8, RFC 9562) from SHA-256 of customer, trigger and
    /// occasion, the same for every store and every retry.
    pub fn key(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [&self.customer_id, &self.trigger, &self.occasion] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let mut b: [u8; 16] = h.finalize()[..16].try_into().expect("16 of 32 bytes");
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex = hex(&b);
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }

    /// What the tool gets to personalise the mail: the trigger's fields but the customer id
    /// (the tool knows the customer by its own id).
    pub fn properties(&self) -> Map<String, Value> {
        let mut p = self.data.as_object().cloned().unwrap_or_default();
        p.remove("customer_id");
        p
    }
}

/// What became of one queued trigger.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The tool took it (2xx).
    Sent,
    /// Central's current row says no marketing consent.
    NoConsent,
    /// Central never mapped the customer for this tool within `contact_wait_s`.
    NoContact,
    /// Not yet: the customer is not mapped yet. Not an attempt at the tool.
    Later(Duration, &'static str),
    /// 429: the sink pauses this long. Not a failed attempt.
    RateLimited(Duration),
    /// A transport error, a timeout, 408 or 5xx: tried again with backoff, up to
    /// `max_attempts`.
    Transient(String),
    /// Any other answer: the tool refuses this request, and would again.
    Refused(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::NoConsent => "no_consent",
            Outcome::NoContact => "no_contact",
            Outcome::Later(..) => "waiting_for_contact",
            Outcome::RateLimited(_) => "rate_limited",
            Outcome::Transient(_) => "retried",
            Outcome::Refused(_) => "failed",
        }
    }
}

/// One request as it goes to the tool.
#[derive(Debug)]
pub struct Request {
    pub url: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// The tool's request for one trigger, to the customer the tool knows as `external_id`;
/// `unix_now` stamps the webhook's signature.
pub fn request(
    sink: &EmailSection,
    template: &Template,
    item: &Item,
    external_id: &str,
    unix_now: u64,
) -> Request {
    let base = sink.url().trim_end_matches('/');
    let token = sink.token.as_ref().map(|t| t.expose()).unwrap_or_default();
    let name = sink.events.get(&item.trigger);
    let mut headers = HeaderMap::new();
    let mut header = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    };
    let (url, body) = match sink.kind {
        EmailKind::Klaviyo => {
            header("authorization", format!("Klaviyo-API-Key {token}"));
            header("revision", sink.revision.clone());
            header("content-type", "application/vnd.api+json".into());
            header("accept", "application/vnd.api+json".into());
            let metric = name
                .cloned()
                .unwrap_or_else(|| format!("storelink {}", item.trigger));
            let body = json!({"data": {"type": "event", "attributes": {
                "properties": item.properties(),
                "time": item.at,
                "unique_id": item.key(),
                "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
                "profile": {"data": {"type": "profile",
                    "attributes": {"external_id": external_id}}},
            }}});
            (format!("{base}/api/events"), body)
        }
        EmailKind::Hubspot => {
            header("authorization", format!("Bearer {token}"));
            header("content-type", "application/json".into());
            let body = json!({
                "eventName": name.cloned().unwrap_or_default(),
                "objectId": external_id,
                "occurredAt": item.at,
                "properties": item.properties(),
                "uuid": item.key(),
            });
            (format!("{base}/events/v3/send"), body)
        }
        EmailKind::Maileon => {
            use base64::Engine;
            let basic = base64::engine::general_purpose::STANDARD.encode(token);
            header("authorization", format!("Basic {basic}"));
            header("content-type", "application/vnd.maileon.api+json".into());
            header("accept", "application/vnd.maileon.api+json".into());
            let mut content = item.properties();
            content.insert("storelink_key".into(), json!(item.key()));
            let kind: u64 = name.and_then(|n| n.parse().ok()).unwrap_or_default();
            let body = json!([{
                "type": kind,
                "contact": {"external_id": external_id},
                "content": content,
            }]);
            (format!("{base}/1.0/transactions"), body)
        }
        EmailKind::Webhook => {
            let body = template.render(&|name| match name {
                "external_id" => json!(external_id),
                "trigger" => json!(item.trigger),
                "occasion" => json!(item.occasion),
                "properties" => Value::Object(item.properties()),
                "key" => json!(item.key()),
                "at" => json!(item.at),
                "event_id" => json!(item.event_id),
                "store" => item.data.get("store").cloned().unwrap_or(Value::Null),
                _ => Value::Null,
            });
            let bytes = serde_json::to_vec(&body).expect("JSON values serialise");
            header("content-type", "application/json".into());
            header("idempotency-key", item.key());
            header("x-storelink-timestamp", unix_now.to_string());
            let key = sink.secret.as_ref().map(|s| s.expose()).unwrap_or_default();
            header(
                "x-storelink-signature",
                format!("sha256={}", sign(key.as_bytes(), unix_now, &bytes)),
            );
            if !token.is_empty() {
                header("authorization", format!("Bearer {token}"));
            }
            return Request {
                url: sink.url().to_string(),
                headers,
                body: bytes,
            };
        }
    };
    Request {
        url,
        headers,
        body: serde_json::to_vec(&body).expect("JSON values serialise"),
    }
}

/// The webhook's signature: hex HMAC-SHA256 over `{timestamp}.{body}`, so a receiver can
/// refuse a replay of an old request as well as a forged one.
pub fn sign(key: &[u8], unix_now: u64, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(unix_now.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

/// The tool's answer, classified.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Outcome {
    if status.is_success() {
        Outcome::Sent
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        Outcome::RateLimited(retry_after(headers).unwrap_or(DEFAULT_RETRY_AFTER))
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        Outcome::Transient(format!("HTTP {}", status.as_u16()))
    } else {
        Outcome::Refused(format!("HTTP {}", status.as_u16()))
    }
}

/// `Retry-After` in seconds (the form every one of these tools uses), at most an hour.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let s: u64 = headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(s.min(3_600)))
}

/// A token bucket: `rate` requests a second, `burst` at once, and a pause a 429 imposes.
/// Not `governor`: it keeps its own clock (quanta), so tests could not step it with tokio's
/// paused time, and it has no notion of a pause imposed from outside; this is the twenty
/// lines the sink needs, on tokio's clock.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: f64, burst: u32) -> Bucket {
        Bucket {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
            paused_until: None,
        }
    }

    /// Waits for a token; true when it had to wait (the tool's limit, or a 429's pause).
    pub async fn take(&mut self) -> bool {
        let mut waited = false;
        loop {
            let now = Instant::now();
            if let Some(until) = self.paused_until {
                if until > now {
                    waited = true;
                    tokio::time::sleep_until(until).await;
                    continue;
                }
                self.paused_until = None;
                // The tool asked for quiet: no burst straight after it.
                self.tokens = self.tokens.min(1.0);
                self.last = now;
            }
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return waited;
            }
            waited = true;
            let wait = (1.0 - self.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }

    /// Nothing goes for `d` (a 429's `Retry-After`).
    pub fn pause(&mut self, d: Duration) {
        let until = Instant::now() + d;
        self.paused_until = Some(self.paused_until.map_or(until, |u| u.max(until)));
    }
}

/// Works the sink's queue until `token` is cancelled. Errors of the database or the tool are
/// retried here; the sender never stops the bridge.
pub async fn run(sink: EmailSection, pg: PostgresSection, token: CancellationToken) {
    let name = sink.name.clone();
    let template = Template::parse(sink.template.as_deref()).expect("validated with the config");
    let files = crate::tls::TlsFiles {
        ca_file: sink.ca_file.as_deref(),
        cert_file: None,
        key_file: None,
    };
    let http = match crate::tls::https_client(&files, Duration::from_secs(sink.timeout_s)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(sink = %name, error = %e, "email sink cannot start");
            return;
        }
    };
    let mut bucket = Bucket::new(sink.rate(), sink.burst);
    let claim_size = (sink.rate() * 10.0).clamp(1.0, 100.0) as i64;
    let mut db: Option<(Client, tokio::task::JoinHandle<()>)> = None;
    let mut wait = Duration::from_millis(100);
    let mut last_gauge: Option<Instant> = None;
    while !token.is_cancelled() {
        let client = match &db {
            Some((c, _)) if !c.is_closed() => c,
            _ => {
                match super::postgres::connect(&pg.url, pg.password.as_ref(), pg.ca_file.as_deref())
                    .await
                {
                    Ok(c) => {
                        wait = Duration::from_millis(100);
                        &db.insert(c).0
                    }
                    Err(e) => {
                        tracing::warn!(sink = %name, error = %e, retry_in = ?wait, "email sink: postgres not reachable");
                        pause(&token, wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
        };
        if last_gauge.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
            last_gauge = Some(Instant::now());
            if let Ok((pending, oldest)) = backlog(client, &name).await {
                metrics::gauge!("storelink_bridge_email_pending", "sink" => name.clone())
                    .set(pending as f64);
                metrics::gauge!("storelink_bridge_email_lag_seconds", "sink" => name.clone())
                    .set(oldest.unwrap_or(0.0));
            }
        }
        let items = match claim(client, &name, claim_size).await {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(sink = %name, error = %e, "email sink: cannot read its queue");
                db = None;
                pause(&token, wait).await;
                continue;
            }
        };
        if items.is_empty() {
            pause(&token, POLL).await;
            continue;
        }
        let mut left = items.as_slice();
        while let Some((item, rest)) = left.split_first() {
            if token.is_cancelled() {
                break;
            }
            let outcome = tokio::select! {
                _ = token.cancelled() => break,
                o = deliver(&sink, &template, &http, &mut bucket, item) => o,
            };
            if let Outcome::RateLimited(d) = &outcome {
                tracing::warn!(sink = %name, retry_after = ?d, "the email tool asks the bridge to slow down");
                bucket.pause(*d);
            }
            metrics::counter!("storelink_bridge_email_total", "sink" => name.clone(), "outcome" => outcome.label())
                .increment(1);
            if let Err(e) = record(client, &sink, item, &outcome).await {
                tracing::warn!(sink = %name, error = %e, "email sink: cannot record an outcome; the row goes again after its lease");
                db = None;
                break;
            }
            left = rest;
        }
        // Stopped or cut off mid-claim: what was not tried is free again at once, not after
        // the lease.
        if let (false, Some((client, _))) = (left.is_empty(), &db) {
            let _ = release(client, &name, left).await;
        }
    }
}

async fn pause(token: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = token.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// One trigger to the tool, or the reason it does not go.
async fn deliver(
    sink: &EmailSection,
    template: &Template,
    http: &reqwest::Client,
    bucket: &mut Bucket,
    item: &Item,
) -> Outcome {
    let Some(external_id) = item.external_id.as_deref() else {
        if item.age_s >= sink.contact_wait_s as f64 {
            return Outcome::NoContact;
        }
        let left = sink.contact_wait_s as f64 - item.age_s;
        return Outcome::Later(
            Duration::from_secs_f64(left.clamp(1.0, 600.0)),
            "no contact for this tool yet",
        );
    };
    if item.marketing != Some(true) {
        return Outcome::NoConsent;
    }
    if bucket.take().await {
        metrics::counter!("storelink_bridge_email_rate_waits_total", "sink" => sink.name.clone())
            .increment(1);
    }
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let r = request(sink, template, item, external_id, unix_now);
    tracing::debug!(sink = %sink.name, customer = %item.customer_id, trigger = %item.trigger, "sending a trigger");
    match http
        .post(&r.url)
        .headers(r.headers)
        .body(r.body)
        .send()
        .await
    {
        Ok(resp) => {
            let outcome = classify(resp.status(), resp.headers());
            if let Outcome::Refused(why) | Outcome::Transient(why) = &outcome {
                tracing::warn!(sink = %sink.name, trigger = %item.trigger, answer = %why, "the email tool did not take a trigger");
            }
            outcome
        }
        Err(e) => Outcome::Transient(crate::tls::chain(&e)),
    }
}

/// The sink's pending rows and the age of the oldest, in seconds (the partial index).
async fn backlog(client: &Client, sink: &str) -> Result<(i64, Option<f64>), PgError> {
    let r = client
        .query_one(
            "SELECT count(*), extract(epoch FROM now() - min(enqueued_at))::float8
             FROM storelink.email_queue WHERE sink = $1 AND state = 'pending'",
            &[&sink],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Takes up to `n` due rows of the sink under a lease, with central's contact row for each.
async fn claim(client: &Client, sink: &str, n: i64) -> Result<Vec<Item>, PgError> {
    let rows = client
        .query(
            "WITH due AS (
                 SELECT sink, customer_id, trigger, occasion FROM storelink.email_queue
                 WHERE sink = $1 AND state = 'pending' AND next_at <= now()
                 ORDER BY next_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             UPDATE storelink.email_queue q
             SET next_at = now() + make_interval(secs => $3), attempts = q.attempts + 1
             FROM due LEFT JOIN storelink.email_contacts c
                 ON c.customer_id = due.customer_id AND c.tool = due.sink
             WHERE (q.sink, q.customer_id, q.trigger, q.occasion)
                 = (due.sink, due.customer_id, due.trigger, due.occasion)
             RETURNING q.customer_id, q.trigger, q.occasion, q.event_id,
                 to_char(q.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                 q.data::text, q.attempts,
                 extract(epoch FROM now() - q.enqueued_at)::float8,
                 c.external_id, c.marketing",
            &[&sink, &n, &LEASE_S],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Item {
            customer_id: r.get(0),
            trigger: r.get(1),
            occasion: r.get(2),
            event_id: r.get(3),
            at: r.get(4),
            data: serde_json::from_str(r.get::<_, &str>(5)).unwrap_or(Value::Null),
            attempts: r.get(6),
            age_s: r.get(7),
            external_id: r.get(8),
            marketing: r.get(9),
        })
        .collect())
}

/// Writes what became of a row: done (with its state), or due again later.
async fn record(
    client: &Client,
    sink: &EmailSection,
    item: &Item,
    outcome: &Outcome,
) -> Result<(), PgError> {
    const DONE: &str = "UPDATE storelink.email_queue SET state = $5, done_at = now(),
            last_error = $6
         WHERE sink = $1 AND customer_id = $2 AND trigger = $3 AND occasion = $4";
    // `$7`: whether this try counts against `max_attempts`.
    const AGAIN: &str = "UPDATE storelink.email_queue
         SET next_at = now() + make_interval(secs => $5), last_error = $6,
             attempts = attempts - CASE WHEN $7 THEN 0 ELSE 1 END
         WHERE sink = $1 AND customer_id = $2 AND trigger = $3 AND occasion = $4";
    let key: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&sink.name, &item.customer_id, &item.trigger, &item.occasion];
    let done = |state: &'static str, error: Option<String>| (state, error);
    let (state_or_again, error, delay, counts) = match outcome {
        Outcome::Sent => (Some(done("sent", None)), None, 0.0, false),
        Outcome::NoConsent => (Some(done("no_consent", None)), None, 0.0, false),
        Outcome::NoContact => (
            Some(done("no_contact", Some("no contact for this tool".into()))),
            None,
            0.0,
            false,
        ),
        Outcome::Refused(why) => (Some(done("failed", Some(why.clone()))), None, 0.0, true),
        Outcome::Transient(why) if item.attempts >= sink.max_attempts as i32 => (
            Some(done(
                "failed",
                Some(format!("{why} ({} attempts)", item.attempts)),
            )),
            None,
            0.0,
            true,
        ),
        Outcome::Transient(why) => {
            let backoff = 2f64.powi(item.attempts.clamp(0, 30) - 1).min(MAX_BACKOFF_S);
            (None, Some(why.clone()), backoff, true)
        }
        Outcome::RateLimited(d) => (None, Some("HTTP 429".into()), d.as_secs_f64(), false),
        Outcome::Later(d, why) => (None, Some((*why).to_string()), d.as_secs_f64(), false),
    };
    match state_or_again {
        Some((state, error)) => {
            client
                .execute(DONE, &[key[0], key[1], key[2], key[3], &state, &error])
                .await?;
        }
        None => {
            client
                .execute(
                    AGAIN,
                    &[key[0], key[1], key[2], key[3], &delay, &error, &counts],
                )
                .await?;
        }
    }
    Ok(())
}

/// Frees claimed rows that were not tried: due now, the claim not counted.
async fn release(client: &Client, sink: &str, items: &[Item]) -> Result<(), PgError> {
    let customers: Vec<&str> = items.iter().map(|i| i.customer_id.as_str()).collect();
    let triggers: Vec<&str> = items.iter().map(|i| i.trigger.as_str()).collect();
    let occasions: Vec<&str> = items.iter().map(|i| i.occasion.as_str()).collect();
    client
        .execute(
            "UPDATE storelink.email_queue q SET next_at = now(), attempts = q.attempts - 1
             FROM unnest($2::text[], $3::text[], $4::text[]) AS u(c, t, o)
             WHERE q.sink = $1 AND q.customer_id = u.c AND q.trigger = u.t
                 AND q.occasion = u.o AND q.state = 'pending'",
            &[&sink, &customers, &triggers, &occasions],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        Item {
            customer_id: "c-17".into(),
            trigger: "winback_due".into(),
            occasion: "coffee:2026-10-02".into(),
            event_id: "s042:trigger:0123456789abcdef0123".into(),
            at: "2026-12-01T06:00:00.000Z".into(),
            data: json!({"store": "s042", "customer_id": "c-17", "trigger": "winback_due",
                "occasion": "coffee:2026-10-02", "group": "coffee", "days_overdue": 12}),
            attempts: 1,
            age_s: 0.0,
            external_id: Some("ext-9".into()),
            marketing: Some(true),
        }
    }

    #[test]
    fn the_key_is_a_version_8_uuid_fixed_by_customer_trigger_and_occasion() {
        let a = item();
        let k = a.key();
        assert_eq!(k.len(), 36);
        assert_eq!(&k[14..15], "8", "{k}");
        assert!(matches!(&k[19..20], "8" | "9" | "a" | "b"), "{k}");
        let mut other_store = a.clone();
        other_store.event_id = "s043:trigger:ffffffffffffffffffff".into();
        assert_eq!(other_store.key(), k);
        let mut other_occasion = a.clone();
        other_occasion.occasion = "coffee:2026-11-02".into();
        assert_ne!(other_occasion.key(), k);
    }

    #[test]
    fn answers_are_classified_as_the_tools_document_them() {
        let mut h = HeaderMap::new();
        assert_eq!(classify(StatusCode::ACCEPTED, &h), Outcome::Sent);
        assert_eq!(classify(StatusCode::NO_CONTENT, &h), Outcome::Sent);
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h),
            Outcome::RateLimited(DEFAULT_RETRY_AFTER)
        );
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h),
            Outcome::RateLimited(Duration::from_secs(7))
        );
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, &h),
            Outcome::Transient(_)
        ));
        assert!(matches!(
            classify(StatusCode::REQUEST_TIMEOUT, &h),
            Outcome::Transient(_)
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &h),
            Outcome::Refused(_)
        ));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 is over a bare message; this one checks the framing with
        // the same primitive: the signature of "{t}.{body}" equals HMAC of that string.
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let rfc = hex(&mac.finalize().into_bytes());
        assert_eq!(
            rfc,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let split = sign(b"Jefe", 1_700_000_000, b"{}");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.{}");
        let whole = hex(&mac.finalize().into_bytes());
        assert_eq!(split, whole);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_keeps_the_rate_and_a_pause_holds_everything() {
        let mut b = Bucket::new(10.0, 2);
        let start = Instant::now();
        for _ in 0..12 {
            b.take().await;
        }
        // 2 at once, then 10 at 10 a second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1_100),
            "{took:?}"
        );
        b.pause(Duration::from_secs(5));
        let paused = Instant::now();
        b.take().await;
        assert!(paused.elapsed() >= Duration::from_secs(5));
    }
}
