//! Plays central for `storelink sim` and the demo: subscribes to a store's events on the broker
//! and records when each transaction arrives and how often, so the simulator can tell loss,
//! duplicates and end-to-end latency ([`Arrivals`]), or describes each one for a person
//! ([`describe`]); and publishes what central sends down (profiles, campaigns).
//!
//! Invariants:
//! - The subscription is QoS 1 and confirmed (SUBACK) before [`Observer::start`] returns, so
//!   nothing sent afterwards can be missed for want of a subscriber.
//! - An arrival is keyed by the CloudEvent `id`; the first arrival's instant is kept, later ones
//!   only counted (duplicates are legal under at-least-once, and reported).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode};
use tokio_util::sync::CancellationToken;

use super::SimError;

/// The first arrival of one event and how many times it came.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub first: Instant,
    pub count: u32,
    /// Of those, over HTTPS.
    pub https: u32,
}

/// The path an event reached central by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Mqtt,
    Https,
}

/// What central received, over either path.
#[derive(Debug, Default)]
pub struct Arrivals {
    transactions: Mutex<HashMap<String, Arrival>>,
    /// Events of any other type, counted per CloudEvent `type`.
    others: Mutex<HashMap<String, u64>>,
}

impl Arrivals {
    /// Records one message body (a CloudEvent).
    pub fn record_payload(&self, payload: &[u8], path: Path) {
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            id: std::borrow::Cow<'a, str>,
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        match serde_json::from_slice::<Head>(payload) {
            Ok(head) => self.record(&head.id, &head.kind, path),
            Err(_) => self.record("", "(not a CloudEvent)", path),
        }
    }

    /// Records one CloudEvent of a batch.
    pub fn record_event(&self, event: &serde_json::Value, path: Path) {
        match (event["id"].as_str(), event["type"].as_str()) {
            (Some(id), Some(kind)) => self.record(id, kind, path),
            _ => self.record("", "(not a CloudEvent)", path),
        }
    }

    fn record(&self, id: &str, kind: &str, path: Path) {
        let now = Instant::now();
        let https = u32::from(path == Path::Https);
        if kind == "storelink.transaction.v1" {
            self.transactions
                .lock()
                .expect("arrivals lock")
                .entry(id.to_string())
                .and_modify(|a| {
                    a.count += 1;
                    a.https += https;
                })
                .or_insert(Arrival {
                    first: now,
                    count: 1,
                    https,
                });
        } else {
            *self
                .others
                .lock()
                .expect("others lock")
                .entry(kind.to_string())
                .or_default() += 1;
        }
    }

    /// Transactions seen so far, by id.
    pub fn transactions(&self) -> HashMap<String, Arrival> {
        self.transactions.lock().expect("arrivals lock").clone()
    }

    /// Whether every id in `ids` has arrived.
    pub fn has_all<'a>(&self, mut ids: impl Iterator<Item = &'a String>) -> bool {
        let seen = self.transactions.lock().expect("arrivals lock");
        ids.all(|id| seen.contains_key(id))
    }

    /// Other events seen, per CloudEvent type.
    pub fn others(&self) -> HashMap<String, u64> {
        self.others.lock().expect("others lock").clone()
    }
}

/// One line for a person watching central's feed: the event's type and id and what matters in
/// it. The demo prints these.
pub fn describe(topic: &str, payload: &[u8]) -> String {
    if topic.ends_with("/campaigns") {
        // Central's own retained set, echoed back by a subscription to everything.
        return format!(
            "central  -> campaigns                  {topic} ({} bytes, retained)",
            payload.len()
        );
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return format!("central  <- {topic} ({} bytes, not JSON)", payload.len());
    };
    let kind = v["type"].as_str().unwrap_or("?");
    let id = v["id"].as_str().unwrap_or("?");
    let detail = match kind {
        "storelink.transaction.v1" => format!(
            "total {} {}",
            super::format_money(v["data"]["total"].as_i64().unwrap_or(0)),
            v["data"]["currency"].as_str().unwrap_or("")
        ),
        "storelink.status.v1" => v["data"]["state"].as_str().unwrap_or("").to_string(),
        "storelink.presence.v1" => format!(
            "{} {} {}",
            v["data"]["customer_id"].as_str().unwrap_or(""),
            v["data"]["event"].as_str().unwrap_or(""),
            v["data"]["zone"].as_str().unwrap_or("")
        ),
        "storelink.deadletter.v1" => v["data"]["reason"].as_str().unwrap_or("").to_string(),
        "storelink.offer.v1" => {
            let d = &v["data"];
            let list = |key: &str| {
                d[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|o| {
                                format!(
                                    "{}/{}",
                                    o["campaign"].as_str().unwrap_or(""),
                                    o["offer"].as_str().unwrap_or("")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            format!(
                "{} offers [{}] control [{}]",
                d["customer_id"].as_str().unwrap_or(""),
                list("offers"),
                list("controls")
            )
        }
        "storelink.prompt.v1" => format!(
            "lane {} {} {}",
            v["data"]["lane"].as_str().unwrap_or(""),
            v["data"]["action"].as_str().unwrap_or(""),
            v["data"]["campaign"].as_str().unwrap_or("")
        ),
        "storelink.redemption.v1" => format!(
            "{} {} {} revenue {} margin {}",
            v["data"]["customer_id"].as_str().unwrap_or(""),
            v["data"]["campaign"].as_str().unwrap_or(""),
            v["data"]["group"].as_str().unwrap_or(""),
            super::format_money(v["data"]["revenue"].as_i64().unwrap_or(0)),
            v["data"]["margin"]
                .as_i64()
                .map(super::format_money)
                .unwrap_or_else(|| "-".into())
        ),
        _ => String::new(),
    };
    format!("central  <- {kind:<26} {id}  {detail}")
}

/// A subscriber on central's side of the broker.
pub struct Observer {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

/// `mqtt://host:port` (plain TCP): the simulator reads central's feed on a broker it can reach.
pub fn broker_address(url: &str) -> Result<(String, u16), SimError> {
    let rest = url.strip_prefix("mqtt://").ok_or_else(|| {
        SimError::Setup(format!(
            "the simulator subscribes over plain mqtt://host:port; {url:?} is not one (give --broker)"
        ))
    })?;
    let rest = rest.trim_end_matches('/');
    let authority = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| SimError::Setup(format!("{url:?}: {p:?} is not a port")))?,
        ),
        None => (authority, 1883),
    };
    if host.is_empty() {
        return Err(SimError::Setup(format!("{url:?} names no host")));
    }
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

impl Observer {
    /// Connects to `broker` and subscribes to `filter`, handing every message to `on_publish`;
    /// returns once the broker has confirmed the subscription, or fails after `patience`.
    pub async fn start(
        broker: &str,
        filter: String,
        patience: Duration,
        on_publish: impl Fn(&Publish) + Send + 'static,
        token: CancellationToken,
    ) -> Result<Observer, SimError> {
        let (host, port) = broker_address(broker)?;
        let mut options = MqttOptions::new(
            format!("storelink-sim-central-{}", rand::random::<u32>()),
            host,
            port,
        );
        options.set_max_packet_size(8 << 20, 8 << 20);
        options.set_keep_alive(Duration::from_secs(15));
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let task = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    let event = tokio::select! {
                        e = eventloop.poll() => e,
                        _ = token.cancelled() => return,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            // Every connection, so a broker restart does not leave us deaf.
                            let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            let ok = ack
                                .return_codes
                                .iter()
                                .all(|c| !matches!(c, SubscribeReasonCode::Failure));
                            if let Some(r) = ready.take() {
                                let _ = r.send(if ok {
                                    Ok(())
                                } else {
                                    Err(format!("the broker refused the subscription to {filter}"))
                                });
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&p),
                        Ok(_) => {}
                        Err(e) => {
                            if ready.is_none() {
                                tracing::warn!(error = %e, "sim: central's connection to the broker failed; reconnecting");
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                                _ = token.cancelled() => return,
                            }
                        }
                    }
                }
            })
        };
        match tokio::time::timeout(patience, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Observer { client, task }),
            Ok(Ok(Err(why))) => {
                task.abort();
                Err(SimError::Setup(why))
            }
            _ => {
                task.abort();
                Err(SimError::Setup(format!(
                    "could not subscribe to central's feed on {broker} within {}s",
                    patience.as_secs()
                )))
            }
        }
    }

    /// Publishes as central would (QoS 1): profiles sent down to the store, or a retained
    /// campaign set.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), SimError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| SimError::Setup(format!("could not publish as central: {e}")))
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_read_as_plain_mqtt_only() {
        assert_eq!(
            broker_address("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".to_string(), 1884)
        );
        assert_eq!(
            broker_address("mqtt://broker.local").unwrap(),
            ("broker.local".to_string(), 1883)
        );
        assert_eq!(
            broker_address("mqtt://[::1]:1883/").unwrap(),
            ("::1".to_string(), 1883)
        );
        let e = broker_address("mqtts://central.example:8883").unwrap_err();
        assert!(e.to_string().contains("--broker"), "{e}");
        assert!(broker_address("mqtt://h:x").is_err());
    }

    #[test]
    fn arrivals_count_duplicates_and_keep_the_first_instant() {
        let a = Arrivals::default();
        let tx = br#"{"id":"s1:r1:20261123:1","type":"storelink.transaction.v1"}"#;
        a.record_payload(tx, Path::Mqtt);
        let first = a.transactions()["s1:r1:20261123:1"].first;
        a.record_event(
            &serde_json::json!({"id": "s1:r1:20261123:1", "type": "storelink.transaction.v1"}),
            Path::Https,
        );
        a.record_payload(br#"{"id":"p1","type":"storelink.presence.v1"}"#, Path::Mqtt);
        a.record_payload(b"garbage", Path::Mqtt);
        let got = a.transactions()["s1:r1:20261123:1"];
        assert_eq!((got.count, got.https), (2, 1));
        assert_eq!(got.first, first);
        let o = a.others();
        assert_eq!(o["storelink.presence.v1"], 1);
        assert_eq!(o["(not a CloudEvent)"], 1);
        assert!(a.has_all([String::from("s1:r1:20261123:1")].iter()));
        assert!(!a.has_all([String::from("s1:r1:20261123:2")].iter()));
    }

    #[test]
    fn describe_names_the_type_the_id_and_what_matters() {
        let tx = br#"{"id":"s1:r1:20261123:1","type":"storelink.transaction.v1","data":{"total":-1250,"currency":"EUR"}}"#;
        let line = describe("retail/s1/events/transaction", tx);
        assert!(
            line.starts_with("central  <- storelink.transaction.v1"),
            "{line}"
        );
        assert!(
            line.ends_with("s1:r1:20261123:1  total -12.50 EUR"),
            "{line}"
        );
        let red = br#"{"id":"r1","type":"storelink.redemption.v1","data":{"customer_id":"c1","campaign":"k","group":"g","revenue":300}}"#;
        assert!(describe("t", red).ends_with("c1 k g revenue 3.00 margin -"));
        assert!(describe("t", b"\xff").contains("(1 bytes, not JSON)"));
        assert!(describe("retail/s1/campaigns", b"[]").contains("-> campaigns"));
    }
}
