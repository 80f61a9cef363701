//! The response cache on the request path (PRODUCT.md §7; the key and the store are in
//! `crate::cache`). A request whose routing config (or project default) turns caching on
//! is decoded and keyed after admission: a hit is answered here, re-encoded in the caller's
//! wire format (streamed if it asked for a stream), at $0; a miss goes on as usual while
//! the answer it gets is collected on its way to the client (pieces shared, never
//! delaying one) and stored in `logging`, once the client has it all.
//!
//! `mode: semantic` tries the exact key first; on a miss it embeds the last user message
//! with the config's `embedding_model` (through the gateway's own provider, bounded by
//! `cache.embedding_timeout_ms`) and searches the request's partition (`cache::partition`)
//! for a stored question at least `threshold` similar. The miss's answer is indexed under
//! that vector once stored.

use bytes::Bytes;

use super::cache_fill::{Kind, Pending};
use super::headers::{name, Headers};
use super::{billing, respond, Req};
use crate::admission::RouteInfo;
use crate::auth::Principal;
use crate::cache::semantic::{self, Indexed};
use crate::cache::{self, Answer, Bypass, CacheSettings, Entry, Mode};
use crate::error::{GatewayError, Surface};
use crate::providers::{self, upstream};
use crate::spend::budgets::Evaluation;
use crate::spend::counters::to_nanos;
use crate::wire;

/// An embeddings answer larger than this is refused.
const MAX_EMBED_ANSWER: usize = 16 << 20;

/// The settings that decide for this request: its config's own `cache:` (which may turn
/// caching off), else its project's default. An experiment's request measures its
/// candidate: never answered from the cache.
fn settings<'s>(req: &Req<'s>, project: &str, info: &RouteInfo) -> Option<&'s CacheSettings> {
    if req.ctx.replay_of.is_some() {
        return None;
    }
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
/// A body's top level, values as sent (only the few the cache reads are parsed).
type Top<'b> = std::collections::BTreeMap<String, &'b serde_json::value::RawValue>;

fn parsed(raw: &serde_json::value::RawValue) -> serde_json::Value {
    serde_json::from_str(raw.get()).unwrap_or(serde_json::Value::Null)
}

/// The top-level fields of the body the canonical request does not model (OpenAI-only
/// fields it keeps are in the key already), or the bypass they call for.
fn extras(
    req: &Req<'_>,
    surface: Surface,
    raw: &Top<'_>,
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
                out.insert(k.clone(), parsed(v));
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
fn bypass_asked(req: &Req<'_>, raw: &Top<'_>) -> Option<Bypass> {
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
    let skip = raw.get("mlx:cache").map(|c| parsed(c)["skip"] == serde_json::Value::Bool(true));
    (skip == Some(true)).then_some(Bypass::Skip)
}

/// Looks the request up. `Ok(true)`: a hit, answered here. Otherwise the request goes on
/// (with `X-Modelux-Cache` set, and its answer to store when it is a miss).
pub async fn lookup(
    req: &mut Req<'_>,
    principal: &Principal,
    eval: &Evaluation<'_, '_>,
    info: &RouteInfo,
    model: &str,
    body: &Bytes,
) -> Result<bool, GatewayError> {
    let Some(settings) = settings(req, &principal.project, info) else { return Ok(false) };
    let metrics = &req.state.metrics;
    let surface = req.ctx.surface;
    let Ok(decoded) = wire::decode_request(surface, body) else { return Ok(false) };
    // The top level once more, for what the decoded request leaves out (read once here).
    let raw: Top<'_> = serde_json::from_slice(body).unwrap_or_default();
    // What the request may not use the cache for comes first: a `no-cache` never stores an
    // answer the rules keep out.
    let (extras, rule) = match extras(req, surface, &raw, &decoded, settings) {
        Ok(extras) => (extras, cache::admits(settings, &decoded).err()),
        Err(b) => (Fields::new(), Some(b)),
    };
    let bypass = rule.or_else(|| bypass_asked(req, &raw));
    let want_trace = raw.get("mlx:trace").is_some_and(|t| t.get() == "true");
    let asked = Asked { stream: decoded.stream, stream_usage: decoded.stream_usage, trace: want_trace };
    let (definition, route) = decision(req, info);
    let scope = cache::Scope {
        project: &principal.project,
        model,
        config: definition,
        route: &route,
        extras: &extras,
    };
    let key = cache::key(&scope, &decoded);
    let mut to_index = None;
    if bypass.is_none() {
        if let Some(entry) = fetch(req, &key, settings).await.filter(|e| matches!(e.answer, Answer::Chat(_)))
        {
            // A hit counts against the rate limits like any request (before it answers).
            billing::take_deferred(req.state, req.ctx).await?;
            metrics.cache_lookups.with_label_values(&["hit"]).inc();
            serve_hit(req, info, &entry, 1.0, asked).await;
            return Ok(true);
        }
        if let (Mode::Semantic, Some(model)) = (settings.mode, settings.embedding_model.as_deref()) {
            // The embeddings call costs money: a request over its rate limit never makes it.
            billing::take_deferred(req.state, req.ctx).await?;
            match semantic(req, settings, &scope, &decoded, model).await {
                Semantic::Hit(entry, similarity) => {
                    metrics.cache_lookups.with_label_values(&["hit"]).inc();
                    // The answer is free, the embeddings call was not: the budgets count
                    // it as spent (a budget already at its cap does not turn the hit away).
                    eval.charge(&*req.state.spend.counters, to_nanos(req.ctx.cache_embedding_usd));
                    serve_hit(req, info, &entry, similarity, asked).await;
                    return Ok(true);
                }
                Semantic::Miss(partition, vector) => to_index = Some((partition, vector)),
                Semantic::Skipped => {}
            }
        }
    }
    let vector = to_index.map(|(partition, vector)| Indexed {
        partition,
        answer: key,
        vector,
        expires_ms: cache::semantic::now_ms().saturating_add(settings.ttl.as_millis() as u64),
    });
    let kind = Kind::Chat { surface, streamed: decoded.stream };
    go_on(req, settings, bypass, key, kind, vector);
    Ok(false)
}

/// The entry stored under `key`. A store that cannot answer (Redis down or slow) is a
/// miss, counted: it never fails a request.
async fn fetch(req: &Req<'_>, key: &[u8; 32], settings: &CacheSettings) -> Option<std::sync::Arc<Entry>> {
    match req.state.cache.get(key, settings.ttl).await {
        Ok(entry) => entry,
        Err(e) => {
            req.state.metrics.cache_errors.with_label_values(&["get"]).inc();
            tracing::debug!(error = %e, "response cache unavailable");
            None
        }
    }
}

/// The named config's definition and where the decision sends the request first (with
/// its A/B variant): part of every key.
fn decision<'s>(req: &Req<'s>, info: &RouteInfo) -> (Option<&'s str>, String) {
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
    (definition, route)
}

/// A request not answered from the cache goes on: counted, marked, and its answer to be
/// stored unless a bypass says otherwise.
fn go_on(
    req: &mut Req<'_>,
    settings: &CacheSettings,
    bypass: Option<Bypass>,
    key: [u8; 32],
    kind: Kind,
    vector: Option<Indexed>,
) {
    let label = if bypass.is_some() { "bypass" } else { "miss" };
    req.state.metrics.cache_lookups.with_label_values(&[label]).inc();
    req.ctx.cache_status = Some(if bypass.is_some() { "BYPASS" } else { "MISS" });
    if bypass.is_none_or(Bypass::stores) {
        req.ctx.cache_pending = Some(Box::new(Pending {
            store: req.state.cache.clone(),
            metrics: req.state.metrics.clone(),
            key,
            ttl: settings.ttl,
            max_bytes: settings.max_entry_bytes,
            kind,
            pieces: Vec::new(),
            len: 0,
            over: false,
            vector,
            max_vectors: req.snapshot.settings.cache_max_vectors,
            vectors: req.state.vectors.clone(),
        }));
    }
}

/// Embeddings requests: looked up by their exact key (`cache::embeddings_key`; semantic
/// mode does not apply), a hit encoded as the caller asks (`encoding_format`). Token-array
/// inputs are not cached.
pub async fn lookup_embeddings(
    req: &mut Req<'_>,
    principal: &Principal,
    info: &RouteInfo,
    model: &str,
    body: &Bytes,
) -> Result<bool, GatewayError> {
    let Some(settings) = settings(req, &principal.project, info) else { return Ok(false) };
    let Ok((decoded, encoding)) = wire::embeddings::decode_request(body) else { return Ok(false) };
    let raw: Top<'_> = serde_json::from_slice(body).unwrap_or_default();
    let extras: Fields = raw
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("mlx:")
                && !matches!(k.as_str(), "model" | "input" | "dimensions" | "encoding_format" | "user")
        })
        .map(|(k, v)| (k.clone(), parsed(v)))
        .collect();
    let bypass = bypass_asked(req, &raw);
    let (definition, route) = decision(req, info);
    let scope = cache::Scope {
        project: &principal.project,
        model,
        config: definition,
        route: &route,
        extras: &extras,
    };
    let key = cache::embeddings_key(&scope, &decoded);
    if bypass.is_none() {
        if let Some(entry) = fetch(req, &key, settings).await {
            if let Answer::Embeddings(e) = &entry.answer {
                billing::take_deferred(req.state, req.ctx).await?;
                req.state.metrics.cache_lookups.with_label_values(&["hit"]).inc();
                let body = wire::embeddings::encode_response(e, &entry.model, encoding);
                answer_hit(req, info, &entry, 1.0, "application/json", false, body).await;
                return Ok(true);
            }
        }
    }
    go_on(req, settings, bypass, key, Kind::Embeddings, None);
    Ok(false)
}

enum Semantic {
    /// A stored answer to a question at least the threshold similar, and the similarity.
    Hit(std::sync::Arc<Entry>, f32),
    /// Nothing close enough: the answer is indexed under this partition and vector.
    Miss([u8; 32], Vec<f32>),
    /// Not looked up (the prompt cannot be, or the embeddings call failed).
    Skipped,
}

/// The semantic lookup after an exact miss.
async fn semantic(
    req: &mut Req<'_>,
    settings: &CacheSettings,
    scope: &cache::Scope<'_>,
    decoded: &wire::canonical::Request,
    model: &str,
) -> Semantic {
    let metrics = req.state.metrics.clone();
    // A prompt longer than what is embedded is not looked up: two long documents with
    // different questions at their ends would embed alike.
    let Some((partition, text)) = cache::partition(scope, decoded, model)
        .filter(|(_, text)| text.chars().nth(semantic::MAX_EMBED_CHARS).is_none())
    else {
        metrics.cache_semantic.with_label_values(&["unindexable"]).inc();
        return Semantic::Skipped;
    };
    let vector = match embed(req, model, &text).await {
        Ok((vector, cost)) => {
            req.ctx.cache_embedding_usd += cost;
            vector
        }
        Err(e) => {
            metrics.cache_semantic.with_label_values(&["error"]).inc();
            metrics.cache_errors.with_label_values(&["embed"]).inc();
            tracing::debug!(error = %e, model, "semantic cache: embeddings call failed; served uncached");
            return Semantic::Skipped;
        }
    };
    // f32 arithmetic: a paraphrase exactly at the threshold must not miss by 1e-7.
    let min = (settings.threshold - 1e-6) as f32;
    // Best first; a match whose answer left the store (evicted) is forgotten and the next
    // one tried.
    for found in req.state.vectors.search(&partition, &vector, min) {
        match req.state.cache.get(&found.answer, settings.ttl).await {
            Ok(Some(entry)) if matches!(entry.answer, Answer::Chat(_)) => {
                metrics.cache_semantic.with_label_values(&["hit"]).inc();
                // 1.0 is an exact hit's: a quantized similarity never rounds up to it.
                return Semantic::Hit(entry, found.similarity.min(0.9999));
            }
            Ok(_) => req.state.vectors.remove(partition, found.answer),
            Err(e) => {
                metrics.cache_errors.with_label_values(&["get"]).inc();
                tracing::debug!(error = %e, "response cache unavailable");
                break;
            }
        }
    }
    metrics.cache_semantic.with_label_values(&["miss"]).inc();
    Semantic::Miss(partition, vector)
}

/// Embeds `text` with `model` (`provider/model` or a bare name) through the gateway's own
/// provider: the vector, and what the call cost at the price table's rates.
async fn embed(req: &Req<'_>, model: &str, text: &str) -> Result<(Vec<f32>, f64), String> {
    let snapshot = req.snapshot;
    let settings = &snapshot.settings;
    let (target, _) = providers::resolve_model(&snapshot.providers, model).map_err(|e| e.to_string())?;
    let provider = &target.provider;
    let format = provider.format();
    let text: String = text.chars().take(semantic::MAX_EMBED_CHARS).collect();
    let canonical = wire::canonical::EmbeddingsRequest {
        model: target.model.clone(),
        inputs: vec![text],
        dimensions: None,
        user: None,
    };
    let body = wire::encode_embeddings(format, &canonical, &target.model).map_err(|e| e.to_string())?;
    let path = provider.embeddings_path(&target.model);
    let call = upstream::Call {
        method: "POST",
        path: &path,
        body: Bytes::from(body),
        accept: "application/json",
        extra_headers: &[],
        credential: None,
    };
    let state = req.state;
    let timeouts = settings.upstream_timeouts();
    let work = async {
        let (status, bytes) = upstream::round_trip(
            &state.connector,
            &state.metrics,
            &timeouts,
            provider,
            call,
            MAX_EMBED_ANSWER,
        )
        .await
        .map_err(|e| e.to_string())?;
        if !(200..300).contains(&status) {
            return Err(upstream::answered(provider, status, &bytes));
        }
        wire::decode_embeddings(format, &bytes)
    };
    let resp = tokio::time::timeout(settings.cache_embedding_timeout, work)
        .await
        .map_err(|_| format!("no answer within {} ms", settings.cache_embedding_timeout.as_millis()))??;
    let vector = resp.vectors.into_iter().next().ok_or("the embeddings answer has no vector")?;
    let tokens = if resp.input_tokens > 0 {
        resp.input_tokens
    } else {
        crate::estimate::reserved_tokens(canonical.inputs[0].len())
    };
    let cost = snapshot.prices.lookup(&target.model).map_or(0.0, |info| {
        info.rates().cost(&crate::prices::Tokens { input: tokens, ..Default::default() }).total
    });
    Ok((vector, cost))
}

/// How the client asked for its answer.
#[derive(Clone, Copy)]
struct Asked {
    stream: bool,
    stream_usage: bool,
    /// `"mlx:trace": true`: the decision trace goes in the answer.
    trace: bool,
}

/// Answers a chat request from the cache: the stored answer in the caller's format.
async fn serve_hit(req: &mut Req<'_>, info: &RouteInfo, entry: &Entry, similarity: f32, asked: Asked) {
    let Answer::Chat(response) = &entry.answer else { return };
    let surface = req.ctx.surface;
    let trace = if asked.trace { super::execute::trace_json(req.ctx) } else { None };
    let (content_type, body) = if asked.stream {
        // Anthropic streams always carry usage; OpenAI's when the client asked.
        let usage = asked.stream_usage || surface == Surface::Anthropic;
        ("text/event-stream", wire::stream_response(surface, response, usage, trace.as_deref()))
    } else {
        let body = wire::encode_response(surface, response);
        let body = match trace.as_ref().and_then(|t| super::execute::inject_trace(&body, t)) {
            Some(with) => with,
            None => body,
        };
        ("application/json", body)
    };
    answer_hit(req, info, entry, similarity, content_type, asked.stream, body).await;
}

/// Sends a hit's answer, at $0.
async fn answer_hit(
    req: &mut Req<'_>,
    info: &RouteInfo,
    entry: &Entry,
    similarity: f32,
    content_type: &str,
    stream: bool,
    body: Vec<u8>,
) {
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
    ctx.cache_similarity = Some(similarity);
    ctx.bill.cost_header = true;
    respond::whole(req.session, ctx, 200, headers, Bytes::from(body)).await;
}
