//! Spend control on the request path: per-key rate limits, budget evaluation before routing
//! (block or downgrade), a reservation of the request's maximum cost before the upstream
//! call, and settlement to the actual cost once the answer's usage is known.

use std::sync::Arc;

use super::headers::{name, Headers};
use super::{GatewayState, RequestCtx};
use crate::auth::Principal;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::prices::{Rates, Tokens};
use crate::routing::trace::{BudgetRecord, CostRecord, UsageRecord};
use crate::routing::Member;
use crate::spend::budgets::{Blocked, Evaluation, Hit, Outcome, Reservation, State};
use crate::spend::counters::{
    to_nanos, to_usd, CountersDown, Nanos, RateKind, RateVerdict, SpendCounter, Take,
};
use crate::spend::period::iso8601;
use crate::spend::{unix_now, unix_now_us};
use crate::wire::canonical::Usage;

/// The most one request reserves or is charged: $1M in nano-USD.
const MAX_RESERVATION: Nanos = 1_000_000_000_000_000;

/// Output tokens reserved for a request that sets no `max_tokens` and whose model has no
/// known output limit.
const DEFAULT_RESERVED_OUTPUT_TOKENS: u64 = 4096;
/// Output tokens reserved at most for a model whose output limit is unknown.
const MAX_RESERVED_OUTPUT_TOKENS: u64 = 1_000_000;

/// The budget the response headers describe.
pub struct BudgetNote {
    pub name: Arc<str>,
    cap: Nanos,
    /// `X-Modelux-Budget-Action`.
    pub action: Option<&'static str>,
    /// `X-Modelux-Budget-Reset`, only when the cap was reached.
    reset: Option<String>,
    /// `None` until a reservation made it (nothing spent yet).
    counter: Option<Arc<dyn SpendCounter>>,
}

impl BudgetNote {
    fn new(hit: &Hit<'_, '_>, action: Option<&'static str>, reset: bool) -> BudgetNote {
        BudgetNote {
            name: hit.budget.name.clone(),
            cap: hit.budget.cap,
            action,
            reset: reset.then(|| iso8601(hit.period_end)),
            counter: hit.counter.clone(),
        }
    }

    /// What the budget can still admit, read when the headers are written (after this
    /// request settled, for whole answers).
    pub fn remaining(&self) -> f64 {
        let committed = self.counter.as_ref().map_or(0, |c| c.level().committed);
        to_usd((self.cap - committed).max(0))
    }
}

/// A per-key rate limiter's answer, for the `x-ratelimit-*` headers.
#[derive(Clone, Copy)]
pub struct RateNote {
    pub kind: RateKind,
    pub verdict: RateVerdict,
}

/// Spend bookkeeping of one request.
#[derive(Default)]
pub struct Bill {
    pub reservation: Option<Reservation>,
    pub budget: Option<BudgetNote>,
    pub requests: Option<RateNote>,
    pub tokens: Option<RateNote>,
    /// Tokens charged to the key's tokens-per-minute limit before the call.
    tokens_charged: u64,
    /// Prices of the member that answered.
    pub rates: Option<Rates>,
    /// Summed over every billed answer.
    pub usage: Option<Usage>,
    pub cost: CostRecord,
    /// Prompt tokens as estimated from the body, for reservations and for answers that
    /// report no usage.
    pub est_input_tokens: u64,
    /// Whole answers carry `X-Modelux-Cost-Usd` (streams cannot: headers go first).
    pub cost_header: bool,
    /// This request's rate-limit takes wait to go with its reservation in one round trip
    /// (shared counters, on an endpoint that reserves); `take_deferred` settles them where
    /// a request answers without one.
    pub defer_takes: bool,
    /// The takes waiting, in the order they are judged.
    deferred: Vec<Take>,
}

impl Bill {
    pub fn new() -> Bill {
        Bill::default()
    }

    /// Rate-limit takes still waiting for a reservation.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }
}

/// Shared counters out of reach under `on_counter_error: fail_closed`: a request that a
/// budget or a rate limit polices is refused rather than let through unpoliced.
pub fn counters_unavailable(e: CountersDown) -> GatewayError {
    // The cause is for operators (logged, and counted per transition), not for clients.
    tracing::debug!(reason = %e.0, "refused: shared counters out of reach (fail_closed)");
    GatewayError::Unavailable {
        code: "counters_unavailable",
        message: "the budget and rate-limit counters cannot be reached right now; retry shortly".into(),
    }
}

fn rate_limited(verdict: &RateVerdict, kind: RateKind, requested: Option<u64>) -> GatewayError {
    let retry_after = if verdict.retry_after_us == u64::MAX {
        60
    } else {
        verdict.retry_after_us.div_ceil(1_000_000).max(1)
    };
    GatewayError::RateLimited { kind, limit: verdict.limit, retry_after, requested }
}

/// One request against the key's requests-per-minute limit.
pub(super) async fn check_requests(
    state: &GatewayState,
    ctx: &mut RequestCtx,
    principal: &Principal,
) -> Result<(), GatewayError> {
    let limit = principal.limits.requests_per_minute;
    if limit == 0 {
        return Ok(());
    }
    take(
        state,
        ctx,
        Take { kind: RateKind::Requests, key: principal.limits.rate_key.clone(), per_minute: limit, cost: 1 },
    )
    .await
}

/// Charges the request's estimated tokens (prompt plus `max_tokens`) to the key's
/// tokens-per-minute limit; `settle` corrects it to the actual count.
pub(super) async fn charge_tokens(
    state: &GatewayState,
    ctx: &mut RequestCtx,
    principal: &Principal,
    estimate: u64,
) -> Result<(), GatewayError> {
    let limit = principal.limits.tokens_per_minute;
    if limit == 0 {
        return Ok(());
    }
    let key = principal.limits.rate_key.clone();
    take(state, ctx, Take { kind: RateKind::Tokens, key, per_minute: limit, cost: estimate }).await
}

/// Judges `t` now, or holds it back for the reservation when the request defers its takes.
async fn take(state: &GatewayState, ctx: &mut RequestCtx, t: Take) -> Result<(), GatewayError> {
    if ctx.bill.defer_takes {
        ctx.bill.deferred.push(t);
        return Ok(());
    }
    let verdict = state
        .spend
        .counters
        .take_shared(t.kind, &t.key, t.per_minute, t.cost, unix_now_us())
        .await
        .map_err(counters_unavailable)?;
    note_take(state, ctx, &t, verdict)
}

/// Records a take's verdict for the headers (and what a tokens take charged); a refusal
/// is the request's 429.
fn note_take(
    state: &GatewayState,
    ctx: &mut RequestCtx,
    t: &Take,
    verdict: RateVerdict,
) -> Result<(), GatewayError> {
    let note = Some(RateNote { kind: t.kind, verdict });
    match t.kind {
        RateKind::Requests => ctx.bill.requests = note,
        RateKind::Tokens => ctx.bill.tokens = note,
    }
    if verdict.allowed {
        if t.kind == RateKind::Tokens {
            ctx.bill.tokens_charged = t.cost;
        }
        return Ok(());
    }
    let (label, requested) = match t.kind {
        RateKind::Requests => ("requests", None),
        RateKind::Tokens => ("tokens", (verdict.retry_after_us == u64::MAX).then_some(t.cost)),
    };
    state.metrics.rate_limited.with_label_values(&[label]).inc();
    Err(rate_limited(&verdict, t.kind, requested))
}

/// Judges the takes still held back, one after the other: for a request that answers
/// without a reservation (a cache hit, a dry run, no budget, an error). Takes are no
/// longer deferred after this.
pub(super) async fn take_deferred(state: &GatewayState, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
    ctx.bill.defer_takes = false;
    for t in std::mem::take(&mut ctx.bill.deferred) {
        take(state, ctx, t).await?;
    }
    Ok(())
}

/// Go-style duration (`1s`, `6m0s`, `17ms`), the format of OpenAI's `x-ratelimit-reset-*`.
pub fn reset_text(us: u64) -> String {
    let ms = us.div_ceil(1000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, rest_ms) = (ms / 60_000, ms % 60_000);
    let secs = rest_ms as f64 / 1000.0;
    let secs = format!("{secs:.3}");
    let secs = secs.trim_end_matches('0').trim_end_matches('.');
    if m == 0 {
        format!("{secs}s")
    } else {
        format!("{m}m{secs}s")
    }
}

/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for one limiter.
pub fn push_rate_headers(kind: RateKind, verdict: &RateVerdict, headers: &mut Headers) {
    let (limit, remaining, reset) = match kind {
        RateKind::Requests => {
            ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
        }
        RateKind::Tokens => {
            ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
        }
    };
    headers.push((name(limit), verdict.limit.to_string()));
    headers.push((name(remaining), verdict.remaining.to_string()));
    headers.push((name(reset), reset_text(verdict.reset_us)));
}

/// `x-ratelimit-*`, budget and cost headers of the response.
pub fn push_headers(bill: &Bill, headers: &mut Headers) {
    for note in [bill.requests, bill.tokens].into_iter().flatten() {
        push_rate_headers(note.kind, &note.verdict, headers);
    }
    if let Some(b) = &bill.budget {
        headers.push((name("x-modelux-budget-name"), b.name.to_string()));
        headers.push((name("x-modelux-budget-remaining"), format!("{:.4}", b.remaining())));
        if let Some(action) = b.action {
            headers.push((name("x-modelux-budget-action"), action.into()));
        }
        if let Some(reset) = &b.reset {
            headers.push((name("x-modelux-budget-reset"), reset.clone()));
        }
    }
    if bill.cost_header {
        headers.push((name("x-modelux-cost-usd"), usd_text(bill.cost.total)));
    }
}

/// A decimal USD amount without float noise: `0.000123`, `1.5`, `0`.
pub fn usd_text(usd: f64) -> String {
    let s = format!("{usd:.10}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.into()
    }
}

/// Notes what the budgets decided, for the response headers and the metrics.
pub(super) fn note_budget(
    state: &GatewayState,
    ctx: &mut RequestCtx,
    eval: &Evaluation<'_, '_>,
    outcome: &Outcome,
) {
    let Some(hit) = eval.applied() else { return };
    ctx.bill.budget = Some(BudgetNote::new(hit, outcome.header(), hit.state == State::Hard));
    if let Some(action) = outcome.header() {
        state.metrics.budget_outcomes.with_label_values(&[&hit.budget.name, action]).inc();
    }
}

/// The trace's view of the budget outcome.
pub(super) fn record_budget(ctx: &mut RequestCtx, downgraded_from: Option<String>) {
    let Some(note) = &ctx.bill.budget else { return };
    let record = BudgetRecord {
        name: note.name.to_string(),
        action: note.action.unwrap_or("none"),
        remaining_usd: (note.remaining() * 1e4).round() / 1e4,
        downgraded_from,
    };
    if let Some(trace) = ctx.trace.as_deref_mut() {
        trace.budget = Some(record);
    }
}

/// Most a request can cost: its prompt estimate plus `max_tokens` (within the model's output
/// limit, else that limit) for each of its `n` choices, at the member's prices; the dearest member of a sequence (one answers), the sum
/// of an ensemble (all answer).
/// The output tokens a reservation counts on for `model`: the client's `max_tokens`, no more
/// than the model can produce.
pub(super) fn reserved_output_tokens(snapshot: &Snapshot, model: &str, max_tokens: Option<u64>) -> u64 {
    let limit = snapshot.prices.lookup(model).and_then(|i| i.max_output_tokens);
    match (max_tokens, limit) {
        (Some(t), Some(l)) => t.min(l),
        (Some(t), None) => t.min(MAX_RESERVED_OUTPUT_TOKENS),
        (None, l) => l.unwrap_or(DEFAULT_RESERVED_OUTPUT_TOKENS),
    }
}

pub(super) fn max_cost(
    snapshot: &Snapshot,
    members: &[&Member],
    all_answer: bool,
    input_tokens: u64,
    max_tokens: Option<u64>,
    choices: u64,
) -> f64 {
    let one = |m: &&Member| {
        // Resolved when the config loaded (or, for a direct model, when it was routed).
        let Some(rates) = m.rates else { return 0.0 };
        let output =
            reserved_output_tokens(snapshot, &m.target.model, max_tokens).saturating_mul(choices.max(1));
        input_tokens as f64 * rates.input + output as f64 * rates.output.max(rates.reasoning)
    };
    if all_answer {
        members.iter().map(one).sum()
    } else {
        members.iter().map(one).fold(0.0, f64::max)
    }
}

/// Reserves `usd` on every budget of the request. A budget that blocks refuses once it is
/// at its cap (requests racing past the evaluation end here): 402.
pub(super) async fn reserve(
    state: &GatewayState,
    ctx: &mut RequestCtx,
    eval: &Evaluation<'_, '_>,
    usd: f64,
) -> Result<(), GatewayError> {
    if eval.hits.is_empty() {
        return take_deferred(state, ctx).await;
    }
    // One request can never hold more than this: a client-sent max_tokens must not be
    // able to overflow a counter or hold a whole budget by itself.
    let amount = to_nanos(usd).clamp(0, MAX_RESERVATION);
    ctx.bill.defer_takes = false;
    let takes = std::mem::take(&mut ctx.bill.deferred);
    let reserved = if takes.is_empty() {
        eval.reserve(&*state.spend.counters, amount).await
    } else {
        let (verdicts, reserved) = eval
            .take_and_reserve(&*state.spend.counters, &takes, amount)
            .await
            .map_err(counters_unavailable)?;
        for (t, verdict) in takes.iter().zip(verdicts) {
            note_take(state, ctx, t, verdict)?;
        }
        // Every take allowed: the reservation was made.
        reserved.ok_or_else(|| CountersDown("no reservation after the takes".into()))
    };
    match reserved.map_err(counters_unavailable)? {
        Ok(r) => {
            ctx.bill.reservation = Some(r);
            // A per-instance counter may have been made just now: the headers read it.
            if let (Some(note), Some(hit)) = (ctx.bill.budget.as_mut(), eval.applied()) {
                if note.counter.is_none() {
                    note.counter = state.spend.counters.find_spend_counter(&hit.key());
                }
            }
            Ok(())
        }
        Err((i, level)) => {
            let hit = &eval.hits[i];
            if level.committed < hit.budget.cap {
                // Not spent yet, only held by requests in flight: some of that may be
                // released, so this is worth a retry in a moment, not at the period's end.
                ctx.bill.budget = Some(BudgetNote::new(hit, None, false));
                state.metrics.budget_outcomes.with_label_values(&[&hit.budget.name, "busy"]).inc();
                return Err(GatewayError::BudgetBusy {
                    name: hit.budget.name.to_string(),
                    committed_usd: to_usd(level.committed),
                    in_flight_usd: to_usd(level.used - level.committed),
                    cap_usd: hit.budget.cap_usd,
                });
            }
            ctx.bill.budget = Some(BudgetNote::new(hit, Some("block"), true));
            state.metrics.budget_outcomes.with_label_values(&[&hit.budget.name, "block"]).inc();
            Err(GatewayError::BudgetExceeded(Box::new(Blocked::new(hit, level, unix_now()))))
        }
    }
}

fn tokens(u: &Usage) -> Tokens {
    Tokens {
        input: u.input,
        output: u.output,
        cache_read: u.cache_read,
        cache_write: u.cache_write,
        reasoning: u.reasoning,
    }
}

/// Adds one billed answer's usage at `rates` (`None`: the model has no price, its tokens
/// count at $0 and the trace says so).
pub(super) fn add_usage(ctx: &mut RequestCtx, rates: Option<Rates>, usage: &Usage) {
    // Counts come from upstreams: saturate rather than trust them not to overflow.
    let sum = ctx.bill.usage.get_or_insert_with(Usage::default);
    sum.input = sum.input.saturating_add(usage.input);
    sum.output = sum.output.saturating_add(usage.output);
    sum.cache_read = sum.cache_read.saturating_add(usage.cache_read);
    sum.cache_write = sum.cache_write.saturating_add(usage.cache_write);
    sum.reasoning = sum.reasoning.saturating_add(usage.reasoning);
    match rates {
        Some(r) => {
            let c = r.cost(&tokens(usage));
            ctx.bill.cost.input += c.input;
            ctx.bill.cost.output += c.output;
            ctx.bill.cost.total += c.total;
        }
        None => ctx.bill.cost.unpriced = true,
    }
}

/// Usage for an answer whose final usage the upstream never reported (a stream cut short,
/// a server that omits it): what it did report (`partial`), with the prompt estimated when
/// that is missing and at least `output_tokens` of output.
fn estimate_usage(ctx: &mut RequestCtx, partial: Option<Usage>, output_tokens: u64) {
    let mut usage = partial.unwrap_or_default();
    if usage.input == 0 {
        usage.input = ctx.bill.est_input_tokens;
    }
    usage.output = usage.output.max(output_tokens);
    let rates = ctx.bill.rates;
    add_usage(ctx, rates, &usage);
    ctx.bill.cost.estimated = true;
}

/// Prices the answer the client got, then settles. `reported`: the usage the upstream
/// reported, complete or (`complete` false, a stream cut short) partial; what it lacks is
/// estimated, with at least `output_estimate` output tokens.
pub(super) fn bill_answer(
    state: &GatewayState,
    ctx: &mut RequestCtx,
    reported: Option<Usage>,
    complete: bool,
    output_estimate: u64,
) {
    match (reported, complete) {
        (Some(u), true) => {
            let rates = ctx.bill.rates;
            add_usage(ctx, rates, &u);
        }
        (partial, _) => estimate_usage(ctx, partial, output_estimate),
    }
    settle(state, ctx);
}

/// Replaces the reservation by the actual cost, corrects the tokens-per-minute charge and
/// writes usage and cost into the trace. Idempotent; runs at the latest in `logging`.
pub(super) fn settle(state: &GatewayState, ctx: &mut RequestCtx) {
    let principal = ctx.principal.clone();
    let round = |v: f64| (v * 1e10).round() / 1e10;
    let cost = CostRecord {
        input: round(ctx.bill.cost.input),
        output: round(ctx.bill.cost.output),
        total: round(ctx.bill.cost.total),
        ..ctx.bill.cost
    };
    if let Some(r) = ctx.bill.reservation.as_mut() {
        // A semantic cache lookup's embeddings call is spent whether it hit or not.
        r.settle(to_nanos(cost.total + ctx.cache_embedding_usd).clamp(0, MAX_RESERVATION));
    }
    if let (Some(p), true) = (principal.as_deref(), ctx.bill.tokens_charged > 0) {
        let actual = ctx.bill.usage.map_or(0, |u| u.input.saturating_add(u.output));
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let delta = as_i64(actual).saturating_sub(as_i64(ctx.bill.tokens_charged));
        state.spend.counters.adjust(RateKind::Tokens, &p.limits.rate_key, p.limits.tokens_per_minute, delta);
        ctx.bill.tokens_charged = 0;
    }
    let Some(usage) = ctx.bill.usage else { return };
    if let Some(trace) = ctx.trace.as_deref_mut() {
        trace.usage = Some(UsageRecord {
            input_tokens: usage.input,
            output_tokens: usage.output,
            cached_tokens: usage.cache_read,
            cache_write_tokens: usage.cache_write,
            reasoning_tokens: usage.reasoning,
        });
        trace.cost_usd = Some(cost);
    }
}

/// Metrics of what the request cost (once, in `logging`).
pub(super) fn record_metrics(state: &GatewayState, ctx: &RequestCtx) {
    let Some(usage) = ctx.bill.usage else { return };
    let provider = ctx.provider.as_deref().unwrap_or("none");
    let model = state.metrics.model_label(ctx.model.as_deref().unwrap_or(""));
    let labels = [provider, model];
    if ctx.bill.cost.total > 0.0 {
        state.metrics.cost_usd.with_label_values(&labels).inc_by(ctx.bill.cost.total);
    }
    state.metrics.tokens.with_label_values(&[provider, model, "input"]).inc_by(usage.input);
    state.metrics.tokens.with_label_values(&[provider, model, "output"]).inc_by(usage.output);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_reset_like_openai() {
        assert_eq!(reset_text(17_000), "17ms");
        assert_eq!(reset_text(1_000_000), "1s");
        assert_eq!(reset_text(1_500_000), "1.5s");
        assert_eq!(reset_text(360_000_000), "6m0s");
        assert_eq!(reset_text(60_000_000), "1m0s");
        assert_eq!(reset_text(61_250_000), "1m1.25s");
    }

    #[test]
    fn formats_usd_without_noise() {
        assert_eq!(usd_text(0.0), "0");
        assert_eq!(usd_text(0.000123), "0.000123");
        assert_eq!(usd_text(1.5), "1.5");
        assert_eq!(usd_text(0.1 + 0.2), "0.3");
        assert_eq!(usd_text(0.00000015), "0.00000015");
    }
}
