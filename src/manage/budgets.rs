//! `/budgets` (PRODUCT.md §5.8): the YAML budget entry through the API. Every read adds
//! where the budget stands in its current period: `spend_usd`, `remaining_usd`,
//! `period_starts_at`, `period_resets_at` and `forecast_usd` (spend so far extrapolated
//! linearly to the period's end).

use serde_json::{json, Value};

use super::api::{self, Answer, ApiError, Call};
use super::ManageApp;
use crate::config::raw::{BudgetActionKind, BudgetScopeKind, RawBudget};
use crate::config::{ConfigError, Snapshot};
use crate::spend::counters::{to_usd, SpendKey};
use crate::spend::period::iso8601;
use crate::state::{Kind, ListQuery, Stored};

/// The body of `POST /budgets`: the YAML budget entry.
pub use crate::config::raw::RawBudget as BudgetBody;

const RESOURCE: &str = "budget";

/// Where a budget (its YAML entry) stands now, from the live counters.
fn standing(app: &ManageApp, entry: &RawBudget) -> Value {
    let now = crate::spend::unix_now();
    let (start, end) = entry.period.window(now);
    let per_instance = match entry.scope {
        BudgetScopeKind::EndUser => entry.end_user.is_none(),
        BudgetScopeKind::Tag => entry.tag.as_deref().is_some_and(|t| !t.contains('=')),
        _ => false,
    };
    let mut v = json!({
        "period_starts_at": iso8601(start),
        "period_resets_at": iso8601(end),
        "per_instance": per_instance,
    });
    if per_instance {
        // One counter per end user or tag value: there is no single figure to show.
        v["spend_usd"] = Value::Null;
        v["remaining_usd"] = Value::Null;
        v["forecast_usd"] = Value::Null;
        return v;
    }
    let level =
        app.spend.counters.spend(&SpendKey { budget: &entry.name, instance: "", period_start: start });
    let spend = to_usd(level.committed);
    let elapsed = (now - start).max(1) as f64;
    v["spend_usd"] = json!(spend);
    v["remaining_usd"] = json!((entry.cap_usd - spend).max(0.0));
    v["forecast_usd"] = json!(spend * (end - start) as f64 / elapsed);
    v
}

/// `standing` of a stored body (`{}` if it no longer parses).
fn standing_of(app: &ManageApp, body: &Value) -> Value {
    serde_json::from_value::<RawBudget>(body.clone()).map_or_else(|_| json!({}), |b| standing(app, &b))
}

fn with_standing(mut v: Value, standing: Value) -> Value {
    if let (Value::Object(m), Value::Object(s)) = (&mut v, standing) {
        m.extend(s);
    }
    v
}

pub fn view(r: &Stored) -> Value {
    let mut v = r.body.clone();
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), json!(r.id));
        m.insert("object".into(), json!(RESOURCE));
        m.insert("version".into(), json!(r.version));
        m.insert("managed_by".into(), json!("api"));
        m.insert("created_at".into(), api::time(r.created_ms));
        m.insert("updated_at".into(), api::time(r.updated_ms));
    }
    v
}

fn file_view(app: &ManageApp, b: &crate::spend::budgets::Budget) -> Value {
    let entry = RawBudget {
        name: b.name.to_string(),
        scope: match &b.scope {
            crate::spend::budgets::Scope::Org => BudgetScopeKind::Org,
            crate::spend::budgets::Scope::Project(_) => BudgetScopeKind::Project,
            crate::spend::budgets::Scope::RoutingConfig(_) => BudgetScopeKind::RoutingConfig,
            crate::spend::budgets::Scope::EndUser(_) => BudgetScopeKind::EndUser,
            crate::spend::budgets::Scope::Tag { .. } => BudgetScopeKind::Tag,
        },
        project: None,
        routing_config: None,
        end_user: match &b.scope {
            crate::spend::budgets::Scope::EndUser(u) => u.clone(),
            _ => None,
        },
        tag: match &b.scope {
            crate::spend::budgets::Scope::Tag { key, value } => {
                Some(value.as_ref().map_or_else(|| key.clone(), |v| format!("{key}={v}")))
            }
            _ => None,
        },
        period: b.period,
        cap_usd: b.cap_usd,
        soft_limit_pct: Some(b.soft_limit_pct),
        action: BudgetActionKind::Block,
        downgrade_to: None,
        alert_thresholds: None,
    };
    let thresholds: Vec<Value> =
        b.alert_pcts.iter().map(|p| json!({ "pct": p, "channels": ["webhook"] })).collect();
    let v = json!({
        "id": &*b.name, "object": RESOURCE, "name": &*b.name, "period": b.period.as_str(), "cap_usd": b.cap_usd,
        "soft_limit_pct": b.soft_limit_pct, "action": b.action.as_str(), "version": null, "managed_by": "file",
        "alert_thresholds": thresholds, "created_at": null, "updated_at": null,
    });
    with_standing(v, standing(app, &entry))
}

/// Checks a budget entry's shape (types, unknown fields) with paths into the body.
fn entry(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = api::body(body)?;
    api::body::<RawBudget>(&serde_json::to_vec(&value).unwrap_or_default())?;
    Ok(value)
}

/// Validation errors of the budget being changed, with paths into its body.
fn strip_index(answer: Answer) -> Answer {
    if answer.status != 422 {
        return answer;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(&answer.body) else { return answer };
    if let Some(errors) = v["error"]["errors"].as_array_mut() {
        for e in errors {
            let stripped = e["path"]
                .as_str()
                .and_then(|p| p.strip_prefix("budgets["))
                .and_then(|p| p.split_once("]."))
                .map(|(_, rest)| rest.to_string());
            if let Some(rest) = stripped {
                e["path"] = json!(rest);
            }
        }
    }
    Answer { body: serde_json::to_vec(&v).unwrap_or(answer.body), ..answer }
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call).await,
        ("POST", []) => return strip_index(create(app, call, path).await),
        ("GET", [id]) => get(app, id).await,
        ("PATCH", [id]) => return strip_index(patch(app, call, path, id).await),
        ("DELETE", [id]) => return delete(app, call, path, id).await,
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

/// Reads the current level of each whole-budget counter from the shared counters (their
/// figure across every node), so `standing` shows it; in-process counters need nothing.
async fn refresh_levels(app: &ManageApp, snapshot: &Snapshot) {
    let now = crate::spend::unix_now();
    for b in snapshot.budgets.iter() {
        let start = b.period.window(now).0;
        let _ = app
            .spend
            .counters
            .level_now(SpendKey { budget: &b.name, instance: "", period_start: start })
            .await;
    }
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let snapshot = app.store.load();
    refresh_levels(app, &snapshot).await;
    let in_file =
        |b: &&crate::spend::budgets::Budget| snapshot.file_owned.budgets.iter().any(|n| *n == *b.name);
    let file = snapshot.budgets.iter().filter(in_file).map(|b| file_view(app, b)).collect();
    api::list_page(&*app.state, call, Kind::Budget, file, ListQuery::default(), |r| {
        with_standing(view(r), standing_of(app, &r.body))
    })
    .await
}

async fn get(app: &ManageApp, key: &str) -> Result<Answer, ApiError> {
    let snapshot = app.store.load();
    refresh_levels(app, &snapshot).await;
    if let Some(r) = app.state.get(Kind::Budget, key, "").await.map_err(|e| ApiError::unavailable(&e))? {
        let standing = if r.deleted_ms.is_none() { standing_of(app, &r.body) } else { json!({}) };
        return Ok(Answer::data(200, with_standing(view(&r), standing)));
    }
    let file = snapshot.file_owned.budgets.iter().any(|n| n == key);
    let found = snapshot.budgets.iter().find(|b| file && &*b.name == key).map(|b| file_view(app, b));
    found.map(|v| Answer::data(200, v)).ok_or_else(|| ApiError::not_found(RESOURCE, key))
}

async fn create(app: &ManageApp, call: &Call<'_>, path: &str) -> Answer {
    let body = match entry(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    let name = body["name"].as_str().unwrap_or_default().to_string();
    let lock = format!("{RESOURCE}:{name}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        if snapshot.file_owned.budgets.contains(&name)
            || current.iter().any(|r| r.kind == Kind::Budget && r.slug == name)
        {
            return Err(ApiError::conflict(
                "budget_exists",
                RESOURCE,
                &name,
                format!("a budget named \"{name}\" already exists"),
            ));
        }
        let project = body["project"].as_str().unwrap_or_default().to_string();
        let r = api::new_resource(Kind::Budget, project, name.clone(), body);
        let mut plan = api::create_plan(call, r, "budget.created", view);
        plan.data = with_standing(plan.data, standing_of(app, &plan.changes[0].resource.body));
        Ok(plan)
    })
    .await
}

fn editable<'a>(
    current: &'a [Stored],
    snapshot: &Snapshot,
    key: &str,
    call: &Call<'_>,
) -> Result<&'a Stored, ApiError> {
    let in_file = snapshot.file_owned.budgets.iter().any(|s| s == key);
    api::editable_named(current, Kind::Budget, key, in_file, call)
}

async fn patch(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let patch: Value = match api::body(call.body) {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    if !patch.is_object() {
        return ApiError::invalid(vec![ConfigError::new("", "must be a JSON object")]).into_answer();
    }
    let lock = format!("{RESOURCE}:{key}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = editable(current, snapshot, key, call)?;
        let mut body = old.body.clone();
        json_patch::merge(&mut body, &patch);
        if body["name"] != old.body["name"] {
            return Err(ApiError::invalid(vec![ConfigError::new(
                "name",
                "cannot be changed; create another budget",
            )]));
        }
        entry(&serde_json::to_vec(&body).unwrap_or_default())?;
        let mut new = api::next_version(old, body);
        new.project = new.body["project"].as_str().unwrap_or_default().to_string();
        let standing = standing_of(app, &new.body);
        let mut plan = api::update_plan(call, old, new, "budget.updated", view);
        plan.data = with_standing(plan.data, standing);
        Ok(plan)
    })
    .await
}

async fn delete(app: &ManageApp, call: &Call<'_>, path: &str, key: &str) -> Answer {
    let lock = format!("{RESOURCE}:{key}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = editable(current, snapshot, key, call)?;
        Ok(api::delete_plan(call, old, "budget.deleted", view))
    })
    .await
}
