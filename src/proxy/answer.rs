//! Answering with what an upstream sent, when the answer is whole: a 2xx body (converted
//! to the client's format when the route translates) or an upstream error status.

use bytes::Bytes;
use pingora::http::ResponseHeader;

use super::billing;
use super::headers::Headers;
use super::respond;
use super::Req;
use crate::config::Settings;
use crate::error::{upstream_client_error_body, GatewayError};
use crate::providers::upstream::{self, Exchange};
use crate::providers::Provider;
use crate::wire::{self, WireFormat};

/// Largest upstream body the gateway buffers (non-streamed responses and error bodies).
pub const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// Error bodies are only needed for their message.
pub const MAX_UPSTREAM_ERROR_BODY: usize = 1024 * 1024;

/// Whether an answer is a stream: SSE, or the stream type the provider's kind asks for
/// (Bedrock's AWS eventstream).
pub fn is_event_stream(h: &ResponseHeader, provider: &Provider) -> bool {
    h.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let v = v.trim_start().to_ascii_lowercase();
        v.starts_with("text/event-stream") || v.starts_with(provider.accept(true))
    })
}

/// Maps an upstream error status. 4xx other than credential failures pass through as they
/// are (`Ok`); credential failures and 5xx become gateway errors (`Err`, rendered as 502).
pub async fn upstream_error(
    settings: &Settings,
    provider: &Provider,
    ex: &mut Exchange,
    status: u16,
) -> Result<(u16, Bytes), GatewayError> {
    let body = upstream::read_all(ex, MAX_UPSTREAM_ERROR_BODY, provider, &settings.upstream_timeouts())
        .await
        .unwrap_or_default();
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

/// The human part of an upstream error body: the format's own message field, else the text.
pub fn error_message(format: WireFormat, body: &[u8]) -> String {
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

/// Answers an upstream error status. Same format: 4xx pass through verbatim. Translated:
/// same status and the upstream's message, in the client's envelope. Credential failures
/// and 5xx become gateway errors (502).
pub async fn upstream_error_status(
    req: &mut Req<'_>,
    provider: &Provider,
    mut ex: Exchange,
    mut headers: Headers,
    translated: bool,
) {
    let status = ex.header.status.as_u16();
    let settings = &req.snapshot.settings;
    let result = upstream_error(settings, provider, &mut ex, status).await;
    req.ctx.upstream_time += ex.started.elapsed();
    match result {
        Ok((status, body)) => {
            let body = if translated {
                let message = error_message(provider.format(), &body);
                headers.push((http::header::CONTENT_TYPE, "application/json".into()));
                Bytes::from(upstream_client_error_body(req.ctx.surface, status, &message))
            } else {
                body
            };
            respond::whole(req.session, req.ctx, status, headers, body).await;
            req.ctx.error_code = Some("upstream_client_error");
        }
        Err(e) => respond::error(req.session, req.ctx, &e).await,
    }
    upstream::release(&req.state.connector, ex, settings.upstream_idle_timeout).await;
}

/// Turns a whole upstream body into the client's format; `Err` means undecodable.
pub type Convert<'a> = Option<&'a (dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Sync)>;

/// Reads a whole 2xx upstream body and answers with it, converted to the client's format
/// when `convert` is given (its `Err` means the upstream sent something undecodable: 502).
/// The answer is OpenAI-shaped by then (the endpoints using this answer on that surface).
pub async fn whole_openai_body(
    req: &mut Req<'_>,
    provider: &Provider,
    mut ex: Exchange,
    mut headers: Headers,
    convert: Convert<'_>,
) -> Result<(), GatewayError> {
    let status = ex.header.status.as_u16();
    let settings = &req.snapshot.settings;
    let idle = settings.upstream_idle_timeout;
    let body = upstream::read_all(&mut ex, MAX_UPSTREAM_BODY, provider, &settings.upstream_timeouts()).await;
    req.ctx.upstream_time += ex.started.elapsed();
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
                upstream::release(&req.state.connector, ex, idle).await;
                return Err(GatewayError::UpstreamStatus { provider: provider.id.clone(), status, message });
            }
        }
        headers.push((http::header::CONTENT_TYPE, "application/json".into()));
    }
    billing::bill_answer(req.state, req.ctx, WireFormat::OpenAi.codec().usage(&body), true, 0);
    req.ctx.bill.cost_header = true;
    // Answer first: returning the connection to the pool is not the client's business.
    respond::whole(req.session, req.ctx, status, headers, body).await;
    upstream::release(&req.state.connector, ex, idle).await;
    Ok(())
}
