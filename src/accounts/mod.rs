//! The accounts of the directory as a service (SPEC §2): the bootstrap
//! admin, signup, login with its failure limiter, and the account behind a
//! token. The routes in `routes::accounts` are thin over [`Accounts`]. The
//! accounts themselves live in the [`Directory`] (the node's SQLite store,
//! or the shared Redis in cluster mode); the limiters live in this node's
//! memory.
//!
//! Password hashing is the expensive part: argon2id takes tens of
//! milliseconds of a core and ~19 MiB per call. It runs on the blocking pool
//! (the store helpers), and at most one call per core at once for logins
//! ([`Accounts::verify`]) and one per two cores for signups
//! ([`Accounts::hash`]), from two separate pools of permits: a signup flood
//! waits for its own permits and never queues a login behind it. A request
//! that cannot get a turn within [`HASH_QUEUE_WAIT`] gets 503 instead of
//! piling up memory. Signups are also limited per client IP
//! (`SIGNUPS_PER_HOUR`), failed logins per IP and per username-and-IP (see
//! [`limiter`]). A login the directory could not answer (503: Redis down, the
//! store busy) is not a failure: its attempt is given back.
//!
//! Which client a login comes from: the TCP peer address, unless
//! `TRUSTED_PROXY_HEADER` names a header a reverse proxy sets (fly.io:
//! `Fly-Client-IP`). That header is trusted blindly when configured, so
//! configure it only when the server is reachable through that proxy alone;
//! otherwise a client picks its own address and escapes the per-IP limit.

mod limiter;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, Semaphore};
use warp::http::HeaderMap;

pub use limiter::{LimitKey, LoginLimiter, MAX_SLOWDOWN};

use crate::auth::{random_token, valid_tenant, AuthError, Claims, Role};
use crate::config::AccountSettings;
use crate::directory::{Directory, DirectoryError};
use crate::error::ApiError;
use crate::store::{
    hash_password_async, validate_password, validate_username, verify_password_async, StoreError,
    User, MAX_PASSWORD_BYTES,
};

/// The tenant of signups, of the bootstrap admin, and of a login that names none.
pub const DEFAULT_TENANT: &str = "default";

/// The account created on an empty store.
pub const ADMIN_USERNAME: &str = "admin";

/// Longest a request waits for its turn at argon2 before a 503.
pub const HASH_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// The window `SIGNUPS_PER_HOUR` counts in.
pub const SIGNUP_WINDOW: Duration = Duration::from_secs(3600);

/// The address logins and signups of an unknown client are counted against
/// (only in-process callers have none: every HTTP request has a peer).
const UNKNOWN_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// Signup, login and the bootstrap admin, over the directory.
pub struct Accounts {
    directory: Directory,
    settings: AccountSettings,
    limiter: LoginLimiter,
    /// Signups per client IP per hour.
    signup_limiter: LoginLimiter,
    /// One permit per argon2 verification (login) allowed at once.
    login_hashing: Arc<Semaphore>,
    /// One permit per argon2 hash of a signup allowed at once: a pool of its
    /// own, so that signups never take the permits logins wait for.
    signup_hashing: Arc<Semaphore>,
    /// A hash of a random password, verified against when the username is
    /// unknown so that a login takes as long whether or not it exists.
    dummy_hash: Arc<OnceCell<String>>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("signup", &self.settings.signup)
            .field("token_ttl", &self.settings.token_ttl)
            .field("limited_keys", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl Accounts {
    /// Starts hashing the dummy password in the background, so the first
    /// login of an unknown username is not the one that pays for it.
    pub fn new(directory: Directory, settings: AccountSettings) -> Accounts {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let accounts = Accounts {
            directory,
            limiter: LoginLimiter::new(settings.login_max_failures, settings.login_window),
            signup_limiter: LoginLimiter::named(
                "signups",
                settings.signups_per_hour,
                SIGNUP_WINDOW,
            ),
            settings,
            login_hashing: Arc::new(Semaphore::new(cores.clamp(1, 8))),
            signup_hashing: Arc::new(Semaphore::new((cores / 2).clamp(1, 4))),
            dummy_hash: Arc::new(OnceCell::new()),
        };
        let dummy = accounts.dummy_hash.clone();
        tokio::spawn(async move {
            let _ = dummy.get_or_try_init(make_dummy_hash).await;
        });
        accounts
    }

    pub fn settings(&self) -> &AccountSettings {
        &self.settings
    }

    /// On an empty directory, creates `admin` (tenant `default`, role admin)
    /// with `ADMIN_PASSWORD`, or with a random password printed once to the
    /// log: the only secret agentcast ever logs, and only this once, by the
    /// one node whose creation won (the others' passwords were never stored).
    pub async fn bootstrap_admin(&self, login_url: &str) -> Result<(), DirectoryError> {
        if self.directory.count_users().await? > 0 {
            return Ok(());
        }
        let (password, generated) = match &self.settings.admin_password {
            Some(password) => (password.expose().to_owned(), false),
            None => (random_token(24), true),
        };
        let hash = hash_password_async(password.clone()).await?;
        let created = self
            .directory
            .create_first_user(DEFAULT_TENANT, ADMIN_USERNAME, &hash, Role::Admin)
            .await?;
        if created.is_none() {
            // Another node (or a process sharing the file) was first.
            return Ok(());
        }
        if generated {
            tracing::warn!(
                "created the first account: username `{ADMIN_USERNAME}`, password `{password}` \
                 (shown only this once; set ADMIN_PASSWORD before the first start to choose it). \
                 Log in at {login_url}"
            );
        } else {
            tracing::info!(
                "created the first account `{ADMIN_USERNAME}` with the password from ADMIN_PASSWORD; \
                 log in at {login_url}"
            );
        }
        Ok(())
    }

    /// A new `user` account of tenant `default`: 403 when signup is off, 422
    /// for a bad username or weak password, 429 past `SIGNUPS_PER_HOUR` from
    /// the client IP, 409 when the name is taken. Every attempt that reaches
    /// argon2 counts, taken names included: they cost as much.
    pub async fn signup(
        &self,
        ip: Option<IpAddr>,
        username: &str,
        password: &str,
    ) -> Result<User, ApiError> {
        if !self.settings.signup {
            return Err(ApiError::Forbidden("signup is disabled on this server"));
        }
        validate_username(username).map_err(ApiError::from_store)?;
        validate_password(password).map_err(ApiError::from_store)?;
        let ip_key = LimitKey::ip(ip.unwrap_or(UNKNOWN_CLIENT));
        self.signup_limiter
            .begin(std::slice::from_ref(&ip_key), Instant::now())
            .map_err(too_many)?;
        let hash = self.hash(password.to_owned()).await?;
        let user = self
            .directory
            .create_user(DEFAULT_TENANT, username, &hash, Role::User)
            .await
            .map_err(|e| match e {
                DirectoryError::Conflict(_) => {
                    ApiError::Conflict(format!("username '{username}' is taken"))
                }
                other => ApiError::from(other),
            })?;
        tracing::info!(user = %user.id, username = %user.username, tenant = %user.tenant, "account created");
        Ok(user)
    }

    /// The account whose password this is. The same 401 for an unknown user
    /// and a wrong password, after the same argon2 work; 429 once the client
    /// IP, or the username from that IP, has failed too often. A username that
    /// failed from many addresses is only slowed (at most [`MAX_SLOWDOWN`]).
    pub async fn login(
        &self,
        ip: Option<IpAddr>,
        tenant: Option<&str>,
        username: &str,
        password: &str,
    ) -> Result<User, ApiError> {
        let tenant = tenant.unwrap_or(DEFAULT_TENANT);
        let plausible = valid_tenant(tenant) && validate_username(username).is_ok();
        let ip = ip.unwrap_or(UNKNOWN_CLIENT);
        let ip_key = LimitKey::ip(ip);
        // An implausible username cannot be anyone's: only the IP counts.
        let user_keys: Vec<LimitKey> = if plausible {
            vec![
                LimitKey::user_at_ip(tenant, username, ip),
                LimitKey::user(tenant, username),
            ]
        } else {
            Vec::new()
        };
        let keys: Vec<LimitKey> = std::iter::once(ip_key.clone())
            .chain(user_keys.iter().cloned())
            .collect();
        let slowdown = self
            .limiter
            .begin(&keys, Instant::now())
            .map_err(too_many)?;
        if !slowdown.is_zero() {
            tracing::debug!(
                ?slowdown,
                "login slowed: the username failed from many addresses"
            );
            tokio::time::sleep(slowdown).await;
        }
        let refused = || ApiError::Unauthorized(AuthError::BadLogin);
        // Nobody's password is empty or longer than the limit: no need to look.
        if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
            return Err(refused());
        }
        let checked = self
            .check_password(plausible.then_some((tenant, username)), password)
            .await;
        let (matches, user) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                // Not a failed guess: the password was never checked.
                self.limiter.not_judged(&keys);
                return Err(error);
            }
        };
        match (matches, user) {
            (true, Some(user)) if plausible => {
                self.limiter.succeeded(&user_keys, Some(&ip_key));
                tracing::debug!(user = %user.id, username = %user.username, "login");
                Ok(user)
            }
            _ => {
                // Not the username: people type their password into that field.
                tracing::debug!(ip = ?ip, "login refused");
                Err(refused())
            }
        }
    }

    /// Whether `password` is the one of the account `name` (tenant and
    /// username), and the account; an unknown name costs the same argon2
    /// work against a dummy hash. An error when that could not be decided.
    async fn check_password(
        &self,
        name: Option<(&str, &str)>,
        password: &str,
    ) -> Result<(bool, Option<User>), ApiError> {
        let record = match name {
            Some((tenant, username)) => self.directory.user_by_name(tenant, username).await?,
            None => None,
        };
        let (hash, user) = match record {
            Some(record) => (record.password_hash, Some(record.user)),
            None => (self.dummy_hash().await?, None),
        };
        Ok((self.verify(hash, password.to_owned()).await?, user))
    }

    /// The stored account behind a valid token: 401 when there is none (an
    /// account that no longer exists, or a token minted elsewhere for a `sub`
    /// that is not an account of this directory).
    pub async fn account(&self, claims: &Claims) -> Result<User, ApiError> {
        match self.directory.user_by_id(&claims.sub).await? {
            Some(user) if user.tenant == claims.tenant => Ok(user),
            _ => Err(ApiError::Unauthorized(AuthError::UnknownAccount)),
        }
    }

    /// Claims of a fresh token for `user`, valid for `TOKEN_TTL`.
    pub fn claims_for(&self, user: &User) -> Claims {
        let mut claims = Claims::new(
            user.id.clone(),
            user.role,
            user.tenant.clone(),
            self.settings.token_ttl,
        );
        claims.name = Some(user.username.clone());
        claims
    }

    /// The client address a login is counted against (see the module doc).
    pub fn client_ip(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let from_proxy = self
            .settings
            .trusted_proxy_header
            .as_ref()
            .and_then(|name| {
                // Each proxy appends to X-Forwarded-For: the last entry is the one
                // our proxy wrote; anything before it came from the client.
                let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
                value.rsplit(',').next()?.trim().parse::<IpAddr>().ok()
            });
        from_proxy.or(peer.map(|p| p.ip()))
    }

    /// argon2id of a signup's `password`, waiting for a signup permit.
    async fn hash(&self, password: String) -> Result<String, ApiError> {
        let _permit =
            hashing_turn(&self.signup_hashing, "too many signups at once, try again").await?;
        hash_password_async(password)
            .await
            .map_err(ApiError::from_store)
    }

    /// Whether `password` matches `hash`, waiting for a login permit.
    async fn verify(&self, hash: String, password: String) -> Result<bool, ApiError> {
        let _permit =
            hashing_turn(&self.login_hashing, "too many logins at once, try again").await?;
        Ok(verify_password_async(hash, password).await)
    }

    async fn dummy_hash(&self) -> Result<String, ApiError> {
        self.dummy_hash
            .get_or_try_init(make_dummy_hash)
            .await
            .cloned()
            .map_err(ApiError::from_store)
    }
}

/// A permit of `pool` within [`HASH_QUEUE_WAIT`], else 503 saying `busy`.
async fn hashing_turn<'a>(
    pool: &'a Semaphore,
    busy: &'static str,
) -> Result<tokio::sync::SemaphorePermit<'a>, ApiError> {
    let busy = || ApiError::Unavailable(busy.to_owned());
    tokio::time::timeout(HASH_QUEUE_WAIT, pool.acquire())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())
}

/// 429 with the wait rounded up to whole seconds (`Retry-After`).
fn too_many(wait: Duration) -> ApiError {
    ApiError::TooManyRequests {
        retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
    }
}

async fn make_dummy_hash() -> Result<String, StoreError> {
    hash_password_async(random_token(24)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TempDir;
    use crate::store::Store;

    fn accounts(dir: &TempDir, tweak: impl FnOnce(&mut AccountSettings)) -> Accounts {
        let mut settings = AccountSettings::for_tests();
        tweak(&mut settings);
        Accounts::new(
            Directory::Sqlite(Store::open(dir.path()).unwrap()),
            settings,
        )
    }

    #[tokio::test]
    async fn the_admin_is_created_once_with_the_configured_password() {
        let dir = TempDir::new();
        let accounts = accounts(&dir, |s| {
            s.admin_password = Some(crate::config::Secret::new("correct horse"))
        });
        accounts
            .bootstrap_admin("http://x/login.html")
            .await
            .unwrap();
        accounts
            .bootstrap_admin("http://x/login.html")
            .await
            .unwrap();
        assert_eq!(accounts.directory.count_users().await.unwrap(), 1);
        let admin = accounts
            .login(None, None, "admin", "correct horse")
            .await
            .unwrap();
        assert_eq!(
            (admin.role, admin.tenant.as_str()),
            (Role::Admin, "default")
        );
    }

    #[tokio::test]
    async fn unknown_users_and_wrong_passwords_get_the_same_error() {
        let dir = TempDir::new();
        let accounts = accounts(&dir, |_| {});
        accounts
            .signup(None, "alice", "correct horse")
            .await
            .unwrap();
        let wrong = accounts.login(None, None, "alice", "wrong horse").await;
        let unknown = accounts.login(None, None, "nobody", "wrong horse").await;
        let (Err(wrong), Err(unknown)) = (wrong, unknown) else {
            panic!("both must fail");
        };
        assert_eq!(wrong.status(), unknown.status());
        assert_eq!(wrong.to_string(), unknown.to_string());
    }

    #[tokio::test]
    async fn logins_do_not_wait_for_signup_permits() {
        let dir = TempDir::new();
        let accounts = accounts(&dir, |s| {
            s.admin_password = Some(crate::config::Secret::new("correct horse"))
        });
        accounts.bootstrap_admin("http://x/").await.unwrap();
        // A signup flood holds every signup permit...
        let all = accounts.signup_hashing.available_permits();
        let _flood = accounts
            .signup_hashing
            .acquire_many(u32::try_from(all).unwrap())
            .await
            .unwrap();
        assert!(accounts.login_hashing.available_permits() > 0);
        // ...and a login still gets its turn at argon2 (with one shared pool it
        // would wait HASH_QUEUE_WAIT and get 503).
        let admin = accounts
            .login(None, None, "admin", "correct horse")
            .await
            .expect("the login does not queue behind signups");
        assert_eq!(admin.role, Role::Admin);
    }

    #[tokio::test]
    async fn signups_are_limited_per_address() {
        let dir = TempDir::new();
        let accounts = accounts(&dir, |s| s.signups_per_hour = 2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        accounts.signup(a, "alice", "correct horse").await.unwrap();
        // A taken name costs argon2 too: it counts.
        let taken = accounts.signup(a, "alice", "correct horse").await;
        assert!(matches!(taken, Err(ApiError::Conflict(_))), "{taken:?}");
        let third = accounts.signup(a, "carol", "correct horse").await;
        assert!(
            matches!(third, Err(ApiError::TooManyRequests { retry_after_s }) if (1..=3600).contains(&retry_after_s)),
            "{third:?}"
        );
        // Another address is not limited.
        accounts.signup(b, "carol", "correct horse").await.unwrap();
    }

    #[test]
    fn the_proxy_header_is_used_only_when_configured() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let dir = TempDir::new();
        let peer: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().unwrap());
        let plain = accounts(&dir, |_| {});
        assert_eq!(plain.client_ip(Some(peer), &headers), Some(peer.ip()));
        let dir2 = TempDir::new();
        let proxied = accounts(&dir2, |s| {
            s.trusted_proxy_header = Some("x-forwarded-for".parse().unwrap())
        });
        assert_eq!(
            proxied.client_ip(Some(peer), &headers),
            Some("5.6.7.8".parse().unwrap()),
            "the entry our proxy appended"
        );
        assert_eq!(
            proxied.client_ip(Some(peer), &HeaderMap::new()),
            Some(peer.ip())
        );
    }
}
