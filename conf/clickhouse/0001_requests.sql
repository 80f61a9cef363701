-- The trace table: one row per request (`src/trace/record.rs`, `TraceRow`). Column names
-- are its field names and types its RowBinary encoding: inserts name the columns but send
-- untyped RowBinary (18.16 has no RowBinaryWithNamesAndTypes), so a type changed here
-- must change there too.
--
-- Supported: ClickHouse 18.16 (Debian's package) through current. Hence only types and
-- clauses every version has: no DateTime64, Map, LowCardinality, TTL, codecs or skip
-- indexes. Attempts and tags are parallel arrays; "none" is '' or 0 so every column is
-- filterable without Nullable, except `ttfb_ms` whose absence must stay distinct from 0
-- for the percentiles.
--
-- * `ts DateTime('UTC')`: seconds, the partition and sort key. The explicit zone makes the
--   day partitions UTC days whatever the server's zone, matching the day buckets of the
--   reports and `prune`.
-- * ReplacingMergeTree: a retried or replayed row has the same sort key (project, ts,
--   request_id), so merges keep one copy and reads use FINAL to see one before merging.
-- * PARTITION BY day: retention drops whole partitions (no mutations).
-- * ORDER BY (project, ts, request_id): time-range reads, per project.
--
-- `{database}` and `{table}` are replaced by quoted identifiers before running.
-- Statements are separated by `;` and must stay idempotent (IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS {database}.{table}
(
    ts DateTime('UTC'),
    ts_ms UInt64,
    request_id String,
    project String,
    key_name String,
    surface String,
    endpoint String,
    model_requested String,
    resolution String,
    routing_config String,
    config_version UInt32,
    strategy String,
    ab_variant String,
    provider String,
    model String,
    status UInt16,
    error_code String,
    attempt_providers Array(String),
    attempt_models Array(String),
    attempt_statuses Array(String),
    attempt_http_statuses Array(UInt16),
    attempt_errors Array(String),
    attempt_ttfb_ms Array(Float64),
    attempt_duration_ms Array(Float64),
    input_tokens UInt64,
    output_tokens UInt64,
    cached_tokens UInt64,
    reasoning_tokens UInt64,
    cost_input Float64,
    cost_output Float64,
    cost_total Float64,
    latency_ms Float64,
    ttfb_ms Nullable(Float64),
    tag_keys Array(String),
    tag_values Array(String),
    end_user String,
    trace_id String,
    conversation_id String,
    budget_name String,
    budget_action String,
    streamed UInt8,
    bytes_in UInt64,
    bytes_out UInt64,
    decision_trace String,
    request_body String,
    response_body String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMMDD(ts)
ORDER BY (project, ts, request_id)
