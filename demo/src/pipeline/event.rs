//! The event a client publishes: `{"kind": "...", "payload": ...}`.

use serde::Deserialize;

/// Longest accepted `kind`; kinds are identifiers, not data.
pub const MAX_KIND_LEN: usize = 64;

/// One published event, validated.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    pub kind: String,
    /// Any JSON value; a missing payload is stored as JSON `null`.
    #[serde(default)]
    pub payload: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not an event object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`kind` must be 1 to {MAX_KIND_LEN} bytes, got {len}")]
    KindLength { len: usize },
}

impl Event {
    pub fn parse(text: &str) -> Result<Event, EventError> {
        let event: Event = serde_json::from_str(text)?;
        let len = event.kind.len();
        if len == 0 || len > MAX_KIND_LEN {
            return Err(EventError::KindLength { len });
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_and_defaults_payload() {
        let e = Event::parse(r#"{"kind":"click","payload":{"x":1}}"#).expect("valid");
        assert_eq!(e.kind, "click");
        assert_eq!(e.payload["x"], 1);
        let e = Event::parse(r#"{"kind":"view"}"#).expect("valid");
        assert!(e.payload.is_null());
    }

    #[test]
    fn rejects_what_is_not_an_event() {
        assert!(Event::parse("hello").is_err());
        assert!(Event::parse(r#"{"payload":1}"#).is_err());
        assert!(Event::parse(r#"{"kind":""}"#).is_err());
        assert!(Event::parse(&format!(r#"{{"kind":"{}"}}"#, "k".repeat(65))).is_err());
    }
}
