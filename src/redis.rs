//! The shared Redis of cluster mode (SPEC §6): one connection manager for
//! commands, with explicit connect and response timeouts, and the names of
//! every key, all under `REDIS_PREFIX`.
//!
//! Who uses it: the log's Redis engine (`log::redis`: the publish script, the
//! history, the subscriber, the views the script writes), the presence of
//! every node ([`presence`]), and the directory of accounts and API keys
//! ([`crate::directory::redis`]), which every node shares with no cache.
//!
//! The views' read side ([`views`]) answers `GET /api/v1/tasks` and
//! `/agents` from the entries the publish script writes, so every node
//! lists the same.
//!
//! The key layout (`P` = the prefix, `S` = a stream id, see
//! [`Keys::stream_id`]):
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `P:streams` | set | the id of every stream that has a log |
//! | `P:log:S` | hash | `epoch`, `seq` (the head), `bytes` (history size) |
//! | `P:hist:S` | sorted set | history: score `seq`, member the [`payload`](crate::log) |
//! | `P:events` | pub/sub | every committed message, as the same payload |
//! | `P:probe:NODE` | pub/sub | the node's liveness probe |
//! | `P:nodes` | sorted set | node id -> last heartbeat (Unix ms) |
//! | `P:presence:NODE` | hash | the node's connection counts (expires) |
//! | `P:view:T:tasks`, `P:view:T:agents` | sorted set | id -> seq of every entry (admins read it) |
//! | `P:view:T:tasks:b`, `P:view:T:agents:b` | sorted set | id -> seq of the entries a broadcast set |
//! | `P:view:T:tasks:u:USER`, `P:view:T:agents:u:USER` | sorted set | id -> seq of the entries a message to USER set |
//! | `P:view:T:task:ID`, `P:view:T:agent:ID` | hash | one view entry |
//! | `P:users` | set | the id of every account (empty: bootstrap the admin) |
//! | `P:user:ID` | hash | an account: `id`, `tenant`, `username`, `hash` (argon2id), `role`, `created_at` |
//! | `P:username:T:NAME` | string | the id of the account `NAME` (ASCII lower case) of tenant `T` |
//! | `P:apikey:ID` | hash | a key: `id`, `tenant`, `name`, `prefix`, `key_hash`, `created_at`, `last_used_at`, `revoked_at` (never the key) |
//! | `P:apikey-hash:H` | string | the id of the active key whose SHA-256 is `H` (hex); deleted at revoke |
//! | `P:apikeys:T` | sorted set | the active keys of tenant `T`: id -> creation time (ms) |

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{aio::ConnectionManagerConfig, Client};

use crate::config::RedisSettings;
use crate::log::StreamKey;

pub mod presence;
pub mod views;

/// Each connection attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Each command, the publish script included: a publish never hangs on a
/// wedged Redis; it gets 503.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A Redis error as the rest of the server sees it: a text that never holds
/// the URL (which may carry a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redis: {0}")]
pub struct RedisError(pub String);

impl From<redis::RedisError> for RedisError {
    fn from(error: redis::RedisError) -> Self {
        // redis-rs errors name the kind and the server's message, never the URL.
        RedisError(error.to_string())
    }
}

/// Makes ring the process's rustls provider, once: redis-rs builds the TLS
/// config of a `rediss://` URL with the process default and panics without
/// one. A provider installed before (by us or a library) is kept.
fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Clone-able handle to the shared Redis.
#[derive(Clone)]
pub struct Redis {
    client: Client,
    commands: ConnectionManager,
    keys: Keys,
    node: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("Redis")
            .field("prefix", &self.keys.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects the command connection (it reconnects by itself afterwards).
    pub async fn connect(settings: &RedisSettings, node: &str) -> Result<Redis, RedisError> {
        install_tls_provider();
        let client = Client::open(settings.url.expose())
            .map_err(|e| RedisError(format!("REDIS_URL is not usable: {:?}", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let commands = tokio::time::timeout(
            CONNECT_TIMEOUT * 3,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| RedisError("connect timed out".into()))??;
        Ok(Redis {
            client,
            commands,
            keys: Keys {
                prefix: settings.prefix.clone(),
            },
            node: node.to_owned(),
        })
    }

    /// A connection for commands; clones share one multiplexed connection.
    pub fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }

    /// The client, for the dedicated pub/sub connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// This node's `NODE_ID`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `PING` within the response timeout: whether Redis answers now.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut commands = self.commands();
        let _: String = redis::cmd("PING").query_async(&mut commands).await?;
        Ok(())
    }
}

/// The names of every key (see the table above).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A stream's id inside the keys: `T` for a tenant's log, `T#CHANNEL`
    /// for a channel (tenant names never hold `#`).
    pub fn stream_id(key: &StreamKey) -> String {
        key.name()
    }

    /// The inverse of [`Keys::stream_id`].
    pub fn stream_key(id: &str) -> StreamKey {
        StreamKey::from_name(id)
    }

    pub fn streams(&self) -> String {
        format!("{}:streams", self.prefix)
    }

    pub fn log(&self, stream_id: &str) -> String {
        format!("{}:log:{stream_id}", self.prefix)
    }

    pub fn history(&self, stream_id: &str) -> String {
        format!("{}:hist:{stream_id}", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    pub fn probe(&self, node: &str) -> String {
        format!("{}:probe:{node}", self.prefix)
    }

    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    pub fn presence(&self, node: &str) -> String {
        format!("{}:presence:{node}", self.prefix)
    }

    pub fn users(&self) -> String {
        format!("{}:users", self.prefix)
    }

    pub fn user(&self, id: &str) -> String {
        format!("{}:user:{id}", self.prefix)
    }

    /// Usernames compare case-insensitively (they are ASCII, as SQLite's
    /// `NOCASE` folds them); they hold no `:`, so the tenant before is whole.
    pub fn username(&self, tenant: &str, username: &str) -> String {
        format!(
            "{}:username:{tenant}:{}",
            self.prefix,
            username.to_ascii_lowercase()
        )
    }

    pub fn api_key(&self, id: &str) -> String {
        format!("{}:apikey:{id}", self.prefix)
    }

    /// `hash` is the key's SHA-256 in hex.
    pub fn api_key_hash(&self, hash: &str) -> String {
        format!("{}:apikey-hash:{hash}", self.prefix)
    }

    pub fn api_keys(&self, tenant: &str) -> String {
        format!("{}:apikeys:{tenant}", self.prefix)
    }

    /// `kind` is `tasks` or `agents`.
    pub fn view_index(&self, tenant: &str, kind: &str) -> String {
        format!("{}:view:{tenant}:{kind}", self.prefix)
    }

    /// The index of the entries a broadcast set (`user` `None`) or a
    /// message to `user` set; `kind` is `tasks` or `agents`. The publish
    /// script derives the same names from [`Keys::view_index`].
    pub fn view_audience(&self, tenant: &str, kind: &str, user: Option<&str>) -> String {
        match user {
            None => format!("{}:b", self.view_index(tenant, kind)),
            Some(user) => format!("{}:u:{user}", self.view_index(tenant, kind)),
        }
    }

    /// `kind` is `task` or `agent`.
    pub fn view_entry(&self, tenant: &str, kind: &str, id: &str) -> String {
        format!("{}:view:{tenant}:{kind}:{id}", self.prefix)
    }
}

/// The presence field of a tenant's connections, of its admins, of one user.
pub mod presence_field {
    pub fn tenant(tenant: &str) -> String {
        format!("t:{tenant}")
    }

    pub fn admins(tenant: &str) -> String {
        format!("a:{tenant}")
    }

    /// Tenant names hold no `:`, so the user id after the second one is whole.
    pub fn user(tenant: &str, user: &str) -> String {
        format!("u:{tenant}:{user}")
    }

    /// The subscribers of one channel.
    pub fn channel(tenant: &str, channel: &str) -> String {
        format!("c:{tenant}:{channel}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    /// A `rediss://` URL takes redis-rs's TLS path (which panics without a
    /// rustls provider); a peer that is no TLS server is a plain error that
    /// does not repeat the URL's password.
    #[tokio::test]
    async fn a_rediss_url_connects_over_tls_and_fails_cleanly_without_a_tls_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = tokio::spawn(async move {
            // Accept and hang up: no TLS handshake is ever answered.
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let settings = RedisSettings {
            url: Secret::new(format!("rediss://:hunter2hunter2@localhost:{port}/0")),
            prefix: "agentcast".to_owned(),
        };
        let error = Redis::connect(&settings, "test")
            .await
            .expect_err("no TLS server there");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        peer.abort();
    }
}
