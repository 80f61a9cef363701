//! `/projects` (PRODUCT.md §1.6): list, get, create, patch, soft delete. Projects of the
//! config file are listed with `managed_by: file` and are read-only here.

use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{self, Answer, ApiError, Call};
use super::ManageApp;
use crate::config::{ConfigError, Snapshot};
use crate::state::{Kind, ListQuery, Stored};

/// `POST /projects`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectCreate {
    name: String,
    slug: Option<String>,
    description: Option<String>,
    /// The project's default response cache (a routing config's own `cache:` wins).
    #[schema(value_type = Option<Object>)]
    cache: Option<Value>,
}

/// `PATCH /projects/{id}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectPatch {
    name: Option<String>,
    #[serde(default, deserialize_with = "api::nullable")]
    description: Option<Option<String>>,
    /// `null` removes the default.
    #[serde(default, deserialize_with = "api::nullable")]
    #[schema(value_type = Option<Object>)]
    cache: Option<Option<Value>>,
}

/// Checks a `cache` body as a routing config's `cache:` is checked; errors name `cache.…`.
fn check_cache(v: &Value, errors: &mut Vec<ConfigError>) {
    match serde_json::from_value::<crate::config::cache::RawCache>(v.clone()) {
        Ok(raw) => {
            crate::config::cache::settings(raw, "cache", errors);
        }
        Err(e) => errors.push(ConfigError::new("cache", e.to_string())),
    }
}

pub fn view(r: &Stored) -> Value {
    json!({
        "id": r.id,
        "object": "project",
        "name": r.body.get("name").cloned().unwrap_or(Value::Null),
        "slug": r.slug,
        "description": r.body.get("description").cloned().unwrap_or(Value::Null),
        "cache": r.body.get("cache").cloned().unwrap_or(Value::Null),
        "version": r.version,
        "managed_by": "api",
        "created_at": api::time(r.created_ms),
        "updated_at": api::time(r.updated_ms),
        "deleted_at": api::opt_time(r.deleted_ms),
    })
}

fn file_view(slug: &str) -> Value {
    json!({
        "id": slug, "object": "project", "name": slug, "slug": slug, "description": null,
        "version": null, "managed_by": "file", "created_at": null, "updated_at": null, "deleted_at": null,
    })
}

/// `name` → `slug`: lowercase letters and digits, other runs as one `-`.
fn slugify(name: &str) -> String {
    let mut out = String::new();
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').chars().take(64).collect()
}

fn check_name(name: &str, errors: &mut Vec<ConfigError>) {
    if name.trim().is_empty() || name.len() > 200 {
        errors.push(ConfigError::new("name", "must be 1 to 200 characters"));
    }
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call).await,
        ("POST", []) => return create(app, call, path).await,
        ("GET", [id]) => get(app, id).await,
        ("PATCH", [id]) => return patch(app, call, path, id).await,
        ("DELETE", [id]) => return delete(app, call, path, id).await,
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let include_deleted = call.param("include_deleted").is_some_and(|v| v == "true" || v == "1");
    let file = app.store.load().file_owned.projects.iter().map(|p| file_view(p)).collect();
    let query = ListQuery { include_deleted, ..Default::default() };
    api::list_page(&*app.state, call, Kind::Project, file, query, view).await
}

async fn get(app: &ManageApp, key: &str) -> Result<Answer, ApiError> {
    match app.state.get(Kind::Project, key, "").await.map_err(|e| ApiError::unavailable(&e))? {
        Some(r) => Ok(Answer::data(200, view(&r))),
        None if app.store.load().file_owned.projects.iter().any(|p| p == key) => {
            Ok(Answer::data(200, file_view(key)))
        }
        None => Err(ApiError::not_found("project", key)),
    }
}

async fn create(app: &ManageApp, call: &Call<'_>, path: &str) -> Answer {
    let input: ProjectCreate = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    let mut errors = Vec::new();
    check_name(&input.name, &mut errors);
    if let Some(c) = &input.cache {
        check_cache(c, &mut errors);
    }
    let slug = input.slug.clone().unwrap_or_else(|| slugify(&input.name));
    if !crate::config::valid_id(&slug) {
        let field = if input.slug.is_some() { "slug" } else { "name" };
        errors.push(ConfigError::new(field, format!("the slug \"{slug}\" {}", crate::config::ID_RULE)));
    }
    if !errors.is_empty() {
        return ApiError::invalid(errors).into_answer();
    }
    let lock = format!("project:{slug}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        if api::find_project(current, snapshot, &slug).is_some() {
            return Err(ApiError::conflict(
                "project_exists",
                "project",
                &slug,
                format!("a project with slug \"{slug}\" already exists"),
            ));
        }
        let mut body = json!({ "name": input.name.trim(), "description": input.description });
        if let Some(c) = &input.cache {
            body["cache"] = c.clone();
        }
        let r = api::new_resource(Kind::Project, String::new(), slug.clone(), body);
        Ok(api::create_plan(call, r, "project.created", view))
    })
    .await
}

/// The live API project `key` (id or slug) names, or the error to answer.
fn editable<'a>(
    current: &'a [Stored],
    snapshot: &Snapshot,
    key: &str,
    call: &Call<'_>,
) -> Result<&'a Stored, ApiError> {
    let in_file = snapshot.file_owned.projects.iter().any(|s| s == key);
    api::editable_named(current, Kind::Project, key, in_file, call)
}

async fn patch(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let input: ProjectPatch = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    let mut errors = Vec::new();
    if let Some(name) = &input.name {
        check_name(name, &mut errors);
    }
    if let Some(Some(c)) = &input.cache {
        check_cache(c, &mut errors);
    }
    if !errors.is_empty() {
        return ApiError::invalid(errors).into_answer();
    }
    let lock = format!("project:{key}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = editable(current, snapshot, key, call)?;
        let mut body = old.body.clone();
        if let Some(name) = &input.name {
            body["name"] = json!(name.trim());
        }
        if let Some(description) = &input.description {
            body["description"] = json!(description);
        }
        match &input.cache {
            Some(Some(c)) => body["cache"] = c.clone(),
            Some(None) => {
                if let Value::Object(m) = &mut body {
                    m.remove("cache");
                }
            }
            None => {}
        }
        Ok(api::update_plan(call, old, api::next_version(old, body), "project.updated", view))
    })
    .await
}

async fn delete(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let lock = format!("project:{key}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = editable(current, snapshot, key, call)?;
        let mut plan = api::delete_plan(call, old, "project.deleted", view);
        // Its keys are revoked with it, in the same transaction.
        for k in current.iter().filter(|r| r.kind == Kind::ApiKey && r.project == old.slug) {
            plan.changes.push(api::delete_change(call, k, "api_key.revoked", super::keys::view));
        }
        Ok(plan)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::slugify;

    #[test]
    fn slugs_from_names() {
        assert_eq!(slugify("Staging"), "staging");
        assert_eq!(slugify("  My App: EU / prod "), "my-app-eu-prod");
        assert_eq!(slugify("ÄÖ"), "");
    }
}
