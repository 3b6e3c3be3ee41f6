//! One MQTT session with central's broker, over MQTT 3.1.1 or 5, on TCP, TLS, WebSocket or
//! WebSocket over TLS, optionally through an HTTP CONNECT proxy.
//!
//! rumqttc has a separate client and event loop per protocol version; this module turns both
//! into the few calls and events the uplink needs ([`Client`], [`Session::poll`] → [`Wire`]), so
//! the uplink's pairing of packet ids with outbox entries is written once. Connection failures
//! come back as text that says what to fix (TLS problems through [`crate::tls::explain`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::{Outgoing, Proxy, ProxyAuth, ProxyType, TlsConfiguration, Transport};

use crate::config::{MqttEndpoint, MqttProtocol, MqttScheme, ProxyUrl, Secret};

/// What a session is built from.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub endpoint: MqttEndpoint,
    pub protocol: MqttProtocol,
    pub client_id: String,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub inflight: u16,
    pub max_packet: usize,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub proxy: Option<ProxyUrl>,
    /// For mqtts:// and wss://.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Retained QoS 1 message the broker publishes if the session dies.
    pub last_will: Option<(String, Vec<u8>)>,
    /// Requests rumqttc may queue before `try_publish` says no.
    pub request_capacity: usize,
}

/// The publishing half.
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// The network half, polled by one task.
pub enum Session {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// An event of the session, the same for both protocol versions.
#[derive(Debug)]
pub enum Wire {
    Connected,
    /// A publish was written with this packet id (in the order they were requested).
    Sent(u16),
    /// The broker accepted the publish with this packet id.
    Acked(u16),
    /// The broker answered the publish with an MQTT 5 failure reason; it did not take it.
    Refused {
        pkid: u16,
        reason: String,
    },
    /// A message from central.
    Message {
        topic: String,
        payload: Bytes,
    },
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

fn qos4() -> rumqttc::QoS {
    rumqttc::QoS::AtLeastOnce
}

fn qos5() -> v5::mqttbytes::QoS {
    v5::mqttbytes::QoS::AtLeastOnce
}

impl SessionOptions {
    fn transport(&self) -> Transport {
        let tls = || {
            TlsConfiguration::Rustls(
                self.tls
                    .clone()
                    .expect("TLS schemes are built with a TLS config"),
            )
        };
        match self.endpoint.scheme {
            MqttScheme::Mqtt => Transport::Tcp,
            MqttScheme::Mqtts => Transport::Tls(tls()),
            MqttScheme::Ws => Transport::Ws,
            MqttScheme::Wss => Transport::Wss(tls()),
        }
    }

    /// rumqttc wants the whole url as the "host" of a WebSocket broker.
    fn broker_host(&self) -> String {
        if self.endpoint.scheme.websocket() {
            self.endpoint.websocket_url()
        } else {
            self.endpoint.host.clone()
        }
    }

    fn proxy(&self) -> Option<Proxy> {
        self.proxy.as_ref().map(|p| Proxy {
            ty: ProxyType::Http,
            auth: match &p.username {
                Some(user) => ProxyAuth::Basic {
                    username: user.clone(),
                    password: p
                        .password
                        .as_ref()
                        .map(|s| s.expose().to_string())
                        .unwrap_or_default(),
                },
                None => ProxyAuth::None,
            },
            addr: p.host.clone(),
            port: p.port,
        })
    }

    fn password(&self) -> String {
        self.password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default()
    }
}

/// Builds the client and its session; nothing connects until the session is polled.
pub fn open(o: &SessionOptions) -> (Client, Session) {
    match o.protocol {
        MqttProtocol::V311 => {
            let mut options =
                rumqttc::MqttOptions::new(o.client_id.clone(), o.broker_host(), o.endpoint.port);
            options
                .set_transport(o.transport())
                .set_keep_alive(o.keep_alive)
                .set_clean_session(o.clean_session)
                .set_inflight(o.inflight)
                .set_max_packet_size(o.max_packet, o.max_packet);
            if let Some((topic, payload)) = &o.last_will {
                options.set_last_will(rumqttc::LastWill::new(
                    topic.clone(),
                    payload.clone(),
                    qos4(),
                    true,
                ));
            }
            if let Some(user) = &o.username {
                options.set_credentials(user.clone(), o.password());
            }
            if let Some(proxy) = o.proxy() {
                options.set_proxy(proxy);
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, o.request_capacity);
            (Client::V4(client), Session::V4(Box::new(eventloop)))
        }
        MqttProtocol::V5 => {
            let mut options =
                v5::MqttOptions::new(o.client_id.clone(), o.broker_host(), o.endpoint.port);
            options
                .set_transport(o.transport())
                .set_keep_alive(o.keep_alive)
                .set_clean_start(o.clean_session)
                .set_outgoing_inflight_upper_limit(o.inflight)
                .set_max_packet_size(Some(o.max_packet as u32));
            if !o.clean_session {
                // MQTT 5 ends a session with the connection unless it is given a lifetime; a
                // week covers a long outage.
                options.set_session_expiry_interval(Some(7 * 86_400));
            }
            if let Some((topic, payload)) = &o.last_will {
                options.set_last_will(v5::mqttbytes::v5::LastWill::new(
                    topic.clone(),
                    payload.clone(),
                    qos5(),
                    true,
                    None,
                ));
            }
            if let Some(user) = &o.username {
                options.set_credentials(user.clone(), o.password());
            }
            if let Some(proxy) = o.proxy() {
                options.set_proxy(proxy);
            }
            let (client, eventloop) = v5::AsyncClient::new(options, o.request_capacity);
            (Client::V5(client), Session::V5(Box::new(eventloop)))
        }
    }
}

impl Client {
    /// Queues a QoS 1 publish; false when the request queue is full. The payload is shared,
    /// not copied (it is a slice of the outbox claim's buffer).
    pub fn try_publish(&self, topic: String, retain: bool, payload: bytes::Bytes) -> bool {
        use futures_util::FutureExt;
        match self {
            // The 3.1.1 client's `try_publish` wants a Vec (a copy of every event); its
            // `publish_bytes` takes the bytes as they are. Polled once: the request queue is
            // sized above the window, so it is ready unless full, and then nothing was queued
            // (flume drops an unfinished send).
            Client::V4(c) => c
                .publish_bytes(topic, qos4(), retain, payload)
                .now_or_never()
                .is_some_and(|r| r.is_ok()),
            Client::V5(c) => c.try_publish(topic, qos5(), retain, payload).is_ok(),
        }
    }

    pub fn try_subscribe(&self, topic: String) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_subscribe(topic, qos4()).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_subscribe(topic, qos5()).map_err(|e| e.to_string()),
        }
    }

    pub fn try_disconnect(&self) -> bool {
        match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        }
    }
}

impl Session {
    /// The next event; an error means the connection is gone, and polling again reconnects.
    pub async fn poll(&mut self, host: &str) -> Result<Wire, String> {
        match self {
            Session::V4(el) => match el.poll().await {
                Ok(event) => Ok(wire4(event)),
                Err(e) => Err(explain4(&e, host)),
            },
            Session::V5(el) => match el.poll().await {
                Ok(event) => Ok(wire5(event)),
                Err(e) => Err(explain5(&e, host)),
            },
        }
    }

    /// Makes rumqttc forget every request, queued or in flight. The uplink calls this on every
    /// connection error, so no publish crosses a connection boundary.
    ///
    /// rumqttc's `clean` leaves two things behind that would cross it anyway: events it had
    /// already buffered from the dead connection (a batch of PUBACKs read just before the
    /// socket closed, or the `Outgoing::Publish` of a write that then failed), which the next
    /// `poll` would hand out after the new CONNACK and so pair with the new connection's
    /// publishes; and a publish parked on a packet-id collision. Both are taken out here. The
    /// buffered events are returned, in order, for the caller to settle against the dead
    /// connection's bookkeeping before it drops that.
    pub fn forget(&mut self) -> Vec<Wire> {
        match self {
            Session::V4(el) => {
                el.clean();
                el.pending.clear();
                el.state.collision = None;
                el.state.collision_ping_count = 0;
                el.state.events.drain(..).map(wire4).collect()
            }
            Session::V5(el) => {
                el.clean();
                el.pending.clear();
                el.state.collision = None;
                el.state.collision_ping_count = 0;
                el.state.events.drain(..).map(wire5).collect()
            }
        }
    }
}

fn wire4(event: rumqttc::Event) -> Wire {
    use rumqttc::{Event, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(_)) => Wire::Connected,
        Event::Incoming(Packet::PubAck(ack)) => Wire::Acked(ack.pkid),
        Event::Incoming(Packet::Publish(p)) => Wire::Message {
            topic: p.topic,
            payload: p.payload,
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => Wire::Sent(pkid),
        Event::Outgoing(Outgoing::Disconnect) => Wire::Disconnected,
        _ => Wire::Other,
    }
}

fn wire5(event: v5::Event) -> Wire {
    use v5::Event;
    use v5::mqttbytes::v5::{Packet, PubAckReason};
    match event {
        Event::Incoming(Packet::ConnAck(_)) => Wire::Connected,
        Event::Incoming(Packet::PubAck(ack)) => match ack.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Wire::Acked(ack.pkid),
            reason => Wire::Refused {
                pkid: ack.pkid,
                reason: match ack.properties.and_then(|p| p.reason_string) {
                    Some(text) => format!("{reason:?}: {text}"),
                    None => format!("{reason:?}"),
                },
            },
        },
        Event::Incoming(Packet::Publish(p)) => Wire::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => Wire::Sent(pkid),
        Event::Outgoing(Outgoing::Disconnect) => Wire::Disconnected,
        _ => Wire::Other,
    }
}

fn explain4(e: &rumqttc::ConnectionError, host: &str) -> String {
    if let rumqttc::ConnectionError::ConnectionRefused(code) = e {
        return refused(&format!("{code:?}"));
    }
    if let rumqttc::ConnectionError::ResponseValidation(_) = e {
        return websocket_refused(host);
    }
    explain(e, host)
}

fn explain5(e: &v5::ConnectionError, host: &str) -> String {
    if let v5::ConnectionError::ConnectionRefused(code) = e {
        return refused(&format!("{code:?}"));
    }
    if let v5::ConnectionError::ResponseValidation(_) = e {
        return websocket_refused(host);
    }
    explain(e, host)
}

fn explain(e: &(dyn std::error::Error + 'static), host: &str) -> String {
    crate::tls::explain(e, host, "central.mqtt").unwrap_or_else(|| crate::tls::chain(e))
}

fn refused(code: &str) -> String {
    let hint = if code.contains("UserName") || code.contains("Authorized") {
        "; check central.mqtt.username and the password in central.mqtt.password_env, or the client certificate"
    } else if code.contains("Identifier") {
        "; check central.mqtt.client_id"
    } else {
        ""
    };
    format!("the broker refused the connection ({code}){hint}")
}

fn websocket_refused(host: &str) -> String {
    format!(
        "{host} did not accept the WebSocket upgrade for MQTT; check the url's path and that the listener speaks MQTT over WebSocket"
    )
}
