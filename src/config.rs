//! Validated settings and the rules that make them: [`Settings`] (the server),
//! [`AccountSettings`] (its accounts), the JWT secret kept in the data folder.
//!
//! The flags themselves (clap, one environment variable each) live in the
//! binary's `cli` module (src/cli.rs), which maps them onto these types with the helpers here and
//! calls [`Settings::validate`]. This module is a near leaf: it imports only
//! [`crate::units`] and [`crate::channels`] (itself a leaf), so every other
//! module may read settings without an import cycle. Nothing downstream re-reads the environment.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use warp::http::HeaderName;

pub use crate::channels::Patterns;
pub use crate::units::{parse_bytes, parse_duration, parse_switch};

/// The `STORE_SYNC` setting: how hard a commit holds on to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreSync {
    /// fsync the WAL at every commit (SQLite `synchronous = FULL`).
    Full,
    /// `synchronous = NORMAL`, the WAL fsynced every `STORE_SYNC_INTERVAL`.
    #[default]
    Normal,
}

/// The `LOG_STORE` setting: the engine of the tenant logs on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogStoreKind {
    /// Durable: the SQLite file in DATA_DIR; 202 only after the commit.
    #[default]
    Sqlite,
    /// In memory only: lost on restart (for comparison runs and tests).
    Memory,
}

/// Validated account flags (the binary's `cli::AccountArgs`).
#[derive(Debug, Clone)]
pub struct AccountSettings {
    pub admin_password: Option<Secret>,
    pub signup: bool,
    pub token_ttl: Duration,
    pub login_max_failures: u32,
    pub login_window: Duration,
    pub signups_per_hour: u32,
    /// Lowercase header name; `None` trusts only the TCP peer address.
    pub trusted_proxy_header: Option<warp::http::HeaderName>,
}

impl AccountSettings {
    /// Signup on, 12 h tokens, 10 failures in 15 minutes, 5 signups per IP an
    /// hour, no proxy header.
    pub fn for_tests() -> AccountSettings {
        AccountSettings {
            admin_password: None,
            signup: true,
            token_ttl: Duration::from_secs(12 * 3600),
            login_max_failures: 10,
            login_window: Duration::from_secs(15 * 60),
            signups_per_hour: 5,
            trusted_proxy_header: None,
        }
    }

    /// Every rule but the admin password's, which belongs to the accounts
    /// (the binary's `cli` checks it with `crate::store::validate_password`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: &str| Err(ConfigError::Invalid(what.to_owned()));
        if self.token_ttl < Duration::from_secs(60)
            || self.token_ttl > Duration::from_secs(30 * 86_400)
        {
            return invalid("TOKEN_TTL must be between 1m and 30d");
        }
        if self.login_max_failures == 0 {
            return invalid("LOGIN_MAX_FAILURES must be at least 1");
        }
        if self.login_window.is_zero() {
            return invalid("LOGIN_WINDOW must be above 0");
        }
        if self.signups_per_hour == 0 {
            return invalid("SIGNUPS_PER_HOUR must be at least 1 (SIGNUP=off turns signup off)");
        }
        Ok(())
    }
}

/// A secret that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Validated server settings. Tests build one with [`Settings::for_tests`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    /// The engine of the tenant logs (`LOG_STORE`).
    pub log_store: LogStoreKind,
    /// fsync policy of the store (`STORE_SYNC`).
    pub store_sync: StoreSync,
    /// How often `normal` fsyncs the WAL (`STORE_SYNC_INTERVAL`).
    pub store_sync_interval: Duration,
    pub jwt_secret: Secret,
    pub jwt_public_key: Option<String>,
    /// `JWT_JWKS_URL` and its timings: the provider's keys fetched by `kid`
    /// (the other way to accept external tokens, never with `jwt_public_key`).
    pub jwt_jwks: Option<JwksSettings>,
    /// `JWT_ROLE_CLAIM` / `JWT_TENANT_CLAIM`: where external tokens keep the
    /// role and tenant (unset: the top-level `role` and `tenant` claims).
    pub jwt_role_claim: Option<ClaimPath>,
    pub jwt_tenant_claim: Option<ClaimPath>,
    /// `iss` / `aud` required of tokens (SPEC §2); both are required with a
    /// public key or a JWKS.
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp`; 30 s in production, 0 in tests that watch expiry.
    pub jwt_leeway: Duration,
    pub accounts: AccountSettings,
    pub max_message_bytes: usize,
    pub send_queue: usize,
    pub history_size: usize,
    /// `HISTORY_BYTES`: the byte bound of each tenant's history.
    pub history_bytes: usize,
    pub channels: ChannelSettings,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    /// Sustained client frames per second, and the burst allowed above it.
    pub client_frame_rate: f64,
    pub client_frame_burst: f64,
    pub allowed_origins: Option<Vec<String>>,
    pub shutdown_timeout: Duration,
    pub metrics_token: Option<Secret>,
    /// `REDIS_URL`: cluster mode.
    pub redis: Option<RedisSettings>,
    /// `NODE_ID`, resolved.
    pub node_id: String,
    /// Period the client is told to ping at (`heartbeat_s` of the `connected` frame).
    pub heartbeat: Duration,
}

/// The channels' share of the settings (SPEC §4.4).
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// `CHANNEL_HISTORY`: messages kept per channel (0: live only).
    pub history: usize,
    /// `CHANNEL_HISTORY_BYTES`: their byte bound.
    pub history_bytes: usize,
    /// `CHANNEL_HISTORY_TTL`: a channel is forgotten this long after its last publish.
    pub ttl: Duration,
    /// `USER_CHANNELS`: what users without a `channels` claim may subscribe to.
    pub user_channels: Patterns,
    /// `MAX_SUBSCRIPTIONS` per connection.
    pub max_subscriptions: usize,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        ChannelSettings {
            history: 1000,
            history_bytes: 4 << 20,
            ttl: Duration::from_secs(24 * 3600),
            user_channels: Patterns::all(),
            max_subscriptions: 64,
        }
    }
}

/// `JWT_JWKS_URL`: where the identity provider publishes its signing keys.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// https, or http to a loopback host ([`jwks_url`]).
    pub url: reqwest::Url,
    /// `JWT_JWKS_REFRESH`: the key set is fetched again this often.
    pub refresh: Duration,
    /// Least time between two fetches for tokens naming an unknown `kid`
    /// ([`JWKS_MIN_REFRESH_GAP`]; tests shorten it).
    pub min_refresh_gap: Duration,
    /// How long a start retries an unreachable provider before going on
    /// with no keys ([`JWKS_START_WAIT`]; tests shorten it).
    pub start_wait: Duration,
    /// Longest wait to connect to the provider, and for a whole fetch
    /// ([`JWKS_FETCH_TIMEOUT`]; tests shorten it).
    pub fetch_timeout: Duration,
}

/// At most one fetch of the key set per this time for unknown `kid`s, so
/// tokens with forged `kid`s cannot make the server hammer the provider.
pub const JWKS_MIN_REFRESH_GAP: Duration = Duration::from_secs(10);
/// How long a start retries the provider's key set before it goes on without.
pub const JWKS_START_WAIT: Duration = Duration::from_secs(10);
/// Longest fetch of the key set: a provider that hangs costs a token naming a
/// new `kid` at most this long (then 401), and the cached keys meanwhile nothing.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl JwksSettings {
    /// `url` checked by [`jwks_url`], the given refresh period, the fixed
    /// rate limit and start wait.
    pub fn new(url: &str, refresh: Duration) -> Result<JwksSettings, ConfigError> {
        Ok(JwksSettings {
            url: jwks_url(url)?,
            refresh,
            min_refresh_gap: JWKS_MIN_REFRESH_GAP,
            start_wait: JWKS_START_WAIT,
            fetch_timeout: JWKS_FETCH_TIMEOUT,
        })
    }
}

/// `JWT_JWKS_URL` parsed: https, or http only to a loopback host (127.0.0.0/8,
/// ::1, localhost), where nobody can change the keys on the way.
pub fn jwks_url(raw: &str) -> Result<reqwest::Url, ConfigError> {
    let invalid =
        |why: &str| ConfigError::Invalid(format!("JWT_JWKS_URL '{}' {why}", raw.escape_debug()));
    let url =
        reqwest::Url::parse(raw.trim()).map_err(|e| invalid(&format!("is not a URL: {e}")))?;
    let host = url.host_str().ok_or_else(|| invalid("has no host"))?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        "http" => Err(invalid(
            "must use https (http only to a loopback host: 127.0.0.0/8, ::1, localhost)",
        )),
        _ => Err(invalid("must be an https:// URL")),
    }
}

/// Where a claim lives in an external token: a JSON pointer (RFC 6901,
/// `/app_metadata/role`, `~1` for `/` and `~0` for `~` in a name) or a plain
/// top-level claim name (`org_id`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClaimPath {
    raw: String,
    /// The names (or array indices) walked from the top of the claims.
    segments: Vec<String>,
}

impl ClaimPath {
    /// The longest accepted path, and its most segments.
    const MAX_LEN: usize = 256;
    const MAX_SEGMENTS: usize = 16;

    /// `what` (`JWT_ROLE_CLAIM`) names the setting in the error.
    pub fn parse(what: &str, raw: &str) -> Result<ClaimPath, ConfigError> {
        let invalid =
            |why: &str| ConfigError::Invalid(format!("{what} '{}' {why}", raw.escape_debug()));
        if raw.is_empty() || raw.len() > Self::MAX_LEN || raw.chars().any(char::is_control) {
            return Err(invalid(
                "must be 1-256 printable characters: a claim name or a JSON pointer like /app_metadata/role",
            ));
        }
        let Some(pointer) = raw.strip_prefix('/') else {
            return Ok(ClaimPath {
                raw: raw.to_owned(),
                segments: vec![raw.to_owned()],
            });
        };
        let mut segments = Vec::new();
        for token in pointer.split('/') {
            let mut name = String::with_capacity(token.len());
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    name.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => name.push('~'),
                    Some('1') => name.push('/'),
                    _ => {
                        return Err(invalid(
                            "is not a JSON pointer: '~' must be followed by 0 or 1",
                        ))
                    }
                }
            }
            segments.push(name);
        }
        if segments.len() > Self::MAX_SEGMENTS {
            return Err(invalid("has more than 16 segments"));
        }
        Ok(ClaimPath {
            raw: raw.to_owned(),
            segments,
        })
    }

    /// The names walked from the top of the claims, unescaped.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Debug for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClaimPath({:?})", self.raw)
    }
}

/// Where the nodes of one deployment meet.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// May hold a password: never logged (`Secret`).
    pub url: Secret,
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot use data folder {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Settings {
    /// Defaults suited to tests: loopback, port 0, a fixed secret, no leeway.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Settings {
        Settings {
            bind: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            data_dir: data_dir.into(),
            log_store: LogStoreKind::Sqlite,
            store_sync: StoreSync::Normal,
            store_sync_interval: Duration::from_secs(1),
            jwt_secret: Secret::new("test-secret-test-secret-test-secret!"),
            jwt_public_key: None,
            jwt_jwks: None,
            jwt_role_claim: None,
            jwt_tenant_claim: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::ZERO,
            accounts: AccountSettings::for_tests(),
            max_message_bytes: 64 * 1024,
            send_queue: 1024,
            history_size: 10_000,
            history_bytes: 64 << 20,
            channels: ChannelSettings::default(),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            max_connections: 100_000,
            max_connections_per_user: 20,
            client_frame_rate: 10.0,
            client_frame_burst: 50.0,
            allowed_origins: None,
            shutdown_timeout: Duration::from_secs(10),
            metrics_token: None,
            redis: None,
            node_id: "test".to_owned(),
            heartbeat: Duration::from_secs(25),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(what.to_owned()))
            }
        };
        check(
            self.jwt_secret.expose().len() >= 16,
            "JWT_SECRET must be at least 16 bytes",
        )?;
        let external = self.jwt_public_key.is_some() || self.jwt_jwks.is_some();
        check(
            self.jwt_public_key.is_none() || self.jwt_jwks.is_none(),
            "JWT_PUBLIC_KEY and JWT_JWKS_URL are both set: use one (the JWKS already \
             holds the provider's public keys)",
        )?;
        check(
            !external || (self.jwt_issuer.is_some() && self.jwt_audience.is_some()),
            EXTERNAL_NEEDS_ISS_AUD,
        )?;
        check(
            external || (self.jwt_role_claim.is_none() && self.jwt_tenant_claim.is_none()),
            "JWT_ROLE_CLAIM and JWT_TENANT_CLAIM apply to external tokens: set \
             JWT_PUBLIC_KEY or JWT_JWKS_URL too",
        )?;
        if let Some(jwks) = &self.jwt_jwks {
            jwks_url(jwks.url.as_str())?;
            check(
                jwks.refresh >= Duration::from_secs(10)
                    && jwks.refresh <= Duration::from_secs(86_400),
                "JWT_JWKS_REFRESH must be between 10s and 24h",
            )?;
        }
        check(
            self.max_message_bytes >= 256,
            "MAX_MESSAGE_BYTES must be at least 256",
        )?;
        check(
            self.max_message_bytes <= 16 << 20,
            "MAX_MESSAGE_BYTES must be at most 16 MiB",
        )?;
        check(self.send_queue >= 1, "SEND_QUEUE must be at least 1")?;
        check(self.history_size >= 1, "HISTORY_SIZE must be at least 1")?;
        check(
            self.history_bytes >= self.max_message_bytes,
            "HISTORY_BYTES must be at least MAX_MESSAGE_BYTES",
        )?;
        check(
            self.channels.history_bytes >= self.max_message_bytes,
            "CHANNEL_HISTORY_BYTES must be at least MAX_MESSAGE_BYTES",
        )?;
        check(
            self.channels.ttl >= Duration::from_secs(1),
            "CHANNEL_HISTORY_TTL must be at least 1s",
        )?;
        check(
            self.channels.max_subscriptions >= 1,
            "MAX_SUBSCRIPTIONS must be at least 1",
        )?;
        check(
            !self.store_sync_interval.is_zero()
                && self.store_sync_interval <= Duration::from_secs(60),
            "STORE_SYNC_INTERVAL must be above 0 and at most 60s",
        )?;
        check(
            !self.ping_interval.is_zero(),
            "PING_INTERVAL must be above 0",
        )?;
        check(
            self.idle_timeout > self.ping_interval,
            "IDLE_TIMEOUT must be longer than PING_INTERVAL",
        )?;
        check(
            self.max_connections >= 1,
            "MAX_CONNECTIONS must be at least 1",
        )?;
        check(
            self.max_connections_per_user >= 1,
            "MAX_CONNECTIONS_PER_USER must be at least 1",
        )?;
        check(
            valid_node_id(&self.node_id),
            "NODE_ID must be 1-64 of [A-Za-z0-9_.-]",
        )?;
        if let Some(redis) = &self.redis {
            check(
                REDIS_SCHEMES
                    .iter()
                    .any(|scheme| redis.url.expose().starts_with(scheme)),
                "REDIS_URL must start with redis:// or rediss:// (TLS)",
            )?;
            check(
                !redis.prefix.is_empty()
                    && redis.prefix.len() <= 64
                    && !redis.prefix.contains(char::is_whitespace),
                "REDIS_PREFIX must be 1-64 characters without spaces",
            )?;
        }
        Ok(())
    }
}

/// Why a start with `JWT_PUBLIC_KEY` or `JWT_JWKS_URL` but without issuer or
/// audience fails.
pub const EXTERNAL_NEEDS_ISS_AUD: &str =
    "JWT_ISSUER and JWT_AUDIENCE are required when JWT_PUBLIC_KEY or JWT_JWKS_URL is set \
     (the provider signs tokens for other applications too)";

/// An unset or empty flag: absent (an empty environment variable unsets it).
pub fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// `TRUSTED_PROXY_HEADER` as a (lowercase) header name; unset or blank: none.
pub fn proxy_header(raw: Option<&str>) -> Result<Option<HeaderName>, ConfigError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(name) => HeaderName::try_from(name).map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "TRUSTED_PROXY_HEADER '{name}' is not a header name"
            ))
        }),
    }
}

/// `ALLOWED_ORIGINS` entries trimmed, without a trailing `/`, empty ones dropped.
pub fn normalize_origins(origins: Vec<String>) -> Vec<String> {
    origins
        .into_iter()
        .map(|o| o.trim().trim_end_matches('/').to_owned())
        .filter(|o| !o.is_empty())
        .collect()
}

/// The secret a node signs with: the given one, else the one kept in the data
/// folder ([`resolve_secret`]); with `REDIS_URL` a given one is required
/// ([`REDIS_NEEDS_SECRET`]).
pub fn node_secret(
    given: Option<String>,
    clustered: bool,
    data_dir: &Path,
) -> Result<Secret, ConfigError> {
    let given = non_empty(given);
    if clustered && given.is_none() {
        return Err(ConfigError::Invalid(REDIS_NEEDS_SECRET.to_owned()));
    }
    resolve_secret(given, data_dir)
}

/// `NODE_ID` if set, else `default_node_id()` (FLY_MACHINE_ID, or the hostname plus a suffix).
pub fn node_id_or_default(given: Option<String>) -> String {
    non_empty(given).unwrap_or_else(default_node_id)
}

/// The schemes `REDIS_URL` may use: plain TCP, or TLS (`rediss://`, the
/// server's certificate checked against the system's CA certificates).
pub const REDIS_SCHEMES: [&str; 2] = ["redis://", "rediss://"];

/// Why a node with `REDIS_URL` refuses to start without `JWT_SECRET`.
pub const REDIS_NEEDS_SECRET: &str =
    "REDIS_URL is set but JWT_SECRET is not: every node must sign \
     and check tokens with the same secret (a secret generated per node would make the nodes \
     refuse each other's tokens); set the same JWT_SECRET on every node";

fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `FLY_MACHINE_ID`, else the hostname plus a random suffix (two containers
/// may share a hostname), cut to what `NODE_ID` allows.
fn default_node_id() -> String {
    if let Some(id) = std::env::var("FLY_MACHINE_ID")
        .ok()
        .filter(|id| valid_node_id(id))
    {
        return id;
    }
    let host: String = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(48)
        .collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    if host.is_empty() {
        format!("node-{suffix}")
    } else {
        format!("{host}-{suffix}")
    }
}

/// Uses the given secret, or the one kept in `data_dir/jwt_secret`, creating it
/// (mode 0600) on first start so tokens survive restarts.
pub fn resolve_secret(given: Option<String>, data_dir: &Path) -> Result<Secret, ConfigError> {
    if let Some(secret) = given.filter(|s| !s.is_empty()) {
        return Ok(Secret(secret));
    }
    let data_err = |source| ConfigError::DataDir {
        path: data_dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(data_err)?;
    let path = data_dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 16 => return Ok(Secret(secret.trim().to_owned())),
        Ok(_) => {
            return Err(ConfigError::Invalid(format!(
                "{} is shorter than 16 bytes",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(data_err(e)),
    }
    let secret = Alphanumeric.sample_string(&mut rand::rng(), 48);
    write_private(&path, &secret).map_err(data_err)?;
    Ok(Secret(secret))
}

/// Fails with one line naming the folder and the user when this process
/// cannot create files in `data_dir` (a root-owned volume mounted for the
/// image's uid 10001), instead of a crash later on the secret or the store.
pub fn check_writable(data_dir: &Path) -> Result<(), ConfigError> {
    let probe = data_dir.join(format!(".agentcast-write-check-{}", std::process::id()));
    let result = std::fs::create_dir_all(data_dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map(drop)
    });
    match result {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(ConfigError::Invalid(format!(
                "cannot write data folder {} as {}: permission denied; chown it or run \
                 the image as root so its entrypoint can",
                data_dir.display(),
                current_user()
            )))
        }
        Err(source) => Err(ConfigError::DataDir {
            path: data_dir.to_owned(),
            source,
        }),
    }
}

/// `uid N (name)` of this process, without unsafe code: the owner of
/// `/proc/self` is the effective uid, and `/etc/passwd` names it.
fn current_user() -> String {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata("/proc/self") {
            let uid = meta.uid();
            let name = std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|passwd| {
                    passwd.lines().find_map(|line| {
                        let mut fields = line.split(':');
                        let name = fields.next()?;
                        (fields.nth(1)? == uid.to_string()).then(|| name.to_owned())
                    })
                });
            return match name {
                Some(name) => format!("uid {uid} ({name})"),
                None => format!("uid {uid}"),
            };
        }
    }
    "this user".to_owned()
}

/// The given secret, or the one the server keeps in `data_dir/jwt_secret`;
/// never creates one: a token signed with a new secret would be refused by
/// the server (`agentcast token`).
pub fn existing_secret(given: Option<String>, data_dir: &Path) -> Result<Secret, ConfigError> {
    if let Some(secret) = given.filter(|s| !s.is_empty()) {
        return Ok(Secret(secret));
    }
    let path = data_dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 16 => Ok(Secret(secret.trim().to_owned())),
        Ok(_) => Err(ConfigError::Invalid(format!(
            "{} is shorter than 16 bytes",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ConfigError::Invalid(format!(
            "no secret to sign with: {} does not exist and JWT_SECRET is unset; \
             point --data-dir (DATA_DIR) at the server's data folder, or set JWT_SECRET \
             to the server's secret",
            path.display()
        ))),
        Err(e) => Err(ConfigError::DataDir {
            path: path.clone(),
            source: e,
        }),
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_url_accepts_redis_and_rediss_only_and_never_echoes_it() {
        let with_url = |url: &str| {
            let mut settings = Settings::for_tests("/nonexistent");
            settings.redis = Some(RedisSettings {
                url: Secret::new(url),
                prefix: "agentcast".to_owned(),
            });
            settings.validate()
        };
        assert!(with_url("redis://127.0.0.1:6379").is_ok());
        assert!(with_url("rediss://default:hunter2hunter2@redis.example:6380/0").is_ok());
        for bad in [
            "http://:hunter2hunter2@redis.example",
            "redis:/x",
            "tls://x:6379",
        ] {
            let error = with_url(bad).expect_err(bad).to_string();
            assert!(error.contains("rediss://"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    fn with_jwks(url: &str) -> Settings {
        let mut settings = Settings::for_tests("/nonexistent");
        settings.jwt_jwks = Some(JwksSettings {
            url: reqwest::Url::parse(url).unwrap(),
            refresh: Duration::from_secs(300),
            min_refresh_gap: JWKS_MIN_REFRESH_GAP,
            start_wait: JWKS_START_WAIT,
            fetch_timeout: JWKS_FETCH_TIMEOUT,
        });
        settings.jwt_issuer = Some("https://idp.example".into());
        settings.jwt_audience = Some("agentcast".into());
        settings
    }

    #[test]
    fn a_jwks_url_is_https_or_http_to_a_loopback_host() {
        for good in [
            "https://idp.example/.well-known/jwks.json",
            "http://127.0.0.1:8081/jwks",
            "http://127.3.2.1/jwks",
            "http://[::1]:9000/jwks",
            "http://LOCALHOST/jwks",
        ] {
            assert!(jwks_url(good).is_ok(), "{good}");
            assert!(with_jwks(good).validate().is_ok(), "{good}");
        }
        for (bad, says) in [
            ("http://idp.example/jwks", "must use https"),
            ("http://10.0.0.1/jwks", "must use https"),
            ("http://localhost.evil.example/jwks", "must use https"),
            ("http://[::ffff:7f00:1]/jwks", "must use https"),
            ("ftp://127.0.0.1/jwks", "https://"),
            ("idp.example/jwks", "not a URL"),
        ] {
            let error = jwks_url(bad).expect_err(bad).to_string();
            assert!(
                error.contains("JWT_JWKS_URL") && error.contains(says) && !error.contains('\n'),
                "{bad}: {error}"
            );
        }
        // A URL that slipped past (tests build settings by hand) is checked again.
        let mut settings = with_jwks("https://idp.example/jwks");
        settings.jwt_jwks.as_mut().unwrap().url =
            reqwest::Url::parse("http://idp.example").unwrap();
        assert!(settings.validate().is_err());
    }

    #[test]
    fn a_jwks_needs_issuer_audience_and_no_public_key() {
        let mut settings = with_jwks("https://idp.example/jwks");
        settings.jwt_public_key = Some("-----BEGIN PUBLIC KEY-----".into());
        let error = settings.validate().expect_err("both").to_string();
        assert!(
            error.contains("JWT_PUBLIC_KEY") && error.contains("JWT_JWKS_URL"),
            "{error}"
        );
        for (issuer, audience) in [(None, None), (Some("i"), None), (None, Some("a"))] {
            let mut settings = with_jwks("https://idp.example/jwks");
            settings.jwt_issuer = issuer.map(str::to_owned);
            settings.jwt_audience = audience.map(str::to_owned);
            let error = settings.validate().expect_err("no iss/aud").to_string();
            assert!(
                error.contains("JWT_ISSUER")
                    && error.contains("JWT_AUDIENCE")
                    && error.contains("JWT_JWKS_URL")
                    && !error.contains('\n'),
                "{error}"
            );
        }
        let mut settings = with_jwks("https://idp.example/jwks");
        settings.jwt_jwks.as_mut().unwrap().refresh = Duration::from_secs(1);
        assert!(settings.validate().is_err(), "JWT_JWKS_REFRESH below 10s");
    }

    #[test]
    fn claim_paths_are_pointers_or_names() {
        let path = |raw: &str| ClaimPath::parse("JWT_ROLE_CLAIM", raw);
        assert_eq!(path("org_id").unwrap().segments(), ["org_id"]);
        assert_eq!(
            path("/app_metadata/role").unwrap().segments(),
            ["app_metadata", "role"]
        );
        assert_eq!(
            path("/https:~1~1example.com~1tenant").unwrap().segments(),
            ["https://example.com/tenant"]
        );
        assert_eq!(path("/a~0b/~01").unwrap().segments(), ["a~b", "~1"]);
        for bad in ["", "/a~2", "/a~", "with\ncontrol", &"/a".repeat(17)] {
            let error = path(bad).expect_err(bad).to_string();
            assert!(
                error.starts_with("JWT_ROLE_CLAIM '") && !error.contains('\n'),
                "{error}"
            );
        }
        // Mapping applies to external tokens only: alone it is a mistake.
        let mut settings = Settings::for_tests("/nonexistent");
        settings.jwt_tenant_claim = Some(path("org_id").unwrap());
        let error = settings.validate().expect_err("no provider").to_string();
        assert!(error.contains("JWT_TENANT_CLAIM"), "{error}");
        let mut settings = with_jwks("https://idp.example/jwks");
        settings.jwt_tenant_claim = Some(path("org_id").unwrap());
        settings.validate().expect("with a JWKS");
    }

    #[test]
    fn secret_is_generated_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("agentcast-cfg-{}", uuid::Uuid::new_v4()));
        let first = resolve_secret(None, &dir).unwrap();
        let second = resolve_secret(None, &dir).unwrap();
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("jwt_secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{first:?}").contains(first.expose()));
        std::fs::remove_dir_all(dir).ok();
    }
}
