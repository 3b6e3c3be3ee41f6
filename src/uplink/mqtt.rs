//! The MQTT uplink: publishes outbox entries at QoS 1 and removes each one only when its PUBACK
//! arrives.
//!
//! rumqttc is used as a wire protocol engine only; it is never trusted to keep anything. It
//! assigns packet ids itself and reports them as `Outgoing::Publish(pkid)` events in the order
//! the publish requests were handed to it, so the uplink keeps a FIFO of what it handed over
//! and pairs each event with the front of that FIFO. Three rules keep that pairing exact:
//! - Only this module publishes on the client, and every publish goes in under the `Shared`
//!   lock together with its FIFO slot.
//! - On any connection error the uplink stops publishing and makes rumqttc forget everything:
//!   `EventLoop::clean`, then `pending`, a publish parked on a packet-id collision, and the
//!   events buffered from the dead connection (settled first: a PUBACK read just before the
//!   close is real). It then forgets its own FIFO, packet-id map and in-flight set. Nothing is
//!   lost by this: the entries are still in the outbox and are sent again, with their stable
//!   ids, after the next CONNACK.
//! - Nothing is published while disconnected, so no request can cross a connection boundary.
//!
//! Two loops run in one task: the driver polls the event loop continuously (it is never
//! cancelled mid-poll except at shutdown), and the feeder tops up the in-flight window from
//! the outbox whenever the outbox changes or an ack frees room.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::{Config, MqttEndpoint, MqttProtocol, ProxyUrl, Secret, TlsSection};
use crate::events::{self, EventKind};
use crate::model::downlink::Downlink;
use crate::store::StoreError;
use crate::supervisor::{Backoff, Component};
use crate::uplink::PathState;
use crate::uplink::outbox::{EntryKey, Outbox, Take};
use crate::uplink::session::{self, Client, Session, SessionOptions, Wire};

/// At least this often an acknowledgement batch is committed durably (the others are lazy).
const ACK_DURABLE_EVERY: Duration = Duration::from_secs(1);

/// Largest MQTT packet the uplink sends or accepts. Register frames are capped at 1 MiB; their
/// CloudEvent can be somewhat larger.
pub const MAX_PACKET: usize = 4 * 1024 * 1024;

/// Everything the uplink needs from the config.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub endpoint: MqttEndpoint,
    pub protocol: MqttProtocol,
    pub client_id: String,
    pub topic_prefix: String,
    pub store: String,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub inflight: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub proxy: Option<ProxyUrl>,
    /// Set for mqtts:// and wss://.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// While the backlog is older than this, a share of the window goes to newer events.
    pub live_after: Duration,
    /// Where messages from central (profile upserts, erasures) go; none, no subscription.
    pub downlink: Option<mpsc::Sender<Downlink>>,
}

impl MqttSettings {
    /// The uplink's settings; `Err` names what is wrong with the TLS files (the config check
    /// reads them first, so this fails only if they changed since).
    pub fn from_config(config: &Config) -> Result<Option<MqttSettings>, String> {
        let Some(mqtt) = config.central.mqtt.as_ref() else {
            return Ok(None);
        };
        let endpoint = MqttEndpoint::parse(&mqtt.url)?;
        let tls = if endpoint.scheme.tls() {
            let files = mqtt.tls_files();
            // Brokers that share 443 with HTTPS route MQTT by ALPN ("mqtt" for AWS IoT); a
            // WebSocket upgrade is HTTP/1.1.
            let alpn: &[&[u8]] = if endpoint.scheme.websocket() {
                &[b"http/1.1"]
            } else {
                &[]
            };
            let config =
                crate::tls::client_config(&files, alpn).map_err(|e| format!("central.mqtt.{e}"))?;
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Some(MqttSettings {
            endpoint,
            protocol: mqtt.protocol,
            client_id: config.mqtt_client_id(),
            topic_prefix: config.topic_prefix(),
            store: config.store.id.clone(),
            keep_alive: Duration::from_secs(mqtt.keep_alive_s),
            clean_session: mqtt.clean_session,
            inflight: mqtt.inflight,
            username: mqtt.username.clone(),
            password: mqtt.password.clone(),
            proxy: mqtt.resolved_proxy.clone(),
            tls,
            live_after: Duration::from_secs(config.central.live_after_s),
            downlink: None,
        }))
    }

    pub fn events_topic(&self, kind: EventKind) -> String {
        format!(
            "{}/{}/events/{}",
            self.topic_prefix,
            self.store,
            kind.name()
        )
    }

    pub fn profiles_topic(&self) -> String {
        format!("{}/{}/profiles", self.topic_prefix, self.store)
    }

    pub fn erasures_topic(&self) -> String {
        format!("{}/erasures", self.topic_prefix)
    }

    pub fn tenant_campaigns_topic(&self) -> String {
        format!("{}/campaigns", self.topic_prefix)
    }

    pub fn store_campaigns_topic(&self) -> String {
        format!("{}/{}/campaigns", self.topic_prefix, self.store)
    }

    /// Hands a message from central to the core; a full channel drops it (counted), because
    /// blocking here would stall acknowledgements, and the HTTPS delta sync catches up.
    fn deliver_down(&self, topic: &str, payload: &bytes::Bytes) {
        let Some(tx) = &self.downlink else { return };
        let message = if topic == self.profiles_topic() {
            Downlink::Profiles(payload.clone())
        } else if topic == self.erasures_topic() {
            Downlink::Erasures(payload.clone())
        } else if topic == self.tenant_campaigns_topic() || topic == self.store_campaigns_topic() {
            Downlink::Campaigns {
                tenant_wide: topic == self.tenant_campaigns_topic(),
                body: payload.clone(),
            }
        } else {
            return;
        };
        if tx.try_send(message).is_err() {
            metrics::counter!("storelink_downlink_dropped_total").increment(1);
            tracing::warn!(
                topic,
                "downlink message dropped: the core is not keeping up"
            );
        }
    }

    /// Everything the uplink subscribes to after each CONNACK.
    pub fn downlink_topics(&self) -> [String; 4] {
        [
            self.profiles_topic(),
            self.erasures_topic(),
            self.tenant_campaigns_topic(),
            self.store_campaigns_topic(),
        ]
    }

    pub fn status_topic(&self) -> String {
        format!("{}/{}/status", self.topic_prefix, self.store)
    }
}

#[derive(Serialize)]
struct StatusData<'a> {
    state: &'a str,
    agent_version: &'static str,
    started_at: Timestamp,
}

/// The retained birth / last-will message.
pub fn status_event(store: &str, state: &str, started_at: Timestamp, now: Timestamp) -> Vec<u8> {
    let id = format!("status:{store}:{}:{state}", now.as_microsecond());
    events::encode(
        EventKind::Status,
        &id,
        store,
        now,
        &StatusData {
            state,
            agent_version: env!("CARGO_PKG_VERSION"),
            started_at,
        },
    )
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("outbox: {0}")]
    Outbox(#[from] StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Entry(EntryKey),
    /// Birth or goodbye status message; not from the outbox.
    Status,
}

#[derive(Default)]
struct Shared {
    /// PUBACKed entries whose removal from the outbox is still to be written (batched by the
    /// acker: one log commit for many acknowledgements).
    acked: Vec<EntryKey>,
    connected: bool,
    /// Publishes handed to rumqttc whose packet id is not known yet, in hand-over order.
    fifo: VecDeque<Slot>,
    by_pkid: HashMap<u16, Slot>,
    /// Outbox keys this link has claimed: in `fifo` or `by_pkid`.
    in_flight: HashSet<EntryKey>,
    /// After an MQTT 5 refusal, nothing is sent before this instant.
    paused_until: Option<tokio::time::Instant>,
}

/// State both loops share, and the handling of the session's events.
struct Link<'a> {
    settings: &'a MqttSettings,
    outbox: &'a Outbox,
    clock: &'a SharedClock,
    client: Client,
    shared: Mutex<Shared>,
    component: &'a Component,
    /// Wakes the acker when `acked` gains entries.
    acks_ready: Notify,
    /// The events topic of each kind (by `EventKind as usize`), formatted once.
    topics: Vec<String>,
}

/// What an event meant, for the caller's bookkeeping.
enum Handled {
    Nothing,
    /// A status message (birth or goodbye) was acknowledged.
    StatusAcked,
}

impl Link<'_> {
    fn on_publish_sent(&self, pkid: u16) {
        let mut sh = self.shared.lock().expect("uplink lock");
        match sh.fifo.pop_front() {
            Some(slot) => {
                sh.by_pkid.insert(pkid, slot);
            }
            None => tracing::error!(pkid, "publish without a matching request; ignoring"),
        }
    }

    fn on_puback(&self, pkid: u16) -> Result<Handled, UplinkError> {
        let slot = {
            let mut sh = self.shared.lock().expect("uplink lock");
            let slot = sh.by_pkid.remove(&pkid);
            if let Some(Slot::Entry(key)) = slot {
                sh.in_flight.remove(&key);
            }
            slot
        };
        match slot {
            Some(Slot::Entry(key)) => {
                // The window slot is free now; the entry stays claimed (so it is not sent
                // again) until the acker has written its removal.
                self.shared.lock().expect("uplink lock").acked.push(key);
                self.acks_ready.notify_one();
                metrics::counter!("storelink_uplink_delivered_total", "path" => "mqtt", "stream" => key.stream().name())
                    .increment(1);
                self.component.success();
                Ok(Handled::Nothing)
            }
            Some(Slot::Status) => Ok(Handled::StatusAcked),
            None => Ok(Handled::Nothing),
        }
    }

    /// An MQTT 5 broker said no (quota, authorisation, topic): the entry stays in the outbox,
    /// and sending pauses so a broker that refuses everything is not hammered.
    fn on_refused(&self, pkid: u16, reason: &str, backoff: &mut Backoff) {
        let delay = backoff.next_delay();
        {
            let mut sh = self.shared.lock().expect("uplink lock");
            if let Some(Slot::Entry(key)) = sh.by_pkid.remove(&pkid) {
                sh.in_flight.remove(&key);
                self.outbox.release([&key]);
            }
            sh.paused_until = Some(tokio::time::Instant::now() + delay);
        }
        metrics::counter!("storelink_uplink_refused_total", "path" => "mqtt").increment(1);
        tracing::warn!(
            reason,
            retry_in_ms = delay.as_millis() as u64,
            "the broker refused a publish; the event stays in the outbox"
        );
        self.component
            .degraded(format!("the broker refused a publish: {reason}"));
    }

    fn on_event(&self, event: &Wire, backoff: &mut Backoff) -> Result<Handled, UplinkError> {
        match event {
            Wire::Sent(pkid) => {
                self.on_publish_sent(*pkid);
                Ok(Handled::Nothing)
            }
            Wire::Acked(pkid) => self.on_puback(*pkid),
            Wire::Refused { pkid, reason } => {
                self.on_refused(*pkid, reason, backoff);
                Ok(Handled::Nothing)
            }
            _ => Ok(Handled::Nothing),
        }
    }

    /// Publishes a retained status message, paired with its FIFO slot.
    fn publish_status(&self, payload: Vec<u8>) -> bool {
        let mut sh = self.shared.lock().expect("uplink lock");
        let ok = self
            .client
            .try_publish(self.settings.status_topic(), true, payload.into());
        if ok {
            sh.fifo.push_back(Slot::Status);
        }
        ok
    }

    /// Writes the removal of every acknowledged entry gathered so far, in one commit. Returns
    /// when the last durable one was.
    async fn write_acks(
        &self,
        outbox: &Arc<Outbox>,
        last_durable: tokio::time::Instant,
    ) -> Result<tokio::time::Instant, UplinkError> {
        let keys = std::mem::take(&mut self.shared.lock().expect("uplink lock").acked);
        if keys.is_empty() {
            return Ok(last_durable);
        }
        let now = tokio::time::Instant::now();
        let durable = now.duration_since(last_durable) >= ACK_DURABLE_EVERY;
        let commit = if durable {
            crate::store::Commit::Durable
        } else {
            crate::store::Commit::Lazy
        };
        let outbox = outbox.clone();
        let path_error = |e: tokio::task::JoinError| {
            UplinkError::Outbox(StoreError::Engine {
                path: std::path::PathBuf::new(),
                detail: format!("acknowledgement task failed: {e}"),
            })
        };
        tokio::task::spawn_blocking(move || outbox.ack_many(&keys, commit))
            .await
            .map_err(path_error)??;
        Ok(if durable { now } else { last_durable })
    }

    /// Forgets the connection: rumqttc's requests, the FIFO, and the claims, which go back to
    /// the outbox to be sent again (with their stable ids) after the next CONNACK.
    fn forget(&self, session: &mut Session) {
        // Nothing may be handed to rumqttc from here on, or it would cross into the next
        // connection.
        self.shared.lock().expect("uplink lock").connected = false;
        // Events the dead connection had already delivered still belong to it: a PUBACK read
        // just before the close really acknowledges its entry. Settle them first, while the
        // FIFO and packet-id map still describe that connection.
        for event in session.forget() {
            if let Err(e) = match event {
                Wire::Sent(pkid) => {
                    self.on_publish_sent(pkid);
                    Ok(Handled::Nothing)
                }
                Wire::Acked(pkid) => self.on_puback(pkid),
                _ => Ok(Handled::Nothing),
            } {
                // The entry stays in the outbox and is sent again: a duplicate, never a loss.
                tracing::warn!(error = %e, "could not record an acknowledgement from a closed connection");
            }
        }
        let mut sh = self.shared.lock().expect("uplink lock");
        sh.fifo.clear();
        sh.by_pkid.clear();
        self.outbox.release(sh.in_flight.iter());
        sh.in_flight.clear();
    }

    /// Hands as many outbox entries to rumqttc as the window allows. While a backlog older than
    /// `live_after` drains, a quarter of the window is first offered to events newer than that,
    /// so a transaction rung up now reaches central in seconds, not after the backlog.
    /// Returns when sending may resume if it is paused.
    fn top_up(&self, window: usize) -> Result<Option<tokio::time::Instant>, UplinkError> {
        let mut sh = self.shared.lock().expect("uplink lock");
        if let Some(until) = sh.paused_until {
            if tokio::time::Instant::now() < until {
                return Ok(Some(until));
            }
            sh.paused_until = None;
        }
        if !sh.connected || sh.in_flight.len() >= window {
            return Ok(None);
        }
        let mut room = window - sh.in_flight.len();
        // Top up in eighths of the window, not per PUBACK: a claim costs a snapshot and a walk,
        // and with seven eighths still queued the wire never runs dry meanwhile. An idle link
        // (nothing in flight) sends at once.
        if !sh.in_flight.is_empty() && room < window.div_ceil(8) {
            return Ok(None);
        }
        let now = self.clock.now();
        let live_since = now
            .checked_sub(
                jiff::SignedDuration::try_from(self.settings.live_after).unwrap_or_default(),
            )
            .unwrap_or(now);
        let draining = self
            .outbox
            .oldest_enqueued()?
            .is_some_and(|oldest| oldest < live_since);
        let mut entries = Vec::new();
        if draining {
            entries = self.outbox.claim(
                Take::Live { since: live_since },
                room.div_ceil(4),
                usize::MAX,
            )?;
            room -= entries.len();
        }
        entries.extend(self.outbox.claim(Take::Front, room, usize::MAX)?);
        let mut unsent = Vec::new();
        for entry in entries {
            if !unsent.is_empty() {
                unsent.push(entry.key);
                continue;
            }
            let topic = self.topics[entry.kind as usize].clone();
            if !self.client.try_publish(topic, false, entry.payload_bytes()) {
                unsent.push(entry.key);
                continue;
            }
            sh.fifo.push_back(Slot::Entry(entry.key));
            sh.in_flight.insert(entry.key);
        }
        if !unsent.is_empty() {
            self.outbox.release(unsent.iter());
        }
        Ok(None)
    }
}

/// Runs the uplink until cancelled. Connection failures are retried here with backoff; only an
/// outbox (storage) failure is returned to the supervisor.
///
/// Long on purpose: the driver, feeder and acker are three `async` blocks sharing one `Link`
/// and one `Notify` by reference inside a single `try_join!`; as separate functions each would
/// need the same borrowed state passed in, and the join is what makes their shutdown one.
pub async fn run(
    settings: MqttSettings,
    outbox: Arc<Outbox>,
    clock: SharedClock,
    paths: Arc<PathState>,
    component: Component,
    token: CancellationToken,
) -> Result<(), UplinkError> {
    let started_at = clock.now();
    let window = settings.inflight as usize * 2;
    let (client, mut session) = session::open(&SessionOptions {
        endpoint: settings.endpoint.clone(),
        protocol: settings.protocol,
        client_id: settings.client_id.clone(),
        keep_alive: settings.keep_alive,
        clean_session: settings.clean_session,
        inflight: settings.inflight,
        max_packet: MAX_PACKET,
        username: settings.username.clone(),
        password: settings.password.clone(),
        proxy: settings.proxy.clone(),
        tls: settings.tls.clone(),
        last_will: Some((
            settings.status_topic(),
            status_event(&settings.store, "offline", started_at, clock.now()),
        )),
        request_capacity: window + 16,
    });
    let link = Link {
        settings: &settings,
        outbox: &outbox,
        clock: &clock,
        client,
        shared: Mutex::new(Shared::default()),
        component: &component,
        acks_ready: Notify::new(),
        topics: EventKind::ALL
            .iter()
            .map(|k| settings.events_topic(*k))
            .collect(),
    };
    let wake = Notify::new();
    let broker = settings.endpoint.to_string();
    let via = settings
        .proxy
        .as_ref()
        .map(|p| format!(" via proxy {}:{}", p.host, p.port))
        .unwrap_or_default();
    component.degraded(format!("connecting to {broker}{via}"));
    paths.mqtt_down(clock.now());

    let driver = async {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut refusals = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let mut last_error: Option<String> = None;
        loop {
            let event = tokio::select! {
                e = session.poll(&settings.endpoint.host) => e,
                _ = token.cancelled() => return Ok::<(), UplinkError>(()),
            };
            match event {
                Ok(Wire::Connected) => {
                    link.shared.lock().expect("uplink lock").connected = true;
                    link.publish_status(status_event(
                        &settings.store,
                        "online",
                        started_at,
                        clock.now(),
                    ));
                    // Every CONNACK, clean session or not: rumqttc does not restore
                    // subscriptions, and a broker may have lost a persistent session.
                    if settings.downlink.is_some() {
                        for topic in settings.downlink_topics() {
                            if let Err(e) = link.client.try_subscribe(topic.clone()) {
                                tracing::warn!(topic, error = %e, "could not subscribe to central's downlink");
                            }
                        }
                    }
                    backoff.reset();
                    last_error = None;
                    tracing::info!(%broker, protocol = ?settings.protocol, "connected to the MQTT broker");
                    metrics::gauge!("storelink_uplink_connected", "path" => "mqtt").set(1.0);
                    paths.mqtt_up();
                    component.running(Some(format!("connected to {broker}{via}")));
                    // A CONNACK is central reached, for status, before anything is acked.
                    component.success();
                    wake.notify_one();
                }
                Ok(Wire::Message { topic, payload }) => {
                    settings.deliver_down(&topic, &payload);
                }
                Ok(event) => {
                    if let Wire::Acked(_) = event {
                        refusals.reset();
                        // A window slot is free: top it up without waiting for the removal.
                        wake.notify_one();
                    }
                    link.on_event(&event, &mut refusals)?;
                    if let Wire::Refused { .. } = event {
                        wake.notify_one();
                    }
                }
                Err(e) => {
                    link.forget(&mut session);
                    metrics::gauge!("storelink_uplink_connected", "path" => "mqtt").set(0.0);
                    paths.mqtt_down(clock.now());
                    let delay = backoff.next_delay();
                    // The same failure every few seconds for hours is one warning, then debug.
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(%broker, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed; holding events in the outbox");
                    } else {
                        tracing::debug!(%broker, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection still failing");
                    }
                    component.degraded(format!("{broker}{via}: {e}"));
                    last_error = Some(e);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = token.cancelled() => return Ok(()),
                    }
                }
            }
        }
    };

    let feeder = async {
        loop {
            let paused = link.top_up(window)?;
            let resume = async {
                match paused {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = outbox.changed() => {}
                _ = wake.notified() => {}
                _ = resume => {}
                _ = token.cancelled() => return Ok::<(), UplinkError>(()),
            }
        }
    };

    // Removes acknowledged entries in batches: while one commit runs, the next PUBACKs gather.
    // Lazy commits (a lost removal is a resend with the same id), with a durable one every
    // second so the log can reuse the space of what was removed.
    let acker = async {
        let mut last_durable = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = link.acks_ready.notified() => {}
                _ = token.cancelled() => return Ok::<(), UplinkError>(()),
            }
            last_durable = link.write_acks(&outbox, last_durable).await?;
        }
    };

    let result = tokio::try_join!(driver, feeder, acker);
    if result.is_ok() {
        say_goodbye(&link, &mut session, started_at, &clock).await;
    }
    // Whatever is still claimed goes back, so nothing stays hidden from a restarted uplink;
    // what central acknowledged is removed first.
    if let Err(e) = link.write_acks(&outbox, tokio::time::Instant::now()).await {
        tracing::warn!(error = %e, "could not record the last acknowledgements; those events will be sent again");
    }
    link.forget(&mut session);
    if let Err(e) = link.write_acks(&outbox, tokio::time::Instant::now()).await {
        tracing::warn!(error = %e, "could not record the last acknowledgements; those events will be sent again");
    }
    metrics::gauge!("storelink_uplink_connected", "path" => "mqtt").set(0.0);
    paths.mqtt_down(clock.now());
    result.map(|_| ())
}

/// On a graceful stop, replace the retained status with "offline" (the broker only sends the
/// last will after an unclean disconnect), then disconnect; about a second at most. Acks that
/// arrive meanwhile still clear their outbox entries.
async fn say_goodbye(
    link: &Link<'_>,
    session: &mut Session,
    started_at: Timestamp,
    clock: &SharedClock,
) {
    if !link.shared.lock().expect("uplink lock").connected {
        return;
    }
    let bye = status_event(&link.settings.store, "offline", started_at, clock.now());
    if !link.publish_status(bye) {
        return;
    }
    let mut refusals = Backoff::default();
    let host = link.settings.endpoint.host.clone();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match session.poll(&host).await {
                Ok(Wire::Disconnected) | Err(_) => break,
                Ok(event) => match link.on_event(&event, &mut refusals) {
                    Ok(Handled::StatusAcked) => {
                        if !link.client.try_disconnect() {
                            break;
                        }
                    }
                    Ok(Handled::Nothing) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox ack failed during shutdown");
                        break;
                    }
                },
            }
        }
    })
    .await;
}
