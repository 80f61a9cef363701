//! Spend control: what requests cost, budgets that block, downgrade or warn, and per-key
//! rate limits. Counters sit behind `counters::Counters`; this process's implementation
//! persists settled spend to the embedded store on a short interval and at shutdown.

pub mod budgets;
pub mod counters;
pub mod period;
pub mod shared;
pub mod store;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use counters::{Counters, LocalCounters, SpendRow};
use shared::{SeedSource, SharedCounters, SharedMetrics, SharedSettings, SpendRows};
use store::SpendStore;

/// Longest period (a month) in seconds, rounded up: counters older than this are history.
const LONGEST_PERIOD_S: i64 = 32 * 86_400;
/// Rows of finished periods are kept this long for reporting, then pruned.
const HISTORY_S: i64 = 400 * 86_400;
/// Finished periods' spend kept on disk at most (a row per budget, instance and period,
/// ~100 bytes): per-user budgets over many users would otherwise grow it without bound.
pub const MAX_HISTORY_ROWS: u64 = 1_000_000;

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub fn unix_now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Where this process's counters live.
enum Backend {
    /// In process, persisted to `store` (the embedded file).
    Local { counters: Arc<LocalCounters>, store: Option<SpendStore>, unsaved: Mutex<Vec<SpendRow>> },
    /// In Redis; this node's settled figures persisted to the state store.
    Shared { counters: Arc<SharedCounters>, rows: Arc<dyn SpendRows> },
}

/// The process's counters and their persistence.
pub struct Spend {
    pub counters: Arc<dyn Counters>,
    backend: Backend,
}

impl Spend {
    /// In-process counters persisted to `db` (`None`: memory only).
    pub fn open(db: Option<&Path>) -> Result<Spend, String> {
        let local = Arc::new(LocalCounters::new());
        let store = match db {
            Some(path) => {
                let store = SpendStore::open(path)?;
                local.restore(store.load(unix_now() - LONGEST_PERIOD_S)?);
                Some(store)
            }
            None => None,
        };
        Ok(Spend {
            counters: local.clone(),
            backend: Backend::Local { counters: local, store, unsaved: Mutex::new(Vec::new()) },
        })
    }

    /// Counters shared through Redis; this node's figures are written to (and its own and
    /// a re-seed's rows read from) `rows`. Blocks while connecting (start-up).
    pub fn open_shared(
        settings: SharedSettings,
        rows: Arc<dyn SpendRows>,
        metrics: SharedMetrics,
    ) -> Result<Spend, String> {
        let since = unix_now() - LONGEST_PERIOD_S;
        let own = rows.load(since).map_err(|e| format!("reading durable spend: {e}"))?;
        let source_rows = rows.clone();
        let source: SeedSource = Arc::new(move || source_rows.load(unix_now() - LONGEST_PERIOD_S));
        let shared = Arc::new(SharedCounters::open(settings, own, source, metrics)?);
        Ok(Spend { counters: shared.clone(), backend: Backend::Shared { counters: shared, rows } })
    }

    /// Writes settled spend to the store (blocking: call from a blocking context). Rows a
    /// failed write could not save are kept and retried with the next flush.
    pub fn flush(&self) -> Result<usize, String> {
        match &self.backend {
            Backend::Local { counters, store, unsaved } => {
                let Some(store) = store else { return Ok(0) };
                let mut unsaved = unsaved.lock().map_err(|_| "spend flush lock poisoned".to_string())?;
                let fresh = counters.dirty_rows();
                if fresh.is_empty() && unsaved.is_empty() {
                    return Ok(0);
                }
                // Values are absolute: a fresh row supersedes an unsaved one for the same counter.
                unsaved.retain(|old| {
                    !fresh.iter().any(|n| {
                        n.budget == old.budget
                            && n.instance == old.instance
                            && n.period_start == old.period_start
                    })
                });
                unsaved.extend(fresh);
                store.save(&unsaved, unix_now())?;
                let n = unsaved.len();
                unsaved.clear();
                Ok(n)
            }
            Backend::Shared { counters, rows: store } => {
                let rows = counters.dirty_rows();
                if rows.is_empty() {
                    return Ok(0);
                }
                if let Err(e) = store.save(&rows) {
                    counters.redirty(&rows);
                    return Err(e);
                }
                Ok(rows.len())
            }
        }
    }

    /// Before the process exits: shared counters send the settlements still waiting
    /// (blocking, at most `limit`). `false`: some releases did not reach Redis.
    pub fn settle_before_exit(&self, limit: std::time::Duration) -> bool {
        match &self.backend {
            Backend::Local { .. } => true,
            Backend::Shared { counters, .. } => counters.settle_before_exit(limit),
        }
    }

    /// Forgets finished periods in memory and old history on disk.
    pub fn prune(&self) -> Result<(), String> {
        let now = unix_now();
        match &self.backend {
            Backend::Local { counters, store, .. } => {
                counters.forget_before(now - LONGEST_PERIOD_S);
                if let Some(store) = store {
                    store.prune(now - HISTORY_S, now - LONGEST_PERIOD_S, MAX_HISTORY_ROWS)?;
                }
            }
            Backend::Shared { counters, .. } => counters.forget_before(now - LONGEST_PERIOD_S),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::counters::SpendKey;
    use super::*;

    #[test]
    fn spend_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("modelux.db");
        let start = period::Period::Daily.window(unix_now()).0;
        let key = SpendKey { budget: "b", instance: "", period_start: start };
        let spend = Spend::open(Some(&db)).unwrap();
        spend.counters.reserve(&key, 10, None).unwrap();
        spend.counters.settle(&key, 10, 3);
        assert_eq!(spend.flush().unwrap(), 1);
        assert_eq!(spend.flush().unwrap(), 0);
        drop(spend);
        let again = Spend::open(Some(&db)).unwrap();
        assert_eq!(again.counters.spend(&key).committed, 3);
        // A period that ended long ago is not loaded.
        let old = SpendKey { period_start: start - 40 * 86_400, ..key };
        assert_eq!(again.counters.spend(&old).committed, 0);
    }
}
