//! Writing answers to the client: whole responses in one write, errors in the client's
//! wire format, and the metrics of a finished request.

use bytes::Bytes;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::headers::{Headers, REQUEST_ID};
use super::RequestCtx;
use crate::error::GatewayError;
use crate::metrics::Metrics;

pub fn header(status: u16, extra: Headers, ctx: &RequestCtx) -> Result<ResponseHeader, GatewayError> {
    let build = || -> pingora::Result<ResponseHeader> {
        // No case map: header names go out lowercase, and building it costs an allocation per header.
        let mut h = ResponseHeader::build_no_case(status, Some(extra.len() + 8))?;
        h.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        for (name, value) in extra {
            // A value a header cannot carry (client data validated at the read should never
            // get here) is left out rather than costing the client its answer.
            match http::HeaderValue::try_from(value) {
                Ok(value) => h.append_header(name, value)?,
                Err(_) => {
                    tracing::warn!(header = %name, "response header value cannot be carried; left out");
                    false
                }
            };
        }
        let mut spend = Vec::new();
        super::billing::push_headers(&ctx.bill, &mut spend);
        super::cache_fill::push_headers(ctx, &mut spend);
        for (name, value) in spend {
            h.insert_header(name, value)?;
        }
        Ok(h)
    };
    build().map_err(|e| GatewayError::internal(format!("building response header: {e}")))
}

/// Sends a complete response. Header and body leave in one write: pingora buffers the
/// header and flushes it together with a Content-Length body.
pub async fn whole(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    mut extra: Headers,
    body: Bytes,
) {
    extra.push((http::header::CONTENT_LENGTH, body.len().to_string()));
    let (status, resp, body) = match header(status, extra, ctx) {
        Ok(h) => (status, h, body),
        Err(e) => {
            tracing::error!(error = %e, "cannot build response; answering 500 and closing");
            session.set_keepalive(None);
            match internal_error(ctx) {
                Some(answer) => answer,
                None => {
                    // Not even the fixed answer could be built: the client sees the close.
                    ctx.status = 500;
                    ctx.error_code = Some("internal_error");
                    session.shutdown().await;
                    return;
                }
            }
        }
    };
    ctx.status = status;
    let len = body.len() as u64;
    ctx.capture_response(&body);
    if ctx.cache_pending.is_some() {
        super::cache_fill::finish(ctx).await;
    }
    if let Err(e) = session.write_response_header(Box::new(resp), false).await {
        tracing::debug!(error = %e, "client went away before the response header");
        ctx.error_code.get_or_insert("client_disconnected");
        return;
    }
    crate::conn::allow_for_answer(session, body.len());
    match session.write_response_body(Some(body), true).await {
        Ok(()) => ctx.bytes_out += len,
        Err(e) => {
            tracing::debug!(error = %e, "client went away during the response body");
            if ctx.error_code.is_none() {
                client_gone(ctx, &e);
            }
        }
    }
}

/// The answer when a response could not be built: a 500 in the client's format, made of
/// fixed parts only, that closes the connection (whatever failed may have left the
/// exchange in a state the next request should not inherit).
fn internal_error(ctx: &mut RequestCtx) -> Option<(u16, ResponseHeader, Bytes)> {
    let err = GatewayError::internal("the gateway could not build its answer to this request");
    ctx.error_code = Some(err.code());
    let body = Bytes::from(ctx.surface.codec().error_body(&err));
    let mut h = ResponseHeader::build_no_case(500, Some(4)).ok()?;
    h.insert_header(REQUEST_ID, ctx.request_id.as_str()).ok()?;
    h.insert_header(http::header::CONTENT_TYPE, "application/json").ok()?;
    h.insert_header(http::header::CONTENT_LENGTH, body.len().to_string()).ok()?;
    Some((500, h, body))
}

/// Sends a streamed answer's header. `false`: nothing more can go out (the header could
/// not be built, and the client got that error instead; or the client went away).
pub async fn stream_header(session: &mut Session, ctx: &mut RequestCtx, status: u16, extra: Headers) -> bool {
    let resp = match header(status, extra, ctx) {
        Ok(h) => h,
        Err(e) => {
            error(session, ctx, &e).await;
            return false;
        }
    };
    ctx.status = status;
    if session.write_response_header(Box::new(resp), false).await.is_err() {
        ctx.error_code = Some("client_disconnected");
        return false;
    }
    true
}

/// Sends one piece of a streamed answer (kept for the trace, counted). `false`: the client
/// went away.
pub async fn piece(session: &mut Session, ctx: &mut RequestCtx, piece: Bytes) -> bool {
    let len = piece.len() as u64;
    ctx.capture_response(&piece);
    if let Err(e) = session.write_response_body(Some(piece), false).await {
        client_gone(ctx, &e);
        return false;
    }
    ctx.bytes_out += len;
    true
}

/// A write to the client failed: it went away, or stopped reading for longer than
/// `server.client_write_timeout_ms` (counted apart: the gateway cut it off).
pub fn client_gone(ctx: &mut RequestCtx, e: &pingora::Error) {
    let code = if *e.etype() == pingora::ErrorType::WriteTimedout {
        "client_write_timeout"
    } else {
        "client_disconnected"
    };
    ctx.error_code = Some(code);
}

/// Renders a gateway error in the OpenAI envelope.
pub async fn error(session: &mut Session, ctx: &mut RequestCtx, err: &GatewayError) {
    ctx.error_code = Some(err.code());
    // A body we did not read would be parsed as the next request: close instead.
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    let mut extra: Headers = vec![(http::header::CONTENT_TYPE, "application/json".to_string())];
    match err {
        GatewayError::MethodNotAllowed { allowed } => {
            extra.push((http::header::ALLOW, (*allowed).to_string()))
        }
        GatewayError::BudgetExceeded(blocked) => {
            extra.push((http::header::RETRY_AFTER, blocked.retry_after.to_string()))
        }
        GatewayError::BudgetBusy { .. } => extra.push((http::header::RETRY_AFTER, "1".into())),
        GatewayError::RateLimited { retry_after, .. } => {
            extra.push((http::header::RETRY_AFTER, retry_after.to_string()))
        }
        _ => {}
    }
    whole(session, ctx, err.status(), extra, Bytes::from(ctx.surface.codec().error_body(err))).await;
    // Lingering close: closing while the client is still uploading makes the kernel send
    // a reset that can destroy our response before the client reads it. Discard what is
    // still arriving for a bounded time first (not for a client that is slow on purpose).
    if !session.is_body_done() && !matches!(err, GatewayError::RequestTimeout { .. }) {
        let _ = tokio::time::timeout(LINGER, session.drain_request_body()).await;
    }
}

pub(super) const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

pub fn record_metrics(metrics: &Metrics, ctx: &RequestCtx) {
    metrics.in_flight.dec();
    let total = ctx.started.elapsed();
    let status_code = StatusCode::from_u16(ctx.status);
    let status = status_code.as_ref().map(|s| s.as_str()).unwrap_or("000");
    let provider = ctx.provider.as_deref().unwrap_or("none");
    let model = metrics.model_label(ctx.model.as_deref().unwrap_or(""));
    metrics.requests.with_label_values(&[ctx.surface.as_str(), provider, model, status]).inc();
    metrics.duration.with_label_values(&[ctx.surface.as_str()]).observe(total.as_secs_f64());
    metrics
        .overhead
        .with_label_values(&[ctx.surface.as_str()])
        .observe(total.saturating_sub(ctx.upstream_time).as_secs_f64());
    if ctx.upstream_time > std::time::Duration::ZERO {
        metrics.upstream_duration.with_label_values(&[provider]).observe(ctx.upstream_time.as_secs_f64());
    }
    if let Some(ttfb) = ctx.ttfb {
        metrics.ttfb.with_label_values(&[provider]).observe(ttfb.as_secs_f64());
    }
    metrics.bytes_in.with_label_values(&[ctx.surface.as_str()]).inc_by(ctx.bytes_in);
    metrics.bytes_out.with_label_values(&[ctx.surface.as_str()]).inc_by(ctx.bytes_out);
    if let Some(code) = ctx.error_code {
        metrics.errors.with_label_values(&[ctx.surface.as_str(), code]).inc();
        if code == "client_write_timeout" {
            metrics.client_timeouts.with_label_values(&["proxy", "write"]).inc();
        }
    }
}
