//! Thin authenticated passthroughs (PRODUCT.md §1.3): a provider's REST resources (a
//! Responses API response, later files and batches) reached through the gateway. The
//! request goes to the provider holding the resource, with the stored credential or the
//! caller's own (BYOK); the answer comes back unchanged, status and body, streamed through
//! as it arrives.

use std::sync::Arc;

use bytes::Bytes;

use super::headers::{name, passthrough_headers, Headers};
use super::{respond, GatewayState, Req, RequestCtx};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::providers::upstream::{self, Exchange};
use crate::providers::Provider;

/// The request names a provider-side id the answer created: kept with the request's trace
/// record and remembered at once, so the calls that name it go where it lives.
pub fn remember_owned(state: &GatewayState, ctx: &mut RequestCtx, id: String) {
    if let (Some(principal), Some(provider)) = (&ctx.principal, &ctx.provider) {
        state.owners.remember(&principal.project, &id, provider);
    }
    if !ctx.owned_ids.contains(&id) {
        ctx.owned_ids.push(id);
    }
}

/// A provider-side id from the request path: what providers issue (`resp_…`, `file-…`,
/// `batch_…`, `msgbatch_…`), never anything that could change the upstream path.
pub fn path_id(id: &str) -> Result<&str, GatewayError> {
    let valid = !id.is_empty()
        && id.len() <= 256
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && id != "."
        && id != "..";
    if valid {
        Ok(id)
    } else {
        Err(GatewayError::invalid("invalid_id", format!("\"{}\" is not a valid id", id.escape_debug())))
    }
}

/// The provider holding `id` for the caller's project. An id no kept record names is sent,
/// with the caller's own key (BYOK), to a provider whose kind `serves` and whose key format
/// the key fits (the vendor's own kind first, then by id); otherwise it is unknown here (404): the stored
/// credentials are shared by every project, so they reach only what this project created.
pub async fn owner(
    req: &Req<'_>,
    principal: &Principal,
    id: &str,
    serves: impl Fn(&Provider) -> bool,
) -> Result<Arc<Provider>, GatewayError> {
    let providers = &req.snapshot.providers;
    if let Some(owner) = req.state.owners.lookup(&principal.project, id).await {
        return providers.get(&*owner).cloned().ok_or_else(|| GatewayError::NotFound {
            code: "not_found",
            message: format!("{id} is held by provider {owner}, which is no longer configured"),
        });
    }
    if let Some(key) = &req.ctx.provider_key {
        let mut fitting: Vec<&Arc<Provider>> =
            providers.values().filter(|p| serves(p) && p.byok_credential(key.secret()).is_some()).collect();
        // The key's format names a vendor (`sk-…` is OpenAI's): its own kind first.
        let rank = |p: &Provider| match p.adapter.kind() {
            "openai" | "anthropic" => 0,
            "azure" => 1,
            _ => 2,
        };
        fitting.sort_by(|a, b| (rank(a), &a.id).cmp(&(rank(b), &b.id)));
        if let Some(p) = fitting.first() {
            return Ok(Arc::clone(p));
        }
    }
    Err(GatewayError::NotFound {
        code: "not_found",
        message: format!(
            "no request of this project created {id} (or its record is past traces.retention_days); \
             send X-Modelux-Provider-Key to reach it with your own provider key"
        ),
    })
}

/// Sends one request to `provider` and relays its answer, whatever its status: the body
/// streams through untouched. Only the provider's refusal of the gateway's stored
/// credential is not passed on (its words may quote the key): that is a 502.
pub async fn forward(
    req: &mut Req<'_>,
    provider: &Arc<Provider>,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<(), GatewayError> {
    let state = req.state;
    let settings = &req.snapshot.settings;
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
    let call =
        upstream::Call { method, path, body, accept: &accept, extra_headers: &[], credential: byok.as_ref() };
    let timeouts = settings.upstream_timeouts();
    req.ctx.provider = Some(provider.id.clone());
    let mut ex = upstream::exchange(&state.connector, &state.metrics, &timeouts, provider, call).await?;
    req.ctx.ttfb = Some(ex.ttfb);
    req.ctx.served = true;
    let status = ex.header.status.as_u16();
    if matches!(status, 401 | 403) && byok.is_none() {
        let _ = upstream::read_all(&mut ex, 64 * 1024, provider, &timeouts).await;
        req.ctx.upstream_time += ex.started.elapsed();
        upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
        return Err(GatewayError::UpstreamStatus {
            provider: provider.id.clone(),
            status,
            message: "check the provider's api_key".into(),
        });
    }
    if !(200..300).contains(&status) {
        req.ctx.error_code = Some("upstream_client_error");
    }
    let mut headers = passthrough_headers(&ex.header);
    headers.push((name("x-modelux-provider-used"), provider.id.clone()));
    relay(req, provider, ex, headers).await;
    Ok(())
}

/// Streams an upstream answer to the client as it arrives, with its status; its length
/// when the upstream declared one. A failure part-way closes the client's connection: a
/// cut body must not pass for a whole one.
async fn relay(req: &mut Req<'_>, provider: &Provider, mut ex: Exchange, mut headers: Headers) {
    let (state, settings) = (req.state, &req.snapshot.settings);
    let (session, ctx) = (&mut *req.session, &mut *req.ctx);
    let status = ex.header.status.as_u16();
    let length = ex.header.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    match length {
        Some(n) => headers.push((http::header::CONTENT_LENGTH, n.to_string())),
        None => headers.push((http::header::TRANSFER_ENCODING, "chunked".into())),
    }
    let resp = match respond::header(status, headers, ctx) {
        Ok(h) => h,
        Err(e) => {
            ex.session.shutdown().await;
            respond::error(session, ctx, &e).await;
            return;
        }
    };
    ctx.status = status;
    if session.write_response_header(Box::new(resp), false).await.is_err() {
        ctx.error_code = Some("client_disconnected");
        ex.session.shutdown().await;
        return;
    }
    let timeouts = settings.upstream_timeouts();
    loop {
        match upstream::next_chunk(&mut ex, provider, &timeouts).await {
            Ok(Some(chunk)) => {
                let len = chunk.len() as u64;
                ctx.capture_response(&chunk);
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
                tracing::debug!(error = %e.message(), provider = %provider.id, "upstream body cut off");
                ctx.error_code = Some("upstream_stream_error");
                ctx.upstream_time += ex.started.elapsed();
                ex.session.shutdown().await;
                // Closed, not finished: finishing would end a chunked body cleanly.
                session.downstream_session.shutdown().await;
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
