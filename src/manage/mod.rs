//! The management listener: its own pingora service and port. Serves Prometheus metrics,
//! liveness and readiness, and guards `/manage/v1/*` (and `/api/manage/v1/*`) with a
//! management key.

pub mod logs;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::auth;
use crate::config::store::ConfigStore;
use crate::error::openai_error_body;
use crate::metrics::Metrics;
use crate::spend::counters::RateKind;

pub struct ManageApp {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    pub spend: Arc<crate::spend::Spend>,
    pub traces: Arc<crate::trace::writer::TraceQueue>,
    pub trace_store: Arc<dyn crate::trace::TraceStore>,
}

fn json(status: u16, body: Vec<u8>) -> http::Response<Vec<u8>> {
    respond(status, "application/json", body)
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> http::Response<Vec<u8>> {
    let mut resp = http::Response::new(body);
    *resp.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

#[async_trait]
impl ServeHttp for ManageApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let query = req.uri.query().unwrap_or_default().to_string();
        let method = req.method.clone();
        let auth_header = req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
        // Management requests carry no bodies we use yet; drain so the connection stays reusable.
        let _ = session.drain_request_body().await;
        match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => {
                let snapshot = self.store.load();
                self.metrics.refresh_health(&snapshot.health, &snapshot.health_settings);
                self.metrics.trace_queue_depth.set(self.traces.depth() as i64);
                respond(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            ("GET", "/healthz") => json(200, br#"{"status":"ok"}"#.to_vec()),
            ("GET", "/readyz") => {
                let generation = self.store.load().generation;
                json(200, format!(r#"{{"status":"ready","config_generation":{generation}}}"#).into_bytes())
            }
            (_, p)
                if p.starts_with("/manage/v1/") || p == "/manage/v1" || p.starts_with("/api/manage/v1") =>
            {
                let snapshot = self.store.load();
                let principal = auth::bearer_token(auth_header.as_deref())
                    .and_then(|t| snapshot.management_keys.authenticate(t));
                let Some(principal) = principal else {
                    return json(
                        401,
                        openai_error_body(
                            "authentication_error",
                            "missing or invalid management key; send Authorization: Bearer mlx_mk_...",
                            "invalid_api_key",
                        ),
                    );
                };
                let limit = principal.limits.requests_per_minute;
                let verdict = (limit > 0).then(|| {
                    self.spend.counters.take(
                        RateKind::Requests,
                        &principal.limits.rate_key,
                        limit,
                        1,
                        crate::spend::unix_now_us(),
                    )
                });
                let mut resp = match verdict {
                    Some(v) if !v.allowed => {
                        self.metrics.rate_limited.with_label_values(&["management"]).inc();
                        let mut resp = json(
                            429,
                            openai_error_body(
                                "rate_limit_error",
                                &format!(
                                    "rate limit of {limit} requests/minute exceeded for this management key"
                                ),
                                "rate_limited",
                            ),
                        );
                        let secs = v.retry_after_us.div_ceil(1_000_000).max(1);
                        resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
                        resp
                    }
                    _ => match logs::answer(self.trace_store.as_ref(), method.as_str(), p, &query).await {
                        Some(answer) => json(answer.status, answer.body),
                        None => json(
                            404,
                            openai_error_body(
                                "not_found",
                                &format!("no management resource at {p}"),
                                "not_found",
                            ),
                        ),
                    },
                };
                if let Some(v) = verdict {
                    let mut headers = Vec::new();
                    crate::proxy::push_rate_headers(RateKind::Requests, &v, &mut headers);
                    for (name, value) in headers {
                        if let Ok(value) = http::HeaderValue::from_str(&value) {
                            resp.headers_mut().insert(name, value);
                        }
                    }
                }
                resp
            }
            _ => json(
                404,
                openai_error_body("not_found", &format!("no such endpoint {method} {path}"), "not_found"),
            ),
        }
    }
}
