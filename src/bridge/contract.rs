//! The written contract, checked on arrival: every event is validated against the JSON
//! Schema of its type in `docs/schemas/`, compiled into the binary.
//!
//! Invariants: an event is either valid, with its envelope read, or refused with a reason a
//! data engineer can act on (the type, and the first errors with their JSON paths); nothing
//! is fetched from the network or the disk to resolve a schema.

use std::collections::HashMap;

use serde_json::Value;

use crate::events::EventKind;

/// Where the schema files live, as URIs; nothing is fetched from here.
const BASE_URI: &str = "file:///storelink/docs/schemas/";

/// Every schema an event's schema can reference, by file name.
const SCHEMAS: [(&str, &str); 12] = [
    (
        "cloudevent.schema.json",
        include_str!("../../docs/schemas/cloudevent.schema.json"),
    ),
    (
        "storelink.transaction.v1.schema.json",
        include_str!("../../docs/schemas/storelink.transaction.v1.schema.json"),
    ),
    (
        "storelink.presence.v1.schema.json",
        include_str!("../../docs/schemas/storelink.presence.v1.schema.json"),
    ),
    (
        "storelink.offer.v1.schema.json",
        include_str!("../../docs/schemas/storelink.offer.v1.schema.json"),
    ),
    (
        "storelink.prompt.v1.schema.json",
        include_str!("../../docs/schemas/storelink.prompt.v1.schema.json"),
    ),
    (
        "storelink.redemption.v1.schema.json",
        include_str!("../../docs/schemas/storelink.redemption.v1.schema.json"),
    ),
    (
        "storelink.status.v1.schema.json",
        include_str!("../../docs/schemas/storelink.status.v1.schema.json"),
    ),
    (
        "storelink.deadletter.v1.schema.json",
        include_str!("../../docs/schemas/storelink.deadletter.v1.schema.json"),
    ),
    (
        "storelink.erasure.v1.schema.json",
        include_str!("../../docs/schemas/storelink.erasure.v1.schema.json"),
    ),
    (
        "storelink.customer.v1.schema.json",
        include_str!("../../docs/schemas/storelink.customer.v1.schema.json"),
    ),
    (
        "storelink.trigger.v1.schema.json",
        include_str!("../../docs/schemas/storelink.trigger.v1.schema.json"),
    ),
    (
        "storelink.followups.v1.schema.json",
        include_str!("../../docs/schemas/storelink.followups.v1.schema.json"),
    ),
];

/// A valid event's envelope, as the sinks need it.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub kind: EventKind,
    /// The store id (`source` is `/stores/{store}`).
    pub store: String,
    /// RFC 3339, as sent.
    pub time: String,
    /// The whole event, as sent.
    pub raw: Value,
}

/// The validators, one per event type; built once.
pub struct Contract {
    events: HashMap<&'static str, (EventKind, jsonschema::Validator)>,
}

impl Contract {
    /// Builds every validator. Panics only if the embedded schemas do not compile, which the
    /// contract test rules out.
    pub fn new() -> Contract {
        let resources: Vec<(String, Value)> = SCHEMAS
            .iter()
            .map(|(name, text)| {
                let schema = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("docs/schemas/{name}: not JSON: {e}"));
                (format!("{BASE_URI}{name}"), schema)
            })
            .collect();
        let registry = jsonschema::Registry::new()
            .extend(resources)
            .and_then(|builder| builder.prepare())
            .unwrap_or_else(|e| panic!("docs/schemas: the schemas do not resolve: {e}"));
        let events = EventKind::ALL
            .into_iter()
            .map(|kind| {
                let name = format!("{}.schema.json", kind.cloudevent_type());
                let validator = jsonschema::options()
                    .with_registry(&registry)
                    .should_validate_formats(true)
                    .build(&serde_json::json!({ "$ref": format!("{BASE_URI}{name}") }))
                    .unwrap_or_else(|e| panic!("docs/schemas/{name}: {e}"));
                (kind.cloudevent_type(), (kind, validator))
            })
            .collect();
        Contract { events }
    }

    /// The event in `payload`, or why it is refused.
    pub fn check(&self, payload: &[u8]) -> Result<Envelope, String> {
        let raw: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
        let Some(ty) = raw.get("type").and_then(Value::as_str) else {
            return Err("no CloudEvent `type`".into());
        };
        let Some((kind, validator)) = self.events.get(ty) else {
            return Err(format!("unknown event type {ty:?}"));
        };
        let errors: Vec<String> = validator
            .iter_errors(&raw)
            .take(3)
            .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
            .collect();
        if !errors.is_empty() {
            return Err(format!("{ty}: {}", errors.join("; ")));
        }
        // The schema guarantees these.
        let text = |k: &str| {
            raw.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let source = text("source");
        Ok(Envelope {
            id: text("id"),
            kind: *kind,
            store: source.trim_start_matches("/stores/").to_string(),
            time: text("time"),
            raw,
        })
    }
}

impl Default for Contract {
    fn default() -> Self {
        Contract::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_has_its_schema_compiled_in_and_a_bad_event_says_why() {
        assert_eq!(SCHEMAS.len(), EventKind::ALL.len() + 1);
        let c = Contract::new();
        let good = crate::events::encode(
            EventKind::Status,
            "s1:status:1",
            "s1",
            "2026-12-04T10:00:00Z".parse().unwrap(),
            &serde_json::json!({}),
        );
        // A status event with empty data is not valid: the reason names the type.
        let err = c.check(&good).unwrap_err();
        assert!(err.starts_with("storelink.status.v1: at "), "{err}");
        assert!(c.check(b"{").unwrap_err().starts_with("not JSON"));
        assert!(
            c.check(br#"{"type":"storelink.nope.v1"}"#)
                .unwrap_err()
                .contains("unknown event type")
        );
    }
}
