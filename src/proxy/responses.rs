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
use crate::routing::Member;
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
        billing::charge_tokens(req.state, req.ctx, principal, estimate).await?;
    }
    let (eval, routed) = request::admit(req, principal, &incoming, &mut facts, !incoming.dry_run)?;
    if incoming.dry_run {
        return dry_run::answer(req, &routed, &facts, 1024).await;
    }
    let health = &snapshot.health_settings;
    let sequence = execute::passthrough_sequence(&routed, health, &asked.model, "the Responses API")?;
    // A continuation is only known to the provider that created what it continues, and only
    // this project's responses may be continued on the shared stored credentials.
    // An unrecorded previous response is reachable only with the caller's own key: then
    // only attempts that key fits are made.
    let mut own_key_only = false;
    let pinned = match &asked.previous_response_id {
        None => None,
        Some(previous) => {
            let owner = passthrough::recorded_owner(req, &principal.project, previous).await;
            match owner {
                Ok(Some(owner)) => Some(owner),
                // The caller's own key reaches only the caller's own responses.
                Ok(None) if req.ctx.provider_key.is_some() => {
                    own_key_only = true;
                    None
                }
                refused => {
                    routed.return_probes(now_ms(), health);
                    return Err(refused.err().unwrap_or_else(|| GatewayError::NotFound {
                        code: "not_found",
                        message: format!(
                            "previous_response_id {previous} was not created through this project (or its \
                             record is past traces.retention_days)"
                        ),
                    }));
                }
            }
        }
    };
    let serves = |m: &Member| m.target.provider.openai_resource_path("/responses").is_some();
    // The closure below cannot borrow the request, which records the skipped attempts.
    let key = req.ctx.provider_key.as_ref().map(|k| k.secret().to_owned());
    let attempts = execute::eligible_attempts(req.ctx, &routed, health, |m| {
        let provider = &m.target.provider;
        if !serves(m) {
            return Some(format!(
                "provider {} (kind {}) does not serve the Responses API",
                provider.id,
                provider.adapter.kind()
            ));
        }
        match (&pinned, &key) {
            (Some(owner), _) if **owner != *provider.id => {
                Some(format!("previous_response_id is held by provider {owner}"))
            }
            (None, Some(key)) if own_key_only && provider.byok_credential(key).is_none() => Some(format!(
                "previous_response_id has no record here, and the caller's key does not fit provider {}",
                provider.id
            )),
            _ => None,
        }
    });
    if attempts.is_empty() {
        let all = routed.attempts();
        let why = match &pinned {
            Some(owner) if all.iter().any(|m| serves(m)) => GatewayError::invalid(
                "previous_response_elsewhere",
                format!(
                    "previous_response_id {} was created by provider {owner}, which {} does not route to",
                    asked.previous_response_id.as_deref().unwrap_or_default(),
                    asked.model
                ),
            ),
            _ if own_key_only => GatewayError::NotFound {
                code: "not_found",
                message: format!(
                    "previous_response_id {} has no record here, and X-Modelux-Provider-Key fits none of the \
                     providers {} routes to",
                    asked.previous_response_id.as_deref().unwrap_or_default(),
                    asked.model
                ),
            },
            _ => execute::no_provider_serves(
                &all,
                &asked.model,
                "the Responses API",
                "openai, azure and openai_compatible",
            ),
        };
        return Err(why);
    }
    let usd =
        billing::max_cost(snapshot, &attempts, false, req.ctx.bill.est_input_tokens, asked.max_tokens, 1);
    billing::reserve(req.state, req.ctx, &eval, usd).await?;
    let info = routed.info();
    let mut exec = Exec::responses(req, asked, &body, &info);
    execute::sequential(&mut exec, &attempts, sequence).await
}
