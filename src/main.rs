//! The `modelux` command: run the gateway, validate a config, manage keys.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rand::Rng;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "modelux", version, about = "Self-hosted control plane for LLM traffic")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (proxy + management listeners).
    Serve {
        /// Config file; without it the embedded default (conf/modelux.yaml) is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print every error with its path.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Create and hash API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random key and the key_sha256 to put in the config.
    Generate {
        /// A management key (mlx_mk_) instead of a project key (mlx_sk_).
        #[arg(long)]
        management: bool,
    },
    /// Print the key_sha256 of an existing key.
    Hash { key: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => check(config),
        Command::Keys { command } => keys(command),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

fn serve(config: Option<PathBuf>) -> ExitCode {
    init_logging();
    let options = modelux::server::Options { config_path: config, handle_sighup: true };
    let handles = match modelux::server::open(&options) {
        Ok(h) => h,
        Err(errors) => {
            for e in errors {
                eprintln!("config error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let snapshot = handles.store.load();
    tracing::info!(
        proxy = %snapshot.settings.proxy_listen,
        manage = %snapshot.settings.manage_listen,
        config = %options.config_path.as_ref().map_or("embedded default".to_string(), |p| p.display().to_string()),
        "modelux starting"
    );
    drop(snapshot);
    let server = modelux::server::build(&handles, &options);
    server.run(pingora::server::RunArgs::default());
    // Requests that finished during the grace period settled after the flusher's last
    // round: write them before exiting.
    if let Err(e) = handles.spend.flush() {
        tracing::error!(error = %e, "final write of budget spend failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn check(config: Option<PathBuf>) -> ExitCode {
    let text = match &config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("cannot read {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => modelux::config::store::EMBEDDED_DEFAULT.to_string(),
    };
    let base = config
        .as_ref()
        .and_then(|p| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| std::path::PathBuf::from("."), |p| p.to_path_buf());
    match modelux::config::build_snapshot_in(&text, &modelux::config::env_lookup, None, &base) {
        Ok(s) => {
            println!(
                "config OK: {} providers, {} projects, {} project keys, {} management keys, {} routing configs, {} budgets",
                s.providers.len(),
                s.projects.len(),
                s.project_keys.len(),
                s.management_keys.len(),
                s.routing_configs.len(),
                s.budgets.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} error(s)", errors.len());
            ExitCode::FAILURE
        }
    }
}

fn keys(command: KeysCommand) -> ExitCode {
    match command {
        KeysCommand::Generate { management } => {
            let prefix = if management {
                modelux::auth::MANAGEMENT_KEY_PREFIX
            } else {
                modelux::auth::PROJECT_KEY_PREFIX
            };
            let bytes: [u8; 24] = rand::rng().random();
            let key = format!("{prefix}{}", hex::encode(bytes));
            println!("key:        {key}");
            println!("key_sha256: {}", hex::encode(modelux::auth::digest(&key)));
        }
        KeysCommand::Hash { key } => println!("{}", hex::encode(modelux::auth::digest(&key))),
    }
    ExitCode::SUCCESS
}
