//! The directory of accounts and API keys (SPEC §2, §6), with two engines:
//! the node's SQLite store (one node), or the shared Redis (cluster mode,
//! `REDIS_URL` set: every node reads and writes the same accounts and keys).
//!
//! [`crate::accounts::Accounts`], the API-key routes and the key check of
//! the publish endpoints go through [`Directory`] only; the rules (username
//! and name syntax, case-insensitive uniqueness per tenant, keys stored as
//! their SHA-256 only) are the store's helpers, applied by both engines.
//! Errors are [`DirectoryError`]s, mapped to HTTP once in [`crate::error`]:
//! a directory that cannot answer now (Redis down, the store busy) is a 503.

pub mod redis;

use std::path::Path;

use crate::auth::Role;
use crate::config::RedisSettings;
use crate::store::{ApiKeyInfo, Store, StoreError, User, UserRecord};

pub use self::redis::RedisDirectory;

/// Why a directory call failed. The text is safe for a log (never a
/// password, a hash, a key or the Redis URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// A taken username (409).
    #[error("{0}")]
    Conflict(String),
    /// Input that breaks a rule (422).
    #[error("{0}")]
    Invalid(String),
    /// Redis unreachable, or the store busy or closed: retry later (503).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for DirectoryError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(text) => DirectoryError::Conflict(text),
            StoreError::Invalid(text) => DirectoryError::Invalid(text),
            StoreError::Busy(_) | StoreError::Closed => {
                DirectoryError::Unavailable(error.to_string())
            }
            other => DirectoryError::Internal(other.to_string()),
        }
    }
}

impl From<crate::redis::RedisError> for DirectoryError {
    fn from(error: crate::redis::RedisError) -> Self {
        DirectoryError::Unavailable(error.to_string())
    }
}

/// Accounts and API keys, in SQLite or in Redis. Cloning is cheap.
#[derive(Debug, Clone)]
pub enum Directory {
    Sqlite(Store),
    /// Boxed: a Redis handle is large, a store handle one pointer.
    Redis(Box<RedisDirectory>),
}

/// One call on whichever engine, with the store's errors made the directory's.
macro_rules! on_engine {
    ($self:ident, $engine:ident => $call:expr) => {
        match $self {
            Directory::Sqlite($engine) => $call.await.map_err(DirectoryError::from),
            Directory::Redis($engine) => $call.await,
        }
    };
}

impl Directory {
    /// The shared Redis when cluster mode has one, else the node's store.
    pub fn new(store: &Store, redis: Option<&crate::redis::Redis>) -> Directory {
        match redis {
            Some(redis) => Directory::Redis(Box::new(RedisDirectory::new(redis.clone()))),
            None => Directory::Sqlite(store.clone()),
        }
    }

    /// Accounts in every tenant.
    pub async fn count_users(&self) -> Result<u64, DirectoryError> {
        on_engine!(self, engine => engine.count_users())
    }

    /// A new account; [`DirectoryError::Conflict`] when the username is taken
    /// in `tenant` (case-insensitively).
    pub async fn create_user(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<User, DirectoryError> {
        on_engine!(self, engine => engine.create_user(tenant, username, password_hash, role))
    }

    /// The bootstrap account: created only when the directory holds none;
    /// None when another node (or another process on the same file) created
    /// one first. Redis decides in one script, so of nodes that boot
    /// together exactly one gets `Some`.
    pub async fn create_first_user(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<Option<User>, DirectoryError> {
        match self {
            Directory::Sqlite(store) => {
                match store
                    .create_user(tenant, username, password_hash, role)
                    .await
                {
                    Ok(user) => Ok(Some(user)),
                    Err(StoreError::Conflict(_)) => Ok(None),
                    Err(other) => Err(other.into()),
                }
            }
            Directory::Redis(redis) => {
                redis
                    .create_first_user(tenant, username, password_hash, role)
                    .await
            }
        }
    }

    /// The account `username` of `tenant`, with its hash, for a login.
    pub async fn user_by_name(
        &self,
        tenant: &str,
        username: &str,
    ) -> Result<Option<UserRecord>, DirectoryError> {
        on_engine!(self, engine => engine.user_by_name(tenant, username))
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, DirectoryError> {
        on_engine!(self, engine => engine.user_by_id(id))
    }

    /// Replaces the password hash of `username` in `tenant`; false when there
    /// is no such account.
    pub async fn set_password_hash(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, DirectoryError> {
        on_engine!(self, engine => engine.set_password_hash(tenant, username, password_hash))
    }

    /// Records a new key of `tenant` (`key_hash` and `prefix` from
    /// [`crate::store::new_api_key`]; the key itself is never stored).
    pub async fn create_api_key(
        &self,
        tenant: &str,
        name: &str,
        key_hash: [u8; 32],
        prefix: &str,
    ) -> Result<ApiKeyInfo, DirectoryError> {
        on_engine!(self, engine => engine.create_api_key(tenant, name, key_hash, prefix))
    }

    /// The active keys of `tenant`, oldest first, without secrets.
    pub async fn list_api_keys(&self, tenant: &str) -> Result<Vec<ApiKeyInfo>, DirectoryError> {
        on_engine!(self, engine => engine.list_api_keys(tenant))
    }

    /// Revokes key `id` of `tenant`; false when there is no such active key.
    /// Once this returns, the key is refused (by every node, with Redis).
    pub async fn revoke_api_key(&self, tenant: &str, id: &str) -> Result<bool, DirectoryError> {
        on_engine!(self, engine => engine.revoke_api_key(tenant, id))
    }

    /// The active key with this hash, if any, noting its use without making
    /// the caller wait for that write (SQLite: the writer's next batch;
    /// Redis: inside the lookup's own script, at most once a second).
    pub async fn use_api_key(
        &self,
        key_hash: [u8; 32],
    ) -> Result<Option<ApiKeyInfo>, DirectoryError> {
        match self {
            Directory::Sqlite(store) => {
                let found = store.api_key_by_hash(key_hash).await?;
                if let Some(info) = &found {
                    store.touch_api_key(&info.id);
                }
                Ok(found)
            }
            Directory::Redis(redis) => redis.use_api_key(key_hash).await,
        }
    }
}

/// `agentcast admin reset-password`: sets `password_hash` on `username` of
/// `tenant` in the shared Redis when `redis` is given (cluster mode), else
/// in the store of `data_dir` (SQLite lets this second writer in between a
/// running server's commits). False when there is no such account.
pub async fn reset_password_hash(
    redis: Option<&RedisSettings>,
    data_dir: &Path,
    tenant: &str,
    username: &str,
    password_hash: &str,
) -> Result<bool, DirectoryError> {
    match redis {
        Some(settings) => {
            let redis = crate::redis::Redis::connect(settings, "admin-cli").await?;
            Directory::Redis(Box::new(RedisDirectory::new(redis)))
                .set_password_hash(tenant, username, password_hash)
                .await
        }
        None => {
            let store = Store::open(data_dir)?;
            let updated = store
                .set_password_hash(tenant, username, password_hash)
                .await;
            store.close().await;
            Ok(updated?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_redis_errors_keep_their_meaning() {
        assert_eq!(
            DirectoryError::from(StoreError::Conflict("taken".into())),
            DirectoryError::Conflict("taken".into())
        );
        assert!(matches!(
            DirectoryError::from(StoreError::Invalid("bad".into())),
            DirectoryError::Invalid(_)
        ));
        assert!(matches!(
            DirectoryError::from(StoreError::Closed),
            DirectoryError::Unavailable(_)
        ));
        assert!(matches!(
            DirectoryError::from(StoreError::Corrupt("x".into())),
            DirectoryError::Internal(_)
        ));
        assert!(matches!(
            DirectoryError::from(crate::redis::RedisError("refused".into())),
            DirectoryError::Unavailable(_)
        ));
    }
}
