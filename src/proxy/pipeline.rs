//! One request, start to finish: endpoint → auth → body → decode → resolve → upstream →
//! answer. Any error returned before the first byte went downstream is rendered once, in
//! the client's wire format, by `handle`.

use std::sync::Arc;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::billing;
use super::execute;
use super::respond::{self, name, Headers};
use super::upstream::{self, Exchange};
use super::{GatewayState, RequestCtx};
use crate::auth::{self, Principal};
use crate::config::{self, Snapshot};
use crate::error::GatewayError;
use crate::error::{openai_error_body, Surface};
use crate::providers::{self, Resolution, Target};
use crate::routing::health::{now_ms, Health};
use crate::routing::trace::DecisionTrace;
use crate::routing::{self, Decision, Member, Plan, RequestFacts, RetryOn};
use crate::spend::budgets::{BudgetRequest, Evaluation};
use crate::spend::counters::to_usd;
use crate::wire::openai::{ChatRequest, Payload};
use crate::wire::{self, anthropic, Transcoder, WireFormat};
use serde_json::json;

/// Largest upstream body the gateway buffers (non-streamed responses and error bodies).
pub(super) const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// Error bodies are only needed for their message.
const MAX_UPSTREAM_ERROR_BODY: usize = 1024 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// OpenAI chat completions or Anthropic messages, by surface.
    Chat,
    Models,
    CountTokens,
    Embeddings,
    /// `POST …/dry-run`: the chat body, routed but never sent.
    DryRun,
}

impl Endpoint {
    /// `/v1/*` is the OpenAI surface (the modelux SDKs' base URL), except the Anthropic
    /// message paths: an Anthropic client whose base URL is the bare host calls
    /// `/v1/messages`, and one configured with `ANTHROPIC_BASE_URL=…/v1` (as the hosted
    /// service's coding-agent guide suggests) calls `/v1/v1/messages`.
    fn from_path(path: &str) -> Option<(Surface, Endpoint)> {
        let path = match path.strip_prefix("/v1/v1/") {
            Some(rest) if rest.starts_with("messages") => &path[3..],
            _ => path,
        };
        if let Some(rest) = path.strip_prefix("/anthropic/v1") {
            return match rest {
                "/messages" => Some((Surface::Anthropic, Endpoint::Chat)),
                "/messages/count_tokens" => Some((Surface::Anthropic, Endpoint::CountTokens)),
                "/models" => Some((Surface::Anthropic, Endpoint::Models)),
                "/dry-run" => Some((Surface::Anthropic, Endpoint::DryRun)),
                _ => None,
            };
        }
        let rest = path.strip_prefix("/openai/v1").or_else(|| path.strip_prefix("/v1"))?;
        match rest {
            "/chat/completions" => Some((Surface::OpenAi, Endpoint::Chat)),
            "/models" => Some((Surface::OpenAi, Endpoint::Models)),
            "/embeddings" => Some((Surface::OpenAi, Endpoint::Embeddings)),
            "/dry-run" => Some((Surface::OpenAi, Endpoint::DryRun)),
            "/messages" if path.starts_with("/v1/") => Some((Surface::Anthropic, Endpoint::Chat)),
            "/messages/count_tokens" if path.starts_with("/v1/") => {
                Some((Surface::Anthropic, Endpoint::CountTokens))
            }
            _ => None,
        }
    }

    fn method(self) -> &'static str {
        match self {
            Endpoint::Chat | Endpoint::CountTokens | Endpoint::Embeddings | Endpoint::DryRun => "POST",
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

/// Unknown paths are logged cut to this many characters.
const MAX_LOGGED_PATH: usize = 256;

async fn serve(
    state: &GatewayState,
    snapshot: &Snapshot,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let req = session.req_header();
    let path = req.uri.path();
    ctx.endpoint = path.chars().take(MAX_LOGGED_PATH).collect();
    ctx.body_cap = snapshot.settings.traces.max_body_bytes;
    if path.starts_with("/anthropic/") {
        ctx.surface = Surface::Anthropic;
    }
    let (surface, endpoint) = Endpoint::from_path(path).ok_or_else(|| GatewayError::NotFound {
        code: "not_found",
        message: format!("unknown endpoint {} {path}", req.method),
    })?;
    ctx.surface = surface;
    if req.method.as_str() != endpoint.method() {
        return Err(GatewayError::MethodNotAllowed { allowed: endpoint.method() });
    }
    let principal = authenticate(session, snapshot, surface)?;
    ctx.principal = Some(principal.clone());
    billing::check_requests(state, ctx, &principal)?;
    match endpoint {
        Endpoint::Models => list_models(session, ctx, snapshot, &principal, surface).await,
        Endpoint::Chat => chat(state, snapshot, session, ctx, &principal, surface, false).await,
        Endpoint::DryRun => chat(state, snapshot, session, ctx, &principal, surface, true).await,
        Endpoint::CountTokens => count_tokens(state, snapshot, session, ctx, &principal).await,
        Endpoint::Embeddings => embeddings(state, snapshot, session, ctx, &principal).await,
    }
}

/// `Authorization: Bearer` on both surfaces; `x-api-key` too on the Anthropic surface
/// (what the Anthropic SDK sends).
fn authenticate(
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

/// What a request's `model` resolved to: a routing decision, or one directly named model.
enum Routed<'a> {
    Config(Decision<'a>),
    Direct { member: Box<Member>, resolution: Resolution },
}

impl Routed<'_> {
    fn resolution(&self) -> Resolution {
        match self {
            Routed::Config(_) => Resolution::Config,
            Routed::Direct { resolution, .. } => *resolution,
        }
    }

    /// The first choice (what single-target endpoints use).
    fn first(&self) -> Result<&Member, GatewayError> {
        match self {
            Routed::Config(d) => d.attempts().next().map(|c| c.member),
            Routed::Direct { member, .. } => Some(member.as_ref()),
        }
        .ok_or_else(|| GatewayError::internal("the routing decision has no candidate"))
    }

    /// Members in attempt order.
    fn attempts(&self) -> Vec<&Member> {
        match self {
            Routed::Config(d) => d.attempts().map(|c| c.member).collect(),
            Routed::Direct { member, .. } => vec![member.as_ref()],
        }
    }

    fn served<'m>(&self, member: &'m Member, attempt: usize) -> Served<'m> {
        Served::new(&self.info(), member, attempt)
    }

    fn info(&self) -> RouteInfo {
        match self {
            Routed::Config(d) => RouteInfo {
                config: Some((d.entry().slug.clone(), d.entry().version)),
                ab_variant: d.ab_variant().map(str::to_string),
            },
            Routed::Direct { .. } => RouteInfo { config: None, ab_variant: None },
        }
    }
}

/// The routing facts every answer's headers name, whichever attempt answers.
pub(super) struct RouteInfo {
    /// Slug and version of the config the client named.
    pub config: Option<(String, u32)>,
    pub ab_variant: Option<String>,
}

/// Who answered, for the response headers.
pub(super) struct Served<'a> {
    pub target: &'a Target,
    pub config: Option<(String, u32)>,
    pub ab_variant: Option<String>,
    /// Which attempt (1-based) answered.
    pub attempt: usize,
}

impl<'a> Served<'a> {
    pub fn new(info: &RouteInfo, member: &'a Member, attempt: usize) -> Served<'a> {
        Served {
            target: &member.target,
            config: info.config.clone(),
            ab_variant: info.ab_variant.clone(),
            attempt,
        }
    }
}

/// Request headers and body fields routing looks at (header wins over body, PRODUCT.md §3.3).
struct Context {
    tags: Vec<(String, String)>,
    end_user: Option<String>,
    trace_id: Option<String>,
    conversation_id: Option<String>,
    dry_run: bool,
}

fn request_context(session: &Session, ctx: &mut RequestCtx, request: &ChatRequest<'_>) -> Context {
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
    // `metadata.*` is the fallback for all three (PRODUCT.md §3.4); parsed only when present.
    let metadata = request.metadata();
    let from_metadata = |key: &str| metadata.as_ref().and_then(|m| m.get(key)).cloned();
    let rc = Context {
        tags,
        end_user: get("x-modelux-user-id")
            .map(str::to_string)
            .or_else(|| request.end_user.clone())
            .or_else(|| from_metadata("user_id")),
        trace_id: get("x-modelux-trace-id").map(str::to_string).or_else(|| from_metadata("trace_id")),
        conversation_id: get("x-modelux-conversation-id")
            .map(str::to_string)
            .or_else(|| from_metadata("conversation_id")),
        dry_run: get("x-modelux-dry-run").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
    };
    ctx.meta = super::RequestMeta {
        model_requested: Some(request.model.clone()),
        tags: rc.tags.clone(),
        end_user: rc.end_user.clone(),
        trace_id: rc.trace_id.clone(),
        conversation_id: rc.conversation_id.clone(),
    };
    rc
}

/// Resolves the model: `@slug` runs the config's strategy; anything else names one model.
/// `lease`: let the decision take half-open probe leases (not for dry runs).
fn route<'a>(
    snapshot: &'a Snapshot,
    principal: &Principal,
    ctx: &mut RequestCtx,
    model: &str,
    facts: &RequestFacts<'_>,
    lease: bool,
    any_project: bool,
) -> Result<Routed<'a>, GatewayError> {
    let now = now_ms();
    let routed = if let Some(slug) = model.strip_prefix('@') {
        let config = snapshot
            .routing_configs
            .get(slug)
            .filter(|rc| any_project || *rc.project == *principal.project)
            .ok_or_else(|| GatewayError::NotFound {
                code: "routing_config_not_found",
                message: format!("routing config @{slug} not found"),
            })?;
        let decision = routing::decide(snapshot, config, facts, now, lease);
        if decision.candidates.is_empty() {
            return Err(GatewayError::internal(format!("routing config @{slug} produced no candidate")));
        }
        ctx.trace = Some(Box::new(DecisionTrace::from_decision(&decision, now, &snapshot.health_settings)));
        Routed::Config(decision)
    } else {
        let (target, resolution) = providers::resolve_model(&snapshot.providers, model)?;
        let provider_id = target.provider.id.as_str();
        let health = snapshot
            .health
            .cell_for_traffic(provider_id, &target.model)
            .unwrap_or_else(|| Arc::new(Health::new(format!("{provider_id}/{}", target.model))));
        let report = health.report(now, &snapshot.health_settings).into();
        ctx.trace =
            Some(Box::new(DecisionTrace::direct(resolution.as_str(), provider_id, &target.model, report)));
        let rates = snapshot.prices.lookup(&target.model).map(|i| i.rates());
        let member = Member {
            provider_health: snapshot.health.cell(provider_id),
            health,
            target,
            timeout: None,
            weight: 1.0,
            accept: None,
            price: None,
            tier: None,
            rates,
        };
        Routed::Direct { member: Box::new(member), resolution }
    };
    ctx.resolution = Some(routed.resolution());
    let first = routed.first()?;
    ctx.provider = Some(first.target.provider.id.clone());
    ctx.model = Some(first.target.model.clone());
    Ok(routed)
}

/// The JSON body of a routed request: content type checked, size and time bounded.
async fn read_json_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    settings: &config::Settings,
) -> Result<Bytes, GatewayError> {
    check_content_type(session)?;
    let body = super::body::read_body(session, settings.max_body_bytes, settings.client_body_timeout).await?;
    ctx.bytes_in = body.len() as u64;
    if ctx.body_cap > 0 {
        ctx.request_body = crate::trace::record::capped_body(&body, ctx.body_cap);
    }
    Ok(body)
}

/// Client `anthropic-version` / `anthropic-beta` headers, forwarded verbatim to
/// Anthropic-family upstreams.
fn anthropic_headers(session: &Session, client: Surface) -> Vec<(String, String)> {
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

async fn chat(
    state: &GatewayState,
    snapshot: &Snapshot,
    session: &mut Session,
    ctx: &mut RequestCtx,
    principal: &Principal,
    client: Surface,
    dry_run_endpoint: bool,
) -> Result<(), GatewayError> {
    let settings = &snapshot.settings;
    let body = read_json_body(session, ctx, settings).await?;
    let request = ChatRequest::parse(&body)?;
    let rc = request_context(session, ctx, &request);
    let mut facts = facts(&request, &rc, &body);
    let dry_run = dry_run_endpoint || rc.dry_run;
    ctx.bill.est_input_tokens = reserved_input_tokens(&body);
    if !dry_run {
        let estimate = facts
            .est_input_tokens
            .saturating_add(request.max_tokens.unwrap_or(0).saturating_mul(request.choices));
        billing::charge_tokens(state, ctx, principal, estimate)?;
    }
    let (eval, routed) = admit(state, snapshot, ctx, principal, &request.model, &rc, &mut facts, !dry_run)?;
    if dry_run {
        return answer_dry_run(session, ctx, &routed, &facts, 1024).await;
    }
    let anthropic_headers = anthropic_headers(session, client);
    let mut exec = execute::Exec {
        state,
        settings,
        client,
        request: &request,
        body: &body,
        canonical: None,
        anthropic_headers,
        want_trace: request.trace,
        health: &snapshot.health_settings,
    };
    let attempts = routed.attempts();
    let info = routed.info();
    let plan = match &routed {
        Routed::Config(d) => d.plan,
        Routed::Direct { .. } => {
            Plan::Sequential { retry_on: RetryOn::NONE, total_budget: None, cascade: false }
        }
    };
    // Ensembles bill every member, cascades every step they try.
    let all_answer = matches!(plan, Plan::Parallel { .. } | Plan::Sequential { cascade: true, .. });
    let usd = billing::max_cost(
        snapshot,
        &attempts,
        all_answer,
        ctx.bill.est_input_tokens,
        request.max_tokens,
        request.choices,
    );
    billing::reserve(state, ctx, &eval, usd)?;
    match plan {
        Plan::Sequential { retry_on, total_budget, cascade } => {
            execute::sequential(&mut exec, session, ctx, &attempts, retry_on, total_budget, cascade, &info)
                .await
        }
        Plan::Parallel { aggregation, timeout } => {
            execute::parallel(&mut exec, session, ctx, &attempts, aggregation, timeout, &info).await
        }
    }
}

/// Prompt tokens a reservation assumes: three body bytes a token, a deliberate overcount
/// (English runs about four; CJK text about three in UTF-8).
fn reserved_input_tokens(body: &[u8]) -> u64 {
    (body.len() as u64).div_ceil(3)
}

/// Budgets, then routing: a budget at its cap blocks (402) or downgrades the request to
/// its `downgrade_to` before the routing decision; remaining budget is a routing fact.
#[allow(clippy::too_many_arguments)]
fn admit<'s, 'r>(
    state: &GatewayState,
    snapshot: &'s Snapshot,
    ctx: &mut RequestCtx,
    principal: &'r Principal,
    model: &'r str,
    rc: &'r Context,
    facts: &mut RequestFacts<'_>,
    lease: bool,
) -> Result<(Evaluation<'s, 'r>, Routed<'s>), GatewayError> {
    let slug = model.strip_prefix('@');
    let req = BudgetRequest {
        project: &principal.project,
        config: slug,
        end_user: rc.end_user.as_deref(),
        tags: &rc.tags,
    };
    let (eval, downgrade) = billing::evaluate(state, snapshot, ctx, &req, slug.is_some())?;
    if let Some(hit) = eval.applied() {
        let remaining = to_usd(hit.remaining());
        facts.budget_remaining_usd = Some(remaining);
        facts.budget_remaining_pct =
            Some(if hit.budget.cap_usd > 0.0 { remaining / hit.budget.cap_usd * 100.0 } else { 0.0 });
    }
    let routed = match &downgrade {
        Some(to) => route(snapshot, principal, ctx, to, facts, lease, true)?,
        None => route(snapshot, principal, ctx, model, facts, lease, false)?,
    };
    billing::record_budget(ctx, downgrade.map(|_| model.to_string()));
    Ok((eval, routed))
}

fn facts<'a>(request: &'a ChatRequest<'_>, rc: &'a Context, body: &[u8]) -> RequestFacts<'a> {
    RequestFacts {
        model: &request.model,
        tags: &rc.tags,
        end_user: rc.end_user.as_deref(),
        trace_id: rc.trace_id.as_deref(),
        // About four bytes of JSON per prompt token: close enough to rank candidates.
        est_input_tokens: (body.len() as u64).div_ceil(4),
        max_tokens: request.max_tokens,
        budget_remaining_usd: None,
        budget_remaining_pct: None,
    }
}

/// The routing decision, without calling an upstream (PRODUCT.md §3.5).
async fn answer_dry_run(
    session: &mut Session,
    ctx: &mut RequestCtx,
    routed: &Routed<'_>,
    facts: &RequestFacts<'_>,
    default_output: u64,
) -> Result<(), GatewayError> {
    let attempts = routed.attempts();
    let selected =
        attempts.first().map(|m| json!({"provider": m.target.provider.id, "model": m.target.model}));
    let estimated = attempts.first().and_then(|m| m.rates).map(|r| {
        facts.est_input_tokens as f64 * r.input + facts.max_tokens.unwrap_or(default_output) as f64 * r.output
    });
    let trace = ctx.trace.as_deref();
    let body = json!({
        "object": "modelux.dry_run",
        "request_id": ctx.request_id,
        "resolved": routed.resolution().as_str(),
        "routing_config": trace.and_then(|t| t.routing_config.clone()),
        "config_version": trace.and_then(|t| t.config_version),
        "strategy": trace.map(|t| t.strategy),
        "ab_variant": trace.and_then(|t| t.ab_variant.clone()),
        "hops": trace.map(|t| t.hops.clone()).unwrap_or_default(),
        "selected": selected,
        "candidates": trace.map(|t| t.candidates.clone()).unwrap_or_default(),
        "estimated_cost_usd": estimated,
        "budget": trace.and_then(|t| t.budget.clone()),
        "cache": "MISS",
    });
    let body = serde_json::to_vec(&body).map_err(|e| GatewayError::internal(e.to_string()))?;
    let mut headers: Headers = vec![(http::header::CONTENT_TYPE, "application/json".into())];
    headers.push((name("x-modelux-dry-run"), "true".into()));
    if let Some(m) = attempts.first() {
        push_route_headers(&mut headers, &routed.served(m, 0));
    }
    respond::whole(session, ctx, 200, headers, Bytes::from(body)).await;
    Ok(())
}

/// `POST /openai/v1/embeddings`: OpenAI-family targets get the client's bytes (model
/// rewritten); Google and Cohere get a translated request, and the answer comes back as an
/// OpenAI embedding list in the encoding the client asked for.
async fn embeddings(
    state: &GatewayState,
    snapshot: &Snapshot,
    session: &mut Session,
    ctx: &mut RequestCtx,
    principal: &Principal,
) -> Result<(), GatewayError> {
    let settings = &snapshot.settings;
    let body = read_json_body(session, ctx, settings).await?;
    let request = ChatRequest::parse_routed(&body, Payload::Input)?;
    let rc = request_context(session, ctx, &request);
    let mut facts = facts(&request, &rc, &body);
    ctx.bill.est_input_tokens = reserved_input_tokens(&body);
    if !rc.dry_run {
        billing::charge_tokens(state, ctx, principal, facts.est_input_tokens)?;
    }
    let (eval, routed) =
        admit(state, snapshot, ctx, principal, &request.model, &rc, &mut facts, !rc.dry_run)?;
    if rc.dry_run {
        return answer_dry_run(session, ctx, &routed, &facts, 0).await;
    }
    let member = routed.first()?;
    let usd = billing::max_cost(snapshot, &[member], false, ctx.bill.est_input_tokens, Some(0), 1);
    billing::reserve(state, ctx, &eval, usd)?;
    ctx.bill.rates = member.rates;
    let served = routed.served(member, 1);
    let provider = member.target.provider.clone();
    let format = provider.format();
    let model = member.target.model.as_str();
    let (upstream_body, translation) = match format {
        WireFormat::OpenAi => (Bytes::from(request.encode_for_upstream(model)), None),
        _ => {
            drop(request);
            let (canonical, encoding) = wire::embeddings::decode_request(&body)?;
            (Bytes::from(wire::encode_embeddings(format, &canonical, model)?), Some(encoding))
        }
    };
    let path = provider.embeddings_path(model);
    let call =
        upstream::Call { path: &path, body: upstream_body, accept: "application/json", extra_headers: &[] };
    let ex = upstream::exchange(&state.connector, &state.metrics, settings, &provider, call).await?;
    ctx.ttfb = Some(ex.ttfb);
    let headers = answer_headers(&ex.header, translation.is_some(), &served);
    if !ex.header.status.is_success() {
        answer_upstream_error(
            state,
            settings,
            &provider,
            session,
            ctx,
            ex,
            headers,
            Surface::OpenAi,
            translation.is_some(),
        )
        .await;
        return Ok(());
    }
    let convert = |body: &[u8]| {
        let encoding = translation.unwrap_or(wire::embeddings::Encoding::Float);
        wire::decode_embeddings(format, body)
            .map(|resp| wire::embeddings::encode_response(&resp, model, encoding))
    };
    let convert: Convert<'_> = if translation.is_some() { Some(&convert) } else { None };
    answer_whole(state, settings, &provider, session, ctx, ex, headers, convert).await
}

/// Headers for the client's answer: the upstream's own (only `retry-after` when the body
/// is translated, the rest describing the upstream's format), then the route's.
pub(super) fn answer_headers(upstream: &ResponseHeader, translated: bool, served: &Served<'_>) -> Headers {
    let mut headers = if translated { retry_after(upstream) } else { passthrough_headers(upstream) };
    push_route_headers(&mut headers, served);
    headers
}

/// Which provider and model served the request, and the routing config that chose them.
fn push_route_headers(headers: &mut Headers, served: &Served<'_>) {
    headers.push((name("x-modelux-provider-used"), served.target.provider.id.clone()));
    headers.push((name("x-modelux-model-used"), served.target.model.clone()));
    if let Some((slug, version)) = &served.config {
        headers.push((name("x-modelux-routing-config"), format!("@{slug}")));
        headers.push((name("x-modelux-config-version"), format!("v{version}")));
    }
    if let Some(variant) = &served.ab_variant {
        headers.push((name("x-modelux-ab-variant"), variant.clone()));
    }
    if served.attempt > 0 {
        headers.push((name("x-modelux-attempts"), served.attempt.to_string()));
    }
}

/// Turns a whole upstream body into the client's format; `Err` means undecodable.
type Convert<'a> = Option<&'a (dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Sync)>;

/// Answers an upstream error status. Same format: 4xx pass through verbatim. Translated:
/// same status and the upstream's message, in the client's envelope. Credential failures
/// and 5xx become gateway errors (502).
#[allow(clippy::too_many_arguments)]
pub(super) async fn answer_upstream_error(
    state: &GatewayState,
    settings: &config::Settings,
    provider: &providers::Provider,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut ex: Exchange,
    mut headers: Headers,
    client: Surface,
    translated: bool,
) {
    let status = ex.header.status.as_u16();
    let result = upstream_error(settings, provider, &mut ex, status).await;
    ctx.upstream_time += ex.started.elapsed();
    match result {
        Ok((status, body)) if !translated => {
            respond::whole(session, ctx, status, headers, body).await;
            ctx.error_code = Some("upstream_client_error");
        }
        Ok((status, body)) => {
            let message = error_message(provider.format(), &body);
            let rendered = match client {
                Surface::OpenAi => {
                    openai_error_body(openai_error_type(status), &message, "upstream_client_error")
                }
                Surface::Anthropic => anthropic::error_body(anthropic::error_type(status), &message),
            };
            headers.push((http::header::CONTENT_TYPE, "application/json".into()));
            respond::whole(session, ctx, status, headers, Bytes::from(rendered)).await;
            ctx.error_code = Some("upstream_client_error");
        }
        Err(e) => respond::error(session, ctx, &e).await,
    }
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
}

/// Reads a whole 2xx upstream body and answers with it, converted to the client's format
/// when `convert` is given (its `Err` means the upstream sent something undecodable: 502).
#[allow(clippy::too_many_arguments)]
async fn answer_whole(
    state: &GatewayState,
    settings: &config::Settings,
    provider: &providers::Provider,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut ex: Exchange,
    mut headers: Headers,
    convert: Convert<'_>,
) -> Result<(), GatewayError> {
    let status = ex.header.status.as_u16();
    let body = upstream::read_all(&mut ex, MAX_UPSTREAM_BODY, provider, settings).await;
    ctx.upstream_time += ex.started.elapsed();
    let mut body = match body {
        Ok(b) => b,
        Err(e) => {
            ex.session.shutdown().await;
            return Err(e);
        }
    };
    if let Some(convert) = convert {
        match convert(&body) {
            Ok(converted) => body = Bytes::from(converted),
            Err(message) => {
                upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
                return Err(GatewayError::UpstreamStatus { provider: provider.id.clone(), status, message });
            }
        }
        headers.push((http::header::CONTENT_TYPE, "application/json".into()));
    }
    // The body is OpenAI-shaped by now (embeddings answer on the OpenAI surface only).
    billing::bill_answer(state, ctx, wire::usage::from_body(WireFormat::OpenAi, &body), true, 0);
    ctx.bill.cost_header = true;
    // Answer first: returning the connection to the pool is not the client's business.
    respond::whole(session, ctx, status, headers, body).await;
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    Ok(())
}

/// OpenAI-style `error.type` for a status passed from a translated upstream.
fn openai_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        _ => "invalid_request_error",
    }
}

/// Only `retry-after` survives a translation: the other upstream headers describe the
/// upstream's wire format, not the client's.
fn retry_after(h: &ResponseHeader) -> Headers {
    h.headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(|v| vec![(http::header::RETRY_AFTER, v.to_string())])
        .unwrap_or_default()
}

/// `POST /anthropic/v1/messages/count_tokens`: forwarded to Anthropic-family targets,
/// estimated locally (4 characters per token) for the others.
async fn count_tokens(
    state: &GatewayState,
    snapshot: &Snapshot,
    session: &mut Session,
    ctx: &mut RequestCtx,
    principal: &Principal,
) -> Result<(), GatewayError> {
    let settings = &snapshot.settings;
    let body = read_json_body(session, ctx, settings).await?;
    let request = ChatRequest::parse(&body)?;
    let rc = request_context(session, ctx, &request);
    let facts = facts(&request, &rc, &body);
    let routed = route(snapshot, principal, ctx, &request.model, &facts, !rc.dry_run, false)?;
    if rc.dry_run {
        return answer_dry_run(session, ctx, &routed, &facts, 0).await;
    }
    let member = routed.first()?;
    let target = &member.target;
    let provider = target.provider.clone();
    let mut headers: Headers = vec![(http::header::CONTENT_TYPE, "application/json".into())];
    push_route_headers(&mut headers, &routed.served(member, 1));
    if provider.format() != WireFormat::Anthropic {
        let canonical = wire::decode_request(Surface::Anthropic, &body)?;
        let estimate = json!({"input_tokens": estimate_tokens(&canonical)});
        headers.push((name("x-modelux-token-count"), "estimated".into()));
        let body = serde_json::to_vec(&estimate).map_err(|e| GatewayError::internal(e.to_string()))?;
        respond::whole(session, ctx, 200, headers, Bytes::from(body)).await;
        return Ok(());
    }
    let upstream_body = Bytes::from(request.encode_for_upstream(&target.model));
    drop(request);
    let extra = anthropic_headers(session, Surface::Anthropic);
    let extra_refs: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let path = provider.upstream_path("/v1/messages/count_tokens");
    let call = upstream::Call {
        path: &path,
        body: upstream_body,
        accept: "application/json",
        extra_headers: &extra_refs,
    };
    let mut ex = upstream::exchange(&state.connector, &state.metrics, settings, &provider, call).await?;
    ctx.ttfb = Some(ex.ttfb);
    let status = ex.header.status.as_u16();
    let result = if (200..300).contains(&status) {
        upstream::read_all(&mut ex, MAX_UPSTREAM_ERROR_BODY, &provider, settings).await.map(|b| (status, b))
    } else {
        upstream_error(settings, &provider, &mut ex, status).await
    };
    ctx.upstream_time += ex.started.elapsed();
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    let (status, body) = result?;
    respond::whole(session, ctx, status, headers, body).await;
    Ok(())
}

/// Rough token count (4 characters a token) of everything a model would read.
fn estimate_tokens(req: &crate::wire::canonical::Request) -> u64 {
    use crate::wire::canonical::Part;
    fn part_chars(p: &Part) -> usize {
        match p {
            Part::Text { text, .. } | Part::Thinking { text, .. } => text.len(),
            Part::ToolCall { name, arguments, .. } => name.len() + arguments.len(),
            Part::ToolResult { content, .. } => content.iter().map(part_chars).sum(),
            // Images are billed by size; a fixed share keeps the estimate in range.
            Part::Image { .. } => 6000,
            Part::RedactedThinking { data } => data.len(),
        }
    }
    let mut chars: usize = req.system.iter().map(|b| b.text.len()).sum();
    chars += req.messages.iter().flat_map(|m| m.content.iter()).map(part_chars).sum::<usize>();
    chars += req.tools.iter().map(|t| t.name.len() + t.parameters.to_string().len()).sum::<usize>();
    (chars as u64).div_ceil(4).max(1)
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
    Err(GatewayError::UpstreamStatus {
        provider: provider.id.clone(),
        status,
        message: error_message(provider.format(), &body),
    })
}

/// The human part of an upstream error body: OpenAI's `error.message`, else the text.
pub(super) fn error_message(format: WireFormat, body: &[u8]) -> String {
    let mut msg =
        wire::error_message(format, body).unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
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

/// Content type of Bedrock's binary event stream (ConverseStream).
pub(super) const EVENT_STREAM_AWS: &str = "application/vnd.amazon.eventstream";

pub(super) fn is_event_stream(h: &ResponseHeader) -> bool {
    h.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let v = v.trim_start().to_ascii_lowercase();
        v.starts_with("text/event-stream") || v.starts_with(EVENT_STREAM_AWS)
    })
}

/// Upstream response headers worth keeping: the body's type, and the provider's request id
/// and processing-time headers the SDKs expose. Hop-by-hop and framing headers are the
/// gateway's own business, and so are `x-ratelimit-*`: the client is held to its key's
/// limits at the gateway, not to the gateway's own provider account limits.
fn passthrough_headers(h: &ResponseHeader) -> Headers {
    let mut out = Vec::with_capacity(8);
    for (n, value) in h.headers.iter() {
        let s = n.as_str();
        let keep = s == "content-type"
            || s == "x-request-id"
            || s == "retry-after"
            || s == "cache-control"
            || s.starts_with("openai-");
        if let (true, Ok(v)) = (keep, value.to_str()) {
            out.push((n.clone(), v.to_string()));
        }
    }
    out
}

/// What a stream's bytes go through on their way to the client.
pub(super) enum StreamCodec {
    /// Same format: passed through, usage read on the way (and the usage the gateway asked
    /// for on the client's behalf taken out again).
    Tap(wire::usage::UsageTap),
    /// Different formats (or a trace to splice in): decoded and re-encoded.
    Transcode(Box<Transcoder>),
}

impl StreamCodec {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            StreamCodec::Tap(t) => {
                t.feed(chunk, out);
                Ok(())
            }
            StreamCodec::Transcode(t) => t.feed(chunk, out),
        }
    }

    fn events(&self) -> u64 {
        match self {
            StreamCodec::Tap(t) => t.events(),
            StreamCodec::Transcode(t) => t.events(),
        }
    }

    fn usage(&self) -> Option<wire::canonical::Usage> {
        match self {
            StreamCodec::Tap(t) => t.usage(),
            StreamCodec::Transcode(t) => {
                let u = t.usage();
                (u.input > 0 || u.output > 0).then_some(u)
            }
        }
    }
}

/// Prices a stream from the usage it reported. A stream that did not complete reported at
/// most part of it (Anthropic's input and first output token): the upstream still billed
/// what it generated, about one token per event.
fn bill_stream(state: &GatewayState, ctx: &mut RequestCtx, codec: &StreamCodec, completed: bool) {
    billing::bill_answer(state, ctx, codec.usage(), completed, codec.events());
}

/// Streams an SSE body to the client chunk by chunk as it arrives, through `codec`. An
/// upstream failure after the first byte is reported in-stream (an error event in the
/// client's format), then the stream is closed cleanly.
#[allow(clippy::too_many_arguments)]
pub(super) async fn stream(
    state: &GatewayState,
    settings: &config::Settings,
    provider: &providers::Provider,
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut ex: Exchange,
    mut first: Option<Bytes>,
    mut headers: Headers,
    client: Surface,
    mut codec: StreamCodec,
) {
    headers.push((http::header::TRANSFER_ENCODING, "chunked".into()));
    ctx.streamed = true;
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
    let mut out = Vec::new();
    let failure: Option<GatewayError> = loop {
        let next = match first.take() {
            Some(chunk) => Ok(Some(chunk)),
            None => upstream::next_chunk(&mut ex, provider, settings).await,
        };
        match next {
            Ok(Some(chunk)) => {
                out.clear();
                if let Err(message) = codec.feed(&chunk, &mut out) {
                    break Some(GatewayError::UpstreamStatus {
                        provider: provider.id.clone(),
                        status: 200,
                        message,
                    });
                }
                if out.is_empty() {
                    continue;
                }
                // A tap that changed nothing hands back the chunk as it came: send that.
                let piece = if out.len() == chunk.len() && out == chunk {
                    chunk
                } else {
                    Bytes::copy_from_slice(&out)
                };
                let len = piece.len() as u64;
                ctx.capture_response(&piece);
                if session.write_response_body(Some(piece), false).await.is_err() {
                    ctx.error_code = Some("client_disconnected");
                    ctx.upstream_time += ex.started.elapsed();
                    ex.session.shutdown().await;
                    bill_stream(state, ctx, &codec, false);
                    return;
                }
                ctx.bytes_out += len;
            }
            Ok(None) => {
                out.clear();
                let finished = match &mut codec {
                    StreamCodec::Tap(t) => {
                        t.finish(&mut out);
                        Ok(())
                    }
                    StreamCodec::Transcode(t) => t.finish(&mut out),
                };
                // Priced before the trace goes out, so the trace carries the cost.
                bill_stream(state, ctx, &codec, finished.is_ok());
                if let StreamCodec::Transcode(t) = &mut codec {
                    if let Some(trace) = ctx.trace.as_deref_mut() {
                        // The winning attempt lasted until its stream ended.
                        if let Some(last) = trace.attempts.last_mut() {
                            last.duration_ms = (ex.started.elapsed().as_secs_f64() * 1e6).round() / 1000.0;
                        }
                        if let Ok(v) = serde_json::to_value(&*trace) {
                            t.release_done(&v, &mut out);
                        }
                    }
                }
                if !out.is_empty() {
                    ctx.bytes_out += out.len() as u64;
                    ctx.capture_response(&out);
                    let _ = session.write_response_body(Some(Bytes::copy_from_slice(&out)), false).await;
                }
                break finished
                    .err()
                    .map(|message| GatewayError::UpstreamConnect { provider: provider.id.clone(), message });
            }
            Err(e) => break Some(e),
        }
    };
    ctx.upstream_time += ex.started.elapsed();
    if let Some(e) = failure {
        ex.session.shutdown().await;
        ctx.error_code = Some("upstream_stream_error");
        if ctx.bill.usage.is_none() {
            bill_stream(state, ctx, &codec, false);
        }
        let event = match (&mut codec, client) {
            (StreamCodec::Transcode(t), _) => {
                let mut buf = Vec::new();
                t.fail(e.kind(), &e.message(), &mut buf);
                buf
            }
            (StreamCodec::Tap(_), Surface::OpenAi) => {
                [b"data: ".as_slice(), &e.to_openai_body(), b"\n\n"].concat()
            }
            (StreamCodec::Tap(_), Surface::Anthropic) => {
                [b"event: error\ndata: ".as_slice(), &e.render(Surface::Anthropic), b"\n\n"].concat()
            }
        };
        ctx.bytes_out += event.len() as u64;
        ctx.capture_response(&event);
        let _ = session.write_response_body(Some(Bytes::from(event)), true).await;
        return;
    }
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
    surface: Surface,
) -> Result<(), GatewayError> {
    let mut ids: Vec<(String, String)> = Vec::new();
    for (slug, _) in config::project_configs(snapshot, &principal.project) {
        ids.push((format!("@{slug}"), "modelux".into()));
    }
    let mut providers: Vec<_> = snapshot.providers.values().collect();
    providers.sort_by(|a, b| a.id.cmp(&b.id));
    for p in providers {
        for m in &p.models {
            ids.push((format!("{}/{m}", p.id), p.id.clone()));
        }
    }
    let body = match surface {
        Surface::OpenAi => json!({
            "object": "list",
            "data": ids.iter().map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner})).collect::<Vec<_>>(),
        }),
        Surface::Anthropic => json!({
            "data": ids.iter().map(|(id, _)| json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"})).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": ids.first().map(|(id, _)| id.clone()),
            "last_id": ids.last().map(|(id, _)| id.clone()),
        }),
    };
    let body = serde_json::to_vec(&body).map_err(|e| GatewayError::internal(e.to_string()))?;
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
