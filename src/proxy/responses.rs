//! The OpenAI Responses API (PRODUCT.md §1.3, §4.7). `POST /responses` is routed like chat
//! (`@config` fallback, budgets, rate limits, pricing) but only to OpenAI-family providers,
//! and the client's bytes go through untouched but for `model`. A response is remembered
//! with the provider that created it: a follow-up naming it (`previous_response_id`) goes
//! there, as do `GET`/`DELETE`/`cancel`/`input_items` on it (`resources`).

use super::execute::{self, Exec};
use super::passthrough;
use super::request::{self, Incoming};
use super::{billing, dry_run, Req};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::routing::health::now_ms;
use crate::routing::{Member, Plan};
use crate::wire::routed::{Payload, RoutedRequest};

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
    let health = &snapshot.health_settings;
    // Refused after routing: the half-open probe leases it took go back.
    let refuse = |routed: &crate::admission::Routed<'_>, e: GatewayError| {
        routed.return_probes(now_ms(), health);
        Err(e)
    };
    let (retry_on, total_budget) = match routed.plan() {
        Plan::Sequential { retry_on, total_budget, cascade: false } => (retry_on, total_budget),
        Plan::Sequential { cascade: true, .. } | Plan::Parallel { .. } => {
            let why = format!(
                "{} routes with a cascade or an ensemble, which the Responses API does not support; use \
                 single, fallback, cost or latency routing",
                asked.model
            );
            return refuse(&routed, GatewayError::invalid("unsupported_policy", why));
        }
    };
    // A continuation is only known to the provider that created what it continues, and only
    // this project's responses may be continued on the shared stored credentials.
    let pinned = match &asked.previous_response_id {
        None => None,
        Some(previous) => match passthrough::recorded_owner(req, &principal.project, previous).await {
            Err(e) => return refuse(&routed, e),
            Ok(Some(owner)) => Some(owner),
            // The caller's own key reaches only the caller's own responses.
            Ok(None) if req.ctx.provider_key.is_some() => None,
            Ok(None) => {
                let why = format!(
                    "previous_response_id {previous} was not created through this project (or its record \
                     is past traces.retention_days)"
                );
                return refuse(&routed, GatewayError::NotFound { code: "not_found", message: why });
            }
        },
    };
    let skip = |m: &Member| -> Option<String> {
        let provider = &m.target.provider;
        if provider.openai_resource_path("/responses").is_none() {
            return Some(format!(
                "provider {} (kind {}) does not serve the Responses API",
                provider.id,
                provider.adapter.kind()
            ));
        }
        match &pinned {
            Some(owner) if **owner != *provider.id => {
                Some(format!("previous_response_id is held by provider {owner}"))
            }
            _ => None,
        }
    };
    let all = routed.attempts();
    let (attempts, skipped): (Vec<&Member>, Vec<&Member>) = all.iter().partition(|m| skip(m).is_none());
    if attempts.is_empty() {
        let why = match &pinned {
            Some(owner)
                if all.iter().any(|m| m.target.provider.openai_resource_path("/responses").is_some()) =>
            {
                GatewayError::invalid(
                    "previous_response_elsewhere",
                    format!(
                        "previous_response_id {} was created by provider {owner}, which {} does not route to",
                        asked.previous_response_id.as_deref().unwrap_or_default(),
                        asked.model
                    ),
                )
            }
            _ => {
                let kinds: Vec<String> = all
                    .iter()
                    .map(|m| format!("{} ({})", m.target.provider.id, m.target.provider.adapter.kind()))
                    .collect();
                GatewayError::invalid(
                    "unsupported_provider",
                    format!(
                        "the Responses API is served only by openai, azure and openai_compatible providers; \
                         {} routes to {}",
                        asked.model,
                        kinds.join(", ")
                    ),
                )
            }
        };
        return refuse(&routed, why);
    }
    // Skipped attempts are never made: in the trace as rejected, their probe leases back.
    routed.return_probes_of(|m| skipped.iter().any(|s| std::ptr::eq(*s, m)), now_ms(), health);
    let elapsed = req.ctx.started.elapsed();
    if let Some(trace) = req.ctx.trace.as_deref_mut() {
        for m in &skipped {
            trace.push_attempt(
                &m.target.provider.id,
                &m.target.model,
                "rejected",
                None,
                skip(m),
                elapsed,
                None,
                std::time::Duration::ZERO,
            );
        }
    }
    let usd =
        billing::max_cost(snapshot, &attempts, false, req.ctx.bill.est_input_tokens, asked.max_tokens, 1);
    billing::reserve(req.state, req.ctx, &eval, usd)?;
    let info = routed.info();
    let mut exec = Exec::responses(req, asked, &body, &info);
    execute::sequential(&mut exec, &attempts, execute::Sequence { retry_on, total_budget, cascade: false })
        .await
}
