//! What presence tells the core: a consenting customer entered, dwelt in or left a place.

use std::sync::Arc;

use jiff::Timestamp;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PresenceKind {
    Entered,
    Dwelling,
    Left,
}

impl PresenceKind {
    /// The name in `storelink.presence.v1`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceKind::Entered => "entered",
            PresenceKind::Dwelling => "dwelling",
            PresenceKind::Left => "left",
        }
    }
}

/// A presence change as the core sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceEvent {
    pub id: String,
    pub customer_id: Arc<str>,
    pub kind: PresenceKind,
    /// The zone, or `None` for the store as a whole.
    pub zone: Option<String>,
    pub lane: Option<String>,
    pub at: Timestamp,
    pub confidence: f32,
    pub distance_m: Option<f32>,
}
