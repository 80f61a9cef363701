//! `cache:` of a routing config or a project (PRODUCT.md §7), checked into the settings
//! the request path reads (`crate::cache::CacheSettings`).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::cache::{CacheSettings, Mode, DEFAULT_MAX_ENTRY_BYTES, DEFAULT_THRESHOLD, DEFAULT_TTL};

/// `cache:` as written in YAML or sent to the management API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// `exact` or `semantic`; `off` (or `enabled: false`) turns a project default off.
    pub mode: Option<String>,
    pub enabled: Option<bool>,
    pub ttl_seconds: Option<u64>,
    pub threshold: Option<f64>,
    pub allow_nonzero_temperature: Option<bool>,
    pub allow_tools: Option<bool>,
    pub max_entry_bytes: Option<usize>,
    /// `mode: semantic`: the model that embeds prompts (else `cache.embedding_model`).
    pub embedding_model: Option<String>,
}

/// The settings of a `cache:` body, or `None` when caching is off; errors name their field
/// under `path`.
pub fn settings(raw: RawCache, path: &str, errors: &mut Vec<ConfigError>) -> Option<CacheSettings> {
    let mode = match raw.mode.as_deref() {
        None | Some("exact") => Mode::Exact,
        Some("off") => return None,
        Some("semantic") => Mode::Semantic,
        Some(other) => {
            errors.push(ConfigError::new(
                format!("{path}.mode"),
                format!("unknown mode \"{other}\" (exact, semantic, off)"),
            ));
            return None;
        }
    };
    if raw.enabled == Some(false) {
        return None;
    }
    let ttl = match raw.ttl_seconds {
        None => DEFAULT_TTL,
        Some(0) => {
            errors.push(ConfigError::new(format!("{path}.ttl_seconds"), "must be greater than 0"));
            return None;
        }
        Some(s) if s > 366 * 86_400 => {
            errors.push(ConfigError::new(format!("{path}.ttl_seconds"), "must be at most a year (31622400)"));
            return None;
        }
        Some(s) => Duration::from_secs(s),
    };
    let threshold = match raw.threshold {
        None => DEFAULT_THRESHOLD,
        Some(t) if t > 0.0 && t <= 1.0 => t,
        Some(_) => {
            errors.push(ConfigError::new(format!("{path}.threshold"), "must be above 0 and at most 1"));
            return None;
        }
    };
    let max_entry_bytes = match raw.max_entry_bytes {
        None => DEFAULT_MAX_ENTRY_BYTES,
        Some(0) => {
            errors.push(ConfigError::new(format!("{path}.max_entry_bytes"), "must be greater than 0"));
            return None;
        }
        Some(n) => n,
    };
    let embedding_model = match raw.embedding_model.as_deref().map(str::trim) {
        Some("") => {
            errors.push(ConfigError::new(format!("{path}.embedding_model"), "must not be empty"));
            return None;
        }
        other => other.map(str::to_string),
    };
    Some(CacheSettings {
        mode,
        ttl,
        threshold,
        allow_nonzero_temperature: raw.allow_nonzero_temperature.unwrap_or(false),
        allow_tools: raw.allow_tools.unwrap_or(false),
        max_entry_bytes,
        embedding_model,
    })
}

/// Completes a semantic `cache:` with the gateway's `cache.embedding_model` and checks the
/// model resolves to a configured provider (errors under `path`).
pub fn resolve_embedding_model(
    settings: &mut CacheSettings,
    default: Option<&str>,
    providers: &std::collections::HashMap<String, std::sync::Arc<crate::providers::Provider>>,
    path: &str,
    errors: &mut Vec<ConfigError>,
) {
    if settings.mode != Mode::Semantic {
        return;
    }
    let Some(model) = settings.embedding_model.clone().or_else(|| default.map(str::to_string)) else {
        errors.push(ConfigError::new(
            format!("{path}.embedding_model"),
            "is required with mode semantic (here or as cache.embedding_model)",
        ));
        return;
    };
    if let Err(e) = crate::providers::resolve_model(providers, &model) {
        errors.push(ConfigError::new(format!("{path}.embedding_model"), e.to_string()));
        return;
    }
    settings.embedding_model = Some(model);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_are_checked_field_by_field() {
        let mut errors = Vec::new();
        let raw: RawCache = serde_json::from_value(json!({"mode": "exact", "ttl_seconds": 60})).unwrap();
        let s = settings(raw, "c", &mut errors).unwrap();
        assert_eq!((s.ttl, s.threshold, s.max_entry_bytes), (Duration::from_secs(60), 0.95, 1 << 20));
        let off: RawCache = serde_json::from_value(json!({"mode": "off"})).unwrap();
        assert!(settings(off, "c", &mut errors).is_none());
        assert!(errors.is_empty());
        let raw: RawCache = serde_json::from_value(json!({"mode": "warp", "ttl_seconds": 0})).unwrap();
        assert!(settings(raw, "c", &mut errors).is_none());
        assert_eq!(errors[0].path, "c.mode");
    }
}
