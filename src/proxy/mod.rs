//! The proxy listener: one `ProxyHttp` implementation whose phases stay thin. Each phase
//! calls into one module; read top to bottom, this file is the table of contents of a
//! request.

mod answer;
mod billing;
pub use billing::push_rate_headers;
mod body;
mod cache;
mod cache_fill;
mod chat;
mod count_tokens;
mod dispatch;
mod dry_run;
mod embeddings;
mod execute;
mod headers;
mod media;
mod models;
mod passthrough;
mod request;
mod resources;
mod respond;
mod responses;
mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error as PError, ErrorType, Result as PResult};

pub use crate::admission::RequestMeta;
use crate::auth::Principal;
use crate::config::store::ConfigStore;
use crate::config::Snapshot;
use crate::error::Surface;
use crate::metrics::Metrics;
use crate::providers::Resolution;
use crate::routing::trace::DecisionTrace;
use crate::routing::Member;
use crate::trace::record::TraceEvent;
use crate::trace::writer::TraceQueue;

/// Shared by every request of one gateway instance.
pub struct GatewayState {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    pub connector: Connector,
    pub spend: Arc<crate::spend::Spend>,
    pub traces: Arc<TraceQueue>,
    /// Grants of `with_responses` experiments sending through this gateway.
    pub grants: Arc<crate::replay::live::Grants>,
    /// Answers kept for replay this second (`traces.replay_answers_per_second`).
    pub answer_budget: crate::trace::replay::AnswerBudget,
    /// The response cache (in process, or Redis).
    pub cache: Arc<crate::cache::Store>,
    /// The semantic cache's index (filled from the Redis stream too, when shared).
    pub vectors: Arc<crate::cache::semantic::Vectors>,
    /// Which provider holds a response, file or batch id (`trace::owners`).
    pub owners: Arc<crate::trace::owners::Owners>,
}

pub struct Gateway {
    pub state: Arc<GatewayState>,
}

/// Per-request state, filled in as the request moves through the phases; `logging`
/// turns it into metrics.
pub struct RequestCtx {
    /// UUIDv7: sorts by arrival, and carries its own timestamp.
    pub request_id: String,
    pub started: Instant,
    /// Arrival, unix ms.
    pub ts_ms: u64,
    pub endpoint: String,
    pub surface: Surface,
    pub principal: Option<Arc<Principal>>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub resolution: Option<Resolution>,
    pub status: u16,
    /// Set when the gateway answered with (or ended a stream on) an error.
    pub error_code: Option<&'static str>,
    /// Connect to last upstream byte, summed over attempts.
    pub upstream_time: Duration,
    pub ttfb: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The routing decision and its attempts (see `routing::trace`).
    pub trace: Option<Box<DecisionTrace>>,
    /// Upstream attempts made so far.
    pub attempts: usize,
    /// An attempt's answer (success or upstream error) went to the client.
    pub served: bool,
    /// Rate limits, budget, reservation, usage and cost (see `billing`).
    pub bill: billing::Bill,
    /// What the client said about the request, for its trace record.
    pub meta: RequestMeta,
    pub streamed: bool,
    /// Captured only when `traces.bodies` is on; already cut to size.
    pub request_body: Option<String>,
    /// A chat request's whole body and its cap, kept for replay (`traces.replay_hours`).
    pub replay_body: Option<(Bytes, usize)>,
    /// Keep the answer for replay (its body is kept and the answer budget allowed it).
    pub keep_answer: bool,
    /// What the client got, when `keep_answer`: the pieces as sent (shared, not copied);
    /// dropped when they outgrow the body's cap.
    replay_answer: Vec<Bytes>,
    replay_answer_len: usize,
    /// Answered from the response cache: what the answer cost when it was bought.
    pub cache_hit: Option<f64>,
    /// `X-Modelux-Cache` of this answer, when caching applies to its request.
    pub cache_status: Option<&'static str>,
    /// A cache miss to store once answered, and the client-bound pieces so far.
    pub cache_pending: Option<Box<cache_fill::Pending>>,
    /// The caller's own provider key for this call (BYOK); only its fingerprint is traced.
    pub provider_key: Option<crate::auth::ProviderKey>,
    /// Provider-side ids this request's answer created (a response, a file, a batch).
    pub owned_ids: Vec<String>,
    /// A semantic hit's similarity (an exact hit's is 1).
    pub cache_similarity: Option<f32>,
    /// What embedding the prompt for a semantic lookup cost.
    pub cache_embedding_usd: f64,
    /// An experiment's request (`replay::live`): the stored request it re-sends, whose
    /// id seeds the routing draws as production's did.
    pub replay_of: Option<String>,
    /// The first `body_cap` bytes sent to the client.
    response_body: Vec<u8>,
    /// `traces.max_body_bytes` of the snapshot this request runs on (0: no bodies).
    pub body_cap: usize,
    /// Where the trace record goes; taken by `logging` (or by `Drop`, for a request
    /// cancelled before it finished).
    traces: Option<Arc<TraceQueue>>,
}

/// One request being served: what every endpoint and answer helper works with. The
/// snapshot is the one loaded when the request arrived; it serves the whole request.
pub(crate) struct Req<'a> {
    pub state: &'a GatewayState,
    pub snapshot: &'a Snapshot,
    pub session: &'a mut Session,
    pub ctx: &'a mut RequestCtx,
}

impl RequestCtx {
    fn new(traces: Arc<TraceQueue>) -> RequestCtx {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, now.as_secs(), now.subsec_nanos());
        RequestCtx {
            request_id: uuid::Uuid::new_v7(ts).hyphenated().to_string(),
            started: Instant::now(),
            ts_ms: now.as_millis() as u64,
            endpoint: String::new(),
            surface: Surface::OpenAi,
            principal: None,
            provider: None,
            model: None,
            resolution: None,
            status: 0,
            error_code: None,
            upstream_time: Duration::ZERO,
            ttfb: None,
            bytes_in: 0,
            bytes_out: 0,
            trace: None,
            attempts: 0,
            served: false,
            bill: billing::Bill::new(),
            meta: RequestMeta::default(),
            streamed: false,
            request_body: None,
            replay_body: None,
            keep_answer: false,
            replay_answer: Vec::new(),
            replay_answer_len: 0,
            replay_of: None,
            cache_hit: None,
            cache_status: None,
            cache_pending: None,
            provider_key: None,
            cache_similarity: None,
            owned_ids: Vec::new(),
            cache_embedding_usd: 0.0,
            response_body: Vec::new(),
            body_cap: 0,
            traces: Some(traces),
        }
    }

    /// Keeps the start of the response body for the trace, when bodies are kept, and the
    /// answer for replay, when the request is kept for replay. An answer longer than the
    /// cap is not kept at all: a cut one would compare as a different answer.
    pub fn capture_response(&mut self, bytes: &Bytes) {
        let room = self.body_cap.saturating_sub(self.response_body.len());
        if room > 0 {
            self.response_body.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        if let Some(pending) = self.cache_pending.as_deref_mut() {
            pending.capture(bytes);
        }
        if let (true, Some((_, cap))) = (self.keep_answer, &self.replay_body) {
            if self.replay_answer_len <= *cap {
                self.replay_answer_len += bytes.len();
                if self.replay_answer_len <= *cap {
                    self.replay_answer.push(bytes.clone());
                } else {
                    self.replay_answer = Vec::new();
                }
            }
        }
    }

    /// Moves what the trace record needs out of the context, once.
    fn trace_event(&mut self) -> Option<(Arc<TraceQueue>, Box<TraceEvent>)> {
        let queue = self.traces.take()?;
        let meta = std::mem::take(&mut self.meta);
        let event = TraceEvent {
            request_id: std::mem::take(&mut self.request_id),
            ts_ms: self.ts_ms,
            latency: self.started.elapsed(),
            ttfb: self.ttfb,
            principal: self.principal.clone(),
            surface: self.surface.as_str(),
            endpoint: std::mem::take(&mut self.endpoint),
            model_requested: meta.model_requested,
            resolution: self.resolution.map(|r| r.as_str()),
            provider: self.provider.take(),
            model: self.model.take(),
            status: self.status,
            error_code: self.error_code,
            trace: self.trace.take(),
            usage: self.bill.usage,
            cost: self.bill.cost,
            tags: meta.tags,
            end_user: meta.end_user,
            trace_id: meta.trace_id,
            conversation_id: meta.conversation_id,
            streamed: self.streamed,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            request_body: self.request_body.take(),
            max_tokens: meta.max_tokens,
            replay_body: self.replay_body.take(),
            replay_answer: std::mem::take(&mut self.replay_answer),
            cache_hit: self.cache_hit.is_some(),
            cache_saved_usd: self.cache_hit.unwrap_or(0.0),
            cache_embedding_usd: self.cache_embedding_usd,
            provider_key: self.provider_key.as_ref().map(|k| k.fingerprint.clone()).unwrap_or_default(),
            owned_ids: std::mem::take(&mut self.owned_ids),
            response_body: (self.body_cap > 0)
                .then(|| crate::trace::record::capped_body(&self.response_body, self.body_cap))
                .flatten(),
        };
        Some((queue, Box::new(event)))
    }

    /// Records which member answered (for metrics, logs and the trace's winner).
    pub fn set_served(&mut self, member: &Member) {
        self.provider = Some(member.target.provider.id.clone());
        self.model = Some(member.target.model.clone());
        self.served = true;
        self.bill.rates = member.rates;
    }
}

impl Drop for RequestCtx {
    /// A request cancelled mid-way (the client went away, or shutdown) never reaches
    /// `logging`: its record still goes out, marked as such.
    fn drop(&mut self) {
        if self.traces.is_some() {
            self.error_code.get_or_insert("cancelled");
            if let Some((queue, event)) = self.trace_event() {
                queue.submit(event);
            }
        }
    }
}

/// The 503 body over `server.max_connections`, in the wire format of the request's path.
pub fn overloaded_body(path: &str) -> Bytes {
    let surface = if dispatch::is_anthropic_path(path) { Surface::Anthropic } else { Surface::OpenAi };
    let err = crate::error::GatewayError::Unavailable {
        code: "too_many_connections",
        message: "the gateway is at its connection limit; retry shortly".into(),
    };
    Bytes::from(surface.codec().error_body(&err))
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.state.traces.clone())
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> PResult<()> {
        crate::conn::head_read(session);
        ctx.started = Instant::now();
        self.state.metrics.in_flight.inc();
        Ok(())
    }

    /// Authenticate, read and decode the body, resolve the model, call the upstream and
    /// answer: always handled here (see `upstream.rs` for why), so pingora's own upstream
    /// phases never run.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> PResult<bool> {
        dispatch::handle(&self.state, session, ctx).await;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut RequestCtx) -> PResult<Box<HttpPeer>> {
        // Unreachable: request_filter always answers the request itself.
        Err(PError::explain(ErrorType::InternalError, "request was not answered by request_filter"))
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&PError>, ctx: &mut RequestCtx) {
        cache_fill::finish(ctx).await;
        billing::settle(&self.state, ctx);
        billing::record_metrics(&self.state, ctx);
        respond::record_metrics(&self.state.metrics, ctx);
        if let Some((queue, event)) = ctx.trace_event() {
            queue.submit(event);
        }
    }
}
