//! `GET /audit-logs` (PRODUCT.md §11.2): every management change, newest first, with its
//! actor, origin and the resource before and after (secrets never included).

use serde_json::{json, Value};

use super::api::{self, Answer, ApiError, Call};
use super::ManageApp;
use crate::state::{AuditEntry, AuditQuery};

fn view(e: &AuditEntry) -> Value {
    json!({
        "id": e.id,
        "created_at": api::time(e.created_ms),
        "actor": { "type": e.actor.kind, "id": e.actor.id, "label": e.actor.label },
        "action": e.action,
        "resource_type": e.resource_type,
        "resource_id": e.resource_id,
        "project": if e.project.is_empty() { Value::Null } else { json!(e.project) },
        "ip": e.ip,
        "user_agent": e.user_agent,
        "before": e.before,
        "after": e.after,
    })
}

/// `start`/`end`: RFC 3339 or unix ms.
fn time_param(call: &Call<'_>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(v) = call.param(name) else { return Ok(None) };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    crate::spend::period::parse_iso8601(&v).map(Some).ok_or_else(|| {
        ApiError::bad_request("invalid_time", format!("{name} must be an RFC 3339 time or unix ms"))
    })
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call).await,
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let page = api::page(call)?;
    let before_seq =
        match page.cursor.as_deref() {
            None => None,
            Some(c) => Some(c.strip_prefix('a').and_then(|n| n.parse().ok()).ok_or_else(|| {
                ApiError::bad_request("invalid_cursor", "cursor is not one this API gave out")
            })?),
        };
    let query = AuditQuery {
        resource_type: call.param("resource_type"),
        resource_id: call.param("resource_id"),
        action: call.param("action"),
        actor_id: call.param("actor_id"),
        start_ms: time_param(call, "start")?,
        end_ms: time_param(call, "end")?,
        before_seq,
        limit: page.limit + 1,
    };
    let rows = app.state.audit(&query).await.map_err(|e| ApiError::unavailable(&e))?;
    let more = rows.len() > page.limit;
    let rows = &rows[..rows.len().min(page.limit)];
    let next = if more { rows.last().map(|e| format!("a{}", e.seq)) } else { None };
    Ok(api::list_answer(rows.iter().map(view).collect(), next))
}
