//! The routing engine: validated strategies (built once per config load) and the decision
//! that turns one request into an ordered candidate list. A decision reads only the
//! snapshot and the health atomics; its one allocation is the candidate list.

pub mod health;
pub mod rules;
pub mod trace;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::prices::{Rates, Tier};
use crate::providers::Target;
use health::{Health, HealthSettings, Verdict};

/// One validated routing config: a slug, its project, its version and its strategy.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub slug: String,
    pub project: String,
    /// Starts at 1; bumped whenever a reload changes this config's definition.
    pub version: u32,
    pub strategy: Strategy,
    /// Canonical text of the definition, compared across reloads to decide version bumps.
    pub definition: String,
    /// `cache:` as the config sets it: `Some(Some(_))` on, `Some(None)` off (`mode: off`),
    /// `None` not set (the project default applies).
    pub cache: Option<Option<crate::cache::CacheSettings>>,
}

/// Every routing config of a snapshot, by slug (`ab_test` and `custom_rules` hand requests
/// to other configs by slug).
pub type RoutingConfigs = HashMap<String, Arc<RoutingConfig>>;

/// Which failures move a fallback to its next attempt (`retry_on`). `5xx` covers
/// connection failures too (refused, reset before the answer, TLS); `connect` is that class
/// alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn {
    pub rate_limited: bool,
    pub server_error: bool,
    pub timeout: bool,
    pub connect: bool,
}

impl RetryOn {
    pub const NONE: RetryOn =
        RetryOn { rate_limited: false, server_error: false, timeout: false, connect: false };
    pub const ALL: RetryOn = RetryOn { rate_limited: true, server_error: true, timeout: true, connect: true };

    pub fn parse(items: &[String]) -> Result<RetryOn, String> {
        let mut r = RetryOn::NONE;
        for item in items {
            match item.as_str() {
                "429" => r.rate_limited = true,
                "5xx" => r.server_error = true,
                "timeout" => r.timeout = true,
                "connect" => r.connect = true,
                other => {
                    return Err(format!(
                        "unknown retry_on value \"{other}\" (use 429, 5xx, timeout, connect)"
                    ))
                }
            }
        }
        Ok(r)
    }

    pub fn allows(self, failure: Failure) -> bool {
        match failure {
            Failure::RateLimited => self.rate_limited,
            Failure::ServerError => self.server_error,
            Failure::Timeout => self.timeout,
            // A provider that is down answers nothing, which to the client is a 502: it
            // belongs to `5xx`. `connect` alone selects only this class.
            Failure::Connect => self.connect || self.server_error,
            Failure::Rejected => true,
            Failure::ClientError => false,
        }
    }
}

/// Why an attempt did not produce the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Upstream 429.
    RateLimited,
    /// Upstream 5xx, or a credential failure (401/403: the gateway's key, not the client's).
    ServerError,
    /// The attempt's or the request's deadline passed.
    Timeout,
    /// No connection, or the connection broke before the answer was complete.
    Connect,
    /// A 2xx answer that failed the step's acceptance check (cascade, ensemble validation).
    Rejected,
    /// Any other 4xx: the request itself is at fault; never retried.
    ClientError,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::RateLimited => "rate_limited",
            Failure::ServerError => "upstream_error",
            Failure::Timeout => "timeout",
            Failure::Connect => "connect_error",
            Failure::Rejected => "rejected",
            Failure::ClientError => "client_error",
        }
    }

    /// The failure an attempt record names (`as_str`); `None` for `success` and unknowns.
    pub fn parse(s: &str) -> Option<Failure> {
        [
            Failure::RateLimited,
            Failure::ServerError,
            Failure::Timeout,
            Failure::Connect,
            Failure::Rejected,
            Failure::ClientError,
        ]
        .into_iter()
        .find(|f| f.as_str() == s)
    }

    /// Whether it says something about the provider's health (PRODUCT.md §9.3: client
    /// 4xx do not count, 429/5xx/timeouts do).
    pub fn counts_against_health(self) -> bool {
        !matches!(self, Failure::ClientError | Failure::Rejected)
    }
}

/// A cascade step's (or an ensemble's) test of a 2xx answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accept {
    /// Allowed finish reasons, in OpenAI spelling (`stop`, `length`, `tool_calls`, …).
    pub finish_reason: Vec<String>,
    pub min_output_tokens: Option<u64>,
    /// Minimum characters of answer text.
    pub min_length: Option<usize>,
    /// The answer text must parse as JSON.
    pub valid_json: bool,
}

impl Accept {
    pub fn is_empty(&self) -> bool {
        *self == Accept::default()
    }
}

/// One model a strategy may use, with everything resolved at load time.
#[derive(Debug, Clone)]
pub struct Member {
    pub target: Target,
    /// Health of this provider/model, and of the provider as a whole.
    pub health: Arc<Health>,
    pub provider_health: Arc<Health>,
    pub timeout: Option<Duration>,
    pub weight: f64,
    pub accept: Option<Accept>,
    /// Price per token (input, output) and tier, for cost-aware strategies.
    pub price: Option<(f64, f64)>,
    pub tier: Option<Tier>,
    /// Every per-token price (cached and reasoning tokens too), to price answers.
    pub rates: Option<Rates>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// The first member whose answer passes validation wins; the others are cancelled.
    FirstValid,
    /// The answer given by the most members wins (ties: member order).
    Majority,
    /// Like majority, each vote counting its member's weight.
    Weighted,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::FirstValid => "first_valid",
            Aggregation::Majority => "majority",
            Aggregation::Weighted => "weighted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub weight: f64,
    /// Sub-config slug, without `@`.
    pub config: String,
}

#[derive(Debug, Clone)]
pub enum RuleTarget {
    Config(String),
    Model(Box<Member>),
}

#[derive(Debug, Clone)]
pub enum Strategy {
    Single {
        member: Member,
    },
    Fallback {
        attempts: Vec<Member>,
        retry_on: RetryOn,
        total_budget: Option<Duration>,
    },
    CostOptimized {
        tier: Tier,
        candidates: Vec<Member>,
        retry_on: RetryOn,
        default_output_tokens: u64,
    },
    LatencyOptimized {
        candidates: Vec<Member>,
        retry_on: RetryOn,
        /// Share of requests (0–1) sent to a random other healthy candidate so every
        /// candidate's latency stays known.
        explore: f64,
    },
    Ensemble {
        members: Vec<Member>,
        aggregation: Aggregation,
        timeout: Duration,
    },
    AbTest {
        variants: Vec<Variant>,
        total_weight: f64,
    },
    Cascade {
        steps: Vec<Member>,
        retry_on: RetryOn,
        total_budget: Option<Duration>,
    },
    CustomRules {
        file: String,
        rules: Arc<rules::RuleSet>,
        /// One per rule, then the default: what each rule's `use` resolves to.
        targets: Vec<RuleTarget>,
        default_output_tokens: u64,
        /// Price of the default target's model, for `est_cost_usd`.
        cost_price: Option<(f64, f64)>,
        /// Provider health cells referenced by the rules.
        providers: Vec<(String, Arc<Health>)>,
    },
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Single { .. } => "single",
            Strategy::Fallback { .. } => "fallback",
            Strategy::CostOptimized { .. } => "cost_optimized",
            Strategy::LatencyOptimized { .. } => "latency_optimized",
            Strategy::Ensemble { .. } => "ensemble",
            Strategy::AbTest { .. } => "ab_test",
            Strategy::Cascade { .. } => "cascade",
            Strategy::CustomRules { .. } => "custom_rules",
        }
    }

    /// Sub-configs this strategy may hand a request to.
    pub fn sub_configs(&self) -> Vec<&str> {
        match self {
            Strategy::AbTest { variants, .. } => variants.iter().map(|v| v.config.as_str()).collect(),
            Strategy::CustomRules { targets, .. } => targets
                .iter()
                .filter_map(|t| match t {
                    RuleTarget::Config(s) => Some(s.as_str()),
                    RuleTarget::Model(_) => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether any target of this strategy (not of its sub-configs) is on provider `id`.
    pub fn uses_provider(&self, id: &str) -> bool {
        let rule_models = match self {
            Strategy::CustomRules { targets, .. } => {
                targets.iter().any(|t| matches!(t, RuleTarget::Model(m) if m.target.provider.id == id))
            }
            _ => false,
        };
        rule_models || self.members().iter().any(|m| m.target.provider.id == id)
    }

    /// The first model this strategy would use, for display (`GET /models`, dry runs).
    pub fn members(&self) -> &[Member] {
        match self {
            Strategy::Single { member } => std::slice::from_ref(member),
            Strategy::Fallback { attempts: m, .. }
            | Strategy::CostOptimized { candidates: m, .. }
            | Strategy::LatencyOptimized { candidates: m, .. }
            | Strategy::Ensemble { members: m, .. }
            | Strategy::Cascade { steps: m, .. } => m,
            Strategy::AbTest { .. } | Strategy::CustomRules { .. } => &[],
        }
    }
}

/// Nested configs (ab_test → custom_rules → …) are followed at most this deep; deeper or
/// cyclic definitions are rejected at load time.
pub const MAX_DEPTH: usize = 4;

/// What the request looks like, as far as routing is concerned.
pub struct RequestFacts<'a> {
    pub model: &'a str,
    pub tags: &'a [(String, String)],
    pub end_user: Option<&'a str>,
    pub trace_id: Option<&'a str>,
    pub est_input_tokens: u64,
    /// The request's `max_tokens`, when it set one.
    pub max_tokens: Option<u64>,
    pub budget_remaining_usd: Option<f64>,
    pub budget_remaining_pct: Option<f64>,
    /// The request's own random draws (an A/B split without a sticky key, latency
    /// exploration) derive from this (`seed_of` its request id), so replaying a stored
    /// request makes the same draws production made.
    pub seed: u64,
}

/// The draw seed of a request (`RequestFacts::seed`).
pub fn seed_of(request_id: &str) -> u64 {
    sticky_hash(&[request_id.as_bytes()])
}

/// A uniform draw in `[0, 1)` from `seed`, distinct per `salt` (the config slug).
fn draw(seed: u64, salt: &str, what: &[u8]) -> f64 {
    (sticky_hash(&[&seed.to_le_bytes(), salt.as_bytes(), what]) >> 11) as f64 / (1u64 << 53) as f64
}

/// Why a candidate is where it is in the decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// Listed at this position (1-based) by the config.
    Listed(usize),
    /// Estimated cost in USD for this request.
    Cost(f64),
    /// Live median latency in ms (`None`: no recent samples).
    Latency(Option<f64>),
    /// Sent here to keep its latency known (latency_optimized exploration).
    Explore,
    /// Open circuit, let through as the half-open probe.
    Probe,
    /// Every candidate was unhealthy, so this one is tried anyway.
    LastResort,
    Unhealthy,
    BelowTier(Tier),
    Member,
}

impl Reason {
    pub fn describe(&self) -> String {
        match self {
            Reason::Listed(1) => "first attempt".into(),
            Reason::Listed(n) => format!("attempt {n} in the config's order"),
            Reason::Cost(usd) => format!("estimated cost ${usd:.6}"),
            Reason::Latency(Some(ms)) => format!("live p50 {ms:.1} ms"),
            Reason::Latency(None) => "no recent latency samples".into(),
            Reason::Explore => "exploration sample (keeps its latency known)".into(),
            Reason::Probe => "half-open probe of an unhealthy target".into(),
            Reason::LastResort => "every candidate is unhealthy; tried anyway".into(),
            Reason::Unhealthy => "provider unhealthy; tried only if every other candidate fails".into(),
            Reason::BelowTier(t) => format!("quality tier {} is below the required one", t.as_str()),
            Reason::Member => "ensemble member".into(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub member: &'a Member,
    /// `false`: rejected, never attempted.
    pub eligible: bool,
    pub reason: Reason,
}

/// How the candidates are executed.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// One after another, moving on on `retry_on` failures (and, with `cascade`, on
    /// answers failing a step's acceptance check).
    Sequential { retry_on: RetryOn, total_budget: Option<Duration>, cascade: bool },
    /// All at once.
    Parallel { aggregation: Aggregation, timeout: Duration },
}

/// A config that handed the request on: an A/B test's variant or a rule's choice.
#[derive(Debug, Clone, Copy)]
pub enum Hop<'a> {
    Variant {
        config: &'a RoutingConfig,
        label: &'a str,
    },
    /// `rule`: index of the matching rule, `None` for the default.
    Rule {
        config: &'a RoutingConfig,
        rule: Option<usize>,
    },
}

pub struct Decision<'a> {
    /// The config whose strategy produced the candidates.
    pub config: &'a RoutingConfig,
    pub hops: [Option<Hop<'a>>; MAX_DEPTH],
    pub plan: Plan,
    /// Eligible candidates first, in attempt order; then the rejected ones.
    pub candidates: Vec<Candidate<'a>>,
}

impl<'a> Decision<'a> {
    /// The A/B variant label, when an `ab_test` config ran.
    pub fn ab_variant(&self) -> Option<&'a str> {
        self.hops.iter().flatten().find_map(|h| match h {
            Hop::Variant { label, .. } => Some(*label),
            Hop::Rule { .. } => None,
        })
    }

    /// The config the client named (`@slug`).
    pub fn entry(&self) -> &'a RoutingConfig {
        match self.hops[0] {
            Some(Hop::Variant { config, .. }) | Some(Hop::Rule { config, .. }) => config,
            None => self.config,
        }
    }

    /// Candidates in the order they are tried: the eligible ones, then (as a last resort,
    /// only reached when all of those failed) the ones skipped as unhealthy.
    pub fn attempts(&self) -> impl Iterator<Item = &Candidate<'a>> {
        self.candidates
            .iter()
            .filter(|c| c.eligible)
            .chain(self.candidates.iter().filter(|c| !c.eligible && c.reason == Reason::Unhealthy))
    }
}

/// Stable 64-bit hash (FNV-1a, then the murmur3 finalizer so that similar keys such as
/// `user-1`/`user-2` spread over the whole range), for sticky A/B assignment that
/// survives restarts.
fn sticky_hash(parts: &[&[u8]]) -> u64 {
    let mut h = fnv1a(parts);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Estimated USD cost of the request on a member (input estimate + max output).
fn estimate(member: &Member, facts: &RequestFacts<'_>, default_output: u64) -> Option<f64> {
    let (input, output) = member.price?;
    Some(facts.est_input_tokens as f64 * input + facts.max_tokens.unwrap_or(default_output) as f64 * output)
}

struct RuleFacts<'f, 'a> {
    facts: &'f RequestFacts<'a>,
    est_cost: f64,
    default_output: u64,
    providers: &'f [(String, Arc<Health>)],
    now: u64,
    settings: &'f HealthSettings,
}

impl RuleFacts<'_, '_> {
    fn provider(&self, id: &str) -> Option<&Health> {
        self.providers.iter().find(|(p, _)| p == id).map(|(_, h)| h.as_ref())
    }
}

impl rules::Facts for RuleFacts<'_, '_> {
    fn tag(&self, key: &str) -> Option<&str> {
        self.facts.tags.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    fn end_user(&self) -> Option<&str> {
        self.facts.end_user
    }
    fn model(&self) -> &str {
        self.facts.model
    }
    fn est_input_tokens(&self) -> f64 {
        self.facts.est_input_tokens as f64
    }
    fn est_output_tokens(&self) -> f64 {
        self.facts.max_tokens.unwrap_or(self.default_output) as f64
    }
    fn est_cost_usd(&self) -> f64 {
        self.est_cost
    }
    fn budget_remaining_usd(&self) -> Option<f64> {
        self.facts.budget_remaining_usd
    }
    fn budget_remaining_pct(&self) -> Option<f64> {
        self.facts.budget_remaining_pct
    }
    fn provider_p50_ms(&self, provider: &str) -> Option<f64> {
        self.provider(provider)?.p50_ms(self.now, self.settings)
    }
    fn provider_success_rate(&self, provider: &str) -> Option<f64> {
        self.provider(provider)?.success_rate(self.now, self.settings)
    }
    fn provider_healthy(&self, provider: &str) -> Option<bool> {
        self.provider(provider).map(|h| h.is_healthy())
    }
}

/// Routes one request that named `@slug` (`config`). Health verdicts are taken here, so a
/// probe lease goes to the request that will actually carry the probe.
pub fn decide<'a>(
    configs: &'a RoutingConfigs,
    settings: &HealthSettings,
    config: &'a RoutingConfig,
    facts: &RequestFacts<'_>,
    now: u64,
    lease: bool,
) -> Decision<'a> {
    let mut hops: [Option<Hop<'a>>; MAX_DEPTH] = [None; MAX_DEPTH];
    let mut current = config;
    let mut depth = 0;
    loop {
        let next: Option<&'a str> = match &current.strategy {
            Strategy::AbTest { variants, total_weight } => {
                let sticky = facts.end_user.or(facts.trace_id);
                let point = match sticky {
                    Some(key) => {
                        (sticky_hash(&[current.slug.as_bytes(), key.as_bytes()]) >> 11) as f64
                            / (1u64 << 53) as f64
                    }
                    None => draw(facts.seed, &current.slug, b"ab"),
                } * total_weight;
                let mut acc = 0.0;
                let variant = variants
                    .iter()
                    .find(|v| {
                        acc += v.weight;
                        point < acc
                    })
                    .or(variants.last());
                variant.map(|v| {
                    if depth < MAX_DEPTH {
                        hops[depth] = Some(Hop::Variant { config: current, label: v.name.as_str() });
                    }
                    v.config.as_str()
                })
            }
            Strategy::CustomRules {
                rules, targets, default_output_tokens, cost_price, providers, ..
            } => {
                let est_cost = cost_price.map_or(0.0, |(i, o)| {
                    facts.est_input_tokens as f64 * i
                        + facts.max_tokens.unwrap_or(*default_output_tokens) as f64 * o
                });
                let rf = RuleFacts {
                    facts,
                    est_cost,
                    default_output: *default_output_tokens,
                    providers,
                    now,
                    settings,
                };
                let (index, _) = rules.evaluate(&rf);
                if depth < MAX_DEPTH {
                    hops[depth] = Some(Hop::Rule { config: current, rule: index });
                }
                match targets.get(index.unwrap_or(targets.len().saturating_sub(1))) {
                    Some(RuleTarget::Config(slug)) => Some(slug.as_str()),
                    Some(RuleTarget::Model(member)) => {
                        return Decision {
                            config: current,
                            hops,
                            plan: Plan::Sequential {
                                retry_on: RetryOn::NONE,
                                total_budget: None,
                                cascade: false,
                            },
                            candidates: vec![Candidate { member, eligible: true, reason: Reason::Listed(1) }],
                        };
                    }
                    None => None,
                }
            }
            _ => None,
        };
        match next.and_then(|slug| configs.get(slug)) {
            Some(sub) if depth + 1 < MAX_DEPTH => {
                current = sub;
                depth += 1;
            }
            _ => break,
        }
    }
    let (plan, candidates) = candidates(current, facts, now, settings, lease);
    Decision { config: current, hops, plan, candidates }
}

/// Health-filters `members` in preference order: usable ones (healthy, or holding the probe
/// lease) become attempts; unhealthy ones are rejected, unless none is usable, in which
/// case all are tried in order rather than failing without trying.
fn health_ordered<'a>(
    members: impl ExactSizeIterator<Item = (&'a Member, Reason)> + Clone,
    now: u64,
    settings: &HealthSettings,
    lease: bool,
) -> Vec<Candidate<'a>> {
    let mut out = Vec::with_capacity(members.len());
    for (member, reason) in members.clone() {
        match member.health.verdict(now, settings, lease) {
            Verdict::Healthy => out.push(Candidate { member, eligible: true, reason }),
            Verdict::Probe => out.push(Candidate { member, eligible: true, reason: Reason::Probe }),
            Verdict::Unhealthy => out.push(Candidate { member, eligible: false, reason: Reason::Unhealthy }),
        }
    }
    if !out.iter().any(|c| c.eligible) {
        for c in out.iter_mut() {
            c.eligible = true;
            c.reason = Reason::LastResort;
        }
    }
    // Stable: attempts keep their order, rejected ones move behind them.
    out.sort_by_key(|c| !c.eligible);
    out
}

fn candidates<'a>(
    config: &'a RoutingConfig,
    facts: &RequestFacts<'_>,
    now: u64,
    settings: &HealthSettings,
    lease: bool,
) -> (Plan, Vec<Candidate<'a>>) {
    match &config.strategy {
        Strategy::Single { member } => (
            Plan::Sequential { retry_on: RetryOn::NONE, total_budget: None, cascade: false },
            vec![Candidate { member, eligible: true, reason: Reason::Listed(1) }],
        ),
        Strategy::Fallback { attempts, retry_on, total_budget } => (
            Plan::Sequential { retry_on: *retry_on, total_budget: *total_budget, cascade: false },
            health_ordered(
                attempts.iter().enumerate().map(|(i, m)| (m, Reason::Listed(i + 1))),
                now,
                settings,
                lease,
            ),
        ),
        Strategy::Cascade { steps, retry_on, total_budget } => (
            Plan::Sequential { retry_on: *retry_on, total_budget: *total_budget, cascade: true },
            health_ordered(
                steps.iter().enumerate().map(|(i, m)| (m, Reason::Listed(i + 1))),
                now,
                settings,
                lease,
            ),
        ),
        Strategy::CostOptimized { tier, candidates, retry_on, default_output_tokens } => {
            let mut out = health_ordered(
                candidates.iter().map(|m| {
                    (m, Reason::Cost(estimate(m, facts, *default_output_tokens).unwrap_or(f64::INFINITY)))
                }),
                now,
                settings,
                lease,
            );
            for c in out.iter_mut() {
                if let Some(t) = c.member.tier.filter(|t| t < tier) {
                    c.eligible = false;
                    c.reason = Reason::BelowTier(t);
                }
            }
            let cost = |c: &Candidate<'_>| {
                estimate(c.member, facts, *default_output_tokens).unwrap_or(f64::INFINITY)
            };
            // Eligible first, cheapest first; equal costs keep list order (stable sort).
            out.sort_by(|a, b| b.eligible.cmp(&a.eligible).then(cost(a).total_cmp(&cost(b))));
            (Plan::Sequential { retry_on: *retry_on, total_budget: None, cascade: false }, out)
        }
        Strategy::LatencyOptimized { candidates, retry_on, explore } => {
            let mut out = health_ordered(
                candidates.iter().map(|m| (m, Reason::Latency(m.health.p50_ms(now, settings)))),
                now,
                settings,
                lease,
            );
            let p50 = |c: &Candidate<'_>| c.member.health.p50_ms(now, settings);
            // Known latencies first, fastest first; unknown ones after in list order
            // (cold start = list order).
            out.sort_by(|a, b| {
                b.eligible.cmp(&a.eligible).then(match (p50(a), p50(b)) {
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
            });
            let usable = out.iter().filter(|c| c.eligible).count();
            if usable > 1 && *explore > 0.0 && draw(facts.seed, &config.slug, b"explore") < *explore {
                let pick = 1
                    + ((draw(facts.seed, &config.slug, b"pick") * (usable - 1) as f64) as usize)
                        .min(usable - 2);
                out[pick].reason = Reason::Explore;
                out[..=pick].rotate_right(1);
            }
            (Plan::Sequential { retry_on: *retry_on, total_budget: None, cascade: false }, out)
        }
        Strategy::Ensemble { members, aggregation, timeout } => {
            let out = health_ordered(members.iter().map(|m| (m, Reason::Member)), now, settings, lease);
            (Plan::Parallel { aggregation: *aggregation, timeout: *timeout }, out)
        }
        // Only reached when nesting is exhausted, which validation prevents.
        Strategy::AbTest { .. } | Strategy::CustomRules { .. } => {
            (Plan::Sequential { retry_on: RetryOn::NONE, total_budget: None, cascade: false }, Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts this thread's allocations, to prove what a decision allocates.
    struct Counting;
    thread_local! {
        static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    }
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }
    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn allocations_in(f: impl FnOnce()) -> usize {
        let before = ALLOCATIONS.with(|c| c.get());
        f();
        ALLOCATIONS.with(|c| c.get()) - before
    }

    /// Ten providers and configs exercising the decision paths (shared with the benchmark).
    pub const BENCH_CONFIG: &str = include_str!("../../benches/routing.yaml");

    fn snapshot() -> crate::config::Snapshot {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/benches"));
        crate::config::build_snapshot_in(BENCH_CONFIG, &|_| None, None, dir).unwrap()
    }

    /// `decide` on the snapshot's own configs and health settings, with probe leases.
    fn decide_in<'a>(
        snap: &'a crate::config::Snapshot,
        config: &'a RoutingConfig,
        facts: &RequestFacts<'_>,
        now: u64,
    ) -> Decision<'a> {
        decide(&snap.routing_configs, &snap.health_settings, config, facts, now, true)
    }

    fn facts() -> RequestFacts<'static> {
        RequestFacts {
            model: "@x",
            tags: &[],
            end_user: Some("user-42"),
            trace_id: None,
            est_input_tokens: 500,
            max_tokens: Some(256),
            budget_remaining_usd: None,
            budget_remaining_pct: None,
            seed: 7,
        }
    }

    #[test]
    fn a_decision_allocates_only_its_candidate_list() {
        let snap = snapshot();
        let f = facts();
        let now = health::now_ms();
        // Warm up thread-locals (the rand thread RNG) outside the measurement.
        let _ = decide_in(&snap, &snap.routing_configs["ab"], &f, now);
        for slug in ["fallback3", "cost10", "latency10", "ensemble3", "cascade3", "ab", "rules"] {
            let config = &snap.routing_configs[slug];
            let mut decision = None;
            let n = allocations_in(|| decision = Some(decide_in(&snap, config, &f, now)));
            assert_eq!(n, 1, "{slug}: {n} allocations");
            let d = decision.unwrap();
            assert!(d.attempts().count() >= 1, "{slug}");
        }
    }

    #[test]
    fn cost_picks_the_cheapest_qualifying_and_latency_the_fastest() {
        let snap = snapshot();
        let f = facts();
        let now = health::now_ms();
        let d = decide_in(&snap, &snap.routing_configs["cost10"], &f, now);
        let order: Vec<&str> = d.attempts().map(|c| c.member.target.provider.id.as_str()).collect();
        // p1..p10 cost 10, 9, …, 1 (per million tokens); p9 and p10 are economy.
        assert_eq!(order, ["p8", "p7", "p6", "p5", "p4", "p3", "p2", "p1"]);
        assert_eq!(d.candidates.iter().filter(|c| !c.eligible).count(), 2);
        let d = decide_in(&snap, &snap.routing_configs["latency10"], &f, now);
        let fastest = d.attempts().next().unwrap().member.target.provider.id.as_str();
        assert_eq!(fastest, "p1", "cold start: list order");
        let s = &snap.health_settings;
        for (i, member) in snap.routing_configs["latency10"].strategy.members().iter().enumerate() {
            member.health.record(health::Sample::Success, Duration::from_millis(100 - i as u64 * 7), now, s);
        }
        let d = decide_in(&snap, &snap.routing_configs["latency10"], &f, now);
        assert_eq!(d.attempts().next().unwrap().member.target.provider.id, "p10");
    }

    #[test]
    fn sticky_variants_spread_and_stay() {
        let snap = snapshot();
        let now = health::now_ms();
        let mut counts = [0usize; 2];
        for u in 0..1000 {
            let user = format!("user-{u}");
            let f = RequestFacts { end_user: Some(&user), ..facts() };
            let a = decide_in(&snap, &snap.routing_configs["ab"], &f, now).ab_variant().unwrap();
            let b = decide_in(&snap, &snap.routing_configs["ab"], &f, now).ab_variant().unwrap();
            assert_eq!(a, b);
            counts[usize::from(a == "treatment")] += 1;
        }
        // 80/20 split: 800 ± 60.
        assert!((740..=860).contains(&counts[0]), "{counts:?}");
    }
}
