//! Durable management state: the resources created through the management API, each
//! version of them, the audit log and idempotency records. One trait, so the embedded SQLite
//! file and (for several nodes) PostgreSQL serve the same API.
//!
//! A resource is stored as the JSON body its API accepts (which mirrors its YAML entry),
//! plus the columns lists and lookups need. Every change is one transaction: a new revision,
//! the resource's new version (an append-only history row), its audit entry and, when the
//! caller sent `Idempotency-Key`, the stored answer.

pub mod postgres;
pub mod secrets;
pub mod sqlite;
pub mod webhooks;

use async_trait::async_trait;
use serde_json::Value;

/// What a resource is. The string form is `resource_type` in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Project,
    ApiKey,
    ManagementKey,
    RoutingConfig,
    Provider,
    Budget,
    ScheduledExperiment,
    WebhookEndpoint,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Project => "project",
            Kind::ApiKey => "api_key",
            Kind::ManagementKey => "management_key",
            Kind::RoutingConfig => "routing_config",
            Kind::Provider => "provider",
            Kind::Budget => "budget",
            Kind::ScheduledExperiment => "scheduled_experiment",
            Kind::WebhookEndpoint => "webhook_endpoint",
        }
    }

    /// Prefix of generated ids (`proj_…`).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Project => "proj_",
            Kind::ApiKey => "key_",
            Kind::ManagementKey => "mkey_",
            Kind::RoutingConfig => "rc_",
            Kind::Provider => "prov_",
            Kind::Budget => "bud_",
            Kind::ScheduledExperiment => "sched_",
            Kind::WebhookEndpoint => "whep_",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Project,
            Kind::ApiKey,
            Kind::ManagementKey,
            Kind::RoutingConfig,
            Kind::Provider,
            Kind::Budget,
            Kind::ScheduledExperiment,
            Kind::WebhookEndpoint,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One stored resource (its current version).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub kind: Kind,
    pub id: String,
    /// The owning project's slug; empty for resources outside a project.
    pub project: String,
    /// Unique per kind and project among live resources (keys: their name).
    pub slug: String,
    pub body: Value,
    /// 1 at create; +1 with every change.
    pub version: i64,
    /// Insertion order: lists are ordered and paged by it.
    pub seq: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Soft-deleted (projects) or revoked (keys).
    pub deleted_ms: Option<i64>,
}

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub version: i64,
    pub revision: i64,
    pub body: Value,
    /// The version that deleted (or revoked) the resource.
    pub deleted: bool,
    /// `type` and `id` of who made it.
    pub actor_kind: String,
    pub actor_id: String,
    pub created_ms: i64,
}

/// The version a routing config of the config file was last served at, with the
/// definition it had (so a restart keeps counting instead of starting again at 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVersion {
    pub slug: String,
    pub definition: String,
    pub version: i64,
}

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `management_key`, `system`.
    pub kind: String,
    pub id: String,
    pub label: String,
}

/// Where a change came from, for the audit log.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub ip: String,
    pub user_agent: String,
}

/// A stored answer to a mutation sent with `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotent {
    /// Keys are scoped per management key.
    pub scope: String,
    pub key: String,
    /// SHA-256 (hex) of method, path and body: the same key with another request is a
    /// conflict, not a replay.
    pub fingerprint: String,
    pub status: u16,
    pub body: Vec<u8>,
    pub created_ms: i64,
}

/// What a change does to its resource.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new resource; fails with `Conflict` if a live one of its kind, project and slug exists.
    Create,
    /// A new version of a live resource.
    Update,
    /// Soft delete: the resource leaves the snapshot; its rows stay.
    Delete,
}

/// One mutation, committed in one transaction.
#[derive(Debug, Clone)]
pub struct Change {
    pub op: Op,
    /// The resource as it is after the change (for `Delete`, as it was).
    pub resource: Stored,
    /// The version the change was computed from (`Update`, `Delete`): another change that
    /// committed in between makes this one a `Conflict`.
    pub base_version: Option<i64>,
    /// `project.created`, `api_key.revoked`, …
    pub action: String,
    pub actor: Actor,
    pub origin: Origin,
    /// Audit-log views, secrets already masked.
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub now_ms: i64,
    pub idempotent: Option<Idempotent>,
    /// Webhook events the change causes, written to the outbox in its transaction.
    pub events: Vec<webhooks::Event>,
}

/// One audit-log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub seq: i64,
    pub id: String,
    pub created_ms: i64,
    pub actor: Actor,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub project: String,
    pub ip: String,
    pub user_agent: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// Filters of `GET /audit-logs`; newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub action: Option<String>,
    pub actor_id: Option<String>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    /// Entries older than this `seq` (the cursor).
    pub before_seq: Option<i64>,
    pub limit: usize,
}

/// Filters of a resource list; oldest first.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub project: Option<String>,
    pub include_deleted: bool,
    /// Resources after this `seq` (the cursor).
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// One experiment (a replay run): its definition, progress and result as one document.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentRow {
    pub id: String,
    pub project: String,
    /// The schedule that started it; empty for a one-off run.
    pub schedule_id: String,
    /// `queued`, `running`, `completed`, `failed`, `cancelled`.
    pub status: String,
    pub body: Value,
    /// Insertion order (set by the store): lists are ordered and paged by it.
    pub seq: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Filters of an experiment list; newest first.
#[derive(Debug, Clone, Default)]
pub struct ExperimentQuery {
    pub project: Option<String>,
    pub schedule_id: Option<String>,
    pub status: Option<String>,
    /// Experiments before this `seq` (the cursor).
    pub before_seq: Option<i64>,
    pub limit: usize,
}

/// `status IN (…)` over the code's own status names (letters and `_` only).
pub fn status_list(from: &[&str]) -> String {
    let names: Vec<String> = from
        .iter()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(|s| format!("'{s}'"))
        .collect();
    if names.is_empty() {
        "status IN ('')".into()
    } else {
        format!("status IN ({})", names.join(", "))
    }
}

/// Finished experiments older than the cut, except each schedule's newest run.
pub const PRUNABLE_EXPERIMENTS: &str = "SELECT id FROM experiments e WHERE created_ms < {cut} \
     AND status IN ('completed', 'failed', 'cancelled') \
     AND NOT (schedule_id <> '' AND seq = (SELECT max(seq) FROM experiments x WHERE x.schedule_id = e.schedule_id))";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Another change got there first (a live duplicate, or a newer version).
    #[error("{0}")]
    Conflict(String),
    /// The store cannot be reached or failed; nothing was written.
    #[error("state store: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait StateStore: Send + Sync {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Every live (not deleted) resource, for building the snapshot.
    async fn load(&self) -> Result<Vec<Stored>, StateError>;

    /// A resource by id, or by slug within `project` (empty: outside a project), deleted
    /// ones included.
    async fn get(&self, kind: Kind, id_or_slug: &str, project: &str) -> Result<Option<Stored>, StateError>;

    async fn list(&self, kind: Kind, query: &ListQuery) -> Result<Vec<Stored>, StateError>;

    /// The recorded versions of the file's routing configs. Blocks (start-up, blocking pool).
    fn file_versions_now(&self) -> Result<Vec<FileVersion>, StateError>;

    /// Records the file's routing-config versions (replacing those of the same slugs).
    /// Blocks (start-up, blocking pool).
    fn save_file_versions_now(&self, rows: &[FileVersion]) -> Result<(), StateError>;

    /// Writes nodes' settled spend (absolute per node; a row never lowers a newer figure).
    /// Blocks (the spend flusher's blocking thread).
    fn save_spend_now(&self, rows: &[crate::spend::shared::NodeSpendRow]) -> Result<(), StateError>;

    /// Every node's settled spend of periods that started at or after `since`. Blocks.
    fn load_spend_now(&self, since: i64) -> Result<Vec<crate::spend::shared::NodeSpendRow>, StateError>;

    /// The latest committed revision (0 before any change): nodes compare it with the one
    /// their snapshot was built from.
    async fn revision(&self) -> Result<i64, StateError>;

    /// Every version of resource `id`, oldest first.
    async fn versions(&self, id: &str) -> Result<Vec<Version>, StateError>;

    /// Commits `changes` (one revision) whole or not at all. Returns the new revision.
    async fn commit(&self, changes: &[Change]) -> Result<i64, StateError>;

    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StateError>;

    /// Creates experiment `row.id` unless one with that id exists; whether it did.
    async fn create_experiment(&self, row: &ExperimentRow) -> Result<bool, StateError>;

    /// Writes `row`'s status, body and time only if the stored experiment's status is one of
    /// `from` (never re-creating a deleted one); whether it did. `from` holds the code's own
    /// status names.
    async fn update_experiment(&self, row: &ExperimentRow, from: &[&str]) -> Result<bool, StateError> {
        self.update_experiment_with(row, from, &[]).await
    }

    /// `update_experiment`, writing `events` to the webhook outbox in the same transaction
    /// (only if the experiment was written).
    async fn update_experiment_with(
        &self,
        row: &ExperimentRow,
        from: &[&str],
        events: &[webhooks::Event],
    ) -> Result<bool, StateError>;

    async fn experiment(&self, id: &str) -> Result<Option<ExperimentRow>, StateError>;

    async fn experiments(&self, query: &ExperimentQuery) -> Result<Vec<ExperimentRow>, StateError>;

    /// Removes an experiment and its decisions; whether it existed.
    async fn delete_experiment(&self, id: &str) -> Result<bool, StateError>;

    /// Deletes finished experiments (completed, failed, cancelled) created before
    /// `before_ms`, with their decisions; how many. The newest run of each schedule stays
    /// (the scheduler reads it to know the fire was run).
    async fn prune_experiments(&self, before_ms: i64) -> Result<u64, StateError>;

    /// Stores per-request decisions numbered from `first`; `first == 1` replaces all the
    /// experiment's earlier ones (a re-run).
    async fn save_decisions(&self, id: &str, first: i64, rows: Vec<Value>) -> Result<(), StateError>;

    /// Decisions numbered above `after`, in order, at most `limit`.
    async fn decisions(&self, id: &str, after: i64, limit: usize) -> Result<Vec<(i64, Value)>, StateError>;

    /// Writes events to the webhook outbox (one whose dedup key was written before is
    /// skipped); how many were new.
    async fn enqueue_events(&self, events: &[webhooks::Event]) -> Result<usize, StateError>;

    /// Turns up to `limit` undispatched events into one delivery per live endpoint
    /// subscribed to each (due at `now_ms`, given up after `window_ms`); how many events.
    async fn dispatch_events(&self, now_ms: i64, window_ms: i64, limit: usize) -> Result<usize, StateError>;

    /// Leases up to `limit` pending deliveries due at `now_ms` whose lease has run out to
    /// `owner`, until `lease_until_ms`: one node sends a delivery at a time.
    async fn claim_deliveries(
        &self,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<webhooks::Delivery>, StateError>;

    /// Records an attempt of delivery `id` and its new status, if `owner` still holds its
    /// lease; whether it did.
    async fn record_attempt(
        &self,
        id: &str,
        owner: &str,
        result: &webhooks::AttemptResult,
    ) -> Result<bool, StateError>;

    async fn deliveries(
        &self,
        query: &webhooks::DeliveryQuery,
    ) -> Result<Vec<webhooks::Delivery>, StateError>;

    /// A delivery with its attempts, oldest first.
    async fn delivery(
        &self,
        id: &str,
    ) -> Result<Option<(webhooks::Delivery, Vec<webhooks::Attempt>)>, StateError>;

    /// Makes delivery `id` pending again, due at `now_ms`, given up after `deadline_ms`, its
    /// backoff started over (its attempts so far are kept); the delivery after, or `None`.
    /// `Conflict` while an attempt holds its lease.
    async fn replay_delivery(
        &self,
        id: &str,
        now_ms: i64,
        deadline_ms: i64,
    ) -> Result<Option<webhooks::Delivery>, StateError>;

    /// Deletes finished deliveries (delivered, failed) last changed before `before_ms`, with
    /// their attempts, and dispatched events created before it; how many deliveries.
    async fn prune_webhooks(&self, before_ms: i64) -> Result<u64, StateError>;

    /// The stored answer for an idempotency key, if one younger than `since_ms` exists.
    async fn idempotent(
        &self,
        scope: &str,
        key: &str,
        since_ms: i64,
    ) -> Result<Option<Idempotent>, StateError>;
}

/// The state store as the durable home of nodes' settled spend (`spend::shared`).
pub struct SpendRowsIn(pub std::sync::Arc<dyn StateStore>);

impl crate::spend::shared::SpendRows for SpendRowsIn {
    fn save(&self, rows: &[crate::spend::shared::NodeSpendRow]) -> Result<(), String> {
        self.0.save_spend_now(rows).map_err(|e| e.to_string())
    }

    fn load(&self, since: i64) -> Result<Vec<crate::spend::shared::NodeSpendRow>, String> {
        self.0.load_spend_now(since).map_err(|e| e.to_string())
    }
}
