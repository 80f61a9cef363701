//! Which endpoint a request is for, and the steps every endpoint shares before its own:
//! the path and method, the key, the key's request rate. Any error returned before the
//! first byte went downstream is rendered once, in the client's wire format, here.

use super::media::{self, Kind as MediaKind};
use super::request::authenticate;
use super::resources::{self, Api, Route};
use super::responses;
use super::{billing, chat, count_tokens, embeddings, models, respond, GatewayState, Req, RequestCtx};
use crate::auth::{ProviderKey, PROVIDER_KEY_HEADER};
use crate::error::{GatewayError, Surface};
use crate::replay::live::{self, Grant};
use pingora::proxy::Session;

#[derive(Clone, Copy)]
enum Endpoint {
    /// OpenAI chat completions or Anthropic messages, by surface.
    Chat,
    Models,
    CountTokens,
    Embeddings,
    /// `POST …/dry-run`: the chat body, routed but never sent.
    DryRun,
    /// `POST /openai/v1/responses`.
    ResponsesCreate,
    /// Audio and images.
    Media(MediaKind),
    /// A passthrough resource (`resources`): its row, or the methods its path allows.
    Resource(Result<&'static Route, &'static str>),
}

impl Endpoint {
    /// `/v1/*` is the OpenAI surface (the modelux SDKs' base URL), except the Anthropic
    /// message paths: an Anthropic client whose base URL is the bare host calls
    /// `/v1/messages`, and one configured with `ANTHROPIC_BASE_URL=…/v1` (as the hosted
    /// service's coding-agent guide suggests) calls `/v1/v1/messages`.
    /// `anthropic_client`: the request carries `anthropic-version` (the Anthropic SDK's bare
    /// `/v1/files` is otherwise OpenAI's).
    fn from_path(path: &str, method: &str, anthropic_client: bool) -> Option<(Surface, Endpoint)> {
        let path = match path.strip_prefix("/v1/v1/") {
            Some(rest) if rest.starts_with("messages") || (anthropic_client && rest.starts_with("files")) => {
                &path[3..]
            }
            _ => path,
        };
        if let Some(rest) = path.strip_prefix("/anthropic/v1") {
            return match rest {
                "/messages" => Some((Surface::Anthropic, Endpoint::Chat)),
                "/messages/count_tokens" => Some((Surface::Anthropic, Endpoint::CountTokens)),
                "/models" => Some((Surface::Anthropic, Endpoint::Models)),
                "/dry-run" => Some((Surface::Anthropic, Endpoint::DryRun)),
                _ => resource(Api::Anthropic, rest, method).map(|e| (Surface::Anthropic, e)),
            };
        }
        let rest = path.strip_prefix("/openai/v1").or_else(|| path.strip_prefix("/v1"))?;
        match rest {
            "/chat/completions" => Some((Surface::OpenAi, Endpoint::Chat)),
            "/models" => Some((Surface::OpenAi, Endpoint::Models)),
            "/embeddings" => Some((Surface::OpenAi, Endpoint::Embeddings)),
            "/dry-run" => Some((Surface::OpenAi, Endpoint::DryRun)),
            "/responses" => Some((Surface::OpenAi, Endpoint::ResponsesCreate)),
            "/audio/transcriptions" => Some((Surface::OpenAi, Endpoint::Media(MediaKind::Transcriptions))),
            "/audio/translations" => Some((Surface::OpenAi, Endpoint::Media(MediaKind::Translations))),
            "/audio/speech" => Some((Surface::OpenAi, Endpoint::Media(MediaKind::Speech))),
            "/images/generations" => Some((Surface::OpenAi, Endpoint::Media(MediaKind::Images))),
            "/messages" if path.starts_with("/v1/") => Some((Surface::Anthropic, Endpoint::Chat)),
            "/messages/count_tokens" if path.starts_with("/v1/") => {
                Some((Surface::Anthropic, Endpoint::CountTokens))
            }
            // Anthropic's message batches under the bare `/v1` too, as its messages are, and
            // its files when an Anthropic client asks.
            _ if path.starts_with("/v1/messages/batches")
                || (anthropic_client && path.starts_with("/v1/files")) =>
            {
                resource(Api::Anthropic, rest, method).map(|e| (Surface::Anthropic, e))
            }
            _ => resource(Api::OpenAi, rest, method).map(|e| (Surface::OpenAi, e)),
        }
    }

    /// The methods the endpoint answers, as an `Allow` header lists them.
    fn methods(self) -> &'static str {
        match self {
            Endpoint::Chat
            | Endpoint::CountTokens
            | Endpoint::Embeddings
            | Endpoint::DryRun
            | Endpoint::ResponsesCreate
            | Endpoint::Media(_) => "POST",
            Endpoint::Models => "GET",
            Endpoint::Resource(Ok(route)) => route.method,
            Endpoint::Resource(Err(allow)) => allow,
        }
    }

    fn allows(self, method: &http::Method) -> bool {
        match self {
            Endpoint::Resource(found) => found.is_ok(),
            _ => method.as_str() == self.methods(),
        }
    }
}

/// Whether a request to `path` is answered in Anthropic's format (before its headers are
/// read: the Anthropic client's bare `/v1/files` is not told apart here).
pub(super) fn is_anthropic_path(path: &str) -> bool {
    matches!(Endpoint::from_path(path, "POST", false), Some((Surface::Anthropic, _)))
}

/// A passthrough row for `rest` (`/…` after `/v1`).
fn resource(api: Api, rest: &str, method: &str) -> Option<Endpoint> {
    resources::find(api, rest.strip_prefix('/')?, method).map(Endpoint::Resource)
}

/// `X-Modelux-Provider-Key`: the caller's own provider key for this call (BYOK). A value a
/// header line cannot carry on to the provider is refused, never sent.
fn provider_key(header: &pingora::http::RequestHeader) -> Result<Option<ProviderKey>, GatewayError> {
    // A prebuilt name: looking a `&str` up parses it on every request.
    static NAME: http::HeaderName = http::HeaderName::from_static(PROVIDER_KEY_HEADER);
    let Some(value) = header.headers.get(&NAME) else { return Ok(None) };
    match value.to_str() {
        Ok(key)
            if !key.trim().is_empty() && key.len() <= 1024 && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(ProviderKey::new(key.trim())))
        }
        _ => Err(GatewayError::invalid(
            "invalid_provider_key",
            "X-Modelux-Provider-Key must be a provider key: 1 to 1024 visible ASCII characters",
        )),
    }
}

/// The path after the surface's `…/v1/` (the `/v1/v1/` of a doubled base URL included).
fn rest_of(path: &str) -> Option<&str> {
    ["/anthropic/v1/", "/openai/v1/", "/v1/v1/", "/v1/"].iter().find_map(|p| path.strip_prefix(p))
}

/// Bodies up to this size are read before a deferred rate-limit take can refuse them.
const DEFERRABLE_BODY_BYTES: u64 = 64 * 1024;

/// Whether reading the body before a rate limit can refuse the request costs little: a
/// declared small body, not one the client holds back for `Expect: 100-continue`.
fn refusal_costs_little(header: &pingora::http::RequestHeader) -> bool {
    !header.headers.contains_key(http::header::EXPECT)
        && super::body::declared_length(header).is_some_and(|n| n <= DEFERRABLE_BODY_BYTES)
}

/// Unknown paths are logged cut to this many characters.
const MAX_LOGGED_PATH: usize = 256;

pub async fn handle(state: &GatewayState, session: &mut Session, ctx: &mut RequestCtx) {
    // A running `with_responses` experiment's request runs on its candidate's snapshot.
    let grant =
        if state.grants.is_empty() { None } else { state.grants.presented(&session.req_header().headers) };
    let snapshot = match &grant {
        Some(g) => g.snapshot.clone(),
        None => state.store.load(),
    };
    let mut req = Req { state, snapshot: &snapshot, session, ctx };
    let mut served = serve(&mut req, grant.as_deref()).await;
    if matches!(served, Err(GatewayError::RequestTimeout { .. })) {
        state.metrics.client_timeouts.with_label_values(&["proxy", "body"]).inc();
    }
    if req.ctx.bill.has_deferred() {
        // A request that ended before its reservation (an error) still counts against its
        // rate limits; a refusal is its answer, as it would have been had it come first.
        if let (Err(limited), Err(_)) = (billing::take_deferred(state, req.ctx).await, &served) {
            served = Err(limited);
        }
    }
    match served {
        Err(err) => respond::error(req.session, req.ctx, &err).await,
        // Every path answers; one that did not would leave its client waiting. A client
        // that went away has nobody to answer, nor one whose connection was closed because
        // not even the fixed 500 could be built (`internal_error`).
        Ok(())
            if req.session.response_written().is_none()
                && !matches!(req.ctx.error_code, Some("client_disconnected" | "internal_error")) =>
        {
            tracing::error!(endpoint = %req.ctx.endpoint, "request finished without an answer; answering 500");
            req.session.set_keepalive(None);
            let err = GatewayError::internal("the gateway finished this request without answering it");
            respond::error(req.session, req.ctx, &err).await;
        }
        Ok(()) => {}
    }
}

async fn serve(req: &mut Req<'_>, grant: Option<&Grant>) -> Result<(), GatewayError> {
    let header = req.session.req_header();
    let path = header.uri.path();
    let ctx = &mut *req.ctx;
    ctx.endpoint = path.chars().take(MAX_LOGGED_PATH).collect();
    ctx.body_cap = req.snapshot.settings.traces.max_body_bytes;
    if path.starts_with("/anthropic/") {
        ctx.surface = Surface::Anthropic;
    }
    let anthropic_client = (path.starts_with("/v1/files") || path.starts_with("/v1/v1/files"))
        && header.headers.contains_key("anthropic-version");
    let (surface, endpoint) = Endpoint::from_path(path, header.method.as_str(), anthropic_client)
        .ok_or_else(|| GatewayError::NotFound {
            code: "not_found",
            message: format!("unknown endpoint {} {path}", header.method),
        })?;
    ctx.surface = surface;
    if let Some(problem) = crate::conn::framing_problem(header) {
        req.session.set_keepalive(None);
        return Err(GatewayError::invalid("invalid_request", problem));
    }
    if !endpoint.allows(&header.method) {
        return Err(GatewayError::MethodNotAllowed { allowed: endpoint.methods() });
    }
    let principal = match grant {
        Some(grant) => {
            let headers = &req.session.req_header().headers;
            req.ctx.replay_of = live::replay_of(headers);
            live::principal(grant, headers)
        }
        None => authenticate(req.session, req.snapshot, surface)?,
    };
    req.ctx.principal = Some(principal.clone());
    req.ctx.provider_key = provider_key(req.session.req_header())?;
    // Shared counters: the rate-limit takes of an endpoint that reserves go with its
    // reservation, one round trip instead of two (judged in the same order).
    req.ctx.bill.defer_takes = matches!(endpoint, Endpoint::Chat | Endpoint::Embeddings)
        && req.state.spend.counters.combines_takes()
        && refusal_costs_little(req.session.req_header());
    billing::check_requests(req.state, req.ctx, &principal).await?;
    // pingora does not answer `Expect: 100-continue` itself; a client waiting for it (curl
    // sending a large body) would stall before sending its body. Not for HTTP/1.0 (RFC
    // 9110), nor for a body over every limit (its 413 is answered instead).
    let header = req.session.req_header();
    let expects = header
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects && header.version >= http::Version::HTTP_11 {
        let settings = &req.snapshot.settings;
        let declared = super::body::declared_length(header).unwrap_or(0);
        if declared <= settings.max_body_bytes.max(settings.max_upload_bytes) && !req.session.is_body_done() {
            let _ = req.session.downstream_session.write_continue_response().await;
        }
    }
    match endpoint {
        Endpoint::Models => models::list(req, &principal).await,
        Endpoint::Chat => chat::complete(req, &principal, false).await,
        Endpoint::DryRun => chat::complete(req, &principal, true).await,
        Endpoint::CountTokens => count_tokens::count(req, &principal).await,
        Endpoint::Embeddings => embeddings::embed(req, &principal).await,
        // Boxed: their futures are large (uploads, fallback loops), and inline they would
        // grow every request's future, chat's included (measured: +5% CPU per request).
        Endpoint::ResponsesCreate => Box::pin(responses::create(req, &principal)).await,
        Endpoint::Media(kind) => Box::pin(media::serve(req, &principal, kind)).await,
        Endpoint::Resource(found) => {
            let route = found.map_err(|allowed| GatewayError::MethodNotAllowed { allowed })?;
            let path = req.session.req_header().uri.path().to_string();
            let rest = rest_of(&path).unwrap_or_default();
            Box::pin(resources::serve(req, &principal, route, rest)).await
        }
    }
}
