//! The Redis engine of the directory (cluster mode, SPEC §6): accounts and
//! API keys every node reads and writes, with no cache in front, so a signup
//! on one node logs in on all and a key revoked on one node is refused by
//! every node on the very next request.
//!
//! Keys (see the table in [`crate::redis`]): an account is the hash
//! `P:user:ID`, found by name through `P:username:T:NAME` (the name in ASCII
//! lower case, so names are unique per tenant case-insensitively, as in
//! SQLite), and `P:users` holds every account id (its size says whether the
//! directory is empty). A key is the hash `P:apikey:ID`, found by the hex
//! SHA-256 of the key through `P:apikey-hash:HASH` while it is active, and
//! listed through the sorted set `P:apikeys:T` (score: creation time).
//!
//! Every change that touches more than one key is one Lua script, so it is
//! atomic: a taken name or hash is refused inside the same step that would
//! write it (`SET NX`), and the bootstrap admin is created only by the
//! script that finds `P:users` empty, once even when nodes boot together.

use std::sync::Arc;

use redis::Script;

use super::DirectoryError;
use crate::auth::Role;
use crate::redis::{Redis, RedisError};
use crate::store::{
    check_name, new_key_info, new_user, now_ms, validate_username, ApiKeyInfo, User, UserRecord,
    MAX_LISTED_KEYS,
};

/// A key's `last_used_at` is rewritten at most this often (ms): a key that
/// publishes thousands of times a second costs one write a second.
const TOUCH_EVERY_MS: i64 = 1000;

/// Creates an account unless its name is taken (or, for the first account,
/// unless any exists). Returns 1 created, 0 the directory was not empty, -1
/// the name is taken.
const CREATE_USER: &str = r"
-- KEYS: 1 the name's key, 2 the account hash, 3 the set of accounts
-- ARGV: 1 id, 2 tenant, 3 username, 4 password hash, 5 role, 6 created at,
--       7 '1' to create only in an empty directory
if ARGV[7] == '1' and redis.call('SCARD', KEYS[3]) > 0 then
  return 0
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return -1
end
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'tenant', ARGV[2], 'username', ARGV[3],
  'hash', ARGV[4], 'role', ARGV[5], 'created_at', ARGV[6])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
";

/// Records a new key unless its hash exists. Returns 1 created, 0 taken.
const CREATE_KEY: &str = r"
-- KEYS: 1 the hash's key, 2 the key's hash, 3 the tenant's keys
-- ARGV: 1 id, 2 tenant, 3 name, 4 prefix, 5 hex sha-256, 6 created at
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return 0
end
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'tenant', ARGV[2], 'name', ARGV[3],
  'prefix', ARGV[4], 'key_hash', ARGV[5], 'created_at', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
";

/// Revokes an active key of the tenant. Returns 1 revoked, 0 no such key.
const REVOKE_KEY: &str = r"
-- KEYS: 1 the key's hash, 2 the tenant's keys
-- ARGV: 1 tenant, 2 id, 3 now, 4 the prefix of the hash keys
local key = redis.call('HMGET', KEYS[1], 'tenant', 'key_hash', 'revoked_at')
if key[1] ~= ARGV[1] or key[3] then
  return 0
end
redis.call('DEL', ARGV[4] .. key[2])
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
";

/// The active key with this hash, noting its use (at most once per
/// interval). Returns nil, or {id, tenant, name, prefix, created at, last
/// used at or ''}.
const USE_KEY: &str = r"
-- KEYS: 1 the hash's key
-- ARGV: 1 the prefix of the key hashes, 2 now, 3 the touch interval
local id = redis.call('GET', KEYS[1])
if not id then
  return false
end
local record = ARGV[1] .. id
local key = redis.call('HMGET', record, 'tenant', 'name', 'prefix', 'created_at',
  'last_used_at', 'revoked_at')
if not key[1] or key[6] then
  return false
end
local now = tonumber(ARGV[2])
if not key[5] or now - tonumber(key[5]) >= tonumber(ARGV[3]) then
  redis.call('HSET', record, 'last_used_at', ARGV[2])
  key[5] = ARGV[2]
end
return {id, key[1], key[2], key[3], key[4], key[5]}
";

/// The fields of an account hash, in the order [`user_from`] reads them.
const USER_FIELDS: [&str; 6] = ["id", "tenant", "username", "role", "created_at", "hash"];

/// The fields of a key hash, in the order [`key_from`] reads them.
const KEY_FIELDS: [&str; 7] = [
    "id",
    "tenant",
    "name",
    "prefix",
    "created_at",
    "last_used_at",
    "revoked_at",
];

/// Accounts and API keys in the shared Redis. Cloning is cheap.
#[derive(Clone)]
pub struct RedisDirectory {
    redis: Redis,
    scripts: Arc<Scripts>,
}

struct Scripts {
    create_user: Script,
    create_key: Script,
    revoke_key: Script,
    use_key: Script,
}

impl std::fmt::Debug for RedisDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDirectory")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

/// What the create-account script answered.
enum Created {
    Yes,
    NotEmpty,
    Taken,
}

impl RedisDirectory {
    pub fn new(redis: Redis) -> RedisDirectory {
        RedisDirectory {
            redis,
            scripts: Arc::new(Scripts {
                create_user: Script::new(CREATE_USER),
                create_key: Script::new(CREATE_KEY),
                revoke_key: Script::new(REVOKE_KEY),
                use_key: Script::new(USE_KEY),
            }),
        }
    }

    pub async fn count_users(&self) -> Result<u64, DirectoryError> {
        let mut commands = self.redis.commands();
        let count: u64 = redis::cmd("SCARD")
            .arg(self.redis.keys().users())
            .query_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(count)
    }

    /// A new account; [`DirectoryError::Conflict`] when the name is taken.
    pub async fn create_user(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<User, DirectoryError> {
        let user = new_user(tenant, username, password_hash, role)?;
        match self.insert_user(&user, password_hash, false).await? {
            Created::Yes => Ok(user),
            Created::Taken | Created::NotEmpty => Err(taken(username)),
        }
    }

    /// The first account, created only if the directory holds none (one
    /// script: of nodes that boot together, exactly one creates it).
    pub async fn create_first_user(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<Option<User>, DirectoryError> {
        let user = new_user(tenant, username, password_hash, role)?;
        match self.insert_user(&user, password_hash, true).await? {
            Created::Yes => Ok(Some(user)),
            Created::Taken | Created::NotEmpty => Ok(None),
        }
    }

    async fn insert_user(
        &self,
        user: &User,
        password_hash: &str,
        only_first: bool,
    ) -> Result<Created, DirectoryError> {
        let keys = self.redis.keys();
        let mut commands = self.redis.commands();
        let answer: i64 = self
            .scripts
            .create_user
            .key(keys.username(&user.tenant, &user.username))
            .key(keys.user(&user.id))
            .key(keys.users())
            .arg(&user.id)
            .arg(&user.tenant)
            .arg(&user.username)
            .arg(password_hash)
            .arg(role_name(user.role))
            .arg(user.created_at_ms)
            .arg(if only_first { "1" } else { "0" })
            .invoke_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(match answer {
            1 => Created::Yes,
            0 => Created::NotEmpty,
            _ => Created::Taken,
        })
    }

    /// The account `username` of `tenant` (any case), with its hash.
    pub async fn user_by_name(
        &self,
        tenant: &str,
        username: &str,
    ) -> Result<Option<UserRecord>, DirectoryError> {
        let Some(id) = self.user_id(tenant, username).await? else {
            return Ok(None);
        };
        self.user_record(&id).await
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, DirectoryError> {
        if check_name("user id", id).is_err() {
            return Ok(None);
        }
        Ok(self.user_record(id).await?.map(|record| record.user))
    }

    /// Replaces the password hash of `username` in `tenant`; false when there
    /// is no such account.
    pub async fn set_password_hash(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, DirectoryError> {
        check_name("tenant", tenant)?;
        validate_username(username)?;
        let Some(id) = self.user_id(tenant, username).await? else {
            return Ok(false);
        };
        let mut commands = self.redis.commands();
        // Accounts are never deleted: the hash of a named account exists.
        redis::cmd("HSET")
            .arg(self.redis.keys().user(&id))
            .arg("hash")
            .arg(password_hash)
            .query_async::<()>(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(true)
    }

    /// The id behind a name, None for a name no account can have.
    async fn user_id(
        &self,
        tenant: &str,
        username: &str,
    ) -> Result<Option<String>, DirectoryError> {
        if validate_username(username).is_err() || check_name("tenant", tenant).is_err() {
            return Ok(None);
        }
        let mut commands = self.redis.commands();
        let id: Option<String> = redis::cmd("GET")
            .arg(self.redis.keys().username(tenant, username))
            .query_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(id)
    }

    async fn user_record(&self, id: &str) -> Result<Option<UserRecord>, DirectoryError> {
        let mut commands = self.redis.commands();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.redis.keys().user(id))
            .arg(&USER_FIELDS[..])
            .query_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(user_from(fields))
    }

    /// Records a new key of `tenant`; `key_hash` and `prefix` come from
    /// [`crate::store::new_api_key`].
    pub async fn create_api_key(
        &self,
        tenant: &str,
        name: &str,
        key_hash: [u8; 32],
        prefix: &str,
    ) -> Result<ApiKeyInfo, DirectoryError> {
        let info = new_key_info(tenant, name, prefix)?;
        let keys = self.redis.keys();
        let hash = hex(&key_hash);
        let mut commands = self.redis.commands();
        let created: i64 = self
            .scripts
            .create_key
            .key(keys.api_key_hash(&hash))
            .key(keys.api_key(&info.id))
            .key(keys.api_keys(tenant))
            .arg(&info.id)
            .arg(&info.tenant)
            .arg(&info.name)
            .arg(&info.prefix)
            .arg(&hash)
            .arg(info.created_at_ms)
            .invoke_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        if created != 1 {
            return Err(DirectoryError::Conflict(
                "this api key already exists".into(),
            ));
        }
        Ok(info)
    }

    /// The active keys of `tenant`, oldest first, without secrets.
    pub async fn list_api_keys(&self, tenant: &str) -> Result<Vec<ApiKeyInfo>, DirectoryError> {
        let keys = self.redis.keys();
        let mut commands = self.redis.commands();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.api_keys(tenant))
            .arg(0)
            .arg(MAX_LISTED_KEYS - 1)
            .query_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(keys.api_key(id)).arg(&KEY_FIELDS[..]);
        }
        let records: Vec<Vec<Option<String>>> = pipe
            .query_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(records
            .into_iter()
            .filter_map(key_from)
            // A key revoked between the two reads is no longer listed.
            .filter(|(info, revoked)| !revoked && info.tenant == tenant)
            .map(|(info, _)| info)
            .collect())
    }

    /// Revokes key `id` of `tenant`; false when there is no such active key.
    /// Once this returns, no node's [`RedisDirectory::use_api_key`] finds it.
    pub async fn revoke_api_key(&self, tenant: &str, id: &str) -> Result<bool, DirectoryError> {
        if check_name("key id", id).is_err() {
            return Ok(false);
        }
        let keys = self.redis.keys();
        let mut commands = self.redis.commands();
        let revoked: i64 = self
            .scripts
            .revoke_key
            .key(keys.api_key(id))
            .key(keys.api_keys(tenant))
            .arg(tenant)
            .arg(id)
            .arg(now_ms())
            .arg(keys.api_key_hash(""))
            .invoke_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(revoked == 1)
    }

    /// The active key with this hash, if any; notes its use in the same step
    /// (at most once per [`TOUCH_EVERY_MS`]), so a publish waits for nothing
    /// more than the lookup it needs anyway.
    pub async fn use_api_key(
        &self,
        key_hash: [u8; 32],
    ) -> Result<Option<ApiKeyInfo>, DirectoryError> {
        let keys = self.redis.keys();
        let mut commands = self.redis.commands();
        let found: Option<Vec<String>> = self
            .scripts
            .use_key
            .key(keys.api_key_hash(&hex(&key_hash)))
            .arg(keys.api_key(""))
            .arg(now_ms())
            .arg(TOUCH_EVERY_MS)
            .invoke_async(&mut commands)
            .await
            .map_err(RedisError::from)?;
        Ok(found.and_then(|fields| {
            let mut fields = fields.into_iter().map(Some);
            let mut next = || fields.next().flatten();
            Some(ApiKeyInfo {
                id: next()?,
                tenant: next()?,
                name: next()?,
                prefix: next()?,
                created_at_ms: next()?.parse().ok()?,
                last_used_at_ms: next().and_then(|t| t.parse().ok()),
            })
        }))
    }
}

/// 409's text, as SQLite's engine words it.
fn taken(username: &str) -> DirectoryError {
    DirectoryError::Conflict(format!("username {username:?} is taken"))
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::User => "user",
    }
}

/// An account from the values of [`USER_FIELDS`]; None when it does not exist.
fn user_from(fields: Vec<Option<String>>) -> Option<UserRecord> {
    let mut fields = fields.into_iter();
    let mut next = || fields.next().flatten();
    let (id, tenant, username, role) = (next()?, next()?, next()?, next()?);
    let created_at_ms = next().and_then(|t| t.parse().ok()).unwrap_or(0);
    let password_hash = next()?;
    Some(UserRecord {
        user: User {
            id,
            username,
            role: if role == "admin" {
                Role::Admin
            } else {
                Role::User
            },
            tenant,
            created_at_ms,
        },
        password_hash,
    })
}

/// A key and whether it is revoked, from the values of [`KEY_FIELDS`].
fn key_from(fields: Vec<Option<String>>) -> Option<(ApiKeyInfo, bool)> {
    let mut fields = fields.into_iter();
    let mut next = || fields.next().flatten();
    let info = ApiKeyInfo {
        id: next()?,
        tenant: next()?,
        name: next()?,
        prefix: next()?,
        created_at_ms: next()?.parse().ok()?,
        last_used_at_ms: next().and_then(|t| t.parse().ok()),
    };
    Some((info, next().is_some()))
}

/// Lower-case hex of a key hash (the key names hold text).
fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    #[test]
    fn hashes_are_64_hex_characters() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x01;
        let text = hex(&bytes);
        assert_eq!(text.len(), 64);
        assert!(text.starts_with("ab00") && text.ends_with("0001"), "{text}");
    }

    #[test]
    fn an_account_is_read_back_from_its_fields_and_a_missing_one_is_none() {
        let record = user_from(some(&["u1", "acme", "Alice", "admin", "17", "$argon2id$x"]))
            .expect("a whole account");
        assert_eq!(
            (
                record.user.id.as_str(),
                record.user.tenant.as_str(),
                record.user.username.as_str(),
                record.user.role,
                record.user.created_at_ms,
                record.password_hash.as_str()
            ),
            ("u1", "acme", "Alice", Role::Admin, 17, "$argon2id$x")
        );
        assert_eq!(
            user_from(some(&["u1", "acme", "bob", "user", "1", "$h"]))
                .unwrap()
                .user
                .role,
            Role::User
        );
        // HMGET of a hash that does not exist: every field nil.
        assert!(user_from(vec![None; USER_FIELDS.len()]).is_none());
    }

    #[test]
    fn a_key_is_read_back_with_its_revocation() {
        let mut fields = some(&["k1", "acme", "bot", "ak_abcdef", "5"]);
        fields.extend([None, None]);
        let (info, revoked) = key_from(fields.clone()).unwrap();
        assert_eq!(
            (info.id.as_str(), info.last_used_at_ms, revoked),
            ("k1", None, false)
        );
        fields[5] = Some("9".into());
        fields[6] = Some("10".into());
        let (info, revoked) = key_from(fields).unwrap();
        assert_eq!((info.last_used_at_ms, revoked), (Some(9), true));
        assert!(key_from(vec![None; KEY_FIELDS.len()]).is_none());
    }
}
