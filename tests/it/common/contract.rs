//! The written contract with central: every CloudEvent a test's central receives is checked
//! against the JSON Schema of its type in `docs/schemas/` (see `docs/asyncapi.yaml`).
//!
//! The schemas reference each other by relative file name (`cloudevent.schema.json`, …), as a
//! file-based tool resolves them. jsonschema is built without file or network resolution, so
//! every `*.schema.json` of the directory is registered under one base URI and the relative
//! references resolve inside that registry; a reference to anything else fails when the
//! validators are built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use storelink::events::EventKind;

/// Where the schema files live, as URIs; nothing is fetched from here.
const BASE_URI: &str = "file:///storelink/docs/schemas/";

/// `docs/schemas/` of the repository.
pub fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas")
}

/// The schema file of an event kind: `docs/schemas/{type}.schema.json`.
pub fn schema_file(kind: EventKind) -> PathBuf {
    schema_dir().join(schema_name(kind.cloudevent_type()))
}

fn schema_name(event_type: &str) -> String {
    format!("{event_type}.schema.json")
}

struct Contract {
    /// CloudEvent type → its validator.
    events: HashMap<&'static str, jsonschema::Validator>,
    /// File name → validator, for every schema file (downlink messages included).
    files: HashMap<String, jsonschema::Validator>,
}

fn contract() -> &'static Contract {
    static CONTRACT: OnceLock<Contract> = OnceLock::new();
    CONTRACT.get_or_init(load)
}

fn load() -> Contract {
    let dir = schema_dir();
    let mut resources = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".schema.json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let schema: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        resources.push((name, schema));
    }
    let registry = jsonschema::Registry::new()
        .extend(
            resources
                .iter()
                .map(|(name, schema)| (format!("{BASE_URI}{name}"), schema.clone())),
        )
        .and_then(|builder| builder.prepare())
        .unwrap_or_else(|e| panic!("{}: the schemas do not resolve: {e}", dir.display()));
    let build = |name: &str| {
        jsonschema::options()
            .with_registry(&registry)
            .should_validate_formats(true)
            .build(&serde_json::json!({ "$ref": format!("{BASE_URI}{name}") }))
            .unwrap_or_else(|e| panic!("docs/schemas/{name}: {e}"))
    };
    let files = resources
        .iter()
        .map(|(name, _)| (name.clone(), build(name)))
        .collect();
    let events = EventKind::ALL
        .into_iter()
        .map(|kind| {
            let name = schema_name(kind.cloudevent_type());
            assert!(
                resources.iter().any(|(n, _)| *n == name),
                "docs/schemas/{name} is missing: every event type needs its schema"
            );
            (kind.cloudevent_type(), build(&name))
        })
        .collect();
    Contract { events, files }
}

/// Whether `message` is one of the agent's CloudEvents (an object with `specversion` and a
/// `type` starting with `storelink.`). Anything else on the topics a test's central hears
/// (scanner reports, downlink messages tests publish themselves) is not checked.
pub fn is_storelink_event(message: &Value) -> bool {
    message.get("specversion").is_some()
        && message
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.starts_with("storelink."))
}

/// The validation errors of a CloudEvent against the schema of its `type`; an unknown type is
/// an error too. Empty when it matches.
pub fn errors(event: &Value) -> Vec<String> {
    let Some(kind) = event.get("type").and_then(Value::as_str) else {
        return vec!["no `type`".into()];
    };
    let Some(validator) = contract().events.get(kind) else {
        return vec![format!(
            "unknown event type {kind:?}: no docs/schemas/{}",
            schema_name(kind)
        )];
    };
    validator
        .iter_errors(event)
        .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
        .collect()
}

/// The validation errors of a message against one schema file of `docs/schemas/`.
pub fn errors_against(file: &str, message: &Value) -> Vec<String> {
    let validator = contract()
        .files
        .get(file)
        .unwrap_or_else(|| panic!("no docs/schemas/{file}"));
    validator
        .iter_errors(message)
        .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
        .collect()
}

/// Panics, naming the event's type and id and every validation error, when one of the agent's
/// CloudEvents does not match its schema. Other messages pass unchecked.
pub fn check(message: &Value) {
    if !is_storelink_event(message) {
        return;
    }
    let errors = errors(message);
    if !errors.is_empty() {
        panic!(
            "contract violation: {} event {} does not match docs/schemas/{}:\n  {}\nevent: {message}",
            message["type"].as_str().unwrap_or("?"),
            message["id"],
            schema_name(message["type"].as_str().unwrap_or("?")),
            errors.join("\n  ")
        );
    }
}
