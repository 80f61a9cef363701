//! Configuration: YAML text → raw serde types (`raw`) → validated runtime `Snapshot`.
//! Every error names the path of the offending value. The live snapshot sits in one
//! `ArcSwap` (see `store`), so a request sees either the old or the new config, never a mix.

pub mod cache;
pub mod env;
pub mod overlay;
pub mod raw;
pub mod routing;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::auth::{self, KeyIndex, Principal, MANAGEMENT_KEY_PREFIX, PROJECT_KEY_PREFIX};
use crate::prices::PriceTable;
use crate::providers::{self, Provider};
use crate::routing::health::{HealthRegistry, HealthSettings};
use crate::spend::budgets::Budgets;
use raw::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Server-level settings with defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub proxy_listen: String,
    pub manage_listen: String,
    pub threads: usize,
    pub work_stealing: bool,
    pub max_body_bytes: u64,
    /// Largest upload passed through (`/files`), streamed (`server.max_upload_bytes`).
    pub max_upload_bytes: u64,
    /// `server.public_base_url`, without a trailing slash.
    pub public_base_url: Option<String>,
    pub client_body_timeout: Duration,
    /// The client connections' limits (`server.client_header_timeout_ms`,
    /// `keepalive_timeout_seconds`, `max_connections`, `manage_max_connections`); read when
    /// the listeners start.
    pub connections: ConnectionLimits,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub watch_config: bool,
    pub shutdown_grace_seconds: u64,
    /// The embedded store's directory, resolved against the config file's directory.
    pub data_dir: PathBuf,
    pub traces: TraceSettings,
    /// Finished experiments older than this many days are deleted (`experiments.retention_days`).
    pub experiment_retention_days: u32,
    /// `experiments.embedding_model`: what `with_responses` embeds answers with.
    pub experiment_embedding_model: Option<String>,
    /// `cache.max_bytes`: the embedded response cache's size (read at start).
    pub cache_max_bytes: u64,
    /// `cache.redis`: the URL and call timeout of a shared cache (read at start).
    pub cache_redis: Option<(Redacted, Duration)>,
    /// `cache.embedding_model`: semantic caching's model where a `cache:` names none.
    pub cache_embedding_model: Option<String>,
    /// `cache.embedding_timeout_ms`.
    pub cache_embedding_timeout: Duration,
    /// `cache.max_vectors`: the semantic index's size (read at start).
    pub cache_max_vectors: usize,
    /// `state.master_key`, if set.
    pub master_key: Option<Redacted>,
    pub state_backend: StateBackend,
    /// `spend.counters` (read at start).
    pub counters: CounterSettings,
    pub webhooks: WebhookSettings,
}

/// `webhooks:` (PRODUCT.md §11.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub retry_window: Duration,
    pub poll_interval: Duration,
    pub secret_overlap: Duration,
    pub org_id: String,
    pub retention: Duration,
}

impl Default for WebhookSettings {
    fn default() -> WebhookSettings {
        WebhookSettings {
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(30),
            backoff_cap: Duration::from_secs(3600),
            retry_window: Duration::from_secs(86_400),
            poll_interval: Duration::from_secs(1),
            secret_overlap: Duration::from_secs(86_400),
            org_id: "default".into(),
            retention: Duration::from_secs(30 * 86_400),
        }
    }
}

fn webhook_settings(raw: &raw::RawWebhooks, errors: &mut Vec<ConfigError>) -> WebhookSettings {
    let d = WebhookSettings::default();
    const DAY_MS: u64 = 86_400_000;
    let ms = |v: Option<u64>, default: Duration, name: &str, max: u64, errors: &mut Vec<ConfigError>| match v
    {
        Some(n) if n == 0 || n > max => {
            errors
                .push(ConfigError::new(format!("webhooks.{name}"), format!("must be from 1 to {max} (ms)")));
            default
        }
        Some(n) => Duration::from_millis(n),
        None => default,
    };
    let org_id = raw.org_id.clone().unwrap_or(d.org_id.clone());
    if org_id.trim().is_empty() {
        errors.push(ConfigError::new("webhooks.org_id", "must not be empty"));
    }
    WebhookSettings {
        timeout: ms(raw.timeout_ms, d.timeout, "timeout_ms", 120_000, errors),
        backoff_base: ms(raw.backoff_base_ms, d.backoff_base, "backoff_base_ms", DAY_MS, errors),
        backoff_cap: ms(raw.backoff_cap_ms, d.backoff_cap, "backoff_cap_ms", DAY_MS, errors),
        retry_window: ms(raw.retry_window_ms, d.retry_window, "retry_window_ms", 30 * DAY_MS, errors),
        poll_interval: ms(raw.poll_interval_ms, d.poll_interval, "poll_interval_ms", 60_000, errors),
        secret_overlap: ms(raw.secret_overlap_ms, d.secret_overlap, "secret_overlap_ms", 30 * DAY_MS, errors),
        org_id,
        retention: match raw.retention_days {
            Some(0) => {
                errors.push(ConfigError::new("webhooks.retention_days", "must be greater than 0"));
                d.retention
            }
            Some(days) => Duration::from_secs(u64::from(days) * 86_400),
            None => d.retention,
        },
    }
}

/// Where budget and rate counters live (`spend.counters`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CounterSettings {
    /// In this process, persisted to the embedded store.
    #[default]
    Local,
    /// In Redis, shared by every node pointed at it.
    Redis {
        url: Redacted,
        timeout: Duration,
        on_error: crate::spend::shared::OnError,
        /// `spend.node_id`: this node's name in the shared counters (default: host name
        /// and proxy port).
        node_id: Option<String>,
    },
}

/// `spend:` and the top-level `redis:` it may take its URL from.
fn counter_settings(raw: &RawConfig, errors: &mut Vec<ConfigError>) -> CounterSettings {
    use crate::spend::shared::OnError;
    let s = &raw.spend;
    let on_error = match s.on_counter_error.as_deref() {
        None | Some("fail_closed") => OnError::FailClosed,
        Some("fail_open") => OnError::FailOpen,
        Some(other) => {
            errors.push(ConfigError::new(
                "spend.on_counter_error",
                format!("unknown policy \"{other}\" (supported: fail_closed, fail_open)"),
            ));
            OnError::FailClosed
        }
    };
    match s.counters.as_deref() {
        None | Some("local") => {
            if s.redis.is_some() {
                errors.push(ConfigError::new("spend.redis", "is only for counters: redis"));
            }
            CounterSettings::Local
        }
        Some("redis") => {
            let (redis, at) = match (&s.redis, &raw.redis) {
                (Some(r), _) => (r, "spend.redis"),
                (None, Some(r)) => (r, "redis"),
                (None, None) => {
                    errors.push(ConfigError::new(
                        "spend.redis.url",
                        "counters: redis needs redis: {url: redis://host:port} (or spend.redis.url)",
                    ));
                    return CounterSettings::Local;
                }
            };
            let url = redis.url.trim();
            if !url.starts_with("redis://") || ::redis::Client::open(url).is_err() {
                errors.push(ConfigError::new(
                    format!("{at}.url"),
                    "must be a redis://[:password@]host:port[/db] URL",
                ));
                return CounterSettings::Local;
            }
            if let Some(0) = redis.timeout_ms {
                errors.push(ConfigError::new(format!("{at}.timeout_ms"), "must be greater than 0"));
            }
            let node_id = match s.node_id.as_deref().map(str::trim) {
                Some("") => {
                    errors.push(ConfigError::new("spend.node_id", "must not be empty"));
                    None
                }
                Some(id) if id.len() > 128 || id.chars().any(|c| c.is_control()) => {
                    errors.push(ConfigError::new(
                        "spend.node_id",
                        "must be at most 128 characters, without control characters",
                    ));
                    None
                }
                other => other.map(str::to_string),
            };
            CounterSettings::Redis {
                url: Redacted(url.to_string()),
                timeout: Duration::from_millis(redis.timeout_ms.unwrap_or(250).max(1)),
                on_error,
                node_id,
            }
        }
        Some(other) => {
            errors.push(ConfigError::new(
                "spend.counters",
                format!("unknown counters backend \"{other}\" (supported: local, redis)"),
            ));
            CounterSettings::Local
        }
    }
}

/// Where management state lives (`state.backend`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StateBackend {
    /// `<data_dir>/modelux.db`.
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by several gateway nodes.
    Postgres { url: Redacted },
}

/// A secret from the config: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redacted(…)")
    }
}

impl Settings {
    /// The upstream connection's timeouts, as the provider's peer takes them.
    pub fn upstream_timeouts(&self) -> providers::Timeouts {
        providers::Timeouts {
            connect: self.upstream_connect_timeout,
            read_write: self.upstream_timeout,
            idle: self.upstream_idle_timeout,
        }
    }
}

/// `traces:`, validated. The store and the writer are built once at start; a reload
/// changes only `bodies` and `max_body_bytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    pub clickhouse: Option<ClickHouseConfig>,
    pub retention_days: u32,
    pub max_records: u64,
    /// Embedded store only: bytes its records' pages may take; 0: no cap.
    pub max_bytes: u64,
    /// Bytes of spilled batches kept on disk.
    pub max_spill_bytes: u64,
    pub queue_capacity: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// 0: bodies are not kept.
    pub max_body_bytes: usize,
    /// Hours a chat request's body is kept (compressed) for replay; 0: not kept.
    pub replay_hours: u32,
    /// Replay bodies are cut to this many bytes (uncompressed) and marked as cut.
    pub replay_max_body_bytes: usize,
    /// Answers kept beside replay bodies, at most this many a second (0: none).
    pub replay_answers_per_second: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub table: String,
}

pub use crate::routing::{RoutingConfig, RoutingConfigs};

/// Everything the hot path reads, immutable once built.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every successful (re)load.
    pub generation: u64,
    pub settings: Settings,
    pub providers: HashMap<String, Arc<Provider>>,
    pub project_keys: KeyIndex,
    pub management_keys: KeyIndex,
    pub routing_configs: RoutingConfigs,
    pub projects: Vec<String>,
    /// Projects' default `cache:` settings (for requests no config with its own decides).
    pub project_cache: HashMap<String, crate::cache::CacheSettings>,
    /// Some config or project turns the response cache on (else requests skip it outright).
    pub any_cache: bool,
    /// Live provider health; the same registry is handed from snapshot to snapshot.
    pub health: Arc<HealthRegistry>,
    pub health_settings: HealthSettings,
    /// The shipped price table with the config's `prices:` overrides.
    pub prices: Arc<PriceTable>,
    pub budgets: Budgets,
    /// Files besides the config whose content is part of it (rule files).
    pub watched_files: Vec<PathBuf>,
    /// What the config file defines (read-only through the management API).
    pub file_owned: FileOwned,
}

/// Names of the resources the config file defines, as opposed to the state store.
#[derive(Debug, Default, Clone)]
pub struct FileOwned {
    pub projects: Vec<String>,
    /// `(project, key name)`.
    pub keys: Vec<(String, String)>,
    pub management_keys: Vec<String>,
    pub routing_configs: Vec<String>,
    pub providers: Vec<String>,
    pub budgets: Vec<String>,
}

pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Parses and validates config text. `previous` carries routing-config versions and live
/// health forward. Relative file references (rule files) resolve against the working directory.
pub fn build_snapshot(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, Vec<ConfigError>> {
    build_snapshot_in(text, lookup, previous, Path::new("."))
}

/// As `build_snapshot`, resolving relative file references against `base_dir` (the
/// config file's directory).
pub fn build_snapshot_in(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Snapshot>,
    base_dir: &Path,
) -> Result<Snapshot, Vec<ConfigError>> {
    build_snapshot_with(text, lookup, previous, base_dir, &[], None)
}

/// As `build_snapshot_in`, with the state store's live `resources` laid over the file's.
pub fn build_snapshot_with(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Snapshot>,
    base_dir: &Path,
    resources: &[crate::state::Stored],
    master: Option<&crate::state::secrets::MasterKey>,
) -> Result<Snapshot, Vec<ConfigError>> {
    build_from(text, lookup, previous, base_dir, resources, master, None)
}

/// `build_snapshot_with`, with routing config `slug` defined as `body` wherever it was
/// defined before (file or store), or added: the snapshot a replay candidate runs on.
/// Errors about the candidate name `routing_configs.<slug>`.
#[allow(clippy::too_many_arguments)]
pub fn build_snapshot_replacing(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Snapshot>,
    base_dir: &Path,
    resources: &[crate::state::Stored],
    master: Option<&crate::state::secrets::MasterKey>,
    slug: &str,
    body: &serde_json::Value,
) -> Result<Snapshot, Vec<ConfigError>> {
    build_from(text, lookup, previous, base_dir, resources, master, Some((slug, body)))
}

/// The file, the store's `resources` over it and, with `replace`, one routing config
/// defined anew (the stored one of that slug left out, the file's overwritten).
fn build_from(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Snapshot>,
    base_dir: &Path,
    resources: &[crate::state::Stored],
    master: Option<&crate::state::secrets::MasterKey>,
    replace: Option<(&str, &serde_json::Value)>,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut raw = parse(text, lookup)?;
    let file_owned = FileOwned {
        projects: raw.projects.iter().map(|p| p.id.clone()).collect(),
        keys: raw
            .projects
            .iter()
            .flat_map(|p| p.keys.iter().map(|k| (p.id.clone(), k.name.clone())))
            .collect(),
        management_keys: raw.management_keys.iter().map(|k| k.name.clone()).collect(),
        routing_configs: raw.routing_configs.keys().cloned().collect(),
        providers: raw.providers.iter().map(|p| p.id.clone()).collect(),
        budgets: raw.budgets.iter().map(|b| b.name.clone()).collect(),
    };
    let errors = match replace {
        None => overlay::apply(&mut raw, resources, master),
        Some((slug, _)) => {
            let others: Vec<crate::state::Stored> = resources
                .iter()
                .filter(|r| !(r.kind == crate::state::Kind::RoutingConfig && r.slug == slug))
                .cloned()
                .collect();
            overlay::apply(&mut raw, &others, master)
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    if let Some((slug, body)) = replace {
        let value = serde_yaml_ng::to_value(body)
            .map_err(|e| vec![ConfigError::new(format!("routing_configs.{slug}"), e.to_string())])?;
        raw.routing_configs.insert(slug.to_string(), value);
        raw.pinned_versions.remove(slug);
    }
    let mut snapshot = validate(raw, previous, base_dir)?;
    snapshot.file_owned = file_owned;
    Ok(snapshot)
}

pub(crate) fn section<T: DeserializeOwned>(
    value: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let full = match (path.is_empty(), inner.as_str()) {
                (_, ".") => path.to_string(),
                (true, _) => inner,
                (false, _) if inner.starts_with('[') => format!("{path}{inner}"),
                (false, _) => format!("{path}.{inner}"),
            };
            errors.push(ConfigError::new(full, e.into_inner().to_string()));
            None
        }
    }
}

fn sequence(value: Value, path: &str, errors: &mut Vec<ConfigError>) -> Vec<Value> {
    match value {
        Value::Sequence(items) => items,
        Value::Null => Vec::new(),
        _ => {
            errors.push(ConfigError::new(path, "expected a list"));
            Vec::new()
        }
    }
}

/// YAML → raw sections. Each list entry is deserialized separately so that all broken
/// entries are reported in one run, not just the first.
pub fn parse(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<RawConfig, Vec<ConfigError>> {
    let mut root: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| vec![ConfigError::new("", format!("invalid YAML: {e}"))])?;
    let mut errors = Vec::new();
    env::substitute(&mut root, "", lookup, &mut errors);
    let map = match root {
        Value::Mapping(m) => m,
        Value::Null => Default::default(),
        _ => return Err(vec![ConfigError::new("", "the config must be a mapping")]),
    };
    let mut raw = RawConfig::default();
    for (key, value) in map {
        let Value::String(key) = key else {
            errors.push(ConfigError::new("", format!("non-string key {key:?}")));
            continue;
        };
        match key.as_str() {
            "server" => {
                if !value.is_null() {
                    if let Some(s) = section(value, "server", &mut errors) {
                        raw.server = s;
                    }
                }
            }
            "providers" => {
                for (i, item) in sequence(value, "providers", &mut errors).into_iter().enumerate() {
                    if let Some(p) = section(item, &format!("providers[{i}]"), &mut errors) {
                        raw.providers.push(p);
                    }
                }
            }
            "projects" => {
                for (i, item) in sequence(value, "projects", &mut errors).into_iter().enumerate() {
                    if let Some(p) = section(item, &format!("projects[{i}]"), &mut errors) {
                        raw.projects.push(p);
                    }
                }
            }
            "management_keys" => {
                for (i, item) in sequence(value, "management_keys", &mut errors).into_iter().enumerate() {
                    if let Some(k) = section(item, &format!("management_keys[{i}]"), &mut errors) {
                        raw.management_keys.push(k);
                    }
                }
            }
            "routing_configs" => match value {
                Value::Mapping(m) => {
                    for (slug, def) in m {
                        let Value::String(slug) = slug else {
                            errors.push(ConfigError::new("routing_configs", "slugs must be strings"));
                            continue;
                        };
                        raw.routing_configs.insert(slug, def);
                    }
                }
                Value::Null => {}
                _ => errors.push(ConfigError::new("routing_configs", "expected a mapping of slug to config")),
            },
            "health" => {
                if !value.is_null() {
                    if let Some(h) = section(value, "health", &mut errors) {
                        raw.health = h;
                    }
                }
            }
            "rate_limits" => {
                if !value.is_null() {
                    if let Some(r) = section(value, "rate_limits", &mut errors) {
                        raw.rate_limits = r;
                    }
                }
            }
            "traces" => {
                if !value.is_null() {
                    if let Some(t) = section(value, "traces", &mut errors) {
                        raw.traces = t;
                    }
                }
            }
            "webhooks" => {
                if !value.is_null() {
                    if let Some(w) = section(value, "webhooks", &mut errors) {
                        raw.webhooks = w;
                    }
                }
            }
            "experiments" => {
                if !value.is_null() {
                    if let Some(e) = section(value, "experiments", &mut errors) {
                        raw.experiments = e;
                    }
                }
            }
            "state" => {
                if !value.is_null() {
                    if let Some(t) = section(value, "state", &mut errors) {
                        raw.state = t;
                    }
                }
            }
            "cache" => {
                if !value.is_null() {
                    if let Some(c) = section(value, "cache", &mut errors) {
                        raw.cache = c;
                    }
                }
            }
            "spend" => {
                if !value.is_null() {
                    if let Some(c) = section(value, "spend", &mut errors) {
                        raw.spend = c;
                    }
                }
            }
            "redis" => {
                if !value.is_null() {
                    if let Some(c) = section(value, "redis", &mut errors) {
                        raw.redis = Some(c);
                    }
                }
            }
            "budgets" => {
                for (i, item) in sequence(value, "budgets", &mut errors).into_iter().enumerate() {
                    if let Some(b) = section(item, &format!("budgets[{i}]"), &mut errors) {
                        raw.budgets.push(b);
                    }
                }
            }
            "prices" => match value {
                Value::Mapping(m) => {
                    for (model, def) in m {
                        let Value::String(model) = model else {
                            errors.push(ConfigError::new("prices", "model names must be strings"));
                            continue;
                        };
                        if let Some(p) = section(def, &format!("prices.{model}"), &mut errors) {
                            raw.prices.insert(model, p);
                        }
                    }
                }
                Value::Null => {}
                _ => errors.push(ConfigError::new("prices", "expected a mapping of model name to prices")),
            },
            other => errors.push(ConfigError::new(
                other,
                format!("unknown key; expected one of {}", TOP_LEVEL_KEYS.join(", ")),
            )),
        }
    }
    if errors.is_empty() {
        Ok(raw)
    } else {
        Err(errors)
    }
}

/// `traces.max_bytes` by default: 2 GiB, about 1.7 million records without bodies.
pub const DEFAULT_TRACE_BYTES: u64 = 2 << 30;
/// Below this a cap would prune on nearly every batch.
const MIN_TRACE_BYTES: u64 = 16 << 20;

/// Limits on client connections, per listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    /// 0: no keep-alive.
    pub keepalive_seconds: u64,
    pub max_proxy: usize,
    pub max_manage: usize,
}

fn connection_cap(v: Option<usize>, default: usize, path: &str, errors: &mut Vec<ConfigError>) -> usize {
    match v.unwrap_or(default) {
        0 => {
            errors.push(ConfigError::new(path, "must be at least 1"));
            1
        }
        n => n,
    }
}

pub(crate) const ID_RULE: &str = "must be 1-64 characters of a-z, A-Z, 0-9, _, -, .";

pub(crate) fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

fn settings(raw: &RawServer, traces: &RawTraces, base_dir: &Path, errors: &mut Vec<ConfigError>) -> Settings {
    let ms = |v: Option<u64>, default: u64, path: &str, errors: &mut Vec<ConfigError>| {
        let v = v.unwrap_or(default);
        if v == 0 {
            errors.push(ConfigError::new(path, "must be greater than 0"));
        }
        Duration::from_millis(v)
    };
    let threads =
        raw.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    if threads == 0 {
        errors.push(ConfigError::new("server.threads", "must be at least 1"));
    }
    let proxy_listen = raw.proxy_listen.clone().unwrap_or_else(|| DEFAULT_PROXY_LISTEN.into());
    let manage_listen = raw.manage_listen.clone().unwrap_or_else(|| DEFAULT_MANAGE_LISTEN.into());
    for (path, addr) in [("server.proxy_listen", &proxy_listen), ("server.manage_listen", &manage_listen)] {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            errors.push(ConfigError::new(path, format!("\"{addr}\" is not an IP:port address")));
        }
    }
    if proxy_listen == manage_listen {
        errors.push(ConfigError::new("server.manage_listen", "must differ from server.proxy_listen"));
    }
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        errors.push(ConfigError::new("server.max_body_bytes", "must be greater than 0"));
    }
    Settings {
        proxy_listen,
        manage_listen,
        threads: threads.max(1),
        work_stealing: raw.work_stealing.unwrap_or(false),
        max_body_bytes,
        public_base_url: match raw.public_base_url.as_deref().map(|u| u.trim_end_matches('/')) {
            None => None,
            Some(u) => match url::Url::parse(u) {
                Ok(parsed)
                    if matches!(parsed.scheme(), "http" | "https")
                        && parsed.query().is_none()
                        && parsed.fragment().is_none()
                        && parsed.host().is_some() =>
                {
                    Some(u.to_string())
                }
                _ => {
                    errors.push(ConfigError::new(
                        "server.public_base_url",
                        format!("\"{u}\" is not an http(s) URL without query or fragment"),
                    ));
                    None
                }
            },
        },
        max_upload_bytes: match raw.max_upload_bytes {
            Some(0) => {
                errors.push(ConfigError::new("server.max_upload_bytes", "must be greater than 0"));
                0
            }
            Some(n) => n,
            None => DEFAULT_MAX_UPLOAD_BYTES,
        },
        client_body_timeout: ms(raw.client_body_timeout_ms, 30_000, "server.client_body_timeout_ms", errors),
        connections: ConnectionLimits {
            header_timeout: ms(
                raw.client_header_timeout_ms,
                10_000,
                "server.client_header_timeout_ms",
                errors,
            ),
            write_timeout: ms(raw.client_write_timeout_ms, 30_000, "server.client_write_timeout_ms", errors),
            keepalive_seconds: match raw.keepalive_timeout_seconds.unwrap_or(60) {
                s if s > 3_600 => {
                    errors.push(ConfigError::new("server.keepalive_timeout_seconds", "must be at most 3600"));
                    s
                }
                s => s,
            },
            max_proxy: connection_cap(raw.max_connections, 10_000, "server.max_connections", errors),
            max_manage: connection_cap(
                raw.manage_max_connections,
                256,
                "server.manage_max_connections",
                errors,
            ),
        },
        upstream_connect_timeout: ms(
            raw.upstream_connect_timeout_ms,
            5_000,
            "server.upstream_connect_timeout_ms",
            errors,
        ),
        upstream_timeout: ms(raw.upstream_timeout_ms, 600_000, "server.upstream_timeout_ms", errors),
        upstream_idle_timeout: ms(
            raw.upstream_idle_timeout_ms,
            60_000,
            "server.upstream_idle_timeout_ms",
            errors,
        ),
        watch_config: raw.watch_config.unwrap_or(true),
        shutdown_grace_seconds: raw.shutdown_grace_seconds.unwrap_or(30),
        data_dir: {
            let dir = raw.data_dir.as_deref().unwrap_or("data");
            if dir.trim().is_empty() {
                errors.push(ConfigError::new("server.data_dir", "must not be empty"));
            }
            base_dir.join(dir)
        },
        traces: trace_settings(traces, errors),
        experiment_retention_days: 30,
        experiment_embedding_model: None,
        cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
        cache_redis: None,
        cache_embedding_model: None,
        cache_embedding_timeout: Duration::from_millis(2000),
        cache_max_vectors: crate::cache::semantic::DEFAULT_MAX_VECTORS,
        master_key: None,
        state_backend: StateBackend::Sqlite,
        counters: CounterSettings::Local,
        webhooks: WebhookSettings::default(),
    }
}

fn trace_settings(raw: &RawTraces, errors: &mut Vec<ConfigError>) -> TraceSettings {
    let positive = |v: Option<u64>, default: u64, path: &str, errors: &mut Vec<ConfigError>| {
        let v = v.unwrap_or(default);
        if v == 0 {
            errors.push(ConfigError::new(path, "must be greater than 0"));
        }
        v.max(1)
    };
    let clickhouse = raw.clickhouse.as_ref().map(|c| {
        match url::Url::parse(&c.url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => errors.push(ConfigError::new(
                "traces.clickhouse.url",
                format!("\"{}\" is not an http(s) URL", c.url),
            )),
        }
        let ident = |v: &Option<String>, default: &str, path: &str, errors: &mut Vec<ConfigError>| {
            let v = v.clone().unwrap_or_else(|| default.to_string());
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                errors.push(ConfigError::new(path, "must be 1 or more characters of a-z, A-Z, 0-9, _"));
            }
            v
        };
        ClickHouseConfig {
            url: c.url.trim_end_matches('/').to_string(),
            database: ident(&c.database, "modelux", "traces.clickhouse.database", errors),
            user: c.user.clone().unwrap_or_else(|| "default".into()),
            password: c.password.clone().unwrap_or_default(),
            table: ident(&c.table, "requests", "traces.clickhouse.table", errors),
        }
    });
    let default_batch = if clickhouse.is_some() { 10_000 } else { 1_000 };
    TraceSettings {
        clickhouse,
        retention_days: positive(raw.retention_days.map(u64::from), 30, "traces.retention_days", errors)
            .try_into()
            .unwrap_or(u32::MAX),
        max_records: raw.max_records.unwrap_or(1_000_000),
        max_bytes: match raw.max_bytes {
            Some(n) if n > 0 && n < MIN_TRACE_BYTES => {
                errors.push(ConfigError::new(
                    "traces.max_bytes",
                    format!("must be 0 (no cap) or at least {MIN_TRACE_BYTES} (16 MiB)"),
                ));
                n
            }
            Some(n) => n,
            None => DEFAULT_TRACE_BYTES,
        },
        max_spill_bytes: positive(raw.max_spill_bytes, 1 << 30, "traces.max_spill_bytes", errors),
        queue_capacity: positive(
            raw.queue_capacity.map(|v| v as u64),
            65_536,
            "traces.queue_capacity",
            errors,
        ) as usize,
        // ClickHouse wants few large inserts; SQLite commits are cheap, and a smaller batch
        // keeps each write burst (and the memory the batch holds) short.
        batch_size: positive(raw.batch_size.map(|v| v as u64), default_batch, "traces.batch_size", errors)
            as usize,
        flush_interval: Duration::from_millis(positive(
            raw.flush_interval_ms,
            1_000,
            "traces.flush_interval_ms",
            errors,
        )),
        max_body_bytes: if raw.bodies.unwrap_or(false) { raw.max_body_bytes.unwrap_or(32_768) } else { 0 },
        replay_hours: raw.replay_hours.unwrap_or(24),
        replay_max_body_bytes: positive(
            raw.replay_max_body_bytes.map(|v| v as u64),
            1 << 20,
            "traces.replay_max_body_bytes",
            errors,
        ) as usize,
        replay_answers_per_second: raw.replay_answers_per_second.unwrap_or(100),
    }
}

fn key_digest(
    key: &RawKey,
    prefix: &str,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<auth::KeyDigest> {
    if key.name.trim().is_empty() {
        errors.push(ConfigError::new(format!("{path}.name"), "must not be empty"));
    }
    match (&key.key, &key.key_sha256) {
        (Some(k), None) => {
            if !k.starts_with(prefix) || k.len() < prefix.len() + 16 {
                errors.push(ConfigError::new(
                    format!("{path}.key"),
                    format!("must start with \"{prefix}\" followed by at least 16 characters"),
                ));
                return None;
            }
            Some(auth::digest(k))
        }
        (None, Some(h)) => {
            let mut out = [0u8; 32];
            match hex::decode_to_slice(h.trim(), &mut out) {
                Ok(()) => Some(out),
                Err(_) => {
                    errors.push(ConfigError::new(
                        format!("{path}.key_sha256"),
                        "must be 64 hexadecimal characters (the SHA-256 of the key)",
                    ));
                    None
                }
            }
        }
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(path, "set either key or key_sha256, not both"));
            None
        }
        (None, None) => {
            errors.push(ConfigError::new(path, "one of key or key_sha256 is required"));
            None
        }
    }
}

/// One provider entry → the runtime provider, its problems pushed onto `errors` with
/// `path` in front. `Err(true)`: the entry is there but unusable (references to it are not
/// reported again as unknown).
pub fn build_provider(p: RawProvider, path: &str, errors: &mut Vec<ConfigError>) -> Result<Provider, bool> {
    let Some(adapter) = providers::adapter(&p.kind) else {
        errors.push(ConfigError::new(
            format!("{path}.kind"),
            format!("unknown provider kind \"{}\" (supported: {})", p.kind, providers::kind_names()),
        ));
        return Err(true);
    };
    let api_key = p.api_key.as_deref().filter(|k| !k.is_empty());
    let credential = match api_key.map(|k| adapter.credential(k)).transpose() {
        Ok(c) => c,
        Err(e) => {
            errors.push(ConfigError::new(format!("{path}.api_key"), e));
            return Err(true);
        }
    };
    let Some(base_url) = p.base_url.clone().or_else(|| adapter.default_base_url(&p.id, api_key)) else {
        errors.push(ConfigError::new(format!("{path}.base_url"), adapter.base_url_required()));
        return Err(false);
    };
    let provider = match Provider::new(p.id.clone(), adapter, &base_url, credential, p.models) {
        Ok(provider) => provider,
        Err(e) => {
            errors.push(ConfigError::new(format!("{path}.base_url"), e));
            return Err(true);
        }
    };
    let provider = match p.api_version.as_deref() {
        None => provider,
        Some(v) => match provider.with_api_version(v) {
            Ok(provider) => provider,
            Err(e) => {
                errors.push(ConfigError::new(format!("{path}.api_version"), e));
                return Err(true);
            }
        },
    };
    let provider = match p.tls_ca_file.as_deref() {
        None => provider,
        Some(file) => match provider.with_ca_file(file) {
            Ok(provider) => provider,
            Err(e) => {
                errors.push(ConfigError::new(format!("{path}.tls_ca_file"), e));
                return Err(true);
            }
        },
    };
    Ok(provider)
}

/// Raw → runtime. Collects every problem rather than stopping at the first.
pub fn validate(
    raw: RawConfig,
    previous: Option<&Snapshot>,
    base_dir: &Path,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut settings = settings(&raw.server, &raw.traces, base_dir, &mut errors);
    settings.master_key = raw.state.master_key.clone().map(Redacted);
    settings.webhooks = webhook_settings(&raw.webhooks, &mut errors);
    match raw.experiments.retention_days {
        Some(0) => errors.push(ConfigError::new("experiments.retention_days", "must be greater than 0")),
        Some(days) => settings.experiment_retention_days = days,
        None => {}
    }
    match raw.cache.max_bytes {
        Some(0) => errors.push(ConfigError::new("cache.max_bytes", "must be greater than 0")),
        Some(n) => settings.cache_max_bytes = n,
        None => {}
    }
    if let Some(r) = &raw.cache.redis {
        let url = r.url.trim();
        if !url.starts_with("redis://") || ::redis::Client::open(url).is_err() {
            errors.push(ConfigError::new(
                "cache.redis.url",
                "must be a redis://[:password@]host:port[/db] URL",
            ));
        } else {
            let timeout = Duration::from_millis(r.timeout_ms.unwrap_or(100).max(1));
            settings.cache_redis = Some((Redacted(url.to_string()), timeout));
        }
    }
    match raw.cache.embedding_model.as_deref().map(str::trim) {
        Some("") => errors.push(ConfigError::new("cache.embedding_model", "must not be empty")),
        Some(model) => settings.cache_embedding_model = Some(model.to_string()),
        None => {}
    }
    match raw.cache.embedding_timeout_ms {
        Some(0) => errors.push(ConfigError::new("cache.embedding_timeout_ms", "must be greater than 0")),
        Some(ms) => settings.cache_embedding_timeout = Duration::from_millis(ms),
        None => {}
    }
    match raw.cache.max_vectors {
        Some(0) => errors.push(ConfigError::new("cache.max_vectors", "must be greater than 0")),
        Some(n) => settings.cache_max_vectors = n,
        None => {}
    }
    match raw.experiments.embedding_model.as_deref().map(str::trim) {
        Some("") => errors.push(ConfigError::new("experiments.embedding_model", "must not be empty")),
        Some(model) => settings.experiment_embedding_model = Some(model.to_string()),
        None => {}
    }
    match (raw.state.backend.as_deref(), &raw.state.url) {
        (None | Some("sqlite"), None) => {}
        (None | Some("sqlite"), Some(_)) => {
            errors.push(ConfigError::new("state.url", "is only for backend: postgres"))
        }
        (Some("postgres"), Some(url))
            if url.starts_with("postgres://") || url.starts_with("postgresql://") =>
        {
            settings.state_backend = StateBackend::Postgres { url: Redacted(url.clone()) };
        }
        (Some("postgres"), _) => errors.push(ConfigError::new(
            "state.url",
            "backend postgres needs url: postgres://user:password@host:port/database",
        )),
        (Some(other), _) => errors.push(ConfigError::new(
            "state.backend",
            format!("unknown state backend \"{other}\" (supported: sqlite, postgres)"),
        )),
    }
    settings.counters = counter_settings(&raw, &mut errors);
    let limits = &raw.rate_limits;
    let default_rpm = limits.requests_per_minute.unwrap_or(DEFAULT_REQUESTS_PER_MINUTE);
    let default_tpm = limits.tokens_per_minute.unwrap_or(0);
    let manage_rpm = limits.management_requests_per_minute.unwrap_or(DEFAULT_MANAGEMENT_REQUESTS_PER_MINUTE);

    let mut providers: HashMap<String, Arc<Provider>> = HashMap::new();
    // Providers that are configured but invalid: their own error is reported, so references
    // to them are not reported a second time as "not configured".
    let mut broken: Vec<String> = Vec::new();
    for (i, p) in raw.providers.into_iter().enumerate() {
        let path = format!("providers[{i}]");
        if !valid_id(&p.id) {
            errors.push(ConfigError::new(format!("{path}.id"), ID_RULE));
            continue;
        }
        if providers.contains_key(&p.id) {
            errors
                .push(ConfigError::new(format!("{path}.id"), format!("duplicate provider id \"{}\"", p.id)));
            continue;
        }
        let id = p.id.clone();
        match build_provider(p, &path, &mut errors) {
            Ok(provider) => {
                providers.insert(id, Arc::new(provider));
            }
            Err(true) => broken.push(id),
            Err(false) => {}
        }
    }

    let mut project_keys = KeyIndex::default();
    let mut projects = Vec::new();
    let mut project_cache = HashMap::new();
    for (i, project) in raw.projects.iter().enumerate() {
        let path = format!("projects[{i}]");
        if !valid_id(&project.id) {
            errors.push(ConfigError::new(format!("{path}.id"), ID_RULE));
            continue;
        }
        if projects.contains(&project.id) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate project id \"{}\"", project.id),
            ));
            continue;
        }
        projects.push(project.id.clone());
        if let Some(raw_cache) = project.cache.clone() {
            let at = format!("{path}.cache");
            if let Some(mut c) = cache::settings(raw_cache, &at, &mut errors) {
                let default = settings.cache_embedding_model.as_deref();
                cache::resolve_embedding_model(&mut c, default, &providers, &at, &mut errors);
                project_cache.insert(project.id.clone(), c);
            }
        }
        for (j, key) in project.keys.iter().enumerate() {
            let kpath = format!("{path}.keys[{j}]");
            if let Some(d) = key_digest(key, PROJECT_KEY_PREFIX, &kpath, &mut errors) {
                let principal = Principal::new(
                    &project.id,
                    &key.name,
                    key.requests_per_minute.unwrap_or(default_rpm),
                    key.tokens_per_minute.unwrap_or(default_tpm),
                );
                if !project_keys.insert(d, principal) {
                    errors.push(ConfigError::new(kpath, "the same key is configured twice"));
                }
            }
        }
    }

    let mut management_keys = KeyIndex::default();
    for (i, key) in raw.management_keys.iter().enumerate() {
        let path = format!("management_keys[{i}]");
        if let Some(d) = key_digest(key, MANAGEMENT_KEY_PREFIX, &path, &mut errors) {
            if project_keys.contains(&d) {
                errors
                    .push(ConfigError::new(path.clone(), "a management key must not also be a project key"));
            }
            if key.tokens_per_minute.is_some() {
                errors.push(ConfigError::new(
                    format!("{path}.tokens_per_minute"),
                    "management keys have no token limit",
                ));
            }
            let principal = Principal::new("", &key.name, key.requests_per_minute.unwrap_or(manage_rpm), 0);
            if !management_keys.insert(d, principal) {
                errors.push(ConfigError::new(path, "the same key is configured twice"));
            }
        }
    }

    let health = previous.map(|p| p.health.clone()).unwrap_or_default();
    let health_settings = health_settings(&raw.health, &mut errors);
    let prices = match PriceTable::embedded() {
        Ok(p) => Arc::new(price_overrides(p, raw.prices, &mut errors)),
        Err(e) => return Err(vec![ConfigError::new("", format!("the shipped price table is broken: {e}"))]),
    };
    let env =
        routing::Env { providers: &providers, broken: &broken, health: &health, prices: &prices, base_dir };
    let mut routing_configs = HashMap::new();
    let mut watched_files = Vec::new();
    for (slug, value) in raw.routing_configs {
        let previous_rc = previous.and_then(|p| p.routing_configs.get(&slug)).map(|rc| rc.as_ref());
        let Some(mut built) = routing::build(&slug, value, &env, previous_rc, &mut errors) else { continue };
        if let Some(v) = raw.pinned_versions.get(&slug) {
            built.config.version = *v;
        }
        if let Some(Some(c)) = built.config.cache.as_mut() {
            let default = settings.cache_embedding_model.as_deref();
            let at = format!("routing_configs.{slug}.cache");
            cache::resolve_embedding_model(c, default, &providers, &at, &mut errors);
        }
        if !projects.contains(&built.config.project) {
            errors.push(ConfigError::new(
                format!("routing_configs.{slug}.project"),
                format!("unknown project \"{}\"", built.config.project),
            ));
        }
        watched_files.extend(built.files);
        routing_configs.insert(slug, Arc::new(built.config));
    }
    if errors.is_empty() {
        routing::check_references(&mut routing_configs, &mut errors);
    }
    let budgets = budgets(raw.budgets, &projects, &routing_configs, &providers, &broken, &mut errors);

    if !errors.is_empty() {
        return Err(errors);
    }
    let any_cache =
        !project_cache.is_empty() || routing_configs.values().any(|c| matches!(c.cache, Some(Some(_))));
    Ok(Snapshot {
        generation: previous.map_or(1, |p| p.generation + 1),
        any_cache,
        settings,
        providers,
        project_keys,
        management_keys,
        routing_configs,
        projects,
        project_cache,
        health,
        health_settings,
        prices,
        budgets,
        watched_files,
        file_owned: FileOwned::default(),
    })
}

pub const DEFAULT_REQUESTS_PER_MINUTE: u64 = 600;
/// The embedded response cache holds this many bytes unless `cache.max_bytes` says otherwise.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 256 << 20;
pub const DEFAULT_MANAGEMENT_REQUESTS_PER_MINUTE: u64 = 60;

/// The shipped table with `prices:` applied. A listed model keeps the values an override
/// does not give; a new model needs at least its input and output prices.
fn price_overrides(
    table: &PriceTable,
    raw: BTreeMap<String, RawPrice>,
    errors: &mut Vec<ConfigError>,
) -> PriceTable {
    let mut overrides = Vec::new();
    for (model, p) in raw {
        let path = format!("prices.{model}");
        let per_token = |v: Option<f64>, field: &str, errors: &mut Vec<ConfigError>| match v {
            Some(v) if v.is_finite() && v >= 0.0 => Some(v / 1e6),
            Some(_) => {
                errors.push(ConfigError::new(format!("{path}.{field}"), "must be a non-negative number"));
                None
            }
            None => None,
        };
        let input = per_token(p.input_per_mtok, "input_per_mtok", errors);
        let output = per_token(p.output_per_mtok, "output_per_mtok", errors);
        let cache_read = per_token(p.cache_read_per_mtok, "cache_read_per_mtok", errors);
        let cache_write = per_token(p.cache_write_per_mtok, "cache_write_per_mtok", errors);
        let reasoning = per_token(p.reasoning_per_mtok, "reasoning_per_mtok", errors);
        let tier = match p.tier.as_deref().map(|t| (t, crate::prices::Tier::parse(t))) {
            Some((_, Some(t))) => Some(t),
            Some((t, None)) => {
                errors.push(ConfigError::new(
                    format!("{path}.tier"),
                    format!("\"{t}\" is not economy, standard or premium"),
                ));
                None
            }
            None => None,
        };
        let listed = table.lookup(&model).cloned();
        let base = match (listed, input, output) {
            (Some(info), _, _) => info,
            (None, Some(input), Some(output)) => crate::prices::ModelInfo {
                provider: "custom".into(),
                mode: crate::prices::Mode::Chat,
                input,
                output,
                cache_read: None,
                cache_write: None,
                reasoning: None,
                context_window: None,
                max_output_tokens: None,
                tier: crate::prices::Tier::Standard,
            },
            (None, _, _) => {
                errors.push(ConfigError::new(
                    path,
                    "is not in the shipped price table: give at least input_per_mtok and output_per_mtok",
                ));
                continue;
            }
        };
        let info = crate::prices::ModelInfo {
            input: input.unwrap_or(base.input),
            output: output.unwrap_or(base.output),
            cache_read: cache_read.or(base.cache_read),
            cache_write: cache_write.or(base.cache_write),
            reasoning: reasoning.or(base.reasoning),
            context_window: p.context_window.or(base.context_window),
            max_output_tokens: p.max_output_tokens.or(base.max_output_tokens),
            tier: tier.unwrap_or(base.tier),
            ..base
        };
        overrides.push((model, info));
    }
    table.with_overrides(overrides)
}

/// `budgets:` → the budget index. Selectors must match the scope and name things that exist.
fn budgets(
    raw: Vec<RawBudget>,
    projects: &[String],
    routing_configs: &HashMap<String, Arc<RoutingConfig>>,
    providers: &HashMap<String, Arc<Provider>>,
    broken: &[String],
    errors: &mut Vec<ConfigError>,
) -> Budgets {
    use crate::spend::budgets::{Action, Budget, Scope};
    let mut list = Vec::with_capacity(raw.len());
    let mut names: Vec<String> = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let path = format!("budgets[{i}]");
        let before = errors.len();
        if !valid_id(&b.name) {
            errors.push(ConfigError::new(format!("{path}.name"), ID_RULE));
        } else if names.contains(&b.name) {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!("duplicate budget name \"{}\"", b.name),
            ));
        }
        names.push(b.name.clone());
        let selectors = [
            ("project", b.project.is_some(), BudgetScopeKind::Project),
            ("routing_config", b.routing_config.is_some(), BudgetScopeKind::RoutingConfig),
            ("end_user", b.end_user.is_some(), BudgetScopeKind::EndUser),
            ("tag", b.tag.is_some(), BudgetScopeKind::Tag),
        ];
        for (field, set, scope) in selectors {
            if set && scope != b.scope {
                errors.push(ConfigError::new(
                    format!("{path}.{field}"),
                    format!("only applies to scope: {field}"),
                ));
            }
        }
        let missing = |field: &str, errors: &mut Vec<ConfigError>| {
            errors.push(ConfigError::new(
                format!("{path}.{field}"),
                format!("is required with scope: {field}"),
            ));
        };
        let scope = match b.scope {
            BudgetScopeKind::Org => Some(Scope::Org),
            BudgetScopeKind::Project => match b.project {
                Some(p) if projects.contains(&p) => Some(Scope::Project(p)),
                Some(p) => {
                    errors.push(ConfigError::new(
                        format!("{path}.project"),
                        format!("unknown project \"{p}\""),
                    ));
                    None
                }
                None => {
                    missing("project", errors);
                    None
                }
            },
            BudgetScopeKind::RoutingConfig => match b.routing_config {
                Some(c) => {
                    let slug = c.strip_prefix('@').unwrap_or(&c).to_string();
                    if routing_configs.contains_key(&slug) {
                        Some(Scope::RoutingConfig(slug))
                    } else {
                        errors.push(ConfigError::new(
                            format!("{path}.routing_config"),
                            format!("unknown routing config \"@{slug}\""),
                        ));
                        None
                    }
                }
                None => {
                    missing("routing_config", errors);
                    None
                }
            },
            BudgetScopeKind::EndUser => Some(Scope::EndUser(b.end_user)),
            BudgetScopeKind::Tag => match b.tag.as_deref().map(str::trim) {
                Some(t) if !t.is_empty() => Some(match t.split_once('=') {
                    Some((k, v)) => {
                        Scope::Tag { key: k.trim().to_string(), value: Some(v.trim().to_string()) }
                    }
                    None => Scope::Tag { key: t.to_string(), value: None },
                }),
                _ => {
                    missing("tag", errors);
                    None
                }
            },
        };
        if !(b.cap_usd.is_finite() && b.cap_usd >= 0.0) {
            errors.push(ConfigError::new(format!("{path}.cap_usd"), "must be a non-negative number of USD"));
        }
        let soft_limit_pct = b.soft_limit_pct.unwrap_or(80.0);
        if !(soft_limit_pct > 0.0 && soft_limit_pct <= 100.0) {
            errors.push(ConfigError::new(format!("{path}.soft_limit_pct"), "must be in (0, 100]"));
        }
        let mut alert_pcts = Vec::new();
        match &b.alert_thresholds {
            None => alert_pcts.push(soft_limit_pct),
            Some(list) => {
                for (i, t) in list.iter().enumerate() {
                    if !(t.pct.is_finite() && t.pct > 0.0 && t.pct <= 1000.0) {
                        errors.push(ConfigError::new(
                            format!("{path}.alert_thresholds[{i}].pct"),
                            "must be a percentage of the cap in (0, 1000]",
                        ));
                    }
                    for (j, c) in t.channels.iter().flatten().enumerate() {
                        if c != "webhook" {
                            errors.push(ConfigError::new(
                                format!("{path}.alert_thresholds[{i}].channels[{j}]"),
                                format!("\"{c}\" is not a channel this gateway sends; use \"webhook\""),
                            ));
                        }
                    }
                    alert_pcts.push(t.pct);
                }
            }
        }
        alert_pcts.sort_by(f64::total_cmp);
        alert_pcts.dedup();
        let action = match (b.action, b.downgrade_to) {
            (BudgetActionKind::Block, None) => Some(Action::Block),
            (BudgetActionKind::WarnOnly, None) => Some(Action::WarnOnly),
            (BudgetActionKind::Downgrade, Some(to)) => {
                let known = match to.strip_prefix('@') {
                    Some(slug) => routing_configs.contains_key(slug),
                    None => match providers::resolve_model(providers, &to) {
                        Ok(_) => true,
                        Err(_) => broken.iter().any(|p| to.starts_with(&format!("{p}/"))),
                    },
                };
                if !known {
                    errors.push(ConfigError::new(
                        format!("{path}.downgrade_to"),
                        format!("\"{to}\" is neither a routing config (@slug) nor a model a configured provider serves"),
                    ));
                }
                Some(Action::Downgrade(to.into()))
            }
            (BudgetActionKind::Downgrade, None) => {
                errors.push(ConfigError::new(
                    format!("{path}.downgrade_to"),
                    "is required with action: downgrade",
                ));
                None
            }
            (_, Some(_)) => {
                errors.push(ConfigError::new(
                    format!("{path}.downgrade_to"),
                    "only applies to action: downgrade",
                ));
                None
            }
        };
        if errors.len() != before {
            continue;
        }
        let (Some(scope), Some(action)) = (scope, action) else { continue };
        let cap = crate::spend::counters::to_nanos(b.cap_usd);
        list.push(Budget {
            name: b.name.into(),
            scope,
            period: b.period,
            cap,
            cap_usd: b.cap_usd,
            soft: crate::spend::counters::to_nanos(b.cap_usd * soft_limit_pct / 100.0),
            soft_limit_pct,
            action,
            alert_pcts,
        });
    }
    Budgets::new(list)
}

fn health_settings(raw: &RawHealth, errors: &mut Vec<ConfigError>) -> HealthSettings {
    let d = HealthSettings::default();
    let s = HealthSettings {
        window: raw.window_s.map_or(d.window, std::time::Duration::from_secs),
        min_success_rate: raw.min_success_rate.unwrap_or(d.min_success_rate),
        min_requests: raw.min_requests.unwrap_or(d.min_requests),
        consecutive_failures: raw.consecutive_failures.unwrap_or(d.consecutive_failures),
        probe_after: raw.probe_after_ms.map_or(d.probe_after, Duration::from_millis),
        ewma_alpha: d.ewma_alpha,
    };
    if s.window.is_zero() {
        errors.push(ConfigError::new("health.window_s", "must be greater than 0"));
    }
    if !(0.0..=1.0).contains(&s.min_success_rate) {
        errors.push(ConfigError::new("health.min_success_rate", "must be between 0 and 1"));
    }
    if s.consecutive_failures == 0 {
        errors.push(ConfigError::new("health.consecutive_failures", "must be at least 1"));
    }
    if s.probe_after.is_zero() {
        errors.push(ConfigError::new("health.probe_after_ms", "must be greater than 0"));
    }
    s
}

/// Routing configs of one project, sorted by slug (for `GET /models`).
pub fn project_configs<'a>(snapshot: &'a Snapshot, project: &str) -> BTreeMap<&'a str, &'a RoutingConfig> {
    snapshot
        .routing_configs
        .values()
        .filter(|rc| rc.project == project)
        .map(|rc| (rc.slug.as_str(), rc.as_ref()))
        .collect()
}
