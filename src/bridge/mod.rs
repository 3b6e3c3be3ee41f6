//! `storelink bridge`: the central side. Subscribes to the stores' feeds on the retailer's
//! broker and writes them, de-duplicated and validated, into the BI database.
//!
//! The flow: the broker → [`intake`] (an MQTT 5 shared subscription at QoS 1, a persistent
//! session, manual acknowledgements) → a bounded channel → the batcher, which checks each
//! message against the contract ([`contract`]) and writes batches to PostgreSQL
//! ([`postgres`]) → PUBACKs for the batch.
//!
//! Invariants:
//! - A message is acknowledged only after the transaction holding it (as an event, or as a
//!   dead letter) has committed. Until then the broker keeps it in the bridge's session and
//!   sends it again after a reconnect or a restart; the event id makes that resend a no-op.
//! - Nothing is dropped silently: a message that is not a valid event becomes a dead letter
//!   with its topic, reason and raw bytes, in the same transaction as its batch.
//! - The channel between intake and batcher holds at most `broker.inflight` messages, which is
//!   also the receive maximum the broker is given: a broker that keeps to it never has more in
//!   flight than the bridge can hold, so the MQTT loop does not wait on the database and keeps
//!   its session alive while PostgreSQL is away.
//! - The batcher never waits on the intake: it hands acknowledgements to the client without
//!   waiting for room ([`Acks`]). The intake may wait on the batcher (a broker beyond the
//!   receive maximum), so a wait the other way would be a deadlock.
//! - One `CancellationToken` stops both tasks; what is not committed by then is not
//!   acknowledged, and comes again.
//! - Email tools are fed from a queue the batch writes in its own transaction ([`email`]):
//!   a message is acknowledged once its triggers are queued, not once they are mailed, so a
//!   slow or failing email tool never holds the broker's feed back.
//! - Shared with the agent: only the bottom layer (`events`, the config's parsing and
//!   secrets), never a source, the core or the uplink.

pub mod config;
pub mod contract;
pub mod email;
pub mod ops;
pub mod postgres;
pub mod template;

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::config::BridgeConfig;
use self::contract::Contract;
use self::postgres::{PgError, Refused, Routes, Sink};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error("mqtt: {0}")]
    Mqtt(String),
}

/// What the bridge has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub received: u64,
    pub new: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    pub batches: u64,
}

/// What a running bridge shows: whether the broker holds its subscription now (granted on
/// the current connection; what readiness means for the bridge), and its totals after each
/// batch.
#[derive(Clone)]
pub struct Watch {
    pub subscribed: watch::Sender<bool>,
    pub totals: watch::Sender<Totals>,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            subscribed: watch::Sender::new(false),
            totals: watch::Sender::new(Totals::default()),
        }
    }
}

/// Runs until `token` is cancelled.
pub async fn run(config: BridgeConfig, token: CancellationToken) -> Result<Totals, BridgeError> {
    run_with(config, token, Watch::default()).await
}

/// The same, telling `watch` how it goes.
pub async fn run_with(
    config: BridgeConfig,
    token: CancellationToken,
    watch: Watch,
) -> Result<Totals, BridgeError> {
    let Watch { subscribed, totals } = watch;
    let inflight = usize::from(config.broker.inflight);
    // The database first: its schema is migrated, and a password it refuses fails the start,
    // before the broker is asked for anything.
    let routes = config.routes();
    let Some(sink) = connect(&config, &routes, &token).await? else {
        return Ok(Totals::default());
    };
    // One sender per email tool, on the schema the connection above migrated.
    let stop_senders = token.child_token();
    let senders: Vec<_> = config
        .email
        .iter()
        .map(|e| {
            tokio::spawn(email::run(
                e.clone(),
                config.postgres.clone(),
                stop_senders.clone(),
            ))
        })
        .collect();
    let (client, eventloop) = mqtt(&config)?;
    let (tx, rx) = mpsc::channel(inflight);
    // The intake outlives the batcher: the acknowledgements of the last batch are queued
    // before the goodbye, and go out with it.
    let closing = CancellationToken::new();
    let mut intake = tokio::spawn(intake(
        client.clone(),
        eventloop,
        config.filter(),
        tx,
        subscribed,
        closing.clone(),
    ));
    let result = batcher(
        &config,
        &routes,
        sink,
        client.clone(),
        rx,
        totals,
        token.clone(),
    )
    .await;
    closing.cancel();
    // A failed batcher stops the bridge; its senders go with it.
    stop_senders.cancel();
    for s in senders {
        let _ = s.await;
    }
    let _ = client.try_disconnect();
    if tokio::time::timeout(Duration::from_secs(2), &mut intake)
        .await
        .is_err()
    {
        // The broker is away: what was not acknowledged comes again.
        intake.abort();
    }
    result
}

fn mqtt(config: &BridgeConfig) -> Result<(AsyncClient, rumqttc::v5::EventLoop), BridgeError> {
    let b = &config.broker;
    let endpoint = b
        .endpoint
        .as_ref()
        .expect("a validated config has its endpoint");
    let mut options = MqttOptions::new(b.client_id.clone(), endpoint.host.clone(), endpoint.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(b.session_expiry_s))
        .set_receive_maximum(Some(b.inflight))
        .set_manual_acks(true)
        .set_max_packet_size(Some(16 * 1024 * 1024));
    if endpoint.scheme.tls() {
        let files = crate::tls::TlsFiles {
            ca_file: b.ca_file.as_deref(),
            cert_file: None,
            key_file: None,
        };
        let tls =
            crate::tls::client_config(&files, &[]).map_err(|e| BridgeError::Mqtt(e.to_string()))?;
        options.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            std::sync::Arc::new(tls),
        )));
    }
    if let Some(user) = &b.username {
        let password = b.password.as_ref().map(|p| p.expose().to_string());
        options.set_credentials(user.clone(), password.unwrap_or_default());
    }
    Ok(AsyncClient::new(options, inflight_requests(b.inflight)))
}

/// Connects to PostgreSQL, retrying what a retry can mend (the server not up yet); `None`
/// when the bridge is stopped first.
async fn connect(
    config: &BridgeConfig,
    routes: &Routes,
    token: &CancellationToken,
) -> Result<Option<Sink>, PgError> {
    let pg = &config.postgres;
    let mut wait = Duration::from_millis(100);
    loop {
        match Sink::connect(&pg.url, pg.password.as_ref(), pg.ca_file.as_deref(), routes).await {
            Ok(sink) => return Ok(Some(sink)),
            Err(e) if e.transient() => {
                tracing::warn!(error = %e, retry_in = ?wait, "postgres not reachable");
                tokio::select! {
                    _ = token.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Room in the client's request queue for every acknowledgement of a full window, and the
/// subscription.
fn inflight_requests(inflight: u16) -> usize {
    usize::from(inflight) + 16
}

/// Polls the MQTT connection, (re)subscribes on every connection, and hands each message to
/// the batcher. Once `closing`, it polls only until the disconnect has gone out (after the
/// acknowledgements queued before it) or the connection fails.
async fn intake(
    client: AsyncClient,
    mut eventloop: rumqttc::v5::EventLoop,
    filter: String,
    tx: mpsc::Sender<Publish>,
    subscribed: watch::Sender<bool>,
    closing: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut over_sent = false;
    loop {
        let event = eventloop.poll().await;
        match event {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Err(_) if closing.is_cancelled() => return,
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                // On every connection, resumed session or not: subscribing again replaces
                // the same subscription, and a broker that restored the session without its
                // shared subscriptions (mosquitto after a restart) gets it back.
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack.return_codes.iter().all(|c| {
                    matches!(
                        c,
                        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                    )
                });
                if !granted {
                    tracing::error!(codes = ?ack.return_codes, "the broker refused the subscription");
                }
                subscribed.send_replace(granted);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // The receive maximum should leave room. A broker that ignores it makes the
                // intake wait here for the batcher, which never waits for the intake (see
                // `Acks`), so both go on. Once the batcher is gone the send fails at once, and
                // what still arrives is left unacknowledged, for the next session.
                match tx.try_send(p) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(p)) => {
                        if !over_sent {
                            over_sent = true;
                            tracing::warn!(
                                "the broker sends beyond the receive maximum; the bridge holds \
                                 the rest in the socket until the batch commits"
                            );
                        }
                        let _ = tx.send(p).await;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                subscribed.send_replace(false);
                tracing::warn!(error = %e, retry_in = ?backoff, "broker connection lost");
                tokio::select! {
                    _ = closing.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Collects messages into batches (at most `batch_max`, at most `batch_ms` old) and writes up
/// to `writers` of them at once, each on its own connection. Batches are acknowledged in the
/// order they were collected, which is the order their messages arrived: a batch that commits
/// early waits for the ones before it. A failed write is retried with the same batch until it
/// commits or the bridge stops; nothing of it is acknowledged before.
async fn batcher(
    config: &BridgeConfig,
    routes: &Routes,
    sink: Sink,
    client: AsyncClient,
    mut rx: mpsc::Receiver<Publish>,
    shown: watch::Sender<Totals>,
    token: CancellationToken,
) -> Result<Totals, BridgeError> {
    use futures_util::StreamExt;
    let pg = &config.postgres;
    let contract = Contract::new();
    let mut totals = Totals::default();
    let linger = Duration::from_millis(pg.batch_ms);
    // Idle connections; `None` is one not opened yet (or dropped after an error), opened by
    // the write that takes it.
    let mut idle: Vec<Option<Sink>> = std::iter::once(Some(sink))
        .chain((1..pg.writers).map(|_| None))
        .collect();
    let mut writing = futures_util::stream::FuturesOrdered::new();
    let mut acks = Acks::default();
    let mut batch: Vec<Publish> = Vec::with_capacity(pg.batch_max);
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut open = true;
    loop {
        let owed = !acks.flush(&client);
        let room = !idle.is_empty();
        let due = room
            && !batch.is_empty()
            && (batch.len() >= pg.batch_max
                || !open
                || deadline.is_some_and(|d| d <= tokio::time::Instant::now()));
        if due {
            let taken = std::mem::replace(&mut batch, Vec::with_capacity(pg.batch_max));
            deadline = None;
            let prepared = Prepared::check(&contract, taken);
            let conn = idle.pop().expect("room was checked");
            writing.push_back(write_batch(pg, routes, conn, prepared, token.clone()));
            continue;
        }
        if !open && batch.is_empty() && writing.is_empty() {
            return Ok(totals);
        }
        // Never 0: `recv_many` reads a limit of 0 as a closed channel.
        let space = pg.batch_max.saturating_sub(batch.len()).max(1);
        tokio::select! {
            _ = token.cancelled() => return Ok(totals),
            done = writing.next(), if !writing.is_empty() => {
                let Some(done) = done else { continue };
                let Some((conn, prepared, written)) = done? else {
                    // Stopped while retrying.
                    return Ok(totals);
                };
                idle.push(conn);
                for p in &prepared.batch {
                    acks.owe(p);
                }
                acks.flush(&client);
                totals.received += prepared.batch.len() as u64;
                totals.new += written.new;
                totals.duplicates += written.duplicates;
                totals.dead_letters += written.dead_letters;
                totals.batches += 1;
                shown.send_replace(totals);
                measure(&prepared, &written);
                tracing::debug!(
                    events = prepared.batch.len(),
                    new = written.new,
                    duplicates = written.duplicates,
                    dead_letters = written.dead_letters,
                    "batch committed and acknowledged"
                );
            }
            n = rx.recv_many(&mut batch, space),
                if open && batch.len() < pg.batch_max =>
            {
                if n == 0 {
                    open = false;
                } else if deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + linger);
                }
            }
            _ = sleep_until_some(deadline), if room && deadline.is_some() => {}
            // Acknowledgements the client could not take yet: offered again shortly.
            _ = tokio::time::sleep(ACK_RETRY), if owed => {}
        }
    }
}

/// The batch's metrics: events by result, batch size, and the lag from the newest event's
/// time at its store to its commit here.
fn measure(prepared: &Prepared, written: &postgres::Written) {
    for (result, n) in [
        ("new", written.new),
        ("duplicate", written.duplicates),
        ("dead_letter", written.dead_letters),
    ] {
        metrics::counter!("storelink_bridge_events_total", "result" => result).increment(n);
    }
    metrics::histogram!("storelink_bridge_batch_events").record(prepared.batch.len() as f64);
    let newest = prepared
        .events
        .iter()
        .filter_map(|e| e.time.parse::<jiff::Timestamp>().ok())
        .max();
    if let Some(t) = newest {
        let lag = jiff::Timestamp::now().duration_since(t).as_secs_f64();
        metrics::gauge!("storelink_bridge_lag_seconds").set(lag.max(0.0));
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}

/// A batch checked against the contract: the valid events, where each came from, and the
/// dead letters.
struct Prepared {
    batch: Vec<Publish>,
    events: Vec<contract::Envelope>,
    /// Index into `batch` of each event, for its topic and its bytes as received: a dead
    /// letter keeps those, never a re-encoding.
    origins: Vec<usize>,
    refused: Vec<Refused>,
}

impl Prepared {
    fn check(contract: &Contract, batch: Vec<Publish>) -> Prepared {
        let mut events = Vec::with_capacity(batch.len());
        let mut origins = Vec::with_capacity(batch.len());
        let mut refused = Vec::new();
        for (i, p) in batch.iter().enumerate() {
            match contract.check(&p.payload) {
                Ok(e) => {
                    events.push(e);
                    origins.push(i);
                }
                Err(reason) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    tracing::warn!(%topic, %reason, "dead letter: not a valid event");
                    refused.push(Refused {
                        topic,
                        reason,
                        raw: p.payload.to_vec(),
                    });
                }
            }
        }
        Prepared {
            batch,
            events,
            origins,
            refused,
        }
    }
}

/// Writes one batch on `conn` (opening it when needed), retrying what a retry can mend;
/// `None` when the bridge stops first. The connection comes back for the next batch.
async fn write_batch(
    pg: &config::PostgresSection,
    routes: &Routes,
    mut conn: Option<Sink>,
    prepared: Prepared,
    token: CancellationToken,
) -> Result<Option<(Option<Sink>, Prepared, postgres::Written)>, BridgeError> {
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = async {
            if conn.as_ref().is_none_or(Sink::is_closed) {
                conn = None;
                conn = Some(
                    Sink::connect(&pg.url, pg.password.as_ref(), pg.ca_file.as_deref(), routes)
                        .await?,
                );
            }
            let s = conn.as_mut().expect("connected above");
            s.write(&prepared.events, &prepared.refused).await
        };
        match attempt.await {
            Ok(w) => return Ok(Some((conn, prepared, w))),
            Err(e) if e.transient() => {
                metrics::counter!("storelink_bridge_write_errors_total", "kind" => "transient")
                    .increment(1);
                tracing::warn!(error = %e, retry_in = ?wait, "batch not written; retrying");
                conn = None;
                tokio::select! {
                    _ = token.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                // Valid by the schema, and still refused by the database (a value out of a
                // column's range): find which, one by one, and dead-letter it.
                metrics::counter!("storelink_bridge_write_errors_total", "kind" => "refused")
                    .increment(1);
                tracing::warn!(error = %e, "batch refused by the database; writing it event by event");
                // No connection: the refusal was the server's to connect (a password, a
                // migration), which no retry mends.
                let Some(s) = conn.as_mut() else {
                    return Err(e.into());
                };
                match one_by_one(s, &prepared).await {
                    Ok(w) => return Ok(Some((conn, prepared, w))),
                    Err(e) if e.transient() => conn = None,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// How soon acknowledgements the MQTT client had no room for are offered again.
const ACK_RETRY: Duration = Duration::from_millis(2);

/// Acknowledgements owed to the broker, in the order their messages arrived (MQTT wants
/// PUBACKs in that order).
///
/// The batcher hands them to the client without ever waiting for room: the client's queue is
/// drained only by the intake's poll, and the intake may itself be waiting for the batcher to
/// take a message. A broker that sends beyond the receive maximum (mosquitto 2.0 on a shared
/// subscription did, by thousands) would otherwise stop both for good. What is owed is a
/// packet id each, not the message.
#[derive(Default)]
struct Acks {
    owed: std::collections::VecDeque<Publish>,
}

impl Acks {
    fn owe(&mut self, p: &Publish) {
        let mut ack = Publish::new("", p.qos, bytes::Bytes::new(), None);
        ack.pkid = p.pkid;
        self.owed.push_back(ack);
    }

    /// Hands over what the client takes now; true when nothing is owed any more. A client
    /// that is gone (the bridge stopping) takes nothing: unacknowledged, those messages come
    /// again to the next session.
    fn flush(&mut self, client: &AsyncClient) -> bool {
        while let Some(ack) = self.owed.front() {
            if client.try_ack(ack).is_err() {
                return false;
            }
            self.owed.pop_front();
        }
        true
    }
}

/// Writes a batch the database refused as a whole, one event at a time; each event it refuses
/// alone becomes a dead letter with the database's reason.
async fn one_by_one(sink: &mut Sink, prepared: &Prepared) -> Result<postgres::Written, PgError> {
    let mut written = postgres::Written::default();
    let mut refused = prepared.refused.clone();
    for (e, &i) in prepared.events.iter().zip(&prepared.origins) {
        let p = &prepared.batch[i];
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        match sink.write(std::slice::from_ref(e), &[]).await {
            Ok(w) => {
                written.new += w.new;
                written.duplicates += w.duplicates;
            }
            Err(err) if err.transient() => return Err(err),
            Err(err) => {
                tracing::warn!(%topic, error = %err, "dead letter: refused by the database");
                refused.push(Refused {
                    topic,
                    reason: format!("refused by the database: {err}"),
                    raw: p.payload.to_vec(),
                });
            }
        }
    }
    let w = sink.write(&[], &refused).await?;
    written.dead_letters = w.dead_letters;
    Ok(written)
}
