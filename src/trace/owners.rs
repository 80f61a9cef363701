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

/// A store lookup slower than this answers "unknown" rather than hold the request.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Owners {
    recent: moka::sync::Cache<String, Arc<str>>,
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
            recent: moka::sync::Cache::builder().max_capacity(MAX_RECENT).time_to_live(retention).build(),
            store,
        }
    }

    /// `provider` holds `id`, created for `project`.
    pub fn remember(&self, project: &str, id: &str, provider: &str) {
        self.recent.insert(key(project, id), Arc::from(provider));
    }

    /// The provider holding `id` for `project`; `None` when no kept record names it (or the
    /// store could not be read in time, which is logged).
    pub async fn lookup(&self, project: &str, id: &str) -> Option<Arc<str>> {
        let key = key(project, id);
        if let Some(provider) = self.recent.get(&key) {
            return Some(provider);
        }
        match tokio::time::timeout(LOOKUP_TIMEOUT, self.store.owner(project, id)).await {
            Ok(Ok(Some(provider))) => {
                let provider: Arc<str> = Arc::from(provider);
                self.recent.insert(key, provider.clone());
                Some(provider)
            }
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, id, "cannot read which provider holds an id");
                None
            }
            Err(_) => {
                tracing::warn!(id, "reading which provider holds an id timed out");
                None
            }
        }
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
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("t.db"), 0).unwrap());
        let owners = Owners::new(store.clone(), Duration::from_secs(3600));
        owners.remember("p1", "resp_a", "openai");
        assert_eq!(owners.lookup("p1", "resp_a").await.as_deref(), Some("openai"));
        assert_eq!(owners.lookup("p2", "resp_a").await, None);
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
        assert_eq!(fresh.lookup("p1", "resp_b").await.as_deref(), Some("azure-east"));
        assert_eq!(fresh.lookup("p1", "file-c").await.as_deref(), Some("azure-east"));
        assert_eq!(fresh.lookup("p2", "resp_b").await, None);
        // Pruned with its record.
        store.prune(2000).await.unwrap();
        let after = Owners::new(store, Duration::from_secs(3600));
        assert_eq!(after.lookup("p1", "resp_b").await, None);
    }
}
