//! `routing_only`: each stored request routed again, as the proxy would route it now,
//! through the candidate, with no provider call and no spend (PRODUCT.md §8.6).
//!
//! * **Decision**: `admission::admit` on the candidate's snapshot, the code the proxy runs:
//!   the same budgets (their levels as of now, read, never reserved), rules, strategies and
//!   live health (no probe leases). The request's own random draws come from its request
//!   id (`routing::seed_of`), as production's did, so a candidate identical to production
//!   draws the same A/B variants.
//! * **What production saw is reused**: an attempt the candidate would make on a target
//!   that failed for this very request in production is taken to fail the same way; the
//!   candidate then moves on if its `retry_on` allows, or fails. So a candidate identical
//!   to production reproduces its fallbacks.
//! * **Cost**: the request's recorded input, output, cached and reasoning tokens priced at
//!   the chosen target's rates (`prices::Rates::cost`, cached tokens at the cache-read
//!   price). A request production never sent anywhere has no recorded usage: its cost is
//!   unknown (`cost_unknown`), left out of the sum.
//! * **Latency**: production's own latency when the candidate chose the target that served
//!   it; else a draw from that target's observed latencies in the window's own traffic
//!   (its p50/p95 carry over); else its live health p50; else unknown
//!   (`latency_unknown`, left out of the percentiles).
//! * **Deltas**: cost over the requests whose candidate cost is known (the cost of the rest
//!   is unknown, not zero); latency as a relative change; the error rate in percentage
//!   points.
//! * **Errors**: the candidate could not route (no eligible target, a budget blocked it),
//!   or every attempt it would make failed in production.
//! * **Sample**: at most `sample_size` requests, a uniform sample (reservoir, seeded by the
//!   experiment) when the window holds more; observed latencies come from the whole window.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::admission::{self, Ask, Now, RequestMeta, Routed};
use crate::config::Snapshot;
use crate::prices::Tokens;
use crate::routing::{self, Failure, Member, Plan, RequestFacts};
use crate::spend::counters::Counters;
use crate::trace::query::{quantile_exact, round_cost};
use crate::trace::replay::ReplayRow;

/// Observed latencies kept per target (a uniform reservoir beyond this).
const OBSERVED_CAP: usize = 10_000;

/// One side of a request's comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// Empty when nothing answered.
    pub provider: String,
    pub model: String,
    /// `None`: unknown.
    pub cost_usd: Option<f64>,
    pub latency_ms: Option<f64>,
    /// `None`: answered.
    pub error: Option<String>,
}

impl Side {
    fn failed(error: impl Into<String>) -> Side {
        Side {
            provider: String::new(),
            model: String::new(),
            cost_usd: None,
            latency_ms: None,
            error: Some(error.into()),
        }
    }

    /// `model:provider`, the route-distribution key.
    pub fn route(&self) -> Option<String> {
        (self.error.is_none() && !self.provider.is_empty())
            .then(|| format!("{}:{}", self.model, self.provider))
    }

    fn view(&self) -> Value {
        json!({
            "provider": (!self.provider.is_empty()).then_some(&self.provider),
            "model": (!self.model.is_empty()).then_some(&self.model),
            "cost_usd": self.cost_usd,
            "latency_ms": self.latency_ms,
            "error": self.error,
        })
    }
}

/// One replayed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub request_id: String,
    pub ts_ms: u64,
    pub baseline: Side,
    pub candidate: Side,
    /// Why the candidate went where it did, or could not.
    pub reason: String,
    /// `with_responses`: the cosine similarity of the two answers, when compared.
    pub similarity: Option<f64>,
    /// The chosen target's live p50 at decision time (the latency fallback).
    live_p50: Option<f64>,
}

impl Outcome {
    pub fn new(request_id: String, ts_ms: u64, baseline: Side, candidate: Side, reason: String) -> Outcome {
        Outcome { request_id, ts_ms, baseline, candidate, reason, similarity: None, live_p50: None }
    }

    pub fn view(&self) -> Value {
        let mut v = json!({
            "request_id": self.request_id,
            "timestamp": crate::spend::period::iso8601_ms(self.ts_ms as i64),
            "baseline": self.baseline.view(),
            "candidate": self.candidate.view(),
            "reason": self.reason,
        });
        if let (Some(s), Value::Object(m)) = (self.similarity, &mut v) {
            m.insert("similarity".into(), json!((s * 1e4).round() / 1e4));
        }
        v
    }
}

/// Cost, latency and errors of one side over the replayed requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub cost_usd: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub errors: u64,
    pub error_rate: f64,
    pub latency_unknown: u64,
    pub cost_unknown: u64,
}

impl Summary {
    fn of<'a>(sides: impl Iterator<Item = &'a Side>) -> Summary {
        let (mut requests, mut cost, mut errors, mut latency_unknown, mut cost_unknown) = (0, 0.0, 0, 0, 0);
        let mut latencies = Vec::new();
        for s in sides {
            requests += 1;
            if s.error.is_some() {
                errors += 1;
                cost += s.cost_usd.unwrap_or(0.0);
                continue;
            }
            match s.cost_usd {
                Some(c) => cost += c,
                None => cost_unknown += 1,
            }
            match s.latency_ms {
                Some(l) if l.is_finite() => latencies.push(l),
                _ => latency_unknown += 1,
            }
        }
        latencies.sort_by(f64::total_cmp);
        Summary {
            requests,
            cost_usd: round_cost(cost),
            p50_ms: quantile_exact(&latencies, 0.5),
            p95_ms: quantile_exact(&latencies, 0.95),
            errors,
            error_rate: if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
            latency_unknown,
            cost_unknown,
        }
    }

    pub fn view(&self) -> Value {
        json!({
            "requests": self.requests,
            "cost_usd": self.cost_usd,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "latency_unknown": self.latency_unknown,
            "cost_unknown": self.cost_unknown,
        })
    }
}

/// `(candidate - baseline) / baseline` in percent; 0 when both are 0, `None` when only
/// the baseline is (no meaningful ratio) or either is unknown.
pub fn delta_pct(baseline: Option<f64>, candidate: Option<f64>) -> Option<f64> {
    let (b, c) = (baseline?, candidate?);
    if b == 0.0 {
        return (c == 0.0).then_some(0.0);
    }
    Some(((c - b) / b * 100.0 * 1e6).round() / 1e6)
}

/// The finished comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Requests in the window that matched the filters.
    pub matched: u64,
    pub baseline: Summary,
    pub candidate: Summary,
    pub baseline_routes: BTreeMap<String, f64>,
    pub candidate_routes: BTreeMap<String, f64>,
    /// Baseline and candidate cost over the requests whose candidate cost is known (a
    /// candidate that could not route spends nothing): what the cost delta compares, so a
    /// target without a price never looks cheaper.
    pub comparable_cost: (f64, f64),
    /// Replayed requests, oldest first.
    pub outcomes: Vec<Outcome>,
    /// `with_responses`: how alike the answers were.
    pub similarity: Option<Similarity>,
    /// `with_responses`: requests of the window not sampled because their body or answer is
    /// not kept (expired, cut, over the answer budget).
    pub not_replayable: u64,
}

impl Report {
    pub fn deltas(&self) -> Value {
        let (b, c) = (&self.baseline, &self.candidate);
        json!({
            "cost_delta_pct": delta_pct(Some(self.comparable_cost.0), Some(self.comparable_cost.1)),
            "p50_latency_delta_pct": delta_pct(b.p50_ms, c.p50_ms),
            "p95_latency_delta_pct": delta_pct(b.p95_ms, c.p95_ms),
            // Percentage points: a relative change from a 0% error rate has no value, and a
            // rise from 0% is exactly what a regression check must see.
            "error_rate_delta_pct": ((c.error_rate - b.error_rate) * 100.0 * 1e6).round() / 1e6,
        })
    }
}

/// Shares of each route among answered requests (summing to 1).
fn distribution<'a>(sides: impl Iterator<Item = &'a Side>) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for route in sides.filter_map(Side::route) {
        *counts.entry(route).or_default() += 1;
    }
    let total: u64 = counts.values().sum();
    counts.into_iter().map(|(k, n)| (k, n as f64 / total as f64)).collect()
}

/// A uniform sample of what a target's latency was.
#[derive(Default)]
struct Observed {
    values: Vec<f64>,
    seen: u64,
}

/// Replays requests through a candidate, one at a time, in bounded memory.
pub struct Simulation<'s> {
    snapshot: &'s Snapshot,
    counters: &'s dyn Counters,
    /// `@slug`: what every replayed request names.
    model: String,
    now: Now,
    sample_size: usize,
    rng: StdRng,
    matched: u64,
    outcomes: Vec<Outcome>,
    observed: HashMap<String, Observed>,
}

impl<'s> Simulation<'s> {
    /// `seed`: the sample's (from the experiment id, so a rerun samples alike).
    pub fn new(
        snapshot: &'s Snapshot,
        counters: &'s dyn Counters,
        slug: &str,
        now: Now,
        sample_size: usize,
        seed: u64,
    ) -> Simulation<'s> {
        Simulation {
            snapshot,
            counters,
            model: format!("@{slug}"),
            now,
            sample_size: sample_size.max(1),
            rng: StdRng::seed_from_u64(seed),
            matched: 0,
            outcomes: Vec::new(),
            observed: HashMap::new(),
        }
    }

    /// Requests seen so far.
    pub fn matched(&self) -> u64 {
        self.matched
    }

    pub fn push(&mut self, row: &ReplayRow) {
        self.matched += 1;
        let baseline = baseline(row);
        if let Some(route) = baseline.route() {
            let obs = self.observed.entry(route).or_default();
            obs.seen += 1;
            if obs.values.len() < OBSERVED_CAP {
                obs.values.push(row.latency_ms);
            } else {
                let j = self.rng.random_range(0..obs.seen);
                if let Some(slot) = obs.values.get_mut(j as usize) {
                    *slot = row.latency_ms;
                }
            }
        }
        // Algorithm R: the first `sample_size` go in; then each replaces a random one with
        // probability sample_size / seen, so every request is equally likely to stay.
        let slot = if self.outcomes.len() < self.sample_size {
            None
        } else {
            let j = self.rng.random_range(0..self.matched);
            if j as usize >= self.sample_size {
                return;
            }
            Some(j as usize)
        };
        let (candidate, reason, live_p50) = self.candidate(row);
        let outcome = Outcome {
            request_id: row.request_id.clone(),
            ts_ms: row.ts_ms,
            baseline,
            candidate,
            reason,
            similarity: None,
            live_p50,
        };
        match slot {
            None => self.outcomes.push(outcome),
            Some(j) => self.outcomes[j] = outcome,
        }
    }

    /// The candidate's decision for one stored request.
    fn candidate(&self, row: &ReplayRow) -> (Side, String, Option<f64>) {
        let meta = RequestMeta {
            model_requested: Some(self.model.clone()),
            tags: row.tags(),
            end_user: non_empty(&row.end_user),
            trace_id: non_empty(&row.trace_id),
            conversation_id: None,
            max_tokens: (row.max_tokens > 0).then_some(row.max_tokens),
        };
        let mut facts = RequestFacts {
            model: &self.model,
            tags: &meta.tags,
            end_user: meta.end_user.as_deref(),
            trace_id: meta.trace_id.as_deref(),
            est_input_tokens: crate::estimate::json_tokens(row.bytes_in as usize),
            max_tokens: meta.max_tokens,
            budget_remaining_usd: None,
            budget_remaining_pct: None,
            seed: routing::seed_of(&row.request_id),
        };
        let ask = Ask { project: &row.project, model: &self.model, meta: &meta };
        let admission = admission::admit(self.snapshot, self.counters, &ask, &mut facts, self.now, false);
        let downgraded = admission.downgraded_from.is_some();
        let routed = match admission.routed {
            Ok((routed, _)) => routed,
            Err(e) => return (Side::failed(e.code()), e.message(), None),
        };
        let tokens = Tokens {
            input: row.input_tokens,
            output: row.output_tokens,
            cache_read: row.cached_tokens,
            cache_write: 0,
            reasoning: row.reasoning_tokens,
        };
        let usage_known = row.input_tokens > 0 || row.output_tokens > 0;
        let price = |m: &Member| if usage_known { m.rates.map(|r| r.cost(&tokens).total) } else { None };
        let attempts = routed.attempts();
        let mut notes: Vec<String> = Vec::new();
        if downgraded {
            notes.push("a budget downgraded the request".into());
        }
        let chosen = match routed.plan() {
            Plan::Parallel { .. } => {
                // Every member answers and is billed; the first stands for the route.
                let Some(first) = attempts.first() else {
                    return (Side::failed("no_route"), "no eligible target".into(), None);
                };
                let cost = attempts.iter().map(|m| price(m)).sum::<Option<f64>>();
                notes.push(format!("ensemble of {} members", attempts.len()));
                return (self.answered(first, cost), self.reason(&routed, first, notes), self.p50(first));
            }
            Plan::Sequential { retry_on, cascade, .. } => {
                let mut chosen = None;
                for m in &attempts {
                    match production_failure(row, m) {
                        None => {
                            chosen = Some(*m);
                            break;
                        }
                        Some(f) if retry_on.allows(f) || (cascade && f == Failure::Rejected) => {
                            notes.push(format!("{} failed in production ({})", target(m), f.as_str()));
                        }
                        Some(f) => {
                            notes.push(format!(
                                "{} failed in production ({}); not retried",
                                target(m),
                                f.as_str()
                            ));
                            return (Side::failed(f.as_str()), notes.join("; "), None);
                        }
                    }
                }
                chosen
            }
        };
        match chosen {
            Some(m) => (self.answered(m, price(m)), self.reason(&routed, m, notes), self.p50(m)),
            None if attempts.is_empty() => (Side::failed("no_route"), "no eligible target".into(), None),
            None => {
                notes.push("every attempt failed in production".into());
                (Side::failed("all_attempts_failed"), notes.join("; "), None)
            }
        }
    }

    fn answered(&self, m: &Member, cost: Option<f64>) -> Side {
        Side {
            provider: m.target.provider.id.clone(),
            model: m.target.model.clone(),
            cost_usd: cost,
            latency_ms: None,
            error: None,
        }
    }

    fn p50(&self, m: &Member) -> Option<f64> {
        m.health.p50_ms(self.now.health_ms, &self.snapshot.health_settings)
    }

    fn reason(&self, routed: &Routed<'_>, chosen: &Member, mut notes: Vec<String>) -> String {
        let why = match routed {
            Routed::Config(d) => d
                .candidates
                .iter()
                .find(|c| std::ptr::eq(c.member, chosen))
                .map(|c| format!("@{}: {}", d.config.slug, c.reason.describe())),
            Routed::Direct { .. } => Some("directly named model".into()),
        };
        notes.extend(why);
        notes.join("; ")
    }

    /// Latencies assigned, summaries and distributions computed.
    pub fn finish(mut self) -> Report {
        for obs in self.observed.values_mut() {
            obs.values.sort_by(f64::total_cmp);
        }
        for o in &mut self.outcomes {
            if o.candidate.error.is_some() {
                continue;
            }
            let same = o.baseline.error.is_none()
                && o.baseline.provider == o.candidate.provider
                && o.baseline.model == o.candidate.model;
            o.candidate.latency_ms = if same {
                o.baseline.latency_ms
            } else {
                let observed = o.candidate.route().and_then(|r| self.observed.get(&r)).map(|obs| &obs.values);
                match observed {
                    Some(values) if !values.is_empty() => {
                        let u = (routing::seed_of(&format!("{}/latency", o.request_id)) >> 11) as f64
                            / (1u64 << 53) as f64;
                        values.get(((u * values.len() as f64) as usize).min(values.len() - 1)).copied()
                    }
                    _ => o.live_p50,
                }
            };
        }
        Report::of(self.matched, self.outcomes)
    }
}

impl Report {
    /// Summaries and distributions of finished outcomes (sorted here, oldest first).
    pub fn of(matched: u64, mut outcomes: Vec<Outcome>) -> Report {
        outcomes.sort_by(|a, b| (a.ts_ms, &a.request_id).cmp(&(b.ts_ms, &b.request_id)));
        let comparable =
            outcomes.iter().filter(|o| o.candidate.error.is_some() || o.candidate.cost_usd.is_some());
        let comparable_cost = comparable.fold((0.0, 0.0), |(b, c), o| {
            (b + o.baseline.cost_usd.unwrap_or(0.0), c + o.candidate.cost_usd.unwrap_or(0.0))
        });
        Report {
            comparable_cost: (round_cost(comparable_cost.0), round_cost(comparable_cost.1)),
            matched,
            baseline: Summary::of(outcomes.iter().map(|o| &o.baseline)),
            candidate: Summary::of(outcomes.iter().map(|o| &o.candidate)),
            baseline_routes: distribution(outcomes.iter().map(|o| &o.baseline)),
            candidate_routes: distribution(outcomes.iter().map(|o| &o.candidate)),
            similarity: None,
            not_replayable: 0,
            outcomes,
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn target(m: &Member) -> String {
    format!("{}/{}", m.target.provider.id, m.target.model)
}

/// What production did with a request.
pub fn baseline(row: &ReplayRow) -> Side {
    let error = row.is_error().then(|| {
        if row.error_code.is_empty() {
            format!("http_{}", row.status)
        } else {
            row.error_code.clone()
        }
    });
    Side {
        provider: row.provider.clone(),
        model: row.model.clone(),
        cost_usd: Some(row.cost_total),
        latency_ms: Some(row.latency_ms),
        error,
    }
}

/// How an attempt on `m`'s target ended for this request in production, when it failed
/// there (and never succeeded).
fn production_failure(row: &ReplayRow, m: &Member) -> Option<Failure> {
    let on_target = || {
        row.attempt_providers
            .iter()
            .zip(&row.attempt_models)
            .zip(&row.attempt_statuses)
            .filter(|((p, model), _)| **p == m.target.provider.id && **model == m.target.model)
            .map(|(_, status)| status.as_str())
    };
    if on_target().any(|s| s == "success") {
        return None;
    }
    on_target().find_map(Failure::parse)
}

/// The similarity distribution of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Similarity {
    pub model: Option<String>,
    pub threshold: f64,
    /// Sorted ascending.
    pub values: Vec<f64>,
    pub not_compared: u64,
    pub embedding_cost_usd: f64,
    /// Why nothing was compared (no embedding model, the embeddings call failed).
    pub unavailable: Option<String>,
}

impl Similarity {
    /// Percent of compared pairs at or above `threshold`; `None` when none were compared.
    pub fn pct_above(&self, threshold: f64) -> Option<f64> {
        if self.values.is_empty() {
            return None;
        }
        let above = self.values.iter().filter(|v| **v >= threshold).count();
        Some(((above as f64 / self.values.len() as f64) * 100.0 * 1e4).round() / 1e4)
    }

    pub fn view(&self) -> Value {
        let q = |p: f64| crate::trace::query::quantile_exact(&self.values, p).map(round4);
        let mean = (!self.values.is_empty())
            .then(|| round4(self.values.iter().sum::<f64>() / self.values.len() as f64));
        // Ten buckets over [0, 1]; negative similarities count in the first.
        let mut buckets = [0u64; 10];
        for v in &self.values {
            buckets[((v.max(0.0) * 10.0) as usize).min(9)] += 1;
        }
        let histogram: Vec<Value> = buckets
            .iter()
            .enumerate()
            .map(|(i, n)| json!({ "from": i as f64 / 10.0, "to": (i + 1) as f64 / 10.0, "count": n }))
            .collect();
        json!({
            "embedding_model": self.model,
            "threshold": self.threshold,
            "compared": self.values.len(),
            "not_compared": self.not_compared,
            "mean": mean,
            "min": self.values.first().copied().map(round4),
            "p10": q(0.1),
            "p50": q(0.5),
            "p90": q(0.9),
            "max": self.values.last().copied().map(round4),
            "pct_above_threshold": self.pct_above(self.threshold),
            "histogram": histogram,
            "embedding_cost_usd": crate::trace::query::round_cost(self.embedding_cost_usd),
            "unavailable": self.unavailable,
        })
    }
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}
