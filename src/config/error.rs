//! Config errors: every one names the file and the key path, and the line where TOML itself
//! failed.

use super::*;

/// One thing wrong with a config file, at one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `registers[0].transport.bind`. Empty for syntax errors.
    pub key: String,
    pub message: String,
}

impl Problem {
    /// A problem at `key`.
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl std::error::Error for Problem {}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the file: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

pub(super) fn render_problems(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| {
            if p.key.is_empty() {
                format!("{file}: {}", p.message)
            } else {
                format!("{file}: {}: {}", p.key, p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(super) fn parse_toml(text: &str) -> Result<Config, Problem> {
    deserialize_toml(text)
}

/// Reads any TOML document strictly; the error names the key (`key.path`) and the line. Shared
/// by the config and the files it points to (receipt templates).
pub(crate) fn deserialize_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Problem> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| syntax_problem(text, &e))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        key_problem(text, &path, &inner)
    })
}

pub(super) fn syntax_problem(text: &str, error: &toml::de::Error) -> Problem {
    let line = error
        .span()
        .map(|s| format!("line {}: ", line_of(text, s.start)))
        .unwrap_or_default();
    Problem {
        key: String::new(),
        message: format!("{line}{}", error.message().trim()),
    }
}

/// Turns serde's messages into the key-first shape. serde reports an unknown or missing field
/// against the table that holds it, so the field name moves into the path.
pub(super) fn key_problem(text: &str, path: &str, error: &toml::de::Error) -> Problem {
    let message = error.message().trim();
    // serde_path_to_error already ends the path with an unknown field, but not a missing one.
    let join = |field: &str| {
        if path.is_empty() || path == "." {
            field.to_string()
        } else if path == field || path.ends_with(&format!(".{field}")) {
            path.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    let line = error
        .span()
        .map(|s| format!(" (line {})", line_of(text, s.start)))
        .unwrap_or_default();
    if let Some(field) = backticked_after(message, "unknown field ") {
        let expected = message
            .split_once(", expected ")
            .map(|(_, e)| format!(" (expected {})", e.replace('`', "")))
            .unwrap_or_default();
        return Problem {
            key: join(field),
            message: format!("unknown key{expected}{line}"),
        };
    }
    if let Some(field) = backticked_after(message, "missing field ") {
        return Problem {
            key: join(field),
            message: "missing required key".into(),
        };
    }
    let key = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    Problem {
        key,
        message: format!("{message}{line}"),
    }
}

pub(super) fn backticked_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split_once('`').map(|(field, _)| field)
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
