//! The MQTT uplink: publishes outbox entries at QoS 1 and removes each one only when its PUBACK
//! arrives.
//!
//! rumqttc is used as a wire protocol engine only; it is never trusted to keep anything. It
//! assigns packet ids itself and reports them as `Outgoing::Publish(pkid)` events in the order
//! the publish requests were handed to it, so the uplink keeps a FIFO of what it handed over
//! and pairs each event with the front of that FIFO. Three rules keep that pairing exact:
//! - Only this module publishes on the client, and every publish goes in under the `Shared`
//!   lock together with its FIFO slot.
//! - On any connection error the uplink, under the same lock, makes rumqttc forget everything
//!   (`EventLoop::clean` then clearing `pending`) and forgets its own FIFO, packet-id map and
//!   in-flight set. Nothing is lost by this: the entries are still in the outbox and are sent
//!   again, with their stable ids, after the next CONNACK.
//! - Nothing is published while disconnected, so no request can cross a connection boundary.
//!
//! Two loops run in one task: the driver polls the event loop continuously (it is never
//! cancelled mid-poll except at shutdown), and the feeder tops up the in-flight window from
//! the outbox whenever the outbox changes or an ack frees room.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::{Config, MqttEndpoint, Secret};
use crate::events::{self, EventKind};
use crate::store::StoreError;
use crate::supervisor::{Backoff, Component};
use crate::uplink::outbox::{EntryKey, Outbox};

/// Largest MQTT packet the uplink sends or accepts. Register frames are capped at 1 MiB; their
/// CloudEvent can be somewhat larger.
pub const MAX_PACKET: usize = 4 * 1024 * 1024;

/// Everything the uplink needs from the config.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub endpoint: MqttEndpoint,
    pub client_id: String,
    pub topic_prefix: String,
    pub store: String,
    pub keep_alive: Duration,
    pub inflight: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Where messages from central (profile upserts, erasures) go; none, no subscription.
    pub downlink: Option<mpsc::Sender<Downlink>>,
}

/// A message central sent down, by the topic it came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downlink {
    /// `…/{store}/profiles`: profile upserts.
    Profiles(bytes::Bytes),
    /// `…/erasures`: customer erasure requests.
    Erasures(bytes::Bytes),
    /// `…/campaigns` (`tenant_wide`) or `…/{store}/campaigns`: a campaign set, retained.
    Campaigns {
        tenant_wide: bool,
        body: bytes::Bytes,
    },
}

impl MqttSettings {
    pub fn from_config(config: &Config) -> Option<MqttSettings> {
        let mqtt = config.central.mqtt.as_ref()?;
        Some(MqttSettings {
            endpoint: MqttEndpoint::parse(&mqtt.url).ok()?,
            client_id: config.mqtt_client_id(),
            topic_prefix: config.topic_prefix(),
            store: config.store.id.clone(),
            keep_alive: Duration::from_secs(mqtt.keep_alive_s),
            inflight: mqtt.inflight,
            username: mqtt.username.clone(),
            password: mqtt.password.clone(),
            downlink: None,
        })
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
    connected: bool,
    /// Publishes handed to rumqttc whose packet id is not known yet, in hand-over order.
    fifo: VecDeque<Slot>,
    by_pkid: HashMap<u16, Slot>,
    /// Outbox keys in `fifo` or `by_pkid`.
    in_flight: HashSet<EntryKey>,
}

impl Shared {
    fn forget_connection(&mut self) {
        self.connected = false;
        self.fifo.clear();
        self.by_pkid.clear();
        self.in_flight.clear();
    }
}

/// State both loops share, and the handling of rumqttc's events.
struct Link<'a> {
    settings: &'a MqttSettings,
    outbox: &'a Outbox,
    client: AsyncClient,
    shared: Mutex<Shared>,
    component: &'a Component,
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
                self.outbox.ack(&key)?;
                metrics::counter!("storelink_uplink_delivered_total", "path" => "mqtt", "stream" => key.stream().name())
                    .increment(1);
                self.component.success();
                Ok(Handled::Nothing)
            }
            Some(Slot::Status) => Ok(Handled::StatusAcked),
            None => Ok(Handled::Nothing),
        }
    }

    fn on_event(&self, event: &Event) -> Result<Handled, UplinkError> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                self.on_publish_sent(*pkid);
                Ok(Handled::Nothing)
            }
            Event::Incoming(Packet::PubAck(ack)) => self.on_puback(ack.pkid),
            _ => Ok(Handled::Nothing),
        }
    }

    /// Publishes a retained status message, paired with its FIFO slot.
    fn publish_status(&self, payload: Vec<u8>) -> bool {
        let mut sh = self.shared.lock().expect("uplink lock");
        let ok = self
            .client
            .try_publish(
                self.settings.status_topic(),
                QoS::AtLeastOnce,
                true,
                payload,
            )
            .is_ok();
        if ok {
            sh.fifo.push_back(Slot::Status);
        }
        ok
    }

    /// Hands as many outbox entries to rumqttc as the window allows.
    fn top_up(&self, window: usize) -> Result<(), UplinkError> {
        let mut sh = self.shared.lock().expect("uplink lock");
        if !sh.connected || sh.in_flight.len() >= window {
            return Ok(());
        }
        let room = window - sh.in_flight.len();
        let entries = self.outbox.peek(room, |k| sh.in_flight.contains(k))?;
        for entry in entries {
            let topic = self.settings.events_topic(entry.kind);
            let payload = entry.payload().to_vec();
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                break;
            }
            sh.fifo.push_back(Slot::Entry(entry.key));
            sh.in_flight.insert(entry.key);
        }
        Ok(())
    }
}

/// Runs the uplink until cancelled. Connection failures are retried here with backoff; only an
/// outbox (storage) failure is returned to the supervisor.
pub async fn run(
    settings: MqttSettings,
    outbox: Arc<Outbox>,
    clock: SharedClock,
    component: Component,
    token: CancellationToken,
) -> Result<(), UplinkError> {
    let started_at = clock.now();
    let window = settings.inflight as usize * 2;
    let mut options = MqttOptions::new(
        settings.client_id.clone(),
        settings.endpoint.host.clone(),
        settings.endpoint.port,
    );
    options
        .set_keep_alive(settings.keep_alive)
        .set_clean_session(true)
        .set_inflight(settings.inflight)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_last_will(LastWill::new(
            settings.status_topic(),
            status_event(&settings.store, "offline", started_at, clock.now()),
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(user) = &settings.username {
        let password = settings
            .password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default();
        options.set_credentials(user.clone(), password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, window + 16);
    let link = Link {
        settings: &settings,
        outbox: &outbox,
        client,
        shared: Mutex::new(Shared::default()),
        component: &component,
    };
    let wake = Notify::new();
    let broker = format!("{}:{}", settings.endpoint.host, settings.endpoint.port);
    component.degraded(format!("connecting to {broker}"));

    let driver = async {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            let event = tokio::select! {
                e = eventloop.poll() => e,
                _ = token.cancelled() => return Ok::<(), UplinkError>(()),
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    link.shared.lock().expect("uplink lock").connected = true;
                    link.publish_status(status_event(
                        &settings.store,
                        "online",
                        started_at,
                        clock.now(),
                    ));
                    if settings.downlink.is_some() {
                        for topic in [
                            settings.profiles_topic(),
                            settings.erasures_topic(),
                            settings.tenant_campaigns_topic(),
                            settings.store_campaigns_topic(),
                        ] {
                            if let Err(e) =
                                link.client.try_subscribe(topic.clone(), QoS::AtLeastOnce)
                            {
                                tracing::warn!(topic, error = %e, "could not subscribe to central's downlink");
                            }
                        }
                    }
                    backoff.reset();
                    tracing::info!(%broker, "connected to the MQTT broker");
                    metrics::gauge!("storelink_uplink_connected", "path" => "mqtt").set(1.0);
                    component.running(Some(format!("connected to {broker}")));
                    wake.notify_one();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    settings.deliver_down(&p.topic, &p.payload);
                }
                Ok(event) => {
                    link.on_event(&event)?;
                }
                Err(e) => {
                    {
                        let mut sh = link.shared.lock().expect("uplink lock");
                        // Make rumqttc forget every request, queued or in flight; they are all
                        // still in the outbox and will be republished after the next CONNACK.
                        eventloop.clean();
                        eventloop.pending.clear();
                        sh.forget_connection();
                    }
                    metrics::gauge!("storelink_uplink_connected", "path" => "mqtt").set(0.0);
                    let delay = backoff.next_delay();
                    tracing::warn!(%broker, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed; holding events in the outbox");
                    component.degraded(format!("{broker}: {e}"));
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
            link.top_up(window)?;
            tokio::select! {
                _ = outbox.changed() => {}
                _ = wake.notified() => {}
                _ = token.cancelled() => return Ok::<(), UplinkError>(()),
            }
        }
    };

    tokio::try_join!(driver, feeder)?;
    say_goodbye(&link, &mut eventloop, started_at, &clock).await;
    metrics::gauge!("storelink_uplink_connected", "path" => "mqtt").set(0.0);
    Ok(())
}

/// On a graceful stop, replace the retained status with "offline" (the broker only sends the
/// last will after an unclean disconnect), then disconnect; about a second at most. Acks that
/// arrive meanwhile still clear their outbox entries.
async fn say_goodbye(
    link: &Link<'_>,
    eventloop: &mut EventLoop,
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
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(event) => match link.on_event(&event) {
                    Ok(Handled::StatusAcked) => {
                        if link.client.try_disconnect().is_err() {
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
