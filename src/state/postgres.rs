//! The PostgreSQL state store, for several gateway nodes sharing one management state. The
//! same tables and semantics as the embedded store (`sqlite.rs`): numbered migrations
//! (applied under an advisory lock, so nodes starting together apply each once), one
//! transaction per change, the version check in the `UPDATE` itself.
//!
//! The client and its connection live on a runtime of their own (one thread): management
//! calls never run on, or wait for, a thread the proxy needs.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, NoTls, Row};

use crate::spend::shared::NodeSpendRow;

use super::webhooks::{Attempt, AttemptResult, Delivery, DeliveryQuery, Event};
use super::{
    Actor, AuditEntry, AuditQuery, Change, ExperimentQuery, ExperimentRow, FileVersion, Idempotent, Kind,
    ListQuery, Op, StateError, StateStore, Stored, Version,
};

/// Entry `i` takes the schema from version `i` to `i + 1`; append only.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE revisions (
    revision   BIGSERIAL PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    action     TEXT   NOT NULL
);
CREATE TABLE resources (
    seq        BIGSERIAL PRIMARY KEY,
    kind       TEXT   NOT NULL,
    id         TEXT   NOT NULL UNIQUE,
    project    TEXT   NOT NULL,
    slug       TEXT   NOT NULL,
    body       TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    deleted_ms BIGINT
);
CREATE UNIQUE INDEX resources_live_slug ON resources (kind, project, slug) WHERE deleted_ms IS NULL;
CREATE TABLE resource_versions (
    id         TEXT    NOT NULL,
    version    BIGINT  NOT NULL,
    kind       TEXT    NOT NULL,
    revision   BIGINT  NOT NULL,
    body       TEXT    NOT NULL,
    deleted    BOOLEAN NOT NULL,
    actor_type TEXT    NOT NULL,
    actor_id   TEXT    NOT NULL,
    created_ms BIGINT  NOT NULL,
    PRIMARY KEY (id, version)
);
CREATE TABLE audit_log (
    seq           BIGSERIAL PRIMARY KEY,
    id            TEXT   NOT NULL UNIQUE,
    revision      BIGINT NOT NULL,
    created_ms    BIGINT NOT NULL,
    actor_type    TEXT   NOT NULL,
    actor_id      TEXT   NOT NULL,
    actor_label   TEXT   NOT NULL,
    action        TEXT   NOT NULL,
    resource_type TEXT   NOT NULL,
    resource_id   TEXT   NOT NULL,
    project       TEXT   NOT NULL,
    ip            TEXT   NOT NULL,
    user_agent    TEXT   NOT NULL,
    before        TEXT,
    after         TEXT
);
CREATE INDEX audit_log_resource ON audit_log (resource_type, resource_id);
CREATE TABLE idempotency (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    body        BYTEA   NOT NULL,
    created_ms  BIGINT  NOT NULL,
    PRIMARY KEY (scope, key)
);
",
    "
CREATE TABLE file_config_versions (
    slug       TEXT   NOT NULL PRIMARY KEY,
    definition TEXT   NOT NULL,
    version    BIGINT NOT NULL
);
",
    "
CREATE TABLE experiments (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT   NOT NULL UNIQUE,
    project     TEXT   NOT NULL,
    schedule_id TEXT   NOT NULL,
    status      TEXT   NOT NULL,
    body        TEXT   NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL
);
CREATE INDEX experiments_schedule ON experiments (schedule_id, seq);
CREATE TABLE experiment_decisions (
    experiment_id TEXT   NOT NULL,
    seq           BIGINT NOT NULL,
    body          TEXT   NOT NULL,
    PRIMARY KEY (experiment_id, seq)
);
",
    "
CREATE TABLE budget_spend_nodes (
    budget       TEXT   NOT NULL,
    instance     TEXT   NOT NULL,
    period_start BIGINT NOT NULL,
    node         TEXT   NOT NULL,
    period_end   BIGINT NOT NULL,
    spend_nanos  BIGINT NOT NULL,
    updated_ms   BIGINT NOT NULL,
    PRIMARY KEY (budget, instance, period_start, node)
);
",
    "
CREATE TABLE webhook_events (
    seq           BIGSERIAL PRIMARY KEY,
    id            TEXT   NOT NULL UNIQUE,
    type          TEXT   NOT NULL,
    dedup         TEXT   UNIQUE,
    only_endpoint TEXT,
    body          TEXT   NOT NULL,
    created_ms    BIGINT NOT NULL,
    dispatched    BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX webhook_events_undispatched ON webhook_events (dispatched, seq);
CREATE TABLE webhook_deliveries (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT   NOT NULL UNIQUE,
    event_id        TEXT   NOT NULL,
    endpoint_id     TEXT   NOT NULL,
    type            TEXT   NOT NULL,
    body            TEXT   NOT NULL,
    status          TEXT   NOT NULL,
    attempts        BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    deadline_ms     BIGINT NOT NULL,
    lease_owner     TEXT   NOT NULL DEFAULT '',
    lease_until_ms  BIGINT NOT NULL DEFAULT 0,
    backoff_from    BIGINT NOT NULL DEFAULT 0,
    last_status     BIGINT,
    last_error      TEXT,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_ms);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, seq);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
CREATE TABLE webhook_attempts (
    delivery_id      TEXT   NOT NULL,
    n                BIGINT NOT NULL,
    started_ms       BIGINT NOT NULL,
    duration_ms      BIGINT NOT NULL,
    status_code      BIGINT,
    error            TEXT,
    response_excerpt TEXT   NOT NULL,
    node             TEXT   NOT NULL,
    PRIMARY KEY (delivery_id, n)
);
",
];

/// The channel every commit notifies (payload: the new revision), so each node rebuilds
/// its snapshot within moments of a change made through any node.
pub const CHANGES_CHANNEL: &str = "modelux_state";

/// Serialises schema migrations across nodes (an arbitrary constant: "mlx" + 1).
const MIGRATION_LOCK: i64 = 0x6d6c_7801;
/// Serialises commits across nodes ("mlx" + 2).
const COMMIT_LOCK: i64 = 0x6d6c_7802;

pub struct PostgresState {
    client: Arc<tokio::sync::Mutex<Client>>,
    /// Runs the connection and every query (`None` only while dropping).
    runtime: Option<tokio::runtime::Runtime>,
}

fn db(e: tokio_postgres::Error) -> StateError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        return StateError::Conflict(e.to_string());
    }
    StateError::Unavailable(e.to_string())
}

impl PostgresState {
    /// Connects to `url`, applies the migrations the database lacks. Blocks the calling
    /// thread (start-up only).
    pub fn open(url: &str) -> Result<PostgresState, StateError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("modelux-state")
            .enable_all()
            .build()
            .map_err(|e| StateError::Unavailable(format!("state runtime: {e}")))?;
        let url = url.to_string();
        let client = blocking(&runtime, async move {
            let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await.map_err(|e| {
                StateError::Unavailable(format!(
                    "cannot connect to PostgreSQL: {}",
                    strip_password(&e.to_string())
                ))
            })?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::error!(error = %e, "PostgreSQL state connection ended");
                }
            });
            migrate(&mut client).await?;
            Ok(client)
        })?;
        Ok(PostgresState { client: Arc::new(tokio::sync::Mutex::new(client)), runtime: Some(runtime) })
    }

    /// Runs `f` with the client on the store's own runtime.
    async fn run<T, F>(&self, f: impl FnOnce(Arc<tokio::sync::Mutex<Client>>) -> F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StateError>> + Send + 'static,
    {
        let runtime =
            self.runtime.as_ref().ok_or_else(|| StateError::Unavailable("state store closed".into()))?;
        runtime
            .spawn(f(self.client.clone()))
            .await
            .map_err(|e| StateError::Unavailable(format!("state store task failed: {e}")))?
    }

    /// `load`, from a thread that may be inside another runtime (start-up).
    pub fn load_now(&self) -> Result<Vec<Stored>, StateError> {
        let runtime =
            self.runtime.as_ref().ok_or_else(|| StateError::Unavailable("state store closed".into()))?;
        let client = self.client.clone();
        blocking(runtime, async move { load_live(&*client.lock().await).await })
    }
}

/// Listens for committed changes on a connection of its own, sending each notified
/// revision to `changes`; returns (with the reason) when the connection ends or fails, for
/// the caller to reconnect. `listening` is told once `LISTEN` is in effect (changes
/// committed before that are the caller's to catch with a revision check).
pub async fn follow_changes(
    url: &str,
    changes: tokio::sync::mpsc::UnboundedSender<i64>,
    listening: tokio::sync::oneshot::Sender<()>,
) -> String {
    let (client, mut connection) = match tokio_postgres::connect(url, NoTls).await {
        Ok(c) => c,
        Err(e) => return strip_password(&e.to_string()),
    };
    // The connection delivers notifications only while polled: poll it here, alongside
    // the one statement this client sends.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {CHANGES_CHANNEL}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    use futures::StreamExt;
    let mut listened = false;
    let mut listening = Some(listening);
    loop {
        tokio::select! {
            r = &mut listen, if !listened => {
                if let Err(e) = r {
                    return strip_password(&e.to_string());
                }
                listened = true;
                if let Some(tx) = listening.take() {
                    let _ = tx.send(());
                }
            }
            m = messages.next() => match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if changes.send(n.payload().parse().unwrap_or(0)).is_err() {
                        return "the follower stopped".into();
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return strip_password(&e.to_string()),
                None => return "the connection closed".into(),
            },
        }
    }
}

/// Runs `fut` on `runtime` and waits for it on this thread, whatever runtime (if any) the
/// thread belongs to.
fn blocking<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T, StateError>> + Send + 'static,
) -> Result<T, StateError> {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| StateError::Unavailable("state store task failed".into()))?
}

/// Connection errors may quote the URL: never its password.
fn strip_password(message: &str) -> String {
    match (message.find("://"), message.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &message[..scheme], &message[at..]),
        _ => message.to_string(),
    }
}

async fn migrate(client: &mut Client) -> Result<(), StateError> {
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)")
        .await
        .map_err(db)?;
    let applied: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
        .await
        .map_err(db)?
        .get(0);
    let known = MIGRATIONS.len() as i64;
    if applied > known {
        return Err(StateError::Unavailable(format!(
            "state schema version {applied} is newer than this build's ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(sql).await.map_err(db)?;
        let now = (crate::spend::unix_now_us() / 1000) as i64;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
            &[&(i as i64 + 1), &now],
        )
        .await
        .map_err(db)?;
    }
    tx.commit().await.map_err(db)
}

const RESOURCE_COLUMNS: &str =
    "kind, id, project, slug, body, version, seq, created_ms, updated_ms, deleted_ms";

const EXPERIMENT_COLUMNS: &str = "id, project, schedule_id, status, body, seq, created_ms, updated_ms";

fn read_experiment(r: &Row) -> ExperimentRow {
    let body: String = r.get(4);
    ExperimentRow {
        id: r.get(0),
        project: r.get(1),
        schedule_id: r.get(2),
        status: r.get(3),
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
        seq: r.get(5),
        created_ms: r.get(6),
        updated_ms: r.get(7),
    }
}

fn read_resource(r: &Row) -> Result<Stored, StateError> {
    let bad = |e: String| StateError::Unavailable(format!("stored resource unreadable: {e}"));
    let kind: String = r.get(0);
    let body: String = r.get(4);
    Ok(Stored {
        kind: Kind::parse(&kind).ok_or_else(|| bad(format!("unknown kind {kind}")))?,
        id: r.get(1),
        project: r.get(2),
        slug: r.get(3),
        body: serde_json::from_str(&body).map_err(|e| bad(e.to_string()))?,
        version: r.get(5),
        seq: r.get(6),
        created_ms: r.get(7),
        updated_ms: r.get(8),
        deleted_ms: r.get(9),
    })
}

async fn load_live(client: &Client) -> Result<Vec<Stored>, StateError> {
    let sql = format!("SELECT {RESOURCE_COLUMNS} FROM resources WHERE deleted_ms IS NULL ORDER BY seq");
    client.query(&sql, &[]).await.map_err(db)?.iter().map(read_resource).collect()
}

/// Writes events to the outbox; one whose dedup key (or id) is there already is skipped.
async fn write_events(c: &impl GenericClient, events: &[Event]) -> Result<usize, StateError> {
    let mut new = 0;
    for e in events {
        new += c
            .execute(
                "INSERT INTO webhook_events (id, type, dedup, only_endpoint, body, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[&e.id, &e.event_type, &e.dedup, &e.only_endpoint, &e.body, &e.created_ms],
            )
            .await
            .map_err(db)?;
    }
    Ok(new as usize)
}

const DELIVERY_COLUMNS: &str =
    "seq, id, event_id, endpoint_id, type, body, status, attempts, next_attempt_ms, \
     deadline_ms, last_status, last_error, created_ms, updated_ms, backoff_from";

fn read_delivery(r: &Row) -> Delivery {
    Delivery {
        seq: r.get(0),
        id: r.get(1),
        event_id: r.get(2),
        endpoint_id: r.get(3),
        event_type: r.get(4),
        body: r.get(5),
        status: r.get(6),
        attempts: r.get(7),
        next_attempt_ms: r.get(8),
        deadline_ms: r.get(9),
        last_status: r.get(10),
        last_error: r.get(11),
        created_ms: r.get(12),
        updated_ms: r.get(13),
        backoff_from: r.get(14),
    }
}

async fn one_delivery(c: &impl GenericClient, id: &str) -> Result<Option<Delivery>, StateError> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id]).await.map_err(db)?.as_ref().map(read_delivery))
}

fn text(v: &Option<Value>) -> Option<String> {
    v.as_ref().map(Value::to_string)
}

async fn commit_changes(client: &mut Client, changes: &[Change]) -> Result<i64, StateError> {
    let Some(first) = changes.first() else { return Err(StateError::Conflict("nothing to change".into())) };
    let tx = client.transaction().await.map_err(db)?;
    // Commits one at a time across nodes, so revisions become visible in order: a node
    // that has seen revision n has seen every revision before it.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&COMMIT_LOCK]).await.map_err(db)?;
    let revision: i64 = tx
        .query_one(
            "INSERT INTO revisions (created_ms, action) VALUES ($1, $2) RETURNING revision",
            &[&first.now_ms, &first.action],
        )
        .await
        .map_err(db)?
        .get(0);
    for c in changes {
        let r = &c.resource;
        let body = r.body.to_string();
        let kind = r.kind.as_str();
        match c.op {
            Op::Create => {
                tx.execute(
                    "INSERT INTO resources (kind, id, project, slug, body, version, created_ms, updated_ms) \
                     VALUES ($1, $2, $3, $4, $5, 1, $6, $6)",
                    &[&kind, &r.id, &r.project, &r.slug, &body, &c.now_ms],
                )
                .await
                .map_err(|e| match db(e) {
                    StateError::Conflict(_) => {
                        StateError::Conflict(format!("{kind} \"{}\" already exists", r.slug))
                    }
                    other => other,
                })?;
            }
            Op::Update | Op::Delete => {
                let deleted = matches!(c.op, Op::Delete).then_some(c.now_ms);
                let base = c.base_version.unwrap_or(0);
                let changed = tx
                    .execute(
                        "UPDATE resources SET body = $1, slug = $2, version = $3, updated_ms = $4, deleted_ms = $5 \
                         WHERE id = $6 AND version = $7 AND deleted_ms IS NULL",
                        &[&body, &r.slug, &r.version, &c.now_ms, &deleted, &r.id, &base],
                    )
                    .await
                    .map_err(db)?;
                if changed == 0 {
                    return Err(StateError::Conflict(format!(
                        "{kind} {} was changed by another request; read it again and retry",
                        r.id
                    )));
                }
            }
        }
        let deleted = matches!(c.op, Op::Delete);
        tx.execute(
            "INSERT INTO resource_versions (id, version, kind, revision, body, deleted, actor_type, actor_id, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[&r.id, &r.version, &kind, &revision, &body, &deleted, &c.actor.kind, &c.actor.id, &c.now_ms],
        )
        .await
        .map_err(db)?;
        let audit_id = format!("aud_{}", uuid::Uuid::now_v7().simple());
        tx.execute(
            "INSERT INTO audit_log (id, revision, created_ms, actor_type, actor_id, actor_label, action, \
             resource_type, resource_id, project, ip, user_agent, before, after) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            &[
                &audit_id,
                &revision,
                &c.now_ms,
                &c.actor.kind,
                &c.actor.id,
                &c.actor.label,
                &c.action,
                &kind,
                &r.id,
                &r.project,
                &c.origin.ip,
                &c.origin.user_agent,
                &text(&c.before),
                &text(&c.after),
            ],
        )
        .await
        .map_err(db)?;
        if let Some(i) = &c.idempotent {
            let status = i32::from(i.status);
            tx.execute(
                "INSERT INTO idempotency (scope, key, fingerprint, status, body, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (scope, key) DO UPDATE SET \
                 fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status, body = EXCLUDED.body, \
                 created_ms = EXCLUDED.created_ms",
                &[&i.scope, &i.key, &i.fingerprint, &status, &i.body, &i.created_ms],
            )
            .await
            .map_err(db)?;
        }
    }
    for c in changes {
        write_events(&tx, &c.events).await?;
    }
    // Delivered to every listening node when (and only if) the transaction commits.
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &revision.to_string()]).await.map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(revision)
}

#[async_trait]
impl StateStore for PostgresState {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn load(&self) -> Result<Vec<Stored>, StateError> {
        self.run(|c| async move { load_live(&*c.lock().await).await }).await
    }

    async fn get(&self, kind: Kind, id_or_slug: &str, project: &str) -> Result<Option<Stored>, StateError> {
        let (key, project) = (id_or_slug.to_string(), project.to_string());
        self.run(|c| async move {
            let sql = format!(
                "SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = $1 AND (id = $2 OR (slug = $2 AND project = $3)) \
                 ORDER BY id = $2 DESC, deleted_ms IS NULL DESC, seq DESC LIMIT 1"
            );
            let rows = c.lock().await.query(&sql, &[&kind.as_str(), &key, &project]).await.map_err(db)?;
            rows.first().map(read_resource).transpose()
        })
        .await
    }

    async fn list(&self, kind: Kind, q: &ListQuery) -> Result<Vec<Stored>, StateError> {
        let q = q.clone();
        self.run(|c| async move {
            let sql = format!(
                "SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = $1 AND seq > $2 \
                 AND ($3::TEXT IS NULL OR project = $3) AND ($4 OR deleted_ms IS NULL) ORDER BY seq LIMIT $5"
            );
            let limit = q.limit as i64;
            let rows = c
                .lock()
                .await
                .query(
                    &sql,
                    &[&kind.as_str(), &q.after_seq.unwrap_or(0), &q.project, &q.include_deleted, &limit],
                )
                .await
                .map_err(db)?;
            rows.iter().map(read_resource).collect()
        })
        .await
    }

    fn file_versions_now(&self) -> Result<Vec<FileVersion>, StateError> {
        let runtime =
            self.runtime.as_ref().ok_or_else(|| StateError::Unavailable("state store closed".into()))?;
        let client = self.client.clone();
        blocking(runtime, async move {
            let rows = client
                .lock()
                .await
                .query("SELECT slug, definition, version FROM file_config_versions", &[])
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| FileVersion { slug: r.get(0), definition: r.get(1), version: r.get(2) })
                .collect())
        })
    }

    fn save_file_versions_now(&self, rows: &[FileVersion]) -> Result<(), StateError> {
        let runtime =
            self.runtime.as_ref().ok_or_else(|| StateError::Unavailable("state store closed".into()))?;
        let (client, rows) = (self.client.clone(), rows.to_vec());
        blocking(runtime, async move {
            let mut client = client.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            for r in &rows {
                tx.execute(
                    "INSERT INTO file_config_versions (slug, definition, version) VALUES ($1, $2, $3) \
                     ON CONFLICT (slug) DO UPDATE SET definition = EXCLUDED.definition, version = EXCLUDED.version",
                    &[&r.slug, &r.definition, &r.version],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    fn save_spend_now(&self, rows: &[NodeSpendRow]) -> Result<(), StateError> {
        let runtime =
            self.runtime.as_ref().ok_or_else(|| StateError::Unavailable("state store closed".into()))?;
        let (client, rows) = (self.client.clone(), rows.to_vec());
        blocking(runtime, async move {
            let mut client = client.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            let now = (crate::spend::unix_now_us() / 1000) as i64;
            for r in &rows {
                // Absolute figures that only grow: an older write never lowers a newer one.
                tx.execute(
                    "INSERT INTO budget_spend_nodes (budget, instance, period_start, node, period_end, spend_nanos, updated_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (budget, instance, period_start, node) DO UPDATE \
                     SET spend_nanos = GREATEST(budget_spend_nodes.spend_nanos, EXCLUDED.spend_nanos), \
                     period_end = EXCLUDED.period_end, updated_ms = EXCLUDED.updated_ms",
                    &[&r.budget, &r.instance, &r.period_start, &r.node, &r.period_end, &r.spend_nanos, &now],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    fn load_spend_now(&self, since: i64) -> Result<Vec<NodeSpendRow>, StateError> {
        let runtime =
            self.runtime.as_ref().ok_or_else(|| StateError::Unavailable("state store closed".into()))?;
        let client = self.client.clone();
        blocking(runtime, async move {
            let rows = client
                .lock()
                .await
                .query(
                    "SELECT budget, instance, period_start, period_end, node, spend_nanos FROM budget_spend_nodes \
                     WHERE period_start >= $1",
                    &[&since],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| NodeSpendRow {
                    budget: r.get(0),
                    instance: r.get(1),
                    period_start: r.get(2),
                    period_end: r.get(3),
                    node: r.get(4),
                    spend_nanos: r.get(5),
                })
                .collect())
        })
    }

    async fn revision(&self) -> Result<i64, StateError> {
        self.run(|client| async move {
            let row = client
                .lock()
                .await
                .query_one("SELECT COALESCE(MAX(revision), 0) FROM revisions", &[])
                .await
                .map_err(db)?;
            Ok(row.get(0))
        })
        .await
    }

    async fn versions(&self, id: &str) -> Result<Vec<Version>, StateError> {
        let id = id.to_string();
        self.run(|c| async move {
            let rows = c
                .lock()
                .await
                .query(
                    "SELECT version, revision, body, deleted, actor_type, actor_id, created_ms \
                     FROM resource_versions WHERE id = $1 ORDER BY version",
                    &[&id],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| Version {
                    version: r.get(0),
                    revision: r.get(1),
                    body: serde_json::from_str(r.get::<_, &str>(2)).unwrap_or(Value::Null),
                    deleted: r.get(3),
                    actor_kind: r.get(4),
                    actor_id: r.get(5),
                    created_ms: r.get(6),
                })
                .collect())
        })
        .await
    }

    async fn commit(&self, changes: &[Change]) -> Result<i64, StateError> {
        let changes = changes.to_vec();
        self.run(|c| async move { commit_changes(&mut *c.lock().await, &changes).await }).await
    }

    async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StateError> {
        let q = q.clone();
        self.run(|c| async move {
            let limit = q.limit as i64;
            let rows = c
                .lock()
                .await
                .query(
                    "SELECT seq, id, created_ms, actor_type, actor_id, actor_label, action, resource_type, \
                     resource_id, project, ip, user_agent, before, after FROM audit_log \
                     WHERE seq < $1 AND ($2::TEXT IS NULL OR resource_type = $2) AND ($3::TEXT IS NULL OR resource_id = $3) \
                     AND ($4::TEXT IS NULL OR action = $4) AND ($5::TEXT IS NULL OR actor_id = $5) \
                     AND ($6::BIGINT IS NULL OR created_ms >= $6) AND ($7::BIGINT IS NULL OR created_ms < $7) \
                     ORDER BY seq DESC LIMIT $8",
                    &[
                        &q.before_seq.unwrap_or(i64::MAX),
                        &q.resource_type,
                        &q.resource_id,
                        &q.action,
                        &q.actor_id,
                        &q.start_ms,
                        &q.end_ms,
                        &limit,
                    ],
                )
                .await
                .map_err(db)?;
            let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
            Ok(rows
                .iter()
                .map(|r| AuditEntry {
                    seq: r.get(0),
                    id: r.get(1),
                    created_ms: r.get(2),
                    actor: Actor { kind: r.get(3), id: r.get(4), label: r.get(5) },
                    action: r.get(6),
                    resource_type: r.get(7),
                    resource_id: r.get(8),
                    project: r.get(9),
                    ip: r.get(10),
                    user_agent: r.get(11),
                    before: json(r.get(12)),
                    after: json(r.get(13)),
                })
                .collect())
        })
        .await
    }

    async fn experiment(&self, id: &str) -> Result<Option<ExperimentRow>, StateError> {
        let id = id.to_string();
        self.run(|c| async move {
            let sql = format!("SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE id = $1");
            let rows = c.lock().await.query(&sql, &[&id]).await.map_err(db)?;
            Ok(rows.first().map(read_experiment))
        })
        .await
    }

    async fn experiments(&self, q: &ExperimentQuery) -> Result<Vec<ExperimentRow>, StateError> {
        let q = q.clone();
        self.run(|c| async move {
            let sql = format!(
                "SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE seq < $1 \
                 AND ($2::TEXT IS NULL OR project = $2) AND ($3::TEXT IS NULL OR schedule_id = $3) \
                 AND ($4::TEXT IS NULL OR status = $4) ORDER BY seq DESC LIMIT $5"
            );
            let limit = q.limit as i64;
            let rows = c
                .lock()
                .await
                .query(
                    &sql,
                    &[&q.before_seq.unwrap_or(i64::MAX), &q.project, &q.schedule_id, &q.status, &limit],
                )
                .await
                .map_err(db)?;
            Ok(rows.iter().map(read_experiment).collect())
        })
        .await
    }

    async fn delete_experiment(&self, id: &str) -> Result<bool, StateError> {
        let id = id.to_string();
        self.run(|c| async move {
            let mut client = c.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("DELETE FROM experiment_decisions WHERE experiment_id = $1", &[&id])
                .await
                .map_err(db)?;
            let n = tx.execute("DELETE FROM experiments WHERE id = $1", &[&id]).await.map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(n > 0)
        })
        .await
    }

    async fn prune_experiments(&self, before_ms: i64) -> Result<u64, StateError> {
        self.run(|c| async move {
            let mut client = c.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            let old = super::PRUNABLE_EXPERIMENTS.replace("{cut}", "$1");
            tx.execute(
                &format!("DELETE FROM experiment_decisions WHERE experiment_id IN ({old})"),
                &[&before_ms],
            )
            .await
            .map_err(db)?;
            let n = tx
                .execute(&format!("DELETE FROM experiments WHERE id IN ({old})"), &[&before_ms])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(n)
        })
        .await
    }

    async fn create_experiment(&self, row: &ExperimentRow) -> Result<bool, StateError> {
        let row = row.clone();
        self.run(|c| async move {
            let body = row.body.to_string();
            let n = c
                .lock()
                .await
                .execute(
                    "INSERT INTO experiments (id, project, schedule_id, status, body, created_ms, updated_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                    &[&row.id, &row.project, &row.schedule_id, &row.status, &body, &row.created_ms, &row.updated_ms],
                )
                .await
                .map_err(db)?;
            Ok(n == 1)
        })
        .await
    }

    async fn update_experiment_with(
        &self,
        row: &ExperimentRow,
        from: &[&str],
        events: &[Event],
    ) -> Result<bool, StateError> {
        let (row, events) = (row.clone(), events.to_vec());
        let condition = super::status_list(from);
        self.run(|c| async move {
            let body = row.body.to_string();
            let mut client = c.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            let n = tx
                .execute(
                    &format!("UPDATE experiments SET status = $2, body = $3, updated_ms = $4 WHERE id = $1 AND {condition}"),
                    &[&row.id, &row.status, &body, &row.updated_ms],
                )
                .await
                .map_err(db)?;
            if n == 1 {
                write_events(&tx, &events).await?;
            }
            tx.commit().await.map_err(db)?;
            Ok(n == 1)
        })
        .await
    }

    async fn enqueue_events(&self, events: &[Event]) -> Result<usize, StateError> {
        let events = events.to_vec();
        self.run(|c| async move { write_events(&*c.lock().await, &events).await }).await
    }

    async fn dispatch_events(&self, now_ms: i64, window_ms: i64, limit: usize) -> Result<usize, StateError> {
        self.run(|c| async move {
            let mut client = c.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            let limit = limit as i64;
            // SKIP LOCKED: nodes dispatching at once take different events.
            let events: Vec<Event> = tx
                .query(
                    "SELECT id, type, dedup, only_endpoint, body, created_ms FROM webhook_events \
                     WHERE NOT dispatched ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
                    &[&limit],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| Event {
                    id: r.get(0),
                    event_type: r.get(1),
                    dedup: r.get(2),
                    only_endpoint: r.get(3),
                    body: r.get(4),
                    created_ms: r.get(5),
                })
                .collect();
            if events.is_empty() {
                return Ok(0);
            }
            let sql = format!(
                "SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = $1 AND deleted_ms IS NULL ORDER BY seq"
            );
            let endpoints: Vec<Stored> = tx
                .query(&sql, &[&Kind::WebhookEndpoint.as_str()])
                .await
                .map_err(db)?
                .iter()
                .map(read_resource)
                .collect::<Result<_, _>>()?;
            for e in &events {
                for d in super::webhooks::fan_out(e, &endpoints, now_ms, window_ms) {
                    tx.execute(
                        "INSERT INTO webhook_deliveries (id, event_id, endpoint_id, type, body, status, attempts, \
                         next_attempt_ms, deadline_ms, created_ms, updated_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $9)",
                        &[
                            &d.id,
                            &d.event_id,
                            &d.endpoint_id,
                            &d.event_type,
                            &d.body,
                            &d.status,
                            &d.next_attempt_ms,
                            &d.deadline_ms,
                            &d.created_ms,
                        ],
                    )
                    .await
                    .map_err(db)?;
                }
                tx.execute("UPDATE webhook_events SET dispatched = TRUE WHERE id = $1", &[&e.id])
                    .await
                    .map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
            Ok(events.len())
        })
        .await
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StateError> {
        let owner = owner.to_string();
        self.run(|c| async move {
            let limit = limit as i64;
            let sql = format!(
                "UPDATE webhook_deliveries SET lease_owner = $1, lease_until_ms = $2 WHERE id IN ( \
                 SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_ms <= $3 \
                 AND lease_until_ms < $3 ORDER BY next_attempt_ms LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 RETURNING {DELIVERY_COLUMNS}"
            );
            let rows =
                c.lock().await.query(&sql, &[&owner, &lease_until_ms, &now_ms, &limit]).await.map_err(db)?;
            Ok(rows.iter().map(read_delivery).collect())
        })
        .await
    }

    async fn record_attempt(
        &self,
        id: &str,
        owner: &str,
        result: &AttemptResult,
    ) -> Result<bool, StateError> {
        let (id, owner, result) = (id.to_string(), owner.to_string(), result.clone());
        self.run(|c| async move {
            let mut client = c.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            let a = &result.attempt;
            let finished = a.started_ms + a.duration_ms;
            let n = tx
                .query_opt(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, status = $3, next_attempt_ms = $4, \
                     last_status = $5, last_error = $6, updated_ms = $7, lease_owner = '', lease_until_ms = 0 \
                     WHERE id = $1 AND lease_owner = $2 RETURNING attempts",
                    &[&id, &owner, &result.status, &result.next_attempt_ms, &a.status_code, &a.error, &finished],
                )
                .await
                .map_err(db)?
                .map(|r| r.get::<_, i64>(0));
            if let Some(n) = n {
                tx.execute(
                    "INSERT INTO webhook_attempts (delivery_id, n, started_ms, duration_ms, status_code, error, \
                     response_excerpt, node) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[&id, &n, &a.started_ms, &a.duration_ms, &a.status_code, &a.error, &a.response_excerpt, &a.node],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
            Ok(n.is_some())
        })
        .await
    }

    async fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<Delivery>, StateError> {
        let q = q.clone();
        self.run(|c| async move {
            let mut sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE seq < $1");
            let before = q.before_seq.unwrap_or(i64::MAX);
            let mut values: Vec<&(dyn ToSql + Sync)> = vec![&before];
            for (column, value) in [
                ("endpoint_id", &q.endpoint_id),
                ("status", &q.status),
                ("type", &q.event_type),
                ("event_id", &q.event_id),
            ] {
                if let Some(v) = value {
                    values.push(v);
                    sql.push_str(&format!(" AND {column} = ${}", values.len()));
                }
            }
            sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", q.limit));
            let rows = c.lock().await.query(&sql, &values).await.map_err(db)?;
            Ok(rows.iter().map(read_delivery).collect())
        })
        .await
    }

    async fn delivery(&self, id: &str) -> Result<Option<(Delivery, Vec<Attempt>)>, StateError> {
        let id = id.to_string();
        self.run(|c| async move {
            let client = c.lock().await;
            let Some(d) = one_delivery(&*client, &id).await? else { return Ok(None) };
            let attempts = client
                .query(
                    "SELECT n, started_ms, duration_ms, status_code, error, response_excerpt, node \
                     FROM webhook_attempts WHERE delivery_id = $1 ORDER BY n",
                    &[&id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| Attempt {
                    n: r.get(0),
                    started_ms: r.get(1),
                    duration_ms: r.get(2),
                    status_code: r.get(3),
                    error: r.get(4),
                    response_excerpt: r.get(5),
                    node: r.get(6),
                })
                .collect();
            Ok(Some((d, attempts)))
        })
        .await
    }

    async fn prune_webhooks(&self, before_ms: i64) -> Result<u64, StateError> {
        self.run(|c| async move {
            let mut client = c.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            tx.execute(
                "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries \
                 WHERE status IN ('delivered', 'failed') AND updated_ms < $1)",
                &[&before_ms],
            )
            .await
            .map_err(db)?;
            let n = tx
                .execute(
                    "DELETE FROM webhook_deliveries WHERE status IN ('delivered', 'failed') AND updated_ms < $1",
                    &[&before_ms],
                )
                .await
                .map_err(db)?;
            tx.execute("DELETE FROM webhook_events WHERE dispatched AND created_ms < $1", &[&before_ms])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(n)
        })
        .await
    }

    async fn replay_delivery(
        &self,
        id: &str,
        now_ms: i64,
        deadline_ms: i64,
    ) -> Result<Option<Delivery>, StateError> {
        let id = id.to_string();
        self.run(|c| async move {
            let client = c.lock().await;
            client
                .execute(
                    "UPDATE webhook_deliveries SET status = 'pending', next_attempt_ms = $2, deadline_ms = $3, \
                     updated_ms = $2 WHERE id = $1",
                    &[&id, &now_ms, &deadline_ms],
                )
                .await
                .map_err(db)?;
            one_delivery(&*client, &id).await
        })
        .await
    }

    async fn save_decisions(&self, id: &str, first: i64, rows: Vec<Value>) -> Result<(), StateError> {
        let id = id.to_string();
        self.run(|c| async move {
            let mut client = c.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            if first == 1 {
                tx.execute("DELETE FROM experiment_decisions WHERE experiment_id = $1", &[&id])
                    .await
                    .map_err(db)?;
            }
            // One statement per chunk (arrays unnested server-side), not one per row.
            for (n, chunk) in rows.chunks(1000).enumerate() {
                let start = first + (n * 1000) as i64;
                let seqs: Vec<i64> = (0..chunk.len() as i64).map(|i| start + i).collect();
                let bodies: Vec<String> = chunk.iter().map(Value::to_string).collect();
                tx.execute(
                    "INSERT INTO experiment_decisions (experiment_id, seq, body) \
                     SELECT $1, s, b FROM UNNEST($2::BIGINT[], $3::TEXT[]) AS u(s, b) \
                     ON CONFLICT (experiment_id, seq) DO UPDATE SET body = EXCLUDED.body",
                    &[&id, &seqs, &bodies],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
        .await
    }

    async fn decisions(&self, id: &str, after: i64, limit: usize) -> Result<Vec<(i64, Value)>, StateError> {
        let id = id.to_string();
        self.run(|c| async move {
            let limit = limit as i64;
            let rows = c
                .lock()
                .await
                .query(
                    "SELECT seq, body FROM experiment_decisions WHERE experiment_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3",
                    &[&id, &after, &limit],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let body: String = r.get(1);
                    (r.get(0), serde_json::from_str(&body).unwrap_or(Value::Null))
                })
                .collect())
        })
        .await
    }

    async fn idempotent(
        &self,
        scope: &str,
        key: &str,
        since_ms: i64,
    ) -> Result<Option<Idempotent>, StateError> {
        let (scope, key) = (scope.to_string(), key.to_string());
        self.run(|c| async move {
            let rows = c
                .lock()
                .await
                .query(
                    "SELECT scope, key, fingerprint, status, body, created_ms FROM idempotency \
                     WHERE scope = $1 AND key = $2 AND created_ms >= $3",
                    &[&scope, &key, &since_ms],
                )
                .await
                .map_err(db)?;
            Ok(rows.first().map(|r| Idempotent {
                scope: r.get(0),
                key: r.get(1),
                fingerprint: r.get(2),
                status: u16::try_from(r.get::<_, i32>(3)).unwrap_or(500),
                body: r.get(4),
                created_ms: r.get(5),
            }))
        })
        .await
    }
}

impl Drop for PostgresState {
    fn drop(&mut self) {
        // A plain drop blocks, which panics inside another runtime's context.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::strip_password;

    #[test]
    fn connection_errors_never_quote_a_password() {
        assert_eq!(strip_password("bad url postgres://u:secret@h:5/db"), "bad url postgres://…@h:5/db");
        assert_eq!(strip_password("refused"), "refused");
    }
}
