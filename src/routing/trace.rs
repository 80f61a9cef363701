//! The decision trace of one request: which config and version ran, which candidates were
//! considered and why, and what each attempt did. Returned in the body on `"mlx:trace":
//! true`, rendered by dry runs, and handed to the trace pipeline.

use serde::Serialize;

use super::health::{HealthReport, HealthSettings};
use super::{Decision, Hop, Plan};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HopRecord {
    pub routing_config: String,
    pub config_version: u32,
    pub strategy: &'static str,
    /// `variant control`, `rule 2 (line 7)`, `default`.
    pub choice: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthRecord {
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    pub samples: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ewma_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sample_age_ms: Option<u64>,
}

impl From<HealthReport> for HealthRecord {
    fn from(r: HealthReport) -> Self {
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        HealthRecord {
            healthy: r.healthy,
            success_rate: r.success_rate.map(round),
            samples: r.samples,
            p50_ms: r.p50_ms.map(round),
            ewma_ms: r.ewma_ms.map(round),
            last_sample_age_ms: r.last_sample_age_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CandidateRecord {
    pub provider: String,
    pub model: String,
    /// `selected` (first attempt), `fallback` (later attempt), `last_resort` (unhealthy:
    /// tried only after every other candidate failed), `rejected` (never tried).
    pub status: &'static str,
    pub reason: String,
    pub health: HealthRecord,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttemptRecord {
    pub index: usize,
    pub provider: String,
    pub model: String,
    /// `success`, `rate_limited`, `upstream_error`, `timeout`, `connect_error`,
    /// `rejected` (failed the acceptance check), `client_error`, `cancelled`.
    pub status: &'static str,
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since the request arrived.
    pub started_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outcome {
    /// 1-based index into `attempts` of the answer the client got.
    pub winner_attempt: Option<usize>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecisionTrace {
    /// `config`, `direct` or `auto`.
    pub resolved: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_config: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_version: Option<u32>,
    pub strategy: &'static str,
    /// Configs that handed the request on (A/B variant picks, rule matches), outermost first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<HopRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<&'static str>,
    pub candidates: Vec<CandidateRecord>,
    pub attempts: Vec<AttemptRecord>,
    pub decision: Outcome,
    pub ab_variant: Option<String>,
    /// The budget outcome, when any budget applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetRecord>,
    /// Tokens of every billed answer (a cascade's rejected steps and an ensemble's members
    /// included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<CostRecord>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetRecord {
    pub name: String,
    /// `none`, `warn_only`, `downgrade` or `block`.
    pub action: &'static str,
    pub remaining_usd: f64,
    /// The model or `@config` the request was downgraded from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downgraded_from: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct UsageRecord {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct CostRecord {
    pub input: f64,
    pub output: f64,
    pub total: f64,
    /// The served model has no price: its tokens were counted at $0.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unpriced: bool,
    /// The upstream reported no usage (e.g. a stream cut short): tokens were estimated.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1000.0
}

impl DecisionTrace {
    /// A trace for a request that named a model directly (no routing config).
    pub fn direct(
        resolved: &'static str,
        provider: &str,
        model: &str,
        health: HealthRecord,
    ) -> DecisionTrace {
        DecisionTrace {
            resolved,
            routing_config: None,
            config_version: None,
            strategy: "direct",
            hops: Vec::new(),
            aggregation: None,
            candidates: vec![CandidateRecord {
                provider: provider.to_string(),
                model: model.to_string(),
                status: "selected",
                reason: "named by the request".into(),
                health,
            }],
            attempts: Vec::new(),
            decision: Outcome { winner_attempt: None, reason: String::new() },
            ab_variant: None,
            budget: None,
            usage: None,
            cost_usd: None,
        }
    }

    pub fn from_decision(d: &Decision<'_>, now: u64, settings: &HealthSettings) -> DecisionTrace {
        let entry = d.entry();
        let hops = d
            .hops
            .iter()
            .flatten()
            .map(|h| match h {
                Hop::Variant { config, label } => HopRecord {
                    routing_config: format!("@{}", config.slug),
                    config_version: config.version,
                    strategy: config.strategy.name(),
                    choice: format!("variant {label}"),
                },
                Hop::Rule { config, rule } => HopRecord {
                    routing_config: format!("@{}", config.slug),
                    config_version: config.version,
                    strategy: config.strategy.name(),
                    choice: match (rule, &config.strategy) {
                        (Some(i), super::Strategy::CustomRules { rules, file, .. }) => {
                            format!(
                                "rule {} ({file}:{}: {})",
                                i + 1,
                                rules.rule_line(*i),
                                rules.rule_text(*i)
                            )
                        }
                        _ => "default".into(),
                    },
                },
            })
            .collect();
        let mut attempt_no = 0;
        let candidates = d
            .candidates
            .iter()
            .map(|c| CandidateRecord {
                provider: c.member.target.provider.id.clone(),
                model: c.member.target.model.clone(),
                status: if !c.eligible && c.reason == super::Reason::Unhealthy {
                    "last_resort"
                } else if !c.eligible {
                    "rejected"
                } else {
                    attempt_no += 1;
                    if attempt_no == 1 || matches!(d.plan, Plan::Parallel { .. }) {
                        "selected"
                    } else {
                        "fallback"
                    }
                },
                reason: c.reason.describe(),
                health: c.member.health.report(now, settings).into(),
            })
            .collect();
        DecisionTrace {
            resolved: "config",
            routing_config: Some(format!("@{}", entry.slug)),
            config_version: Some(entry.version),
            strategy: d.config.strategy.name(),
            hops,
            aggregation: match d.plan {
                Plan::Parallel { aggregation, .. } => Some(aggregation.as_str()),
                Plan::Sequential { .. } => None,
            },
            candidates,
            attempts: Vec::new(),
            decision: Outcome { winner_attempt: None, reason: String::new() },
            ab_variant: d.ab_variant().map(str::to_string),
            budget: None,
            usage: None,
            cost_usd: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn push_attempt(
        &mut self,
        provider: &str,
        model: &str,
        status: &'static str,
        http_status: Option<u16>,
        error: Option<String>,
        started: std::time::Duration,
        ttfb: Option<std::time::Duration>,
        duration: std::time::Duration,
    ) -> usize {
        self.attempts.push(AttemptRecord {
            index: self.attempts.len() + 1,
            provider: provider.to_string(),
            model: model.to_string(),
            status,
            http_status,
            error,
            started_ms: ms(started),
            ttfb_ms: ttfb.map(ms),
            duration_ms: ms(duration),
        });
        self.attempts.len()
    }

    /// Fills in the outcome from the attempts: the winner, and a one-line reason in the
    /// spirit of "attempt 1 timeout, attempt 2 succeeded".
    pub fn conclude(&mut self, winner: Option<usize>, why: Option<String>) {
        self.decision.winner_attempt = winner;
        if let Some(why) = why {
            self.decision.reason = why;
            return;
        }
        let failed: Vec<String> = self
            .attempts
            .iter()
            .filter(|a| Some(a.index) != winner && a.status != "cancelled")
            .map(|a| format!("{}/{} {}", a.provider, a.model, a.status))
            .collect();
        self.decision.reason = match (winner, failed.is_empty()) {
            (Some(1), true) => "first choice answered".into(),
            (Some(w), true) => format!("attempt {w} answered"),
            (Some(w), false) => format!("{}; attempt {w} answered", failed.join(", ")),
            (None, _) if self.attempts.is_empty() => "no attempt was made".into(),
            (None, _) => format!("every attempt failed: {}", failed.join(", ")),
        };
    }
}
