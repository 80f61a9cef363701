//! What the trace stores keep for replay and how replay reads it back.
//!
//! * **Kept**: every record has the routing inputs of its request (model, tags, end user,
//!   trace id, `bytes_in` for the input estimate, `max_tokens`, stream flag) for as long
//!   as the record lives. A chat request's whole body is kept too, for
//!   `traces.replay_hours` (default 24): zstd-compressed (level 1, on the writer's thread;
//!   bodies under 1 KiB as they are), cut at `traces.replay_max_body_bytes` and then marked
//!   `replay_body_truncated`. The answer the client got is kept
//!   alongside (as sent: a JSON body or the stream's bytes, cut at the same cap, compressed
//!   alike) for `with_responses` to compare against. The writer's prune pass empties both
//!   older than that.
//! * **Read**: `ReplayQuery` pages oldest first, `(ts_ms, request_id)` ascending, through
//!   chat requests only (`…/chat/completions`, `…/messages`) that reached the gateway with
//!   a model, leaving out traffic an experiment sent itself (tag `experiment`) and answers
//!   the response cache gave (no provider call: nothing to compare with). The filters
//!   are `LogQuery`'s, with its semantics (`query.rs`), so both stores answer alike.

use serde::{Deserialize, Serialize};

use super::query::{Cursor, LogQuery};

/// zstd level 1: about 3× smaller on chat JSON at several hundred MB/s per core.
const LEVEL: i32 = 1;

thread_local! {
    /// One compression context per thread (the trace writer's), reused: making one per body
    /// costs more than compressing a small body.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Bodies shorter than this are stored as they are: on a few hundred bytes zstd saves
/// little and its per-frame table building costs more than the rest of the record.
pub const RAW_BELOW: usize = 1024;

/// A zstd frame's first four bytes. A short body that starts with them (never JSON) is compressed all the same.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The body as stored: a zstd frame, or the body itself when short (`RAW_BELOW`).
pub fn compress(body: &[u8]) -> Vec<u8> {
    if body.len() < RAW_BELOW && !body.starts_with(&ZSTD_MAGIC) {
        return body.to_vec();
    }
    // Compressing into memory fails only on allocation failure; keep nothing rather than
    // a corrupt body.
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(LEVEL).ok();
        }
        slot.as_mut().and_then(|c| c.compress(body).ok()).unwrap_or_default()
    })
}

/// The body from a stored frame; `max` bounds the output (the cap it was stored under).
pub fn decompress(stored: &[u8], max: usize) -> Result<Vec<u8>, String> {
    if !stored.starts_with(&ZSTD_MAGIC) {
        return if stored.len() > max {
            Err(format!("stored body is larger than {max} bytes"))
        } else {
            Ok(stored.to_vec())
        };
    }
    let mut out = Vec::new();
    let mut decoder = zstd::stream::read::Decoder::new(stored).map_err(|e| e.to_string())?;
    let read = std::io::Read::read_to_end(&mut std::io::Read::take(&mut decoder, max as u64 + 1), &mut out)
        .map_err(|e| e.to_string())?;
    if read > max {
        return Err(format!("stored body is larger than {max} bytes"));
    }
    Ok(out)
}

/// How many answers are kept for replay each second (`traces.replay_answers_per_second`):
/// an answer travels to the trace writer and its store beside its body, which at full load
/// cost the proxy about a tenth more CPU per request when every one was kept; a bounded
/// rate keeps what `with_responses` samples from (up to 8.6 M answers a day at the
/// default) at no measurable cost. One word: the second (high half) and the count so far.
#[derive(Debug, Default)]
pub struct AnswerBudget {
    state: std::sync::atomic::AtomicU64,
}

impl AnswerBudget {
    /// Whether a request arriving in unix second `second` may keep its answer.
    pub fn take(&self, second: u64, per_second: u32) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if per_second == 0 {
            return false;
        }
        let second = second & 0xffff_ffff;
        let mut current = self.state.load(Relaxed);
        loop {
            let (window, used) = (current >> 32, current & 0xffff_ffff);
            // A request stamped in an earlier second than the window counts in the window.
            let next = if second <= window {
                if used >= u64::from(per_second) {
                    return false;
                }
                current + 1
            } else {
                (second << 32) | 1
            };
            match self.state.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

/// The paths whose records replay reads: the two chat surfaces.
pub fn is_chat_endpoint(endpoint: &str) -> bool {
    endpoint.ends_with("/chat/completions") || endpoint.ends_with("/messages")
}

/// What a replay read returns of the kept body and answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Bodies {
    /// Both empty (`routing_only` needs neither).
    #[default]
    Skip,
    /// `replay_body` and `replay_answer` are one-byte markers when kept, else empty.
    /// (`with_responses` samples on them without reading bodies.)
    Presence,
    /// Both as stored.
    Full,
}

/// The one byte `Bodies::Presence` puts in `replay_body` (`x`).
pub const PRESENT: u8 = b'x';

/// One page of a replay read.
#[derive(Debug, Clone, Default)]
pub struct ReplayQuery {
    /// Filters as the logs API reads them; its cursor and limit are not used.
    pub filters: LogQuery,
    /// Rows strictly after this one in oldest-first order.
    pub after: Option<Cursor>,
    pub limit: usize,
    pub bodies: Bodies,
    /// Only these records (empty: no such filter); a few hundred at most.
    pub request_ids: Vec<String>,
    /// Read the traffic experiments sent (tag `experiment`; `filters.tags` picks one)
    /// instead of leaving it out.
    pub experiment_traffic: bool,
}

impl ReplayQuery {
    /// Whether a record is in the replay set (not the cursor): the reference both stores'
    /// SQL must agree with.
    pub fn matches(&self, row: &super::TraceRow) -> bool {
        self.filters.matches(row)
            && is_chat_endpoint(&row.endpoint)
            && !row.model_requested.is_empty()
            && !row.project.is_empty()
            && (self.experiment_traffic || row.tag("experiment").is_none())
            && !row.cache_hit
            && (self.request_ids.is_empty() || self.request_ids.contains(&row.request_id))
    }
}

/// What replay reads of a record: its routing inputs and what production did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct ReplayRow {
    pub ts_ms: u64,
    pub request_id: String,
    pub project: String,
    pub key_name: String,
    pub surface: String,
    pub endpoint: String,
    pub model_requested: String,
    pub routing_config: String,
    pub config_version: u32,
    pub provider: String,
    pub model: String,
    pub status: u16,
    pub error_code: String,
    pub attempt_providers: Vec<String>,
    pub attempt_models: Vec<String>,
    pub attempt_statuses: Vec<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_total: f64,
    pub latency_ms: f64,
    pub tag_keys: Vec<String>,
    pub tag_values: Vec<String>,
    pub end_user: String,
    pub trace_id: String,
    pub streamed: bool,
    pub bytes_in: u64,
    pub max_tokens: u64,
    pub budget_action: String,
    #[serde(with = "serde_bytes")]
    pub replay_body: Vec<u8>,
    pub replay_body_truncated: bool,
    /// The answer production sent (`with_responses` compares against it).
    #[serde(with = "serde_bytes")]
    pub replay_answer: Vec<u8>,
}

/// The columns `ReplayRow` reads, in its field order; `{body}` and `{answer}` are
/// `replay_body` and `replay_answer`, or empty strings.
pub const COLUMNS: &str = "ts_ms, request_id, project, key_name, surface, endpoint, model_requested, routing_config, \
     config_version, provider, model, status, error_code, attempt_providers, attempt_models, \
     attempt_statuses, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_total, latency_ms, tag_keys, \
     tag_values, end_user, trace_id, streamed, bytes_in, max_tokens, budget_action, {body}, \
     replay_body_truncated, {answer}";

impl ReplayRow {
    pub fn tags(&self) -> Vec<(String, String)> {
        self.tag_keys.iter().cloned().zip(self.tag_values.iter().cloned()).collect()
    }

    /// An error as the logs and reports count one (`query.rs`).
    pub fn is_error(&self) -> bool {
        self.status >= 400 || self.status == 0
    }

    pub fn cursor(&self) -> Cursor {
        Cursor { ts_ms: self.ts_ms, request_id: self.request_id.clone() }
    }

    /// A body is kept for this record (`Bodies::Presence` or `Full`).
    pub fn has_body(&self) -> bool {
        !self.replay_body.is_empty()
    }

    /// The answer production gave is kept (`Bodies::Presence` or `Full`).
    pub fn has_answer(&self) -> bool {
        !self.replay_answer.is_empty()
    }

    /// The reference projection of a full record.
    pub fn from_row(row: &super::TraceRow, bodies: Bodies) -> ReplayRow {
        ReplayRow {
            ts_ms: row.ts_ms,
            request_id: row.request_id.clone(),
            project: row.project.clone(),
            key_name: row.key_name.clone(),
            surface: row.surface.clone(),
            endpoint: row.endpoint.clone(),
            model_requested: row.model_requested.clone(),
            routing_config: row.routing_config.clone(),
            config_version: row.config_version,
            provider: row.provider.clone(),
            model: row.model.clone(),
            status: row.status,
            error_code: row.error_code.clone(),
            attempt_providers: row.attempt_providers.clone(),
            attempt_models: row.attempt_models.clone(),
            attempt_statuses: row.attempt_statuses.clone(),
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            cached_tokens: row.cached_tokens,
            reasoning_tokens: row.reasoning_tokens,
            cost_total: row.cost_total,
            latency_ms: row.latency_ms,
            tag_keys: row.tag_keys.clone(),
            tag_values: row.tag_values.clone(),
            end_user: row.end_user.clone(),
            trace_id: row.trace_id.clone(),
            streamed: row.streamed,
            bytes_in: row.bytes_in,
            max_tokens: row.max_tokens,
            budget_action: row.budget_action.clone(),
            replay_body: match bodies {
                Bodies::Skip => Vec::new(),
                Bodies::Presence if row.replay_body.is_empty() => Vec::new(),
                Bodies::Presence => vec![PRESENT],
                Bodies::Full => row.replay_body.clone(),
            },
            replay_body_truncated: row.replay_body_truncated,
            replay_answer: match bodies {
                Bodies::Skip => Vec::new(),
                Bodies::Presence if row.replay_answer.is_empty() => Vec::new(),
                Bodies::Presence => vec![PRESENT],
                Bodies::Full => row.replay_answer.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_budget_refills_each_second() {
        let b = AnswerBudget::default();
        assert!(!b.take(100, 0));
        assert_eq!((0..5).filter(|_| b.take(100, 3)).count(), 3);
        // A late request of the second before counts in the current window.
        assert!(!b.take(99, 3));
        assert_eq!((0..5).filter(|_| b.take(101, 3)).count(), 3);
        let shared = std::sync::Arc::new(AnswerBudget::default());
        let taken: usize = (0..4)
            .map(|_| {
                let b = shared.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.take(7, 250)).count())
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(taken, 250);
    }

    #[test]
    fn bodies_round_trip_and_are_bounded() {
        let body = br#"{"model":"@production","messages":[{"role":"user","content":"hello hello hello"}]}"#;
        let stored = compress(body);
        assert_eq!(decompress(&stored, body.len()).unwrap(), body.to_vec());
        assert!(decompress(&stored, body.len() - 1).is_err());
        // Short bodies are kept as they are.
        assert_eq!(stored, body.to_vec());
        assert_eq!(decompress(&[], 10).unwrap(), Vec::<u8>::new());
        let big = format!(r#"{{"messages":[{{"content":"{}"}}]}}"#, "hello ".repeat(10_000));
        let packed = compress(big.as_bytes());
        assert!(packed.len() < 1000 && packed.starts_with(&ZSTD_MAGIC), "{}", packed.len());
        assert_eq!(decompress(&packed, big.len()).unwrap(), big.as_bytes());
        assert!(decompress(&packed, big.len() - 1).is_err());
        let mut broken = packed.clone();
        broken.truncate(packed.len() / 2);
        assert!(decompress(&broken, big.len()).is_err());
    }
}
