//! The proxy listener: one `ProxyHttp` implementation whose phases stay thin. Each phase
//! calls into one module; read top to bottom, this file is the table of contents of a
//! request.

mod billing;
pub use billing::push_rate_headers;
mod body;
mod execute;
mod pipeline;
mod respond;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::connectors::http::Connector;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error as PError, ErrorType, Result as PResult};

use crate::auth::Principal;
use crate::config::store::ConfigStore;
use crate::error::Surface;
use crate::metrics::Metrics;
use crate::providers::Resolution;
use crate::routing::trace::DecisionTrace;
use crate::routing::Member;

/// Shared by every request of one gateway instance.
pub struct GatewayState {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    pub connector: Connector,
    pub spend: Arc<crate::spend::Spend>,
}

pub struct Gateway {
    pub state: Arc<GatewayState>,
}

/// Per-request state, filled in as the request moves through the phases; `logging`
/// turns it into metrics.
pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
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
}

impl RequestCtx {
    fn new() -> RequestCtx {
        RequestCtx {
            request_id: uuid::Uuid::new_v4().hyphenated().to_string(),
            started: Instant::now(),
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
        }
    }

    /// Records which member answered (for metrics, logs and the trace's winner).
    pub fn set_served(&mut self, member: &Member) {
        self.provider = Some(member.target.provider.id.clone());
        self.model = Some(member.target.model.clone());
        self.served = true;
        self.bill.rates = member.rates;
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn early_request_filter(&self, _session: &mut Session, ctx: &mut RequestCtx) -> PResult<()> {
        ctx.started = Instant::now();
        self.state.metrics.in_flight.inc();
        Ok(())
    }

    /// Authenticate, read and decode the body, resolve the model, call the upstream and
    /// answer: always handled here (see `upstream.rs` for why), so pingora's own upstream
    /// phases never run.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> PResult<bool> {
        pipeline::handle(&self.state, session, ctx).await;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut RequestCtx) -> PResult<Box<HttpPeer>> {
        // Unreachable: request_filter always answers the request itself.
        Err(PError::explain(ErrorType::InternalError, "request was not answered by request_filter"))
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&PError>, ctx: &mut RequestCtx) {
        billing::settle(&self.state, ctx);
        billing::record_metrics(&self.state, ctx);
        respond::record_metrics(&self.state.metrics, ctx);
    }
}
