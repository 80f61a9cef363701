//! The passthrough endpoints of PRODUCT.md §1.3, as one table: OpenAI's Responses API
//! resources, files and batches; Anthropic's message batches and files. Each row says
//! where a call goes (the provider holding the id in its path, the one holding a batch's
//! input file, or the one the caller chose), how its body travels (none, small and read,
//! or streamed as it arrives) and what the gateway reads from the answer (the ids it
//! created, remembered with their provider). Everything else passes through unchanged;
//! the one rewrite is an Anthropic batch's `results_url`, which names the API host and
//! would send the SDK around the gateway.

use std::sync::Arc;

use bytes::Bytes;
use pingora::proxy::Session;

use super::headers::{name, passthrough_headers};
use super::passthrough;
use super::{request, Req};
use crate::auth::Principal;
use crate::error::{GatewayError, Surface};
use crate::providers::upstream::{self, BodySource};
use crate::providers::Provider;

/// Whose REST API a row is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Api {
    OpenAi,
    Anthropic,
}

/// Where a call goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    /// The provider holding the id in the path.
    PathId,
    /// The provider holding the file the JSON body's `input_file_id` names (a batch).
    InputFile,
    /// `X-Modelux-Provider`, else a provider the caller's own key fits, else the first
    /// provider of the API's own kind.
    Chosen,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Body {
    None,
    /// Read whole, up to `server.max_body_bytes`.
    Small,
    /// Streamed to the provider as it arrives, up to `server.max_upload_bytes`.
    Streamed,
}

/// What the gateway reads from a 2xx answer. Anything but `Stream` is read whole.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reads {
    /// Nothing: the answer streams through.
    Stream,
    /// The `id` it created.
    Id,
    /// An OpenAI batch: its `id`, `output_file_id` and `error_file_id`.
    BatchFiles,
    /// Anthropic message batches: their `results_url`s are pointed at the gateway, and a
    /// created batch's `id` is kept.
    ResultsUrl { learn_id: bool },
}

#[derive(Debug)]
pub struct Route {
    pub api: Api,
    pub method: &'static str,
    /// Path segments after `/v1`; `{id}` stands for a provider-side id.
    segments: &'static [&'static str],
    body: Body,
    place: Place,
    reads: Reads,
    /// Every method the path answers, for `Allow`.
    allow: &'static str,
}

macro_rules! route {
    ($api:ident $method:literal [$($seg:literal),+] $body:ident $place:ident $reads:expr, $allow:literal) => {
        Route {
            api: Api::$api,
            method: $method,
            segments: &[$($seg),+],
            body: Body::$body,
            place: Place::$place,
            reads: $reads,
            allow: $allow,
        }
    };
}

static ROUTES: &[Route] = &[
    route!(OpenAi "GET" ["responses", "{id}"] None PathId Reads::Stream, "GET, DELETE"),
    route!(OpenAi "DELETE" ["responses", "{id}"] None PathId Reads::Stream, "GET, DELETE"),
    route!(OpenAi "POST" ["responses", "{id}", "cancel"] Small PathId Reads::Stream, "POST"),
    route!(OpenAi "GET" ["responses", "{id}", "input_items"] None PathId Reads::Stream, "GET"),
    route!(OpenAi "POST" ["files"] Streamed Chosen Reads::Id, "GET, POST"),
    route!(OpenAi "GET" ["files"] None Chosen Reads::Stream, "GET, POST"),
    route!(OpenAi "GET" ["files", "{id}"] None PathId Reads::Stream, "GET, DELETE"),
    route!(OpenAi "DELETE" ["files", "{id}"] None PathId Reads::Stream, "GET, DELETE"),
    route!(OpenAi "GET" ["files", "{id}", "content"] None PathId Reads::Stream, "GET"),
    route!(OpenAi "POST" ["batches"] Small InputFile Reads::BatchFiles, "GET, POST"),
    route!(OpenAi "GET" ["batches"] None Chosen Reads::Stream, "GET, POST"),
    route!(OpenAi "GET" ["batches", "{id}"] None PathId Reads::BatchFiles, "GET"),
    route!(OpenAi "POST" ["batches", "{id}", "cancel"] Small PathId Reads::BatchFiles, "POST"),
    route!(Anthropic "POST" ["messages", "batches"] Streamed Chosen Reads::ResultsUrl { learn_id: true }, "GET, POST"),
    route!(Anthropic "GET" ["messages", "batches"] None Chosen Reads::ResultsUrl { learn_id: false }, "GET, POST"),
    route!(Anthropic "GET" ["messages", "batches", "{id}"] None PathId Reads::ResultsUrl { learn_id: false }, "GET, DELETE"),
    route!(Anthropic "DELETE" ["messages", "batches", "{id}"] None PathId Reads::Stream, "GET, DELETE"),
    route!(Anthropic "GET" ["messages", "batches", "{id}", "results"] None PathId Reads::Stream, "GET"),
    route!(Anthropic "POST" ["messages", "batches", "{id}", "cancel"] Small PathId Reads::ResultsUrl { learn_id: false }, "POST"),
    route!(Anthropic "POST" ["files"] Streamed Chosen Reads::Id, "GET, POST"),
    route!(Anthropic "GET" ["files"] None Chosen Reads::Stream, "GET, POST"),
    route!(Anthropic "GET" ["files", "{id}"] None PathId Reads::Stream, "GET, DELETE"),
    route!(Anthropic "DELETE" ["files", "{id}"] None PathId Reads::Stream, "GET, DELETE"),
    route!(Anthropic "GET" ["files", "{id}", "content"] None PathId Reads::Stream, "GET"),
];

fn matches(route: &Route, api: Api, rest: &str) -> bool {
    route.api == api && {
        let mut parts = rest.split('/');
        route.segments.iter().all(|seg| parts.next().is_some_and(|p| *seg == "{id}" || p == *seg))
            && parts.next().is_none()
    }
}

/// The row for `rest` (the path after `/v1/`, no query) and `method`: `Err(allow)` when
/// the path is known but not the method; `None` when it is not a passthrough path.
pub fn find(api: Api, rest: &str, method: &str) -> Option<Result<&'static Route, &'static str>> {
    let mut allow = None;
    for route in ROUTES.iter().filter(|r| matches(r, api, rest)) {
        if route.method == method {
            return Some(Ok(route));
        }
        allow = Some(route.allow);
    }
    allow.map(Err)
}

impl Route {
    fn serves(&self, provider: &Provider) -> bool {
        self.resource_path(provider, "/").is_some()
    }

    fn resource_path(&self, provider: &Provider, endpoint: &str) -> Option<String> {
        match self.api {
            Api::OpenAi => provider.openai_resource_path(endpoint),
            Api::Anthropic => provider.anthropic_resource_path(endpoint),
        }
    }

    /// The id in the path, checked.
    fn id<'p>(&self, rest: &'p str) -> Result<Option<&'p str>, GatewayError> {
        match self.segments.iter().zip(rest.split('/')).find(|(seg, _)| **seg == "{id}") {
            Some((_, id)) => passthrough::path_id(id).map(Some),
            None => Ok(None),
        }
    }
}

/// The provider a call without an id goes to (uploads, lists, Anthropic batches).
fn chosen(req: &Req<'_>, route: &Route) -> Result<Arc<Provider>, GatewayError> {
    let providers = &req.snapshot.providers;
    let asked = req.session.req_header().headers.get("x-modelux-provider").and_then(|v| v.to_str().ok());
    if let Some(id) = asked.map(str::trim).filter(|id| !id.is_empty()) {
        return match providers.get(id) {
            Some(p) if route.serves(p) => Ok(p.clone()),
            Some(p) => Err(GatewayError::invalid(
                "unsupported_provider",
                format!(
                    "X-Modelux-Provider: {id} is a {} provider, which does not serve this endpoint",
                    p.adapter.kind()
                ),
            )),
            None => Err(GatewayError::invalid(
                "unknown_provider",
                format!("X-Modelux-Provider: no provider {id}"),
            )),
        };
    }
    let own_kind = match route.api {
        Api::OpenAi => "openai",
        Api::Anthropic => "anthropic",
    };
    // A caller's own key goes only to the vendor's own kinds unless a provider is named.
    let key = req.ctx.provider_key.as_ref();
    let mut candidates: Vec<&Arc<Provider>> = providers
        .values()
        .filter(|p| route.serves(p))
        .filter(|p| {
            key.is_none_or(|k| {
                matches!(p.adapter.kind(), "openai" | "azure" | "anthropic")
                    && p.byok_credential(k.secret()).is_some()
            })
        })
        .collect();
    candidates
        .sort_by(|a, b| (a.adapter.kind() != own_kind, &a.id).cmp(&(b.adapter.kind() != own_kind, &b.id)));
    candidates.first().map(|p| Arc::clone(p)).ok_or_else(|| {
        GatewayError::invalid(
            "unsupported_provider",
            match key {
                Some(_) => format!("no {own_kind}-compatible provider takes a key of that format"),
                None => format!("no provider serves this endpoint; configure one of kind {own_kind}"),
            },
        )
    })
}

/// Slowest average an upload may arrive at, once its first `client_body_timeout` is over.
const MIN_UPLOAD_BYTES_PER_SECOND: f64 = 64.0 * 1024.0;

/// The client's upload, piece by piece, bounded in size, in the wait for each piece and in
/// its average rate (a trickle must not hold the upstream connection for hours).
struct Upload<'s> {
    session: &'s mut Session,
    limit: u64,
    read: u64,
    idle: std::time::Duration,
    /// Time spent waiting for the client's pieces (not for the provider to take them: a
    /// slow provider is not the client's fault).
    waited: std::time::Duration,
}

impl BodySource for Upload<'_> {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, GatewayError> {
        let asked = std::time::Instant::now();
        let read = tokio::time::timeout(self.idle, self.session.read_request_body()).await;
        self.waited += asked.elapsed();
        match read {
            Ok(Ok(Some(piece))) => {
                self.read += piece.len() as u64;
                if self.read > self.limit {
                    return Err(GatewayError::PayloadTooLarge { limit: self.limit });
                }
                let allowed = self.idle.as_secs_f64() + self.read as f64 / MIN_UPLOAD_BYTES_PER_SECOND;
                if self.waited.as_secs_f64() > allowed {
                    return Err(GatewayError::RequestTimeout {
                        message: format!(
                            "the upload arrived slower than {} KiB/s",
                            MIN_UPLOAD_BYTES_PER_SECOND as u64 / 1024
                        ),
                    });
                }
                Ok(Some(piece))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) => Err(GatewayError::invalid(
                "invalid_request",
                format!("could not read the request body: {}", e.etype().as_str()),
            )),
            Err(_) => Err(GatewayError::RequestTimeout {
                message: format!("no part of the upload arrived within {} ms", self.idle.as_millis()),
            }),
        }
    }
}

/// `Host` as the client addressed the gateway, for URLs it hands back (when
/// `server.public_base_url` does not say).
fn public_base(session: &Session, fallback: &str) -> String {
    let h = &session.req_header().headers;
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let host = get("host")
        .filter(|v| v.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        .unwrap_or(fallback);
    let scheme = match get("x-forwarded-proto") {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

/// Points every `"results_url": "…/v1/messages/batches/{id}/results"` of an Anthropic body
/// at `base` (the gateway, as the client reached it, with its surface prefix).
fn rewrite_results_urls(body: &[u8], base: &str) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"\"results_url\"";
    const TAIL: &str = "/v1/messages/batches/";
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    let mut changed = false;
    while let Some(i) = body[at..].windows(KEY.len()).position(|w| w == KEY) {
        let key_end = at + i + KEY.len();
        let mut j = key_end;
        while body.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if body.get(j) != Some(&b':') {
            out.extend_from_slice(&body[at..key_end]);
            at = key_end;
            continue;
        }
        j += 1;
        while body.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        // A URL holds no quote or backslash: the string ends at the next quote.
        let value = (body.get(j) == Some(&b'"'))
            .then(|| body[j + 1..].iter().position(|&b| b == b'"' || b == b'\\').map(|n| (j + 1, j + 1 + n)))
            .flatten()
            .filter(|&(_, end)| body.get(end) == Some(&b'"'));
        let Some((start, end)) = value else {
            out.extend_from_slice(&body[at..key_end]);
            at = key_end;
            continue;
        };
        let url = std::str::from_utf8(&body[start..end]).ok()?;
        out.extend_from_slice(&body[at..start]);
        match url.find(TAIL) {
            Some(k) => {
                out.extend_from_slice(base.as_bytes());
                out.extend_from_slice(&url.as_bytes()[k..]);
                changed = true;
            }
            None => out.extend_from_slice(url.as_bytes()),
        }
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    changed.then_some(out)
}

/// The provider-side ids a 2xx JSON answer created or revealed.
fn learned(reads: Reads, body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Created {
        id: Option<String>,
        output_file_id: Option<String>,
        error_file_id: Option<String>,
    }
    let Ok(c) = serde_json::from_slice::<Created>(body) else { return Vec::new() };
    let ids = match reads {
        Reads::Id | Reads::ResultsUrl { learn_id: true } => vec![c.id],
        Reads::BatchFiles => vec![c.id, c.output_file_id, c.error_file_id],
        Reads::Stream | Reads::ResultsUrl { learn_id: false } => Vec::new(),
    };
    ids.into_iter().flatten().filter(|id| passthrough::path_id(id).is_ok()).collect()
}

/// One passthrough call: `rest` is the path after `/v1/` (no query).
pub async fn serve(
    req: &mut Req<'_>,
    principal: &Principal,
    route: &'static Route,
    rest: &str,
) -> Result<(), GatewayError> {
    let settings = &req.snapshot.settings;
    let id = route.id(rest)?.map(str::to_string);
    let header = req.session.req_header();
    let query = header.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    if query.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(GatewayError::invalid("invalid_request", "the query string holds forbidden bytes"));
    }
    let content_type =
        header.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let length = super::body::declared_length(header);
    let surface_prefix = if header.uri.path().starts_with("/anthropic/") { "/anthropic" } else { "" };
    let body = match route.body {
        Body::None => Bytes::new(),
        Body::Small => request::read_body_bounded(req, settings.max_body_bytes).await?,
        Body::Streamed => {
            if length.is_some_and(|n| n > settings.max_upload_bytes) {
                return Err(GatewayError::PayloadTooLarge { limit: settings.max_upload_bytes });
            }
            Bytes::new()
        }
    };
    let provider = match (route.place, &id) {
        (Place::PathId, Some(id)) => passthrough::owner(req, principal, id, |p| route.serves(p)).await?,
        (Place::InputFile, _) => {
            #[derive(serde::Deserialize)]
            struct Batch {
                input_file_id: Option<String>,
            }
            let file = serde_json::from_slice::<Batch>(&body).ok().and_then(|b| b.input_file_id).ok_or_else(
                || GatewayError::invalid("missing_field", "Missing required field: input_file_id"),
            )?;
            let file = passthrough::path_id(&file)?;
            passthrough::owner(req, principal, file, |p| route.serves(p)).await?
        }
        _ => chosen(req, route)?,
    };
    let Some(upstream_path) = route.resource_path(&provider, &format!("/{rest}{query}")) else {
        return Err(GatewayError::internal("the chosen provider does not serve this endpoint"));
    };
    let mut extra: Vec<(String, String)> = Vec::new();
    if route.body != Body::None {
        if let Some(ct) = content_type.filter(|ct| !ct.bytes().any(|b| b == b'\r' || b == b'\n')) {
            extra.push(("content-type".into(), ct));
        }
    }
    if route.api == Api::Anthropic {
        extra.extend(request::anthropic_headers(req.session, Surface::Anthropic));
    }
    let accept = req
        .session
        .req_header()
        .headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.bytes().any(|b| b == b'\r' || b == b'\n'))
        .unwrap_or("application/json")
        .to_string();
    let byok = req.ctx.provider_key.as_ref().and_then(|k| provider.byok_credential(k.secret()));
    let extra_refs: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let call = upstream::Call {
        method: route.method,
        path: &upstream_path,
        body,
        accept: &accept,
        extra_headers: &extra_refs,
        credential: byok.as_ref(),
    };
    let (state, timeouts) = (req.state, settings.upstream_timeouts());
    req.ctx.provider = Some(provider.id.clone());
    let ex = if route.body == Body::Streamed {
        let mut upload = Upload {
            session: &mut *req.session,
            limit: settings.max_upload_bytes,
            read: 0,
            idle: settings.client_body_timeout,
            waited: std::time::Duration::ZERO,
        };
        let sent = upstream::exchange_streaming(
            &state.connector,
            &state.metrics,
            &timeouts,
            &provider,
            call,
            length,
            &mut upload,
        )
        .await;
        req.ctx.bytes_in = upload.read;
        sent?
    } else {
        upstream::exchange(&state.connector, &state.metrics, &timeouts, &provider, call).await?
    };
    let status = ex.header.status.as_u16();
    let whole = route.reads != Reads::Stream && (200..300).contains(&status);
    let ex = passthrough::answered(req, &provider, ex, byok.is_some()).await?;
    let answered = if !whole {
        let mut headers = passthrough_headers(&ex.header);
        headers.push((name("x-modelux-provider-used"), provider.id.clone()));
        passthrough::relay(req, &provider, ex, headers).await;
        Ok(())
    } else {
        let base = match &settings.public_base_url {
            Some(url) => format!("{url}{surface_prefix}"),
            None => format!("{}{surface_prefix}", public_base(req.session, &settings.proxy_listen)),
        };
        passthrough::whole(req, &provider, ex, |ctx, body| {
            for id in learned(route.reads, body) {
                passthrough::remember_owned(state, ctx, id);
            }
            match route.reads {
                Reads::ResultsUrl { .. } => rewrite_results_urls(body, &base),
                _ => None,
            }
        })
        .await
    };
    // The provider answered before the upload ended: what is still arriving is discarded
    // for a moment, so closing does not reset the answer away.
    if !req.session.is_body_done() {
        let _ = tokio::time::timeout(super::respond::LINGER, req.session.drain_request_body()).await;
    }
    answered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_found_by_path_and_method() {
        let found = |api, rest, method| find(api, rest, method).map(|r| r.map(|r| (r.method, r.segments)));
        assert_eq!(found(Api::OpenAi, "files", "POST"), Some(Ok(("POST", &["files"][..]))));
        assert_eq!(
            found(Api::OpenAi, "files/file-1/content", "GET"),
            Some(Ok(("GET", &["files", "{id}", "content"][..])))
        );
        assert_eq!(found(Api::OpenAi, "files/file-1", "PUT"), Some(Err("GET, DELETE")));
        assert_eq!(found(Api::OpenAi, "files/file-1/x", "GET"), None);
        assert_eq!(found(Api::OpenAi, "messages/batches", "POST"), None);
        assert_eq!(
            found(Api::Anthropic, "messages/batches/b1/results", "GET").map(|r| r.is_ok()),
            Some(true)
        );
        assert_eq!(found(Api::Anthropic, "batches", "GET"), None);
    }

    #[test]
    fn results_urls_point_at_the_gateway() {
        let body = br#"{"id":"msgbatch_1","results_url" : "https://api.anthropic.com/v1/messages/batches/msgbatch_1/results","x":"\"results_url\""}"#;
        let out = rewrite_results_urls(body, "http://gw:8080/anthropic").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":"msgbatch_1","results_url" : "http://gw:8080/anthropic/v1/messages/batches/msgbatch_1/results","x":"\"results_url\""}"#
        );
        assert_eq!(rewrite_results_urls(br#"{"results_url":null}"#, "http://gw"), None);
        let list = br#"{"data":[{"results_url":"https://a/v1/messages/batches/b1/results"},{"results_url":"https://a/v1/messages/batches/b2/results"}]}"#;
        let out = String::from_utf8(rewrite_results_urls(list, "http://gw").unwrap()).unwrap();
        assert_eq!(out.matches("http://gw/v1/messages/batches/").count(), 2);
    }

    #[test]
    fn ids_are_learned_from_what_an_answer_created() {
        let batch =
            br#"{"id":"batch_1","input_file_id":"file-in","output_file_id":"file-out","error_file_id":null}"#;
        assert_eq!(learned(Reads::BatchFiles, batch), ["batch_1", "file-out"]);
        assert_eq!(learned(Reads::Id, br#"{"id":"file-abc","object":"file"}"#), ["file-abc"]);
        assert!(learned(Reads::ResultsUrl { learn_id: false }, br#"{"id":"msgbatch_1"}"#).is_empty());
        assert!(learned(Reads::Id, br#"{"id":"../x"}"#).is_empty());
    }
}
