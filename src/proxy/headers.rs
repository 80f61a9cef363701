//! Response headers the gateway writes: the list type, the upstream headers worth keeping,
//! and the route headers naming who served the request.

use http::HeaderName;
use pingora::http::ResponseHeader;

use crate::admission::RouteInfo;
use crate::providers::Target;
use crate::routing::Member;

pub type Headers = Vec<(HeaderName, String)>;

pub const REQUEST_ID: &str = "x-modelux-request-id";

pub fn name(n: &'static str) -> HeaderName {
    HeaderName::from_static(n)
}

/// Who answered, for the response headers.
pub struct Served<'a> {
    pub target: &'a Target,
    pub info: &'a RouteInfo,
    /// Which attempt (1-based) answered; 0 for a dry run.
    pub attempt: usize,
}

impl<'a> Served<'a> {
    pub fn new(info: &'a RouteInfo, member: &'a Member, attempt: usize) -> Served<'a> {
        Served { target: &member.target, info, attempt }
    }
}

/// Headers for the client's answer: the upstream's own (only `retry-after` when the body
/// is translated, the rest describing the upstream's format), then the route's.
pub fn answer_headers(upstream: &ResponseHeader, translated: bool, served: &Served<'_>) -> Headers {
    let mut headers = if translated { retry_after(upstream) } else { passthrough_headers(upstream) };
    push_route_headers(&mut headers, served);
    headers
}

/// Which provider and model served the request, and the routing config that chose them.
pub fn push_route_headers(headers: &mut Headers, served: &Served<'_>) {
    headers.push((name("x-modelux-provider-used"), served.target.provider.id.clone()));
    headers.push((name("x-modelux-model-used"), served.target.model.clone()));
    if let Some((slug, version)) = &served.info.config {
        headers.push((name("x-modelux-routing-config"), format!("@{slug}")));
        headers.push((name("x-modelux-config-version"), format!("v{version}")));
    }
    if let Some(variant) = &served.info.ab_variant {
        headers.push((name("x-modelux-ab-variant"), variant.clone()));
    }
    if served.attempt > 0 {
        headers.push((name("x-modelux-attempts"), served.attempt.to_string()));
    }
}

/// Upstream response headers worth keeping: the body's type, and the provider's request id
/// and processing-time headers the SDKs expose. Hop-by-hop and framing headers are the
/// gateway's own business, and so are `x-ratelimit-*`: the client is held to its key's
/// limits at the gateway, not to the gateway's own provider account limits.
pub fn passthrough_headers(h: &ResponseHeader) -> Headers {
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

/// Only `retry-after` survives a translation: the other upstream headers describe the
/// upstream's wire format, not the client's.
fn retry_after(h: &ResponseHeader) -> Headers {
    h.headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(|v| vec![(http::header::RETRY_AFTER, v.to_string())])
        .unwrap_or_default()
}
