//! CloudEvents 1.0 envelopes: the one shape in which anything leaves the store for central.
//!
//! Invariants:
//! - `id` is stable per fact; a resend carries the same id, and central de-duplicates on it.
//! - `source` is `/stores/{store}`; `type` is `storelink.{kind}.v1`.
//! - The envelope is serialised once, when the event enters the outbox. What sits in the outbox
//!   is byte for byte what central receives.

use jiff::Timestamp;
use serde::Serialize;

/// Kinds of event central receives; each is a CloudEvent `type` and an MQTT topic suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Transaction,
    Presence,
    Offer,
    Prompt,
    Redemption,
    Status,
    DeadLetter,
    /// The acknowledgement of a customer erasure.
    Erasure,
    /// A KPI snapshot of one customer.
    Customer,
    /// A lifecycle trigger (win-back, birthday, …).
    Trigger,
    /// The store's learned follow-up purchases.
    FollowUps,
}

impl EventKind {
    /// Every kind; the position is the kind's byte in outbox headers, so new kinds go last.
    pub const ALL: [EventKind; 11] = [
        EventKind::Transaction,
        EventKind::Presence,
        EventKind::Offer,
        EventKind::Prompt,
        EventKind::Redemption,
        EventKind::Status,
        EventKind::DeadLetter,
        EventKind::Erasure,
        EventKind::Customer,
        EventKind::Trigger,
        EventKind::FollowUps,
    ];

    /// The short name: the MQTT topic suffix in `…/{store}/events/{name}`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Transaction => "transaction",
            EventKind::Presence => "presence",
            EventKind::Offer => "offer",
            EventKind::Prompt => "prompt",
            EventKind::Redemption => "redemption",
            EventKind::Status => "status",
            EventKind::DeadLetter => "deadletter",
            EventKind::Erasure => "erasure",
            EventKind::Customer => "customer",
            EventKind::Trigger => "trigger",
            EventKind::FollowUps => "followups",
        }
    }

    /// The CloudEvent `type`.
    pub fn cloudevent_type(self) -> &'static str {
        match self {
            EventKind::Transaction => "storelink.transaction.v1",
            EventKind::Presence => "storelink.presence.v1",
            EventKind::Offer => "storelink.offer.v1",
            EventKind::Prompt => "storelink.prompt.v1",
            EventKind::Redemption => "storelink.redemption.v1",
            EventKind::Status => "storelink.status.v1",
            EventKind::DeadLetter => "storelink.deadletter.v1",
            EventKind::Erasure => "storelink.erasure.v1",
            EventKind::Customer => "storelink.customer.v1",
            EventKind::Trigger => "storelink.trigger.v1",
            EventKind::FollowUps => "storelink.followups.v1",
        }
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    time: Timestamp,
    datacontenttype: &'static str,
    data: &'a T,
}

/// The CloudEvent `source` of a store.
pub fn source_of(store: &str) -> String {
    format!("/stores/{store}")
}

/// Serialises `data` as a structured-mode CloudEvent.
pub fn encode<T: Serialize>(
    kind: EventKind,
    id: &str,
    store: &str,
    time: Timestamp,
    data: &T,
) -> Vec<u8> {
    let source = source_of(store);
    let envelope = Envelope {
        specversion: "1.0",
        id,
        source: &source,
        kind: kind.cloudevent_type(),
        time,
        datacontenttype: "application/json",
        data,
    };
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_vec(&envelope).expect("CloudEvent data serialises")
}

/// The hash in event ids (offers, prompts, triggers): 20 hex of SHA-256 over the NUL-separated parts, so an id
/// is the same wherever the same decision is made again.
pub fn short_hash(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    let d = h.finalize();
    d[..10].iter().map(|b| format!("{b:02x}")).collect()
}

/// The `data` of a CloudEvent this module encoded, read back.
pub fn decode_data<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    #[derive(serde::Deserialize)]
    struct Data<T> {
        data: T,
    }
    serde_json::from_slice::<Data<T>>(bytes)
        .ok()
        .map(|d| d.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_every_required_attribute() {
        let bytes = encode(
            EventKind::Transaction,
            "s1:r1:20260101:1",
            "s1",
            "2026-01-01T10:00:00Z".parse().unwrap(),
            &serde_json::json!({"total": 100}),
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "s1:r1:20260101:1");
        assert_eq!(v["source"], "/stores/s1");
        assert_eq!(v["type"], "storelink.transaction.v1");
        assert_eq!(v["time"], "2026-01-01T10:00:00Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["total"], 100);
    }

    #[test]
    fn names_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.name()), Some(k));
            assert!(k.cloudevent_type().ends_with(".v1"));
        }
    }
}
