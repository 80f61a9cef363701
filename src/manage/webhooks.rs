//! `/webhooks` (PRODUCT.md §11.1): endpoints that receive signed events, their deliveries
//! with every attempt, replay, a synthetic test event, and the event types. An endpoint is a
//! versioned, audited resource like the others; its signing secret is sealed under the
//! master key and shown once, at create and at rotate. The sending is `webhook_sender`'s.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use rand::RngCore as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{self, Answer, ApiError, Call};
use super::ManageApp;
use crate::config::{ConfigError, Snapshot};
use crate::state::webhooks::{Attempt, Delivery, DeliveryQuery, Event, STATUSES};
use crate::state::{Change, Kind, ListQuery, Op, Stored};

const RESOURCE: &str = "webhook_endpoint";

/// Every event type, with what sends it.
pub const EVENT_TYPES: &[(&str, &str)] = &[
    (
        "budget.threshold_reached",
        "A budget's spend crossed one of its alert_thresholds (once per threshold, counter and period)",
    ),
    ("budget.exceeded", "A budget's spend reached its cap (once per counter and period)"),
    ("routing_config.created", "A routing config was created through the management API"),
    (
        "routing_config.updated",
        "A routing config got a new version through the management API (a change, a rollback or a promotion)",
    ),
    ("routing_config.deleted", "A routing config was deleted through the management API"),
    (
        "provider.health_changed",
        "A provider (or one of its models) turned unhealthy or recovered, as the sending node observes it",
    ),
    ("api_key.revoked", "A project API key was revoked (directly or with its project)"),
    ("request.anomaly_detected", "Reserved for anomaly detection; this version sends none"),
    ("experiment.completed", "An experiment (one-off or a scheduled run) finished"),
    (
        "experiment.regression_detected",
        "A scheduled run's verdict turned to fail after a run that passed (sent once per transition)",
    ),
];

/// The body of `POST /webhooks/endpoints` (PRODUCT.md §11.1).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointCreate {
    /// An http(s) URL; a Slack incoming-webhook URL gets Slack's message format.
    pub url: String,
    /// Event types to receive (`GET /webhooks/event-types`), or `["*"]` for all.
    pub event_types: Vec<String>,
    pub description: Option<String>,
    /// Default true; an inactive endpoint gets no new deliveries.
    pub active: Option<bool>,
}

/// The body of `PATCH /webhooks/endpoints/{id}`: fields given replace the stored ones.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    #[serde(default, deserialize_with = "api::nullable")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    pub active: Option<bool>,
}

/// The body of `POST /webhooks/endpoints/{id}/test`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestEvent {
    pub event_type: String,
}

/// A new signing secret: 32 random bytes, hex, `whsec_`-prefixed. Receivers key the HMAC
/// with the whole string.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

pub fn view(r: &Stored) -> Value {
    let b = &r.body;
    let mut v = json!({
        "id": r.id,
        "object": RESOURCE,
        "url": b["url"],
        "event_types": b["event_types"],
        "description": b["description"],
        "active": b["active"].as_bool().unwrap_or(true),
        "version": r.version,
        "secret_created_at": b["secret_created_ms"].as_i64().map_or(Value::Null, api::time),
        "previous_secret_expires_at": b["previous_secret_expires_ms"].as_i64().map_or(Value::Null, api::time),
        "created_at": api::time(r.created_ms),
        "updated_at": api::time(r.updated_ms),
    });
    if let Some(d) = r.deleted_ms {
        v["deleted_at"] = api::time(d);
    }
    v
}

/// Why `url` cannot be a webhook target (`None`: it can). Checks the shape, and that it
/// does not name one of this gateway's own listeners.
pub fn url_problem(url: &str, snapshot: &Snapshot) -> Option<String> {
    let parsed = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return Some(format!("is not a URL: {e}")),
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return Some("must be an http:// or https:// URL".into());
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Some("must name a host".into());
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Some("must not carry credentials; sign deliveries with the endpoint's secret instead".into());
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let literal =
        host.parse::<IpAddr>().ok().or_else(|| (host == "localhost").then_some(IpAddr::from([127, 0, 0, 1])));
    match literal {
        Some(ip) if is_own_listener(SocketAddr::new(ip, port), snapshot) => {
            Some("points at this gateway's own listener".into())
        }
        _ => None,
    }
}

/// Whether `addr` reaches one of this gateway's listeners (IPv4-mapped IPv6 addresses
/// compared as the IPv4 address they are).
pub fn is_own_listener(addr: SocketAddr, snapshot: &Snapshot) -> bool {
    let s = &snapshot.settings;
    let ip = addr.ip().to_canonical();
    [&s.proxy_listen, &s.manage_listen].into_iter().any(|listen| {
        let Ok(mut bound) = listen.to_socket_addrs() else { return false };
        bound.any(|l| {
            let lip = l.ip().to_canonical();
            l.port() == addr.port()
                && (lip == ip
                    || (lip.is_unspecified() && is_local(ip))
                    || (lip.is_loopback() && ip.is_loopback())
                    || ip.is_unspecified())
        })
    })
}

/// An address of this host: binding to it succeeds only here.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Checks an endpoint's fields, with paths into the body.
fn check(url: &str, event_types: &[String], snapshot: &Snapshot) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if let Some(p) = url_problem(url, snapshot) {
        errors.push(ConfigError::new("url", p));
    }
    if event_types.is_empty() {
        errors.push(ConfigError::new("event_types", "must name at least one event type (or \"*\")"));
    }
    for (i, t) in event_types.iter().enumerate() {
        if t != "*" && !EVENT_TYPES.iter().any(|(name, _)| name == t) {
            errors.push(ConfigError::new(
                format!("event_types[{i}]"),
                format!("unknown event type \"{t}\"; GET /manage/v1/webhooks/event-types lists them"),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(errors))
    }
}

fn unique(types: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(types.len());
    for t in types {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", ["endpoints"]) => list(app, call).await,
        ("POST", ["endpoints"]) => return create(app, call, path).await,
        ("GET", ["endpoints", id]) => get(app, id).await,
        ("PATCH", ["endpoints", id]) => return patch(app, call, path, id).await,
        ("DELETE", ["endpoints", id]) => return delete(app, call, path, id).await,
        ("POST", ["endpoints", id, "rotate-secret"]) => return rotate(app, call, path, id).await,
        ("POST", ["endpoints", id, "test"]) => test(app, call, id).await,
        ("GET", ["deliveries"]) => deliveries(app, call).await,
        ("GET", ["deliveries", id]) => delivery(app, id).await,
        ("POST", ["deliveries", id, "replay"]) => replay(app, id).await,
        ("GET", ["event-types"]) => Ok(Answer::data(
            200,
            EVENT_TYPES.iter().map(|(t, d)| json!({ "type": t, "description": d })).collect(),
        )),
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let query = ListQuery {
        include_deleted: call.param("include_deleted").as_deref() == Some("true"),
        ..Default::default()
    };
    api::list_page(&*app.state, call, Kind::WebhookEndpoint, Vec::new(), query, view).await
}

async fn find(app: &ManageApp, id: &str) -> Result<Stored, ApiError> {
    app.state
        .get(Kind::WebhookEndpoint, id, "")
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .filter(|r| r.kind == Kind::WebhookEndpoint)
        .ok_or_else(|| ApiError::not_found(RESOURCE, id))
}

async fn get(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    Ok(Answer::data(200, view(&find(app, id).await?)))
}

fn sealed(app: &ManageApp, secret: &str) -> Result<String, ApiError> {
    app.master.encrypt(secret).map_err(ApiError::sealing)
}

async fn create(app: &ManageApp, call: &Call<'_>, path: &str) -> Answer {
    let body: EndpointCreate = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    let secret = new_secret();
    let sealed = match sealed(app, &secret) {
        Ok(s) => s,
        Err(e) => return e.into_answer(),
    };
    let id = format!("{}{}", Kind::WebhookEndpoint.id_prefix(), uuid::Uuid::now_v7().simple());
    let lock = format!("{RESOURCE}:{id}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |_, snapshot| {
        let event_types = unique(body.event_types);
        check(&body.url, &event_types, snapshot)?;
        let now = api::now_ms();
        let stored = json!({
            "url": body.url,
            "event_types": event_types,
            "description": body.description,
            "active": body.active.unwrap_or(true),
            "secret_enc": sealed,
            "secret_created_ms": now,
            "previous_secret_enc": null,
            "previous_secret_expires_ms": null,
        });
        let mut r = api::new_resource(Kind::WebhookEndpoint, String::new(), id.clone(), stored);
        r.id = id.clone();
        let mut plan = api::create_plan(call, r, "webhook_endpoint.created", view);
        // The plaintext is in this answer only (not in the audit entry's or the
        // idempotency record's copy).
        plan.data["signing_secret"] = json!(secret);
        plan.secret_fields = &["signing_secret"];
        Ok(plan)
    })
    .await
}

fn live<'a>(current: &'a [Stored], id: &str, call: &Call<'_>) -> Result<&'a Stored, ApiError> {
    api::editable(current, RESOURCE, id, false, call, |r| r.kind == Kind::WebhookEndpoint && r.id == id)
}

async fn patch(app: &ManageApp, call: &Call<'_>, path: &str, id: &str) -> Answer {
    let patch: EndpointPatch = match api::body(call.body) {
        Ok(b) => b,
        Err(e) => return e.into_answer(),
    };
    let lock = format!("{RESOURCE}:{id}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = live(current, id, call)?;
        let mut body = old.body.clone();
        if let Some(url) = &patch.url {
            body["url"] = json!(url);
        }
        if let Some(types) = &patch.event_types {
            body["event_types"] = json!(unique(types.clone()));
        }
        if let Some(d) = &patch.description {
            body["description"] = json!(d);
        }
        if let Some(a) = patch.active {
            body["active"] = json!(a);
        }
        let types: Vec<String> = serde_json::from_value(body["event_types"].clone()).unwrap_or_default();
        check(body["url"].as_str().unwrap_or_default(), &types, snapshot)?;
        Ok(api::update_plan(call, old, api::next_version(old, body), "webhook_endpoint.updated", view))
    })
    .await
}

/// Soft delete: deliveries already queued still go out (PRODUCT.md §11.1).
async fn delete(app: &ManageApp, call: &Call<'_>, path: &str, id: &str) -> Answer {
    let lock = format!("{RESOURCE}:{id}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, _| {
        let old = live(current, id, call)?;
        Ok(api::delete_plan(call, old, "webhook_endpoint.deleted", view))
    })
    .await
}

async fn rotate(app: &ManageApp, call: &Call<'_>, path: &str, id: &str) -> Answer {
    let secret = new_secret();
    let sealed = match sealed(app, &secret) {
        Ok(s) => s,
        Err(e) => return e.into_answer(),
    };
    let lock = format!("{RESOURCE}:{id}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, snapshot| {
        let old = live(current, id, call)?;
        let now = api::now_ms();
        let overlap = snapshot.settings.webhooks.secret_overlap.as_millis() as i64;
        let mut body = old.body.clone();
        body["previous_secret_enc"] = old.body["secret_enc"].clone();
        body["previous_secret_expires_ms"] = json!(now + overlap);
        body["secret_enc"] = json!(sealed);
        body["secret_created_ms"] = json!(now);
        let mut plan = api::update_plan(
            call,
            old,
            api::next_version(old, body),
            "webhook_endpoint.secret_rotated",
            view,
        );
        plan.data["signing_secret"] = json!(secret);
        plan.secret_fields = &["signing_secret"];
        Ok(plan)
    })
    .await
}

/// A synthetic event of the type asked for, to this endpoint only (subscribed or not).
async fn test(app: &ManageApp, call: &Call<'_>, id: &str) -> Result<Answer, ApiError> {
    let body: TestEvent = api::body(call.body)?;
    if !EVENT_TYPES.iter().any(|(t, _)| *t == body.event_type) {
        return Err(ApiError::invalid(vec![ConfigError::new(
            "event_type",
            format!(
                "unknown event type \"{}\"; GET /manage/v1/webhooks/event-types lists them",
                body.event_type
            ),
        )]));
    }
    let endpoint = find(app, id).await?;
    if endpoint.deleted_ms.is_some() {
        return Err(ApiError::not_found(RESOURCE, id));
    }
    let snapshot = app.store.load();
    let settings = &snapshot.settings.webhooks;
    let now = api::now_ms();
    let data =
        json!({ "test": true, "description": "a test event sent with POST /webhooks/endpoints/{id}/test" });
    let mut event = Event::new(&body.event_type, &settings.org_id, data, now);
    event.only_endpoint = Some(endpoint.id.clone());
    let unavailable = |e: crate::state::StateError| ApiError::unavailable(&e);
    app.state.enqueue_events(std::slice::from_ref(&event)).await.map_err(unavailable)?;
    app.state
        .dispatch_events(now, settings.retry_window.as_millis() as i64, 100)
        .await
        .map_err(unavailable)?;
    app.webhooks.notify_one();
    let query = DeliveryQuery { event_id: Some(event.id.clone()), limit: 1, ..Default::default() };
    let found = app.state.deliveries(&query).await.map_err(unavailable)?;
    match found.first() {
        Some(d) => Ok(Answer::data(202, delivery_view(d))),
        // Another node dispatched it between the two calls: say where it is.
        None => Ok(Answer::data(
            202,
            json!({ "object": "webhook_test", "event_id": event.id, "status": "pending" }),
        )),
    }
}

fn delivery_view(d: &Delivery) -> Value {
    json!({
        "id": d.id,
        "object": "webhook_delivery",
        "endpoint_id": d.endpoint_id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": if d.status == "pending" { api::time(d.next_attempt_ms) } else { Value::Null },
        "retry_until": api::time(d.deadline_ms),
        "last_status_code": d.last_status,
        "last_error": d.last_error,
        "created_at": api::time(d.created_ms),
        "updated_at": api::time(d.updated_ms),
    })
}

fn attempt_view(a: &Attempt) -> Value {
    json!({
        "attempt": a.n,
        "started_at": api::time(a.started_ms),
        "duration_ms": a.duration_ms,
        "status_code": a.status_code,
        "error": a.error,
        "response_body": a.response_excerpt,
        "node": a.node,
    })
}

async fn deliveries(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let page = api::page(call)?;
    let status = call.param("status").filter(|s| !s.is_empty());
    if let Some(s) = &status {
        if !STATUSES.contains(&s.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_status",
                format!("status must be one of {}", STATUSES.join(", ")),
            ));
        }
    }
    let before_seq =
        match page.cursor.as_deref() {
            None => None,
            Some(c) => Some(c.strip_prefix('d').and_then(|n| n.parse().ok()).ok_or_else(|| {
                ApiError::bad_request("invalid_cursor", "cursor is not one this API gave out")
            })?),
        };
    let query = DeliveryQuery {
        endpoint_id: call.param("endpoint_id").filter(|s| !s.is_empty()),
        status,
        event_type: call.param("event_type").filter(|s| !s.is_empty()),
        event_id: None,
        before_seq,
        limit: page.limit + 1,
    };
    let rows = app.state.deliveries(&query).await.map_err(|e| ApiError::unavailable(&e))?;
    let more = rows.len() > page.limit;
    let rows = &rows[..rows.len().min(page.limit)];
    let next = if more { rows.last().map(|d| format!("d{}", d.seq)) } else { None };
    Ok(api::list_answer(rows.iter().map(delivery_view).collect(), next))
}

async fn delivery(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    let Some((d, attempts)) = app.state.delivery(id).await.map_err(|e| ApiError::unavailable(&e))? else {
        return Err(ApiError::not_found("webhook_delivery", id));
    };
    let mut v = delivery_view(&d);
    v["payload"] = serde_json::from_str(&d.body).unwrap_or(Value::Null);
    v["attempt_history"] = attempts.iter().map(attempt_view).collect();
    Ok(Answer::data(200, v))
}

/// Sends the same payload (same delivery id) again, with a fresh retry window.
async fn replay(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    let window = app.store.load().settings.webhooks.retry_window.as_millis() as i64;
    let now = api::now_ms();
    let replayed = match app.state.replay_delivery(id, now, now + window).await {
        Ok(r) => r,
        Err(crate::state::StateError::Conflict(m)) => {
            return Err(ApiError::conflict("delivery_in_flight", "webhook_delivery", id, m))
        }
        Err(e) => return Err(ApiError::unavailable(&e)),
    };
    match replayed {
        Some(d) => {
            app.webhooks.notify_one();
            Ok(Answer::data(202, delivery_view(&d)))
        }
        None => Err(ApiError::not_found("webhook_delivery", id)),
    }
}

/// The webhook events a management change causes (written in its transaction).
pub fn events_of(change: &Change, org_id: &str) -> Vec<Event> {
    let kind = change.resource.kind;
    let event_type = match (kind, change.action.as_str(), &change.op) {
        (Kind::RoutingConfig, _, Op::Create) => "routing_config.created",
        (Kind::RoutingConfig, _, Op::Delete) => "routing_config.deleted",
        (Kind::RoutingConfig, _, Op::Update) => "routing_config.updated",
        (Kind::ApiKey, "api_key.revoked", _) => "api_key.revoked",
        _ => return Vec::new(),
    };
    let mut data = serde_json::Map::new();
    data.insert(kind.as_str().into(), change.after.clone().unwrap_or(Value::Null));
    data.insert("previous".into(), change.before.clone().unwrap_or(Value::Null));
    data.insert("action".into(), json!(change.action));
    data.insert("actor".into(), json!({ "type": change.actor.kind, "id": change.actor.id }));
    let data = Value::Object(data);
    vec![Event::new(event_type, org_id, data, change.now_ms)]
}
