//! The embedded state store: tables in `<data_dir>/modelux.db` (the file budget spend
//! already lives in). Migrations are numbered, applied at open in one transaction each and
//! recorded in `schema_migrations`; a file migrated by a newer build is refused.
//!
//! SQLite calls block, so each runs on the blocking pool of the caller's runtime (the
//! management service's, never the proxy's).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use serde_json::Value;

use crate::spend::shared::NodeSpendRow;

use super::webhooks::{Attempt, AttemptResult, Delivery, DeliveryQuery, Event, IN_FLIGHT};
use super::{
    Actor, AuditEntry, AuditQuery, Change, ExperimentQuery, ExperimentRow, FileVersion, Idempotent, Kind,
    ListQuery, Op, StateError, StateStore, Stored, Version,
};

/// Each entry is one schema version; entry `i` takes the schema from version `i` to `i + 1`.
/// Append only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE revisions (
    revision   INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms INTEGER NOT NULL,
    action     TEXT    NOT NULL
);
CREATE TABLE resources (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL,
    id         TEXT    NOT NULL UNIQUE,
    project    TEXT    NOT NULL,
    slug       TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    deleted_ms INTEGER
);
CREATE UNIQUE INDEX resources_live_slug ON resources (kind, project, slug) WHERE deleted_ms IS NULL;
CREATE TABLE resource_versions (
    id         TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    revision   INTEGER NOT NULL,
    body       TEXT    NOT NULL,
    deleted    INTEGER NOT NULL,
    actor_type TEXT    NOT NULL,
    actor_id   TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (id, version)
);
CREATE TABLE audit_log (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    revision      INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL,
    actor_type    TEXT    NOT NULL,
    actor_id      TEXT    NOT NULL,
    actor_label   TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    project       TEXT    NOT NULL,
    ip            TEXT    NOT NULL,
    user_agent    TEXT    NOT NULL,
    before        TEXT,
    after         TEXT
);
CREATE INDEX audit_log_resource ON audit_log (resource_type, resource_id);
CREATE TABLE idempotency (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
",
    "
CREATE TABLE file_config_versions (
    slug       TEXT    NOT NULL PRIMARY KEY,
    definition TEXT    NOT NULL,
    version    INTEGER NOT NULL
);
",
    "
CREATE TABLE experiments (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,
    project     TEXT    NOT NULL,
    schedule_id TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE INDEX experiments_schedule ON experiments (schedule_id, seq);
CREATE TABLE experiment_decisions (
    experiment_id TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    body          TEXT    NOT NULL,
    PRIMARY KEY (experiment_id, seq)
) WITHOUT ROWID;
",
    "
CREATE TABLE budget_spend_nodes (
    budget       TEXT    NOT NULL,
    instance     TEXT    NOT NULL,
    period_start INTEGER NOT NULL,
    node         TEXT    NOT NULL,
    period_end   INTEGER NOT NULL,
    spend_nanos  INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL,
    PRIMARY KEY (budget, instance, period_start, node)
) WITHOUT ROWID;
",
    "
CREATE TABLE webhook_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    type          TEXT    NOT NULL,
    dedup         TEXT    UNIQUE,
    only_endpoint TEXT,
    body          TEXT    NOT NULL,
    created_ms    INTEGER NOT NULL,
    dispatched    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX webhook_events_undispatched ON webhook_events (dispatched, seq);
CREATE TABLE webhook_deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    event_id        TEXT    NOT NULL,
    endpoint_id     TEXT    NOT NULL,
    type            TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    deadline_ms     INTEGER NOT NULL,
    lease_owner     TEXT    NOT NULL DEFAULT '',
    lease_until_ms  INTEGER NOT NULL DEFAULT 0,
    backoff_from    INTEGER NOT NULL DEFAULT 0,
    last_status     INTEGER,
    last_error      TEXT,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_ms);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, seq);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
CREATE TABLE webhook_attempts (
    delivery_id      TEXT    NOT NULL,
    n                INTEGER NOT NULL,
    started_ms       INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    status_code      INTEGER,
    error            TEXT,
    response_excerpt TEXT    NOT NULL,
    node             TEXT    NOT NULL,
    PRIMARY KEY (delivery_id, n)
) WITHOUT ROWID;
",
];

pub struct SqliteState {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteState {
    /// Opens (creating it and its directory if needed) the store at `path` and applies the
    /// migrations it lacks.
    pub fn open(path: &Path) -> Result<SqliteState, StateError> {
        let at = |e: StateError| StateError::Unavailable(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StateError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path).map_err(db).map_err(at)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db).map_err(at)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db).map_err(at)?;
        // A committed change must survive a power cut, not only a crash: FULL syncs the WAL
        // at every commit (management changes are few).
        conn.pragma_update(None, "synchronous", "FULL").map_err(db).map_err(at)?;
        migrate(&mut conn).map_err(at)?;
        Ok(SqliteState { conn: Arc::new(Mutex::new(conn)) })
    }

    /// `load`, on the calling thread (at start, before any runtime serves requests).
    pub fn load_now(&self) -> Result<Vec<Stored>, StateError> {
        load_live(&lock(&self.conn))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&mut lock(&conn)))
            .await
            .map_err(|e| StateError::Unavailable(format!("state store task failed: {e}")))?
    }
}

/// A panic while the lock was held rolled its transaction back: the connection is sound.
fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn db(e: rusqlite::Error) -> StateError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
            StateError::Conflict(e.to_string())
        }
        _ => StateError::Unavailable(e.to_string()),
    }
}

/// Applies the migrations the file lacks, each in its own transaction.
fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)",
    )
    .map_err(db)?;
    let applied: i64 = conn
        .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0))
        .map_err(db)?;
    let known = MIGRATIONS.len() as i64;
    if applied > known {
        return Err(StateError::Unavailable(format!(
            "state schema version {applied} is newer than this build's ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        tx.execute_batch(sql).map_err(db)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
            params![i as i64 + 1, crate::spend::unix_now_us() as i64 / 1000],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}

const RESOURCE_COLUMNS: &str =
    "kind, id, project, slug, body, version, seq, created_ms, updated_ms, deleted_ms";

fn read_resource(r: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    let kind: String = r.get(0)?;
    let body: String = r.get(4)?;
    let bad = |e: String| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into());
    Ok(Stored {
        kind: Kind::parse(&kind).ok_or_else(|| bad(format!("unknown resource kind {kind}")))?,
        id: r.get(1)?,
        project: r.get(2)?,
        slug: r.get(3)?,
        body: serde_json::from_str(&body).map_err(|e| bad(e.to_string()))?,
        version: r.get(5)?,
        seq: r.get(6)?,
        created_ms: r.get(7)?,
        updated_ms: r.get(8)?,
        deleted_ms: r.get(9)?,
    })
}

fn json_text(v: &Option<Value>) -> Option<String> {
    v.as_ref().map(Value::to_string)
}

fn parse_json(s: Option<String>) -> Option<Value> {
    s.and_then(|s| serde_json::from_str(&s).ok())
}

fn commit_changes(conn: &mut Connection, changes: &[Change]) -> Result<i64, StateError> {
    let Some(first) = changes.first() else { return Err(StateError::Conflict("nothing to change".into())) };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
    tx.execute(
        "INSERT INTO revisions (created_ms, action) VALUES (?1, ?2)",
        params![first.now_ms, first.action],
    )
    .map_err(db)?;
    let revision = tx.last_insert_rowid();
    for c in changes {
        write_change(&tx, revision, c)?;
        write_events(&tx, &c.events)?;
    }
    tx.commit().map_err(db)?;
    Ok(revision)
}

fn write_change(tx: &rusqlite::Transaction<'_>, revision: i64, c: &Change) -> Result<(), StateError> {
    let r = &c.resource;
    let body = r.body.to_string();
    match c.op {
        Op::Create => {
            tx.execute(
                "INSERT INTO resources (kind, id, project, slug, body, version, created_ms, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)",
                params![r.kind.as_str(), r.id, r.project, r.slug, body, c.now_ms],
            )
            .map_err(|e| match db(e) {
                StateError::Conflict(_) => {
                    StateError::Conflict(format!("{} \"{}\" already exists", r.kind.as_str(), r.slug))
                }
                other => other,
            })?;
        }
        Op::Update | Op::Delete => {
            let deleted = matches!(c.op, Op::Delete).then_some(c.now_ms);
            let changed = tx
                .execute(
                    "UPDATE resources SET body = ?1, slug = ?2, version = ?3, updated_ms = ?4, deleted_ms = ?5 \
                     WHERE id = ?6 AND version = ?7 AND deleted_ms IS NULL",
                    params![body, r.slug, r.version, c.now_ms, deleted, r.id, c.base_version.unwrap_or(0)],
                )
                .map_err(db)?;
            if changed == 0 {
                return Err(StateError::Conflict(format!(
                    "{} {} was changed by another request; read it again and retry",
                    r.kind.as_str(),
                    r.id
                )));
            }
        }
    }
    tx.execute(
        "INSERT INTO resource_versions (id, version, kind, revision, body, deleted, actor_type, actor_id, created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            r.id,
            r.version,
            r.kind.as_str(),
            revision,
            body,
            matches!(c.op, Op::Delete),
            c.actor.kind,
            c.actor.id,
            c.now_ms
        ],
    )
    .map_err(db)?;
    tx.execute(
        "INSERT INTO audit_log (id, revision, created_ms, actor_type, actor_id, actor_label, action, \
         resource_type, resource_id, project, ip, user_agent, before, after) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            format!("aud_{}", uuid::Uuid::now_v7().simple()),
            revision,
            c.now_ms,
            c.actor.kind,
            c.actor.id,
            c.actor.label,
            c.action,
            r.kind.as_str(),
            r.id,
            r.project,
            c.origin.ip,
            c.origin.user_agent,
            json_text(&c.before),
            json_text(&c.after),
        ],
    )
    .map_err(db)?;
    if let Some(i) = &c.idempotent {
        // An expired record under the same key is replaced.
        tx.execute(
            "INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, status, body, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![i.scope, i.key, i.fingerprint, i.status, i.body, i.created_ms],
        )
        .map_err(db)?;
    }
    Ok(())
}

/// Writes events to the outbox; one whose dedup key (or id) is there already is skipped.
fn write_events(tx: &rusqlite::Transaction<'_>, events: &[Event]) -> Result<usize, StateError> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO webhook_events (id, type, dedup, only_endpoint, body, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(db)?;
    let mut new = 0;
    for e in events {
        new += stmt
            .execute(params![e.id, e.event_type, e.dedup, e.only_endpoint, e.body, e.created_ms])
            .map_err(db)?;
    }
    Ok(new)
}

const DELIVERY_COLUMNS: &str =
    "seq, id, event_id, endpoint_id, type, body, status, attempts, next_attempt_ms, \
     deadline_ms, last_status, last_error, created_ms, updated_ms, backoff_from";

fn read_delivery(r: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        seq: r.get(0)?,
        id: r.get(1)?,
        event_id: r.get(2)?,
        endpoint_id: r.get(3)?,
        event_type: r.get(4)?,
        body: r.get(5)?,
        status: r.get(6)?,
        attempts: r.get(7)?,
        next_attempt_ms: r.get(8)?,
        deadline_ms: r.get(9)?,
        last_status: r.get(10)?,
        last_error: r.get(11)?,
        created_ms: r.get(12)?,
        updated_ms: r.get(13)?,
        backoff_from: r.get(14)?,
    })
}

fn one_delivery(conn: &Connection, id: &str) -> Result<Option<Delivery>, StateError> {
    conn.query_row(
        &format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?1"),
        [id],
        read_delivery,
    )
    .optional()
    .map_err(db)
}

fn load_live(conn: &Connection) -> Result<Vec<Stored>, StateError> {
    let sql = format!("SELECT {RESOURCE_COLUMNS} FROM resources WHERE deleted_ms IS NULL ORDER BY seq");
    let mut stmt = conn.prepare_cached(&sql).map_err(db)?;
    let rows = stmt.query_map([], read_resource).map_err(db)?;
    rows.collect::<Result<_, _>>().map_err(db)
}

fn list_resources(conn: &Connection, kind: Kind, q: &ListQuery) -> Result<Vec<Stored>, StateError> {
    let sql = format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = ?1 AND seq > ?2 \
         AND (?3 IS NULL OR project = ?3) AND (?4 OR deleted_ms IS NULL) ORDER BY seq LIMIT ?5"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(db)?;
    let rows = stmt
        .query_map(
            params![kind.as_str(), q.after_seq.unwrap_or(0), q.project, q.include_deleted, q.limit as i64],
            read_resource,
        )
        .map_err(db)?;
    rows.collect::<Result<_, _>>().map_err(db)
}

fn audit_entries(conn: &Connection, q: &AuditQuery) -> Result<Vec<AuditEntry>, StateError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, id, created_ms, actor_type, actor_id, actor_label, action, resource_type, \
             resource_id, project, ip, user_agent, before, after FROM audit_log \
             WHERE seq < ?1 AND (?2 IS NULL OR resource_type = ?2) AND (?3 IS NULL OR resource_id = ?3) \
             AND (?4 IS NULL OR action = ?4) AND (?5 IS NULL OR actor_id = ?5) \
             AND (?6 IS NULL OR created_ms >= ?6) AND (?7 IS NULL OR created_ms < ?7) \
             ORDER BY seq DESC LIMIT ?8",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(
            params![
                q.before_seq.unwrap_or(i64::MAX),
                q.resource_type,
                q.resource_id,
                q.action,
                q.actor_id,
                q.start_ms,
                q.end_ms,
                q.limit as i64
            ],
            |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    created_ms: r.get(2)?,
                    actor: Actor { kind: r.get(3)?, id: r.get(4)?, label: r.get(5)? },
                    action: r.get(6)?,
                    resource_type: r.get(7)?,
                    resource_id: r.get(8)?,
                    project: r.get(9)?,
                    ip: r.get(10)?,
                    user_agent: r.get(11)?,
                    before: parse_json(r.get(12)?),
                    after: parse_json(r.get(13)?),
                })
            },
        )
        .map_err(db)?;
    rows.collect::<Result<_, _>>().map_err(db)
}

const EXPERIMENT_COLUMNS: &str = "id, project, schedule_id, status, body, seq, created_ms, updated_ms";

fn read_experiment(r: &rusqlite::Row<'_>) -> rusqlite::Result<ExperimentRow> {
    let body: String = r.get(4)?;
    Ok(ExperimentRow {
        id: r.get(0)?,
        project: r.get(1)?,
        schedule_id: r.get(2)?,
        status: r.get(3)?,
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
        seq: r.get(5)?,
        created_ms: r.get(6)?,
        updated_ms: r.get(7)?,
    })
}

#[async_trait]
impl StateStore for SqliteState {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn load(&self) -> Result<Vec<Stored>, StateError> {
        self.run(|conn| load_live(conn)).await
    }

    async fn get(&self, kind: Kind, id_or_slug: &str, project: &str) -> Result<Option<Stored>, StateError> {
        let (key, project) = (id_or_slug.to_string(), project.to_string());
        self.run(move |conn| {
            // By id first; by slug, the live one (or else the newest deleted one).
            let sql = format!(
                "SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = ?1 AND \
                 (id = ?2 OR (slug = ?2 AND project = ?3)) \
                 ORDER BY id = ?2 DESC, deleted_ms IS NULL DESC, seq DESC LIMIT 1"
            );
            conn.query_row(&sql, params![kind.as_str(), key, project], read_resource).optional().map_err(db)
        })
        .await
    }

    async fn list(&self, kind: Kind, query: &ListQuery) -> Result<Vec<Stored>, StateError> {
        let query = query.clone();
        self.run(move |conn| list_resources(conn, kind, &query)).await
    }

    fn file_versions_now(&self) -> Result<Vec<FileVersion>, StateError> {
        let conn = lock(&self.conn);
        let mut stmt =
            conn.prepare_cached("SELECT slug, definition, version FROM file_config_versions").map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok(FileVersion { slug: r.get(0)?, definition: r.get(1)?, version: r.get(2)? }))
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    fn save_file_versions_now(&self, rows: &[FileVersion]) -> Result<(), StateError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        for r in rows {
            tx.execute(
                "INSERT INTO file_config_versions (slug, definition, version) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (slug) DO UPDATE SET definition = excluded.definition, version = excluded.version",
                params![r.slug, r.definition, r.version],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    fn save_spend_now(&self, rows: &[NodeSpendRow]) -> Result<(), StateError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let now = crate::spend::unix_now_us() as i64 / 1000;
        for r in rows {
            // Absolute figures that only grow: an older write never lowers a newer one.
            tx.execute(
                "INSERT INTO budget_spend_nodes (budget, instance, period_start, node, period_end, spend_nanos, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (budget, instance, period_start, node) DO UPDATE \
                 SET spend_nanos = MAX(spend_nanos, excluded.spend_nanos), period_end = excluded.period_end, updated_ms = excluded.updated_ms",
                params![r.budget, r.instance, r.period_start, r.node, r.period_end, r.spend_nanos, now],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    async fn revision(&self) -> Result<i64, StateError> {
        self.run(|conn| {
            conn.query_row("SELECT COALESCE(MAX(revision), 0) FROM revisions", [], |r| r.get(0)).map_err(db)
        })
        .await
    }

    fn load_spend_now(&self, since: i64) -> Result<Vec<NodeSpendRow>, StateError> {
        let conn = lock(&self.conn);
        let mut stmt = conn
            .prepare_cached(
                "SELECT budget, instance, period_start, period_end, node, spend_nanos FROM budget_spend_nodes WHERE period_start >= ?1",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![since], |r| {
                Ok(NodeSpendRow {
                    budget: r.get(0)?,
                    instance: r.get(1)?,
                    period_start: r.get(2)?,
                    period_end: r.get(3)?,
                    node: r.get(4)?,
                    spend_nanos: r.get(5)?,
                })
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    async fn versions(&self, id: &str) -> Result<Vec<Version>, StateError> {
        let id = id.to_string();
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT version, revision, body, deleted, actor_type, actor_id, created_ms \
                     FROM resource_versions WHERE id = ?1 ORDER BY version",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([id], |r| {
                    let body: String = r.get(2)?;
                    Ok(Version {
                        version: r.get(0)?,
                        revision: r.get(1)?,
                        body: serde_json::from_str(&body).unwrap_or(Value::Null),
                        deleted: r.get(3)?,
                        actor_kind: r.get(4)?,
                        actor_id: r.get(5)?,
                        created_ms: r.get(6)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }

    async fn commit(&self, changes: &[Change]) -> Result<i64, StateError> {
        let changes = changes.to_vec();
        self.run(move |conn| commit_changes(conn, &changes)).await
    }

    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StateError> {
        let query = query.clone();
        self.run(move |conn| audit_entries(conn, &query)).await
    }

    async fn experiment(&self, id: &str) -> Result<Option<ExperimentRow>, StateError> {
        let id = id.to_string();
        self.run(move |conn| {
            let sql = format!("SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE id = ?1");
            conn.query_row(&sql, [id], read_experiment).optional().map_err(db)
        })
        .await
    }

    async fn experiments(&self, q: &ExperimentQuery) -> Result<Vec<ExperimentRow>, StateError> {
        let q = q.clone();
        self.run(move |conn| {
            let sql = format!(
                "SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE seq < ?1 \
                 AND (?2 IS NULL OR project = ?2) AND (?3 IS NULL OR schedule_id = ?3) \
                 AND (?4 IS NULL OR status = ?4) ORDER BY seq DESC LIMIT ?5"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(db)?;
            let rows = stmt
                .query_map(
                    params![
                        q.before_seq.unwrap_or(i64::MAX),
                        q.project,
                        q.schedule_id,
                        q.status,
                        q.limit as i64
                    ],
                    read_experiment,
                )
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }

    async fn delete_experiment(&self, id: &str) -> Result<bool, StateError> {
        let id = id.to_string();
        self.run(move |conn| {
            let tx = conn.transaction().map_err(db)?;
            tx.execute("DELETE FROM experiment_decisions WHERE experiment_id = ?1", [&id]).map_err(db)?;
            let n = tx.execute("DELETE FROM experiments WHERE id = ?1", [&id]).map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(n > 0)
        })
        .await
    }

    async fn prune_experiments(&self, before_ms: i64) -> Result<u64, StateError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(db)?;
            let old = super::PRUNABLE_EXPERIMENTS.replace("{cut}", "?1");
            tx.execute(
                &format!("DELETE FROM experiment_decisions WHERE experiment_id IN ({old})"),
                [before_ms],
            )
            .map_err(db)?;
            let n = tx
                .execute(&format!("DELETE FROM experiments WHERE id IN ({old})"), [before_ms])
                .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(n as u64)
        })
        .await
    }

    async fn create_experiment(&self, row: &ExperimentRow) -> Result<bool, StateError> {
        let row = row.clone();
        self.run(move |conn| {
            let n = conn
                .execute(
                    "INSERT INTO experiments (id, project, schedule_id, status, body, created_ms, updated_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                    params![
                        row.id,
                        row.project,
                        row.schedule_id,
                        row.status,
                        row.body.to_string(),
                        row.created_ms,
                        row.updated_ms
                    ],
                )
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
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE experiments SET status = ?2, body = ?3, updated_ms = ?4 WHERE id = ?1 AND {condition}"
                    ),
                    params![row.id, row.status, row.body.to_string(), row.updated_ms],
                )
                .map_err(db)?;
            if n == 1 {
                write_events(&tx, &events)?;
            }
            tx.commit().map_err(db)?;
            Ok(n == 1)
        })
        .await
    }

    async fn enqueue_events(&self, events: &[Event]) -> Result<usize, StateError> {
        let events = events.to_vec();
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let n = write_events(&tx, &events)?;
            tx.commit().map_err(db)?;
            Ok(n)
        })
        .await
    }

    async fn dispatch_events(&self, now_ms: i64, window_ms: i64, limit: usize) -> Result<usize, StateError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let events: Vec<Event> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, type, dedup, only_endpoint, body, created_ms FROM webhook_events \
                         WHERE dispatched = 0 ORDER BY seq LIMIT ?1",
                    )
                    .map_err(db)?;
                let rows = stmt
                    .query_map([limit as i64], |r| {
                        Ok(Event {
                            id: r.get(0)?,
                            event_type: r.get(1)?,
                            dedup: r.get(2)?,
                            only_endpoint: r.get(3)?,
                            body: r.get(4)?,
                            created_ms: r.get(5)?,
                        })
                    })
                    .map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            if events.is_empty() {
                return Ok(0);
            }
            let endpoints = list_resources(
                &tx,
                Kind::WebhookEndpoint,
                &ListQuery { include_deleted: false, limit: i64::MAX as usize, ..Default::default() },
            )?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO webhook_deliveries (id, event_id, endpoint_id, type, body, status, attempts, \
                         next_attempt_ms, deadline_ms, created_ms, updated_ms) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?9)",
                    )
                    .map_err(db)?;
                let mut done =
                    tx.prepare_cached("UPDATE webhook_events SET dispatched = 1 WHERE id = ?1").map_err(db)?;
                for e in &events {
                    for d in super::webhooks::fan_out(e, &endpoints, now_ms, window_ms) {
                        insert
                            .execute(params![
                                d.id,
                                d.event_id,
                                d.endpoint_id,
                                d.event_type,
                                d.body,
                                d.status,
                                d.next_attempt_ms,
                                d.deadline_ms,
                                d.created_ms
                            ])
                            .map_err(db)?;
                    }
                    done.execute([&e.id]).map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
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
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            // Pending past their retry window (the gateway was down meanwhile): failed, not sent.
            tx.execute(
                "UPDATE webhook_deliveries SET status = 'failed', updated_ms = ?1 \
                 WHERE status = 'pending' AND deadline_ms < ?1 AND lease_until_ms < ?1",
                [now_ms],
            )
            .map_err(db)?;
            let due: Vec<Delivery> = {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE status = 'pending' \
                         AND next_attempt_ms <= ?1 AND lease_until_ms < ?1 ORDER BY next_attempt_ms LIMIT ?2"
                    ))
                    .map_err(db)?;
                let rows = stmt.query_map(params![now_ms, limit as i64], read_delivery).map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            {
                let mut lease = tx
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET lease_owner = ?2, lease_until_ms = ?3 WHERE id = ?1",
                    )
                    .map_err(db)?;
                for d in &due {
                    lease.execute(params![d.id, owner, lease_until_ms]).map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
            Ok(due)
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
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let a = &result.attempt;
            let n = tx
                .execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, status = ?3, next_attempt_ms = ?4, \
                     last_status = ?5, last_error = ?6, updated_ms = ?7, lease_owner = '', lease_until_ms = 0 \
                     WHERE id = ?1 AND lease_owner = ?2",
                    params![
                        id,
                        owner,
                        result.status,
                        result.next_attempt_ms,
                        a.status_code,
                        a.error,
                        a.started_ms + a.duration_ms
                    ],
                )
                .map_err(db)?;
            if n == 1 {
                tx.execute(
                    "INSERT INTO webhook_attempts (delivery_id, n, started_ms, duration_ms, status_code, error, \
                     response_excerpt, node) \
                     SELECT ?1, attempts, ?2, ?3, ?4, ?5, ?6, ?7 FROM webhook_deliveries WHERE id = ?1",
                    params![id, a.started_ms, a.duration_ms, a.status_code, a.error, a.response_excerpt, a.node],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(n == 1)
        })
        .await
    }

    async fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<Delivery>, StateError> {
        let q = q.clone();
        self.run(move |conn| {
            let mut sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE seq < ?1");
            let mut args: Vec<String> = Vec::new();
            for (column, value) in [
                ("endpoint_id", &q.endpoint_id),
                ("status", &q.status),
                ("type", &q.event_type),
                ("event_id", &q.event_id),
            ] {
                if let Some(v) = value {
                    args.push(v.clone());
                    sql.push_str(&format!(" AND {column} = ?{}", args.len() + 1));
                }
            }
            sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", q.limit));
            let mut stmt = conn.prepare(&sql).map_err(db)?;
            let mut values: Vec<&dyn rusqlite::ToSql> = Vec::new();
            let before = q.before_seq.unwrap_or(i64::MAX);
            values.push(&before);
            for a in &args {
                values.push(a);
            }
            let rows = stmt.query_map(values.as_slice(), read_delivery).map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
        .await
    }

    async fn delivery(&self, id: &str) -> Result<Option<(Delivery, Vec<Attempt>)>, StateError> {
        let id = id.to_string();
        self.run(move |conn| {
            let Some(d) = one_delivery(conn, &id)? else { return Ok(None) };
            let mut stmt = conn
                .prepare_cached(
                    "SELECT n, started_ms, duration_ms, status_code, error, response_excerpt, node \
                     FROM webhook_attempts WHERE delivery_id = ?1 ORDER BY n",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([&id], |r| {
                    Ok(Attempt {
                        n: r.get(0)?,
                        started_ms: r.get(1)?,
                        duration_ms: r.get(2)?,
                        status_code: r.get(3)?,
                        error: r.get(4)?,
                        response_excerpt: r.get(5)?,
                        node: r.get(6)?,
                    })
                })
                .map_err(db)?;
            let attempts = rows.collect::<Result<_, _>>().map_err(db)?;
            Ok(Some((d, attempts)))
        })
        .await
    }

    async fn prune_webhooks(&self, before_ms: i64) -> Result<u64, StateError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            tx.execute(
                "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries \
                 WHERE status IN ('delivered', 'failed') AND updated_ms < ?1)",
                [before_ms],
            )
            .map_err(db)?;
            let n = tx
                .execute(
                    "DELETE FROM webhook_deliveries WHERE status IN ('delivered', 'failed') AND updated_ms < ?1",
                    [before_ms],
                )
                .map_err(db)?;
            tx.execute("DELETE FROM webhook_events WHERE dispatched = 1 AND created_ms < ?1", [before_ms])
                .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(n as u64)
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
        self.run(move |conn| {
            let n = conn
                .execute(
                    "UPDATE webhook_deliveries SET status = 'pending', next_attempt_ms = ?2, deadline_ms = ?3, \
                     updated_ms = ?2, backoff_from = attempts WHERE id = ?1 AND lease_until_ms < ?2",
                    params![id, now_ms, deadline_ms],
                )
                .map_err(db)?;
            match one_delivery(conn, &id)? {
                Some(_) if n == 0 => Err(StateError::Conflict(IN_FLIGHT.into())),
                found => Ok(found),
            }
        })
        .await
    }

    async fn save_decisions(&self, id: &str, first: i64, rows: Vec<Value>) -> Result<(), StateError> {
        let id = id.to_string();
        self.run(move |conn| {
            let tx = conn.transaction().map_err(db)?;
            if first == 1 {
                tx.execute("DELETE FROM experiment_decisions WHERE experiment_id = ?1", [&id]).map_err(db)?;
            }
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO experiment_decisions (experiment_id, seq, body) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(db)?;
                for (i, row) in rows.iter().enumerate() {
                    stmt.execute(params![id, first + i as i64, row.to_string()]).map_err(db)?;
                }
            }
            tx.commit().map_err(db)
        })
        .await
    }

    async fn decisions(&self, id: &str, after: i64, limit: usize) -> Result<Vec<(i64, Value)>, StateError> {
        let id = id.to_string();
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, body FROM experiment_decisions WHERE experiment_id = ?1 AND seq > ?2 \
                     ORDER BY seq LIMIT ?3",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![id, after, limit as i64], |r| {
                    let body: String = r.get(1)?;
                    Ok((r.get(0)?, serde_json::from_str(&body).unwrap_or(Value::Null)))
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
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
        self.run(move |conn| {
            conn.query_row(
                "SELECT scope, key, fingerprint, status, body, created_ms FROM idempotency \
                 WHERE scope = ?1 AND key = ?2 AND created_ms >= ?3",
                params![scope, key, since_ms],
                |r| {
                    Ok(Idempotent {
                        scope: r.get(0)?,
                        key: r.get(1)?,
                        fingerprint: r.get(2)?,
                        status: r.get(3)?,
                        body: r.get(4)?,
                        created_ms: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(db)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ExperimentQuery, ExperimentRow, Origin};
    use serde_json::json;

    fn change(op: Op, id: &str, slug: &str, version: i64, base: Option<i64>) -> Change {
        Change {
            op,
            resource: Stored {
                kind: Kind::Project,
                id: id.into(),
                project: String::new(),
                slug: slug.into(),
                body: json!({"name": slug}),
                version,
                seq: 0,
                created_ms: 0,
                updated_ms: 0,
                deleted_ms: None,
            },
            base_version: base,
            action: "project.created".into(),
            actor: Actor { kind: "management_key".into(), id: "admin".into(), label: "admin".into() },
            origin: Origin::default(),
            before: None,
            after: Some(json!({"name": slug})),
            now_ms: 1_000,
            idempotent: None,
            events: Vec::new(),
        }
    }

    #[tokio::test]
    async fn outbox_events_are_deduplicated_leased_once_expired_replayed_and_pruned() {
        use crate::state::webhooks::{Attempt, AttemptResult, DeliveryQuery, Event};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteState::open(&dir.path().join("modelux.db")).unwrap();
        let mut endpoint = change(Op::Create, "whep_1", "whep_1", 1, None);
        endpoint.resource.kind = Kind::WebhookEndpoint;
        endpoint.resource.body = json!({"url": "http://127.0.0.1:9/x", "event_types": ["budget.exceeded"]});
        // The event is written with the change that causes it.
        endpoint.events =
            vec![Event { dedup: Some("k".into()), ..Event::new("budget.exceeded", "o", json!({}), 1_000) }];
        store.commit(&[endpoint]).await.unwrap();
        let twice = Event { dedup: Some("k".into()), ..Event::new("budget.exceeded", "o", json!({}), 1_100) };
        assert_eq!(store.enqueue_events(&[twice]).await.unwrap(), 0, "same dedup key: written once");
        assert_eq!(store.dispatch_events(2_000, 10_000, 10).await.unwrap(), 1);
        assert_eq!(store.dispatch_events(2_000, 10_000, 10).await.unwrap(), 0);
        let first = store.claim_deliveries("a", 2_000, 5_000, 10).await.unwrap();
        assert_eq!(first.len(), 1);
        let id = first[0].id.clone();
        assert!(store.claim_deliveries("b", 3_000, 6_000, 10).await.unwrap().is_empty(), "leased to a");
        assert!(
            matches!(store.replay_delivery(&id, 3_000, 20_000).await, Err(StateError::Conflict(_))),
            "no replay while an attempt is in flight"
        );
        let attempt = |node: &str| AttemptResult {
            attempt: Attempt {
                n: 1,
                started_ms: 3_000,
                duration_ms: 5,
                status_code: Some(500),
                error: None,
                response_excerpt: "no".into(),
                node: node.into(),
            },
            status: "pending",
            next_attempt_ms: 4_000,
        };
        assert!(!store.record_attempt(&id, "b", &attempt("b")).await.unwrap(), "b holds no lease");
        assert!(store.record_attempt(&id, "a", &attempt("a")).await.unwrap());
        // Past its window while nobody sent it: failed at the next claim, not sent.
        assert!(store.claim_deliveries("b", 13_000, 16_000, 10).await.unwrap().is_empty());
        let (d, attempts) = store.delivery(&id).await.unwrap().unwrap();
        assert_eq!((d.status.as_str(), d.attempts, attempts.len()), ("failed", 1, 1));
        let replayed = store.replay_delivery(&id, 14_000, 30_000).await.unwrap().unwrap();
        assert_eq!(
            (replayed.status.as_str(), replayed.backoff_from, replayed.deadline_ms),
            ("pending", 1, 30_000)
        );
        let q = DeliveryQuery { status: Some("pending".into()), limit: 10, ..Default::default() };
        assert_eq!(store.deliveries(&q).await.unwrap().len(), 1);
        assert_eq!(store.prune_webhooks(i64::MAX).await.unwrap(), 0, "pending deliveries are kept");
        assert_eq!(store.claim_deliveries("b", 14_000, 16_000, 10).await.unwrap().len(), 1);
        let done = AttemptResult { status: "delivered", ..attempt("b") };
        assert!(store.record_attempt(&id, "b", &done).await.unwrap());
        assert_eq!(store.prune_webhooks(i64::MAX).await.unwrap(), 1);
        assert!(store.delivery(&id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn experiments_page_and_finished_ones_are_pruned_with_their_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteState::open(&dir.path().join("modelux.db")).unwrap();
        let row = |id: &str, status: &str, created_ms: i64| ExperimentRow {
            id: id.into(),
            project: "default".into(),
            schedule_id: String::new(),
            status: status.into(),
            body: json!({ "id": id }),
            seq: 0,
            created_ms,
            updated_ms: created_ms,
        };
        for (id, status, at) in [
            ("old-done", "completed", 1_000),
            ("old-running", "running", 1_000),
            ("old-failed", "failed", 2_000),
            ("new", "completed", 9_000),
        ] {
            assert!(store.create_experiment(&row(id, status, at)).await.unwrap());
            store.save_decisions(id, 1, vec![json!({"n": 1}), json!({"n": 2})]).await.unwrap();
        }
        // Updating keeps the row's place (seq) and updates it.
        let seq = store.experiment("old-done").await.unwrap().unwrap().seq;
        assert!(store.update_experiment(&row("old-done", "completed", 1_000), &["completed"]).await.unwrap());
        let all = store.experiments(&ExperimentQuery { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["new", "old-failed", "old-running", "old-done"]
        );
        assert_eq!(all[3].seq, seq);
        let page = store
            .experiments(&ExperimentQuery { limit: 2, before_seq: Some(all[1].seq), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["old-running", "old-done"]);
        assert_eq!(store.decisions("old-done", 1, 10).await.unwrap(), vec![(2, json!({"n": 2}))]);

        assert_eq!(store.prune_experiments(5_000).await.unwrap(), 2);
        let left = store.experiments(&ExperimentQuery { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(left.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["new", "old-running"]);
        assert!(store.decisions("old-done", 0, 10).await.unwrap().is_empty());
        assert_eq!(store.decisions("new", 0, 10).await.unwrap().len(), 2);
        assert!(store.delete_experiment("new").await.unwrap());
        assert!(!store.delete_experiment("new").await.unwrap());
        assert!(store.decisions("new", 0, 10).await.unwrap().is_empty());

        // Writes conditional on the status: a cancelled run is not completed over, a
        // deleted one is not brought back; a second create of one id is refused.
        assert!(store.create_experiment(&row("run", "running", 9_500)).await.unwrap());
        assert!(!store.create_experiment(&row("run", "queued", 9_500)).await.unwrap());
        assert!(store
            .update_experiment(&row("run", "cancelled", 9_500), &["queued", "running"])
            .await
            .unwrap());
        assert!(!store.update_experiment(&row("run", "completed", 9_500), &["running"]).await.unwrap());
        assert_eq!(store.experiment("run").await.unwrap().unwrap().status, "cancelled");
        assert!(store.delete_experiment("run").await.unwrap());
        assert!(!store.update_experiment(&row("run", "completed", 9_500), &["running"]).await.unwrap());
        assert_eq!(store.experiment("run").await.unwrap(), None);
        // A schedule's newest run outlives retention (the scheduler reads it).
        let mut a = row("s-1", "completed", 100);
        a.schedule_id = "sched_x".into();
        let mut b = row("s-2", "completed", 200);
        b.schedule_id = "sched_x".into();
        store.create_experiment(&a).await.unwrap();
        store.create_experiment(&b).await.unwrap();
        assert_eq!(store.prune_experiments(10_000).await.unwrap(), 1);
        assert!(store.experiment("s-2").await.unwrap().is_some());
        // Decisions of a re-run replace the earlier ones.
        store.save_decisions("s-2", 1, vec![json!(1), json!(2), json!(3)]).await.unwrap();
        store.save_decisions("s-2", 1, vec![json!(9)]).await.unwrap();
        assert_eq!(store.decisions("s-2", 0, 10).await.unwrap(), vec![(1, json!(9))]);
    }

    #[tokio::test]
    async fn versions_conflicts_and_migrations_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("modelux.db");
        let s = SqliteState::open(&path).unwrap();
        s.commit(&[change(Op::Create, "proj_1", "alpha", 1, None)]).await.unwrap();
        // A live duplicate slug is a conflict, and nothing of it is written.
        let dup = s.commit(&[change(Op::Create, "proj_2", "alpha", 1, None)]).await;
        assert!(matches!(dup, Err(StateError::Conflict(_))), "{dup:?}");
        s.commit(&[change(Op::Update, "proj_1", "alpha", 2, Some(1))]).await.unwrap();
        // A change computed from version 1 lost the race.
        let stale = s.commit(&[change(Op::Update, "proj_1", "alpha", 2, Some(1))]).await;
        assert!(matches!(stale, Err(StateError::Conflict(_))), "{stale:?}");
        s.commit(&[change(Op::Delete, "proj_1", "alpha", 3, Some(2))]).await.unwrap();
        // The slug is free again once the first is deleted.
        s.commit(&[change(Op::Create, "proj_3", "alpha", 1, None)]).await.unwrap();
        drop(s);
        let s = SqliteState::open(&path).unwrap();
        let live = s.load().await.unwrap();
        assert_eq!(live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["proj_3"]);
        let old = s.get(Kind::Project, "proj_1", "").await.unwrap().unwrap();
        assert_eq!((old.version, old.deleted_ms.is_some()), (3, true));
        let by_slug = s.get(Kind::Project, "alpha", "").await.unwrap().unwrap();
        assert_eq!(by_slug.id, "proj_3");
        let audit = s.audit(&AuditQuery { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(audit.len(), 4, "failed changes leave no audit entry");
        assert_eq!(audit[0].resource_id, "proj_3");
        let versions: i64 = lock(&s.conn)
            .query_row("SELECT COUNT(*) FROM resource_versions WHERE id = 'proj_1'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(versions, 3);
    }
}
