//! The ClickHouse trace store: RowBinary inserts over HTTP with the official client, reads
//! and reports computed in ClickHouse with the semantics of `query` (same answers as the
//! embedded store). Works with ClickHouse 18.16 through current: the schema
//! (`conf/clickhouse/`) and every query use only what 18.16 already has.
//!
//! Idempotence: the table is a ReplacingMergeTree whose sort key includes `request_id`, so
//! a row written twice collapses on merge, and every read goes through `FINAL` so it is
//! counted once before that.

use std::time::Duration;

use async_trait::async_trait;
use clickhouse::{error::Error as ChError, Client, Row};
use serde::Deserialize;

use super::query::{round_cost, Cursor, GroupBy, LogPage, LogQuery, Report, ReportQuery, ReportRow, Totals};
use super::query::{DEFAULT_PAGE, MAX_PAGE};
use super::replay::{self, Bodies, ReplayQuery, ReplayRow};
use super::{StoreError, TraceRow, TraceStore};

/// Bookkeeping table, created before any migration.
const SCHEMA_MIGRATIONS: &str = include_str!("../../conf/clickhouse/schema_migrations.sql");

/// `(version, name, sql)`, applied in order; a version runs once per table.
const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "0001_requests", include_str!("../../conf/clickhouse/0001_requests.sql")),
    (2, "0002_replay", include_str!("../../conf/clickhouse/0002_replay.sql")),
    (3, "0003_replay_answer", include_str!("../../conf/clickhouse/0003_replay_answer.sql")),
    (4, "0004_cache", include_str!("../../conf/clickhouse/0004_cache.sql")),
    (5, "0005_cache_embedding", include_str!("../../conf/clickhouse/0005_cache_embedding.sql")),
    (6, "0006_provider_key", include_str!("../../conf/clickhouse/0006_provider_key.sql")),
    (7, "0007_owned_ids", include_str!("../../conf/clickhouse/0007_owned_ids.sql")),
];

/// How long one insert may take before the writer treats the store as unavailable (a hung
/// server must not stall the writer: its rows get spilled instead).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads and DDL may scan more; they get this much, also enforced on the server
/// (`max_execution_time`) so an abandoned query does not keep running there.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseSettings {
    /// The HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    /// Empty: the server's default user.
    pub user: String,
    pub password: String,
    /// Default `requests`.
    pub table: String,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        ClickHouseSettings {
            url: "http://127.0.0.1:8123".to_string(),
            database: "modelux".to_string(),
            user: String::new(),
            password: String::new(),
            table: "requests".to_string(),
        }
    }
}

pub struct ClickHouseStore {
    settings: ClickHouseSettings,
    /// Without a default database: `CREATE DATABASE` must not need the database to exist.
    root: Client,
    /// With the database as default (inserts name only the table).
    client: Client,
    /// `` `db`.`table` ``, quoted.
    qualified: String,
    insert_timeout: Duration,
    read_timeout: Duration,
}

impl ClickHouseStore {
    pub fn new(settings: ClickHouseSettings) -> ClickHouseStore {
        // Validation off: it needs `RowBinaryWithNamesAndTypes` and column metadata
        // queries that 18.16 does not have; the schema is ours, and the tests check that
        // the row type matches it.
        let mut root = Client::default().with_url(settings.url.clone()).with_validation(false);
        if !settings.user.is_empty() {
            root = root.with_user(settings.user.clone());
        }
        if !settings.password.is_empty() {
            root = root.with_password(settings.password.clone());
        }
        let client = root.clone().with_database(settings.database.clone());
        let qualified = format!("{}.{}", quote_ident(&settings.database), quote_ident(&settings.table));
        ClickHouseStore {
            settings,
            root,
            client,
            qualified,
            insert_timeout: DEFAULT_TIMEOUT,
            read_timeout: READ_TIMEOUT,
        }
    }

    /// Overrides the insert timeout (and caps the read timeout at the same value); mostly
    /// for tests of a hung server.
    pub fn with_timeout(mut self, timeout: Duration) -> ClickHouseStore {
        self.insert_timeout = timeout;
        self.read_timeout = self.read_timeout.min(timeout);
        self
    }

    pub fn settings(&self) -> &ClickHouseSettings {
        &self.settings
    }

    /// The table name for `Client::query`, where `?` is a bind placeholder (`??` is a
    /// literal one).
    fn table_in_query(&self) -> String {
        self.qualified.replace('?', "??")
    }

    fn read_query(&self, sql: &str) -> clickhouse::query::Query {
        self.client
            .query(sql)
            .with_setting("max_execution_time", self.read_timeout.as_secs().max(1).to_string())
    }

    async fn timed<T>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T, ChError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result.map_err(classify_error),
            Err(_) => Err(StoreError::Transient(format!("clickhouse did not answer within {limit:?}"))),
        }
    }

    /// Runs one DDL statement verbatim (no bind parsing: identifiers may contain `?`).
    async fn ddl(&self, sql: &str) -> Result<(), StoreError> {
        self.timed(self.read_timeout, self.root.query_raw(sql).execute()).await
    }

    async fn applied_versions(&self) -> Result<Vec<u32>, StoreError> {
        let sql = format!(
            "SELECT DISTINCT version FROM {}.schema_migrations WHERE table_name = ? ORDER BY version",
            quote_ident(&self.settings.database).replace('?', "??")
        );
        let query = self.root.query(&sql).bind(self.settings.table.as_str());
        self.timed(self.read_timeout, query.fetch_all::<u32>()).await
    }

    async fn insert_rows(&self, rows: &[TraceRow]) -> Result<(), ChError> {
        let mut insert = self.client.insert::<TraceRow>(&self.settings.table).await?;
        for row in rows {
            // A failed write aborts the insert; it must not be used again.
            insert.write(row).await?;
        }
        insert.end().await
    }
}

/// Quotes an identifier the way ClickHouse reads backquoted names (all versions).
fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        if matches!(c, '\\' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
    out
}

/// The statements of a migration file, placeholders filled: `--` comments dropped, split
/// on `;` (the HTTP interface takes one statement per request). The files keep `;` and
/// `--` out of string literals.
fn statements(sql: &str, database: &str, table: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .map(|line| line.split_once("--").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("{database}", &quote_ident(database)).replace("{table}", &quote_ident(table)))
        .collect()
}

/// ClickHouse error codes that mean the rows themselves were refused: retrying the same
/// rows cannot succeed, so they are dead-lettered rather than retried. Everything else,
/// including codes not listed, is `Transient`: the rows are spilled and retried, which
/// loses nothing if the guess is wrong.
///
/// Deliberately *not* here: 33 CANNOT_READ_ALL_DATA and 32 ATTEMPT_TO_READ_AFTER_EOF (a
/// RowBinary body cut short by the network, or a table whose columns no longer match the
/// row type: every batch would fail until the schema is fixed, so spilling beats
/// dead-lettering everything); 16/47 unknown column or identifier and 62 syntax error (the
/// same: schema drift or a bug, not the data); 60/81 missing table or database; 159, 209,
/// 210 timeouts and network; 164/242 read-only; 202 too many queries; 241 memory limit;
/// authentication and access errors (misconfiguration, fixed by an operator).
pub const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT (e.g. a derived column converting a value that cannot convert)
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH (Vector's sink does not retry it either)
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA (Vector's sink does not retry it either)
    128, // TOO_LARGE_ARRAY_SIZE
    131, // TOO_LARGE_STRING_SIZE
    190, // SIZES_OF_ARRAYS_DOESNT_MATCH
];

/// 252 is TOO_MANY_PARTS ("merges are processing significantly slower than inserts":
/// back-pressure, transient) but also, on newer servers, a batch spanning more days than
/// `max_partitions_per_insert_block` (the same batch can never succeed).
const TOO_MANY_PARTS: u32 = 252;

/// The error code of a server response (`Code: 60, e.displayText() = ...` on 18.16,
/// `Code: 60. DB::Exception: ...` on current versions).
pub fn error_code(message: &str) -> Option<u32> {
    let start = message.find("Code:")? + "Code:".len();
    let digits: String = message[start..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Classifies an error response body (see `DATA_ERROR_CODES`).
pub fn classify_response(message: &str) -> StoreError {
    let data = match error_code(message) {
        Some(TOO_MANY_PARTS) => message.contains("partitions for single INSERT"),
        Some(code) => DATA_ERROR_CODES.contains(&code),
        // A proxy's 502, an HTML error page: the server was not reached properly.
        None => false,
    };
    let text = format!("clickhouse: {message}");
    if data {
        StoreError::Data(text)
    } else {
        StoreError::Transient(text)
    }
}

/// Network failures, timeouts and undecodable answers are transient; server responses
/// are classified by their code.
pub fn classify_error(error: ChError) -> StoreError {
    match &error {
        ChError::BadResponse(message) => classify_response(message),
        _ => StoreError::Transient(format!("clickhouse: {error}")),
    }
}

/// A value bound to a `?` placeholder (never formatted into the SQL text).
enum Param {
    Str(String),
    U64(u64),
    F64(f64),
}

/// A WHERE clause under construction: conditions joined with AND, and their parameters in
/// placeholder order.
#[derive(Default)]
struct Filter {
    conditions: Vec<String>,
    params: Vec<Param>,
}

impl Filter {
    fn push(&mut self, condition: &str, params: impl IntoIterator<Item = Param>) {
        self.conditions.push(condition.to_string());
        self.params.extend(params);
    }

    fn eq(&mut self, column: &str, value: &Option<String>) {
        if let Some(v) = value {
            self.push(&format!("{column} = ?"), [Param::Str(v.clone())]);
        }
    }

    /// `start_ms` inclusive, `end_ms` exclusive, on `ts_ms`; the same bounds on `ts` (whole
    /// seconds, `ts = ts_ms / 1000`) let ClickHouse skip partitions and use the sort key.
    fn time(&mut self, start_ms: Option<u64>, end_ms: Option<u64>) {
        if let Some(s) = start_ms {
            self.push("ts_ms >= ?", [Param::U64(s)]);
            self.push("ts >= toDateTime(?)", [Param::U64(seconds(s))]);
        }
        if let Some(e) = end_ms {
            self.push("ts_ms < ?", [Param::U64(e)]);
            if e > 0 {
                self.push("ts <= toDateTime(?)", [Param::U64(seconds(e - 1))]);
            }
        }
    }

    /// Every filter of `LogQuery` except the cursor, as `LogQuery::matches` defines them.
    fn log(&mut self, q: &LogQuery) {
        self.time(q.start_ms, q.end_ms);
        self.eq("project", &q.project);
        if let Some(s) = q.status {
            let (lo, hi) = s.range();
            self.push("status BETWEEN ? AND ?", [Param::U64(lo.into()), Param::U64(hi.into())]);
        }
        if let Some(m) = &q.model {
            self.push("(model = ? OR model_requested = ?)", [Param::Str(m.clone()), Param::Str(m.clone())]);
        }
        self.eq("model_requested", &q.model_requested);
        self.eq("provider", &q.provider);
        self.eq("routing_config", &q.routing_config);
        self.eq("end_user", &q.end_user);
        self.eq("trace_id", &q.trace_id);
        self.eq("conversation_id", &q.conversation_id);
        if let Some(l) = q.min_latency_ms {
            if l.is_nan() || l == f64::INFINITY {
                // Nothing is >= NaN; latencies are finite.
                self.push("0", []);
            } else if l.is_finite() {
                self.push("latency_ms >= ?", [Param::F64(l)]);
            }
        }
        for (k, v) in &q.tags {
            // Some position holds the pair (`LogQuery::matches`).
            self.push(
                "arrayExists((k, v) -> k = ? AND v = ?, tag_keys, tag_values)",
                [Param::Str(k.clone()), Param::Str(v.clone())],
            );
        }
    }

    fn cursor(&mut self, c: &Cursor) {
        self.push(
            "(ts_ms < ? OR (ts_ms = ? AND request_id < ?))",
            [Param::U64(c.ts_ms), Param::U64(c.ts_ms), Param::Str(c.request_id.clone())],
        );
        self.push("ts <= toDateTime(?)", [Param::U64(seconds(c.ts_ms))]);
    }

    fn sql(&self) -> String {
        if self.conditions.is_empty() {
            "1".to_string()
        } else {
            self.conditions.join(" AND ")
        }
    }
}

fn bind(
    mut query: clickhouse::query::Query,
    params: impl IntoIterator<Item = Param>,
) -> clickhouse::query::Query {
    for p in params {
        query = match p {
            Param::Str(s) => query.bind(s),
            Param::U64(n) => query.bind(n),
            Param::F64(f) => query.bind(f),
        };
    }
    query
}

/// `ts` for a ms timestamp, saturating as `TraceEvent::into_row` does.
fn seconds(ms: u64) -> u64 {
    (ms / 1000).min(u64::from(u32::MAX))
}

/// One series row as ClickHouse returns it (RowBinary: field order = SELECT order).
#[derive(Debug, Row, Deserialize)]
struct SeriesRow {
    bucket: u64,
    grp: String,
    requests: u64,
    errors: u64,
    cost: f64,
    input: u64,
    output: u64,
    latency: Vec<f64>,
    ttfb_count: u64,
    ttfb: Vec<f64>,
}

#[derive(Debug, Row, Deserialize)]
struct TotalsRow {
    requests: u64,
    errors: u64,
    cost: f64,
    input: u64,
    output: u64,
    latency: Vec<f64>,
}

/// The aggregates of a series row and of the totals (same percentile rule as
/// `query::quantile_exact`: ClickHouse's `quantileExact`). TTFB percentiles only over the
/// records that have one (`ifNull` only satisfies the type; `isNotNull` excludes them).
const AGGREGATES: &str = "count() AS requests, \
     countIf(status >= 400 OR status = 0) AS errors, \
     sum(cost_total) AS cost, \
     sum(input_tokens) AS input, \
     sum(output_tokens) AS output, \
     quantilesExact(0.5, 0.95, 0.99)(latency_ms) AS latency";

const TTFB_AGGREGATES: &str = "count(ttfb_ms) AS ttfb_count, \
     quantilesExactIf(0.5, 0.95, 0.99)(ifNull(ttfb_ms, 0), isNotNull(ttfb_ms)) AS ttfb";

fn pick(values: &[f64], i: usize) -> Option<f64> {
    values.get(i).copied()
}

#[async_trait]
impl TraceStore for ClickHouseStore {
    fn kind(&self) -> &'static str {
        "clickhouse"
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        let db = &self.settings.database;
        let table = &self.settings.table;
        self.ddl(&format!("CREATE DATABASE IF NOT EXISTS {}", quote_ident(db))).await?;
        for statement in statements(SCHEMA_MIGRATIONS, db, table) {
            self.ddl(&statement).await?;
        }
        let applied = self.applied_versions().await?;
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            for statement in statements(sql, db, table) {
                match self.ddl(&statement).await {
                    // 44 ILLEGAL_COLUMN: an `ADD COLUMN` that already ran.
                    Err(StoreError::Transient(m))
                        if statement.contains(" ADD COLUMN ")
                            && error_code(&m) == Some(44)
                            && m.contains("already exists") => {}
                    other => other?,
                }
            }
            // Recorded only after every statement succeeded; a crash in between reruns
            // the (idempotent) statements next time.
            let record = format!(
                "INSERT INTO {}.schema_migrations (table_name, version, name, applied_at) \
                 VALUES (?, ?, ?, now())",
                quote_ident(db).replace('?', "??")
            );
            let query = self.root.query(&record).bind(table.as_str()).bind(*version).bind(*name);
            self.timed(self.read_timeout, query.execute()).await?;
            tracing::info!(version, name, database = %db, table = %table, "clickhouse migration applied");
        }
        Ok(())
    }

    async fn insert(&self, rows: &[TraceRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.timed(self.insert_timeout, self.insert_rows(rows)).await
    }

    async fn list(&self, query: &LogQuery) -> Result<LogPage, StoreError> {
        let limit = if query.limit == 0 { DEFAULT_PAGE } else { query.limit.min(MAX_PAGE) };
        let mut filter = Filter::default();
        filter.log(query);
        if let Some(c) = &query.cursor {
            filter.cursor(c);
        }
        let sql = format!(
            "SELECT ?fields FROM {} FINAL WHERE {} ORDER BY ts_ms DESC, request_id DESC LIMIT {}",
            self.table_in_query(),
            filter.sql(),
            limit + 1
        );
        let q = bind(self.read_query(&sql), filter.params);
        let mut rows = self.timed(self.read_timeout, q.fetch_all::<TraceRow>()).await?;
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(Cursor::after)
        } else {
            None
        };
        Ok(LogPage { rows, next_cursor })
    }

    async fn get(&self, request_id: &str) -> Result<Option<TraceRow>, StoreError> {
        let sql = format!("SELECT ?fields FROM {} FINAL WHERE request_id = ? LIMIT 1", self.table_in_query());
        let q = self.read_query(&sql).bind(request_id);
        self.timed(self.read_timeout, q.fetch_optional::<TraceRow>()).await
    }

    async fn owner(&self, project: &str, id: &str) -> Result<Option<String>, StoreError> {
        // A scan of one column on the rare lookup the gateway's memory cannot answer (a
        // restart, another node).
        let sql = format!(
            "SELECT provider FROM {} WHERE project = ? AND has(owned_ids, ?) AND provider != '' \
             ORDER BY ts_ms DESC LIMIT 1",
            self.table_in_query()
        );
        let q = self.read_query(&sql).bind(project).bind(id);
        self.timed(self.read_timeout, q.fetch_optional::<String>()).await
    }

    async fn report(&self, query: &ReportQuery) -> Result<Report, StoreError> {
        let filter = || {
            let mut f = Filter::default();
            f.time(Some(query.start_ms), Some(query.end_ms));
            f.log(&query.filter);
            f
        };
        let table = self.table_in_query();
        let gran = query.granularity.millis();

        // The SELECT list's placeholders come before the WHERE clause's.
        let mut select_params = vec![Param::U64(gran), Param::U64(gran)];
        let group = match &query.group_by {
            None => "''",
            Some(GroupBy::Model) => "model",
            Some(GroupBy::Provider) => "provider",
            Some(GroupBy::Project) => "project",
            Some(GroupBy::RoutingConfig) => "routing_config",
            Some(GroupBy::EndUser) => "end_user",
            Some(GroupBy::Tag(k)) => {
                select_params.push(Param::Str(k.clone()));
                select_params.push(Param::Str(k.clone()));
                // The first occurrence's value, as `TraceRow::tag`; '' without the key.
                "if(has(tag_keys, ?), tag_values[indexOf(tag_keys, ?)], '')"
            }
        };
        let series_filter = filter();
        let series_sql = format!(
            "SELECT toUInt64(intDiv(ts_ms, ?) * ?) AS bucket, {group} AS grp, {AGGREGATES}, {TTFB_AGGREGATES} \
             FROM {table} FINAL WHERE {} GROUP BY bucket, grp ORDER BY bucket, grp",
            series_filter.sql()
        );
        let series_q =
            bind(self.read_query(&series_sql), select_params.into_iter().chain(series_filter.params));
        let totals_filter = filter();
        let totals_sql = format!("SELECT {AGGREGATES} FROM {table} FINAL WHERE {}", totals_filter.sql());
        let totals_q = bind(self.read_query(&totals_sql), totals_filter.params);

        let rows = self.timed(self.read_timeout, series_q.fetch_all::<SeriesRow>()).await?;
        let totals = self.timed(self.read_timeout, totals_q.fetch_one::<TotalsRow>()).await?;

        let series = rows
            .into_iter()
            .map(|r| {
                let ttfb = |i| if r.ttfb_count == 0 { None } else { pick(&r.ttfb, i) };
                ReportRow {
                    bucket_ms: r.bucket,
                    group: query.group_by.as_ref().map(|_| r.grp.clone()),
                    requests: r.requests,
                    errors: r.errors,
                    cost_usd: round_cost(r.cost),
                    input_tokens: r.input,
                    output_tokens: r.output,
                    p50_latency_ms: pick(&r.latency, 0).unwrap_or(0.0),
                    p95_latency_ms: pick(&r.latency, 1).unwrap_or(0.0),
                    p99_latency_ms: pick(&r.latency, 2).unwrap_or(0.0),
                    p50_ttfb_ms: ttfb(0),
                    p95_ttfb_ms: ttfb(1),
                    p99_ttfb_ms: ttfb(2),
                }
            })
            .collect();
        let any = totals.requests > 0;
        let latency = |i| if any { pick(&totals.latency, i) } else { None };
        let totals = Totals {
            requests: totals.requests,
            errors: totals.errors,
            cost_usd: round_cost(totals.cost),
            input_tokens: totals.input,
            output_tokens: totals.output,
            error_rate: if any { totals.errors as f64 / totals.requests as f64 } else { 0.0 },
            p50_latency_ms: latency(0),
            p95_latency_ms: latency(1),
            p99_latency_ms: latency(2),
        };
        Ok(Report { series, totals })
    }

    async fn replay(&self, query: &ReplayQuery) -> Result<Vec<ReplayRow>, StoreError> {
        let mut filter = Filter::default();
        filter.log(&query.filters);
        filter.push(
            "(endsWith(endpoint, '/chat/completions') OR endsWith(endpoint, '/messages')) \
             AND model_requested != '' AND project != '' AND cache_hit = 0",
            [],
        );
        if !query.experiment_traffic {
            filter.push("NOT has(tag_keys, 'experiment')", []);
        }
        if !query.request_ids.is_empty() {
            let marks = vec!["?"; query.request_ids.len()].join(", ");
            filter.push(
                &format!("request_id IN ({marks})"),
                query.request_ids.iter().map(|id| Param::Str(id.clone())),
            );
        }
        if let Some(c) = &query.after {
            filter.push(
                "(ts_ms > ? OR (ts_ms = ? AND request_id > ?))",
                [Param::U64(c.ts_ms), Param::U64(c.ts_ms), Param::Str(c.request_id.clone())],
            );
            filter.push("ts >= toDateTime(?)", [Param::U64(seconds(c.ts_ms))]);
        }
        let (body, answer) = match query.bodies {
            Bodies::Skip => ("'' AS replay_body", "'' AS replay_answer"),
            Bodies::Presence => (
                "if(replay_body != '', 'x', '') AS replay_body",
                "if(replay_answer != '', 'x', '') AS replay_answer",
            ),
            Bodies::Full => ("replay_body", "replay_answer"),
        };
        let sql = format!(
            "SELECT {} FROM {} FINAL WHERE {} ORDER BY ts_ms ASC, request_id ASC LIMIT {}",
            replay::COLUMNS.replace("{body}", body).replace("{answer}", answer),
            self.table_in_query(),
            filter.sql(),
            query.limit.max(1)
        );
        let q = bind(self.read_query(&sql), filter.params);
        self.timed(self.read_timeout, q.fetch_all::<ReplayRow>()).await
    }

    /// A mutation (`ALTER TABLE … UPDATE`, ClickHouse 18.12 and later) over the days that
    /// may still hold bodies; ClickHouse runs it in the background.
    async fn expire_replay_bodies(&self, before_ms: u64) -> Result<u64, StoreError> {
        let before = seconds(before_ms);
        let condition = format!("ts < toDateTime({before}) AND replay_body != ''");
        // A mutation rewrites parts even where nothing matches: only start one when needed.
        let count_sql = format!("SELECT count() FROM {} FINAL WHERE {condition}", self.table_in_query());
        let pending = self.timed(self.read_timeout, self.read_query(&count_sql).fetch_one::<u64>()).await?;
        if pending > 0 {
            self.ddl(&format!(
                "ALTER TABLE {} UPDATE replay_body = '', replay_answer = '' WHERE {condition}",
                self.qualified
            ))
            .await?;
        }
        Ok(pending)
    }

    async fn prune(&self, before_ms: u64) -> Result<u64, StoreError> {
        let partitions = {
            let q = self
                .read_query(
                    "SELECT DISTINCT partition FROM system.parts \
                     WHERE database = ? AND table = ? AND active ORDER BY partition",
                )
                .bind(self.settings.database.as_str())
                .bind(self.settings.table.as_str());
            self.timed(self.read_timeout, q.fetch_all::<String>()).await?
        };
        // Partitions are UTC days (`toYYYYMMDD` of a `DateTime('UTC')`); YYYYMMDD numbers
        // order like the days. A day goes when it ends at or before the day of `before_ms`
        // begins.
        let cutoff = yyyymmdd(before_ms / 86_400_000);
        let mut dropped = 0;
        for p in partitions {
            let Ok(day) = p.trim_matches('\'').parse::<u32>() else { continue };
            if day >= cutoff {
                continue;
            }
            // `day` is a number parsed above: nothing from outside reaches the SQL text.
            self.ddl(&format!("ALTER TABLE {} DROP PARTITION {day}", self.qualified)).await?;
            dropped += 1;
        }
        Ok(dropped)
    }
}

/// The UTC date `YYYYMMDD` of a day number since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn yyyymmdd(days: u64) -> u32 {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    u32::try_from(y * 10_000 + m * 100 + d).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(yyyymmdd(0), 19700101);
        assert_eq!(yyyymmdd(1_763_700_000 / 86_400), 20251121);
        assert_eq!(yyyymmdd(11_016), 20000229);
        assert_eq!(yyyymmdd(11_017), 20000301);
    }

    #[test]
    fn codes_are_parsed_from_both_formats() {
        assert_eq!(error_code("Code: 60, e.displayText() = DB::Exception: Table x doesn't exist."), Some(60));
        assert_eq!(error_code("Code: 6. DB::Exception: Cannot parse string (CANNOT_PARSE_TEXT)"), Some(6));
        assert_eq!(error_code("502 Bad Gateway"), None);
    }

    #[test]
    fn classification() {
        let data = |m: &str| matches!(classify_response(m), StoreError::Data(_));
        assert!(data("Code: 117. DB::Exception: incorrect data"));
        assert!(data("Code: 53, e.displayText() = DB::Exception: Type mismatch"));
        assert!(!data("Code: 33, e.displayText() = DB::Exception: Cannot read all data"));
        assert!(!data("Code: 241. DB::Exception: Memory limit (total) exceeded"));
        assert!(!data("Code: 252. DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts"));
        assert!(data(
            "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)."
        ));
        assert!(!data("Code: 9999. DB::Exception: something new"));
        assert!(!data("503 Service Unavailable"));
        assert!(matches!(classify_error(ChError::TimedOut), StoreError::Transient(_)));
    }

    #[test]
    fn migration_statements() {
        let s = statements(MIGRATIONS[0].2, "d`b", "t");
        assert_eq!(s.len(), 1);
        assert!(s[0].starts_with("CREATE TABLE IF NOT EXISTS `d\\`b`.`t`"), "{}", s[0]);
        assert!(!s[0].contains("--"));
        let s = statements(SCHEMA_MIGRATIONS, "db", "t");
        assert_eq!(s.len(), 1);
        assert!(s[0].contains("`db`.schema_migrations"));
    }
}
