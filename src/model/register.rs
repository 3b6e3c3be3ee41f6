//! What a register says besides transactions: live events (a card scanned, a basket changed)
//! that the offers service answers while the customer is still at the till.

use futures_util::future::BoxFuture;
use serde::Deserialize;

/// A live register event (`POST /pos/v1/events`, or a line on a JSON-lines register).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RegisterEvent {
    /// A loyalty card scanned or a phone number keyed.
    CustomerIdentified {
        #[serde(default)]
        register: Option<String>,
        #[serde(default)]
        lane: Option<String>,
        loyalty_id: String,
    },
    TransactionStarted {
        #[serde(default)]
        register: Option<String>,
        #[serde(default)]
        lane: Option<String>,
        #[serde(default)]
        loyalty_id: Option<String>,
    },
    BasketUpdated {
        #[serde(default)]
        register: Option<String>,
        #[serde(default)]
        lane: Option<String>,
        #[serde(default)]
        lines: Vec<serde_json::Value>,
    },
    TransactionEnded {
        #[serde(default)]
        register: Option<String>,
        #[serde(default)]
        lane: Option<String>,
    },
}

impl RegisterEvent {
    /// Names `register` as where the event happened when it names neither register nor lane.
    pub fn default_register(&mut self, name: &str) {
        match self {
            RegisterEvent::CustomerIdentified { register, lane, .. }
            | RegisterEvent::TransactionStarted { register, lane, .. }
            | RegisterEvent::BasketUpdated { register, lane, .. }
            | RegisterEvent::TransactionEnded { register, lane } => {
                if register.is_none() && lane.is_none() {
                    *register = Some(name.to_string());
                }
            }
        }
    }

    /// The register and the lane the event names.
    pub fn place(&self) -> (Option<&str>, Option<&str>) {
        match self {
            RegisterEvent::CustomerIdentified { register, lane, .. }
            | RegisterEvent::TransactionStarted { register, lane, .. }
            | RegisterEvent::BasketUpdated { register, lane, .. }
            | RegisterEvent::TransactionEnded { register, lane } => {
                (register.as_deref(), lane.as_deref())
            }
        }
    }
}

/// Whoever answers live register events (the offers service). A source holds it without
/// knowing who that is.
pub trait LiveEvents: Send + Sync + std::fmt::Debug {
    /// The event's effects as the JSON line the register reads, or why there are none.
    fn answer(&self, event: RegisterEvent) -> BoxFuture<'_, Result<String, String>>;
}
