//! The trace record. `TraceEvent` is what the `logging` phase hands off: fields moved out
//! of the request context, nothing serialized yet. The writer turns it into a `TraceRow`,
//! the flat record both stores keep (one column per field; attempts and tags as parallel
//! arrays, which every ClickHouse version since 1.1 can store and filter).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::routing::trace::{CostRecord, DecisionTrace};
use crate::wire::canonical::Usage;

/// One request, as the request path leaves it. Built without serializing or formatting
/// anything: that happens on the writer's thread (`into_row`).
#[derive(Debug)]
pub struct TraceEvent {
    pub request_id: String,
    /// Arrival, unix ms.
    pub ts_ms: u64,
    pub latency: Duration,
    pub ttfb: Option<Duration>,
    pub principal: Option<Arc<Principal>>,
    pub surface: &'static str,
    pub endpoint: String,
    pub model_requested: Option<String>,
    /// `config`, `direct`, `auto`.
    pub resolution: Option<&'static str>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub status: u16,
    pub error_code: Option<&'static str>,
    pub trace: Option<Box<DecisionTrace>>,
    pub usage: Option<Usage>,
    pub cost: CostRecord,
    pub tags: Vec<(String, String)>,
    pub end_user: Option<String>,
    pub trace_id: Option<String>,
    pub conversation_id: Option<String>,
    pub streamed: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Only when bodies are enabled; already capped.
    pub request_body: Option<String>,
    pub response_body: Option<String>,
    /// The request's `max_tokens`, a routing input.
    pub max_tokens: Option<u64>,
    /// The whole request body and the cap it is kept to, when it is kept for replay
    /// (`traces.replay_hours`); compressed on the writer's thread, not here.
    pub replay_body: Option<(bytes::Bytes, usize)>,
    /// The answer the client got (as sent: JSON or the stream's pieces), when the body is
    /// kept for replay and the answer fits its cap; joined and compressed on the writer's
    /// thread. `with_responses` compares against it.
    pub replay_answer: Vec<bytes::Bytes>,
    /// Answered from the response cache; and what that answer cost when it was bought.
    pub cache_hit: bool,
    pub cache_saved_usd: f64,
    /// What embedding the prompt for a semantic cache lookup cost (hit or miss).
    pub cache_embedding_usd: f64,
    /// The fingerprint of the caller's own provider key (BYOK), `sk-proj-...TA0A`; empty
    /// when the stored credentials were used. Never the key.
    pub provider_key: String,
    /// Provider-side ids the answer created (a response, a file, a batch; see `owner`).
    pub owned_ids: Vec<String>,
}

/// The stored record. Field names are the column names in both stores
/// (`conf/clickhouse/*.sql`, `embedded.rs`); empty strings and zeros stand for "none" so
/// that every column is filterable on every ClickHouse version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct TraceRow {
    /// Arrival, unix seconds (ClickHouse `DateTime`: partition and sort key).
    pub ts: u32,
    /// Arrival, unix ms.
    pub ts_ms: u64,
    pub request_id: String,
    pub project: String,
    pub key_name: String,
    pub surface: String,
    pub endpoint: String,
    pub model_requested: String,
    /// `config`, `direct`, `auto`, or empty (refused before the model was resolved).
    pub resolution: String,
    /// `@slug`, or empty.
    pub routing_config: String,
    /// 0 without a routing config.
    pub config_version: u32,
    pub strategy: String,
    pub ab_variant: String,
    /// Served provider and model (empty when nothing answered).
    pub provider: String,
    pub model: String,
    /// HTTP status sent to the client; 0 when the client went away before any.
    pub status: u16,
    /// The gateway's error code (`rate_limited`, `upstream_timeout`, ...), or empty.
    pub error_code: String,
    pub attempt_providers: Vec<String>,
    pub attempt_models: Vec<String>,
    /// `success`, `timeout`, `rate_limited`, `upstream_error`, ...
    pub attempt_statuses: Vec<String>,
    /// 0 when no HTTP status was received.
    pub attempt_http_statuses: Vec<u16>,
    pub attempt_errors: Vec<String>,
    /// -1 when the attempt produced no first byte.
    pub attempt_ttfb_ms: Vec<f64>,
    pub attempt_duration_ms: Vec<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_input: f64,
    pub cost_output: f64,
    pub cost_total: f64,
    /// Arrival to last byte.
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub tag_keys: Vec<String>,
    pub tag_values: Vec<String>,
    pub end_user: String,
    pub trace_id: String,
    pub conversation_id: String,
    pub budget_name: String,
    /// `none`, `warn_only`, `downgrade`, `block`, or empty (no budget applied).
    pub budget_action: String,
    pub streamed: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The decision trace (`routing::trace::DecisionTrace`) as JSON, or empty.
    pub decision_trace: String,
    /// Empty unless bodies are enabled; cut to the configured size.
    pub request_body: String,
    pub response_body: String,
    /// The request's `max_tokens` (a routing input), or 0. (`default`: spill files written
    /// before a column existed still read back.)
    #[serde(default)]
    pub max_tokens: u64,
    /// The request body kept for replay, zstd-compressed (`trace::replay`); empty when not
    /// kept or after `traces.replay_hours`.
    #[serde(default, with = "serde_bytes")]
    pub replay_body: Vec<u8>,
    /// The replay body was cut at `traces.replay_max_body_bytes`.
    #[serde(default)]
    pub replay_body_truncated: bool,
    /// The answer the client got, kept and compressed like `replay_body`; empty when not
    /// kept (longer than the cap, or no body kept) or after `traces.replay_hours`.
    #[serde(default, with = "serde_bytes")]
    pub replay_answer: Vec<u8>,
    /// Answered from the response cache (no provider call, cost 0).
    #[serde(default)]
    pub cache_hit: bool,
    /// What a cache hit saved: the cost of the answer when it was bought.
    #[serde(default)]
    pub cache_saved_usd: f64,
    /// What embedding the prompt for a semantic cache lookup cost (hit or miss).
    #[serde(default)]
    pub cache_embedding_usd: f64,
    /// The fingerprint of the caller's own provider key (BYOK); empty when none.
    #[serde(default)]
    pub provider_key: String,
    /// Provider-side ids the answer created (a response, a file, a batch).
    #[serde(default)]
    pub owned_ids: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1000.0
}

impl TraceEvent {
    pub fn into_row(self) -> TraceRow {
        let trace = self.trace.as_deref();
        let attempts = trace.map(|t| t.attempts.as_slice()).unwrap_or_default();
        let usage = self.usage.unwrap_or_default();
        let (tag_keys, tag_values) = self.tags.into_iter().unzip();
        TraceRow {
            ts: u32::try_from(self.ts_ms / 1000).unwrap_or(u32::MAX),
            ts_ms: self.ts_ms,
            project: self.principal.as_ref().map(|p| p.project.to_string()).unwrap_or_default(),
            key_name: self.principal.as_ref().map(|p| p.key_name.to_string()).unwrap_or_default(),
            surface: self.surface.to_string(),
            endpoint: self.endpoint,
            model_requested: self.model_requested.unwrap_or_default(),
            resolution: self.resolution.unwrap_or_default().to_string(),
            routing_config: trace.and_then(|t| t.routing_config.clone()).unwrap_or_default(),
            config_version: trace.and_then(|t| t.config_version).unwrap_or(0),
            strategy: trace.map(|t| t.strategy.to_string()).unwrap_or_default(),
            ab_variant: trace.and_then(|t| t.ab_variant.clone()).unwrap_or_default(),
            provider: self.provider.unwrap_or_default(),
            model: self.model.unwrap_or_default(),
            status: self.status,
            error_code: self.error_code.unwrap_or_default().to_string(),
            attempt_providers: attempts.iter().map(|a| a.provider.clone()).collect(),
            attempt_models: attempts.iter().map(|a| a.model.clone()).collect(),
            attempt_statuses: attempts.iter().map(|a| a.status.to_string()).collect(),
            attempt_http_statuses: attempts.iter().map(|a| a.http_status.unwrap_or(0)).collect(),
            attempt_errors: attempts.iter().map(|a| a.error.clone().unwrap_or_default()).collect(),
            attempt_ttfb_ms: attempts.iter().map(|a| a.ttfb_ms.unwrap_or(-1.0)).collect(),
            attempt_duration_ms: attempts.iter().map(|a| a.duration_ms).collect(),
            input_tokens: usage.input,
            output_tokens: usage.output,
            cached_tokens: usage.cache_read,
            reasoning_tokens: usage.reasoning,
            cost_input: self.cost.input,
            cost_output: self.cost.output,
            cost_total: self.cost.total,
            latency_ms: ms(self.latency),
            ttfb_ms: self.ttfb.map(ms),
            tag_keys,
            tag_values,
            end_user: self.end_user.unwrap_or_default(),
            trace_id: self.trace_id.unwrap_or_default(),
            conversation_id: self.conversation_id.unwrap_or_default(),
            budget_name: trace.and_then(|t| t.budget.as_ref()).map(|b| b.name.clone()).unwrap_or_default(),
            budget_action: trace
                .and_then(|t| t.budget.as_ref())
                .map(|b| b.action.to_string())
                .unwrap_or_default(),
            streamed: self.streamed,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            decision_trace: trace.and_then(|t| serde_json::to_string(t).ok()).unwrap_or_default(),
            request_body: self.request_body.unwrap_or_default(),
            response_body: self.response_body.unwrap_or_default(),
            max_tokens: self.max_tokens.unwrap_or(0),
            replay_body_truncated: self.replay_body.as_ref().is_some_and(|(b, cap)| b.len() > *cap),
            replay_body: self
                .replay_body
                .map(|(body, cap)| super::replay::compress(&body[..body.len().min(cap)]))
                .unwrap_or_default(),
            replay_answer: match self.replay_answer.as_slice() {
                [] => Vec::new(),
                [one] => super::replay::compress(one),
                pieces => super::replay::compress(&pieces.concat()),
            },
            cache_hit: self.cache_hit,
            cache_saved_usd: self.cache_saved_usd,
            cache_embedding_usd: self.cache_embedding_usd,
            provider_key: self.provider_key,
            owned_ids: self.owned_ids,
            request_id: self.request_id,
        }
    }
}

impl TraceRow {
    /// The value of tag `key`, if the record has it.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tag_keys.iter().position(|k| k == key).and_then(|i| self.tag_values.get(i)).map(String::as_str)
    }
}

/// Cuts `body` to at most `max` bytes at a UTF-8 boundary; `None` when `max` is 0.
pub fn capped_body(body: &[u8], max: usize) -> Option<String> {
    if max == 0 {
        return None;
    }
    let mut end = body.len().min(max);
    let text = loop {
        match std::str::from_utf8(&body[..end]) {
            Ok(t) => break t,
            // A character cut by the cap, or bytes that are not text: keep what is valid.
            Err(e) => end = e.valid_up_to(),
        }
    };
    Some(text.to_string())
}
