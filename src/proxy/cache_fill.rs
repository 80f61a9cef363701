//! Filling the response cache: a miss's answer collected on its way to the client and
//! stored just before its last bytes leave, and the `X-Modelux-Cache` headers of every
//! answer (`cache.rs` looks requests up and answers hits).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;

use super::headers::name;
use super::RequestCtx;
use crate::cache::{self, Entry};
use crate::error::Surface;
use crate::metrics::Metrics;
use crate::wire;

pub const CACHE: &str = "x-modelux-cache";
pub const SIMILARITY: &str = "x-modelux-cache-similarity";

/// A miss to store once answered.
pub struct Pending {
    pub(super) store: Arc<cache::Store>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) key: [u8; 32],
    pub(super) ttl: Duration,
    pub(super) max_bytes: usize,
    pub(super) surface: Surface,
    pub(super) streamed: bool,
    pub(super) pieces: Vec<Bytes>,
    pub(super) len: usize,
    pub(super) over: bool,
}

impl Pending {
    /// Keeps a piece sent to the client (shared, not copied); an answer over
    /// `max_entry_bytes` is not stored.
    pub fn capture(&mut self, piece: &Bytes) {
        if self.over {
            return;
        }
        self.len += piece.len();
        if self.len > self.max_bytes {
            self.over = true;
            self.pieces = Vec::new();
        } else {
            self.pieces.push(piece.clone());
        }
    }
}

/// `X-Modelux-Cache` (and, on a hit, its similarity: 1.0 for an exact match).
pub fn push_headers(ctx: &RequestCtx, headers: &mut Vec<(HeaderName, String)>) {
    if let Some(status) = ctx.cache_status {
        headers.push((name(CACHE), status.to_string()));
        if status == "HIT" {
            headers.push((name(SIMILARITY), "1.0".to_string()));
        }
    }
}

/// Stores a miss's answer: a complete, successful answer only. Called just before the
/// answer's last bytes go out (a whole answer's only write, a stream's closing event), so
/// a client that repeats the request as soon as it has the answer finds it stored; and
/// from `logging`, for an answer that ended any other way (then a no-op).
pub async fn finish(ctx: &mut RequestCtx) {
    let Some(pending) = ctx.cache_pending.take() else { return };
    if pending.over || !ctx.served || !(200..300).contains(&ctx.status) || ctx.error_code.is_some() {
        return;
    }
    let bytes = pending.pieces.concat();
    let response = if pending.streamed {
        wire::assemble_stream(pending.surface, &bytes)
    } else {
        pending.surface.codec().decode_response(&bytes).ok()
    };
    let Some(mut response) = response else { return };
    // What the gateway billed: a stream whose client did not ask for usage carried none.
    if let Some(usage) = ctx.bill.usage {
        response.usage = usage;
    }
    let (Some(provider), Some(model)) = (ctx.provider.clone(), ctx.model.clone()) else { return };
    let entry = Entry::new(response, provider, model, ctx.bill.cost.total, pending.ttl);
    let metrics = &pending.metrics;
    match pending.store.put(pending.key, entry).await {
        Ok(()) => metrics.cache_stores.inc(),
        Err(e) => {
            metrics.cache_errors.with_label_values(&["put"]).inc();
            tracing::debug!(error = %e, "response cache unavailable; answer not stored");
        }
    }
    if let Some((bytes, entries)) = pending.store.size() {
        metrics.cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        metrics.cache_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
    }
}
