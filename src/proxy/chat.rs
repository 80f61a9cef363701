//! `POST /openai/v1/chat/completions` and `POST /anthropic/v1/messages` (and their
//! `…/dry-run`): admitted, reserved, then run as the routing decision's plan says.

use super::execute::{self, Exec};
use super::request::{self, Incoming};
use super::{billing, dry_run, Req};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::routing::Plan;
use crate::wire::routed::RoutedRequest;

/// `dry_run_endpoint`: `POST …/dry-run`, the decision without a call.
pub async fn complete(
    req: &mut Req<'_>,
    principal: &Principal,
    dry_run_endpoint: bool,
) -> Result<(), GatewayError> {
    let snapshot = req.snapshot;
    let body = request::read_json_body(req).await?;
    let incoming: Incoming<'_> = request::incoming(req.session, req.ctx, RoutedRequest::parse(&body)?);
    let chat = &incoming.request;
    // An experiment's request draws as the stored request it re-sends did.
    let seed_id = req.ctx.replay_of.as_deref().unwrap_or(&req.ctx.request_id);
    let mut facts = crate::admission::facts(chat, &incoming.meta, body.len(), seed_id);
    let dry_run = dry_run_endpoint || incoming.dry_run;
    let traces = &snapshot.settings.traces;
    if traces.replay_hours > 0 && !dry_run && req.ctx.replay_of.is_none() {
        // A reference to the body already held, not a copy; compressed on the writer.
        req.ctx.replay_body = Some((body.clone(), traces.replay_max_body_bytes));
        req.ctx.keep_answer =
            req.state.answer_budget.take(req.ctx.ts_ms / 1000, traces.replay_answers_per_second);
    }
    req.ctx.bill.est_input_tokens = crate::estimate::reserved_tokens(body.len());
    if !dry_run {
        let estimate =
            facts.est_input_tokens.saturating_add(chat.max_tokens.unwrap_or(0).saturating_mul(chat.choices));
        billing::charge_tokens(req.state, req.ctx, principal, estimate).await?;
    }
    let (eval, routed) = request::admit(req, principal, &incoming, &mut facts, !dry_run)?;
    if dry_run {
        billing::take_deferred(req.state, req.ctx).await?;
        return dry_run::answer(req, &routed, &facts, 1024).await;
    }
    let info = routed.info();
    let looked_up = match snapshot.any_cache {
        true => super::cache::lookup(req, principal, &eval, &info, &chat.model, &body).await,
        false => Ok(false),
    };
    if !matches!(looked_up, Ok(false)) {
        // Answered without calling anyone (a hit, or a rate limit's refusal): a probe lease
        // the decision took goes back.
        routed.return_probes(crate::routing::health::now_ms(), &snapshot.health_settings);
        return looked_up.map(drop);
    }
    let attempts = routed.attempts();
    let plan = routed.plan();
    // Ensembles bill every member, cascades every step they try.
    let all_answer = matches!(plan, Plan::Parallel { .. } | Plan::Sequential { cascade: true, .. });
    let usd = billing::max_cost(
        snapshot,
        &attempts,
        all_answer,
        req.ctx.bill.est_input_tokens,
        chat.max_tokens,
        chat.choices,
    );
    if let Err(refused) = billing::reserve(req.state, req.ctx, &eval, usd).await {
        // Refused before any call (a rate limit, a budget): its probe lease goes back.
        routed.return_probes(crate::routing::health::now_ms(), &snapshot.health_settings);
        return Err(refused);
    }
    let anthropic_headers = request::anthropic_headers(req.session, req.ctx.surface);
    let mut exec = Exec::new(req, chat, &body, anthropic_headers, &info);
    match plan {
        Plan::Sequential { retry_on, total_budget, cascade } => {
            execute::sequential(&mut exec, &attempts, execute::Sequence { retry_on, total_budget, cascade })
                .await
        }
        Plan::Parallel { aggregation, timeout } => {
            execute::parallel(&mut exec, &attempts, aggregation, timeout).await
        }
    }
}
