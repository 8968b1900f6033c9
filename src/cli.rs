//! The command line: clap structs for every subcommand, one environment
//! variable per server flag (clap `env`), so the same binary is configured the
//! same way on a laptop, in Docker and on fly.io.
//!
//! A module of the binary (not of the server's library), used by `main.rs`
//! only: it maps the flags onto the validated `agentcast::config` types
//! ([`ServeArgs::into_settings`]) and names the load tool's flags
//! ([`crate::bench::BenchArgs`]); the library never sees clap structs, so
//! `config` stays a leaf the server's modules can all read.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use agentcast::config::{
    self, parse_bytes, parse_duration, parse_switch, AccountSettings, ChannelSettings, ClaimPath,
    ConfigError, JwksSettings, LogStoreKind, Patterns, RedisSettings, Secret, Settings, StoreSync,
};

use crate::bench::BenchArgs;

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

    /// JWKS URL of an external identity provider (instead of JWT_PUBLIC_KEY): its
    /// RS256/ES256 keys are fetched at start, cached, picked by the token's `kid`
    /// and fetched again on an unknown `kid` (at most once per 10s). https only
    /// (http to 127.0.0.0/8, ::1 or localhost).
    #[arg(long, env = "JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// How often the JWKS is fetched again (10s to 24h).
    #[arg(long, env = "JWT_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwt_jwks_refresh: Duration,

    /// Where external tokens keep the role: a JSON pointer (`/app_metadata/role`,
    /// `/realm_access/roles`) or a top-level claim name. `admin`, or a list
    /// holding `admin`, is an admin; anything else, or nothing, a user.
    #[arg(long, env = "JWT_ROLE_CLAIM")]
    pub jwt_role_claim: Option<String>,

    /// Where external tokens keep the tenant: a JSON pointer
    /// (`/https:~1~1example.com~1tenant`) or a top-level claim name (`org_id`);
    /// a token without it is refused.
    #[arg(long, env = "JWT_TENANT_CLAIM")]
    pub jwt_tenant_claim: Option<String>,

    /// The `iss` external tokens must carry (required with JWT_PUBLIC_KEY or JWT_JWKS_URL).
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The `aud` external tokens must carry (required with JWT_PUBLIC_KEY or
    /// JWT_JWKS_URL); our own tokens that carry an `aud` must match it too.
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

    /// Messages kept per channel for resume; 0 keeps none (live only).
    #[arg(long, env = "CHANNEL_HISTORY", default_value_t = 1000)]
    pub channel_history: usize,

    /// Bytes of messages kept per channel (a number, or with a unit); with
    /// CHANNEL_HISTORY, whichever is reached first.
    #[arg(long, env = "CHANNEL_HISTORY_BYTES", default_value = "4MiB", value_parser = parse_bytes)]
    pub channel_history_bytes: usize,

    /// A channel is forgotten this long after its last publish; its next
    /// publish starts a new epoch (seconds, or with a unit: 24h).
    #[arg(long, env = "CHANNEL_HISTORY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub channel_history_ttl: Duration,

    /// Channels a user token without a `channels` claim may subscribe to:
    /// comma-separated names or prefixes ending in `*` (`*`: every channel of
    /// its tenant; empty: none).
    #[arg(long, env = "USER_CHANNELS", default_value = "*")]
    pub user_channels: String,

    /// Channel subscriptions per connection (beyond: `too_many_subscriptions`).
    #[arg(long, env = "MAX_SUBSCRIPTIONS", default_value_t = 64)]
    pub max_subscriptions: usize,

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

    /// Redis shared by several nodes (`redis://[user:password@]host:port[/db]`,
    /// or `rediss://…` for TLS).
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

/// Flags of `agentcast token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// User id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Role claim.
    #[arg(long, value_enum, default_value = "user")]
    pub role: agentcast::auth::Role,
    /// Tenant claim.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Display name claim.
    #[arg(long)]
    pub name: Option<String>,
    /// Channels claim: comma-separated names or prefixes ending in `*`
    /// (`task:*,run:42`); an empty value allows no channel.
    #[arg(long)]
    pub channels: Option<String>,
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

/// The `LOG_FORMAT` setting: how `serve` writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl ServeArgs {
    /// Validates the flags into [`Settings`], creating the data folder and the
    /// JWT secret file if needed.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        config::check_writable(&self.data_dir)?;
        let redis_url = config::non_empty(self.redis_url);
        let jwt_secret = config::node_secret(self.jwt_secret, redis_url.is_some(), &self.data_dir)?;
        let jwt_jwks = config::non_empty(self.jwt_jwks_url)
            .map(|url| JwksSettings::new(&url, self.jwt_jwks_refresh))
            .transpose()?;
        let claim = |what, raw| config::non_empty(raw).map(|raw| ClaimPath::parse(what, &raw));
        let jwt_role_claim = claim("JWT_ROLE_CLAIM", self.jwt_role_claim).transpose()?;
        let jwt_tenant_claim = claim("JWT_TENANT_CLAIM", self.jwt_tenant_claim).transpose()?;
        let settings = Settings {
            bind: self.bind,
            port: self.port,
            data_dir: self.data_dir,
            log_store: self.log_store,
            store_sync: self.store_sync,
            store_sync_interval: self.store_sync_interval,
            jwt_secret,
            jwt_public_key: config::non_empty(self.jwt_public_key),
            jwt_jwks,
            jwt_role_claim,
            jwt_tenant_claim,
            jwt_issuer: config::non_empty(self.jwt_issuer),
            jwt_audience: config::non_empty(self.jwt_audience),
            jwt_leeway: Duration::from_secs(30),
            accounts: self.accounts.into_settings()?,
            max_message_bytes: self.max_message_bytes,
            send_queue: self.send_queue,
            history_size: self.history_size,
            history_bytes: self.history_bytes,
            channels: ChannelSettings {
                history: self.channel_history,
                history_bytes: self.channel_history_bytes,
                ttl: self.channel_history_ttl,
                user_channels: Patterns::parse_list(&self.user_channels)
                    .map_err(|e| ConfigError::Invalid(format!("USER_CHANNELS: {e}")))?,
                max_subscriptions: self.max_subscriptions,
            },
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            max_connections_per_user: self.max_connections_per_user,
            client_frame_rate: 10.0,
            client_frame_burst: 50.0,
            allowed_origins: self.allowed_origins.map(config::normalize_origins),
            shutdown_timeout: self.shutdown_timeout,
            metrics_token: config::non_empty(self.metrics_token).map(Secret::new),
            redis: redis_url.map(|url| RedisSettings {
                url: Secret::new(url),
                prefix: self.redis_prefix,
            }),
            node_id: config::node_id_or_default(self.node_id),
            heartbeat: Duration::from_secs(25),
        };
        settings.validate()?;
        Ok(settings)
    }
}

impl AccountArgs {
    /// Validates the account flags into [`AccountSettings`].
    pub fn into_settings(self) -> Result<AccountSettings, ConfigError> {
        let settings = AccountSettings {
            trusted_proxy_header: config::proxy_header(self.trusted_proxy_header.as_deref())?,
            admin_password: config::non_empty(self.admin_password).map(Secret::new),
            signup: self.signup,
            token_ttl: self.token_ttl,
            login_max_failures: self.login_max_failures,
            login_window: self.login_window,
            signups_per_hour: self.signups_per_hour,
        };
        if let Some(password) = &settings.admin_password {
            if agentcast::store::validate_password(password.expose()).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "ADMIN_PASSWORD must be at least {} characters and at most {} bytes",
                    agentcast::store::MIN_PASSWORD_CHARS,
                    agentcast::store::MAX_PASSWORD_BYTES
                )));
            }
        }
        settings.validate()?;
        Ok(settings)
    }
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
    fn jwks_flags_make_settings_or_one_line_errors() {
        let data_dir = std::env::temp_dir().join(format!("agentcast-cli-{}", uuid::Uuid::new_v4()));
        let dir = data_dir.to_str().unwrap().to_owned();
        let settings = |args: &[&str]| {
            let mut argv = vec![
                "agentcast",
                "--data-dir",
                &dir,
                "--jwt-secret",
                "0123456789abcdef",
            ];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap().serve.into_settings()
        };
        let iss_aud = [
            "--jwt-issuer",
            "https://idp.example",
            "--jwt-audience",
            "agentcast",
        ];
        let ok = settings(
            &[
                &iss_aud[..],
                &[
                    "--jwt-jwks-url",
                    "https://idp.example/.well-known/jwks.json",
                    "--jwt-jwks-refresh",
                    "10m",
                    "--jwt-role-claim",
                    "/realm_access/roles",
                    "--jwt-tenant-claim",
                    "org_id",
                ],
            ]
            .concat(),
        )
        .unwrap();
        let jwks = ok.jwt_jwks.as_ref().unwrap();
        assert_eq!(jwks.refresh, Duration::from_secs(600));
        assert_eq!(jwks.min_refresh_gap, Duration::from_secs(10));
        assert_eq!(
            ok.jwt_role_claim.as_ref().unwrap().as_str(),
            "/realm_access/roles"
        );
        for (args, says) in [
            (
                vec!["--jwt-jwks-url", "http://idp.example/jwks"],
                "must use https",
            ),
            (
                vec![
                    "--jwt-jwks-url",
                    "https://idp.example/jwks",
                    "--jwt-public-key",
                    "x",
                ],
                "both set",
            ),
            (
                vec![
                    "--jwt-jwks-url",
                    "https://idp.example/jwks",
                    "--jwt-tenant-claim",
                    "/a~9",
                ],
                "JWT_TENANT_CLAIM",
            ),
        ] {
            let error = settings(&[&iss_aud[..], &args].concat())
                .expect_err(says)
                .to_string();
            assert!(error.contains(says) && !error.contains('\n'), "{error}");
        }
        let error = settings(&["--jwt-jwks-url", "https://idp.example/jwks"])
            .expect_err("no iss/aud")
            .to_string();
        assert!(error.contains("JWT_ISSUER and JWT_AUDIENCE"), "{error}");
        std::fs::remove_dir_all(data_dir).ok();
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

        let settings = |args: &[&str]| parse(args).unwrap().into_settings();
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
}
