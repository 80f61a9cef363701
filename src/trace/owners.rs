//! Which provider holds a provider-side id: a Responses API response, a file, a batch. The
//! request whose answer created the id records it (`TraceEvent::owned_ids`), so calls that
//! name it later (`previous_response_id`, `GET /responses/{id}`, a batch's input file) go
//! to that provider, for as long as the trace store keeps the record. Recent ids are
//! answered from memory; older ones (after a restart, or created through another node
//! sharing the store) from the store.

use std::sync::Arc;
use std::time::Duration;

use super::TraceStore;

/// Ids kept in memory: about 100 bytes each. Older ones are read from the store.
const MAX_RECENT: u64 = 200_000;

/// A store lookup slower than this fails (the caller answers 503) rather than hold the
/// request.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// An id no record names is not looked for in the store again for this long (a BYOK
/// caller's own ids, or ids sent at random, would each scan it).
const UNKNOWN_TTL: Duration = Duration::from_secs(30);

/// Longer than any trace retention that means anything (moka refuses a time to live
/// beyond 1,000 years).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

pub struct Owners {
    recent: moka::sync::Cache<String, Arc<str>>,
    unknown: moka::sync::Cache<String, ()>,
    store: Arc<dyn TraceStore>,
}

fn key(project: &str, id: &str) -> String {
    // Neither a project id nor a provider's id holds a newline.
    format!("{project}\n{id}")
}

impl Owners {
    /// `retention`: how long the trace store keeps records (`traces.retention_days`).
    pub fn new(store: Arc<dyn TraceStore>, retention: Duration) -> Owners {
        Owners {
            // LRU: the default (TinyLFU) may refuse a key seen once, and every id is.
            recent: moka::sync::Cache::builder()
                .max_capacity(MAX_RECENT)
                .time_to_live(retention.min(MAX_TTL))
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            unknown: moka::sync::Cache::builder()
                .max_capacity(MAX_RECENT)
                .time_to_live(UNKNOWN_TTL)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            store,
        }
    }

    /// `provider` holds `id`, created for `project`.
    pub fn remember(&self, project: &str, id: &str, provider: &str) {
        let key = key(project, id);
        self.unknown.invalidate(&key);
        self.recent.insert(key, Arc::from(provider));
    }

    /// The provider holding `id` for `project`; `Ok(None)` when no kept record names it.
    /// `Err`: the store could not be read in time (logged), so the answer is not known.
    pub async fn lookup(&self, project: &str, id: &str) -> Result<Option<Arc<str>>, String> {
        let key = key(project, id);
        if let Some(provider) = self.recent.get(&key) {
            return Ok(Some(provider));
        }
        if self.unknown.contains_key(&key) {
            return Ok(None);
        }
        let failed = match tokio::time::timeout(LOOKUP_TIMEOUT, self.store.owner(project, id)).await {
            Ok(Ok(Some(provider))) => {
                let provider: Arc<str> = Arc::from(provider);
                self.recent.insert(key, provider.clone());
                return Ok(Some(provider));
            }
            Ok(Ok(None)) => {
                self.unknown.insert(key, ());
                return Ok(None);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", LOOKUP_TIMEOUT.as_millis()),
        };
        tracing::warn!(error = %failed, id, "cannot read which provider holds an id");
        Err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::embedded::EmbeddedStore;
    use crate::trace::TraceRow;

    #[tokio::test]
    async fn ids_resolve_from_memory_then_from_the_store_per_project() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("t.db"), Default::default()).unwrap());
        let owners = Owners::new(store.clone(), Duration::from_secs(3600));
        owners.remember("p1", "resp_a", "openai");
        assert_eq!(owners.lookup("p1", "resp_a").await.unwrap().as_deref(), Some("openai"));
        assert_eq!(owners.lookup("p2", "resp_a").await, Ok(None));
        let row: TraceRow = serde_json::from_str(
            r#"{"ts": 1, "ts_ms": 1000, "request_id": "r1", "project": "p1", "key_name": "k",
            "surface": "openai", "endpoint": "/openai/v1/responses", "model_requested": "gpt-4o",
            "resolution": "auto", "routing_config": "", "config_version": 0, "strategy": "",
            "ab_variant": "", "provider": "azure-east", "model": "gpt-4o", "status": 200,
            "error_code": "", "attempt_providers": [], "attempt_models": [], "attempt_statuses": [],
            "attempt_http_statuses": [], "attempt_errors": [], "attempt_ttfb_ms": [],
            "attempt_duration_ms": [], "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0,
            "reasoning_tokens": 0, "cost_input": 0.0, "cost_output": 0.0, "cost_total": 0.0,
            "latency_ms": 1.0, "ttfb_ms": null, "tag_keys": [], "tag_values": [], "end_user": "",
            "trace_id": "", "conversation_id": "", "budget_name": "", "budget_action": "",
            "streamed": false, "bytes_in": 0, "bytes_out": 0, "decision_trace": "",
            "request_body": "", "response_body": "", "owned_ids": ["resp_b", "file-c"]}"#,
        )
        .unwrap();
        store.insert(&[row]).await.unwrap();
        // A fresh gateway (nothing in memory) reads the store.
        let fresh = Owners::new(store.clone(), Duration::from_secs(3600));
        assert_eq!(fresh.lookup("p1", "resp_b").await.unwrap().as_deref(), Some("azure-east"));
        assert_eq!(fresh.lookup("p1", "file-c").await.unwrap().as_deref(), Some("azure-east"));
        assert_eq!(fresh.lookup("p2", "resp_b").await, Ok(None));
        // An unknown id is remembered as unknown until it is created.
        assert_eq!(fresh.lookup("p1", "resp_new").await, Ok(None));
        fresh.remember("p1", "resp_new", "openai");
        assert_eq!(fresh.lookup("p1", "resp_new").await.unwrap().as_deref(), Some("openai"));
        // Pruned with its record.
        store.prune(2000).await.unwrap();
        let after = Owners::new(store, Duration::from_secs(3600));
        assert_eq!(after.lookup("p1", "resp_b").await, Ok(None));
    }
}
