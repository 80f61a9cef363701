//! One request, start to finish: endpoint → auth → body → decode → resolve → upstream →
//! answer. Any error returned before the first byte went downstream is rendered once, in
//! the client's wire format, by `handle`.

use std::sync::Arc;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::respond::{self, name, Headers};
use super::upstream::{self, Exchange};
use super::{GatewayState, RequestCtx};
use crate::auth::{self, Principal};
use crate::config::{self, RoutingConfig, Snapshot, Strategy};
use crate::error::GatewayError;
use crate::providers::{self, Resolution, Target};
use crate::wire::openai::ChatRequest;

/// Largest upstream body the gateway buffers (non-streamed responses and error bodies).
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// Error bodies are only needed for their message.
const MAX_UPSTREAM_ERROR_BODY: usize = 1024 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    ChatCompletions,
    Models,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Endpoint> {
        let rest = path.strip_prefix("/openai/v1").or_else(|| path.strip_prefix("/v1"))?;
        match rest {
            "/chat/completions" => Some(Endpoint::ChatCompletions),
            "/models" => Some(Endpoint::Models),
            _ => None,
        }
    }

    fn method(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "POST",
            Endpoint::Models => "GET",
        }
    }
}

pub async fn handle(state: &GatewayState, session: &mut Session, ctx: &mut RequestCtx) {
    let snapshot = state.store.load();
    if let Err(err) = serve(state, &snapshot, session, ctx).await {
        respond::error(session, ctx, &err).await;
    }
}

async fn serve(
    state: &GatewayState,
    snapshot: &Snapshot,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let req = session.req_header();
    let path = req.uri.path();
    let endpoint = Endpoint::from_path(path).ok_or_else(|| GatewayError::NotFound {
        code: "not_found",
        message: format!("unknown endpoint {} {path}", req.method),
    })?;
    if req.method.as_str() != endpoint.method() {
        return Err(GatewayError::MethodNotAllowed { allowed: endpoint.method() });
    }
    let principal = authenticate(session, snapshot)?;
    ctx.principal = Some(principal.clone());
    match endpoint {
        Endpoint::Models => list_models(session, ctx, snapshot, &principal).await,
        Endpoint::ChatCompletions => chat_completions(state, snapshot, session, ctx, &principal).await,
    }
}

fn authenticate(session: &Session, snapshot: &Snapshot) -> Result<Arc<Principal>, GatewayError> {
    let header = session.req_header().headers.get(http::header::AUTHORIZATION);
    let Some(token) = auth::bearer_token(header.map(|h| h.as_bytes())) else {
        return Err(GatewayError::Unauthorized {
            message: "missing API key; send Authorization: Bearer mlx_sk_...".into(),
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

/// What a model string resolved to.
struct Route {
    target: Target,
    resolution: Resolution,
    config: Option<Arc<RoutingConfig>>,
}

fn resolve(snapshot: &Snapshot, principal: &Principal, model: &str) -> Result<Route, GatewayError> {
    if let Some(slug) = model.strip_prefix('@') {
        let config =
            snapshot.routing_configs.get(slug).filter(|rc| *rc.project == *principal.project).ok_or_else(
                || GatewayError::NotFound {
                    code: "routing_config_not_found",
                    message: format!("routing config @{slug} not found"),
                },
            )?;
        let Strategy::Single { target } = &config.strategy;
        return Ok(Route {
            target: target.clone(),
            resolution: Resolution::Config,
            config: Some(config.clone()),
        });
    }
    let (target, resolution) = providers::resolve_model(&snapshot.providers, model)?;
    Ok(Route { target, resolution, config: None })
}

async fn chat_completions(
    state: &GatewayState,
    snapshot: &Snapshot,
    session: &mut Session,
    ctx: &mut RequestCtx,
    principal: &Principal,
) -> Result<(), GatewayError> {
    check_content_type(session)?;
    let settings = &snapshot.settings;
    let body = super::body::read_body(session, settings.max_body_bytes, settings.client_body_timeout).await?;
    ctx.bytes_in = body.len() as u64;
    let request = ChatRequest::parse(&body)?;
    let route = resolve(snapshot, principal, &request.model)?;
    let provider = route.target.provider.clone();
    ctx.provider = Some(provider.id.clone());
    ctx.model = Some(route.target.model.clone());
    ctx.resolution = Some(route.resolution);
    let upstream_body = Bytes::from(request.encode_for_upstream(&route.target.model));
    let accept = if request.stream { "text/event-stream" } else { "application/json" };
    drop(request);

    let path = provider.upstream_path("/chat/completions");
    let result = upstream::exchange(
        &state.connector,
        &state.metrics,
        settings,
        &provider,
        &path,
        upstream_body,
        accept,
    )
    .await;
    let mut ex = result?;
    ctx.ttfb = Some(ex.ttfb);
    let status = ex.header.status.as_u16();
    let mut headers = passthrough_headers(&ex.header);
    headers.push((name("x-modelux-provider-used"), provider.id.clone()));
    headers.push((name("x-modelux-model-used"), route.target.model.clone()));
    if let Some(rc) = &route.config {
        headers.push((name("x-modelux-routing-config"), format!("@{}", rc.slug)));
        headers.push((name("x-modelux-config-version"), format!("v{}", rc.version)));
    }

    if !(200..300).contains(&status) {
        let result = upstream_error(settings, &provider, &mut ex, status).await;
        ctx.upstream_time += ex.started.elapsed();
        match result {
            // Client errors from the upstream pass through verbatim (status, body, type).
            Ok((status, body)) => {
                respond::whole(session, ctx, status, headers, body).await;
                ctx.error_code = Some("upstream_client_error");
            }
            Err(e) => respond::error(session, ctx, &e).await,
        }
        upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
        return Ok(());
    }

    if is_event_stream(&ex.header) {
        stream(state, settings, &provider, session, ctx, ex, headers).await;
        return Ok(());
    }
    let body = upstream::read_all(&mut ex, MAX_UPSTREAM_BODY, &provider, settings).await;
    ctx.upstream_time += ex.started.elapsed();
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            ex.session.shutdown().await;
            return Err(e);
        }
    };
    // Answer first: returning the connection to the pool is not the client's business.
    respond::whole(session, ctx, status, headers, body).await;
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    Ok(())
}

/// Maps an upstream error status. 4xx other than credential failures pass through as they
/// are (`Ok`); credential failures and 5xx become gateway errors (`Err`, rendered as 502).
async fn upstream_error(
    settings: &config::Settings,
    provider: &providers::Provider,
    ex: &mut Exchange,
    status: u16,
) -> Result<(u16, Bytes), GatewayError> {
    let body = upstream::read_all(ex, MAX_UPSTREAM_ERROR_BODY, provider, settings).await.unwrap_or_default();
    if (400..500).contains(&status) && status != 401 && status != 403 {
        return Ok((status, body));
    }
    if status == 401 || status == 403 {
        // Never forward the upstream's words about our credential verbatim: it may echo it.
        return Err(GatewayError::UpstreamStatus {
            provider: provider.id.clone(),
            status,
            message: "check the provider's api_key".into(),
        });
    }
    Err(GatewayError::UpstreamStatus { provider: provider.id.clone(), status, message: error_message(&body) })
}

/// The human part of an upstream error body: OpenAI's `error.message`, else the text.
fn error_message(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_string));
    let mut msg = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    if msg.len() > 512 {
        let mut cut = 512;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push('…');
    }
    if msg.is_empty() {
        msg = "no error detail".into();
    }
    msg
}

fn is_event_stream(h: &ResponseHeader) -> bool {
    h.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"))
}

/// Upstream response headers worth keeping: the body's type, and the provider's request id,
/// rate-limit and processing-time headers the SDKs expose. Hop-by-hop and framing headers
/// are the gateway's own business.
fn passthrough_headers(h: &ResponseHeader) -> Headers {
    let mut out = Vec::with_capacity(8);
    for (n, value) in h.headers.iter() {
        let s = n.as_str();
        let keep = s == "content-type"
            || s == "x-request-id"
            || s == "retry-after"
            || s == "cache-control"
            || s.starts_with("openai-")
            || s.starts_with("x-ratelimit-");
        if let (true, Ok(v)) = (keep, value.to_str()) {
            out.push((n.clone(), v.to_string()));
        }
    }
    out
}

/// Streams an SSE body to the client chunk by chunk as it arrives. An upstream failure
/// after the first byte is reported in-stream (an OpenAI error event), then the stream
/// is closed cleanly.
async fn stream(
    state: &GatewayState,
    settings: &config::Settings,
    provider: &providers::Provider,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut ex: Exchange,
    mut headers: Headers,
) {
    headers.push((http::header::TRANSFER_ENCODING, "chunked".into()));
    let resp = match respond::header(200, headers, ctx) {
        Ok(h) => h,
        Err(e) => {
            ex.session.shutdown().await;
            respond::error(session, ctx, &e).await;
            return;
        }
    };
    ctx.status = 200;
    if session.write_response_header(Box::new(resp), false).await.is_err() {
        ctx.error_code = Some("client_disconnected");
        ex.session.shutdown().await;
        return;
    }
    loop {
        match upstream::next_chunk(&mut ex, provider, settings).await {
            Ok(Some(chunk)) => {
                let len = chunk.len() as u64;
                if session.write_response_body(Some(chunk), false).await.is_err() {
                    ctx.error_code = Some("client_disconnected");
                    ctx.upstream_time += ex.started.elapsed();
                    ex.session.shutdown().await;
                    return;
                }
                ctx.bytes_out += len;
            }
            Ok(None) => break,
            Err(e) => {
                ctx.upstream_time += ex.started.elapsed();
                ex.session.shutdown().await;
                ctx.error_code = Some("upstream_stream_error");
                let mut event = b"data: ".to_vec();
                event.extend_from_slice(&e.to_openai_body());
                event.extend_from_slice(b"\n\n");
                ctx.bytes_out += event.len() as u64;
                let _ = session.write_response_body(Some(Bytes::from(event)), true).await;
                return;
            }
        }
    }
    ctx.upstream_time += ex.started.elapsed();
    if session.write_response_body(None, true).await.is_err() {
        ctx.error_code = Some("client_disconnected");
    }
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
}

async fn list_models(
    session: &mut Session,
    ctx: &mut RequestCtx,
    snapshot: &Snapshot,
    principal: &Principal,
) -> Result<(), GatewayError> {
    let mut data = Vec::new();
    for (slug, _) in config::project_configs(snapshot, &principal.project) {
        data.push(serde_json::json!({"id": format!("@{slug}"), "object": "model", "created": 0, "owned_by": "modelux"}));
    }
    let mut providers: Vec<_> = snapshot.providers.values().collect();
    providers.sort_by(|a, b| a.id.cmp(&b.id));
    for p in providers {
        for m in &p.models {
            data.push(serde_json::json!({"id": format!("{}/{m}", p.id), "object": "model", "created": 0, "owned_by": p.id}));
        }
    }
    let body = serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
        .map_err(|e| GatewayError::internal(e.to_string()))?;
    respond::whole(
        session,
        ctx,
        200,
        vec![(http::header::CONTENT_TYPE, "application/json".into())],
        Bytes::from(body),
    )
    .await;
    Ok(())
}
