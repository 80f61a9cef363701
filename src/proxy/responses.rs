//! The OpenAI Responses API (PRODUCT.md §1.3, §4.7). `POST /responses` is routed like chat
//! (`@config` fallback, budgets, rate limits, pricing) but only to OpenAI-family providers,
//! and the client's bytes go through untouched but for `model`. A response is remembered
//! with the provider that created it: a follow-up naming it (`previous_response_id`) and
//! `GET`/`DELETE`/`cancel`/`input_items` on it go there.

use bytes::Bytes;

use super::execute::{self, Exec};
use super::passthrough;
use super::request::{self, Incoming};
use super::{billing, dry_run, Req};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::routing::Plan;
use crate::wire::routed::{Payload, RoutedRequest};

/// What a path under `/responses/{id}` asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    /// `GET` (retrieve; `?stream=true` replays the stream) or `DELETE`.
    Item,
    /// `POST …/cancel`.
    Cancel,
    /// `GET …/input_items`.
    InputItems,
}

pub async fn create(req: &mut Req<'_>, principal: &Principal) -> Result<(), GatewayError> {
    let snapshot = req.snapshot;
    let body = request::read_json_body(req).await?;
    let incoming: Incoming<'_> =
        request::incoming(req.session, req.ctx, RoutedRequest::parse_routed(&body, Payload::Responses)?);
    let asked = &incoming.request;
    let mut facts = crate::admission::facts(asked, &incoming.meta, body.len(), &req.ctx.request_id);
    req.ctx.bill.est_input_tokens = crate::estimate::reserved_tokens(body.len());
    if !incoming.dry_run {
        let estimate = facts.est_input_tokens.saturating_add(asked.max_tokens.unwrap_or(0));
        billing::charge_tokens(req.state, req.ctx, principal, estimate)?;
    }
    let (eval, routed) = request::admit(req, principal, &incoming, &mut facts, !incoming.dry_run)?;
    if incoming.dry_run {
        return dry_run::answer(req, &routed, &facts, 1024).await;
    }
    let (retry_on, total_budget) = match routed.plan() {
        Plan::Sequential { retry_on, total_budget, cascade: false } => (retry_on, total_budget),
        Plan::Sequential { cascade: true, .. } | Plan::Parallel { .. } => {
            return Err(GatewayError::invalid(
                "unsupported_policy",
                format!(
                    "{} routes with a cascade or an ensemble, which the Responses API does not support; \
                     use single, fallback, cost or latency routing",
                    asked.model
                ),
            ))
        }
    };
    let mut attempts = routed.attempts();
    if let Some(previous) = &asked.previous_response_id {
        // A continuation is only known to the provider that created what it continues.
        if let Some(owner) = req.state.owners.lookup(&principal.project, previous).await {
            attempts.retain(|m| *m.target.provider.id == *owner);
            if attempts.is_empty() {
                return Err(GatewayError::invalid(
                    "previous_response_elsewhere",
                    format!(
                        "previous_response_id {previous} was created by provider {owner}, which {} does \
                         not route to",
                        asked.model
                    ),
                ));
            }
        }
    }
    if attempts.iter().all(|m| m.target.provider.openai_resource_path("/responses").is_none()) {
        let kinds: Vec<String> = attempts
            .iter()
            .map(|m| format!("{} ({})", m.target.provider.id, m.target.provider.adapter.kind()))
            .collect();
        return Err(GatewayError::invalid(
            "unsupported_provider",
            format!(
                "the Responses API is served only by openai, azure and openai_compatible providers; {} \
                 routes to {}",
                asked.model,
                kinds.join(", ")
            ),
        ));
    }
    let usd =
        billing::max_cost(snapshot, &attempts, false, req.ctx.bill.est_input_tokens, asked.max_tokens, 1);
    billing::reserve(req.state, req.ctx, &eval, usd)?;
    let info = routed.info();
    let mut exec = Exec::responses(req, asked, &body, &info);
    execute::sequential(&mut exec, &attempts, execute::Sequence { retry_on, total_budget, cascade: false })
        .await
}

/// `GET`/`DELETE /responses/{id}`, `POST /responses/{id}/cancel`,
/// `GET /responses/{id}/input_items`: passed to the provider holding the response.
pub async fn resource(req: &mut Req<'_>, principal: &Principal, op: Op) -> Result<(), GatewayError> {
    let header = req.session.req_header();
    let method = header.method.as_str().to_string();
    let path = header.uri.path();
    let tail = &path[path.find("/responses/").map_or(path.len(), |i| i + "/responses/".len())..];
    let id = passthrough::path_id(tail.split('/').next().unwrap_or(""))?.to_string();
    let suffix = match op {
        Op::Item => "",
        Op::Cancel => "/cancel",
        Op::InputItems => "/input_items",
    };
    let query = header.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    if query.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(GatewayError::invalid("invalid_request", "the query string holds forbidden bytes"));
    }
    let body = match op {
        // Cancel takes no body; whatever small one the client sent goes along.
        Op::Cancel => request::read_body_bounded(req, 64 * 1024).await?,
        Op::Item | Op::InputItems => Bytes::new(),
    };
    let provider = passthrough::owner(req, principal, &id, |p| p.openai_resource_path("/").is_some()).await?;
    let Some(upstream_path) = provider.openai_resource_path(&format!("/responses/{id}{suffix}{query}"))
    else {
        return Err(GatewayError::internal("the provider holding the response serves no Responses API"));
    };
    passthrough::forward(req, &provider, &method, &upstream_path, body).await
}
