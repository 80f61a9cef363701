//! `POST /anthropic/v1/messages/count_tokens`: forwarded to Anthropic-family targets,
//! estimated locally (`estimate::request_tokens`) for the others.

use bytes::Bytes;
use serde_json::json;

use super::answer::{upstream_error, MAX_UPSTREAM_ERROR_BODY};
use super::headers::{name, push_route_headers, Headers, Served};
use super::request::{self, Incoming};
use super::{dry_run, respond, Req};
use crate::auth::Principal;
use crate::error::{GatewayError, Surface};
use crate::providers::upstream;
use crate::wire::routed::RoutedRequest;
use crate::wire::{self, WireFormat};

pub async fn count(req: &mut Req<'_>, principal: &Principal) -> Result<(), GatewayError> {
    let snapshot = req.snapshot;
    let settings = &snapshot.settings;
    let body = request::read_json_body(req).await?;
    let incoming: Incoming<'_> = request::incoming(req.session, req.ctx, RoutedRequest::parse(&body)?);
    let facts = crate::admission::facts(&incoming.request, &incoming.meta, body.len(), &req.ctx.request_id);
    let routed = request::route(req, principal, &incoming.request.model, &facts, !incoming.dry_run)?;
    if incoming.dry_run {
        return dry_run::answer(req, &routed, &facts, 0).await;
    }
    let member = routed.first()?;
    let target = &member.target;
    let provider = target.provider.clone();
    let info = routed.info();
    let mut headers: Headers = vec![(http::header::CONTENT_TYPE, "application/json".into())];
    push_route_headers(&mut headers, &Served::new(&info, member, 1));
    if provider.format() != WireFormat::Anthropic {
        let canonical = wire::decode_request(Surface::Anthropic, &body)?;
        let estimate = json!({"input_tokens": crate::estimate::request_tokens(&canonical)});
        headers.push((name("x-modelux-token-count"), "estimated".into()));
        let body = serde_json::to_vec(&estimate).map_err(|e| GatewayError::internal(e.to_string()))?;
        respond::whole(req.session, req.ctx, 200, headers, Bytes::from(body)).await;
        return Ok(());
    }
    let upstream_body = Bytes::from(incoming.request.encode_for_upstream(&target.model));
    let extra = request::anthropic_headers(req.session, Surface::Anthropic);
    let extra_refs: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let path = provider.upstream_path("/v1/messages/count_tokens");
    let byok = req.ctx.provider_key.as_ref().and_then(|k| provider.byok_credential(k.secret()));
    let call = upstream::Call {
        method: "POST",
        path: &path,
        body: upstream_body,
        accept: "application/json",
        extra_headers: &extra_refs,
        credential: byok.as_ref(),
    };
    let state = req.state;
    let mut ex =
        upstream::exchange(&state.connector, &state.metrics, &settings.upstream_timeouts(), &provider, call)
            .await?;
    req.ctx.ttfb = Some(ex.ttfb);
    let status = ex.header.status.as_u16();
    let result = if (200..300).contains(&status) {
        upstream::read_all(&mut ex, MAX_UPSTREAM_ERROR_BODY, &provider, &settings.upstream_timeouts())
            .await
            .map(|b| (status, b))
    } else {
        upstream_error(settings, &provider, &mut ex, status).await
    };
    req.ctx.upstream_time += ex.started.elapsed();
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    let (status, body) = result?;
    respond::whole(req.session, req.ctx, status, headers, body).await;
    Ok(())
}
