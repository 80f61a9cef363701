//! Assembles the pingora `Server`: the proxy service, the management service and the
//! config watcher, all sharing one config store and one metrics registry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pingora::connectors::http::Connector;
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::config::store::{ConfigStore, ConfigWatcher, StateFollower};
use crate::config::{CounterSettings, Settings, StateBackend};
use crate::manage::ManageApp;
use crate::metrics::Metrics;
use crate::proxy::{Gateway, GatewayState};
use crate::spend::shared::SharedSettings;
use crate::spend::Spend;
use crate::state::postgres::PostgresState;
use crate::state::secrets::{KeySource, MasterKey};
use crate::state::sqlite::SqliteState;
use crate::state::StateStore;
use crate::trace::clickhouse::{ClickHouseSettings, ClickHouseStore};
use crate::trace::embedded::EmbeddedStore;
use crate::trace::writer::{TraceQueue, TraceWriter, WriterSettings};
use crate::trace::TraceStore;

/// Handles shared with the caller (tests read the store and the metrics).
#[derive(Clone)]
pub struct Handles {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    /// Budget and rate counters, kept across config reloads.
    pub spend: Arc<Spend>,
    /// The logging phase's end of the trace pipeline.
    pub traces: Arc<TraceQueue>,
    /// Drains `traces` into the trace store; `finish_blocking` after the server stops.
    pub trace_writer: Arc<TraceWriter>,
    /// Management state (API-created resources, versions, audit log).
    pub state: Arc<dyn StateStore>,
    /// Seals provider keys at rest.
    pub master: Arc<MasterKey>,
    /// This node's name (`spend.node_id`, else host name and proxy port).
    pub node: Arc<str>,
}

pub struct Options {
    pub config_path: Option<PathBuf>,
    /// Install the SIGHUP handler (off in tests: one process hosts many gateways).
    pub handle_sighup: bool,
}

pub fn open(options: &Options) -> Result<Handles, Vec<String>> {
    let metrics = Arc::new(Metrics::new().map_err(|e| vec![format!("metrics: {e}")])?);
    let store = ConfigStore::open(options.config_path.clone(), metrics.clone())
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let settings = store.load().settings.clone();
    let db = settings.data_dir.join(STATE_FILE);
    let (state, resources): (Arc<dyn StateStore>, _) = match &settings.state_backend {
        StateBackend::Sqlite => {
            let s = SqliteState::open(&db).map_err(|e| vec![e.to_string()])?;
            let resources = s.load_now().map_err(|e| vec![e.to_string()])?;
            (Arc::new(s), resources)
        }
        StateBackend::Postgres { url } => {
            let s = PostgresState::open(&url.0).map_err(|e| vec![e.to_string()])?;
            let resources = s.load_now().map_err(|e| vec![e.to_string()])?;
            (Arc::new(s), resources)
        }
    };
    tracing::info!(backend = state.backend(), resources = resources.len(), "management state loaded");
    let env_key = std::env::var("MODELUX_MASTER_KEY").ok();
    let configured = settings.master_key.as_ref().map(|k| k.0.as_str());
    let (master, source) =
        MasterKey::load(env_key.as_deref(), configured, &settings.data_dir).map_err(|e| vec![e])?;
    match source {
        KeySource::Generated => tracing::warn!(
            path = %settings.data_dir.join("master.key").display(),
            "generated a master key for provider keys at rest; back it up (stored provider keys cannot be read without it) or set MODELUX_MASTER_KEY"
        ),
        other => tracing::info!(source = ?other, "master key for provider keys at rest loaded"),
    }
    let master = Arc::new(master);
    let recorded = state.file_versions_now().map_err(|e| vec![e.to_string()])?;
    store
        .load_resources(resources, master.clone(), &recorded)
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    state.save_file_versions_now(&store.file_versions()).map_err(|e| vec![e.to_string()])?;
    let node = match &settings.counters {
        CounterSettings::Redis { node_id: Some(id), .. } => id.clone(),
        _ => default_node_id(&settings.proxy_listen),
    };
    let spend = match &settings.counters {
        CounterSettings::Local => Spend::open(Some(&db)).map_err(|e| vec![format!("embedded store: {e}")])?,
        CounterSettings::Redis { url, timeout, on_error, .. } => {
            if matches!(settings.state_backend, StateBackend::Sqlite) {
                tracing::warn!(
                    "spend.counters: redis with state.backend sqlite: each node writes its settled spend to its own \
                     file, so a Redis that loses its data can only be re-seeded with this node's figures; use \
                     state.backend: postgres for several nodes"
                );
            }
            tracing::info!(node = %node, policy = on_error.as_str(), "budget and rate counters shared through Redis");
            Spend::open_shared(
                SharedSettings {
                    url: url.0.clone(),
                    timeout: *timeout,
                    on_error: *on_error,
                    node: node.clone(),
                },
                Arc::new(crate::state::SpendRowsIn(state.clone())),
                metrics.shared_counters.clone(),
            )
            .map_err(|e| vec![format!("spend.counters: {e}")])?
        }
    };
    let (traces, trace_writer) = open_traces(&store.load().settings, &metrics)?;
    Ok(Handles {
        store: Arc::new(store),
        metrics,
        spend: Arc::new(spend),
        traces,
        trace_writer,
        state,
        master,
        node: node.into(),
    })
}

/// The trace store `traces:` names: ClickHouse, or the embedded file in the data dir.
pub fn open_trace_store(settings: &Settings) -> Result<Arc<dyn TraceStore>, String> {
    let t = &settings.traces;
    Ok(match &t.clickhouse {
        Some(c) => Arc::new(ClickHouseStore::new(ClickHouseSettings {
            url: c.url.clone(),
            database: c.database.clone(),
            user: c.user.clone(),
            password: c.password.clone(),
            table: c.table.clone(),
        })),
        None => Arc::new(
            EmbeddedStore::open(
                &settings.data_dir.join(EMBEDDED_TRACES_FILE),
                crate::trace::embedded::Bounds { max_records: t.max_records, max_bytes: t.max_bytes },
            )
            .map_err(|e| format!("trace store: {e}"))?,
        ),
    })
}

/// A node's default name in the shared counters: the host name and the proxy port, stable
/// across restarts and distinct between nodes (two on one host listen on different ports).
fn default_node_id(proxy_listen: &str) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // (or truncates, which only shortens the name).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".to_string()
    };
    let port = proxy_listen.rsplit(':').next().unwrap_or("0");
    format!("{host}:{port}")
}

/// The embedded state and spend file in the data dir.
pub const STATE_FILE: &str = "modelux.db";

/// The embedded trace store's file in the data dir.
pub const EMBEDDED_TRACES_FILE: &str = "traces.db";

/// The trace store named by `traces:` (ClickHouse, or the embedded file), its queue and
/// its writer. Reaching ClickHouse is not required to start: until it answers, records
/// wait in the disk queue.
pub fn open_traces(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<TraceQueue>, Arc<TraceWriter>), Vec<String>> {
    let t = &settings.traces;
    let store = open_trace_store(settings).map_err(|e| vec![e])?;
    let queue = Arc::new(TraceQueue::new(t.queue_capacity, metrics.clone()));
    let writer = TraceWriter::new(
        queue.clone(),
        store,
        metrics.clone(),
        WriterSettings {
            batch_size: t.batch_size,
            flush_interval: t.flush_interval,
            retention: Duration::from_secs(u64::from(t.retention_days) * 86_400),
            replay_retention: Duration::from_secs(u64::from(t.replay_hours) * 3_600),
            spill_dir: settings.data_dir.join("trace-spill"),
            max_spill_bytes: t.max_spill_bytes,
            dead_letter: settings.data_dir.join("trace-dead-letter.jsonl"),
        },
    )
    .map_err(|e| vec![format!("trace disk queue in {}: {e}", settings.data_dir.display())])?;
    Ok((queue, Arc::new(writer)))
}

/// Read buffer of a client connection (pingora's default: 64 KiB).
const PROXY_READ_BUFFER: usize = 16 * 1024;

pub fn build(handles: &Handles, options: &Options) -> Server {
    let snapshot = handles.store.load();
    let settings = &snapshot.settings;
    let conf = ServerConf {
        threads: settings.threads,
        work_stealing: settings.work_stealing,
        // On SIGTERM the listeners stop accepting at once; requests and streams in flight
        // get up to this long to finish. pingora sleeps the whole period, so `serve`
        // watches the requests in flight and exits as soon as the last one is done.
        grace_period_seconds: Some(settings.shutdown_grace_seconds),
        // After the grace period only blocking work (a SQLite flush) is waited for.
        graceful_shutdown_timeout_seconds: Some(GRACEFUL_RUNTIME_TIMEOUT_SECONDS),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let grants = Arc::new(crate::replay::live::Grants::default());
    let vectors = Arc::new(crate::cache::semantic::Vectors::new(settings.cache_max_vectors));
    let cache = Arc::new(match &settings.cache_redis {
        // The URL was checked with the config; a client that cannot be made now is
        // reported and the cache runs in process.
        Some((url, timeout)) => match crate::cache::redis::RedisCache::new(&url.0, *timeout) {
            Ok(r) => {
                r.follow(vectors.clone());
                crate::cache::Store::Redis(r)
            }
            Err(e) => {
                tracing::error!(error = %e, "response cache: Redis unusable, caching in process");
                crate::cache::Store::Embedded(crate::cache::EmbeddedCache::new(
                    settings.cache_max_bytes,
                    handles.metrics.cache_evictions.clone(),
                ))
            }
        },
        None => crate::cache::Store::Embedded(crate::cache::EmbeddedCache::new(
            settings.cache_max_bytes,
            handles.metrics.cache_evictions.clone(),
        )),
    });
    let state = Arc::new(GatewayState {
        store: handles.store.clone(),
        metrics: handles.metrics.clone(),
        connector: Connector::new(None),
        spend: handles.spend.clone(),
        traces: handles.traces.clone(),
        grants: grants.clone(),
        answer_budget: Default::default(),
        cache: cache.clone(),
        vectors: vectors.clone(),
        owners: Arc::new(crate::trace::owners::Owners::new(
            handles.trace_writer.store().clone(),
            std::time::Duration::from_secs(u64::from(settings.traces.retention_days) * 86_400),
        )),
    });
    let limits = settings.connections;
    let mut proxy = Service::new(
        "modelux proxy".to_string(),
        crate::conn::Guarded::new(
            pingora::proxy::http_proxy(&server.configuration, Gateway { state }),
            crate::conn::Policy::new(&limits, limits.max_proxy, crate::proxy::overloaded_body),
            "proxy",
            &handles.metrics,
        ),
    );
    // pingora reads each client connection through a 64 KiB buffer by default, held for
    // the connection's life: with a thousand streams open that alone is 64 MiB. Request
    // heads are small and bodies are read in their own buffer, so 16 KiB costs no syscalls
    // in practice.
    proxy.add_listener(
        ListenerConfig::tcp(settings.proxy_listen.clone())
            .l4_buffer(L4BufferSettings::new(PROXY_READ_BUFFER, DEFAULT_L4_WRITE_BUFFER_SIZE)),
    );

    let experiments = crate::replay::Experiments::start(
        handles.state.clone(),
        handles.trace_writer.store().clone(),
        handles.store.clone(),
        handles.spend.counters.clone(),
        crate::replay::live::reachable(&settings.proxy_listen)
            .map(|proxy| crate::replay::runner::LiveTarget { proxy, grants }),
    );
    let wake = Arc::new(tokio::sync::Notify::new());
    let changing = Arc::new(crate::manage::api::InFlight::default());
    let manage_app = |mcp: Option<Arc<crate::manage::mcp::McpHttp>>| ManageApp {
        store: handles.store.clone(),
        metrics: handles.metrics.clone(),
        spend: handles.spend.clone(),
        traces: handles.traces.clone(),
        trace_store: handles.trace_writer.store().clone(),
        state: handles.state.clone(),
        master: handles.master.clone(),
        connector: Connector::new(None),
        changing: changing.clone(),
        experiments: experiments.clone(),
        node: handles.node.clone(),
        webhooks: wake.clone(),
        mcp,
        cache: cache.clone(),
    };
    // The MCP tools call the management handlers on an instance of their own (sharing
    // everything, the in-flight changes included).
    let mcp = Arc::new(crate::manage::mcp::McpHttp::new(Arc::new(manage_app(None))));
    let mut manage = Service::new(
        "modelux manage".to_string(),
        crate::conn::Guarded::new(
            manage_app(Some(mcp)),
            crate::conn::Policy::new(&limits, limits.max_manage, crate::manage::overloaded_body),
            "manage",
            &handles.metrics,
        ),
    );
    // Creates experiments only (no resource changes), so its own in-flight set is enough.
    let scheduler = background_service(
        "experiment scheduler",
        crate::manage::scheduled::Scheduler { app: manage_app(None) },
    );
    manage.add_tcp(&settings.manage_listen);
    manage.threads = Some(1);

    let watcher = background_service(
        "config watcher",
        ConfigWatcher {
            store: handles.store.clone(),
            poll_file: settings.watch_config,
            handle_sighup: options.handle_sighup,
            state: Some(handles.state.clone()),
        },
    );
    let flusher = background_service(
        "spend flusher",
        SpendFlusher { spend: handles.spend.clone(), metrics: handles.metrics.clone() },
    );
    server.add_service(proxy);
    server.add_service(manage);
    server.add_service(watcher);
    server.add_service(scheduler);
    server.add_service(flusher);
    server.add_service(background_service(
        "webhook sender",
        crate::manage::webhook_sender::WebhookSender::new(
            handles.store.clone(),
            handles.state.clone(),
            handles.spend.counters.clone(),
            handles.master.clone(),
            handles.metrics.clone(),
            handles.node.clone(),
            wake.clone(),
        ),
    ));
    if let StateBackend::Postgres { url } = &settings.state_backend {
        server.add_service(background_service(
            "state follower",
            StateFollower {
                store: handles.store.clone(),
                state: handles.state.clone(),
                url: url.0.clone(),
                seen: std::sync::atomic::AtomicI64::new(0),
            },
        ));
    }
    server.add_service(background_service("trace writer", ArcService(handles.trace_writer.clone())));
    server
}

/// How long the runtimes get for blocking work once the grace period is over.
const GRACEFUL_RUNTIME_TIMEOUT_SECONDS: u64 = 5;

/// How long the process waits at exit for Redis to take the settlements still waiting.
const SETTLE_AT_EXIT: Duration = Duration::from_secs(2);

/// What the process does last, after the server stopped (or once the requests in flight
/// drained during a graceful shutdown): records of requests that finished (or were
/// cancelled) as the server stopped are written, or left in the disk queue for the next
/// start, budget holds still to be released in Redis are released (shared counters), and
/// spend settled after the flusher's last round is written. `false`: the spend could not
/// be written.
pub fn finish(handles: &Handles) -> bool {
    handles.trace_writer.finish_blocking();
    if !handles.spend.settle_before_exit(SETTLE_AT_EXIT) {
        tracing::warn!("some budget holds were not released in Redis before exit; they lapse within an hour");
    }
    match handles.spend.flush() {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "final write of budget spend failed");
            false
        }
    }
}

/// How often the drain watch looks at the requests in flight.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// pingora's graceful shutdown stops the listeners, then sleeps the whole grace period
/// before it ends the runtimes. This thread ends the process as soon as the requests in
/// flight have finished instead (two polls in a row at zero, so a request whose header
/// was being read as the listener closed is counted too). When the grace period runs
/// out first, pingora's own path ends the process.
pub fn spawn_drain_watch(server: &Server, handles: &Handles) {
    let mut phases = server.watch_execution_phase();
    let handles = handles.clone();
    let spawned = std::thread::Builder::new().name("drain watch".into()).spawn(move || {
        use pingora::server::ExecutionPhase;
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                Ok(ExecutionPhase::ShutdownRuntimes | ExecutionPhase::Terminated)
                | Err(RecvError::Closed) => return,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
            }
        }
        let in_flight = &handles.metrics.in_flight;
        tracing::info!(in_flight = in_flight.get(), "draining requests in flight");
        let mut idle_polls = 0;
        while idle_polls < 2 {
            std::thread::sleep(DRAIN_POLL);
            idle_polls = if in_flight.get() <= 0 { idle_polls + 1 } else { 0 };
        }
        tracing::info!("requests in flight drained; exiting");
        let code = if finish(&handles) { 0 } else { 1 };
        std::process::exit(code);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the drain watch; shutdown waits the whole grace period");
    }
}

/// How often settled spend is written to the embedded store: a crash loses at most this
/// much of it (SIGTERM loses none: see `flush_now`).
const SPEND_FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Writes settled spend to the embedded store on an interval, and once more at shutdown.
struct SpendFlusher {
    spend: Arc<Spend>,
    metrics: Arc<Metrics>,
}

/// One flush, off the async threads (SQLite blocks).
pub async fn flush_now(spend: &Arc<Spend>, metrics: &Metrics) {
    let s = spend.clone();
    let result = tokio::task::spawn_blocking(move || s.flush()).await;
    match result {
        Ok(Ok(0)) => {}
        Ok(Ok(_)) => metrics.spend_flushes.with_label_values(&["ok"]).inc(),
        Ok(Err(e)) => {
            metrics.spend_flushes.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, "writing budget spend to the embedded store failed; will retry");
        }
        Err(e) => tracing::error!(error = %e, "spend flush task failed"),
    }
}

#[async_trait::async_trait]
impl BackgroundService for SpendFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(SPEND_FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            flush_now(&self.spend, &self.metrics).await;
            rounds += 1;
            // Once a minute: forget finished periods.
            if rounds.is_multiple_of(120) {
                let s = self.spend.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.prune()).await {
                    tracing::warn!(error = %e, "pruning old budget spend failed");
                }
            }
        }
        flush_now(&self.spend, &self.metrics).await;
    }
}

/// Runs a background service that is shared with the caller (who calls it again after
/// the server stopped).
struct ArcService<T>(Arc<T>);

#[async_trait::async_trait]
impl<T: BackgroundService + Send + Sync> BackgroundService for ArcService<T> {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.start(shutdown).await
    }
}

/// Lets an embedding program (the tests) stop a server it started on a thread.
pub struct ChannelShutdown(pub tokio::sync::Mutex<tokio::sync::oneshot::Receiver<()>>);

#[async_trait::async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.lock().await;
        let _ = (&mut *rx).await;
        ShutdownSignal::FastShutdown
    }
}

pub fn run_until(server: Server, stop: tokio::sync::oneshot::Receiver<()>) {
    server.run(RunArgs { shutdown_signal: Box::new(ChannelShutdown(tokio::sync::Mutex::new(stop))) });
}
