//! `/providers` (PRODUCT.md §9.2): provider credentials. The body mirrors the YAML entry
//! (`{id, kind, base_url, api_key, api_version, models}`, `vendor` as another name for
//! `kind`). A key is checked with the provider before it is stored (create) or swapped in
//! (rotation), unless `"verify": false`; it is stored sealed under the master key and never
//! shown again (`key_last4` only).

use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{self, Answer, ApiError, Call};
use super::ManageApp;
use crate::config::raw::RawProvider;
use crate::config::{ConfigError, Snapshot};
use crate::providers::upstream;
use crate::state::{Kind, ListQuery, Stored};
use crate::trace::query::{Granularity, GroupBy, LogQuery, ReportQuery};

const RESOURCE: &str = "provider";

/// `POST /providers`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderCreate {
    id: Option<String>,
    #[serde(alias = "vendor")]
    kind: String,
    name: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
    api_version: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    verify: Option<bool>,
}

/// `PATCH /providers/{id}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderPatch {
    #[serde(alias = "vendor")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "api::nullable")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "api::nullable")]
    base_url: Option<Option<String>>,
    api_key: Option<String>,
    #[serde(default, deserialize_with = "api::nullable")]
    api_version: Option<Option<String>>,
    models: Option<Vec<String>>,
    verify: Option<bool>,
}

fn field(r: &Stored, name: &str) -> Value {
    r.body.get(name).cloned().unwrap_or(Value::Null)
}

/// What the API shows of a provider: never its key.
pub fn view(r: &Stored) -> Value {
    json!({
        "id": r.slug,
        "object": RESOURCE,
        "resource_id": r.id,
        "kind": field(r, "kind"),
        "vendor": field(r, "kind"),
        "name": field(r, "name"),
        "base_url": field(r, "base_url"),
        "api_version": field(r, "api_version"),
        "models": r.body.get("models").cloned().unwrap_or_else(|| json!([])),
        "key_last4": field(r, "key_last4"),
        "status": if r.deleted_ms.is_some() { "disabled" } else { "active" },
        "verified_at": field(r, "verified_at"),
        "version": r.version,
        "managed_by": "api",
        "created_at": api::time(r.created_ms),
        "updated_at": api::time(r.updated_ms),
    })
}

fn file_view(snapshot: &Snapshot, id: &str) -> Option<Value> {
    let p = snapshot.providers.get(id)?;
    Some(json!({
        "id": id, "object": RESOURCE, "resource_id": null, "kind": p.adapter.kind(), "vendor": p.adapter.kind(),
        "name": null, "base_url": p.base_url, "models": p.models, "key_last4": null, "status": "active",
        "version": null, "managed_by": "file", "created_at": null, "updated_at": null,
    }))
}

/// Config errors of a provider entry, with paths into the API body.
fn entry_errors(errors: Vec<ConfigError>) -> ApiError {
    ApiError::invalid(
        errors
            .into_iter()
            .map(|e| ConfigError::new(e.path.trim_start_matches('.').to_string(), e.message))
            .collect(),
    )
}

/// Builds the provider `raw` describes and checks its key (unless `verify` is off).
/// `Ok(true)`: checked; `Ok(false)`: not checked.
async fn check(app: &ManageApp, raw: RawProvider, verify: bool) -> Result<bool, ApiError> {
    let mut errors = Vec::new();
    let provider = match crate::config::build_provider(raw, "", &mut errors) {
        Ok(p) => p,
        Err(_) => return Err(entry_errors(errors)),
    };
    if !verify || !provider.has_credential() {
        return Ok(false);
    }
    let timeouts = app.store.load().settings.upstream_timeouts();
    upstream::verify(&app.connector, &app.metrics, &timeouts, &provider).await.map_err(|message| {
        ApiError::new(
            422,
            "validation_error",
            "credential_verification_failed",
            format!("the provider refused the key: {message}"),
        )
    })
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call).await,
        ("POST", []) => return create(app, call, path).await,
        ("GET", [id]) => get(app, id).await,
        ("PATCH", [id]) => return patch(app, call, path, id).await,
        ("DELETE", [id]) => return delete(app, call, path, id).await,
        ("GET", [id, "health"]) => health(app, id).await,
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let snapshot = app.store.load();
    let file = snapshot.file_owned.providers.iter().filter_map(|id| file_view(&snapshot, id)).collect();
    api::list_page(&*app.state, call, Kind::Provider, file, ListQuery::default(), view).await
}

async fn get(app: &ManageApp, key: &str) -> Result<Answer, ApiError> {
    if let Some(r) = app.state.get(Kind::Provider, key, "").await.map_err(|e| ApiError::unavailable(&e))? {
        return Ok(Answer::data(200, view(&r)));
    }
    let snapshot = app.store.load();
    match snapshot.file_owned.providers.iter().find(|p| *p == key).and_then(|p| file_view(&snapshot, p)) {
        Some(v) => Ok(Answer::data(200, v)),
        None => Err(ApiError::not_found(RESOURCE, key)),
    }
}

async fn create(app: &ManageApp, call: &Call<'_>, path: &str) -> Answer {
    let input: ProviderCreate = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    let slug = input.id.clone().unwrap_or_else(|| input.kind.clone());
    if !crate::config::valid_id(&slug) {
        return ApiError::invalid(vec![ConfigError::new("id", crate::config::ID_RULE)]).into_answer();
    }
    let api_key = input.api_key.clone().filter(|k| !k.is_empty());
    let raw = RawProvider {
        id: slug.clone(),
        kind: input.kind.clone(),
        base_url: input.base_url.clone(),
        api_key: api_key.clone(),
        tls_ca_file: None,
        api_version: input.api_version.clone(),
        models: input.models.clone(),
    };
    let verified = match check(app, raw, input.verify.unwrap_or(true)).await {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    let sealed = match api_key.as_deref().map(|k| app.master.encrypt(k)).transpose() {
        Ok(s) => s,
        Err(e) => return ApiError::sealing(e).into_answer(),
    };
    let lock = format!("{RESOURCE}:{slug}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        if snapshot.file_owned.providers.contains(&slug)
            || current.iter().any(|r| r.kind == Kind::Provider && r.slug == slug)
        {
            return Err(ApiError::conflict(
                "provider_exists",
                RESOURCE,
                &slug,
                format!("a provider with id \"{slug}\" already exists"),
            ));
        }
        let body = json!({
            "kind": input.kind,
            "name": input.name,
            "base_url": input.base_url,
            "api_version": input.api_version,
            "models": input.models,
            "api_key_enc": sealed,
            "key_last4": last4(api_key.as_deref()),
            "verified_at": verified.then(|| crate::spend::period::iso8601_ms(api::now_ms())),
        });
        let r = api::new_resource(Kind::Provider, String::new(), slug.clone(), body);
        Ok(api::create_plan(call, r, "provider.created", view))
    })
    .await
}

fn last4(key: Option<&str>) -> Value {
    match key {
        Some(k) if k.chars().count() >= 8 => json!(k.chars().skip(k.chars().count() - 4).collect::<String>()),
        // A short key would be mostly revealed by its last four characters.
        _ => Value::Null,
    }
}

/// The live API provider `key` names, or the error to answer.
fn editable<'a>(
    current: &'a [Stored],
    snapshot: &Snapshot,
    key: &str,
    call: &Call<'_>,
) -> Result<&'a Stored, ApiError> {
    let in_file = snapshot.file_owned.providers.iter().any(|s| s == key);
    api::editable_named(current, Kind::Provider, key, in_file, call)
}

async fn patch(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let input: ProviderPatch = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    // The entry as it would be, built and its (new) key checked before anything is staged:
    // requests keep using the old key until the new one is proven and swapped in.
    let old = match app.state.get(Kind::Provider, key, "").await {
        Ok(Some(r)) if r.deleted_ms.is_none() => r,
        Ok(_) if app.store.load().file_owned.providers.iter().any(|p| p == key) => {
            return ApiError::managed_by_file(RESOURCE, key).into_answer()
        }
        Ok(_) => return ApiError::not_found(RESOURCE, key).into_answer(),
        Err(e) => return ApiError::unavailable(&e).into_answer(),
    };
    let text = |v: &Value| v.as_str().map(str::to_string);
    let kind = text(&old.body["kind"]).unwrap_or_default();
    if input.kind.as_ref().is_some_and(|k| *k != kind) {
        return ApiError::invalid(vec![ConfigError::new(
            "kind",
            "cannot be changed; create another provider",
        )])
        .into_answer();
    }
    let mut body = old.body.clone();
    if let Some(name) = &input.name {
        body["name"] = json!(name);
    }
    if let Some(url) = &input.base_url {
        body["base_url"] = json!(url);
    }
    if let Some(v) = &input.api_version {
        body["api_version"] = json!(v);
    }
    if let Some(m) = &input.models {
        body["models"] = json!(m);
    }
    let api_key = match &input.api_key {
        Some(k) => Some(k.clone()).filter(|k| !k.is_empty()),
        None => match text(&old.body["api_key_enc"]).map(|s| app.master.decrypt(&s)).transpose() {
            Ok(k) => k,
            Err(e) => return ApiError::new(500, "internal_error", "decryption_failed", e).into_answer(),
        },
    };
    let raw = RawProvider {
        id: old.slug.clone(),
        kind,
        base_url: text(&body["base_url"]),
        api_key: api_key.clone(),
        tls_ca_file: None,
        api_version: text(&body["api_version"]),
        models: serde_json::from_value(body["models"].clone()).unwrap_or_default(),
    };
    // Only a new key (or a new address for the old one) is checked again.
    let recheck = input.api_key.is_some() || input.base_url.is_some();
    let verified = match check(app, raw, recheck && input.verify.unwrap_or(true)).await {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    if input.api_key.is_some() {
        body["api_key_enc"] = match api_key.as_deref().map(|k| app.master.encrypt(k)).transpose() {
            Ok(s) => json!(s),
            Err(e) => return ApiError::sealing(e).into_answer(),
        };
        body["key_last4"] = last4(api_key.as_deref());
    }
    let now = api::now_ms();
    if verified {
        body["verified_at"] = json!(crate::spend::period::iso8601_ms(now));
    } else if recheck {
        body["verified_at"] = Value::Null;
    }
    let rotated = input.api_key.is_some();
    let lock = format!("{RESOURCE}:{}", old.slug);
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let live = editable(current, snapshot, &old.id, call)?;
        if live.version != old.version {
            return Err(ApiError::conflict(
                "version_conflict",
                RESOURCE,
                &live.slug,
                "the provider was changed while this change was checked; retry",
            ));
        }
        let action = if rotated { "provider.key_rotated" } else { "provider.updated" };
        Ok(api::update_plan(call, live, api::next_version(live, body), action, view))
    })
    .await
}

async fn delete(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let lock = format!("{RESOURCE}:{key}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = editable(current, snapshot, key, call)?;
        api::refuse_if_used(snapshot, RESOURCE, old, "provider_in_use", |rc| {
            rc.strategy.uses_provider(&old.slug)
        })?;
        Ok(api::delete_plan(call, old, "provider.deleted", view))
    })
    .await
}

/// Live health from the tracker (the health window), and the last hour from the traces.
async fn health(app: &ManageApp, key: &str) -> Result<Answer, ApiError> {
    let snapshot = app.store.load();
    let id = match app.state.get(Kind::Provider, key, "").await.map_err(|e| ApiError::unavailable(&e))? {
        Some(r) if r.deleted_ms.is_none() => r.slug,
        _ if snapshot.providers.contains_key(key) => key.to_string(),
        _ => return Err(ApiError::not_found(RESOURCE, key)),
    };
    let now = crate::routing::health::now_ms();
    let settings = &snapshot.health_settings;
    let live = |cell: &crate::routing::health::Health| {
        let r = cell.report(now, settings);
        let state = if r.samples == 0 {
            "unknown"
        } else if !r.healthy {
            "unhealthy"
        } else if r.success_rate.is_some_and(|s| s < 0.99) {
            "degraded"
        } else {
            "healthy"
        };
        json!({
            "state": state,
            "success_rate_window": r.success_rate,
            "samples_window": r.samples,
            "p50_latency_ms": r.p50_ms,
            "ewma_latency_ms": r.ewma_ms,
            "last_check_at": r.last_sample_age_ms.map(|age| crate::spend::period::iso8601_ms(now.saturating_sub(age) as i64)),
        })
    };
    let whole = snapshot.health.get(&id).map_or_else(|| json!({"state": "unknown"}), |c| live(&c));
    let mut per_model = serde_json::Map::new();
    for (key, cell) in snapshot.health.snapshot() {
        if let Some(model) = key.strip_prefix(&format!("{id}/")) {
            per_model.insert(model.to_string(), live(&cell));
        }
    }
    // Percentiles over the last hour come from the trace store (what was served).
    let hour = 3_600_000;
    let query = ReportQuery {
        start_ms: now.saturating_sub(hour),
        end_ms: now + 1,
        granularity: Granularity::Hour,
        group_by: Some(GroupBy::Model),
        filter: LogQuery { provider: Some(id.clone()), ..Default::default() },
    };
    let report = app.trace_store.report(&query).await.ok();
    if let Some(report) = &report {
        for row in &report.series {
            let Some(model) = &row.group else { continue };
            let entry = per_model.entry(model.clone()).or_insert_with(|| json!({"state": "unknown"}));
            entry["requests_1h"] = json!(row.requests);
            entry["success_rate_1h"] = json!(rate(row.requests, row.errors));
            entry["p95_latency_ms_1h"] = json!(row.p95_latency_ms);
        }
    }
    let totals = report.as_ref().map(|r| &r.totals);
    let mut data = json!({
        "provider": id,
        // Health is each node's own view of its upstream paths.
        "node": &*app.node,
        "window_seconds": settings.window.as_secs(),
        "requests_1h": totals.map(|t| t.requests),
        "success_rate_1h": totals.map(|t| rate(t.requests, t.errors)),
        "p50_latency_ms_1h": totals.and_then(|t| t.p50_latency_ms),
        "p95_latency_ms_1h": totals.and_then(|t| t.p95_latency_ms),
        "per_model": per_model,
    });
    if let (Value::Object(d), Value::Object(w)) = (&mut data, whole) {
        d.extend(w);
    }
    Ok(Answer::data(200, data))
}

fn rate(requests: u64, errors: u64) -> Option<f64> {
    (requests > 0).then(|| (requests - errors.min(requests)) as f64 / requests as f64)
}
