//! The webhook's body template (`[[email]] template` in `bridge.toml`): JSON in which a
//! string `"{{name}}"` stands for a value and `{{name}}` inside a longer string for its text.
//!
//! Invariants: a template is parsed, and its names checked, when the config is loaded (so a
//! typo is a config error naming the key); rendering builds a JSON value, never text, so no
//! value can break the body's quoting.

use serde_json::Value;

/// The webhook's body template: JSON in which a string `"{{name}}"` is replaced by the value
/// (any JSON), and `{{name}}` inside a longer string by its text.
#[derive(Debug, Clone)]
pub struct Template(Value);

/// What a template may name.
pub const TEMPLATE_NAMES: [&str; 8] = [
    "external_id",
    "trigger",
    "occasion",
    "properties",
    "key",
    "at",
    "event_id",
    "store",
];

const DEFAULT_TEMPLATE: &str = r#"{"customer": "{{external_id}}", "trigger": "{{trigger}}",
"occasion": "{{occasion}}", "occurred_at": "{{at}}", "idempotency_key": "{{key}}",
"store": "{{store}}", "properties": "{{properties}}"}"#;

impl Template {
    /// Parses a template (the default when `None`); the error says what is wrong.
    pub fn parse(text: Option<&str>) -> Result<Template, String> {
        let value: Value = serde_json::from_str(text.unwrap_or(DEFAULT_TEMPLATE))
            .map_err(|e| format!("not JSON: {e}"))?;
        let mut unknown = Vec::new();
        visit_strings(&value, &mut |s| {
            for name in placeholders(s) {
                if !TEMPLATE_NAMES.contains(&name) {
                    unknown.push(name.to_string());
                }
            }
        });
        if unknown.is_empty() {
            Ok(Template(value))
        } else {
            Err(format!(
                "unknown placeholder {}; one of {}",
                unknown.join(", "),
                TEMPLATE_NAMES.join(", ")
            ))
        }
    }

    /// The body, with each name's value from `vars` (one of [`TEMPLATE_NAMES`]).
    pub fn render(&self, vars: &dyn Fn(&str) -> Value) -> Value {
        fill(&self.0, vars)
    }
}

/// The `{{name}}`s in a string.
fn placeholders(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find("{{") {
        let Some(close) = rest[open..].find("}}") else {
            break;
        };
        out.push(rest[open + 2..open + close].trim());
        rest = &rest[open + close + 2..];
    }
    out
}

fn visit_strings(v: &Value, f: &mut impl FnMut(&str)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().for_each(|x| visit_strings(x, f)),
        Value::Object(o) => o.values().for_each(|x| visit_strings(x, f)),
        _ => {}
    }
}

fn fill(v: &Value, vars: &dyn Fn(&str) -> Value) -> Value {
    match v {
        Value::String(s) => {
            let names = placeholders(s);
            if names.len() == 1 && s.trim() == format!("{{{{{}}}}}", names[0]) {
                return vars(names[0]);
            }
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(open) = rest.find("{{") {
                let Some(close) = rest[open..].find("}}") else {
                    break;
                };
                out.push_str(&rest[..open]);
                match vars(rest[open + 2..open + close].trim()) {
                    Value::String(t) => out.push_str(&t),
                    Value::Null => {}
                    other => out.push_str(&other.to_string()),
                }
                rest = &rest[open + close + 2..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| fill(x, vars)).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, x)| (k.clone(), fill(x, vars))).collect())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use serde_json::json;

    /// What the email sink hands a template for one trigger.
    fn vars(occasion: &str, external_id: &str) -> impl Fn(&str) -> Value {
        let (occasion, external_id) = (occasion.to_string(), external_id.to_string());
        move |name| match name {
            "external_id" => json!(external_id),
            "trigger" => json!("winback_due"),
            "occasion" => json!(occasion),
            "properties" => json!({"group": "coffee", "store": "s042"}),
            "store" => json!("s042"),
            _ => Value::Null,
        }
    }

    #[test]
    fn a_template_fills_whole_values_and_text_and_refuses_unknown_names() {
        let t = Template::parse(Some(
            r#"{"to": "{{external_id}}", "props": "{{properties}}", "subject": "due: {{trigger}} at {{store}}", "n": 3}"#,
        ))
        .unwrap();
        let v = t.render(&vars("coffee:2026-10-02", "ext-9"));
        assert_eq!(v["to"], "ext-9");
        assert_eq!(v["props"]["group"], "coffee");
        assert_eq!(v["subject"], "due: winback_due at s042");
        assert_eq!(v["n"], 3);
        let err = Template::parse(Some(r#"{"x": "{{email}}"}"#)).unwrap_err();
        assert!(err.contains("email"), "{err}");
        assert!(Template::parse(Some("{")).unwrap_err().contains("not JSON"));
        assert!(Template::parse(None).is_ok());
    }

    proptest! {
        /// Whatever text a trigger carries, a rendered template is JSON with the values in
        /// place, never a body broken by quoting.
        #[test]
        fn any_values_render_into_valid_json(occasion in ".{0,40}", ext in ".{0,40}") {
            let t = Template::parse(Some(r#"{"o": "{{occasion}}", "s": "x{{external_id}}y"}"#)).unwrap();
            let v = t.render(&vars(&occasion, &ext));
            let text = serde_json::to_string(&v).unwrap();
            let back: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&back["o"], &json!(occasion));
            prop_assert_eq!(&back["s"], &json!(format!("x{ext}y")));
        }
    }
}
