//! Accounts (SPEC §2): usernames unique per tenant, argon2id password
//! hashes, and the helpers that make and check those hashes.
//!
//! Hashing a password takes tens of milliseconds of CPU and ~19 MiB of
//! memory (argon2id with the OWASP parameters, the crate's defaults). Never
//! call [`hash_password`] or [`verify_password`] on an async worker thread:
//! use [`hash_password_async`] / [`verify_password_async`], which run them in
//! `spawn_blocking`, and keep login attempts rate limited.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::auth::Role;

use super::{check_name, new_id, now_ms, Store, StoreError, User, UserRecord};

/// Shortest password accepted at signup, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Longest password accepted, in bytes: hashing cost grows with it.
pub const MAX_PASSWORD_BYTES: usize = 1024;

const MIN_USERNAME: usize = 3;
const MAX_USERNAME: usize = 32;

/// A username: 3 to 32 ASCII letters, digits, `_`, `.` or `-`, starting with
/// a letter or digit. Compared case-insensitively.
pub fn validate_username(username: &str) -> Result<(), StoreError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    let valid = (MIN_USERNAME..=MAX_USERNAME).contains(&username.len())
        && username.starts_with(|c: char| c.is_ascii_alphanumeric())
        && username.chars().all(allowed);
    if valid {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "username must be {MIN_USERNAME} to {MAX_USERNAME} characters: letters, digits, \
             '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

/// A new password: at least [`MIN_PASSWORD_CHARS`] characters, at most
/// [`MAX_PASSWORD_BYTES`] bytes. The message never repeats the password.
pub fn validate_password(password: &str) -> Result<(), StoreError> {
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(StoreError::Invalid(format!(
            "password must be at least {MIN_PASSWORD_CHARS} characters and at most \
             {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// An argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) with
/// a fresh random salt. Blocking and CPU-heavy: see the module doc.
pub fn hash_password(password: &str) -> Result<String, StoreError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|error| StoreError::Internal(format!("password hashing failed: {error}")))
}

/// Whether `password` matches the PHC string `hash` (false for a malformed
/// hash). Blocking and CPU-heavy: see the module doc.
pub fn verify_password(hash: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// [`hash_password`] on the blocking pool.
pub async fn hash_password_async(password: String) -> Result<String, StoreError> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|error| StoreError::Internal(format!("password hashing task failed: {error}")))?
}

/// [`verify_password`] on the blocking pool.
pub async fn verify_password_async(hash: String, password: String) -> bool {
    tokio::task::spawn_blocking(move || verify_password(&hash, &password))
        .await
        .unwrap_or(false)
}

impl Store {
    /// Creates an account. [`StoreError::Conflict`] when the username is
    /// taken in that tenant (case-insensitively); [`StoreError::Invalid`]
    /// for a bad username. `password_hash` comes from [`hash_password`].
    pub async fn create_user(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<User, StoreError> {
        let user = new_user(tenant, username, password_hash, role)?;
        let password_hash = password_hash.to_owned();
        self.write(
            move |conn| {
                insert_user(conn, &user, &password_hash)?;
                Ok(user)
            },
            |_| {},
        )
        .await
    }

    /// The account `username` of `tenant`, with its hash, for a login.
    pub async fn user_by_name(
        &self,
        tenant: &str,
        username: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        if validate_username(username).is_err() || check_name("tenant", tenant).is_err() {
            return Ok(None);
        }
        let (tenant, username) = (tenant.to_owned(), username.to_owned());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, username, role, tenant, created_at, password_hash FROM users
                 WHERE tenant = ?1 AND username = ?2",
            )?
            .query_row([tenant, username], |row| {
                Ok(UserRecord {
                    user: user_from_row(row)?,
                    password_hash: row.get(5)?,
                })
            })
            .optional()
            .map_err(StoreError::from)
        })
        .await
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        if check_name("user id", id).is_err() {
            return Ok(None);
        }
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, username, role, tenant, created_at FROM users WHERE id = ?1",
            )?
            .query_row([id], user_from_row)
            .optional()
            .map_err(StoreError::from)
        })
        .await
    }

    /// Accounts in every tenant: zero means a fresh store (bootstrap the admin).
    pub async fn count_users(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let count: i64 = conn.query_row("SELECT count(*) FROM users", [], |row| row.get(0))?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
        .await
    }

    /// Replaces the password hash of `username` in `tenant` (`agentcast
    /// admin reset-password`); false when there is no such account.
    pub async fn set_password_hash(
        &self,
        tenant: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        check_name("tenant", tenant)?;
        validate_username(username)?;
        let (tenant, username, hash) = (
            tenant.to_owned(),
            username.to_owned(),
            password_hash.to_owned(),
        );
        self.write(
            move |conn| {
                let updated = conn
                    .prepare_cached(
                        "UPDATE users SET password_hash = ?3 WHERE tenant = ?1 AND username = ?2",
                    )?
                    .execute(params![tenant, username, hash])?;
                Ok(updated == 1)
            },
            |_| {},
        )
        .await
    }
}

/// The record of a new account, once its tenant, username and hash pass the
/// rules every directory applies.
pub(crate) fn new_user(
    tenant: &str,
    username: &str,
    password_hash: &str,
    role: Role,
) -> Result<User, StoreError> {
    check_name("tenant", tenant)?;
    validate_username(username)?;
    if !password_hash.starts_with('$') || password_hash.len() > 512 {
        return Err(StoreError::Invalid(
            "password hash must be a PHC string".into(),
        ));
    }
    Ok(User {
        id: new_id(),
        username: username.to_owned(),
        role,
        tenant: tenant.to_owned(),
        created_at_ms: now_ms(),
    })
}

fn insert_user(conn: &Connection, user: &User, password_hash: &str) -> Result<(), StoreError> {
    let role = match user.role {
        Role::Admin => "admin",
        Role::User => "user",
    };
    let inserted = conn
        .prepare_cached(
            "INSERT INTO users (id, tenant, username, password_hash, role, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (tenant, username) DO NOTHING",
        )?
        .execute(params![
            user.id,
            user.tenant,
            user.username,
            password_hash,
            role,
            user.created_at_ms
        ])?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!(
            "username {:?} is taken",
            user.username
        )));
    }
    Ok(())
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    let role: String = row.get(2)?;
    Ok(User {
        id: row.get(0)?,
        username: row.get(1)?,
        // The schema allows only these two values.
        role: if role == "admin" {
            Role::Admin
        } else {
            Role::User
        },
        tenant: row.get(3)?,
        created_at_ms: row.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::TempDir;
    use super::*;

    #[test]
    fn usernames_are_checked() {
        for good in ["bob", "alice_1", "a.b-c", "X9z"] {
            assert!(validate_username(good).is_ok(), "{good}");
        }
        let long = "a".repeat(33);
        for bad in ["", "ab", "_bob", "bob smith", "bób", "a/b", long.as_str()] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        assert!(validate_password("short").is_err());
        assert!(validate_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
        assert!(validate_password("correct horse").is_ok());
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert_ne!(hash, hash_password("correct horse").unwrap(), "salted");
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsf"));
        assert!(!verify_password("not a hash", "correct horse"));
    }

    #[tokio::test]
    async fn usernames_are_unique_per_tenant() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.count_users().await.unwrap(), 0);
        let hash = hash_password_async("correct horse".into()).await.unwrap();
        let admin = store
            .create_user("default", "admin", &hash, Role::Admin)
            .await
            .unwrap();
        assert_eq!(admin.role, Role::Admin);
        let taken = store
            .create_user("default", "ADMIN", &hash, Role::User)
            .await;
        assert!(matches!(taken, Err(StoreError::Conflict(_))), "{taken:?}");
        store
            .create_user("acme", "admin", &hash, Role::User)
            .await
            .unwrap();
        let bad = store.create_user("default", "a b", &hash, Role::User).await;
        assert!(matches!(bad, Err(StoreError::Invalid(_))));
        assert_eq!(store.count_users().await.unwrap(), 2);

        let record = store
            .user_by_name("default", "Admin")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.user, admin);
        assert!(
            !format!("{record:?}").contains("argon2"),
            "hash stays out of logs"
        );
        assert!(verify_password_async(record.password_hash, "correct horse".into()).await);
        assert_eq!(store.user_by_id(&admin.id).await.unwrap(), Some(admin));
        assert!(store
            .user_by_name("other", "admin")
            .await
            .unwrap()
            .is_none());
        assert_eq!(store.user_by_id("nope").await.unwrap(), None);
    }
}
