//! Who caused an event and why, recorded with every event.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// The party a command acted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    User(Uuid),
    /// The server itself: the scheduler, webhooks, the command line.
    System,
}

impl Serialize for Actor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::User(id) => serializer.collect_str(id),
            Self::System => serializer.serialize_str("system"),
        }
    }
}

impl<'de> Deserialize<'de> for Actor {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "system" {
            return Ok(Self::System);
        }
        Uuid::parse_str(&text)
            .map(Self::User)
            .map_err(serde::de::Error::custom)
    }
}

/// Captured once at the edge (HTTP request or scheduler run) and passed with
/// the command, so that every event it causes can be traced back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub actor: Actor,
    /// The HTTP request id, or the id of the scheduler or CLI run.
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl Metadata {
    /// As stored with events: serialized once and shared by every event of
    /// a command.
    pub fn to_json(&self) -> Result<Arc<RawValue>, serde_json::Error> {
        serde_json::value::to_raw_value(self).map(Arc::from)
    }

    pub fn system(correlation_id: impl Into<String>) -> Self {
        Self {
            actor: Actor::System,
            correlation_id: correlation_id.into(),
            idempotency_key: None,
        }
    }

    pub fn user(user_id: Uuid, correlation_id: impl Into<String>) -> Self {
        Self {
            actor: Actor::User(user_id),
            correlation_id: correlation_id.into(),
            idempotency_key: None,
        }
    }

    pub fn with_idempotency_key(mut self, key: Option<String>) -> Self {
        self.idempotency_key = key;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_json() {
        let user = Uuid::new_v4();
        for metadata in [
            Metadata::system("run-1"),
            Metadata::user(user, "req-2").with_idempotency_key(Some("key".into())),
        ] {
            let json = serde_json::to_value(&metadata).unwrap();
            assert_eq!(serde_json::from_value::<Metadata>(json).unwrap(), metadata);
        }
        let json = serde_json::to_value(Metadata::user(user, "r")).unwrap();
        assert_eq!(json["actor"], user.to_string());
    }
}
