//! The routing decision as the answer, without calling an upstream (PRODUCT.md §3.5):
//! `POST …/dry-run`, or any routed endpoint with `X-Modelux-Dry-Run: true`.

use bytes::Bytes;
use serde_json::json;

use super::headers::{name, push_route_headers, Headers, Served};
use super::{respond, Req};
use crate::admission::Routed;
use crate::error::GatewayError;
use crate::routing::RequestFacts;

/// `default_output`: output tokens assumed when the request sets no `max_tokens`.
pub async fn answer(
    req: &mut Req<'_>,
    routed: &Routed<'_>,
    facts: &RequestFacts<'_>,
    default_output: u64,
) -> Result<(), GatewayError> {
    let attempts = routed.attempts();
    let selected =
        attempts.first().map(|m| json!({"provider": m.target.provider.id, "model": m.target.model}));
    let estimated = attempts.first().and_then(|m| m.rates).map(|r| {
        facts.est_input_tokens as f64 * r.input + facts.max_tokens.unwrap_or(default_output) as f64 * r.output
    });
    let ctx = &mut *req.ctx;
    let trace = ctx.trace.as_deref();
    let body = json!({
        "object": "modelux.dry_run",
        "request_id": ctx.request_id,
        "resolved": routed.resolution().as_str(),
        "routing_config": trace.and_then(|t| t.routing_config.clone()),
        "config_version": trace.and_then(|t| t.config_version),
        "strategy": trace.map(|t| t.strategy),
        "ab_variant": trace.and_then(|t| t.ab_variant.clone()),
        "hops": trace.map(|t| t.hops.clone()).unwrap_or_default(),
        "selected": selected,
        "candidates": trace.map(|t| t.candidates.clone()).unwrap_or_default(),
        "estimated_cost_usd": estimated,
        "budget": trace.and_then(|t| t.budget.clone()),
        "cache": "MISS",
    });
    let body = serde_json::to_vec(&body).map_err(|e| GatewayError::internal(e.to_string()))?;
    let mut headers: Headers = vec![(http::header::CONTENT_TYPE, "application/json".into())];
    headers.push((name("x-modelux-dry-run"), "true".into()));
    let info = routed.info();
    if let Some(m) = attempts.first() {
        push_route_headers(&mut headers, &Served::new(&info, m, 0));
    }
    respond::whole(req.session, ctx, 200, headers, Bytes::from(body)).await;
    Ok(())
}
