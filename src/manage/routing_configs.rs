//! `/routing-configs` (PRODUCT.md §4.9): versioned routing configs. The body is the YAML
//! entry plus `slug` (and `project`, which the entry already has). Every save is a new
//! version and becomes active; `rollback` makes a new version equal to an old one; versions
//! can be listed, read and diffed. Configs of the file are listed read-only.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::api::{self, Answer, ApiError, Call, Plan};
use super::ManageApp;
use crate::config::{ConfigError, Snapshot};
use crate::state::{Kind, ListQuery, Stored, Version};

const RESOURCE: &str = "routing_config";

/// Fields the API adds to the YAML entry (never stored in the body).
const VIEW_FIELDS: &[&str] = &["id", "object", "slug", "version", "managed_by", "created_at", "updated_at"];

pub fn view(r: &Stored) -> Value {
    let mut v = r.body.clone();
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), json!(r.id));
        m.insert("object".into(), json!(RESOURCE));
        m.insert("slug".into(), json!(r.slug));
        m.insert("version".into(), json!(r.version));
        m.insert("managed_by".into(), json!("api"));
        m.insert("created_at".into(), api::time(r.created_ms));
        m.insert("updated_at".into(), api::time(r.updated_ms));
    }
    v
}

/// A file config as the API shows it: its definition, slug and the version being served.
fn file_view(snapshot: &Snapshot, slug: &str) -> Option<Value> {
    let rc = snapshot.routing_configs.get(slug)?;
    let mut v: Value = serde_json::from_str(&rc.definition).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), json!(slug));
        m.insert("object".into(), json!(RESOURCE));
        m.insert("slug".into(), json!(slug));
        m.insert("version".into(), json!(rc.version));
        m.insert("managed_by".into(), json!("file"));
        m.insert("created_at".into(), Value::Null);
        m.insert("updated_at".into(), Value::Null);
    }
    Some(v)
}

fn version_view(r: &Stored, v: &Version) -> Value {
    json!({
        "routing_config_id": r.id,
        "slug": r.slug,
        "version": v.version,
        "active": v.version == r.version && r.deleted_ms.is_none(),
        "deleted": v.deleted,
        "created_at": api::time(v.created_ms),
        "actor": { "type": v.actor_kind, "id": v.actor_id },
        "config": v.body,
    })
}

/// Splits a create body into its slug and the YAML entry (an object with `project` and
/// `strategy`), with every problem's path.
fn entry(body: &[u8], slug_required: bool) -> Result<(Option<String>, Map<String, Value>), ApiError> {
    let value: Value = api::body(body)?;
    let Value::Object(mut map) = value else {
        return Err(ApiError::invalid(vec![ConfigError::new("", "must be a JSON object")]));
    };
    for f in VIEW_FIELDS.iter().filter(|f| **f != "slug") {
        // Read-only fields sent back unchanged (a GET answer edited and PATCHed) are ignored.
        map.remove(*f);
    }
    let slug = match map.remove("slug") {
        Some(Value::String(s)) => Some(s.trim_start_matches('@').to_string()),
        Some(_) => return Err(ApiError::invalid(vec![ConfigError::new("slug", "must be a string")])),
        None if slug_required => {
            return Err(ApiError::invalid(vec![ConfigError::new("slug", "is required")]))
        }
        None => None,
    };
    if let Some(s) = &slug {
        if !crate::config::valid_id(s) {
            return Err(ApiError::invalid(vec![ConfigError::new("slug", crate::config::ID_RULE)]));
        }
    }
    Ok((slug, map))
}

/// The project an entry names, as its slug.
fn project_of(
    map: &mut Map<String, Value>,
    current: &[Stored],
    snapshot: &Snapshot,
) -> Result<String, ApiError> {
    let Some(p) = map.get("project") else {
        return Err(ApiError::invalid(vec![ConfigError::new("project", "is required")]));
    };
    let Some(p) = p.as_str() else {
        return Err(ApiError::invalid(vec![ConfigError::new("project", "must be a string")]));
    };
    let slug = match api::find_project(current, snapshot, p) {
        Some(api::Found::Api(r)) => r.slug.clone(),
        Some(api::Found::File(slug)) => slug,
        None => {
            return Err(ApiError::invalid(vec![ConfigError::new(
                "project",
                format!("unknown project \"{p}\""),
            )]))
        }
    };
    map.insert("project".into(), json!(slug));
    Ok(slug)
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call).await,
        ("POST", []) => return create(app, call, path).await,
        ("POST", ["validate"]) => validate(app, call).await,
        ("GET", [id]) => get(app, id).await,
        ("PATCH", [id]) => return patch(app, call, path, id).await,
        ("DELETE", [id]) => return delete(app, call, path, id).await,
        ("GET", [id, "versions"]) => versions(app, id).await,
        ("GET", [id, "versions", "diff"]) => diff(app, call, id).await,
        ("GET", [id, "versions", n]) => one_version(app, id, n).await,
        ("POST", [id, "rollback"]) => return rollback(app, call, path, id).await,
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let snapshot = app.store.load();
    let project = match call.param("project").or_else(|| call.param("project_id")) {
        None => None,
        Some(p) if snapshot.file_owned.projects.contains(&p) => Some(p),
        Some(p) => match app.state.get(Kind::Project, &p, "").await.map_err(|e| ApiError::unavailable(&e))? {
            Some(r) => Some(r.slug),
            None => return Err(ApiError::not_found("project", &p)),
        },
    };
    let in_project = |s: &&String| {
        project
            .as_ref()
            .is_none_or(|p| snapshot.routing_configs.get(s.as_str()).is_some_and(|rc| rc.project == *p))
    };
    let file: Vec<Value> = snapshot
        .file_owned
        .routing_configs
        .iter()
        .filter(in_project)
        .filter_map(|s| file_view(&snapshot, s))
        .collect();
    let query = ListQuery { project, ..Default::default() };
    api::list_page(&*app.state, call, Kind::RoutingConfig, file, query, view).await
}

/// The stored config `key` names (id, slug or `@slug`), deleted ones included.
pub(super) async fn stored(app: &ManageApp, key: &str) -> Result<Option<Stored>, ApiError> {
    let key = key.trim_start_matches('@');
    let by_id = app.state.get(Kind::RoutingConfig, key, "").await.map_err(|e| ApiError::unavailable(&e))?;
    if by_id.is_some() {
        return Ok(by_id);
    }
    // Slugs are unique across projects among live configs: find the live one.
    let query = ListQuery { limit: 10_000, ..Default::default() };
    let all = app.state.list(Kind::RoutingConfig, &query).await.map_err(|e| ApiError::unavailable(&e))?;
    Ok(all.into_iter().find(|r| r.slug == key))
}

async fn get(app: &ManageApp, key: &str) -> Result<Answer, ApiError> {
    if let Some(r) = stored(app, key).await? {
        return Ok(Answer::data(200, view(&r)));
    }
    let slug = key.trim_start_matches('@');
    match file_view(&app.store.load(), slug) {
        Some(v) => Ok(Answer::data(200, v)),
        None => Err(ApiError::not_found(RESOURCE, key)),
    }
}

/// `POST …/validate`: the draft checked as the whole config would be, nothing saved.
async fn validate(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let (slug, mut map) = entry(call.body, false)?;
    let staged = app.store.stage().await;
    let current = staged.resources();
    let snapshot = app.store.load();
    let project = project_of(&mut map, &current, &snapshot)?;
    let slug = slug.unwrap_or_else(|| "draft".into());
    let mut candidate: Vec<Stored> =
        current.iter().filter(|r| !(r.kind == Kind::RoutingConfig && r.slug == slug)).cloned().collect();
    let in_file = snapshot.file_owned.routing_configs.contains(&slug);
    let check_slug = if in_file { format!("{slug}.draft") } else { slug.clone() };
    let now = api::now_ms();
    candidate.push(Stored {
        kind: Kind::RoutingConfig,
        id: "draft".into(),
        project,
        slug: check_slug.clone(),
        body: Value::Object(map),
        version: 1,
        seq: 0,
        created_ms: now,
        updated_ms: now,
        deleted_ms: None,
    });
    match staged.build(&candidate) {
        Ok(_) => Ok(Answer::data(200, json!({ "valid": true, "errors": [] }))),
        Err(errors) => Ok(ApiError::invalid(errors).into_answer().map_validation(&check_slug)),
    }
}

async fn create(app: &ManageApp, call: &Call<'_>, path: &str) -> Answer {
    let (slug, map) = match entry(call.body, true) {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    let slug = slug.unwrap_or_default();
    let lock = format!("{RESOURCE}:{slug}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let mut map = map;
        let project = project_of(&mut map, current, snapshot)?;
        if snapshot.file_owned.routing_configs.contains(&slug)
            || current.iter().any(|r| r.kind == Kind::RoutingConfig && r.slug == slug)
        {
            return Err(ApiError::conflict(
                "routing_config_exists",
                RESOURCE,
                &slug,
                format!("a routing config @{slug} already exists"),
            ));
        }
        let r = api::new_resource(Kind::RoutingConfig, project, slug.clone(), Value::Object(map));
        Ok(api::create_plan(call, r, "routing_config.created", view))
    })
    .await
    .map_validation(&slug)
}

/// The live API config `key` (id, slug or `@slug`) names, or the error to answer.
fn editable<'a>(
    current: &'a [Stored],
    snapshot: &Snapshot,
    key: &str,
    call: &Call<'_>,
) -> Result<&'a Stored, ApiError> {
    let key = key.trim_start_matches('@');
    let in_file = snapshot.file_owned.routing_configs.iter().any(|s| s == key);
    api::editable_named(current, Kind::RoutingConfig, key, in_file, call)
}

/// `old` with `patch` applied as a JSON merge patch (RFC 7396: `null` removes a field). A
/// patch that changes `strategy` replaces the strategy's fields instead of merging into them.
fn merged(old: &Value, patch: Map<String, Value>) -> Value {
    let strategy_changes =
        patch.get("strategy").is_some_and(|s| Some(s) != old.get("strategy") && !s.is_null());
    let mut out = if strategy_changes {
        json!({ "project": old.get("project").cloned().unwrap_or(Value::Null) })
    } else {
        old.clone()
    };
    json_patch::merge(&mut out, &Value::Object(patch));
    out
}

/// A new active version of `old` with `body` (PATCH and rollback).
fn new_version(call: &Call<'_>, old: &Stored, body: Value, action: &str) -> Plan {
    api::update_plan(call, old, api::next_version(old, body), action, view)
}

async fn patch(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let (slug, map) = match entry(call.body, false) {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    let key_slug = key.trim_start_matches('@').to_string();
    let lock = format!("{RESOURCE}:{key_slug}");
    let mut error_slug = key_slug.clone();
    let answer =
        api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
            let old = editable(current, snapshot, key, call)?;
            error_slug = old.slug.clone();
            if slug.as_ref().is_some_and(|s| *s != old.slug) {
                return Err(ApiError::invalid(vec![ConfigError::new(
                    "slug",
                    "cannot be changed; create a new config",
                )]));
            }
            let mut body = merged(&old.body, map);
            if let Value::Object(m) = &mut body {
                if m.get("project") != old.body.get("project") {
                    project_of(m, current, snapshot)?;
                }
            }
            Ok(new_version(call, old, body, "routing_config.updated"))
        })
        .await;
    answer.map_validation(&error_slug)
}

/// `POST /routing-configs/{id}/rollback`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    version: i64,
}

async fn rollback(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let input: Rollback = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    // Versions are read before the change is staged; the change itself checks it is still
    // based on the version seen here.
    let r = match stored(app, key).await {
        Ok(Some(r)) => r,
        Ok(None) => return ApiError::not_found(RESOURCE, key).into_answer(),
        Err(e) => return e.into_answer(),
    };
    let versions = match app.state.versions(&r.id).await {
        Ok(v) => v,
        Err(e) => return ApiError::unavailable(&e).into_answer(),
    };
    let Some(target) = versions.iter().find(|v| v.version == input.version && !v.deleted) else {
        return ApiError::invalid(vec![ConfigError::new(
            "version",
            format!("@{} has no version {} (versions 1 to {})", r.slug, input.version, r.version),
        )])
        .into_answer();
    };
    let body = target.body.clone();
    let lock = format!("{RESOURCE}:{}", r.slug);
    let slug = r.slug.clone();
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = editable(current, snapshot, &r.id, call)?;
        let mut plan = new_version(call, old, body, "routing_config.rolled_back");
        if let Some(c) = plan.changes.first_mut() {
            if let Some(after) = c.after.as_mut() {
                after["rolled_back_to"] = json!(input.version);
            }
        }
        Ok(plan)
    })
    .await
    .map_validation(&slug)
}

/// Makes `body` (an experiment's candidate) the next version of `@slug`, or creates the
/// config when none by that slug exists; audited as an update or a create, marked with
/// the experiment. A config of the file is read-only here (409 `managed_by_file`).
pub async fn promote(
    app: &ManageApp,
    call: &Call<'_>,
    path: &str,
    slug: &str,
    body: Value,
    experiment: &str,
) -> Answer {
    let lock = format!("{RESOURCE}:{slug}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let exists = snapshot.file_owned.routing_configs.iter().any(|s| s == slug)
            || current.iter().any(|r| r.kind == Kind::RoutingConfig && r.slug == slug);
        let mut body = body.clone();
        let mut plan = if exists {
            let old = editable(current, snapshot, slug, call)?;
            if let (Value::Object(m), Some(p)) = (&mut body, old.body.get("project")) {
                m.insert("project".into(), p.clone());
            }
            new_version(call, old, body, "routing_config.updated")
        } else {
            let Value::Object(mut map) = body else {
                return Err(ApiError::invalid(vec![ConfigError::new("", "the candidate is not an object")]));
            };
            let project = project_of(&mut map, current, snapshot)?;
            let r = api::new_resource(Kind::RoutingConfig, project, slug.to_string(), Value::Object(map));
            api::create_plan(call, r, "routing_config.created", view)
        };
        if let Some(after) = plan.changes.first_mut().and_then(|c| c.after.as_mut()) {
            after["promoted_from_experiment"] = json!(experiment);
        }
        Ok(plan)
    })
    .await
    .map_validation(slug)
}

async fn delete(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let lock = format!("{RESOURCE}:{}", key.trim_start_matches('@'));
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = editable(current, snapshot, key, call)?;
        api::refuse_if_used(snapshot, RESOURCE, old, "routing_config_in_use", |rc| {
            rc.slug != old.slug && rc.strategy.sub_configs().contains(&old.slug.as_str())
        })?;
        Ok(api::delete_plan(call, old, "routing_config.deleted", view))
    })
    .await
}

async fn versions(app: &ManageApp, key: &str) -> Result<Answer, ApiError> {
    let Some(r) = stored(app, key).await? else { return Err(ApiError::not_found(RESOURCE, key)) };
    let versions = app.state.versions(&r.id).await.map_err(|e| ApiError::unavailable(&e))?;
    let mut items: Vec<Value> = versions.iter().map(|v| version_view(&r, v)).collect();
    items.reverse();
    Ok(api::list_answer(items, None))
}

async fn version_body(app: &ManageApp, key: &str, n: &str) -> Result<(Stored, Version), ApiError> {
    let Some(r) = stored(app, key).await? else { return Err(ApiError::not_found(RESOURCE, key)) };
    let n: i64 = n.parse().map_err(|_| {
        ApiError::bad_request("invalid_version", format!("version must be a number, got {n:?}"))
    })?;
    let versions = app.state.versions(&r.id).await.map_err(|e| ApiError::unavailable(&e))?;
    match versions.into_iter().find(|v| v.version == n) {
        Some(v) => Ok((r, v)),
        None => Err(ApiError::not_found("routing_config_version", &format!("{key}/versions/{n}"))),
    }
}

async fn one_version(app: &ManageApp, key: &str, n: &str) -> Result<Answer, ApiError> {
    let (r, v) = version_body(app, key, n).await?;
    Ok(Answer::data(200, version_view(&r, &v)))
}

/// `?from=&to=`: `{"data": [{path, op, from, to}], "from", "to"}`, JSON pointers into the
/// config body.
async fn diff(app: &ManageApp, call: &Call<'_>, key: &str) -> Result<Answer, ApiError> {
    let param = |name: &str| {
        call.param(name)
            .ok_or_else(|| ApiError::bad_request("missing_parameter", format!("{name} is required")))
    };
    let (from, to) = (param("from")?, param("to")?);
    let (_, a) = version_body(app, key, &from).await?;
    let (r, b) = version_body(app, key, &to).await?;
    let ops: Vec<Value> = json_patch::diff(&a.body, &b.body)
        .iter()
        .map(|op| {
            let (kind, path) = match op {
                json_patch::PatchOperation::Add(o) => ("add", o.path.to_string()),
                json_patch::PatchOperation::Remove(o) => ("remove", o.path.to_string()),
                json_patch::PatchOperation::Replace(o) => ("replace", o.path.to_string()),
                json_patch::PatchOperation::Move(o) => ("move", o.path.to_string()),
                json_patch::PatchOperation::Copy(o) => ("copy", o.path.to_string()),
                json_patch::PatchOperation::Test(o) => ("test", o.path.to_string()),
            };
            json!({
                "path": path,
                "op": kind,
                "from": a.body.pointer(&path).cloned(),
                "to": b.body.pointer(&path).cloned(),
            })
        })
        .collect();
    // `data` is the list of changes; which versions were compared rides beside it.
    let body = json!({ "data": ops, "routing_config_id": r.id, "from": a.version, "to": b.version });
    Ok(Answer::json(200, &body))
}

/// Validation errors of a routing config answered with paths into its body.
trait MapValidation {
    fn map_validation(self, slug: &str) -> Answer;
}

impl MapValidation for Answer {
    fn map_validation(self, slug: &str) -> Answer {
        if self.status != 422 {
            return self;
        }
        let prefix = format!("routing_configs.{slug}");
        let Ok(mut v) = serde_json::from_slice::<Value>(&self.body) else { return self };
        if let Some(errors) = v["error"]["errors"].as_array_mut() {
            for e in errors {
                if let Some(p) = e["path"].as_str().and_then(|p| p.strip_prefix(&prefix)) {
                    e["path"] = json!(p.trim_start_matches('.'));
                }
            }
        }
        Answer { body: serde_json::to_vec(&v).unwrap_or(self.body), ..self }
    }
}
