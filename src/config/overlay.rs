//! Resources from the state store, laid over the file's: the snapshot is built from both.
//! Each resource has one owner. A project slug or key name defined in both places is an
//! error naming both; an empty store leaves the file's config exactly as it is.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use super::raw::{RawBudget, RawConfig, RawKey, RawProject, RawProvider};
use super::ConfigError;
use crate::state::secrets::MasterKey;
use crate::state::{Kind, Stored};

/// A provider's stored body: its YAML entry, with the key sealed under the master key.
#[derive(Debug, Deserialize)]
struct StoredProvider {
    kind: String,
    base_url: Option<String>,
    api_version: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    api_key_enc: Option<String>,
}

/// A key's stored body: what the snapshot needs, never the plaintext.
#[derive(Debug, Deserialize)]
struct StoredKey {
    name: String,
    key_sha256: String,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
}

fn key_from(r: &Stored, errors: &mut Vec<ConfigError>) -> Option<RawKey> {
    match StoredKey::deserialize(&r.body) {
        Ok(k) => Some(RawKey {
            name: k.name,
            key: None,
            key_sha256: Some(k.key_sha256),
            requests_per_minute: k.requests_per_minute,
            tokens_per_minute: k.tokens_per_minute,
        }),
        Err(e) => {
            errors.push(ConfigError::new(format!("state.{}s[{}]", r.kind.as_str(), r.id), e.to_string()));
            None
        }
    }
}

/// Adds the store's live resources to `raw`, reporting clashes with the file's. Provider
/// keys are decrypted with `master` here, and only here.
pub fn apply(raw: &mut RawConfig, resources: &[Stored], master: Option<&MasterKey>) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for r in resources.iter().filter(|r| r.kind == Kind::Provider) {
        let path = format!("state.providers[{}]", r.slug);
        if raw.providers.iter().any(|p| p.id == r.slug) {
            errors.push(ConfigError::new(
                &path,
                format!(
                    "provider \"{}\" is defined both in the config file and in the state store ({})",
                    r.slug, r.id
                ),
            ));
            continue;
        }
        let stored = match StoredProvider::deserialize(&r.body) {
            Ok(p) => p,
            Err(e) => {
                errors.push(ConfigError::new(&path, e.to_string()));
                continue;
            }
        };
        let api_key = match (&stored.api_key_enc, master) {
            (None, _) => None,
            (Some(sealed), Some(m)) => match m.decrypt(sealed) {
                Ok(k) => Some(k),
                Err(e) => {
                    errors.push(ConfigError::new(
                        format!("{path}.api_key"),
                        format!("{e} (was the master key changed?)"),
                    ));
                    continue;
                }
            },
            (Some(_), None) => {
                errors.push(ConfigError::new(format!("{path}.api_key"), "no master key to decrypt it with"));
                continue;
            }
        };
        raw.providers.push(RawProvider {
            id: r.slug.clone(),
            kind: stored.kind,
            base_url: stored.base_url,
            api_key,
            tls_ca_file: None,
            api_version: stored.api_version,
            models: stored.models,
        });
    }
    let file_projects = raw.projects.len();
    for r in resources.iter().filter(|r| r.kind == Kind::Project) {
        if let Some(i) = raw.projects[..file_projects].iter().position(|p| p.id == r.slug) {
            errors.push(ConfigError::new(
                format!("projects[{i}].id"),
                format!(
                    "project \"{}\" is defined both in the config file and in the state store ({})",
                    r.slug, r.id
                ),
            ));
            continue;
        }
        // Its stored body was checked when it was written.
        let cache =
            r.body.get("cache").filter(|v| !v.is_null()).and_then(|v| serde_json::from_value(v.clone()).ok());
        raw.projects.push(RawProject { id: r.slug.clone(), keys: Vec::new(), cache });
    }
    // Indexes, not scans: a store may hold tens of thousands of keys.
    let project_at: HashMap<String, usize> =
        raw.projects.iter().enumerate().map(|(i, p)| (p.id.clone(), i)).collect();
    let mut names: HashSet<(usize, String)> = raw
        .projects
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.keys.iter().map(move |k| (i, k.name.clone())))
        .collect();
    for r in resources.iter().filter(|r| r.kind == Kind::ApiKey) {
        // The keys of a deleted project are not in the snapshot: they stop working.
        let Some(&i) = project_at.get(&r.project) else { continue };
        if !names.insert((i, r.slug.clone())) {
            errors.push(ConfigError::new(
                format!("projects[{}].keys", r.project),
                format!(
                    "key \"{}\" is defined both in the config file and in the state store ({})",
                    r.slug, r.id
                ),
            ));
            continue;
        }
        if let Some(key) = key_from(r, &mut errors) {
            raw.projects[i].keys.push(key);
        }
    }
    for r in resources.iter().filter(|r| r.kind == Kind::ManagementKey) {
        if let Some(j) = raw.management_keys.iter().position(|k| k.name == r.slug) {
            errors.push(ConfigError::new(
                format!("management_keys[{j}].name"),
                format!(
                    "management key \"{}\" is defined both in the config file and in the state store ({})",
                    r.slug, r.id
                ),
            ));
            continue;
        }
        if let Some(key) = key_from(r, &mut errors) {
            raw.management_keys.push(key);
        }
    }
    for r in resources.iter().filter(|r| r.kind == Kind::Budget) {
        if let Some(i) = raw.budgets.iter().position(|b| b.name == r.slug) {
            errors.push(ConfigError::new(
                format!("budgets[{i}].name"),
                format!(
                    "budget \"{}\" is defined both in the config file and in the state store ({})",
                    r.slug, r.id
                ),
            ));
            continue;
        }
        match RawBudget::deserialize(&r.body) {
            Ok(b) => raw.budgets.push(b),
            Err(e) => errors.push(ConfigError::new(format!("budgets.{}", r.slug), e.to_string())),
        }
    }
    for r in resources.iter().filter(|r| r.kind == Kind::RoutingConfig) {
        if raw.routing_configs.contains_key(&r.slug) {
            errors.push(ConfigError::new(
                format!("routing_configs.{}", r.slug),
                format!(
                    "routing config \"{}\" is defined both in the config file and in the state store ({})",
                    r.slug, r.id
                ),
            ));
            continue;
        }
        match serde_yaml_ng::to_value(&r.body) {
            Ok(v) => {
                raw.routing_configs.insert(r.slug.clone(), v);
                raw.pinned_versions.insert(r.slug.clone(), u32::try_from(r.version).unwrap_or(u32::MAX));
            }
            Err(e) => errors.push(ConfigError::new(format!("routing_configs.{}", r.slug), e.to_string())),
        }
    }
    errors
}
