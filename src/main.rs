//! The `modelux` command: run the gateway, validate a config, manage keys.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rand::Rng;

mod admin;

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
    /// Show decision traces: one request's decision (`--trace ID`), or a list of recent
    /// requests matching filters. Reads the trace store the config names (ClickHouse, or
    /// the embedded file in its data dir).
    Logs(Box<LogsArgs>),
    /// Create, revoke (through the management API) and hash API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Projects, through the management API.
    Projects {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::ProjectsCommand,
    },
    /// Routing configs and their versions, through the management API.
    Configs {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::ConfigsCommand,
    },
    /// Budgets with their spend and forecast, through the management API.
    Budgets {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::BudgetsCommand,
    },
    /// Replay stored traffic through a candidate routing config and print baseline vs
    /// candidate: cost, p50/p95 latency, errors, route distribution (an experiment,
    /// through the management API).
    Replay(Box<admin::ReplayArgs>),
    /// Experiments (replays), through the management API.
    Experiments {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::ExperimentsCommand,
    },
    /// The MCP server (every management operation as a tool) for local MCP clients, over
    /// stdin and stdout, calling the gateway's management API with a management key.
    Mcp {
        #[command(flatten)]
        conn: admin::Conn,
        /// Serve over stdin/stdout (the only transport here; HTTP clients use
        /// http://<manage_listen>/mcp on the gateway itself).
        #[arg(long)]
        stdio: bool,
    },
}

#[derive(clap::Args)]
struct LogsArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print this request's decision: attempts, reasons, timings, cost, config version.
    #[arg(long, value_name = "REQUEST_ID")]
    trace: Option<String>,
    /// Only requests with this tag (repeatable; all must match).
    #[arg(long, value_name = "KEY=VALUE")]
    tag: Vec<String>,
    /// Only requests newer than this: 90s, 15m, 1h, 7d, or an ISO 8601 time.
    #[arg(long, default_value = "1h")]
    since: String,
    /// Only requests older than this (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Served or requested model (e.g. gpt-4o-mini, @production).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    provider: Option<String>,
    #[arg(long)]
    project: Option<String>,
    /// 2xx, 4xx, 5xx or one status code.
    #[arg(long)]
    status: Option<String>,
    /// Customer trace id (X-Modelux-Trace-Id).
    #[arg(long)]
    trace_id: Option<String>,
    #[arg(long)]
    conversation: Option<String>,
    #[arg(long)]
    end_user: Option<String>,
    /// Most requests to print (newest first).
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON (the management API's records) instead of text.
    #[arg(long)]
    json: bool,
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
    /// Create a key through the management API (shown once).
    Create {
        #[command(flatten)]
        conn: admin::Conn,
        /// The project (id or slug) of a project key.
        #[arg(long, required_unless_present = "management")]
        project: Option<String>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        requests_per_minute: Option<u64>,
        /// A management key instead of a project key.
        #[arg(long)]
        management: bool,
    },
    /// Revoke a key through the management API: the next request with it gets 401.
    Revoke {
        #[command(flatten)]
        conn: admin::Conn,
        id: String,
        #[arg(long)]
        management: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => check(config),
        Command::Keys { command } => keys(command),
        Command::Logs(args) => logs(*args),
        Command::Projects { conn, command } => admin::projects(&conn, command),
        Command::Configs { conn, command } => admin::configs(&conn, command),
        Command::Budgets { conn, command } => admin::budgets(&conn, command),
        Command::Replay(args) => admin::replay(*args),
        Command::Experiments { conn, command } => admin::experiments(&conn, command),
        Command::Mcp { conn, stdio } => mcp(conn, stdio),
    }
}

fn mcp(conn: admin::Conn, stdio: bool) -> ExitCode {
    if !stdio {
        eprintln!("modelux mcp: pass --stdio (HTTP MCP clients connect to http://<manage_listen>/mcp)");
        return ExitCode::from(2);
    }
    let Some(key) = conn.admin_key else {
        eprintln!("modelux mcp: a management key is required (--admin-key or MODELUX_ADMIN_KEY)");
        return ExitCode::from(2);
    };
    // stdout carries the protocol: logs go to stderr only.
    tracing_subscriber::fmt().with_env_filter(log_filter("warn")).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("modelux mcp: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(modelux::manage::mcp::serve_stdio(conn.manage_url, key)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelux mcp: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG` (default `default`), with the MCP SDK held to warnings whatever it says: at
/// debug it logs every tool call's arguments and result, secrets included. pingora's proxy
/// layer is off unless `RUST_LOG` names it: every request is answered by our own
/// `request_filter`, so all it has left to log is each client that resets or garbles its
/// connection before a request head, at ERROR, one line per connection, which a hostile
/// client could use to flood the log.
fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let mut held = vec!["rmcp=warn"];
    if !asked.contains("pingora_proxy") {
        held.push("pingora_proxy=off");
    }
    for directive in held {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

fn init_logging() {
    let filter = log_filter("info");
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
    modelux::server::spawn_drain_watch(&server, &handles);
    server.run(pingora::server::RunArgs::default());
    if !modelux::server::finish(&handles) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `90s`, `15m`, `1h`, `7d` before `now_ms`, or an ISO 8601 time.
fn logs(args: LogsArgs) -> ExitCode {
    use modelux::trace::LogQuery;
    let snapshot = match load_config(args.config.as_ref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let settings = &snapshot.settings;
    if settings.traces.clickhouse.is_none() {
        let path = settings.data_dir.join(modelux::server::EMBEDDED_TRACES_FILE);
        if !path.exists() {
            eprintln!(
                "no traces yet: {} does not exist (the gateway creates it when it starts)",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let store = match modelux::server::open_trace_store(settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let now_ms = u64::try_from(modelux::spend::unix_now()).unwrap_or(0) * 1000;
    let mut query =
        LogQuery { limit: args.limit.clamp(1, modelux::trace::query::MAX_PAGE), ..LogQuery::default() };
    if args.trace.is_none() {
        let Some(start) = admin::when(&args.since, now_ms) else {
            eprintln!("--since: \"{}\" is not a duration (90s, 15m, 1h, 7d) or an ISO 8601 time", args.since);
            return ExitCode::FAILURE;
        };
        query.start_ms = Some(start);
        if let Some(until) = &args.until {
            let Some(end) = admin::when(until, now_ms) else {
                eprintln!("--until: \"{until}\" is not a duration or an ISO 8601 time");
                return ExitCode::FAILURE;
            };
            query.end_ms = Some(end);
        }
        for tag in &args.tag {
            let Some((k, v)) = tag.split_once('=') else {
                eprintln!("--tag: expected KEY=VALUE, got \"{tag}\"");
                return ExitCode::FAILURE;
            };
            query.tags.push((k.to_string(), v.to_string()));
        }
        if let Some(status) = &args.status {
            match modelux::manage::logs::status_param(status) {
                Ok(filter) => query.status = Some(filter),
                Err(e) => {
                    eprintln!("--{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        query.model = args.model.clone();
        query.provider = args.provider.clone();
        query.project = args.project.clone();
        query.trace_id = args.trace_id.clone();
        query.conversation_id = args.conversation.clone();
        query.end_user = args.end_user.clone();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        if let Some(id) = &args.trace {
            return match store.get(id).await {
                Ok(Some(row)) => {
                    if args.json {
                        println!("{:#}", modelux::manage::logs::full(&row));
                    } else {
                        print!("{}", modelux::trace::render::decision(&row));
                    }
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    eprintln!("no request {id} in the {} trace store", store.kind());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            };
        }
        match store.list(&query).await {
            Ok(page) => {
                for row in &page.rows {
                    if args.json {
                        println!("{}", modelux::manage::logs::summary(row));
                    } else {
                        println!("{}", modelux::trace::render::line(row));
                    }
                }
                if page.next_cursor.is_some() {
                    eprintln!(
                        "(more than {} requests match; narrow the filters or raise --limit)",
                        query.limit
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The config file's snapshot (or the embedded default's), with its errors printed.
fn load_config(config: Option<&PathBuf>) -> Result<modelux::config::Snapshot, ExitCode> {
    let text = match config {
        Some(p) => std::fs::read_to_string(p).map_err(|e| {
            eprintln!("cannot read {}: {e}", p.display());
            ExitCode::FAILURE
        })?,
        None => modelux::config::store::EMBEDDED_DEFAULT.to_string(),
    };
    let base = config
        .and_then(|p| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| std::path::PathBuf::from("."), |p| p.to_path_buf());
    modelux::config::build_snapshot_in(&text, &modelux::config::env_lookup, None, &base).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        eprintln!("{} error(s)", errors.len());
        ExitCode::FAILURE
    })
}

fn check(config: Option<PathBuf>) -> ExitCode {
    match load_config(config.as_ref()) {
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
        Err(code) => code,
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
        KeysCommand::Create { conn, project, name, requests_per_minute, management } => {
            return admin::create_key(&conn, project, name, requests_per_minute, management)
        }
        KeysCommand::Revoke { conn, id, management } => return admin::revoke_key(&conn, id, management),
    }
    ExitCode::SUCCESS
}
