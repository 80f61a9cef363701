//! `POST /openai/v1/embeddings`: OpenAI-family targets get the client's bytes (model
//! rewritten); Google and Cohere get a translated request, and the answer comes back as an
//! OpenAI embedding list in the encoding the client asked for.

use bytes::Bytes;

use super::answer::{self, Convert};
use super::headers::{answer_headers, Served};
use super::request::{self, Incoming};
use super::{billing, dry_run, Req};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::providers::upstream;
use crate::wire::routed::{Payload, RoutedRequest};
use crate::wire::{self, WireFormat};

pub async fn embed(req: &mut Req<'_>, principal: &Principal) -> Result<(), GatewayError> {
    let snapshot = req.snapshot;
    let settings = &snapshot.settings;
    let body = request::read_json_body(req).await?;
    let incoming: Incoming<'_> =
        request::incoming(req.session, req.ctx, RoutedRequest::parse_routed(&body, Payload::Input)?);
    let mut facts =
        crate::admission::facts(&incoming.request, &incoming.meta, body.len(), &req.ctx.request_id);
    req.ctx.bill.est_input_tokens = crate::estimate::reserved_tokens(body.len());
    if !incoming.dry_run {
        billing::charge_tokens(req.state, req.ctx, principal, facts.est_input_tokens).await?;
    }
    let (eval, routed) = request::admit(req, principal, &incoming, &mut facts, !incoming.dry_run)?;
    if incoming.dry_run {
        billing::take_deferred(req.state, req.ctx).await?;
        return dry_run::answer(req, &routed, &facts, 0).await;
    }
    let info = routed.info();
    let looked_up = match req.snapshot.any_cache {
        true => super::cache::lookup_embeddings(req, principal, &info, &incoming.request.model, &body).await,
        false => Ok(false),
    };
    if !matches!(looked_up, Ok(false)) {
        // A hit, or a rate limit's refusal: no call, so a probe lease goes back.
        routed.return_probes(crate::routing::health::now_ms(), &snapshot.health_settings);
        return looked_up.map(drop);
    }
    let member = routed.first()?;
    let usd = billing::max_cost(snapshot, &[member], false, req.ctx.bill.est_input_tokens, Some(0), 1);
    if let Err(refused) = billing::reserve(req.state, req.ctx, &eval, usd).await {
        routed.return_probes(crate::routing::health::now_ms(), &snapshot.health_settings);
        return Err(refused);
    }
    req.ctx.bill.rates = member.rates;
    let served = Served::new(&info, member, 1);
    let provider = member.target.provider.clone();
    let format = provider.format();
    let model = member.target.model.as_str();
    let (upstream_body, translation) = match format {
        WireFormat::OpenAi => (Bytes::from(incoming.request.encode_for_upstream(model)), None),
        _ => {
            let (canonical, encoding) = wire::embeddings::decode_request(&body)?;
            (Bytes::from(wire::encode_embeddings(format, &canonical, model)?), Some(encoding))
        }
    };
    let path = provider.embeddings_path(model);
    let byok = req.ctx.provider_key.as_ref().and_then(|k| provider.byok_credential(k.secret()));
    let call = upstream::Call {
        method: "POST",
        path: &path,
        body: upstream_body,
        accept: "application/json",
        extra_headers: &[],
        credential: byok.as_ref(),
    };
    let state = req.state;
    let ex =
        upstream::exchange(&state.connector, &state.metrics, &settings.upstream_timeouts(), &provider, call)
            .await?;
    req.ctx.ttfb = Some(ex.ttfb);
    req.ctx.set_served(member);
    let headers = answer_headers(&ex.header, translation.is_some(), &served);
    if !ex.header.status.is_success() {
        answer::upstream_error_status(req, &provider, ex, headers, translation.is_some()).await;
        return Ok(());
    }
    let convert = |body: &[u8]| {
        let encoding = translation.unwrap_or(wire::embeddings::Encoding::Float);
        wire::decode_embeddings(format, body)
            .map(|resp| wire::embeddings::encode_response(&resp, model, encoding))
    };
    let convert: Convert<'_> = if translation.is_some() { Some(&convert) } else { None };
    answer::whole_openai_body(req, &provider, ex, headers, convert).await
}
