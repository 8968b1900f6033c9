//! The `agentcast` binary: parse flags, set up logging, run a subcommand.
//!
//! Its two own modules stay out of the server's library: [`cli`] (the clap
//! flags, mapped onto `agentcast::config`) and [`bench`] (the load tool, a
//! client that uses none of the server's modules but the leaf `units`).

#![forbid(unsafe_code)]

mod bench;
mod cli;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

use agentcast::auth::{Authenticator, Claims};
use agentcast::config::Settings;
use cli::{AdminCommand, Cli, Command, LogFormat, ResetPasswordArgs, ServeArgs, TokenArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => token(args),
        Some(Command::Admin(AdminCommand::ResetPassword(args))) => reset_password(args),
        Some(Command::Bench(args)) => match bench::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentcast bench: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Serve(args)) => serve(*args),
        None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_tracing(args.log_format);
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let settings = match args.into_settings() {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let addr = SocketAddr::new(settings.bind, settings.port);
        let listener = agentcast::app::bind(addr)?;
        agentcast::app::serve(settings, listener, agentcast::shutdown::signal()).await
    });
    // Sessions that ignored the drain must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn token(args: TokenArgs) -> ExitCode {
    let mut settings = Settings::for_tests(&args.data_dir);
    // Never a new secret here: the server would refuse what it signs.
    settings.jwt_secret = match agentcast::config::existing_secret(args.jwt_secret, &args.data_dir)
    {
        Ok(secret) => secret,
        Err(e) => {
            eprintln!("agentcast token: {e}");
            return ExitCode::from(2);
        }
    };
    let auth = match Authenticator::new(&settings) {
        Ok(auth) => auth,
        Err(e) => {
            eprintln!("agentcast token: {e}");
            return ExitCode::from(2);
        }
    };
    let mut claims = Claims::new(args.sub, args.role, args.tenant, args.ttl);
    claims.name = args.name;
    if let Some(list) = args.channels {
        let patterns: Box<[String]> = list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if let Err(e) = agentcast::channels::check_claim(&patterns) {
            eprintln!("agentcast token: --channels: {e}");
            return ExitCode::from(2);
        }
        claims.channels = Some(patterns);
    }
    println!("{}", auth.mint(&claims));
    ExitCode::SUCCESS
}

/// `agentcast admin reset-password`: a new password for one account, set in
/// the data folder of a stopped or running server (SQLite lets this second
/// writer in between the server's commits), or in the cluster's Redis when
/// `REDIS_URL` is set. The password goes to stdout only, never to a log.
fn reset_password(args: ResetPasswordArgs) -> ExitCode {
    use agentcast::store::{hash_password, validate_password, MAX_PASSWORD_BYTES};
    use std::io::{BufRead, Read};

    let fail = |message: String| {
        eprintln!("agentcast admin reset-password: {message}");
        ExitCode::FAILURE
    };
    let password = if args.password_stdin {
        let mut line = String::new();
        // One line, bounded: a password longer than the limit is refused below.
        let limit = u64::try_from(MAX_PASSWORD_BYTES).unwrap_or(u64::MAX) + 2;
        if let Err(e) = std::io::stdin().lock().take(limit).read_line(&mut line) {
            return fail(format!("cannot read the password from stdin: {e}"));
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        agentcast::auth::random_token(24)
    };
    if let Err(e) = validate_password(&password) {
        return fail(e.to_string());
    }
    let redis = args
        .redis_url
        .clone()
        .filter(|url| !url.is_empty())
        .map(|url| agentcast::config::RedisSettings {
            url: agentcast::config::Secret::new(url),
            prefix: args.redis_prefix.clone(),
        });
    let place = match &redis {
        Some(_) => "Redis (REDIS_URL)".to_owned(),
        None => format!("data folder {}", args.data_dir.display()),
    };
    if redis.is_none() && !args.data_dir.join("agentcast.db").exists() {
        return fail(format!(
            "no store in {} (point --data-dir or DATA_DIR at the server's data folder)",
            args.data_dir.display()
        ));
    }
    let hash = match hash_password(&password) {
        Ok(hash) => hash,
        Err(e) => return fail(e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(agentcast::directory::reset_password_hash(
        redis.as_ref(),
        &args.data_dir,
        &args.tenant,
        &args.username,
        &hash,
    ));
    match result {
        Ok(true) if args.password_stdin => {
            eprintln!(
                "password of {:?} in tenant {:?} changed",
                args.username, args.tenant
            );
            ExitCode::SUCCESS
        }
        Ok(true) => {
            println!("{password}");
            eprintln!(
                "new password of {:?} in tenant {:?} printed above (shown once)",
                args.username, args.tenant
            );
            ExitCode::SUCCESS
        }
        Ok(false) => fail(format!(
            "no account {:?} in tenant {:?} in {place}",
            args.username, args.tenant
        )),
        Err(e) => fail(format!("{e} ({place})")),
    }
}

fn init_tracing(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // tungstenite traces every frame with its payload, and a client's
    // `refresh` frame carries a token: no level may show it (SPEC §1). The
    // cap is added only where trace is on: a `tungstenite=debug` directive
    // under `info` would turn tungstenite's debug lines on (two per close).
    let trace_on = filter
        .max_level_hint()
        .is_none_or(|level| level > tracing_subscriber::filter::LevelFilter::DEBUG);
    if trace_on {
        filter = filter.add_directive("tungstenite=debug".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
