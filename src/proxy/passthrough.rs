//! Thin authenticated passthroughs (PRODUCT.md §1.3): a provider's REST resources (a
//! Responses API response, later files and batches) reached through the gateway. The
//! request goes to the provider holding the resource, with the stored credential or the
//! caller's own (BYOK); the answer comes back unchanged, status and body, streamed through
//! as it arrives.

use std::sync::Arc;

use bytes::Bytes;

use super::answer::MAX_UPSTREAM_BODY;
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

/// Who holds `id` for the caller's project, as the trace store remembers it; a store that
/// cannot be read in time is a 503 (guessing could send the call to the wrong provider).
pub async fn recorded_owner(
    req: &Req<'_>,
    project: &str,
    id: &str,
) -> Result<Option<Arc<str>>, GatewayError> {
    req.state.owners.lookup(project, id).await.map_err(|e| GatewayError::Unavailable {
        code: "trace_store_unavailable",
        message: format!("cannot tell which provider holds {id}: {e}"),
    })
}

/// The provider kinds of the vendor whose API `serves` is about: where a caller's own key
/// may look for an id the gateway has no record of.
fn vendor_kind(kind: &str) -> bool {
    matches!(kind, "openai" | "azure" | "anthropic")
}

/// The provider holding `id` for the caller's project. An id no kept record names is sent,
/// with the caller's own key (BYOK), to the vendor's own provider (`openai`, `azure` or
/// `anthropic` kind, by id) that `serves` it and whose key format the key fits, never to a
/// third-party compatible server; otherwise it is unknown here (404): the stored
/// credentials are shared by every project, so they reach only what this project created.
pub async fn owner(
    req: &Req<'_>,
    principal: &Principal,
    id: &str,
    serves: impl Fn(&Provider) -> bool,
) -> Result<Arc<Provider>, GatewayError> {
    let providers = &req.snapshot.providers;
    if let Some(owner) = recorded_owner(req, &principal.project, id).await? {
        return match providers.get(&*owner) {
            Some(p) if serves(p) => Ok(p.clone()),
            // An id of another API (a response id on the files path, an Anthropic file as
            // an OpenAI batch's input): not a thing this endpoint has.
            Some(_) => Err(GatewayError::NotFound {
                code: "not_found",
                message: format!("{id} is not something this endpoint serves"),
            }),
            None => Err(GatewayError::NotFound {
                code: "not_found",
                message: format!("{id} is held by provider {owner}, which is no longer configured"),
            }),
        };
    }
    if let Some(key) = &req.ctx.provider_key {
        let mut fitting: Vec<&Arc<Provider>> = providers
            .values()
            .filter(|p| {
                vendor_kind(p.adapter.kind()) && serves(p) && p.byok_credential(key.secret()).is_some()
            })
            .collect();
        fitting.sort_by(|a, b| a.id.cmp(&b.id));
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

/// Records an upstream exchange on the request. The provider's refusal of the gateway's
/// stored credential (401) is not passed on (its words may quote the key): that is a 502.
/// Any other status passes through, body and all.
pub async fn answered(
    req: &mut Req<'_>,
    provider: &Provider,
    mut ex: Exchange,
    byok: bool,
) -> Result<Exchange, GatewayError> {
    let (state, settings) = (req.state, &req.snapshot.settings);
    req.ctx.ttfb = Some(ex.ttfb);
    req.ctx.served = true;
    let status = ex.header.status.as_u16();
    // 403 passes through: on these endpoints it is about the resource (a beta not enabled).
    if status == 401 && !byok {
        let _ = upstream::read_all(&mut ex, 64 * 1024, provider, &settings.upstream_timeouts()).await;
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
    Ok(ex)
}

/// Answers with the upstream's whole body (bounded), after `inspect` has read it; a body
/// `inspect` returns replaces it.
pub async fn whole(
    req: &mut Req<'_>,
    provider: &Provider,
    mut ex: Exchange,
    inspect: impl FnOnce(&mut RequestCtx, &[u8]) -> Option<Vec<u8>>,
) -> Result<(), GatewayError> {
    let (state, settings) = (req.state, &req.snapshot.settings);
    let read = upstream::read_all(&mut ex, MAX_UPSTREAM_BODY, provider, &settings.upstream_timeouts()).await;
    req.ctx.upstream_time += ex.started.elapsed();
    let body = match read {
        Ok(body) => body,
        Err(e) => {
            ex.session.shutdown().await;
            return Err(e);
        }
    };
    let body = match inspect(req.ctx, &body) {
        Some(changed) => Bytes::from(changed),
        None => body,
    };
    let mut headers = passthrough_headers(&ex.header);
    headers.push((name("x-modelux-provider-used"), provider.id.clone()));
    let status = ex.header.status.as_u16();
    if !req.session.is_body_done() {
        req.session.set_keepalive(None);
    }
    respond::whole(req.session, req.ctx, status, headers, body).await;
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    Ok(())
}

/// Streams an upstream answer to the client as it arrives, with its status; its length
/// when the upstream declared one. A failure part-way closes the client's connection: a
/// cut body must not pass for a whole one.
pub async fn relay(req: &mut Req<'_>, provider: &Provider, mut ex: Exchange, mut headers: Headers) {
    let (state, settings) = (req.state, &req.snapshot.settings);
    let (session, ctx) = (&mut *req.session, &mut *req.ctx);
    // (A client that stops reading the download is cut off by the connection's write
    // timeout, `server.client_write_timeout_ms`.) One whose body was not read cannot send
    // another request.
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    let status = ex.header.status.as_u16();
    let h = &ex.header.headers;
    // The upstream's framing decides: a chunked body's `Content-Length` (if any) is wrong.
    let chunked = h
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("chunked")));
    let length = h.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).filter(|_| !chunked);
    match (status, length) {
        // No body, so no framing.
        (204 | 304, _) => {}
        (_, Some(n)) => headers.push((http::header::CONTENT_LENGTH, n.to_string())),
        (_, None) => headers.push((http::header::TRANSFER_ENCODING, "chunked".into())),
    }
    if !respond::stream_header(session, ctx, status, headers).await {
        ex.session.shutdown().await;
        return;
    }
    let timeouts = settings.upstream_timeouts();
    loop {
        match upstream::next_chunk(&mut ex, provider, &timeouts).await {
            Ok(Some(chunk)) => {
                if !respond::piece(session, ctx, chunk).await {
                    ctx.upstream_time += ex.started.elapsed();
                    ex.session.shutdown().await;
                    return;
                }
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
    if let Err(e) = session.write_response_body(None, true).await {
        respond::client_gone(ctx, &e);
    }
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
}
