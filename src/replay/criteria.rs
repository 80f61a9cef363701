//! Success criteria of scheduled experiments (PRODUCT.md §8.6): predicates over a run's
//! result, AND-ed, giving each run a verdict `pass`, `fail` or `inconclusive` (the sample
//! below `min_sample_size`, or a metric the run does not have, e.g. similarity in
//! `routing_only` mode). `similarity_pct_above_threshold` takes `params.threshold`
//! (default: the run's `similarity_threshold`).

use serde_json::{json, Value};

use crate::config::ConfigError;

/// Metrics a predicate may name, and where a run's result has them (`None`: not measured by
/// this gateway's modes yet).
const METRICS: &[(&str, Option<&str>)] = &[
    ("cost_delta_pct", Some("cost_delta_pct")),
    ("p50_latency_delta_pct", Some("p50_latency_delta_pct")),
    ("p95_latency_delta_pct", Some("p95_latency_delta_pct")),
    ("error_rate_delta_pct", Some("error_rate_delta_pct")),
    ("similarity_pct_above_threshold", Some("similarity_pct_above_threshold")),
    ("judge_worse_pct_upper_ci", None),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Lte,
    Gt,
    Gte,
    Eq,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "eq" => Op::Eq,
            _ => return None,
        })
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Lte => a <= b,
            Op::Gt => a > b,
            Op::Gte => a >= b,
            Op::Eq => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Predicate {
    metric: String,
    op: Op,
    value: f64,
    /// `params.threshold` of `similarity_pct_above_threshold` (else the run's own).
    threshold: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Criteria {
    min_sample_size: u64,
    predicates: Vec<Predicate>,
}

impl Criteria {
    /// Checks `successCriteria`; errors name their path under `field`.
    pub fn parse(v: &Value, field: &str) -> Result<Criteria, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let Value::Object(m) = v else {
            return Err(vec![ConfigError::new(field, "must be an object")]);
        };
        for k in m.keys() {
            if !["logic", "min_sample_size", "minSampleSize", "predicates"].contains(&k.as_str()) {
                errors.push(ConfigError::new(format!("{field}.{k}"), "unknown field"));
            }
        }
        match m.get("logic") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "and" => {}
            Some(_) => errors
                .push(ConfigError::new(format!("{field}.logic"), "must be \"and\" (predicates are AND-ed)")),
        }
        let min_sample_size = match m.get("min_sample_size").or_else(|| m.get("minSampleSize")) {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().unwrap_or_else(|| {
                errors.push(ConfigError::new(format!("{field}.min_sample_size"), "must be a whole number"));
                0
            }),
        };
        let mut predicates = Vec::new();
        match m.get("predicates") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, p) in items.iter().enumerate() {
                    let at = format!("{field}.predicates[{i}]");
                    let metric = p.get("metric").and_then(Value::as_str);
                    if !metric.is_some_and(|m| METRICS.iter().any(|(name, _)| *name == m)) {
                        let names: Vec<&str> = METRICS.iter().map(|(n, _)| *n).collect();
                        errors.push(ConfigError::new(
                            format!("{at}.metric"),
                            format!("must be one of {}", names.join(", ")),
                        ));
                    }
                    let op = p.get("op").and_then(Value::as_str).and_then(Op::parse);
                    if op.is_none() {
                        errors.push(ConfigError::new(format!("{at}.op"), "must be lt, lte, gt, gte or eq"));
                    }
                    let value = p.get("value").and_then(Value::as_f64);
                    if value.is_none() {
                        errors.push(ConfigError::new(format!("{at}.value"), "must be a number"));
                    }
                    let threshold = match p.get("params").and_then(|p| p.get("threshold")) {
                        None | Some(Value::Null) => None,
                        Some(t) => match t.as_f64() {
                            Some(t) if (-1.0..=1.0).contains(&t) => Some(t),
                            _ => {
                                errors.push(ConfigError::new(
                                    format!("{at}.params.threshold"),
                                    "must be a number from -1 to 1",
                                ));
                                None
                            }
                        },
                    };
                    if let (Some(metric), Some(op), Some(value)) = (metric, op, value) {
                        predicates.push(Predicate { metric: metric.to_string(), op, value, threshold });
                    }
                }
            }
            Some(_) => errors.push(ConfigError::new(format!("{field}.predicates"), "must be a list")),
        }
        if errors.is_empty() {
            Ok(Criteria { min_sample_size, predicates })
        } else {
            Err(errors)
        }
    }

    /// The verdict of a finished run (its API document, and its answers' similarities
    /// when it compared any) and each predicate's outcome.
    pub fn evaluate(&self, run: &Value, similarity: Option<&super::simulate::Similarity>) -> (String, Value) {
        let requests = run["requests"].as_u64().unwrap_or(0);
        let mut results = Vec::new();
        let mut unavailable = false;
        let mut failed = false;
        for p in &self.predicates {
            let key = METRICS.iter().find(|(n, _)| *n == p.metric).and_then(|(_, k)| *k);
            let actual = match (p.metric.as_str(), similarity) {
                ("similarity_pct_above_threshold", Some(s)) => {
                    s.pct_above(p.threshold.unwrap_or(s.threshold))
                }
                _ => key.and_then(|k| run[k].as_f64()),
            };
            let holds = actual.map(|a| p.op.holds(a, p.value));
            match holds {
                None => unavailable = true,
                Some(false) => failed = true,
                Some(true) => {}
            }
            results.push(json!({ "metric": p.metric, "actual": actual, "holds": holds }));
        }
        let verdict = if requests < self.min_sample_size || unavailable {
            "inconclusive"
        } else if failed {
            "fail"
        } else {
            "pass"
        };
        (
            verdict.to_string(),
            json!({ "min_sample_size": self.min_sample_size, "requests": requests, "predicates": results }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let c = Criteria::parse(
            &json!({"logic": "and", "min_sample_size": 100, "predicates": [
                {"metric": "cost_delta_pct", "op": "lte", "value": -20},
                {"metric": "error_rate_delta_pct", "op": "lte", "value": 5}]}),
            "successCriteria",
        )
        .unwrap();
        let run = |n: u64, cost: f64, err: f64| json!({"requests": n, "cost_delta_pct": cost, "error_rate_delta_pct": err});
        assert_eq!(c.evaluate(&run(500, -30.0, 0.0), None).0, "pass");
        assert_eq!(c.evaluate(&run(500, -10.0, 0.0), None).0, "fail");
        assert_eq!(c.evaluate(&run(50, -30.0, 0.0), None).0, "inconclusive");
        assert_eq!(
            c.evaluate(
                &json!({"requests": 500, "cost_delta_pct": -30.0, "error_rate_delta_pct": null}),
                None
            )
            .0,
            "inconclusive"
        );
        let sim = Criteria::parse(&json!({"predicates": [{"metric": "similarity_pct_above_threshold", "op": "gte", "value": 80, "params": {"threshold": 0.9}}]}), "c").unwrap();
        assert_eq!(sim.evaluate(&run(500, 0.0, 0.0), None).0, "inconclusive");
        // With answers compared: 3 of 4 at or above 0.9 (75%), 4 of 4 above the run's 0.5.
        let compared = crate::replay::simulate::Similarity {
            threshold: 0.5,
            values: vec![0.6, 0.9, 0.95, 1.0],
            ..Default::default()
        };
        assert_eq!(sim.evaluate(&run(500, 0.0, 0.0), Some(&compared)).0, "fail");
        let default_threshold = Criteria::parse(
            &json!({"predicates": [{"metric": "similarity_pct_above_threshold", "op": "gte", "value": 80}]}),
            "c",
        )
        .unwrap();
        let (verdict, details) = default_threshold.evaluate(&run(500, 0.0, 0.0), Some(&compared));
        assert_eq!((verdict.as_str(), details["predicates"][0]["actual"].as_f64()), ("pass", Some(100.0)));
        let bad = Criteria::parse(&json!({"predicates": [{"metric": "similarity_pct_above_threshold", "op": "gte", "value": 80, "params": {"threshold": 2}}]}), "c").unwrap_err();
        assert_eq!(bad[0].path, "c.predicates[0].params.threshold");
        let errs = Criteria::parse(
            &json!({"logic": "or", "predicates": [{"metric": "x", "op": "about", "value": "1"}]}),
            "c",
        )
        .unwrap_err();
        let paths: Vec<String> = errs.into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            ["c.logic", "c.predicates[0].metric", "c.predicates[0].op", "c.predicates[0].value"]
        );
    }
}
