//! The response cache on the request path (PRODUCT.md §7; the key and the store are in
//! `crate::cache`). A request whose routing config (or project default) turns caching on
//! is decoded and keyed after admission: a hit is answered here, re-encoded in the caller's
//! wire format (streamed if it asked for a stream), at $0; a miss goes on as usual while
//! the answer it gets is collected on its way to the client (pieces shared, never
//! delaying one) and stored in `logging`, once the client has it all.

use bytes::Bytes;

use super::cache_fill::Pending;
use super::headers::{name, Headers};
use super::{respond, Req};
use crate::admission::RouteInfo;
use crate::auth::Principal;
use crate::cache::{self, Bypass, CacheSettings, Entry};
use crate::error::{GatewayError, Surface};
use crate::wire;

/// The settings that decide for this request: its config's own `cache:` (which may turn
/// caching off), else its project's default.
fn settings<'s>(req: &Req<'s>, project: &str, info: &RouteInfo) -> Option<&'s CacheSettings> {
    let snapshot = req.snapshot;
    let own = info.config.as_ref().and_then(|(slug, _)| snapshot.routing_configs.get(slug)?.cache.as_ref());
    match own {
        Some(choice) => choice.as_ref(),
        None => snapshot.project_cache.get(project),
    }
}

/// Top-level request fields the canonical request models (the key reads them decoded);
/// any other field, and `anthropic-beta`, goes into the key as sent.
fn modeled(surface: Surface, field: &str) -> bool {
    field.starts_with("mlx:")
        || match surface {
            Surface::OpenAi => matches!(
                field,
                "model"
                    | "messages"
                    | "max_tokens"
                    | "max_completion_tokens"
                    | "temperature"
                    | "top_p"
                    | "stop"
                    | "stream"
                    | "stream_options"
                    | "tools"
                    | "tool_choice"
                    | "parallel_tool_calls"
                    | "user"
                    | "metadata"
            ),
            Surface::Anthropic => matches!(
                field,
                "model"
                    | "messages"
                    | "system"
                    | "max_tokens"
                    | "temperature"
                    | "top_p"
                    | "stop_sequences"
                    | "stream"
                    | "tools"
                    | "tool_choice"
                    | "metadata"
            ),
        }
}

type Fields = serde_json::Map<String, serde_json::Value>;

/// The top-level fields of the body the canonical request does not model (OpenAI-only
/// fields it keeps are in the key already), or the bypass they call for.
fn extras(
    req: &Req<'_>,
    surface: Surface,
    raw: &Fields,
    decoded: &wire::canonical::Request,
    settings: &CacheSettings,
) -> Result<Fields, Bypass> {
    let mut out = Fields::new();
    for (k, v) in raw {
        if modeled(surface, k) || decoded.openai_only.iter().any(|(name, _)| name == k) {
            continue;
        }
        match k.as_str() {
            // The legacy tool fields are tools.
            "functions" | "function_call" if !settings.allow_tools => return Err(Bypass::Tools),
            // Audio output is not kept by an entry.
            "audio" | "modalities" => return Err(Bypass::Unkept),
            // Enabled thinking is the canonical budget; any other shape goes in as sent.
            "thinking" if decoded.thinking_budget.is_some() => continue,
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    if surface == Surface::Anthropic {
        if let Some(beta) =
            req.session.req_header().headers.get("anthropic-beta").and_then(|v| v.to_str().ok())
        {
            out.insert("anthropic-beta".into(), serde_json::Value::String(beta.to_string()));
        }
    }
    Ok(out)
}

/// `Cache-Control: no-store` / `no-cache`, or `"mlx:cache": {"skip": true}` in the body.
fn bypass_asked(req: &Req<'_>, raw: &Fields) -> Option<Bypass> {
    let headers = &req.session.req_header().headers;
    let directives: Vec<String> = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .flat_map(|v| {
            v.to_str().unwrap_or("").split(',').map(|d| d.trim().to_ascii_lowercase()).collect::<Vec<_>>()
        })
        .collect();
    // `no-store` anywhere wins over `no-cache`.
    if directives.iter().any(|d| d == "no-store") {
        return Some(Bypass::NoStore);
    }
    if directives.iter().any(|d| d == "no-cache") {
        return Some(Bypass::NoCache);
    }
    let skip = raw.get("mlx:cache").and_then(|c| c.get("skip"));
    (skip == Some(&serde_json::Value::Bool(true))).then_some(Bypass::Skip)
}

/// Looks the request up. `Ok(true)`: a hit, answered here. Otherwise the request goes on
/// (with `X-Modelux-Cache` set, and its answer to store when it is a miss).
pub async fn lookup(
    req: &mut Req<'_>,
    principal: &Principal,
    info: &RouteInfo,
    model: &str,
    body: &Bytes,
) -> Result<bool, GatewayError> {
    let Some(settings) = settings(req, &principal.project, info) else { return Ok(false) };
    // An experiment's request measures its candidate: never answered from the cache.
    if req.ctx.replay_of.is_some() {
        return Ok(false);
    }
    let metrics = &req.state.metrics;
    let surface = req.ctx.surface;
    let Ok(decoded) = wire::decode_request(surface, body) else { return Ok(false) };
    // The top level once more, for what the decoded request leaves out (read once here).
    let raw: Fields = serde_json::from_slice(body).unwrap_or_default();
    // What the request may not use the cache for comes first: a `no-cache` never stores an
    // answer the rules keep out.
    let (extras, rule) = match extras(req, surface, &raw, &decoded, settings) {
        Ok(extras) => (extras, cache::admits(settings, &decoded).err()),
        Err(b) => (Fields::new(), Some(b)),
    };
    let bypass = rule.or_else(|| bypass_asked(req, &raw));
    let snapshot = req.snapshot;
    let definition = info
        .config
        .as_ref()
        .and_then(|(slug, _)| snapshot.routing_configs.get(slug))
        .map(|c| c.definition.as_str());
    let route = format!(
        "{}/{}#{}",
        req.ctx.provider.as_deref().unwrap_or(""),
        req.ctx.model.as_deref().unwrap_or(""),
        info.ab_variant.as_deref().unwrap_or("")
    );
    let scope = cache::Scope {
        project: &principal.project,
        model,
        config: definition,
        route: &route,
        extras: &extras,
    };
    let key = cache::key(&scope, &decoded);
    if bypass.is_none() {
        match req.state.cache.get(&key, settings.ttl).await {
            Ok(Some(entry)) => {
                metrics.cache_lookups.with_label_values(&["hit"]).inc();
                serve_hit(req, info, &entry, decoded.stream, decoded.stream_usage).await;
                return Ok(true);
            }
            Ok(None) => {}
            // Served uncached: a store that is down never fails a request.
            Err(e) => {
                metrics.cache_errors.with_label_values(&["get"]).inc();
                tracing::debug!(error = %e, "response cache unavailable");
            }
        }
    }
    let label = if bypass.is_some() { "bypass" } else { "miss" };
    metrics.cache_lookups.with_label_values(&[label]).inc();
    req.ctx.cache_status = Some(if bypass.is_some() { "BYPASS" } else { "MISS" });
    if bypass.is_none_or(Bypass::stores) {
        req.ctx.cache_pending = Some(Box::new(Pending {
            store: req.state.cache.clone(),
            metrics: req.state.metrics.clone(),
            key,
            ttl: settings.ttl,
            max_bytes: settings.max_entry_bytes,
            surface,
            streamed: decoded.stream,
            pieces: Vec::new(),
            len: 0,
            over: false,
        }));
    }
    Ok(false)
}

/// Answers from the cache: the stored answer in the caller's format, at $0.
async fn serve_hit(req: &mut Req<'_>, info: &RouteInfo, entry: &Entry, stream: bool, stream_usage: bool) {
    let surface = req.ctx.surface;
    let (content_type, body) = if stream {
        // Anthropic streams always carry usage; OpenAI's when the client asked.
        let usage = stream_usage || surface == Surface::Anthropic;
        ("text/event-stream", wire::stream_response(surface, &entry.response, usage, None))
    } else {
        ("application/json", wire::encode_response(surface, &entry.response))
    };
    let mut headers: Headers = vec![(http::header::CONTENT_TYPE, content_type.to_string())];
    headers.push((name("x-modelux-provider-used"), entry.provider.clone()));
    headers.push((name("x-modelux-model-used"), entry.model.clone()));
    if let Some((slug, version)) = &info.config {
        headers.push((name("x-modelux-routing-config"), format!("@{slug}")));
        headers.push((name("x-modelux-config-version"), format!("v{version}")));
    }
    let ctx = &mut *req.ctx;
    ctx.provider = Some(entry.provider.clone());
    ctx.model = Some(entry.model.clone());
    ctx.served = true;
    ctx.streamed = stream;
    ctx.cache_hit = Some(entry.cost_usd);
    ctx.cache_status = Some("HIT");
    ctx.bill.cost_header = true;
    respond::whole(req.session, ctx, 200, headers, Bytes::from(body)).await;
}
