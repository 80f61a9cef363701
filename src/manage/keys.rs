//! `/api-keys` (project keys, `mlx_sk_…`) and `/management-keys` (`mlx_mk_…`): list, get,
//! create (the plaintext appears in that answer only; the store keeps its SHA-256), patch
//! (name and rate limits), delete = revoke (the next request with it gets 401).

use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{self, Answer, ApiError, Call};
use super::ManageApp;
use crate::auth::{MANAGEMENT_KEY_PREFIX, PROJECT_KEY_PREFIX};
use crate::config::ConfigError;
use crate::state::{Kind, ListQuery, Stored};

/// `POST /api-keys`, `POST /management-keys`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyCreate {
    /// Project id or slug (project keys only).
    project: Option<String>,
    name: String,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
}

/// `PATCH /api-keys/{id}`, `PATCH /management-keys/{id}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    name: Option<String>,
    #[serde(default, deserialize_with = "api::nullable")]
    requests_per_minute: Option<Option<u64>>,
    #[serde(default, deserialize_with = "api::nullable")]
    tokens_per_minute: Option<Option<u64>>,
}

fn resource_name(kind: Kind) -> &'static str {
    kind.as_str()
}

fn prefix(kind: Kind) -> &'static str {
    if kind == Kind::ApiKey {
        PROJECT_KEY_PREFIX
    } else {
        MANAGEMENT_KEY_PREFIX
    }
}

/// What the API shows of a key: never the key nor its hash.
pub fn view(r: &Stored) -> Value {
    let mut v = json!({
        "id": r.id,
        "object": r.kind.as_str(),
        "name": r.slug,
        "key_prefix": prefix(r.kind),
        "key_last4": r.body.get("key_last4").cloned().unwrap_or(Value::Null),
        "requests_per_minute": r.body.get("requests_per_minute").cloned().unwrap_or(Value::Null),
        "version": r.version,
        "managed_by": "api",
        "created_at": api::time(r.created_ms),
        "updated_at": api::time(r.updated_ms),
        "revoked_at": api::opt_time(r.deleted_ms),
        "revoked": r.deleted_ms.is_some(),
    });
    if r.kind == Kind::ApiKey {
        v["project"] = json!(r.project);
        v["tokens_per_minute"] = r.body.get("tokens_per_minute").cloned().unwrap_or(Value::Null);
    }
    v
}

fn file_view(kind: Kind, project: &str, name: &str) -> Value {
    let id = if project.is_empty() { format!("file:{name}") } else { format!("file:{project}/{name}") };
    let mut v = json!({
        "id": id, "object": kind.as_str(), "name": name, "key_prefix": prefix(kind), "key_last4": null,
        "managed_by": "file", "created_at": null, "revoked": false,
    });
    if kind == Kind::ApiKey {
        v["project"] = json!(project);
    }
    v
}

fn check_name(name: &str, errors: &mut Vec<ConfigError>) {
    if name.trim().is_empty() || name.len() > 200 {
        errors.push(ConfigError::new("name", "must be 1 to 200 characters"));
    }
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, kind: Kind, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call, kind).await,
        ("POST", []) => return create(app, call, kind, path).await,
        ("GET", [id]) => get(app, call, kind, id).await,
        ("PATCH", [id]) => return patch(app, call, kind, path, id).await,
        ("DELETE", [id]) => return revoke(app, call, kind, path, id).await,
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

/// File keys of `kind` (and of `project`, when given), in file order.
fn file_keys(snapshot: &crate::config::Snapshot, kind: Kind, project: Option<&str>) -> Vec<Value> {
    if kind == Kind::ApiKey {
        let keys = snapshot.file_owned.keys.iter();
        keys.filter(|(p, _)| project.is_none_or(|want| want == p))
            .map(|(p, n)| file_view(kind, p, n))
            .collect()
    } else if project.is_none() {
        snapshot.file_owned.management_keys.iter().map(|n| file_view(kind, "", n)).collect()
    } else {
        Vec::new()
    }
}

/// `?project=` as the slug keys are stored under.
async fn project_param(app: &ManageApp, call: &Call<'_>, kind: Kind) -> Result<Option<String>, ApiError> {
    let Some(p) = call.param("project").or_else(|| call.param("project_id")) else { return Ok(None) };
    if kind != Kind::ApiKey {
        return Err(ApiError::bad_request("invalid_request", "management keys belong to no project"));
    }
    if app.store.load().file_owned.projects.contains(&p) {
        return Ok(Some(p));
    }
    match app.state.get(Kind::Project, &p, "").await.map_err(|e| ApiError::unavailable(&e))? {
        Some(r) => Ok(Some(r.slug)),
        None => Err(ApiError::not_found("project", &p)),
    }
}

async fn list(app: &ManageApp, call: &Call<'_>, kind: Kind) -> Result<Answer, ApiError> {
    let project = project_param(app, call, kind).await?;
    let include_deleted = call.param("include_revoked").is_some_and(|v| v == "true" || v == "1");
    let file = file_keys(&app.store.load(), kind, project.as_deref());
    let query = ListQuery { project, include_deleted, ..Default::default() };
    api::list_page(&*app.state, call, kind, file, query, view).await
}

async fn get(app: &ManageApp, call: &Call<'_>, kind: Kind, key: &str) -> Result<Answer, ApiError> {
    let project = project_param(app, call, kind).await?.unwrap_or_default();
    match app.state.get(kind, key, &project).await.map_err(|e| ApiError::unavailable(&e))? {
        Some(r) if r.kind == kind => Ok(Answer::data(200, view(&r))),
        _ => Err(ApiError::not_found(resource_name(kind), key)),
    }
}

async fn create(app: &ManageApp, call: &Call<'_>, kind: Kind, path: &str) -> Answer {
    let input: KeyCreate = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    let mut errors = Vec::new();
    check_name(&input.name, &mut errors);
    match (kind, &input.project) {
        (Kind::ApiKey, None) => {
            errors.push(ConfigError::new("project", "is required (the project's id or slug)"))
        }
        (Kind::ManagementKey, Some(_)) => {
            errors.push(ConfigError::new("project", "management keys belong to no project"))
        }
        _ => {}
    }
    if !errors.is_empty() {
        return ApiError::invalid(errors).into_answer();
    }
    let name = input.name.trim().to_string();
    let lock = format!("{}:{}:{name}", kind.as_str(), input.project.as_deref().unwrap_or_default());
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let project = match input.project.as_deref() {
            None => String::new(),
            Some(p) => match api::find_project(current, snapshot, p) {
                Some(api::Found::Api(r)) => r.slug.clone(),
                Some(api::Found::File(slug)) => slug,
                None => return Err(ApiError::not_found("project", p)),
            },
        };
        let taken = current.iter().any(|r| r.kind == kind && r.project == project && r.slug == name)
            || if kind == Kind::ApiKey {
                snapshot.file_owned.keys.iter().any(|(p, n)| *p == project && *n == name)
            } else {
                snapshot.file_owned.management_keys.contains(&name)
            };
        if taken {
            return Err(ApiError::conflict(
                "key_exists",
                resource_name(kind),
                &name,
                format!(
                    "a key named \"{name}\" already exists here; names identify keys in traces and limits"
                ),
            ));
        }
        let secret = format!("{}{}", prefix(kind), Alphanumeric.sample_string(&mut rand::rng(), 40));
        let body = json!({
            "name": name,
            "key_sha256": hex::encode(crate::auth::digest(&secret)),
            "key_last4": &secret[secret.len() - 4..],
            "requests_per_minute": input.requests_per_minute,
            "tokens_per_minute": input.tokens_per_minute,
        });
        let r = api::new_resource(kind, project, name.clone(), body);
        let mut plan = api::create_plan(call, r, &format!("{}.created", kind.as_str()), view);
        // The plaintext is in this answer only (not in the audit entry's copy).
        plan.data["key"] = json!(secret);
        plan.secret_fields = &["key"];
        Ok(plan)
    })
    .await
}

/// The live API key `key` (id, or name within `?project=`), or the error to answer.
fn editable<'a>(
    current: &'a [Stored],
    kind: Kind,
    key: &str,
    call: &Call<'_>,
) -> Result<&'a Stored, ApiError> {
    let project = call.param("project").unwrap_or_default();
    if project.is_empty() && current.iter().filter(|r| r.kind == kind && r.slug == key).nth(1).is_some() {
        return Err(ApiError::conflict(
            "ambiguous_key_name",
            resource_name(kind),
            key,
            format!("more than one project has a key named \"{key}\"; name the project (?project=) or use the key's id"),
        ));
    }
    api::editable(current, resource_name(kind), key, key.starts_with("file:"), call, |r| {
        r.kind == kind && (r.id == key || (r.slug == key && (r.project == project || project.is_empty())))
    })
}

async fn patch(app: &ManageApp, call: &Call<'_>, kind: Kind, path: &str, key: &str) -> Answer {
    let input: KeyPatch = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    if let Some(name) = &input.name {
        let mut errors = Vec::new();
        check_name(name, &mut errors);
        if !errors.is_empty() {
            return ApiError::invalid(errors).into_answer();
        }
    }
    let lock = format!("{}:{key}", kind.as_str());
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, _| {
        let old = editable(current, kind, key, call)?;
        let mut new = api::next_version(old, old.body.clone());
        if let Some(name) = &input.name {
            let name = name.trim();
            if current
                .iter()
                .any(|r| r.kind == kind && r.project == old.project && r.slug == name && r.id != old.id)
            {
                return Err(ApiError::conflict(
                    "key_exists",
                    resource_name(kind),
                    name,
                    format!("a key named \"{name}\" already exists here"),
                ));
            }
            new.slug = name.to_string();
            new.body["name"] = json!(name);
        }
        if let Some(rpm) = input.requests_per_minute {
            new.body["requests_per_minute"] = json!(rpm);
        }
        if let Some(tpm) = input.tokens_per_minute {
            new.body["tokens_per_minute"] = json!(tpm);
        }
        Ok(api::update_plan(call, old, new, &format!("{}.updated", kind.as_str()), view))
    })
    .await
}

async fn revoke(app: &ManageApp, call: &Call<'_>, kind: Kind, path: &str, key: &str) -> Answer {
    let lock = format!("{}:{key}", kind.as_str());
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, _| {
        let old = editable(current, kind, key, call)?;
        Ok(api::delete_plan(call, old, &format!("{}.revoked", kind.as_str()), view))
    })
    .await
}
