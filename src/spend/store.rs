//! Durable spend in an embedded SQLite file (`<data_dir>/modelux.db`), so budgets survive a
//! restart with no database to run. Only settled spend is written, as absolute values per
//! counter, so a write can be retried or repeated without double counting.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};

use super::counters::SpendRow;

pub struct SpendStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS budget_spend (
    budget       TEXT    NOT NULL,
    instance     TEXT    NOT NULL,
    period_start INTEGER NOT NULL,
    spend_nanos  INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (budget, instance, period_start)
);";

impl SpendStore {
    pub fn open(path: &Path) -> Result<SpendStore, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // WAL: the flusher's writes never block readers; NORMAL sync is durable across a
        // process crash (the OS still has the pages), which is what a flush interval allows.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| format!("{}: {e}", path.display()))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| format!("{}: {e}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
        conn.execute_batch(SCHEMA).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(SpendStore { conn: Mutex::new(conn) })
    }

    /// Counters of periods that started at or after `since` (Unix seconds).
    pub fn load(&self, since: i64) -> Result<Vec<SpendRow>, String> {
        let conn = self.conn.lock().map_err(|_| "spend store lock poisoned".to_string())?;
        let mut stmt = conn
            .prepare("SELECT budget, instance, period_start, spend_nanos FROM budget_spend WHERE period_start >= ?1")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map(params![since], |r| {
                Ok(SpendRow {
                    budget: r.get(0)?,
                    instance: r.get(1)?,
                    period_start: r.get(2)?,
                    committed: r.get(3)?,
                })
            })
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
    }

    /// Writes counters in one transaction.
    pub fn save(&self, rows: &[SpendRow], now: i64) -> Result<(), String> {
        let mut conn = self.conn.lock().map_err(|_| "spend store lock poisoned".to_string())?;
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO budget_spend (budget, instance, period_start, spend_nanos, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (budget, instance, period_start)
                     DO UPDATE SET spend_nanos = excluded.spend_nanos, updated_at = excluded.updated_at",
                )
                .map_err(|e| e.to_string())?;
            for r in rows {
                stmt.execute(params![r.budget, r.instance, r.period_start, r.committed, now])
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }

    /// Deletes counters of periods that started before `before`, then, while more than
    /// `max_rows` remain, the oldest of those that started before `live_since` (periods
    /// still running are never touched: their budgets are being enforced).
    pub fn prune(&self, before: i64, live_since: i64, max_rows: u64) -> Result<usize, String> {
        let conn = self.conn.lock().map_err(|_| "spend store lock poisoned".to_string())?;
        let mut deleted = conn
            .execute("DELETE FROM budget_spend WHERE period_start < ?1", params![before])
            .map_err(|e| e.to_string())?;
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM budget_spend", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        let excess = u64::try_from(rows).unwrap_or(0).saturating_sub(max_rows);
        if excess > 0 {
            deleted += conn
                .execute(
                    "DELETE FROM budget_spend WHERE rowid IN (SELECT rowid FROM budget_spend \
                     WHERE period_start < ?1 ORDER BY period_start LIMIT ?2)",
                    params![live_since, i64::try_from(excess).unwrap_or(i64::MAX)],
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(budget: &str, start: i64, committed: i64) -> SpendRow {
        SpendRow { budget: budget.into(), instance: "u".into(), period_start: start, committed }
    }

    #[test]
    fn saves_upserts_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/modelux.db");
        let store = SpendStore::open(&path).unwrap();
        store.save(&[row("a", 100, 5), row("b", 50, 7)], 1).unwrap();
        store.save(&[row("a", 100, 9)], 2).unwrap();
        drop(store);
        let store = SpendStore::open(&path).unwrap();
        let mut rows = store.load(0).unwrap();
        rows.sort_by(|x, y| x.budget.cmp(&y.budget));
        assert_eq!(rows, vec![row("a", 100, 9), row("b", 50, 7)]);
        assert_eq!(store.load(60).unwrap(), vec![row("a", 100, 9)]);
        assert_eq!(store.prune(60, 0, u64::MAX).unwrap(), 1);
        assert_eq!(store.load(0).unwrap().len(), 1);
    }

    #[test]
    fn history_is_capped_by_rows_without_touching_running_periods() {
        let dir = tempfile::tempdir().unwrap();
        let store = SpendStore::open(&dir.path().join("modelux.db")).unwrap();
        let rows: Vec<SpendRow> = (0..50).map(|i| row(&format!("b{i}"), 100 + i, 1)).collect();
        store.save(&rows, 1).unwrap();
        // Over a 10-row cap, only finished periods (started before 140) may go: 40 of them.
        assert_eq!(store.prune(0, 140, 10).unwrap(), 40);
        let left = store.load(0).unwrap();
        assert_eq!(left.len(), 10);
        assert!(left.iter().all(|r| r.period_start >= 140));
        // Nothing finished is left to go: running periods stay even over the cap.
        assert_eq!(store.prune(0, 140, 5).unwrap(), 0);
    }
}
