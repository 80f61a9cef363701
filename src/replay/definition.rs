//! An experiment's definition as `POST /manage/v1/experiments` takes it: the documented
//! camelCase body (PRODUCT.md §8.6) or its snake_case spelling, checked field by field;
//! every error names the field as the client spelled it.

use serde_json::{json, Map, Value};

use crate::config::ConfigError;

/// Requests replayed by default when the window holds more (PRODUCT.md §8.6: at most
/// 50,000 per experiment).
pub const DEFAULT_WINDOW_MS: u64 = 24 * 3600 * 1000;
const MAX_HYPOTHESIS: usize = 2000;
const MAX_NAME: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decisions only: no provider call, no spend.
    RoutingOnly,
    /// The sample sent through the candidate for real.
    WithResponses,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::RoutingOnly => "routing_only",
            Mode::WithResponses => "with_responses",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "routing_only" => Some(Mode::RoutingOnly),
            "with_responses" => Some(Mode::WithResponses),
            _ => None,
        }
    }
}

/// What the candidate is, as the client named it.
#[derive(Debug, Clone, PartialEq)]
pub enum CandidateSpec {
    /// A routing-config body (its YAML entry as JSON).
    Inline(Map<String, Value>),
    /// An existing config, its live version or version `n`.
    Reference { slug: String, version: Option<i64> },
    /// `candidatePolicy` + `candidateConfig`: a strategy and its fields;
    /// `provider_credential_id` names the provider of `model`.
    Policy { policy: String, config: Map<String, Value> },
}

/// Which stored requests are replayed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    /// Without the `@`.
    pub routing_config: Option<String>,
    pub model: Option<String>,
    pub end_user: Option<String>,
    pub tags: Vec<(String, String)>,
}

impl Filters {
    pub fn view(&self) -> Value {
        let tags: Map<String, Value> = self.tags.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        json!({
            "routing_config": self.routing_config.as_ref().map(|s| format!("@{s}")),
            "model": self.model,
            "end_user": self.end_user,
            "tags": tags,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub name: Option<String>,
    pub project: Option<String>,
    pub candidate: CandidateSpec,
    /// Where `candidate` came from in the body (for error paths).
    pub candidate_field: &'static str,
    pub filters: Filters,
    pub mode: Mode,
    /// `None`: every request in the window, up to `MAX_SAMPLE`.
    pub sample_size: Option<usize>,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub hypothesis: Option<String>,
    /// The config `promote` writes by default (`routing_config` in the body).
    pub promote_to: Option<String>,
    /// `with_responses`: requests in flight at once (`None`: the default).
    pub concurrency: Option<usize>,
    /// `with_responses`: the similarity a pair of answers needs to count as alike.
    pub similarity_threshold: Option<f64>,
}

/// The fields accepted, each as `(camelCase, snake_case)`.
pub const FIELDS: &[(&str, &str)] = &[
    ("name", "name"),
    ("projectId", "project_id"),
    ("project", "project"),
    ("candidate", "candidate"),
    ("candidatePolicy", "candidate_policy"),
    ("candidateConfig", "candidate_config"),
    ("filters", "filters"),
    ("mode", "mode"),
    ("sampleSize", "sample_size"),
    ("windowStart", "window_start"),
    ("windowEnd", "window_end"),
    ("windowHours", "window_hours"),
    ("hypothesis", "hypothesis"),
    ("routingConfig", "routing_config"),
    ("concurrency", "concurrency"),
    ("similarityThreshold", "similarity_threshold"),
];

/// Reads a body's fields under either spelling; two spellings of one field is an error.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    errors: Vec<ConfigError>,
}

impl<'a> Fields<'a> {
    /// The field's value and the name it was sent under.
    fn get(&mut self, camel: &'static str, snake: &'static str) -> Option<(&'static str, &'a Value)> {
        match (self.map.get(camel), self.map.get(snake)) {
            (Some(_), Some(_)) if camel != snake => {
                self.errors.push(ConfigError::new(snake, format!("give {camel} or {snake}, not both")));
                None
            }
            (Some(v), _) => Some((camel, v)).filter(|(_, v)| !v.is_null()),
            (None, Some(v)) => Some((snake, v)).filter(|(_, v)| !v.is_null()),
            (None, None) => None,
        }
    }

    fn string(&mut self, camel: &'static str, snake: &'static str) -> Option<(&'static str, String)> {
        let (name, v) = self.get(camel, snake)?;
        match v.as_str() {
            Some(s) if !s.trim().is_empty() => Some((name, s.trim().to_string())),
            Some(_) => {
                self.errors.push(ConfigError::new(name, "must not be empty"));
                None
            }
            None => {
                self.errors.push(ConfigError::new(name, "must be a string"));
                None
            }
        }
    }

    /// RFC 3339 text or unix milliseconds.
    fn time(&mut self, camel: &'static str, snake: &'static str) -> Option<(&'static str, u64)> {
        let (name, v) = self.get(camel, snake)?;
        let ms = match v {
            Value::String(s) => crate::spend::period::parse_iso8601(s).and_then(|ms| u64::try_from(ms).ok()),
            Value::Number(n) => n.as_u64(),
            _ => None,
        };
        if ms.is_none() {
            self.errors.push(ConfigError::new(
                name,
                "must be an RFC 3339 time (2026-04-10T00:00:00Z) or unix milliseconds",
            ));
        }
        ms.map(|ms| (name, ms))
    }
}

/// A tag filter: `{"team": "search"}`, `["team=search"]` or `[["team", "search"]]`.
fn tags(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v.as_str() {
                    Some(s) => out.push((k.clone(), s.to_string())),
                    None => errors.push(ConfigError::new(format!("{path}.{k}"), "must be a string")),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let pair = match item {
                    Value::String(s) => {
                        s.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    }
                    Value::Array(kv) => match kv.as_slice() {
                        [Value::String(k), Value::String(v)] => Some((k.clone(), v.clone())),
                        _ => None,
                    },
                    _ => None,
                };
                match pair {
                    Some(p) => out.push(p),
                    None => errors.push(ConfigError::new(
                        format!("{path}[{i}]"),
                        "must be \"key=value\" or [\"key\", \"value\"]",
                    )),
                }
            }
        }
        _ => errors.push(ConfigError::new(path, "must be an object of tag values")),
    }
    out
}

fn filters(v: &Value, errors: &mut Vec<ConfigError>) -> Filters {
    let Value::Object(m) = v else {
        errors.push(ConfigError::new("filters", "must be an object"));
        return Filters::default();
    };
    let mut f = Filters::default();
    for (key, value) in m {
        let path = format!("filters.{key}");
        let text = |errors: &mut Vec<ConfigError>| match value.as_str() {
            Some(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            _ => {
                errors.push(ConfigError::new(&path, "must be a non-empty string"));
                None
            }
        };
        match key.as_str() {
            "routing_config" | "routingConfig" => {
                f.routing_config = text(errors).map(|s| s.trim_start_matches('@').to_string());
            }
            "model" => f.model = text(errors),
            "end_user" | "end_user_id" | "endUser" | "endUserId" => f.end_user = text(errors),
            "tags" | "tag" => f.tags = tags(value, &path, errors),
            _ => errors
                .push(ConfigError::new(&path, "unknown filter; use routing_config, model, end_user or tags")),
        }
    }
    f
}

/// `"@slug"`, `"@slug@v3"`, `{"routing_config": "@slug", "version": 3}` or an inline body.
fn candidate(name: &'static str, v: &Value, errors: &mut Vec<ConfigError>) -> Option<CandidateSpec> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            let Some(rest) = s.strip_prefix('@') else {
                errors.push(ConfigError::new(
                    name,
                    "must be \"@slug\", {\"routing_config\": \"@slug\", \"version\": n} or a routing-config body",
                ));
                return None;
            };
            let (slug, version) = match rest.split_once("@v") {
                Some((slug, n)) => match n.parse::<i64>() {
                    Ok(n) if n > 0 => (slug, Some(n)),
                    _ => {
                        errors.push(ConfigError::new(
                            name,
                            format!("\"{s}\": the version must be a positive number"),
                        ));
                        return None;
                    }
                },
                None => (rest, None),
            };
            if !crate::config::valid_id(slug) {
                errors.push(ConfigError::new(name, format!("\"{s}\" is not a routing config reference")));
                return None;
            }
            Some(CandidateSpec::Reference { slug: slug.to_string(), version })
        }
        Value::Object(m) if m.contains_key("routing_config") && !m.contains_key("strategy") => {
            let slug = match m.get("routing_config").and_then(Value::as_str) {
                Some(s) if crate::config::valid_id(s.trim_start_matches('@')) => {
                    s.trim_start_matches('@').to_string()
                }
                _ => {
                    errors.push(ConfigError::new(format!("{name}.routing_config"), "must be \"@slug\""));
                    return None;
                }
            };
            let version = match m.get("version") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_i64() {
                    Some(n) if n > 0 => Some(n),
                    _ => {
                        errors.push(ConfigError::new(
                            format!("{name}.version"),
                            "must be a positive whole number",
                        ));
                        return None;
                    }
                },
            };
            if let Some(k) = m.keys().find(|k| *k != "routing_config" && *k != "version") {
                errors
                    .push(ConfigError::new(format!("{name}.{k}"), "unknown field of a candidate reference"));
                return None;
            }
            Some(CandidateSpec::Reference { slug, version })
        }
        Value::Object(m) => Some(CandidateSpec::Inline(m.clone())),
        _ => {
            errors.push(ConfigError::new(name, "must be a string or an object"));
            None
        }
    }
}

impl Definition {
    /// Checks a create body; `now_ms` is the default window's end.
    pub fn parse(body: &Value, now_ms: u64) -> Result<Definition, Vec<ConfigError>> {
        let Value::Object(map) = body else {
            return Err(vec![ConfigError::new("", "must be a JSON object")]);
        };
        let mut f = Fields { map, errors: Vec::new() };
        for key in map.keys() {
            if !FIELDS.iter().any(|(c, s)| c == key || s == key) {
                f.errors.push(ConfigError::new(key.as_str(), "unknown field"));
            }
        }
        let name = f.string("name", "name").map(|(_, s)| s);
        if let Some(n) = &name {
            if n.chars().count() > MAX_NAME {
                f.errors.push(ConfigError::new("name", format!("must be at most {MAX_NAME} characters")));
            }
        }
        let project = match (f.string("projectId", "project_id"), f.string("project", "project")) {
            (Some((_, a)), Some((_, b))) if a != b => {
                f.errors.push(ConfigError::new("project", "names another project than projectId"));
                None
            }
            (a, b) => a.or(b).map(|(_, s)| s),
        };
        let promote_to =
            f.string("routingConfig", "routing_config").map(|(_, s)| s.trim_start_matches('@').to_string());
        let inline = f.get("candidate", "candidate");
        let policy = f.string("candidatePolicy", "candidate_policy");
        let config = f.get("candidateConfig", "candidate_config");
        let (candidate, candidate_field) = match (inline, policy, config) {
            (Some((name, v)), None, None) => {
                let mut errors = std::mem::take(&mut f.errors);
                let c = candidate(name, v, &mut errors);
                f.errors = errors;
                (c, name)
            }
            (None, Some((_, policy)), config) => {
                let config = match config {
                    None => Some(Map::new()),
                    Some((_, Value::Object(m))) => Some(m.clone()),
                    Some((name, _)) => {
                        f.errors.push(ConfigError::new(name, "must be an object"));
                        None
                    }
                };
                (config.map(|config| CandidateSpec::Policy { policy, config }), "candidateConfig")
            }
            (None, None, Some((name, _))) => {
                f.errors.push(ConfigError::new(name, "needs candidatePolicy (the strategy) beside it"));
                (None, name)
            }
            (None, None, None) => {
                f.errors.push(ConfigError::new(
                    "candidate",
                    "is required: a routing-config body, \"@slug\", {\"routing_config\": \"@slug\", \"version\": n}, \
                     or candidatePolicy with candidateConfig",
                ));
                (None, "candidate")
            }
            (Some((name, _)), _, _) => {
                f.errors.push(ConfigError::new(
                    name,
                    "give candidate or candidatePolicy/candidateConfig, not both",
                ));
                (None, name)
            }
        };
        let filters = match f.get("filters", "filters") {
            Some((_, v)) => {
                let mut errors = std::mem::take(&mut f.errors);
                let out = filters(v, &mut errors);
                f.errors = errors;
                out
            }
            None => Filters::default(),
        };
        let mode = match f.string("mode", "mode") {
            None => Mode::RoutingOnly,
            Some((name, m)) => Mode::parse(&m).unwrap_or_else(|| {
                f.errors.push(ConfigError::new(name, "must be routing_only or with_responses"));
                Mode::RoutingOnly
            }),
        };
        let sample_size = match f.get("sampleSize", "sample_size") {
            None => None,
            Some((name, v)) => match v.as_u64() {
                Some(n) if (1..=super::MAX_SAMPLE as u64).contains(&n) => Some(n as usize),
                _ => {
                    f.errors.push(ConfigError::new(
                        name,
                        format!("must be a whole number from 1 to {}", super::MAX_SAMPLE),
                    ));
                    None
                }
            },
        };
        let concurrency = match f.get("concurrency", "concurrency") {
            None => None,
            Some((name, v)) => match v.as_u64() {
                Some(n) if (1..=super::live::MAX_CONCURRENCY as u64).contains(&n) => Some(n as usize),
                _ => {
                    f.errors.push(ConfigError::new(
                        name,
                        format!("must be a whole number from 1 to {}", super::live::MAX_CONCURRENCY),
                    ));
                    None
                }
            },
        };
        let similarity_threshold = match f.get("similarityThreshold", "similarity_threshold") {
            None => None,
            Some((name, v)) => match v.as_f64() {
                Some(t) if (-1.0..=1.0).contains(&t) => Some(t),
                _ => {
                    f.errors
                        .push(ConfigError::new(name, "must be a number from -1 to 1 (a cosine similarity)"));
                    None
                }
            },
        };
        if mode == Mode::RoutingOnly {
            for (camel, snake) in
                [("concurrency", "concurrency"), ("similarityThreshold", "similarity_threshold")]
            {
                if let Some((name, _)) = f.get(camel, snake) {
                    f.errors.push(ConfigError::new(name, "applies to mode with_responses only"));
                }
            }
        }
        let end = f.time("windowEnd", "window_end");
        let start = f.time("windowStart", "window_start");
        let hours = match f.get("windowHours", "window_hours") {
            None => None,
            Some((name, v)) => match v.as_f64() {
                Some(h) if h > 0.0 && h <= 24.0 * 366.0 => Some((name, (h * 3_600_000.0) as u64)),
                _ => {
                    f.errors.push(ConfigError::new(name, "must be a number of hours above 0"));
                    None
                }
            },
        };
        let window_end_ms = end.map_or(now_ms, |(_, e)| e);
        let window_start_ms = match (start, hours) {
            (Some(_), Some((name, _))) => {
                f.errors.push(ConfigError::new(name, "give windowStart or windowHours, not both"));
                0
            }
            (Some((_, s)), None) => s,
            (None, Some((_, h))) => window_end_ms.saturating_sub(h),
            (None, None) => window_end_ms.saturating_sub(DEFAULT_WINDOW_MS),
        };
        let start_name = start.map_or("windowStart", |(n, _)| n);
        let end_name = end.map_or("windowEnd", |(n, _)| n);
        if start.is_some() || end.is_some() {
            if window_start_ms > now_ms {
                f.errors.push(ConfigError::new(
                    start_name,
                    "is in the future: there is no traffic to replay yet",
                ));
            } else if window_start_ms >= window_end_ms {
                f.errors.push(ConfigError::new(
                    end_name,
                    "must be after the window's start (the window is empty)",
                ));
            }
        }
        let hypothesis = f.string("hypothesis", "hypothesis").map(|(_, s)| s);
        if hypothesis.as_ref().is_some_and(|h| h.chars().count() > MAX_HYPOTHESIS) {
            f.errors
                .push(ConfigError::new("hypothesis", format!("must be at most {MAX_HYPOTHESIS} characters")));
        }
        match candidate {
            Some(candidate) if f.errors.is_empty() => Ok(Definition {
                name,
                project,
                candidate,
                candidate_field,
                filters,
                mode,
                sample_size,
                window_start_ms,
                window_end_ms,
                hypothesis,
                promote_to,
                concurrency,
                similarity_threshold,
            }),
            _ => Err(f.errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_000_000_000;

    fn paths(body: Value) -> Vec<String> {
        Definition::parse(&body, NOW).unwrap_err().into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn both_spellings_and_the_documented_body() {
        let d = Definition::parse(
            &json!({
                "name": "switch to gpt-4o-mini", "projectId": "proj_abc", "candidatePolicy": "single",
                "candidateConfig": { "model": "gpt-4o-mini", "provider_credential_id": "pc_openai_default" },
                "windowStart": "2026-11-10T00:00:00Z", "windowEnd": "2026-11-17T00:00:00Z"
            }),
            NOW,
        )
        .unwrap();
        assert_eq!(d.project.as_deref(), Some("proj_abc"));
        assert!(matches!(d.candidate, CandidateSpec::Policy { ref policy, .. } if policy == "single"));
        assert_eq!(d.window_end_ms - d.window_start_ms, 7 * 86_400_000);
        let s = Definition::parse(
            &json!({
                "candidate": {"routing_config": "@production", "version": 2}, "project_id": "p",
                "window_start": 1_795_990_000_000u64, "sample_size": 10, "mode": "routing_only",
                "filters": {"routing_config": "@production", "tags": ["team=search"], "end_user_id": "u1"}
            }),
            NOW,
        )
        .unwrap();
        assert_eq!(s.candidate, CandidateSpec::Reference { slug: "production".into(), version: Some(2) });
        assert_eq!((s.window_start_ms, s.window_end_ms, s.sample_size), (1_795_990_000_000, NOW, Some(10)));
        assert_eq!(s.filters.tags, vec![("team".to_string(), "search".to_string())]);
        assert_eq!(s.filters.routing_config.as_deref(), Some("production"));
        let r = Definition::parse(&json!({"candidate": "@cheap@v3"}), NOW).unwrap();
        assert_eq!(r.candidate, CandidateSpec::Reference { slug: "cheap".into(), version: Some(3) });
        assert_eq!(r.window_end_ms - r.window_start_ms, DEFAULT_WINDOW_MS);
    }

    #[test]
    fn bad_bodies_name_their_field() {
        assert_eq!(paths(json!({})), ["candidate"]);
        assert_eq!(paths(json!({"candidate": "production"})), ["candidate"]);
        assert_eq!(paths(json!({"candidate": "@p", "sampleSize": 50_001})), ["sampleSize"]);
        assert_eq!(paths(json!({"candidate": "@p", "sample_size": 0})), ["sample_size"]);
        assert_eq!(paths(json!({"candidate": "@p", "mode": "live"})), ["mode"]);
        assert_eq!(paths(json!({"candidate": "@p", "windowStart": "yesterday"})), ["windowStart"]);
        assert_eq!(paths(json!({"candidate": "@p", "windowStart": "2099-01-01T00:00:00Z"})), ["windowStart"]);
        assert_eq!(
            paths(
                json!({"candidate": "@p", "window_start": "2026-11-10T00:00:00Z", "window_end": "2026-11-10T00:00:00Z"})
            ),
            ["window_end"]
        );
        assert_eq!(paths(json!({"candidate": "@p", "filters": {"colour": "red"}})), ["filters.colour"]);
        assert_eq!(paths(json!({"candidate": "@p", "bogus": 1})), ["bogus"]);
        assert_eq!(paths(json!({"candidate": "@p", "mode": "x", "sampleSize": -1})), ["mode", "sampleSize"]);
        assert_eq!(paths(json!({"candidateConfig": {"model": "m"}})), ["candidateConfig"]);
        assert_eq!(paths(json!({"candidate": "@p", "hypothesis": "x".repeat(2001)})), ["hypothesis"]);
        assert_eq!(paths(json!({"candidate": "@p", "windowStart": 1, "window_start": 2})), ["window_start"]);
    }
}
