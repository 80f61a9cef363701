//! Filling the response cache: a miss's answer collected on its way to the client and
//! stored just before its last bytes leave, and the `X-Modelux-Cache` headers of every
//! answer (`cache.rs` looks requests up and answers hits).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;

use super::headers::name;
use super::RequestCtx;
use crate::cache::semantic::{Indexed, Vectors};
use crate::cache::{self, Answer, Entry};
use crate::error::Surface;
use crate::metrics::Metrics;
use crate::wire;

pub const CACHE: &str = "x-modelux-cache";
pub const SIMILARITY: &str = "x-modelux-cache-similarity";

/// What a pending answer is.
pub enum Kind {
    /// In the client's surface, whole or streamed.
    Chat { surface: Surface, streamed: bool },
    /// An OpenAI embeddings list.
    Embeddings,
}

/// A miss to store once answered.
pub struct Pending {
    pub(super) store: Arc<cache::Store>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) key: [u8; 32],
    pub(super) ttl: Duration,
    pub(super) max_bytes: usize,
    pub(super) kind: Kind,
    pub(super) pieces: Vec<Bytes>,
    pub(super) len: usize,
    pub(super) over: bool,
    /// `mode: semantic`: the vector to index the answer under, once stored.
    pub(super) vector: Option<Indexed>,
    pub(super) max_vectors: usize,
    pub(super) vectors: Arc<Vectors>,
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

/// `X-Modelux-Cache` (and, on a hit, its similarity: 1.0 for an exact match, else to four
/// places, never shown as 1.0).
pub fn push_headers(ctx: &RequestCtx, headers: &mut Vec<(HeaderName, String)>) {
    if let Some(status) = ctx.cache_status {
        headers.push((name(CACHE), status.to_string()));
        if let Some(s) = ctx.cache_similarity {
            headers.push((name(SIMILARITY), similarity_text(s)));
        }
    }
}

fn similarity_text(s: f32) -> String {
    if s >= 1.0 {
        return "1.0".into();
    }
    let rounded = (f64::from(s) * 1e4).round().min(9999.0) / 1e4;
    let text = format!("{rounded:.4}");
    let text = text.trim_end_matches('0');
    if text.ends_with('.') {
        format!("{text}0")
    } else {
        text.to_string()
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
    let answer = match pending.kind {
        Kind::Chat { surface, streamed } => {
            let response = if streamed {
                wire::assemble_stream(surface, &bytes)
            } else {
                surface.codec().decode_response(&bytes).ok()
            };
            let Some(mut response) = response else { return };
            // What the gateway billed: a stream whose client did not ask for usage carried none.
            if let Some(usage) = ctx.bill.usage {
                response.usage = usage;
            }
            Answer::Chat(response)
        }
        Kind::Embeddings => match wire::embeddings::decode_response(&bytes) {
            Ok(e) => Answer::Embeddings(e),
            Err(_) => return,
        },
    };
    let (Some(provider), Some(model)) = (ctx.provider.clone(), ctx.model.clone()) else { return };
    let entry = Entry::new(answer, provider, model, ctx.bill.cost.total, pending.ttl);
    let metrics = &pending.metrics;
    match pending.store.put(pending.key, entry).await {
        Ok(()) => metrics.cache_stores.inc(),
        Err(e) => {
            metrics.cache_errors.with_label_values(&["put"]).inc();
            tracing::debug!(error = %e, "response cache unavailable; answer not stored");
            return;
        }
    }
    if let Some(item) = pending.vector {
        pending.store.publish(&item, pending.max_vectors, metrics.cache_errors.with_label_values(&["index"]));
        if !pending.vectors.insert(item) {
            metrics.cache_errors.with_label_values(&["index"]).inc();
        }
        let stats = &pending.vectors.stats;
        metrics.cache_vectors.set(stats.vectors.load(Ordering::Relaxed) as i64);
        metrics.cache_vector_bytes.set(stats.bytes.load(Ordering::Relaxed) as i64);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn similarity_headers() {
        assert_eq!(super::similarity_text(1.0), "1.0");
        assert_eq!(super::similarity_text(0.96_f32), "0.96");
        assert_eq!(super::similarity_text(0.999_99), "0.9999");
        assert_eq!(super::similarity_text(0.5), "0.5");
    }
}
