//! The shared Redis connection: a cache and a rate-limit store, never the
//! only copy of anything.
//!
//! The connection is made lazily and every call has a short timeout, so a
//! dead Redis costs a request a few milliseconds and never an error.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::Settings;

#[derive(Clone)]
pub struct Redis {
    manager: Option<ConnectionManager>,
    prefix: String,
}

const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

impl Redis {
    pub fn connect_lazily(settings: &Settings) -> anyhow::Result<Self> {
        let client = redis::Client::open(settings.redis_url.expose_secret())
            .map_err(|e| anyhow::anyhow!("REDIS_URL is not a valid Redis URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            manager: Some(manager),
            prefix: settings.redis_key_prefix.clone(),
        })
    }

    /// The key under this deployment's prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    pub fn connection(&self) -> Option<ConnectionManager> {
        self.manager.clone()
    }

    /// Whether Redis answers right now.
    pub async fn ping(&self) -> Result<(), String> {
        let Some(mut connection) = self.connection() else {
            return Err("not configured".into());
        };
        let reply: Result<redis::RedisResult<String>, _> = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            redis::cmd("PING").query_async(&mut connection),
        )
        .await;
        match reply {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }
}
