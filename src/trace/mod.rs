//! Decision traces: one record per request, handed off the request path through a bounded
//! channel (`sink`), batched by a background writer (`writer`) into a store: ClickHouse in
//! production (`clickhouse`), an embedded SQLite file by default (`embedded`). The logs
//! and analytics reads (`query`) run against either store and give the same answers.

pub mod clickhouse;
pub mod embedded;
pub mod owners;
pub mod query;
pub mod record;
pub mod render;
pub mod replay;
pub mod spill;
pub mod writer;

use async_trait::async_trait;

pub use query::{
    Cursor, Granularity, GroupBy, LogPage, LogQuery, Report, ReportQuery, ReportRow, StatusFilter, Totals,
};
pub use record::{TraceEvent, TraceRow};

/// Why a store refused a write or a read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable, overloaded or misconfigured: the same rows may succeed
    /// later, so they are retried and, while it lasts, spilled to disk.
    #[error("store unavailable: {0}")]
    Transient(String),
    /// The rows themselves were refused (a value the schema cannot hold): retrying cannot
    /// help, so they go to the dead-letter file.
    #[error("rows refused: {0}")]
    Data(String),
}

/// Where trace records live. Implementations must make `insert` idempotent per
/// `request_id`: writing a row again (a retry after a lost acknowledgement, a spill
/// replayed twice) never makes a request appear twice in any read.
#[async_trait]
pub trait TraceStore: Send + Sync {
    /// `clickhouse` or `embedded`, for logs and metrics.
    fn kind(&self) -> &'static str;
    /// Creates or migrates the schema; idempotent, run at start.
    async fn prepare(&self) -> Result<(), StoreError>;
    /// Writes rows in one batch, in order.
    async fn insert(&self, rows: &[TraceRow]) -> Result<(), StoreError>;
    /// `insert` of rows the caller keeps too (the writer holds its batch until the store
    /// took it): a store that must own its rows shares them instead of copying them.
    async fn insert_shared(&self, rows: std::sync::Arc<[TraceRow]>) -> Result<(), StoreError> {
        self.insert(&rows).await
    }
    /// Newest first: `ts_ms` descending, then `request_id` descending.
    async fn list(&self, query: &LogQuery) -> Result<LogPage, StoreError>;
    async fn get(&self, request_id: &str) -> Result<Option<TraceRow>, StoreError>;
    async fn report(&self, query: &ReportQuery) -> Result<Report, StoreError>;
    /// One page of the records replay reads, oldest first (`replay`).
    async fn replay(&self, query: &replay::ReplayQuery) -> Result<Vec<replay::ReplayRow>, StoreError>;
    /// Empties the replay bodies of records older than `before_ms`; how many.
    async fn expire_replay_bodies(&self, before_ms: u64) -> Result<u64, StoreError>;
    /// Drops records older than `before_ms` (and, for the embedded store, the oldest ones
    /// beyond its row cap). Returns how many rows (or partitions, for ClickHouse) went.
    async fn prune(&self, before_ms: u64) -> Result<u64, StoreError>;
    /// The provider that served the newest request in `project` whose answer created the
    /// provider-side `id` (a response, a file, a batch): where later calls naming it go.
    async fn owner(&self, project: &str, id: &str) -> Result<Option<String>, StoreError>;
}
