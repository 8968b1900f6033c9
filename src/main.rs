//! The `agentcast` binary: parse flags, set up logging, run a subcommand.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

use agentcast::auth::{Authenticator, Claims};
use agentcast::config::{Cli, Command, LogFormat, ServeArgs, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => token(args),
        Some(Command::Bench(args)) => match agentcast::bench::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentcast bench: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_tracing(args.log_format);
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let settings = match Settings::from_args(args) {
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

fn token(args: agentcast::config::TokenArgs) -> ExitCode {
    let mut settings = Settings::for_tests(&args.data_dir);
    settings.jwt_secret = match agentcast::config::resolve_secret(args.jwt_secret, &args.data_dir) {
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
    println!("{}", auth.mint(&claims));
    ExitCode::SUCCESS
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // tungstenite traces every frame with its payload, and a client's
        // `refresh` frame carries a token: no level may show it (SPEC §1).
        .add_directive("tungstenite=debug".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
