//! `routing_configs.<slug>`: the strategy dialect, one struct per strategy, validated into
//! `routing::Strategy` with every model resolved, priced and given its health cells.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{section, ConfigError, RoutingConfig, ID_RULE};
use crate::prices::{PriceTable, Tier};
use crate::providers::{self, Provider};
use crate::routing::health::HealthRegistry;
use crate::routing::{self, rules, Accept, Aggregation, Member, RetryOn, RuleTarget, Strategy, Variant};

pub const STRATEGIES: &str =
    "single, fallback (fallback_chain), cost_optimized, latency_optimized, ensemble, ab_test, cascade, custom_rules";

/// Output tokens assumed for cost estimates when a request sets no `max_tokens`.
const DEFAULT_OUTPUT_TOKENS: u64 = 1024;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ModelRef {
    Name(String),
    Full(RawMember),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    model: String,
    timeout_ms: Option<u64>,
    weight: Option<f64>,
    accept: Option<RawAccept>,
    /// Overrides of the price table for this model (USD per million tokens) and its tier.
    tier: Option<String>,
    input_per_mtok: Option<f64>,
    output_per_mtok: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAccept {
    #[serde(default)]
    finish_reason: Vec<String>,
    min_output_tokens: Option<u64>,
    min_length: Option<usize>,
    #[serde(default)]
    valid_json: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    Str(String),
    Num(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSingle {
    model: String,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFallback {
    attempts: Vec<ModelRef>,
    retry_on: Option<Vec<StrOrNum>>,
    total_budget_ms: Option<u64>,
    /// Default for attempts without their own `timeout_ms`.
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCost {
    quality_tier: String,
    allowed_models: Vec<ModelRef>,
    retry_on: Option<Vec<StrOrNum>>,
    timeout_ms: Option<u64>,
    default_output_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLatency {
    candidates: Vec<ModelRef>,
    retry_on: Option<Vec<StrOrNum>>,
    timeout_ms: Option<u64>,
    explore_pct: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnsemble {
    members: Vec<ModelRef>,
    aggregation: String,
    timeout_ms: Option<u64>,
    /// Validation every member's answer must pass to count.
    accept: Option<RawAccept>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: Option<String>,
    weight: f64,
    config: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAbTest {
    variants: Vec<RawVariant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCascade {
    steps: Vec<ModelRef>,
    retry_on: Option<Vec<StrOrNum>>,
    total_budget_ms: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    rules_file: String,
    default_output_tokens: Option<u64>,
}

/// What building a config needs from the rest of the snapshot.
pub struct Env<'a> {
    pub providers: &'a HashMap<String, Arc<Provider>>,
    /// Providers whose own entry was invalid (already reported).
    pub broken: &'a [String],
    pub health: &'a HealthRegistry,
    pub prices: &'a PriceTable,
    pub base_dir: &'a Path,
}

/// One parsed config before cross-references are checked.
pub struct Built {
    pub config: RoutingConfig,
    /// Files whose content is part of the definition (rule files), to watch for changes.
    pub files: Vec<PathBuf>,
}

fn member(
    env: &Env<'_>,
    r: ModelRef,
    default_timeout: Option<u64>,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Member> {
    let raw = match r {
        ModelRef::Name(model) => RawMember {
            model,
            timeout_ms: None,
            weight: None,
            accept: None,
            tier: None,
            input_per_mtok: None,
            output_per_mtok: None,
        },
        ModelRef::Full(m) => m,
    };
    if raw.model.starts_with('@') {
        errors.push(ConfigError::new(format!("{path}.model"), "takes a model, not a routing config"));
        return None;
    }
    let target = match providers::resolve_model(env.providers, &raw.model) {
        Ok((target, _)) => target,
        Err(_)
            if providers::provider_hint(&raw.model).is_some_and(|id| env.broken.iter().any(|b| b == id)) =>
        {
            return None;
        }
        Err(e) => {
            errors.push(ConfigError::new(format!("{path}.model"), e.message()));
            return None;
        }
    };
    let timeout_ms = raw.timeout_ms.or(default_timeout);
    if timeout_ms == Some(0) {
        errors.push(ConfigError::new(format!("{path}.timeout_ms"), "must be greater than 0"));
    }
    let weight = raw.weight.unwrap_or(1.0);
    if !(weight.is_finite() && weight > 0.0) {
        errors.push(ConfigError::new(format!("{path}.weight"), "must be a positive number"));
    }
    let listed = env.prices.lookup(&target.model);
    let price = match (raw.input_per_mtok, raw.output_per_mtok, listed) {
        (Some(i), Some(o), _) if i >= 0.0 && o >= 0.0 => Some((i / 1e6, o / 1e6)),
        (None, None, Some(info)) => Some((info.input, info.output)),
        (None, None, None) => None,
        _ => {
            errors.push(ConfigError::new(
                path,
                "set both input_per_mtok and output_per_mtok (non-negative USD per million tokens)",
            ));
            None
        }
    };
    // Inline prices replace the table's input and output prices; cached and reasoning
    // tokens keep the table's ratios when it lists the model.
    let rates = match (price, listed) {
        (Some((i, o)), Some(info)) => {
            let r = info.rates();
            let scale = |v: f64, base: f64, new: f64| if base > 0.0 { v / base * new } else { new };
            Some(crate::prices::Rates {
                input: i,
                output: o,
                cache_read: scale(r.cache_read, r.input, i),
                cache_write: scale(r.cache_write, r.input, i),
                reasoning: scale(r.reasoning, r.output, o),
            })
        }
        (Some((i, o)), None) => Some(crate::prices::Rates::flat(i, o)),
        (None, _) => None,
    };
    let tier = match raw.tier.as_deref() {
        Some(t) => match Tier::parse(t) {
            Some(t) => Some(t),
            None => {
                errors.push(ConfigError::new(format!("{path}.tier"), "must be economy, standard or premium"));
                None
            }
        },
        None => listed.map(|i| i.tier),
    };
    let provider_id = target.provider.id.clone();
    let health = env.health.cell(&format!("{provider_id}/{}", target.model));
    Some(Member {
        health,
        provider_health: env.health.cell(&provider_id),
        target,
        timeout: timeout_ms.map(Duration::from_millis),
        weight,
        accept: raw.accept.map(accept),
        price,
        tier,
        rates,
    })
}

fn accept(a: RawAccept) -> Accept {
    Accept {
        finish_reason: a.finish_reason,
        min_output_tokens: a.min_output_tokens,
        min_length: a.min_length,
        valid_json: a.valid_json,
    }
}

fn members(
    env: &Env<'_>,
    refs: Vec<ModelRef>,
    default_timeout: Option<u64>,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<Member> {
    if refs.is_empty() {
        errors.push(ConfigError::new(path, "must list at least one model"));
    }
    refs.into_iter()
        .enumerate()
        .filter_map(|(i, r)| member(env, r, default_timeout, &format!("{path}[{i}]"), errors))
        .collect()
}

fn retry_on(raw: Option<Vec<StrOrNum>>, path: &str, errors: &mut Vec<ConfigError>) -> RetryOn {
    let Some(items) = raw else {
        // PRODUCT.md §4.3.2 default, plus connection failures (transport errors count as 5xx).
        return RetryOn::ALL;
    };
    let items: Vec<String> = items
        .into_iter()
        .map(|i| match i {
            StrOrNum::Str(s) => s,
            StrOrNum::Num(n) => n.to_string(),
        })
        .collect();
    RetryOn::parse(&items).unwrap_or_else(|e| {
        errors.push(ConfigError::new(path, e));
        RetryOn::NONE
    })
}

fn budget(ms: Option<u64>, path: &str, errors: &mut Vec<ConfigError>) -> Option<Duration> {
    if ms == Some(0) {
        errors.push(ConfigError::new(path, "must be greater than 0"));
    }
    ms.map(Duration::from_millis)
}

/// Parses one `routing_configs.<slug>` entry. Cross-config references (A/B variants, rule
/// targets) are checked afterwards by `check_references`.
pub fn build(
    slug: &str,
    value: Value,
    env: &Env<'_>,
    previous: Option<&RoutingConfig>,
    errors: &mut Vec<ConfigError>,
) -> Option<Built> {
    let path = format!("routing_configs.{slug}");
    if !super::valid_id(slug) {
        errors.push(ConfigError::new(&path, format!("slug {ID_RULE}")));
        return None;
    }
    let Value::Mapping(mut map) = value else {
        errors.push(ConfigError::new(&path, "expected a mapping"));
        return None;
    };
    let mut definition = serde_json::to_string(&map).unwrap_or_default();
    let mut take_str = |key: &str, errors: &mut Vec<ConfigError>| match map.remove(key) {
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            errors.push(ConfigError::new(format!("{path}.{key}"), "must be a string"));
            None
        }
        None => {
            errors.push(ConfigError::new(format!("{path}.{key}"), "is required"));
            None
        }
    };
    let project = take_str("project", errors)?;
    let strategy_name = take_str("strategy", errors)?;
    let cache = match map.remove("cache") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let at = format!("{path}.cache");
            section::<super::cache::RawCache>(v, &at, errors)
                .map(|raw| super::cache::settings(raw, &at, errors))
        }
    };
    let rest = Value::Mapping(map);
    let mut files = Vec::new();
    let before = errors.len();
    let strategy = match strategy_name.as_str() {
        "single" => {
            let r: RawSingle = section(rest, &path, errors)?;
            let member = member(env, ModelRef::Name(r.model), r.timeout_ms, &path, errors)?;
            Strategy::Single { member }
        }
        "fallback" | "fallback_chain" => {
            let r: RawFallback = section(rest, &path, errors)?;
            Strategy::Fallback {
                attempts: members(env, r.attempts, r.timeout_ms, &format!("{path}.attempts"), errors),
                retry_on: retry_on(r.retry_on, &format!("{path}.retry_on"), errors),
                total_budget: budget(r.total_budget_ms, &format!("{path}.total_budget_ms"), errors),
            }
        }
        "cost_optimized" => {
            let r: RawCost = section(rest, &path, errors)?;
            let tier = Tier::parse(&r.quality_tier).unwrap_or_else(|| {
                errors.push(ConfigError::new(
                    format!("{path}.quality_tier"),
                    "must be economy, standard or premium",
                ));
                Tier::Economy
            });
            let candidates =
                members(env, r.allowed_models, r.timeout_ms, &format!("{path}.allowed_models"), errors);
            for (i, m) in candidates.iter().enumerate() {
                if m.price.is_none() || m.tier.is_none() {
                    errors.push(ConfigError::new(
                        format!("{path}.allowed_models[{i}]"),
                        format!(
                            "model \"{}\" is not in the price table; give it input_per_mtok, output_per_mtok and tier",
                            m.target.model
                        ),
                    ));
                }
            }
            if !candidates.is_empty() && candidates.iter().all(|m| m.tier.is_some_and(|t| t < tier)) {
                errors.push(ConfigError::new(
                    format!("{path}.allowed_models"),
                    format!("no allowed model meets quality_tier {}", tier.as_str()),
                ));
            }
            Strategy::CostOptimized {
                tier,
                candidates,
                retry_on: retry_on(r.retry_on, &format!("{path}.retry_on"), errors),
                default_output_tokens: r.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
            }
        }
        "latency_optimized" => {
            let r: RawLatency = section(rest, &path, errors)?;
            let explore = r.explore_pct.unwrap_or(5.0);
            if !(0.0..=50.0).contains(&explore) {
                errors.push(ConfigError::new(format!("{path}.explore_pct"), "must be between 0 and 50"));
            }
            Strategy::LatencyOptimized {
                candidates: members(env, r.candidates, r.timeout_ms, &format!("{path}.candidates"), errors),
                retry_on: retry_on(r.retry_on, &format!("{path}.retry_on"), errors),
                explore: explore / 100.0,
            }
        }
        "ensemble" => {
            let r: RawEnsemble = section(rest, &path, errors)?;
            let aggregation = match r.aggregation.as_str() {
                "first_valid" => Aggregation::FirstValid,
                "majority" | "majority_vote" => Aggregation::Majority,
                "weighted" | "weighted_vote" => Aggregation::Weighted,
                other => {
                    errors.push(ConfigError::new(
                        format!("{path}.aggregation"),
                        format!("unknown aggregation \"{other}\" (use first_valid, majority or weighted)"),
                    ));
                    Aggregation::FirstValid
                }
            };
            let mut members = members(env, r.members, None, &format!("{path}.members"), errors);
            if let Some(a) = r.accept.map(accept) {
                for m in members.iter_mut().filter(|m| m.accept.is_none()) {
                    m.accept = Some(a.clone());
                }
            }
            if members.len() < 2 && errors.len() == before {
                errors.push(ConfigError::new(
                    format!("{path}.members"),
                    "an ensemble needs at least two members",
                ));
            }
            Strategy::Ensemble {
                members,
                aggregation,
                timeout: budget(r.timeout_ms, &format!("{path}.timeout_ms"), errors)
                    .unwrap_or(Duration::from_secs(60)),
            }
        }
        "ab_test" => {
            let r: RawAbTest = section(rest, &path, errors)?;
            if r.variants.is_empty() {
                errors.push(ConfigError::new(format!("{path}.variants"), "must list at least one variant"));
            }
            let mut variants = Vec::new();
            for (i, v) in r.variants.into_iter().enumerate() {
                let vpath = format!("{path}.variants[{i}]");
                let Some(config) = v.config.strip_prefix('@') else {
                    errors.push(ConfigError::new(
                        format!("{vpath}.config"),
                        "must name a routing config as \"@slug\"",
                    ));
                    continue;
                };
                if !(v.weight.is_finite() && v.weight >= 0.0) {
                    errors.push(ConfigError::new(format!("{vpath}.weight"), "must be a non-negative number"));
                    continue;
                }
                let name = v.name.unwrap_or_else(|| config.to_string());
                if variants.iter().any(|x: &Variant| x.name == name) {
                    errors.push(ConfigError::new(vpath, format!("duplicate variant name \"{name}\"")));
                    continue;
                }
                variants.push(Variant { name, weight: v.weight, config: config.to_string() });
            }
            let total_weight: f64 = variants.iter().map(|v| v.weight).sum();
            if total_weight <= 0.0 && !variants.is_empty() {
                errors.push(ConfigError::new(format!("{path}.variants"), "weights must not all be 0"));
            }
            Strategy::AbTest { variants, total_weight }
        }
        "cascade" => {
            let r: RawCascade = section(rest, &path, errors)?;
            Strategy::Cascade {
                steps: members(env, r.steps, r.timeout_ms, &format!("{path}.steps"), errors),
                retry_on: retry_on(r.retry_on, &format!("{path}.retry_on"), errors),
                total_budget: budget(r.total_budget_ms, &format!("{path}.total_budget_ms"), errors),
            }
        }
        "custom_rules" => {
            let r: RawRules = section(rest, &path, errors)?;
            let file = env.base_dir.join(&r.rules_file);
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(ConfigError::new(
                        format!("{path}.rules_file"),
                        format!("cannot read {}: {e}", file.display()),
                    ));
                    return None;
                }
            };
            definition.push_str(&text);
            files.push(file);
            let rules = match rules::RuleSet::parse(&text) {
                Ok(r) => r,
                Err(errs) => {
                    for e in errs {
                        errors.push(ConfigError::new(
                            format!("{path}.rules_file"),
                            format!("{}:{e}", r.rules_file),
                        ));
                    }
                    return None;
                }
            };
            let mut targets = Vec::new();
            for (target, line, col) in rules.targets() {
                let at = format!("{}:{line}:{col}", r.rules_file);
                match target {
                    rules::Target::Config(slug) => targets.push(RuleTarget::Config(slug.clone())),
                    rules::Target::Model(model) => {
                        let mut errs = Vec::new();
                        match member(env, ModelRef::Name(model.clone()), None, &path, &mut errs) {
                            Some(m) => targets.push(RuleTarget::Model(Box::new(m))),
                            None => {
                                for e in errs {
                                    errors.push(ConfigError::new(
                                        format!("{path}.rules_file"),
                                        format!("{at}: {}", e.message),
                                    ));
                                }
                                return None;
                            }
                        }
                    }
                }
            }
            let mut provider_cells: Vec<(String, Arc<crate::routing::health::Health>)> = Vec::new();
            for (id, line, col) in rules.provider_refs() {
                if !env.providers.contains_key(id) {
                    errors.push(ConfigError::new(
                        format!("{path}.rules_file"),
                        format!("{}:{line}:{col}: unknown provider \"{id}\"", r.rules_file),
                    ));
                } else if !provider_cells.iter().any(|(p, _)| p == id) {
                    provider_cells.push((id.to_string(), env.health.cell(id)));
                }
            }
            let cost_price = match targets.last() {
                Some(RuleTarget::Model(m)) => m.price,
                _ => None,
            };
            Strategy::CustomRules {
                file: r.rules_file,
                rules: Arc::new(rules),
                targets,
                default_output_tokens: r.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
                cost_price,
                providers: provider_cells,
            }
        }
        other => {
            errors.push(ConfigError::new(
                format!("{path}.strategy"),
                format!("unknown strategy \"{other}\" (supported: {STRATEGIES})"),
            ));
            return None;
        }
    };
    if errors.len() != before {
        return None;
    }
    let version = match previous {
        Some(old) if old.definition == definition => old.version,
        Some(old) => old.version + 1,
        None => 1,
    };
    Some(Built {
        config: RoutingConfig { slug: slug.to_string(), project, version, strategy, definition, cache },
        files,
    })
}

/// Sub-config references exist, stay within the project, form no cycle, and nest at most
/// `routing::MAX_DEPTH` deep. A `custom_rules` config's `est_cost_usd` is priced at its
/// default target; when that is a config, at that config's first model.
pub fn check_references(configs: &mut HashMap<String, Arc<RoutingConfig>>, errors: &mut Vec<ConfigError>) {
    let mut slugs: Vec<&String> = configs.keys().collect();
    slugs.sort();
    for slug in slugs {
        let rc = &configs[slug];
        for sub in rc.strategy.sub_configs() {
            match configs.get(sub) {
                None => errors.push(ConfigError::new(
                    format!("routing_configs.{slug}"),
                    format!("refers to @{sub}, which is not a routing config"),
                )),
                Some(s) if s.project != rc.project => errors.push(ConfigError::new(
                    format!("routing_configs.{slug}"),
                    format!("refers to @{sub}, which belongs to project \"{}\"", s.project),
                )),
                Some(_) => {}
            }
        }
        // Depth-first walk: a path longer than MAX_DEPTH is a cycle or too deep a nesting.
        fn depth(
            configs: &HashMap<String, Arc<RoutingConfig>>,
            slug: &str,
            seen: &mut Vec<String>,
        ) -> Result<usize, String> {
            if seen.iter().any(|s| s == slug) {
                seen.push(slug.to_string());
                return Err(format!("cycle: @{}", seen.join(" → @")));
            }
            let Some(rc) = configs.get(slug) else { return Ok(0) };
            seen.push(slug.to_string());
            let mut deepest = 0;
            for sub in rc.strategy.sub_configs() {
                deepest = deepest.max(depth(configs, sub, seen)?);
            }
            seen.pop();
            Ok(deepest + 1)
        }
        match depth(configs, slug, &mut Vec::new()) {
            Err(cycle) => errors.push(ConfigError::new(format!("routing_configs.{slug}"), cycle)),
            Ok(d) if d > routing::MAX_DEPTH => errors.push(ConfigError::new(
                format!("routing_configs.{slug}"),
                format!("nests routing configs {d} deep; at most {} are allowed", routing::MAX_DEPTH),
            )),
            Ok(_) => {}
        }
    }
    // Price rules whose default is a config at that config's first model.
    let fills: Vec<(String, (f64, f64))> = configs
        .iter()
        .filter_map(|(slug, rc)| match &rc.strategy {
            Strategy::CustomRules { targets, cost_price: None, .. } => match targets.last() {
                Some(RuleTarget::Config(sub)) => configs
                    .get(sub)
                    .and_then(|s| s.strategy.members().first())
                    .and_then(|m| m.price)
                    .map(|p| (slug.clone(), p)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    for (slug, price) in fills {
        if let Some(rc) = configs.get_mut(&slug).and_then(Arc::get_mut) {
            if let Strategy::CustomRules { cost_price, .. } = &mut rc.strategy {
                *cost_price = Some(price);
            }
        }
    }
}
