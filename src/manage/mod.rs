//! The management listener: its own pingora service and port. Serves Prometheus metrics,
//! liveness and readiness, and guards `/manage/v1/*` (and `/api/manage/v1/*`) with a
//! management key.

pub mod api;
pub mod audit;
pub mod budgets;
pub mod experiments;
pub mod keys;
pub mod logs;
pub mod mcp;
pub mod openapi;
pub mod projects;
pub mod providers;
pub mod routing_configs;
pub mod scheduled;
pub mod webhook_sender;
pub mod webhooks;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

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
    pub state: Arc<dyn crate::state::StateStore>,
    /// Seals provider keys before they are stored.
    pub master: Arc<crate::state::secrets::MasterKey>,
    /// For provider credential checks (its own pool: never the proxy's connections).
    pub connector: pingora::connectors::http::Connector,
    /// Resources with a change being applied (shared with the MCP tools' instance).
    pub changing: Arc<api::InFlight>,
    /// The experiment queue and its worker.
    pub experiments: Arc<crate::replay::Experiments>,
    /// This node's name (`spend.node_id`, else host name and proxy port).
    pub node: Arc<str>,
    /// Wakes the webhook sender (a test event, a replay).
    pub webhooks: Arc<tokio::sync::Notify>,
    /// `/mcp` (the listener's instance only; the tools run on an instance of their own).
    pub mcp: Option<Arc<mcp::McpHttp>>,
    /// The response cache, whose size `/metrics` reports.
    pub cache: Arc<crate::cache::Store>,
}

/// Reads the request body, up to `api::MAX_BODY` and within `server.client_body_timeout_ms`;
/// `Err`: the answer to send instead.
async fn read_body(session: &mut ServerSession, app: &ManageApp) -> Result<Vec<u8>, api::Answer> {
    let deadline = app.store.load().settings.client_body_timeout;
    match tokio::time::timeout(deadline, read_body_bounded(session)).await {
        Ok(read) => read,
        Err(_) => {
            app.metrics.client_timeouts.with_label_values(&["manage", "body"]).inc();
            // What is left of the body would be read as the next request.
            session.set_keepalive(None);
            Err(api::ApiError::new(
                408,
                "invalid_request",
                "request_timeout",
                format!("the request body was not received within {} ms", deadline.as_millis()),
            )
            .into_answer())
        }
    }
}

async fn read_body_bounded(session: &mut ServerSession) -> Result<Vec<u8>, api::Answer> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > api::MAX_BODY {
                    return Err(api::ApiError::new(
                        413,
                        "invalid_request",
                        "body_too_large",
                        format!("the request body is over the {} byte limit", api::MAX_BODY),
                    )
                    .into_answer());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(api::ApiError::new(
                    400,
                    "invalid_request",
                    "invalid_body",
                    format!("the request body could not be read: {e}"),
                )
                .into_answer())
            }
        }
    }
}

impl ManageApp {
    /// A management endpoint (`rest`: the path below `/manage/v1/`). Only what the route
    /// table lists is dispatched, so the OpenAPI document covers every answered path.
    pub(crate) async fn resource(&self, call: &api::Call<'_>, path: &str, rest: &str) -> api::Answer {
        match openapi::find(call.method, rest) {
            Err(None) => return api::ApiError::not_found("endpoint", path).into_answer(),
            Err(Some(allowed)) => {
                let mut answer = api::ApiError::method_not_allowed(call.method, &allowed).into_answer();
                answer.headers.push(("allow", allowed));
                return answer;
            }
            Ok(route) if route.operation_id == "getOpenApi" => {
                return api::Answer::json(200, &serde_json::to_value(openapi::document()).unwrap_or_default())
            }
            Ok(_) => {}
        }
        let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let answer = match segments.as_slice() {
            ["projects", tail @ ..] => Some(projects::handle(self, call, path, tail).await),
            ["api-keys", tail @ ..] => {
                Some(keys::handle(self, call, crate::state::Kind::ApiKey, path, tail).await)
            }
            ["management-keys", tail @ ..] => {
                Some(keys::handle(self, call, crate::state::Kind::ManagementKey, path, tail).await)
            }
            ["audit-logs", tail @ ..] => Some(audit::handle(self, call, path, tail).await),
            ["routing-configs", tail @ ..] => Some(routing_configs::handle(self, call, path, tail).await),
            ["providers", tail @ ..] => Some(providers::handle(self, call, path, tail).await),
            ["budgets", tail @ ..] => Some(budgets::handle(self, call, path, tail).await),
            ["node"] => Some(self.node_view().await),
            ["experiments", tail @ ..] => Some(experiments::handle(self, call, path, tail).await),
            ["scheduled_experiments", tail @ ..] => Some(scheduled::handle(self, call, path, tail).await),
            ["webhooks", tail @ ..] => Some(webhooks::handle(self, call, path, tail).await),
            _ => None,
        };
        match answer {
            Some(answer) => answer,
            None => match logs::answer(self.trace_store.as_ref(), call.method, path, call.query).await {
                Some(answer) => api::Answer { status: answer.status, body: answer.body, headers: Vec::new() },
                None => api::ApiError::not_found("endpoint", path).into_answer(),
            },
        }
    }
}

impl ManageApp {
    /// `GET /node`: which node answered and how it stands with what nodes share.
    async fn node_view(&self) -> api::Answer {
        let counters = self.spend.counters.status();
        let revision = self.state.revision().await.ok();
        let snapshot = self.store.load();
        api::Answer::data(
            200,
            serde_json::json!({
                "object": "node",
                "node": &*self.node,
                "counters": {
                    "backend": counters.backend,
                    "reachable": counters.reachable,
                    "on_counter_error": counters.on_error,
                },
                "state": { "backend": self.state.backend(), "revision": revision },
                "config_generation": snapshot.generation,
            }),
        )
    }
}

/// An API answer as an HTTP response.
fn finish(answer: api::Answer) -> http::Response<Vec<u8>> {
    let mut resp = json(answer.status, answer.body);
    for (name, value) in answer.headers {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
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

/// The 503 body over `server.manage_max_connections`, in the management envelope.
pub fn overloaded_body(_path: &str) -> bytes::Bytes {
    bytes::Bytes::from(
        api::ApiError::new(
            503,
            "server_error",
            "too_many_connections",
            "the management listener is at its connection limit; retry shortly",
        )
        .into_answer()
        .body,
    )
}

/// The management listener's HTTP exchange (pingora's `HttpServer` app, but answering a
/// malformed request head with 400 in the management envelope instead of a bare close and
/// an error log line per bad client, and leaving keep-alive to `conn::Guarded`).
#[async_trait]
impl HttpServerApp for ManageApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "malformed management request head");
                if matches!(e.etype(), pingora::ErrorType::InvalidHTTPHeader) {
                    let answer = api::ApiError::new(
                        400,
                        "invalid_request",
                        "invalid_http_request",
                        "the request line or headers are not valid HTTP/1.1",
                    )
                    .into_answer();
                    let _ = write_answer(&mut session, finish(answer)).await;
                }
                session.shutdown().await;
                return None;
            }
        }
        crate::conn::head_read(&mut session);
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let response = match crate::conn::framing_problem(session.req_header()) {
            Some(problem) => {
                session.set_keepalive(None);
                finish(
                    api::ApiError::new(400, "invalid_request", "invalid_http_request", problem).into_answer(),
                )
            }
            None => self.response(&mut session).await,
        };
        if let Err(e) = write_answer(&mut session, response).await {
            tracing::debug!(error = %e, "management client went away before its answer");
            return None;
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(reusable) => reusable.map(|s| ReusedHttpStream::from_reusable_stream(s, persistent)),
            Err(e) => {
                tracing::debug!(error = %e, "management connection not reusable");
                None
            }
        }
    }
}

async fn write_answer(session: &mut ServerSession, response: http::Response<Vec<u8>>) -> pingora::Result<()> {
    let (parts, body) = response.into_parts();
    let mut header: pingora::http::ResponseHeader = parts.into();
    if !header.headers.contains_key(http::header::CONTENT_LENGTH) {
        header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    }
    session.write_response_header(Box::new(header)).await?;
    crate::conn::allow_for_answer(session, body.len());
    session.write_response_body(bytes::Bytes::from(body), true).await?;
    session.finish_body().await
}

impl ManageApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let query = req.uri.query().unwrap_or_default().to_string();
        let method = req.method.clone();
        let auth_header = req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (idempotency_key, if_match, user_agent) =
            (header("idempotency-key"), header("if-match"), header("user-agent").unwrap_or_default());
        let ip =
            session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string()).unwrap_or_default();
        let mcp_head = (path == "/mcp").then(|| {
            let mut head = http::Request::builder().method(method.clone()).uri(req.uri.clone());
            for (name, value) in req.headers.iter() {
                head = head.header(name, value);
            }
            head
        });
        let body = match read_body(session, self).await {
            Ok(b) => b,
            Err(answer) => return finish(answer),
        };
        match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => {
                let snapshot = self.store.load();
                self.metrics.refresh_health(&snapshot.health, &snapshot.health_settings);
                self.metrics.trace_queue_depth.set(self.traces.depth() as i64);
                if let Some((bytes, entries)) = self.cache.size() {
                    self.metrics.cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    self.metrics.cache_entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
                }
                respond(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            ("GET", "/healthz") => json(200, br#"{"status":"ok"}"#.to_vec()),
            ("GET", "/readyz") => {
                let generation = self.store.load().generation;
                json(200, format!(r#"{{"status":"ready","config_generation":{generation}}}"#).into_bytes())
            }
            (_, p)
                if p.starts_with("/manage/v1/")
                    || p == "/manage/v1"
                    || p.starts_with("/api/manage/v1")
                    || (p == "/mcp" && self.mcp.is_some()) =>
            {
                let snapshot = self.store.load();
                let principal = auth::bearer_token(auth_header.as_deref())
                    .and_then(|t| snapshot.management_keys.authenticate(t));
                let Some(principal) = principal else {
                    let mut resp = json(
                        401,
                        openai_error_body(
                            "authentication_error",
                            "missing or invalid management key; send Authorization: Bearer mlx_mk_...",
                            "invalid_api_key",
                        ),
                    );
                    resp.headers_mut()
                        .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
                    return resp;
                };
                let limit = principal.limits.requests_per_minute;
                let verdict = if limit > 0 {
                    let shared = self.spend.counters.take_shared(
                        RateKind::Requests,
                        &principal.limits.rate_key,
                        limit,
                        1,
                        crate::spend::unix_now_us(),
                    );
                    match shared.await {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::debug!(reason = %e.0, "management call refused: shared counters out of reach");
                            return json(
                                503,
                                openai_error_body(
                                    "server_error",
                                    "the rate-limit counters cannot be reached right now; retry shortly",
                                    "counters_unavailable",
                                ),
                            );
                        }
                    }
                } else {
                    None
                };
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
                    _ if p == "/mcp" => {
                        let request = mcp_head.map(|h| h.body(bytes::Bytes::from(body)));
                        match (&self.mcp, request) {
                            (Some(mcp), Some(Ok(request))) => {
                                let caller = mcp::Caller {
                                    principal: (*principal).clone(),
                                    ip: ip.clone(),
                                    user_agent: user_agent.clone(),
                                };
                                mcp.serve(request, caller).await
                            }
                            _ => json(
                                400,
                                openai_error_body(
                                    "invalid_request_error",
                                    "malformed MCP request",
                                    "invalid_request",
                                ),
                            ),
                        }
                    }
                    _ => {
                        let call = api::Call {
                            method: method.as_str(),
                            query: &query,
                            body: &body,
                            principal: &principal,
                            idempotency_key: idempotency_key.as_deref(),
                            if_match: if_match.as_deref(),
                            origin: crate::state::Origin { ip, user_agent },
                        };
                        let rest = p.strip_prefix("/api").unwrap_or(p);
                        let rest = rest.strip_prefix("/manage/v1").unwrap_or(rest).trim_start_matches('/');
                        finish(self.resource(&call, p, rest).await)
                    }
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
