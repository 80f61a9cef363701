//! What the gateway decides for one request before any upstream is called: the budgets
//! (block, downgrade, warn), then the routing decision. A function of the snapshot, the
//! spend counters and the request's facts, with no I/O and no pingora `Session`: the proxy
//! runs it on live requests, and replay can run it on stored ones and get the same answer.

use std::sync::Arc;

use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::providers::{self, Resolution, Target};
use crate::routing::health::Health;
use crate::routing::trace::DecisionTrace;
use crate::routing::{self, Decision, Member, Plan, RequestFacts, RetryOn};
use crate::spend::budgets::{Blocked, BudgetRequest, Evaluation, Outcome};
use crate::spend::counters::{to_usd, Counters};
use crate::wire::routed::RoutedRequest;

/// What the client said about a request besides its body's payload: who, which tags,
/// which trace and conversation (headers win over body fields, PRODUCT.md §3.3–3.4).
#[derive(Debug, Default, Clone)]
pub struct RequestMeta {
    pub model_requested: Option<String>,
    pub tags: Vec<(String, String)>,
    pub end_user: Option<String>,
    pub trace_id: Option<String>,
    pub conversation_id: Option<String>,
    /// The body's `max_tokens`, recorded for replay.
    pub max_tokens: Option<u64>,
}

/// The routing facts of a request: what the strategies and rule files read.
pub fn facts<'a>(
    request: &'a RoutedRequest<'_>,
    meta: &'a RequestMeta,
    body_len: usize,
    request_id: &str,
) -> RequestFacts<'a> {
    RequestFacts {
        model: &request.model,
        tags: &meta.tags,
        end_user: meta.end_user.as_deref(),
        trace_id: meta.trace_id.as_deref(),
        est_input_tokens: crate::estimate::json_tokens(body_len),
        max_tokens: request.max_tokens,
        budget_remaining_usd: None,
        budget_remaining_pct: None,
        seed: routing::seed_of(request_id),
    }
}

/// What a request's `model` resolved to: a routing decision, or one directly named model.
pub enum Routed<'a> {
    Config(Decision<'a>),
    Direct { member: Box<Member>, resolution: Resolution },
}

impl Routed<'_> {
    pub fn resolution(&self) -> Resolution {
        match self {
            Routed::Config(_) => Resolution::Config,
            Routed::Direct { resolution, .. } => *resolution,
        }
    }

    /// The first choice (what single-target endpoints use).
    pub fn first(&self) -> Result<&Member, GatewayError> {
        match self {
            Routed::Config(d) => d.attempts().next().map(|c| c.member),
            Routed::Direct { member, .. } => Some(member.as_ref()),
        }
        .ok_or_else(|| GatewayError::internal("the routing decision has no candidate"))
    }

    /// Members in attempt order.
    pub fn attempts(&self) -> Vec<&Member> {
        match self {
            Routed::Config(d) => d.attempts().map(|c| c.member).collect(),
            Routed::Direct { member, .. } => vec![member.as_ref()],
        }
    }

    /// Gives back the half-open probe leases the decision took, for a request answered
    /// without calling anyone (a cache hit): a probe is then sent by the next request
    /// instead of waiting for the next probe interval.
    pub fn return_probes(&self, now: u64, settings: &crate::routing::health::HealthSettings) {
        self.return_probes_of(|_| true, now, settings);
    }

    /// `return_probes`, for the members `skipped` picks (attempts that will not be made).
    pub fn return_probes_of(
        &self,
        skipped: impl Fn(&Member) -> bool,
        now: u64,
        settings: &crate::routing::health::HealthSettings,
    ) {
        if let Routed::Config(d) = self {
            for c in d.candidates.iter().filter(|c| matches!(c.reason, crate::routing::Reason::Probe)) {
                if skipped(c.member) {
                    c.member.health.return_probe(now, settings);
                }
            }
        }
    }

    /// How the attempts run: one after another, or all at once.
    pub fn plan(&self) -> Plan {
        match self {
            Routed::Config(d) => d.plan,
            Routed::Direct { .. } => {
                Plan::Sequential { retry_on: RetryOn::NONE, total_budget: None, cascade: false }
            }
        }
    }

    pub fn info(&self) -> RouteInfo {
        match self {
            Routed::Config(d) => RouteInfo {
                config: Some((d.entry().slug.clone(), d.entry().version)),
                ab_variant: d.ab_variant().map(str::to_string),
            },
            Routed::Direct { .. } => RouteInfo { config: None, ab_variant: None },
        }
    }
}

/// The routing facts every answer's headers name, whichever attempt answers.
pub struct RouteInfo {
    /// Slug and version of the config the client named.
    pub config: Option<(String, u32)>,
    pub ab_variant: Option<String>,
}

/// Resolves `model`: `@slug` runs the config's strategy; anything else names one model.
/// `lease`: let the decision take half-open probe leases (not for dry runs or replays).
/// `any_project`: a budget's downgrade target may be any config. `now`: the health clock
/// (`routing::health::now_ms`).
pub fn route<'a>(
    snapshot: &'a Snapshot,
    project: &str,
    model: &str,
    facts: &RequestFacts<'_>,
    now: u64,
    lease: bool,
    any_project: bool,
) -> Result<(Routed<'a>, Box<DecisionTrace>), GatewayError> {
    if let Some(slug) = model.strip_prefix('@') {
        let config =
            snapshot.routing_configs.get(slug).filter(|rc| any_project || rc.project == project).ok_or_else(
                || GatewayError::NotFound {
                    code: "routing_config_not_found",
                    message: format!("routing config @{slug} not found"),
                },
            )?;
        let decision =
            routing::decide(&snapshot.routing_configs, &snapshot.health_settings, config, facts, now, lease);
        if decision.candidates.is_empty() {
            return Err(GatewayError::internal(format!("routing config @{slug} produced no candidate")));
        }
        let trace = Box::new(DecisionTrace::from_decision(&decision, now, &snapshot.health_settings));
        return Ok((Routed::Config(decision), trace));
    }
    let (target, resolution) = providers::resolve_model(&snapshot.providers, model)?;
    let member = direct_member(snapshot, target);
    let report = member.health.report(now, &snapshot.health_settings).into();
    let trace = Box::new(DecisionTrace::direct(
        resolution.as_str(),
        &member.target.provider.id,
        &member.target.model,
        report,
    ));
    Ok((Routed::Direct { member: Box::new(member), resolution }, trace))
}

/// A directly named model as a one-member plan, with its live health and prices.
fn direct_member(snapshot: &Snapshot, target: Target) -> Member {
    let provider_id = target.provider.id.as_str();
    let health = snapshot
        .health
        .cell_for_traffic(provider_id, &target.model)
        .unwrap_or_else(|| Arc::new(Health::new(format!("{provider_id}/{}", target.model))));
    Member {
        provider_health: snapshot.health.cell(provider_id),
        health,
        rates: snapshot.prices.lookup(&target.model).map(|i| i.rates()),
        target,
        timeout: None,
        weight: 1.0,
        accept: None,
        price: None,
        tier: None,
    }
}

/// The two clocks an admission reads: the health windows' monotonic milliseconds and
/// the wall clock's seconds (budget periods). Replay passes the times it replays at.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub health_ms: u64,
    pub unix_s: i64,
}

impl Now {
    pub fn current() -> Now {
        Now { health_ms: crate::routing::health::now_ms(), unix_s: crate::spend::unix_now() }
    }
}

/// Who asks for which model: the inputs of an admission besides the routing facts.
pub struct Ask<'r> {
    pub project: &'r str,
    /// As the client sent it: `@slug`, `provider/model` or a bare model name.
    pub model: &'r str,
    pub meta: &'r RequestMeta,
}

/// The budgets' verdict and, unless they block, the routing decision.
pub struct Admission<'s, 'r> {
    /// Every budget the request matches; reservations are taken against it.
    pub eval: Evaluation<'s, 'r>,
    /// What the budgets decided (`Block` makes `routed` the 402).
    pub outcome: Outcome,
    /// The model the request asked for, when a budget downgraded it.
    pub downgraded_from: Option<&'r str>,
    pub routed: Result<(Routed<'s>, Box<DecisionTrace>), GatewayError>,
}

/// One request's admission, a pure function of its inputs (and of the counters' levels
/// and health at `now`): budgets first (a budget at its cap blocks with 402, or
/// downgrades the request to its `downgrade_to`), then routing, with what the budget has
/// left as a routing fact. Only `@config` traffic is policed; direct traffic is counted.
pub fn admit<'s, 'r>(
    snapshot: &'s Snapshot,
    counters: &dyn Counters,
    ask: &Ask<'r>,
    facts: &mut RequestFacts<'_>,
    now: Now,
    lease: bool,
) -> Admission<'s, 'r> {
    let slug = ask.model.strip_prefix('@');
    let meta = ask.meta;
    let req = BudgetRequest {
        project: ask.project,
        config: slug,
        end_user: meta.end_user.as_deref(),
        tags: &meta.tags,
    };
    let eval = snapshot.budgets.evaluate(counters, &req, slug.is_some(), now.unix_s);
    let outcome = eval.outcome();
    if let Some(hit) = eval.applied() {
        let remaining = to_usd(hit.remaining());
        facts.budget_remaining_usd = Some(remaining);
        facts.budget_remaining_pct =
            Some(if hit.budget.cap_usd > 0.0 { remaining / hit.budget.cap_usd * 100.0 } else { 0.0 });
    }
    let (project, model) = (ask.project, ask.model);
    let (routed, downgraded_from) = match (&outcome, eval.applied()) {
        (Outcome::Block, Some(hit)) => {
            (Err(GatewayError::BudgetExceeded(Box::new(Blocked::new(hit, hit.level, now.unix_s)))), None)
        }
        (Outcome::Downgrade(to), _) => {
            (route(snapshot, project, to, facts, now.health_ms, lease, true), Some(model))
        }
        _ => (route(snapshot, project, model, facts, now.health_ms, lease, false), None),
    };
    Admission { eval, outcome, downgraded_from, routed }
}

#[cfg(test)]
mod tests {
    //! Admission without a client connection: a snapshot, counters and a clock in, the
    //! same decision the proxy makes out.
    use super::*;
    use crate::spend::counters::{to_nanos, LocalCounters};

    const CONFIG: &str = r#"
providers:
  - { id: p1, kind: openai_compatible, base_url: "http://127.0.0.1:9/v1", models: ["m"] }
  - { id: p2, kind: openai_compatible, base_url: "http://127.0.0.1:9/v1", models: ["m"] }
projects:
  - { id: default, keys: [ { name: dev, key: "mlx_sk_admission_0123456789abcdef" } ] }
prices:
  m: { input_per_mtok: 1, output_per_mtok: 2 }
routing_configs:
  chain: { project: default, strategy: fallback, attempts: ["p1/m", "p2/m"] }
  cheap: { project: default, strategy: single, model: "p2/m" }
budgets:
  - { name: chain-daily, scope: routing_config, routing_config: "@chain", period: daily, cap_usd: 1, action: downgrade, downgrade_to: "@cheap" }
  - { name: all, scope: project, project: default, period: daily, cap_usd: 3, action: block }
"#;

    fn snapshot() -> Snapshot {
        crate::config::build_snapshot(CONFIG, &|_| None, None).unwrap()
    }

    fn admit_one(
        snap: &Snapshot,
        counters: &LocalCounters,
        model: &str,
        now: Now,
    ) -> (Outcome, Option<String>, Result<Vec<String>, u16>) {
        let meta = RequestMeta::default();
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        let request = RoutedRequest::parse(body.as_bytes()).unwrap();
        let mut f = facts(&request, &meta, body.len(), "req-1");
        let ask = Ask { project: "default", model, meta: &meta };
        let a = admit(snap, counters, &ask, &mut f, now, false);
        let route = a.routed.map(|(r, _)| {
            r.attempts().iter().map(|m| format!("{}/{}", m.target.provider.id, m.target.model)).collect()
        });
        (a.outcome, a.downgraded_from.map(str::to_string), route.map_err(|e| e.status()))
    }

    #[test]
    fn budgets_then_routing_from_plain_data() {
        let snap = snapshot();
        let counters = LocalCounters::new();
        let now = Now { health_ms: 1, unix_s: 1_796_000_000 };
        let (outcome, from, route) = admit_one(&snap, &counters, "@chain", now);
        assert_eq!(outcome, Outcome::None);
        assert_eq!((from, route), (None, Ok(vec!["p1/m".to_string(), "p2/m".to_string()])));

        // Spend the routing config's $1: the next request is downgraded to @cheap.
        let meta = RequestMeta::default();
        let req =
            BudgetRequest { project: "default", config: Some("chain"), end_user: None, tags: &meta.tags };
        let eval = snap.budgets.evaluate(&counters, &req, true, now.unix_s);
        futures::FutureExt::now_or_never(eval.reserve(&counters, to_nanos(1.5)))
            .unwrap()
            .unwrap()
            .unwrap()
            .settle(to_nanos(1.5));
        let (outcome, from, route) = admit_one(&snap, &counters, "@chain", now);
        assert!(matches!(outcome, Outcome::Downgrade(_)), "{outcome:?}");
        assert_eq!((from.as_deref(), route), (Some("@chain"), Ok(vec!["p2/m".to_string()])));

        // The project's $3 cap blocks: a 402, whatever the model.
        let eval = snap.budgets.evaluate(&counters, &req, true, now.unix_s);
        futures::FutureExt::now_or_never(eval.reserve(&counters, to_nanos(2.0)))
            .unwrap()
            .unwrap()
            .unwrap()
            .settle(to_nanos(2.0));
        let (outcome, _, route) = admit_one(&snap, &counters, "@cheap", now);
        assert_eq!((outcome, route), (Outcome::Block, Err(402)));

        // The next day's period starts empty.
        let tomorrow = Now { unix_s: now.unix_s + 86_400, ..now };
        assert_eq!(admit_one(&snap, &counters, "@chain", tomorrow).0, Outcome::None);
        // Direct traffic is counted, never policed.
        assert!(admit_one(&snap, &counters, "p1/m", now).2.is_ok());
    }
}
