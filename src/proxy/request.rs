//! What every routed endpoint does with the client's request before calling anyone:
//! authenticate, read the JSON body (bounded), read what the client said about the request
//! (headers and `metadata.*`), and admit it (budgets, then routing; see `admission`).

use std::sync::Arc;

use bytes::Bytes;
use pingora::proxy::Session;

use super::billing;
use super::{Req, RequestCtx};
use crate::admission::{self, Ask, Now, RequestMeta, Routed};
use crate::auth::{self, Principal};
use crate::config::Snapshot;
use crate::error::{GatewayError, Surface};
use crate::routing::health::now_ms;
use crate::routing::trace::DecisionTrace;
use crate::routing::RequestFacts;
use crate::spend::budgets::Evaluation;
use crate::wire::anthropic;
use crate::wire::routed::RoutedRequest;

/// `Authorization: Bearer` on both surfaces; `x-api-key` too on the Anthropic surface
/// (what the Anthropic SDK sends).
pub fn authenticate(
    session: &Session,
    snapshot: &Snapshot,
    surface: Surface,
) -> Result<Arc<Principal>, GatewayError> {
    let headers = &session.req_header().headers;
    let bearer = auth::bearer_token(headers.get(http::header::AUTHORIZATION).map(|h| h.as_bytes()));
    let api_key = match surface {
        Surface::Anthropic => headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim),
        Surface::OpenAi => None,
    };
    let Some(token) = bearer.or(api_key) else {
        return Err(GatewayError::Unauthorized {
            message: match surface {
                Surface::OpenAi => "missing API key; send Authorization: Bearer mlx_sk_...".into(),
                Surface::Anthropic => {
                    "missing API key; send x-api-key: mlx_sk_... or Authorization: Bearer".into()
                }
            },
        });
    };
    snapshot
        .project_keys
        .authenticate(token)
        .ok_or_else(|| GatewayError::Unauthorized { message: "invalid API key".into() })
}

fn check_content_type(session: &Session) -> Result<(), GatewayError> {
    let Some(ct) = session.req_header().headers.get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") || mime.to_ascii_lowercase().ends_with("+json") {
        Ok(())
    } else {
        Err(GatewayError::UnsupportedMediaType { content_type: ct.to_string() })
    }
}

/// The JSON body of a routed request: content type checked, size and time bounded.
pub async fn read_json_body(req: &mut Req<'_>) -> Result<Bytes, GatewayError> {
    let settings = &req.snapshot.settings;
    check_content_type(req.session)?;
    let body =
        super::body::read_body(req.session, settings.max_body_bytes, settings.client_body_timeout).await?;
    let ctx = &mut *req.ctx;
    ctx.bytes_in = body.len() as u64;
    if ctx.body_cap > 0 {
        ctx.request_body = crate::trace::record::capped_body(&body, ctx.body_cap);
    }
    Ok(body)
}

/// A small body of any type (a passthrough's: `cancel`), bounded by `limit` and the
/// client body timeout.
pub async fn read_body_bounded(req: &mut Req<'_>, limit: u64) -> Result<Bytes, GatewayError> {
    let body = super::body::read_body(req.session, limit, req.snapshot.settings.client_body_timeout).await?;
    req.ctx.bytes_in = body.len() as u64;
    Ok(body)
}

/// A routed request, read: its body, the body parsed for routing, what the client said
/// about it, and whether it only asks for the decision.
pub struct Incoming<'b> {
    pub request: RoutedRequest<'b>,
    pub meta: RequestMeta,
    /// `X-Modelux-Dry-Run: true`.
    pub dry_run: bool,
}

/// Tags, end user, trace and conversation ids: headers win over body fields (PRODUCT.md
/// §3.3); `metadata.*` is the last fallback (§3.4), parsed only when present. Copied into
/// the trace record.
pub fn incoming<'b>(session: &Session, ctx: &mut RequestCtx, request: RoutedRequest<'b>) -> Incoming<'b> {
    let h = &session.req_header().headers;
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let mut tags = request.tags.clone();
    if let Some(header) = get("x-modelux-user-tags") {
        for pair in header.split(',') {
            if let Some((k, v)) = pair.split_once('=') {
                let (k, v) = (k.trim(), v.trim());
                tags.retain(|(key, _)| key != k);
                tags.push((k.to_string(), v.to_string()));
            }
        }
    }
    let metadata = request.metadata();
    let from_metadata = |key: &str| metadata.as_ref().and_then(|m| m.get(key)).cloned();
    let meta = RequestMeta {
        model_requested: Some(request.model.clone()),
        tags,
        end_user: get("x-modelux-user-id")
            .map(str::to_string)
            .or_else(|| request.end_user.clone())
            .or_else(|| from_metadata("user_id")),
        trace_id: get("x-modelux-trace-id").map(str::to_string).or_else(|| from_metadata("trace_id")),
        conversation_id: get("x-modelux-conversation-id")
            .map(str::to_string)
            .or_else(|| from_metadata("conversation_id")),
        max_tokens: request.max_tokens,
    };
    ctx.meta = meta.clone();
    let dry_run = get("x-modelux-dry-run").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    Incoming { request, meta, dry_run }
}

/// Client `anthropic-version` / `anthropic-beta` headers, forwarded verbatim to
/// Anthropic-family upstreams.
pub fn anthropic_headers(session: &Session, client: Surface) -> Vec<(String, String)> {
    let h = &session.req_header().headers;
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let version = match client {
        Surface::Anthropic => get("anthropic-version"),
        Surface::OpenAi => None,
    };
    let mut out =
        vec![("anthropic-version".into(), version.unwrap_or_else(|| anthropic::API_VERSION.to_string()))];
    if let Some(beta) = get("anthropic-beta") {
        out.push(("anthropic-beta".into(), beta));
    }
    out
}

/// Admits a request (`admission::admit`) and records the outcome on the request: the
/// budget headers and metrics, the decision trace, and which provider and model it goes
/// to first. `lease`: the decision may take a half-open probe lease (not for dry runs).
pub fn admit<'s, 'r>(
    req: &mut Req<'s>,
    principal: &'r Principal,
    incoming: &'r Incoming<'_>,
    facts: &mut RequestFacts<'_>,
    lease: bool,
) -> Result<(Evaluation<'s, 'r>, Routed<'s>), GatewayError> {
    let snapshot: &'s Snapshot = req.snapshot;
    let ask = Ask { project: &principal.project, model: &incoming.request.model, meta: &incoming.meta };
    let admission =
        admission::admit(snapshot, &*req.state.spend.counters, &ask, facts, Now::current(), lease);
    billing::note_budget(req.state, req.ctx, &admission.eval, &admission.outcome);
    let routed = record_route(req.ctx, admission.routed?)?;
    billing::record_budget(req.ctx, admission.downgraded_from.map(str::to_string));
    Ok((admission.eval, routed))
}

/// Routes a request that no budget polices (`count_tokens`), recorded as `admit` does.
pub fn route<'s>(
    req: &mut Req<'s>,
    principal: &Principal,
    model: &str,
    facts: &RequestFacts<'_>,
    lease: bool,
) -> Result<Routed<'s>, GatewayError> {
    let snapshot: &'s Snapshot = req.snapshot;
    let routed = admission::route(snapshot, &principal.project, model, facts, now_ms(), lease, false)?;
    record_route(req.ctx, routed)
}

/// The decision trace, and which provider and model the request goes to first.
fn record_route<'s>(
    ctx: &mut RequestCtx,
    (routed, trace): (Routed<'s>, Box<DecisionTrace>),
) -> Result<Routed<'s>, GatewayError> {
    ctx.trace = Some(trace);
    ctx.resolution = Some(routed.resolution());
    let first = routed.first()?;
    ctx.provider = Some(first.target.provider.id.clone());
    ctx.model = Some(first.target.model.clone());
    Ok(routed)
}
