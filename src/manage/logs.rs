//! `GET /manage/v1/logs`, `/logs/{request_id}`, `/logs/{request_id}/trace` and
//! `/analytics/report` (PRODUCT.md §8.4), answered from whichever trace store runs.

use serde_json::{json, Map, Value};

use crate::error::openai_error_body;
use crate::spend::period::{iso8601_ms, parse_iso8601};
use crate::trace::query::{DEFAULT_PAGE, MAX_PAGE};
use crate::trace::{
    Cursor, Granularity, GroupBy, LogQuery, Report, ReportQuery, StatusFilter, StoreError, TraceRow,
    TraceStore,
};

/// A report covers at most this many buckets (a year of hours, ten days of minutes).
const MAX_BUCKETS: u64 = 10_000;
/// A report without `start` covers the last day.
const DEFAULT_REPORT_WINDOW_MS: u64 = 86_400_000;

pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

fn ok(v: Value) -> Answer {
    Answer { status: 200, body: v.to_string().into_bytes() }
}

fn bad(message: String) -> Answer {
    Answer { status: 400, body: openai_error_body("invalid_request_error", &message, "invalid_request") }
}

fn unavailable(e: &StoreError) -> Answer {
    Answer {
        status: 503,
        body: openai_error_body(
            "service_unavailable",
            &format!("the trace store cannot answer: {e}"),
            "trace_store_unavailable",
        ),
    }
}

/// Answers a logs or analytics path, or `None` when `path` is not one of them.
pub async fn answer(store: &dyn TraceStore, method: &str, path: &str, query: &str) -> Option<Answer> {
    let rest = path.strip_prefix("/manage/v1/").or_else(|| path.strip_prefix("/api/manage/v1/"))?;
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    // Methods were checked against the route table (openapi.rs) before this is called.
    let answer = match segments.as_slice() {
        _ if method != "GET" => return None,
        ["logs"] => match parse_log_query(query) {
            Ok(q) => list(store, &q).await,
            Err(e) => bad(e),
        },
        ["logs", id] => one(store, id, false).await,
        ["logs", id, "trace"] => one(store, id, true).await,
        ["analytics", "report"] => match parse_report_query(query, now_ms()) {
            Ok(q) => match store.report(&q).await {
                Ok(r) => ok(json!({ "data": report_json(&q, &r) })),
                Err(e) => unavailable(&e),
            },
            Err(e) => bad(e),
        },
        _ => return None,
    };
    Some(answer)
}

fn now_ms() -> u64 {
    u64::try_from(crate::spend::unix_now()).unwrap_or(0) * 1000
}

async fn list(store: &dyn TraceStore, q: &LogQuery) -> Answer {
    match store.list(q).await {
        Ok(page) => ok(json!({
            "data": page.rows.iter().map(summary).collect::<Vec<_>>(),
            "next_cursor": page.next_cursor.as_ref().map(Cursor::encode),
            "has_more": page.next_cursor.is_some(),
        })),
        Err(e) => unavailable(&e),
    }
}

async fn one(store: &dyn TraceStore, id: &str, trace_only: bool) -> Answer {
    match store.get(id).await {
        Ok(Some(row)) if trace_only => ok(json!({ "data": decision_trace(&row) })),
        Ok(Some(row)) => ok(json!({ "data": full(&row) })),
        Ok(None) => Answer {
            status: 404,
            body: openai_error_body(
                "not_found",
                &format!("no request {id} in the trace store"),
                "log_not_found",
            ),
        },
        Err(e) => unavailable(&e),
    }
}

fn opt(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// One list entry: the request log record of PRODUCT.md §8.2 without its decision trace.
pub fn summary(r: &TraceRow) -> Value {
    let tags: Map<String, Value> =
        r.tag_keys.iter().zip(&r.tag_values).map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    json!({
        "request_id": r.request_id,
        "created_at": iso8601_ms(r.ts_ms as i64),
        "project_id": opt(&r.project),
        "api_key_name": opt(&r.key_name),
        "surface": r.surface,
        "endpoint": r.endpoint,
        "model_requested": opt(&r.model_requested),
        "model_used": opt(&r.model),
        "provider_used": opt(&r.provider),
        "resolved": opt(&r.resolution),
        "routing_config": opt(&r.routing_config),
        "config_version": (r.config_version > 0).then_some(r.config_version),
        "strategy": opt(&r.strategy),
        "ab_variant": opt(&r.ab_variant),
        "status": r.status,
        "error_class": opt(&r.error_code),
        "attempts": r.attempt_statuses.len(),
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cached_tokens": r.cached_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "cost_usd": { "input": r.cost_input, "output": r.cost_output, "total": r.cost_total },
        "ttft_ms": r.ttfb_ms,
        "latency_ms": r.latency_ms,
        "streamed": r.streamed,
        "cache_hit": r.cache_hit,
        "cache_saved_usd": r.cache_saved_usd,
        "cache_embedding_usd": r.cache_embedding_usd,
        "provider_key": opt(&r.provider_key),
        "owned_ids": r.owned_ids,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "end_user": opt(&r.end_user),
        "tags": tags,
        "trace_id": opt(&r.trace_id),
        "conversation_id": opt(&r.conversation_id),
        "budget": (!r.budget_name.is_empty()).then(|| json!({ "name": r.budget_name, "action": r.budget_action })),
    })
}

/// The full record: the summary plus per-attempt metrics, the decision trace and the
/// bodies (when they were kept).
pub fn full(r: &TraceRow) -> Value {
    let mut v = summary(r);
    let attempts: Vec<Value> = (0..r.attempt_statuses.len())
        .map(|i| {
            let ttfb = r.attempt_ttfb_ms.get(i).copied().filter(|t| *t >= 0.0);
            json!({
                "index": i + 1,
                "provider": r.attempt_providers.get(i),
                "model": r.attempt_models.get(i),
                "status": r.attempt_statuses.get(i),
                "http_status": r.attempt_http_statuses.get(i).copied().filter(|s| *s > 0),
                "error": r.attempt_errors.get(i).map(String::as_str).map(opt),
                "ttft_ms": ttfb,
                "latency_ms": r.attempt_duration_ms.get(i),
            })
        })
        .collect();
    let body = |text: &str| -> Value {
        if text.is_empty() {
            Value::Null
        } else {
            // JSON bodies come back as JSON; a cut or non-JSON body as its text.
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
    };
    if let Value::Object(m) = &mut v {
        m.insert("attempt_details".into(), Value::Array(attempts));
        m.insert("decision_trace".into(), decision_trace(r));
        m.insert("request_body".into(), body(&r.request_body));
        m.insert("response_body".into(), body(&r.response_body));
    }
    v
}

fn decision_trace(r: &TraceRow) -> Value {
    serde_json::from_str(&r.decision_trace).unwrap_or(Value::Null)
}

pub fn report_json(q: &ReportQuery, r: &Report) -> Value {
    let series: Vec<Value> = r
        .series
        .iter()
        .map(|s| {
            let mut v = json!({
                "bucket": iso8601_ms(s.bucket_ms as i64),
                "requests": s.requests,
                "errors": s.errors,
                "cost_usd": s.cost_usd,
                "input_tokens": s.input_tokens,
                "output_tokens": s.output_tokens,
                "p50_latency_ms": s.p50_latency_ms,
                "p95_latency_ms": s.p95_latency_ms,
                "p99_latency_ms": s.p99_latency_ms,
                "p50_ttft_ms": s.p50_ttfb_ms,
                "p95_ttft_ms": s.p95_ttfb_ms,
                "p99_ttft_ms": s.p99_ttfb_ms,
            });
            if let (Some(g), Value::Object(m)) = (&s.group, &mut v) {
                m.insert("group".into(), Value::String(g.clone()));
            }
            v
        })
        .collect();
    json!({
        "start": iso8601_ms(q.start_ms as i64),
        "end": iso8601_ms(q.end_ms as i64),
        "granularity": match q.granularity { Granularity::Minute => "minute", Granularity::Hour => "hour", Granularity::Day => "day" },
        "series": series,
        "totals": r.totals,
    })
}

fn pairs(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes()).into_owned().collect()
}

fn time_param(name: &str, v: &str) -> Result<u64, String> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    parse_iso8601(v).and_then(|ms| u64::try_from(ms).ok()).ok_or_else(|| {
        format!("{name}: \"{v}\" is not an ISO 8601 time (e.g. 2026-04-14T00:00:00Z) or unix milliseconds")
    })
}

/// `tags={"k":"v"}` (PRODUCT.md §8.4) and repeated `tag=k=v` (or `tag=k:v`).
fn tag_params(name: &str, v: &str, tags: &mut Vec<(String, String)>) -> Result<(), String> {
    if name == "tags" {
        let map: Map<String, Value> = serde_json::from_str(v)
            .map_err(|_| format!("tags: expected a JSON object of strings, got {v}"))?;
        for (k, v) in map {
            match v {
                Value::String(s) => tags.push((k, s)),
                other => tags.push((k, other.to_string())),
            }
        }
        return Ok(());
    }
    let (k, val) = v.split_once(['=', ':']).ok_or_else(|| format!("tag: expected key=value, got \"{v}\""))?;
    tags.push((k.to_string(), val.to_string()));
    Ok(())
}

/// `2xx`..`5xx` or one status code.
pub fn status_param(v: &str) -> Result<StatusFilter, String> {
    let lower = v.to_ascii_lowercase();
    if let Some(class) = lower.strip_suffix("xx") {
        if let Ok(c @ 1..=5) = class.parse::<u16>() {
            return Ok(StatusFilter::Class(c));
        }
    }
    match v.parse::<u16>() {
        Ok(s) if s <= 999 => Ok(StatusFilter::Exact(s)),
        _ => Err(format!("status: expected 2xx, 4xx, 5xx or a status code, got \"{v}\"")),
    }
}

/// Applies one filter parameter shared by logs and reports; false if `name` is not one.
fn filter_param(q: &mut LogQuery, name: &str, v: &str) -> Result<bool, String> {
    let some = || Some(v.to_string());
    match name {
        "start" => q.start_ms = Some(time_param(name, v)?),
        "end" => q.end_ms = Some(time_param(name, v)?),
        "project_id" | "project" => q.project = some(),
        "status" => q.status = Some(status_param(v)?),
        "model" => q.model = some(),
        "provider" => q.provider = some(),
        "routing_config" => {
            q.routing_config = Some(if v.starts_with('@') { v.to_string() } else { format!("@{v}") })
        }
        "end_user" => q.end_user = some(),
        "trace_id" => q.trace_id = some(),
        "conversation_id" => q.conversation_id = some(),
        "min_latency_ms" => {
            q.min_latency_ms = Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|l| l.is_finite() && *l >= 0.0)
                    .ok_or_else(|| format!("min_latency_ms: expected a number, got \"{v}\""))?,
            )
        }
        "tags" | "tag" => tag_params(name, v, &mut q.tags)?,
        _ => return Ok(false),
    }
    Ok(true)
}

pub fn parse_log_query(query: &str) -> Result<LogQuery, String> {
    let mut q = LogQuery { limit: DEFAULT_PAGE, ..LogQuery::default() };
    for (name, v) in pairs(query) {
        if filter_param(&mut q, &name, &v)? {
            continue;
        }
        match name.as_str() {
            "cursor" => {
                q.cursor = Some(
                    Cursor::decode(&v)
                        .ok_or_else(|| format!("cursor: \"{v}\" is not a cursor this API returned"))?,
                )
            }
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| format!("limit: expected 1 to {MAX_PAGE}, got \"{v}\""))?
            }
            other => return Err(format!("unknown parameter \"{other}\"")),
        }
    }
    Ok(q)
}

pub fn parse_report_query(query: &str, now_ms: u64) -> Result<ReportQuery, String> {
    let mut filter = LogQuery::default();
    let mut granularity = Granularity::Hour;
    let mut group_by = None;
    for (name, v) in pairs(query) {
        if filter_param(&mut filter, &name, &v)? {
            continue;
        }
        match name.as_str() {
            "granularity" => {
                granularity = match v.as_str() {
                    "minute" => Granularity::Minute,
                    "hour" => Granularity::Hour,
                    "day" => Granularity::Day,
                    _ => return Err(format!("granularity: expected minute, hour or day, got \"{v}\"")),
                }
            }
            "group_by" => {
                group_by = Some(match v.as_str() {
                    "model" => GroupBy::Model,
                    "provider" => GroupBy::Provider,
                    "project" => GroupBy::Project,
                    "routing_config" => GroupBy::RoutingConfig,
                    "end_user" => GroupBy::EndUser,
                    t if t.starts_with("tag:") && t.len() > 4 => GroupBy::Tag(t[4..].to_string()),
                    _ => {
                        return Err(format!(
                            "group_by: expected model, provider, project, routing_config, end_user or tag:<key>, got \"{v}\""
                        ))
                    }
                })
            }
            // Accepted for compatibility; the previous period is one more report away.
            "include_comparison" => {}
            other => return Err(format!("unknown parameter \"{other}\"")),
        }
    }
    let end_ms = filter.end_ms.unwrap_or(now_ms + 1);
    let start_ms = filter.start_ms.unwrap_or(end_ms.saturating_sub(DEFAULT_REPORT_WINDOW_MS));
    if start_ms >= end_ms {
        return Err("start must be before end".into());
    }
    let buckets = (end_ms - start_ms).div_ceil(granularity.millis());
    if buckets > MAX_BUCKETS {
        return Err(format!(
            "the range covers {buckets} buckets; at most {MAX_BUCKETS} (use a coarser granularity or a shorter range)"
        ));
    }
    filter.start_ms = Some(start_ms);
    filter.end_ms = Some(end_ms);
    Ok(ReportQuery { start_ms, end_ms, granularity, group_by, filter })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_parse() {
        let q = parse_log_query(
            "start=2026-04-14T00:00:00Z&status=5xx&model=gpt-4o&tag=tenant=acme&tags=%7B%22env%22%3A%22prod%22%7D&limit=10&min_latency_ms=250",
        )
        .unwrap();
        assert_eq!(q.start_ms, parse_iso8601("2026-04-14T00:00:00Z").map(|v| v as u64));
        assert_eq!(q.status, Some(StatusFilter::Class(5)));
        assert_eq!(q.model.as_deref(), Some("gpt-4o"));
        assert_eq!(q.tags, vec![("tenant".into(), "acme".into()), ("env".into(), "prod".into())]);
        assert_eq!(q.limit, 10);
        assert_eq!(q.min_latency_ms, Some(250.0));
        for (bad, needle) in [
            ("start=yesterday", "start:"),
            ("status=6xx", "status:"),
            ("limit=500", "limit:"),
            ("cursor=zzz", "cursor:"),
            ("tag=novalue", "tag:"),
            ("frobnicate=1", "unknown parameter \"frobnicate\""),
        ] {
            let e = parse_log_query(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn report_defaults_and_bounds() {
        let now = 1_800_000_000_000;
        let q = parse_report_query("group_by=tag:tenant&granularity=day", now).unwrap();
        assert_eq!(q.end_ms, now + 1);
        assert_eq!(q.start_ms, now + 1 - DEFAULT_REPORT_WINDOW_MS);
        assert_eq!(q.group_by, Some(GroupBy::Tag("tenant".into())));
        assert_eq!(q.granularity, Granularity::Day);
        assert!(parse_report_query("granularity=minute&start=2026-01-01&end=2026-03-01", now).is_err());
        assert!(parse_report_query("start=2026-03-01&end=2026-01-01", now).is_err());
        assert!(parse_report_query("group_by=colour", now).is_err());
    }
}
