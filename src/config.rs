//! Command line and environment -> validated [`Settings`].
//!
//! Every flag has an environment variable (clap `env`) so the same binary is
//! configured the same way on a laptop, in Docker and on fly.io. Parsing ends in
//! plain types; nothing downstream re-reads the environment.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use crate::units::{parse_bytes, parse_duration, parse_switch};

use crate::bench::BenchArgs;
pub use crate::log::LogStoreKind;

/// The `STORE_SYNC` setting: how hard a commit holds on to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreSync {
    /// fsync the WAL at every commit (SQLite `synchronous = FULL`).
    Full,
    /// `synchronous = NORMAL`, the WAL fsynced every `STORE_SYNC_INTERVAL`.
    #[default]
    Normal,
}

/// `agentcast`: real-time updates for an agent/task platform.
#[derive(Debug, Parser)]
#[command(name = "agentcast", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Settings for `serve`, also accepted without the subcommand name.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(Box<ServeArgs>),
    /// Mint a token signed with the configured secret.
    Token(TokenArgs),
    /// Maintenance of the data folder (works while the server runs, too).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Load tool: many authenticated connections, fan-out and latency figures.
    Bench(BenchArgs),
}

/// Flags of `agentcast serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,

    /// Folder for state: the SQLite store agentcast.db and the generated JWT secret.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Where tenant logs live: sqlite (durable, 202 after commit) or memory (lost on restart).
    #[arg(long, env = "LOG_STORE", value_enum, default_value = "sqlite")]
    pub log_store: LogStoreKind,

    /// When a commit reaches the disk: normal (the WAL fsynced every STORE_SYNC_INTERVAL:
    /// a crash or kill -9 loses nothing acknowledged, a power cut at most the last interval)
    /// or full (fsync every commit: survives power loss).
    #[arg(long, env = "STORE_SYNC", value_enum, default_value = "normal")]
    pub store_sync: StoreSync,

    /// With STORE_SYNC=normal: how often the WAL is fsynced (at most 60s).
    #[arg(long, env = "STORE_SYNC_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub store_sync_interval: Duration,

    /// HS256 secret for tokens. Unset: generated once and kept in DATA_DIR/jwt_secret.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key of an external identity provider whose RS256/ES256 tokens are accepted too.
    #[arg(long, env = "JWT_PUBLIC_KEY", hide_env_values = true)]
    pub jwt_public_key: Option<String>,

    /// The `iss` external tokens must carry (required with JWT_PUBLIC_KEY).
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The `aud` external tokens must carry (required with JWT_PUBLIC_KEY); our own
    /// tokens that carry an `aud` must match it too.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    #[command(flatten)]
    pub accounts: AccountArgs,

    /// Largest accepted publish body or client frame, in bytes.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Outbound queue per connection, in messages; overflow closes it with 4503.
    #[arg(long, env = "SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,

    /// Messages kept per tenant for resume.
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 10_000)]
    pub history_size: usize,

    /// Bytes of messages kept per tenant for resume (a number, or with a unit:
    /// 512KiB, 64MiB, 1GiB); with HISTORY_SIZE, whichever is reached first.
    #[arg(long, env = "HISTORY_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub history_bytes: usize,

    /// Period of server Ping frames (seconds, or with a unit: 30s, 2m).
    #[arg(long, env = "PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A connection silent this long is closed with 4408.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Open WebSocket connections allowed in total (beyond: 4429).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Open WebSocket connections allowed per user (beyond: 4429).
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 20)]
    pub max_connections_per_user: usize,

    /// Comma-separated origins allowed to connect; unset allows any.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,

    /// How long a SIGTERM drain may take before the process exits anyway.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Bearer token required by /metrics; unset leaves it open.
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Redis shared by several nodes (`redis://[user:password@]host:port[/db]`).
    /// Set: logs, views, presence, accounts and API keys live there, and
    /// JWT_SECRET is required.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Namespace of every Redis key, so deployments can share a Redis.
    #[arg(long, env = "REDIS_PREFIX", default_value = "agentcast")]
    pub redis_prefix: String,

    /// This node's name in logs, stats and metrics (default: FLY_MACHINE_ID,
    /// else the hostname plus a random suffix).
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
}

/// Flags of the embedded accounts: bootstrap admin, signup, login tokens.
#[derive(Debug, Clone, Args)]
pub struct AccountArgs {
    /// Password of the `admin` account created on an empty store. Unset: a
    /// random one is generated and printed once to the log.
    #[arg(long, env = "ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,

    /// Whether anyone may create a `user` account (POST /api/v1/auth/signup).
    #[arg(long, env = "SIGNUP", default_value = "on", value_name = "on|off",
          action = clap::ArgAction::Set, value_parser = parse_switch)]
    pub signup: bool,

    /// Lifetime of the tokens that login and refresh hand out.
    #[arg(long, env = "TOKEN_TTL", default_value = "12h", value_parser = parse_duration)]
    pub token_ttl: Duration,

    /// Failed logins allowed per IP and per username-and-IP within LOGIN_WINDOW
    /// (beyond: 429); a username failing from many addresses is only slowed.
    #[arg(long, env = "LOGIN_MAX_FAILURES", default_value_t = 10)]
    pub login_max_failures: u32,

    /// The window failed logins are counted in.
    #[arg(long, env = "LOGIN_WINDOW", default_value = "15m", value_parser = parse_duration)]
    pub login_window: Duration,

    /// Signups allowed per client IP per hour (beyond: 429 with Retry-After).
    #[arg(long, env = "SIGNUPS_PER_HOUR", default_value_t = 5)]
    pub signups_per_hour: u32,

    /// Header holding the client IP set by a reverse proxy (e.g. Fly-Client-IP,
    /// X-Forwarded-For). Only set it when every request comes through that
    /// proxy: otherwise clients can forge it. Unset: the TCP peer address.
    #[arg(long, env = "TRUSTED_PROXY_HEADER")]
    pub trusted_proxy_header: Option<String>,
}

/// Validated [`AccountArgs`].
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
    pub fn from_args(args: AccountArgs) -> Result<AccountSettings, ConfigError> {
        let trusted_proxy_header = match args.trusted_proxy_header.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(name) => Some(warp::http::HeaderName::try_from(name).map_err(|_| {
                ConfigError::Invalid(format!(
                    "TRUSTED_PROXY_HEADER '{name}' is not a header name"
                ))
            })?),
        };
        let settings = AccountSettings {
            admin_password: args.admin_password.filter(|p| !p.is_empty()).map(Secret),
            signup: args.signup,
            token_ttl: args.token_ttl,
            login_max_failures: args.login_max_failures,
            login_window: args.login_window,
            signups_per_hour: args.signups_per_hour,
            trusted_proxy_header,
        };
        settings.validate()?;
        Ok(settings)
    }

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

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: &str| Err(ConfigError::Invalid(what.to_owned()));
        if let Some(password) = &self.admin_password {
            if crate::store::validate_password(password.expose()).is_err() {
                return invalid(&format!(
                    "ADMIN_PASSWORD must be at least {} characters and at most {} bytes",
                    crate::store::MIN_PASSWORD_CHARS,
                    crate::store::MAX_PASSWORD_BYTES
                ));
            }
        }
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

/// Flags of `agentcast token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// User id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Role claim.
    #[arg(long, value_enum, default_value = "user")]
    pub role: crate::auth::Role,
    /// Tenant claim.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Display name claim.
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime (seconds, or with a unit: 12h).
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Folder holding the generated secret when JWT_SECRET is unset.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// HS256 secret; unset reads DATA_DIR/jwt_secret.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

/// `agentcast admin …`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Set a new password for an account: a random one printed once, or the
    /// one read from stdin with --password-stdin.
    ResetPassword(ResetPasswordArgs),
}

/// Flags of `agentcast admin reset-password`.
#[derive(Debug, Clone, Args)]
pub struct ResetPasswordArgs {
    /// The account's username.
    #[arg(long)]
    pub username: String,
    /// The account's tenant.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Read the new password from the first line of stdin instead of
    /// generating one (nothing is printed then).
    #[arg(long)]
    pub password_stdin: bool,
    /// The server's data folder (holding agentcast.db).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Cluster mode: the account is in this Redis, not in the data folder.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The cluster's `REDIS_PREFIX`.
    #[arg(long, env = "REDIS_PREFIX", default_value = "agentcast")]
    pub redis_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
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
    /// `iss` / `aud` required of tokens (SPEC §2); both are required with a public key.
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
    /// Validates flags, creating the data folder and the JWT secret file if needed.
    pub fn from_args(args: ServeArgs) -> Result<Settings, ConfigError> {
        check_writable(&args.data_dir)?;
        let redis_url = args.redis_url.filter(|u| !u.is_empty());
        let given_secret = args.jwt_secret.filter(|s| !s.is_empty());
        if redis_url.is_some() && given_secret.is_none() {
            return Err(ConfigError::Invalid(REDIS_NEEDS_SECRET.to_owned()));
        }
        let jwt_secret = resolve_secret(given_secret, &args.data_dir)?;
        let settings = Settings {
            bind: args.bind,
            port: args.port,
            data_dir: args.data_dir,
            log_store: args.log_store,
            store_sync: args.store_sync,
            store_sync_interval: args.store_sync_interval,
            jwt_secret,
            jwt_public_key: args.jwt_public_key,
            jwt_issuer: args.jwt_issuer.filter(|v| !v.is_empty()),
            jwt_audience: args.jwt_audience.filter(|v| !v.is_empty()),
            jwt_leeway: Duration::from_secs(30),
            accounts: AccountSettings::from_args(args.accounts)?,
            max_message_bytes: args.max_message_bytes,
            send_queue: args.send_queue,
            history_size: args.history_size,
            history_bytes: args.history_bytes,
            ping_interval: args.ping_interval,
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
            max_connections_per_user: args.max_connections_per_user,
            client_frame_rate: 10.0,
            client_frame_burst: 50.0,
            allowed_origins: args.allowed_origins.map(|origins| {
                origins
                    .into_iter()
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect()
            }),
            shutdown_timeout: args.shutdown_timeout,
            metrics_token: args.metrics_token.filter(|t| !t.is_empty()).map(Secret),
            redis: redis_url.map(|url| RedisSettings {
                url: Secret(url),
                prefix: args.redis_prefix,
            }),
            node_id: args
                .node_id
                .filter(|n| !n.is_empty())
                .unwrap_or_else(default_node_id),
            heartbeat: Duration::from_secs(25),
        };
        settings.validate()?;
        Ok(settings)
    }

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
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::ZERO,
            accounts: AccountSettings::for_tests(),
            max_message_bytes: 64 * 1024,
            send_queue: 1024,
            history_size: 10_000,
            history_bytes: 64 << 20,
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
        check(
            self.jwt_public_key.is_none()
                || (self.jwt_issuer.is_some() && self.jwt_audience.is_some()),
            crate::auth::EXTERNAL_NEEDS_ISS_AUD,
        )?;
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
                redis.url.expose().starts_with("redis://"),
                "REDIS_URL must start with redis://",
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
    let secret = crate::auth::random_token(48);
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
    fn log_store_and_store_sync_default_to_durable_and_parse() {
        // The defaults, unless the environment running the test sets them.
        if std::env::var_os("LOG_STORE").is_none() && std::env::var_os("STORE_SYNC").is_none() {
            let cli = Cli::try_parse_from(["agentcast"]).unwrap();
            assert_eq!(
                (
                    cli.serve.log_store,
                    cli.serve.store_sync,
                    cli.serve.store_sync_interval
                ),
                (
                    LogStoreKind::Sqlite,
                    StoreSync::Normal,
                    Duration::from_secs(1)
                )
            );
        }
        let cli = Cli::try_parse_from([
            "agentcast",
            "serve",
            "--log-store",
            "memory",
            "--store-sync",
            "full",
        ])
        .unwrap();
        let Some(Command::Serve(args)) = cli.command else {
            panic!("serve subcommand");
        };
        assert_eq!(
            (args.log_store, args.store_sync),
            (LogStoreKind::Memory, StoreSync::Full)
        );
        assert!(Cli::try_parse_from(["agentcast", "--log-store", "redis"]).is_err());
    }

    #[test]
    fn account_flags_parse_and_are_checked() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["agentcast"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|cli| cli.serve.accounts)
        };
        let defaults = parse(&[]).unwrap();
        assert!(defaults.signup);
        assert_eq!(defaults.token_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(defaults.login_max_failures, 10);
        assert_eq!(defaults.login_window, Duration::from_secs(900));
        assert_eq!(defaults.signups_per_hour, 5);
        assert!(!parse(&["--signup", "off"]).unwrap().signup);
        assert!(parse(&["--signup", "on"]).unwrap().signup);
        assert!(parse(&["--signup", "maybe"]).is_err());

        let settings = |args: &[&str]| AccountSettings::from_args(parse(args).unwrap());
        assert!(settings(&["--admin-password", "short"]).is_err());
        assert!(settings(&["--token-ttl", "10s"]).is_err());
        assert!(settings(&["--login-max-failures", "0"]).is_err());
        assert!(settings(&["--trusted-proxy-header", "bad header"]).is_err());
        let proxied = settings(&["--trusted-proxy-header", "Fly-Client-IP"]).unwrap();
        assert_eq!(
            proxied.trusted_proxy_header.as_ref().map(|h| h.as_str()),
            Some("fly-client-ip")
        );
        let admin = settings(&["--admin-password", "correct horse"]).unwrap();
        assert!(!format!("{admin:?}").contains("correct horse"));
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
