//! The webhook outbox. An event is written in the same transaction as the change that
//! causes it (`Change::events`, `StateStore::update_experiment`) or, for what the request
//! path observes (budget thresholds, provider health), queued in memory and written by the
//! management service. Dispatching turns each event into one delivery per subscribed
//! endpoint; deliveries are leased by one node at a time, and every attempt is kept.

use serde_json::{json, Value};

use super::{Kind, Stored};

/// One event, as written to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `evt_…`.
    pub id: String,
    pub event_type: String,
    pub created_ms: i64,
    /// The envelope, exactly the bytes every delivery of the event sends.
    pub body: String,
    /// Events with the same key are written once (a budget threshold per period, across
    /// restarts and nodes); `None`: always written.
    pub dedup: Option<String>,
    /// Delivered to this endpoint only, subscribed or not (`POST …/test`).
    pub only_endpoint: Option<String>,
}

impl Event {
    /// An event of `event_type` carrying `data`, in the PRODUCT.md §11.1 envelope.
    pub fn new(event_type: &str, org_id: &str, data: Value, now_ms: i64) -> Event {
        let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let body = json!({
            "id": id,
            "type": event_type,
            "created_at": crate::spend::period::iso8601_ms(now_ms),
            "org_id": org_id,
            "data": data,
        });
        Event {
            id,
            event_type: event_type.to_string(),
            created_ms: now_ms,
            body: body.to_string(),
            dedup: None,
            only_endpoint: None,
        }
    }
}

/// `replay_delivery`'s conflict: an attempt is being sent.
pub const IN_FLIGHT: &str = "the delivery is being sent right now; replay it once this attempt is recorded";

/// `pending` until a 2xx answer (`delivered`) or until its retry window closes (`failed`).
pub const STATUSES: &[&str] = &["pending", "delivered", "failed"];

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub seq: i64,
    /// `dlv_…`: receivers deduplicate on it (`X-Modelux-Delivery-Id`).
    pub id: String,
    pub event_id: String,
    pub endpoint_id: String,
    pub event_type: String,
    pub body: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    /// No attempt starts after this; then the delivery is `failed`.
    pub deadline_ms: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// `attempts` when the delivery was last replayed: backoff counts from there.
    pub backoff_from: i64,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// 1, 2, …
    pub n: i64,
    pub started_ms: i64,
    pub duration_ms: i64,
    /// The receiver's answer; `None` when none came (refused, timed out, reset).
    pub status_code: Option<i64>,
    pub error: Option<String>,
    /// The first bytes of the receiver's answer.
    pub response_excerpt: String,
    /// The node that sent it.
    pub node: String,
}

/// What an attempt leads to.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub attempt: Attempt,
    /// `pending` (retried at `next_attempt_ms`), `delivered` or `failed`.
    pub status: &'static str,
    pub next_attempt_ms: i64,
}

/// Filters of `GET /webhooks/deliveries`; newest first.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub endpoint_id: Option<String>,
    pub status: Option<String>,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
    /// Deliveries before this `seq` (the cursor).
    pub before_seq: Option<i64>,
    pub limit: usize,
}

/// Whether the endpoint (a stored `webhook_endpoint`) takes events of `event_type`.
pub fn subscribed(endpoint: &Stored, event_type: &str) -> bool {
    endpoint.kind == Kind::WebhookEndpoint
        && endpoint.deleted_ms.is_none()
        && endpoint.body["active"].as_bool().unwrap_or(true)
        && endpoint.body["event_types"]
            .as_array()
            .is_some_and(|types| types.iter().any(|t| t == event_type || t == "*"))
}

/// The deliveries of `event` to `endpoints` (the live ones), first attempt due at `now_ms`,
/// given up at `now_ms + window_ms`.
pub fn fan_out(event: &Event, endpoints: &[Stored], now_ms: i64, window_ms: i64) -> Vec<Delivery> {
    endpoints
        .iter()
        .filter(|e| match &event.only_endpoint {
            Some(only) => e.id == *only,
            None => subscribed(e, &event.event_type),
        })
        .map(|e| Delivery {
            seq: 0,
            id: format!("dlv_{}", uuid::Uuid::now_v7().simple()),
            event_id: event.id.clone(),
            endpoint_id: e.id.clone(),
            event_type: event.event_type.clone(),
            body: event.body.clone(),
            status: "pending".into(),
            attempts: 0,
            next_attempt_ms: now_ms,
            deadline_ms: now_ms.saturating_add(window_ms),
            last_status: None,
            last_error: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            backoff_from: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, types: Value, active: bool) -> Stored {
        Stored {
            kind: Kind::WebhookEndpoint,
            id: id.into(),
            project: String::new(),
            slug: id.into(),
            body: json!({ "url": "http://127.0.0.1:1/x", "event_types": types, "active": active }),
            version: 1,
            seq: 1,
            created_ms: 0,
            updated_ms: 0,
            deleted_ms: None,
        }
    }

    #[test]
    fn fans_out_to_active_subscribers_or_to_the_one_endpoint_named() {
        let endpoints = [
            endpoint("a", json!(["budget.exceeded"]), true),
            endpoint("b", json!(["*"]), true),
            endpoint("c", json!(["budget.exceeded"]), false),
            endpoint("d", json!(["routing_config.updated"]), true),
        ];
        let event = Event::new("budget.exceeded", "org", json!({}), 1_000);
        let to: Vec<_> = fan_out(&event, &endpoints, 1_000, 50).into_iter().map(|d| d.endpoint_id).collect();
        assert_eq!(to, ["a", "b"]);
        let test = Event { only_endpoint: Some("c".into()), ..event };
        let d = fan_out(&test, &endpoints, 1_000, 50);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].endpoint_id.as_str(), d[0].deadline_ms, d[0].status.as_str()),
            ("c", 1_050, "pending")
        );
        let body: Value = serde_json::from_str(&d[0].body).unwrap();
        assert_eq!(body["type"], "budget.exceeded");
        assert!(body["id"].as_str().unwrap().starts_with("evt_"));
    }
}
