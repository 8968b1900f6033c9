//! API keys (SPEC §2): made here, shown once, kept only as a SHA-256 hash.
//!
//! A key is `ak_` and 40 random base62 characters (~238 bits), so a plain
//! SHA-256 is enough to store it: there is nothing to brute-force, unlike a
//! password. Lookups by hash go through a small cache of active keys that a
//! revoke empties after its commit, so a revoked key fails at once.

use rand::distr::{Alphanumeric, SampleString};
use rusqlite::{params, Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use super::{check_name, new_id, now_ms, ApiKeyInfo, Store, StoreError};

const KEY_PREFIX: &str = "ak_";
const KEY_RANDOM_CHARS: usize = 40;
/// Characters of the key kept in clear to recognise it in a list.
const SHOWN_PREFIX_CHARS: usize = KEY_PREFIX.len() + 6;
/// Keys listed per tenant; a tenant with more sees the oldest this many.
pub(crate) const MAX_LISTED: i64 = 1000;
/// Longest key name, in bytes.
const MAX_KEY_NAME: usize = 100;

/// A new key: `(key, sha256 of the key, prefix)`. Show the key once, store
/// the hash and the prefix.
pub fn new_api_key() -> (String, [u8; 32], String) {
    let key = format!(
        "{KEY_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), KEY_RANDOM_CHARS)
    );
    let hash = hash_api_key(&key);
    let prefix = key[..SHOWN_PREFIX_CHARS].to_owned();
    (key, hash, prefix)
}

pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether a bearer credential has the shape of an API key (so it is not
/// tried as a JWT).
pub fn looks_like_api_key(credential: &str) -> bool {
    credential.strip_prefix(KEY_PREFIX).is_some_and(|rest| {
        (32..=128).contains(&rest.len()) && rest.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

impl Store {
    /// Records a new key of `tenant`. `key_hash` and `prefix` come from
    /// [`new_api_key`].
    pub async fn create_api_key(
        &self,
        tenant: &str,
        name: &str,
        key_hash: [u8; 32],
        prefix: &str,
    ) -> Result<ApiKeyInfo, StoreError> {
        let info = new_key_info(tenant, name, prefix)?;
        self.write(
            move |conn| {
                insert_key(conn, &info, &key_hash)?;
                Ok(info)
            },
            |_| {},
        )
        .await
    }

    /// The active keys of `tenant`, oldest first ([`MAX_LISTED`] at most), without secrets.
    pub async fn list_api_keys(&self, tenant: &str) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, tenant, name, prefix, created_at, last_used_at FROM api_keys
                 WHERE tenant = ?1 AND revoked_at IS NULL
                 ORDER BY created_at, id LIMIT ?2",
            )?
            .query_map(params![tenant, MAX_LISTED], key_from_row)?
            .collect::<Result<_, _>>()
            .map_err(StoreError::from)
        })
        .await
    }

    /// Revokes key `id` of `tenant`; false when there is no such active key.
    /// Once this returns, [`Store::api_key_by_hash`] no longer finds it.
    pub async fn revoke_api_key(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        if check_name("key id", id).is_err() {
            return Ok(false);
        }
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        let forget_id = id.clone();
        let key_cache = self.inner.key_cache.clone();
        self.write(
            move |conn| {
                let changed = conn
                    .prepare_cached(
                        "UPDATE api_keys SET revoked_at = ?3
                         WHERE id = ?1 AND tenant = ?2 AND revoked_at IS NULL",
                    )?
                    .execute(params![id, tenant, now_ms()])?;
                Ok(changed == 1)
            },
            // On the writer thread, after the commit, before the caller wakes.
            move |_| key_cache.forget(&forget_id),
        )
        .await
    }

    /// The active key with this hash, if any (with its tenant).
    pub async fn api_key_by_hash(
        &self,
        key_hash: [u8; 32],
    ) -> Result<Option<ApiKeyInfo>, StoreError> {
        self.check_open()?;
        let generation = match self.inner.key_cache.get(&key_hash) {
            Ok(info) => return Ok(Some(info)),
            Err(generation) => generation,
        };
        let found = self
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT id, tenant, name, prefix, created_at, last_used_at FROM api_keys
                     WHERE key_hash = ?1 AND revoked_at IS NULL",
                )?
                .query_row([&key_hash[..]], key_from_row)
                .optional()
                .map_err(StoreError::from)
            })
            .await?;
        if let Some(info) = &found {
            self.inner
                .key_cache
                .insert(key_hash, info.clone(), generation);
        }
        Ok(found)
    }

    /// Notes that key `id` was used now. Fire-and-forget: the writer writes
    /// it with its next transaction; when too many are pending it is dropped.
    pub fn touch_api_key(&self, id: &str) {
        if self.check_open().is_err() {
            return;
        }
        if self.inner.touches.record(id, now_ms()) {
            // A full queue means the writer is busy and will take the touches
            // with its next batch anyway.
            let _ = self.inner.write_tx.try_send(super::writer::Request::Flush);
        }
    }
}

/// The record of a new key of `tenant` (name trimmed), once its tenant,
/// name and prefix pass the rules every directory applies.
pub(crate) fn new_key_info(
    tenant: &str,
    name: &str,
    prefix: &str,
) -> Result<ApiKeyInfo, StoreError> {
    check_name("tenant", tenant)?;
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_KEY_NAME || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "name must be 1 to {MAX_KEY_NAME} bytes without control characters"
        )));
    }
    if prefix.len() > 16 || !prefix.starts_with(KEY_PREFIX) {
        return Err(StoreError::Invalid(
            "prefix must be the key's first characters".into(),
        ));
    }
    Ok(ApiKeyInfo {
        id: new_id(),
        tenant: tenant.to_owned(),
        name: name.to_owned(),
        prefix: prefix.to_owned(),
        created_at_ms: now_ms(),
        last_used_at_ms: None,
    })
}

fn insert_key(conn: &Connection, info: &ApiKeyInfo, key_hash: &[u8; 32]) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO api_keys (id, tenant, name, prefix, key_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        info.id,
        info.tenant,
        info.name,
        info.prefix,
        &key_hash[..],
        info.created_at_ms
    ])
    .map_err(|error| match StoreError::from(error) {
        StoreError::Conflict(_) => StoreError::Conflict("this api key already exists".into()),
        other => other,
    })?;
    Ok(())
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKeyInfo> {
    Ok(ApiKeyInfo {
        id: row.get(0)?,
        tenant: row.get(1)?,
        name: row.get(2)?,
        prefix: row.get(3)?,
        created_at_ms: row.get(4)?,
        last_used_at_ms: row.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::TempDir;
    use super::*;

    #[test]
    fn new_keys_are_long_random_and_hashed() {
        let (key, hash, prefix) = new_api_key();
        assert!(key.starts_with("ak_") && key.len() == 43, "{key}");
        assert!(looks_like_api_key(&key));
        assert!(!looks_like_api_key("eyJhbGciOiJIUzI1NiJ9.e30.x"));
        assert!(key.starts_with(&prefix) && prefix.len() == 9);
        assert_eq!(hash, hash_api_key(&key));
        assert_ne!(new_api_key().0, key);
    }

    #[tokio::test]
    async fn keys_are_created_listed_found_touched_and_revoked() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let (key, hash, prefix) = new_api_key();
        let info = store
            .create_api_key("acme", " deploy bot ", hash, &prefix)
            .await
            .unwrap();
        assert_eq!(
            (info.name.as_str(), info.last_used_at_ms),
            ("deploy bot", None)
        );
        let (_, other_hash, other_prefix) = new_api_key();
        store
            .create_api_key("globex", "other", other_hash, &other_prefix)
            .await
            .unwrap();

        assert_eq!(
            store.list_api_keys("acme").await.unwrap(),
            std::slice::from_ref(&info)
        );
        let found = store.api_key_by_hash(hash_api_key(&key)).await.unwrap();
        assert_eq!(found.as_ref().map(|k| k.tenant.as_str()), Some("acme"));
        assert_eq!(store.api_key_by_hash([7; 32]).await.unwrap(), None);

        store.touch_api_key(&info.id);
        // The touch rides on the next write's transaction.
        store.ensure_log("acme").await.unwrap();
        let listed = store.list_api_keys("acme").await.unwrap();
        assert!(listed[0].last_used_at_ms.is_some());

        // Another tenant's admin cannot revoke it.
        assert!(!store.revoke_api_key("globex", &info.id).await.unwrap());
        assert!(store.revoke_api_key("acme", &info.id).await.unwrap());
        assert!(!store.revoke_api_key("acme", &info.id).await.unwrap());
        assert_eq!(
            store.api_key_by_hash(hash).await.unwrap(),
            None,
            "revoked at once"
        );
        assert!(store.list_api_keys("acme").await.unwrap().is_empty());
        assert_eq!(store.list_api_keys("globex").await.unwrap().len(), 1);
    }
}
