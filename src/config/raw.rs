//! The YAML contract, as written by users. Every struct denies unknown keys so a typo is an
//! error with its path instead of a silently ignored setting. Validation into runtime types
//! happens in `validate.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MANAGE_LISTEN: &str = "127.0.0.1:5100";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// OpenAI's own limit on one file (Anthropic's is 500 MB).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;

/// Top-level sections, used to reject unknown top-level keys with a clear message.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "providers",
    "projects",
    "management_keys",
    "state",
    "routing_configs",
    "health",
    "budgets",
    "prices",
    "rate_limits",
    "traces",
    "experiments",
    "cache",
    "spend",
    "redis",
    "webhooks",
];

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub proxy_listen: Option<String>,
    pub manage_listen: Option<String>,
    /// Worker threads for the proxy service; default: number of CPUs.
    pub threads: Option<usize>,
    /// Let idle worker threads steal tasks from busy ones (one shared tokio runtime)
    /// instead of one runtime per thread. Off by default: measured ~10% less CPU per
    /// request without it, and proxy requests are uniform enough not to need stealing.
    pub work_stealing: Option<bool>,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: Option<u64>,
    /// Largest upload passed through (OpenAI and Anthropic `/files`); streamed, never held.
    pub max_upload_bytes: Option<u64>,
    /// How clients reach the proxy (`https://llm.example.com`), for URLs the gateway hands
    /// back (an Anthropic batch's `results_url`); default: the request's `Host`.
    pub public_base_url: Option<String>,
    /// Deadline for receiving the whole request body; a slower client gets 408.
    pub client_body_timeout_ms: Option<u64>,
    /// Deadline for receiving a request's whole head (request line and headers), counted
    /// from the connection opening (a kept-alive connection's next head: within
    /// `keepalive_timeout_seconds` plus this of the previous answer).
    pub client_header_timeout_ms: Option<u64>,
    /// How long an idle keep-alive connection waits for its next request; 0 closes the
    /// connection after every answer.
    pub keepalive_timeout_seconds: Option<u64>,
    /// The longest one write to a client may wait (a client that stops reading its answer
    /// is cut off after this).
    pub client_write_timeout_ms: Option<u64>,
    /// Client connections open at once on the proxy listener; one more is answered 503
    /// and closed.
    pub max_connections: Option<usize>,
    /// The same cap for the management listener.
    pub manage_max_connections: Option<usize>,
    /// TCP (+TLS) connect deadline per upstream attempt.
    pub upstream_connect_timeout_ms: Option<u64>,
    /// Deadline for upstream response headers, and the longest silence allowed between
    /// two reads of an upstream body (so a slow stream lives as long as it keeps talking).
    pub upstream_timeout_ms: Option<u64>,
    /// Idle upstream connections are kept this long in the pool.
    pub upstream_idle_timeout_ms: Option<u64>,
    /// Poll the config file for changes (SIGHUP always reloads).
    pub watch_config: Option<bool>,
    /// Seconds in-flight requests get to finish on SIGTERM.
    pub shutdown_grace_seconds: Option<u64>,
    /// Where the embedded store keeps its file (`modelux.db`): budget spend. Relative paths
    /// resolve against the config file's directory. Default `data`.
    pub data_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub id: String,
    /// One of `providers::adapter::KINDS`.
    pub kind: String,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    /// PEM file of CA certificates to trust for this provider instead of the system
    /// roots (self-hosted servers behind a private CA).
    pub tls_ca_file: Option<String>,
    /// Azure OpenAI only: the `api-version` query parameter (default 2024-10-21).
    pub api_version: Option<String>,
    /// Models advertised by `GET /models` as `provider/model`.
    #[serde(default)]
    pub models: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: String,
    pub key: Option<String>,
    pub key_sha256: Option<String>,
    /// Overrides `rate_limits.requests_per_minute` (or, for management keys,
    /// `rate_limits.management_requests_per_minute`) for this key; 0 means unlimited.
    #[serde(alias = "rpm")]
    pub requests_per_minute: Option<u64>,
    /// Overrides `rate_limits.tokens_per_minute` for this key; 0 means unlimited.
    #[serde(alias = "tpm")]
    pub tokens_per_minute: Option<u64>,
}

/// `rate_limits:` — per-key defaults (PRODUCT.md §6).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    /// Requests per minute per project key (default 600; 0: unlimited).
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens per minute per project key (default: unlimited).
    pub tokens_per_minute: Option<u64>,
    /// Requests per minute per management key (default 60; 0: unlimited).
    pub management_requests_per_minute: Option<u64>,
}

/// `traces:` — where decision traces go and how long they stay.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTraces {
    /// Write to ClickHouse; without it traces go to the embedded store (`traces.db`).
    pub clickhouse: Option<RawClickHouse>,
    /// Records older than this are dropped (default 30; ClickHouse drops whole days).
    pub retention_days: Option<u32>,
    /// Embedded store only: the most records kept (default 1,000,000; 0: no cap).
    pub max_records: Option<u64>,
    /// Embedded store only: the most bytes the records' pages may take (default 2 GiB;
    /// 0: no cap). The oldest records go first.
    pub max_bytes: Option<u64>,
    /// Bytes the disk queue (`<data_dir>/trace-spill`) may hold while the store is out of
    /// reach (default 1 GiB); batches beyond it are dropped and counted.
    pub max_spill_bytes: Option<u64>,
    /// Records waiting for the writer; when full, new records are dropped and counted
    /// (default 65,536).
    pub queue_capacity: Option<usize>,
    /// Records per insert (default 10,000).
    pub batch_size: Option<usize>,
    /// A partial batch is written after this long (default 1,000).
    pub flush_interval_ms: Option<u64>,
    /// Keep request and response bodies (default false).
    pub bodies: Option<bool>,
    /// Each body is cut to this many bytes (default 32,768).
    pub max_body_bytes: Option<usize>,
    /// Hours chat request bodies are kept, compressed, for replay (default 24; 0: not kept).
    pub replay_hours: Option<u32>,
    /// A replay body longer than this is cut and marked as cut (default 1 MiB).
    pub replay_max_body_bytes: Option<usize>,
    /// The most answers kept for replay per second per gateway, beside their bodies
    /// (default 100; 0: none).
    pub replay_answers_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClickHouse {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Default `modelux`; created if missing.
    pub database: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Default `requests`.
    pub table: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScopeKind {
    Org,
    Project,
    RoutingConfig,
    EndUser,
    Tag,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetActionKind {
    Block,
    Downgrade,
    WarnOnly,
}

/// One entry of `budgets:` (PRODUCT.md §5).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = BudgetBody)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub name: String,
    pub scope: BudgetScopeKind,
    /// Selector of `scope: project`.
    pub project: Option<String>,
    /// Selector of `scope: routing_config` (`@slug` or `slug`).
    pub routing_config: Option<String>,
    /// Selector of `scope: end_user`; without it each end user has their own counter.
    pub end_user: Option<String>,
    /// Selector of `scope: tag`: `key=value`, or `key` for a counter per value.
    pub tag: Option<String>,
    pub period: crate::spend::period::Period,
    pub cap_usd: f64,
    /// Spend (percent of the cap) from which responses carry a warning (default 80).
    pub soft_limit_pct: Option<f64>,
    pub action: BudgetActionKind,
    /// With `action: downgrade`: the model (`gpt-4o-mini`, `provider/model`) or `@config`
    /// that serves instead once the cap is reached.
    pub downgrade_to: Option<String>,
    /// Percentages of the cap at which `budget.threshold_reached` is sent, once per period
    /// each (default: `soft_limit_pct`).
    #[serde(default)]
    pub alert_thresholds: Option<Vec<RawAlertThreshold>>,
}

/// One `alert_thresholds` entry.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAlertThreshold {
    pub pct: f64,
    /// Where the alert goes: `webhook` (the default, and the only channel this build has).
    pub channels: Option<Vec<String>>,
}

/// One entry of `prices:` — a model's prices in USD per million tokens, replacing or adding
/// to the shipped table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input_per_mtok: Option<f64>,
    pub output_per_mtok: Option<f64>,
    pub cache_read_per_mtok: Option<f64>,
    pub cache_write_per_mtok: Option<f64>,
    pub reasoning_per_mtok: Option<f64>,
    pub context_window: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub tier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProject {
    pub id: String,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    /// The project's default response cache (`cache:` of a routing config wins).
    pub cache: Option<super::cache::RawCache>,
}

/// `health:` — thresholds of the provider health tracker (PRODUCT.md §9.3 defaults).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Rolling window for success rate and latency, in seconds (default 300).
    pub window_s: Option<u64>,
    /// Below this success rate (0-1) a target is marked unhealthy (default 0.9)...
    pub min_success_rate: Option<f64>,
    /// ...once it has at least this many samples in the window (default 20).
    pub min_requests: Option<u32>,
    /// This many failures in a row mark it unhealthy at once (default 5).
    pub consecutive_failures: Option<u32>,
    /// An unhealthy target gets one probe request after this long (default 30000).
    pub probe_after_ms: Option<u64>,
}

/// The parsed sections; each is deserialized on its own so one bad entry does not hide the
/// errors of the others.
#[derive(Debug, Default)]
pub struct RawConfig {
    pub server: RawServer,
    pub providers: Vec<RawProvider>,
    pub projects: Vec<RawProject>,
    pub management_keys: Vec<RawKey>,
    /// Each config is kept as YAML: its strategy decides which struct it deserializes into.
    pub routing_configs: BTreeMap<String, serde_yaml_ng::Value>,
    pub health: RawHealth,
    pub budgets: Vec<RawBudget>,
    pub prices: BTreeMap<String, RawPrice>,
    pub rate_limits: RawRateLimits,
    pub traces: RawTraces,
    pub state: RawState,
    pub experiments: RawExperiments,
    pub cache: RawCacheStore,
    pub spend: RawSpend,
    pub redis: Option<RawRedis>,
    pub webhooks: RawWebhooks,
    /// Versions of routing configs owned by the state store (their stored version, not one
    /// counted from reloads).
    pub pinned_versions: BTreeMap<String, u32>,
}

/// `webhooks:` — how events are delivered (the endpoints themselves are created through the
/// management API). Every field has the default PRODUCT.md §11.1 states; tests shorten them.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    /// Each attempt's bound (default 10,000).
    pub timeout_ms: Option<u64>,
    /// The first retry's delay; each later one doubles it (default 30,000).
    pub backoff_base_ms: Option<u64>,
    /// The longest delay between attempts (default 3,600,000).
    pub backoff_cap_ms: Option<u64>,
    /// How long a delivery is retried before it is `failed` (default 86,400,000).
    pub retry_window_ms: Option<u64>,
    /// How often the outbox is read for new events and due retries (default 1,000).
    pub poll_interval_ms: Option<u64>,
    /// How long a rotated-out signing secret keeps signing (default 86,400,000).
    pub secret_overlap_ms: Option<u64>,
    /// `org_id` of every event's envelope (default `default`).
    pub org_id: Option<String>,
    /// Finished deliveries (and their attempts) are deleted this many days after their last
    /// attempt (default 30).
    pub retention_days: Option<u32>,
}

/// `experiments:` — replays of stored traffic (README: Experiments).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawExperiments {
    /// Finished experiments (and their per-request decisions) older than this are deleted
    /// (default 30).
    pub retention_days: Option<u32>,
    /// The embeddings model `with_responses` compares answers with (a model name as the
    /// embeddings endpoint takes it: `provider/model`, a bare name or `@config`).
    pub embedding_model: Option<String>,
}

/// `cache:` — the response cache's store (each routing config turns caching on).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCacheStore {
    /// Bytes the embedded cache holds (default 256 MiB).
    pub max_bytes: Option<u64>,
    /// Keep entries in Redis instead, shared by every node pointed at it.
    pub redis: Option<RawCacheRedis>,
    /// What `mode: semantic` embeds prompts with when a `cache:` names no model.
    pub embedding_model: Option<String>,
    /// Each embeddings call's bound (default 2000 ms): a slower one is a miss.
    pub embedding_timeout_ms: Option<u64>,
    /// Vectors the semantic index holds (default 100,000; the oldest go first).
    pub max_vectors: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCacheRedis {
    /// `redis://[:password@]host:port[/db]` (`${ENV}` expands).
    pub url: String,
    /// Each call's bound (default 100 ms): a slower Redis is a miss, not a wait.
    pub timeout_ms: Option<u64>,
}

/// `spend:` — where budget and rate counters live.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSpend {
    /// `local` (default): in this process; `redis`: shared by every node on one Redis.
    pub counters: Option<String>,
    /// `fail_closed` (default) or `fail_open`: what requests get while Redis is out of reach.
    pub on_counter_error: Option<String>,
    /// The counters' Redis (default: the top-level `redis:`).
    pub redis: Option<RawRedis>,
    /// This node's name in the shared counters; default `<host name>:<proxy port>`.
    pub node_id: Option<String>,
}

/// A Redis server (`redis:` at the top level, or `spend.redis:`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://[:password@]host:port[/db]` (`${ENV}` expands).
    pub url: String,
    /// Each call's bound (default 250 ms).
    pub timeout_ms: Option<u64>,
}

/// `state:` — where management state (API-created projects, keys, versions, audit) lives.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// `sqlite` (default): `<data_dir>/modelux.db`; `postgres`: the database at `url`.
    pub backend: Option<String>,
    /// `postgres` only: `postgres://user:password@host:port/database`.
    pub url: Option<String>,
    /// Encrypts provider keys at rest (64 hex characters or 32 bytes base64);
    /// `MODELUX_MASTER_KEY` wins over it, `<data_dir>/master.key` is used without either.
    pub master_key: Option<String>,
}
