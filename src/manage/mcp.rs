//! The MCP server (PRODUCT.md §11.3): one tool per management operation, named `verb_noun`
//! after the REST route it calls (`list_projects`, `rollback_routing_config`, …), each
//! tool's input schema built from the route's path and query parameters and its request
//! body's type (the ones the OpenAPI document is built from), and its output the REST JSON.
//! Plus `get_setup_status`, a summary of what is configured.
//!
//! Served at `/mcp` on the management listener (streamable HTTP, through rmcp, stateless
//! with JSON answers) behind the management key, and by `modelux mcp --stdio`, which calls
//! a running gateway's management API with the key it is given. Either way a tool call is
//! a management call made with that key: audited, rate limited and answered alike.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ErrorData as McpError;
use serde_json::{json, Map, Value};

use super::openapi::{self, Route, ROUTES};
use super::ManageApp;
use crate::auth::Principal;

/// The tool for each route: `createProvider` → `add_provider` (PRODUCT.md's name),
/// `getLogTrace` → `get_trace`, else the operation id in snake case.
pub fn tool_name(r: &Route) -> String {
    match r.operation_id {
        "createProvider" => "add_provider".into(),
        "getLogTrace" => "get_trace".into(),
        id => {
            let mut out = String::with_capacity(id.len() + 4);
            for c in id.chars() {
                if c.is_ascii_uppercase() {
                    out.push('_');
                    out.push(c.to_ascii_lowercase());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

const SETUP_STATUS: &str = "get_setup_status";

/// Every route but the OpenAPI document, as a tool.
fn routes() -> impl Iterator<Item = &'static Route> {
    ROUTES.iter().filter(|r| r.operation_id != "getOpenApi")
}

fn tool(r: &Route) -> Tool {
    let schema = match openapi::tool_input_schema(r) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let description =
        format!("{} ({} /manage/v1{}). Returns the REST API's JSON.", r.summary, r.method, r.path);
    // Anything but a read, a create, a dry-run validation or a test event changes or
    // replaces what exists: clients should confirm those.
    let read_only = r.method == "GET" || r.operation_id.starts_with("validate");
    let additive = r.creates || r.operation_id.starts_with("test");
    let annotations = ToolAnnotations::new().read_only(read_only).destructive(!read_only && !additive);
    Tool::new(tool_name(r), description, Arc::new(schema)).annotate(annotations)
}

fn setup_tool() -> Tool {
    let schema = json!({"type": "object", "properties": {}});
    let schema = match schema {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Tool::new(
        SETUP_STATUS,
        "What this gateway has configured: projects, keys, providers, routing configs, budgets, webhook \
         endpoints, where state and counters live, and what to set up next.",
        Arc::new(schema),
    )
    .annotate(ToolAnnotations::new().read_only(true))
}

/// Every tool (built once: schemas do not change while the process runs).
pub fn tools() -> &'static [Tool] {
    static TOOLS: std::sync::OnceLock<Vec<Tool>> = std::sync::OnceLock::new();
    TOOLS.get_or_init(|| {
        let mut all: Vec<Tool> = routes().map(tool).collect();
        all.push(setup_tool());
        all
    })
}

/// Who calls a tool over HTTP: the key and where the call came from (for the audit log).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub ip: String,
    pub user_agent: String,
}

/// How a tool call reaches the management API.
#[async_trait]
pub trait Dispatch: Send + Sync {
    /// `method` on `rest` (below `/manage/v1/`) with `query` and `body`, as `principal`
    /// (HTTP) or as the dispatcher's own key (stdio): the status and JSON answer.
    async fn call(
        &self,
        caller: Option<&Caller>,
        method: &str,
        rest: &str,
        query: &str,
        body: &[u8],
    ) -> (u16, Value);
}

/// In the gateway: the management handlers themselves.
pub struct InProcess(pub Arc<ManageApp>);

#[async_trait]
impl Dispatch for InProcess {
    async fn call(
        &self,
        caller: Option<&Caller>,
        method: &str,
        rest: &str,
        query: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let Some(caller) = caller else {
            return (
                401,
                json!({"error": {"type": "authentication_error", "code": "invalid_api_key", "message": "missing management key"}}),
            );
        };
        let call = super::api::Call {
            method,
            query,
            body,
            principal: &caller.principal,
            idempotency_key: None,
            if_match: None,
            origin: crate::state::Origin {
                ip: caller.ip.clone(),
                user_agent: if caller.user_agent.is_empty() {
                    "mcp".into()
                } else {
                    format!("mcp; {}", caller.user_agent)
                },
            },
        };
        let path = format!("/manage/v1/{rest}");
        let answer = self.0.resource(&call, &path, rest).await;
        (answer.status, serde_json::from_slice(&answer.body).unwrap_or(Value::Null))
    }
}

/// `modelux mcp --stdio`: a running gateway's management API, with a management key.
pub struct Remote {
    pub base_url: String,
    pub key: String,
}

#[async_trait]
impl Dispatch for Remote {
    async fn call(
        &self,
        _: Option<&Caller>,
        method: &str,
        rest: &str,
        query: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let mut url = format!("{}/manage/v1/{rest}", self.base_url.trim_end_matches('/'));
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let (method, auth, body) = (method.to_string(), format!("Bearer {}", self.key), body.to_vec());
        let sent = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_global(Some(std::time::Duration::from_secs(60)))
                .build()
                .into();
            let req = http::Request::builder()
                .method(method.as_str())
                .uri(&url)
                .header("authorization", auth)
                .header("content-type", "application/json")
                .header("user-agent", "modelux-mcp-stdio")
                .body(body)
                .map_err(|e| e.to_string())?;
            let mut resp = agent.run(req).map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
            Ok::<_, String>((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
        })
        .await;
        match sent {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => (
                502,
                json!({"error": {"type": "api_error", "code": "gateway_unreachable", "message": format!("cannot reach the management API: {e}")}}),
            ),
            Err(e) => (
                500,
                json!({"error": {"type": "api_error", "code": "internal_error", "message": e.to_string()}}),
            ),
        }
    }
}

/// The path below `/manage/v1/`, query string and body of a call of `route` with `args`.
/// `nested_body`: the tool's schema has the body under `body` (its fields are not an
/// object's properties), as `openapi::tool_input_schema` decided.
fn request(
    route: &Route,
    nested_body: bool,
    mut args: Map<String, Value>,
) -> Result<(String, String, Vec<u8>), String> {
    let text = |v: Value| match v {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let mut rest = route.path.trim_start_matches('/').to_string();
    for p in openapi::path_params(route) {
        let value = args
            .remove(p)
            .map(text)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("argument \"{p}\" is required"))?;
        // Ids, slugs, versions and request ids are all URL-safe; anything else could only
        // aim the call at another path.
        if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~@:".contains(&b))
            || value.bytes().all(|b| b == b'.')
        {
            return Err(format!("argument \"{p}\" is not an id or slug: {value:?}"));
        }
        rest = rest.replace(&format!("{{{p}}}"), &value);
    }
    let query = {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        let paged: &[&str] = if route.paged { &["limit", "cursor"] } else { &[] };
        for name in paged.iter().copied().chain(route.query.iter().map(|(n, _)| *n)) {
            if let Some(v) = args.remove(name) {
                if !v.is_null() {
                    query.append_pair(name, &text(v));
                }
            }
        }
        query.finish()
    };
    let body = if route.body.is_none() {
        if let Some(extra) = args.keys().next() {
            return Err(format!("unknown argument \"{extra}\""));
        }
        Vec::new()
    } else if nested_body {
        serde_json::to_vec(args.get("body").unwrap_or(&Value::Null)).unwrap_or_default()
    } else {
        serde_json::to_vec(&Value::Object(args)).unwrap_or_default()
    };
    Ok((rest, query, body))
}

/// The MCP server's handler: the tools over a dispatcher.
#[derive(Clone)]
pub struct Tools {
    dispatch: Arc<dyn Dispatch>,
}

impl Tools {
    pub fn new(dispatch: Arc<dyn Dispatch>) -> Tools {
        Tools { dispatch }
    }

    /// Runs tool `name` with `args` as `principal`: the REST status and JSON.
    pub async fn run(
        &self,
        caller: Option<&Caller>,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<(u16, Value), String> {
        if name == SETUP_STATUS {
            return Ok((200, self.setup_status(caller).await));
        }
        let Some(route) = routes().find(|r| tool_name(r) == name) else {
            return Err(format!("unknown tool \"{name}\""));
        };
        let nested_body = route.body.is_some()
            && tools()
                .iter()
                .find(|t| t.name == name)
                .and_then(|t| t.input_schema.get("properties"))
                .is_some_and(|p| p.get("body").is_some());
        match request(route, nested_body, args) {
            Ok((rest, query, body)) => {
                Ok(self.dispatch.call(caller, route.method, &rest, &query, &body).await)
            }
            // Bad arguments are the tool's error (the model sees it and can correct itself).
            Err(message) => Ok((
                400,
                json!({"error": {"type": "invalid_request", "code": "invalid_arguments", "message": message}}),
            )),
        }
    }

    /// A summary of what is configured, from the same API calls a user would make.
    async fn setup_status(&self, caller: Option<&Caller>) -> Value {
        let mut out = Map::new();
        let mut next = Vec::new();
        for (key, rest) in [
            ("projects", "projects"),
            ("api_keys", "api-keys"),
            ("management_keys", "management-keys"),
            ("providers", "providers"),
            ("routing_configs", "routing-configs"),
            ("budgets", "budgets"),
            ("webhook_endpoints", "webhooks/endpoints"),
            ("scheduled_experiments", "scheduled_experiments"),
        ] {
            let (status, v) = self.dispatch.call(caller, "GET", rest, "limit=200", b"").await;
            if status != 200 {
                out.insert(key.into(), json!({"error": v["error"]}));
                continue;
            }
            let items = v["data"].as_array().cloned().unwrap_or_default();
            let mut summary = json!({ "count": items.len(), "more": v["has_more"] });
            let names: Vec<Value> = items
                .iter()
                .map(|i| {
                    let name = ["slug", "name", "id"].iter().find_map(|f| i[*f].as_str().map(str::to_string));
                    json!(name.unwrap_or_default())
                })
                .collect();
            match key {
                "providers" => {
                    summary["items"] = items
                        .iter()
                        .map(|p| json!({"id": p["id"], "kind": p["kind"], "managed_by": p["managed_by"]}))
                        .collect();
                }
                "routing_configs" => {
                    summary["items"] =
                        items.iter().map(|c| json!({"slug": c["slug"], "project": c["project"], "strategy": c["strategy"], "version": c["version"]})).collect();
                }
                _ => summary["names"] = Value::Array(names),
            }
            if items.is_empty() {
                match key {
                    "providers" => {
                        next.push("add a provider (add_provider) so requests have somewhere to go")
                    }
                    "projects" => {
                        next.push("create a project (create_project) to own keys and routing configs")
                    }
                    "api_keys" => next.push(
                        "create a project key (create_api_key) for applications to call the proxy with",
                    ),
                    "routing_configs" => next.push(
                        "create a routing config (create_routing_config) and call it as model \"@slug\"",
                    ),
                    "budgets" => next.push("add a budget (create_budget) to cap spend"),
                    "webhook_endpoints" => next.push(
                        "register a webhook endpoint (create_webhook_endpoint) for budget and change alerts",
                    ),
                    _ => {}
                }
            }
            out.insert(key.into(), summary);
        }
        let (status, node) = self.dispatch.call(caller, "GET", "node", "", b"").await;
        if status == 200 {
            out.insert("node".into(), node["data"].clone());
        }
        out.insert("next_steps".into(), json!(next));
        Value::Object(out)
    }
}

impl rmcp::ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("modelux", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Manage the modelux LLM gateway: projects, keys, providers, routing configs (with versions \
                 and rollback), budgets, logs and traces, experiments and webhooks. Each tool calls the \
                 management REST endpoint named in its description and returns that endpoint's JSON; \
                 start with get_setup_status.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(tools().to_vec()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools().iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let caller = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Caller>())
            .cloned();
        let args = request.arguments.unwrap_or_default();
        match self.run(caller.as_ref(), &request.name, args).await {
            Ok((status, body)) if status < 400 => Ok(CallToolResult::structured(body).into()),
            Ok((_, body)) => Ok(CallToolResult::structured_error(body).into()),
            Err(message) => Err(McpError::invalid_params(message, None)),
        }
    }
}

/// `/mcp` on the management listener.
pub struct McpHttp {
    service: StreamableHttpService<Tools, NeverSessionManager>,
}

impl McpHttp {
    pub fn new(app: Arc<ManageApp>) -> McpHttp {
        let tools = Tools::new(Arc::new(InProcess(app)));
        // Stateless with JSON answers: every POST is answered whole, nothing is held per
        // client, and any node of several can answer. The management key guards the
        // endpoint (checked before this service), so any Host is accepted.
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None)
            .disable_allowed_hosts()
            .with_max_request_body_bytes(super::api::MAX_BODY);
        McpHttp { service: StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config) }
    }

    /// Serves one HTTP request of `caller`: status, headers and body.
    pub async fn serve(&self, mut request: http::Request<Bytes>, caller: Caller) -> http::Response<Vec<u8>> {
        request.extensions_mut().insert(caller);
        let request = request.map(http_body_util::Full::new);
        let mut service = self.service.clone();
        let response = match tower_service::Service::call(&mut service, request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let (parts, body) = response.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes().to_vec(),
            Err(never) => match never {},
        };
        let mut out = http::Response::from_parts(parts, bytes);
        let json = out
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        if out.status().as_u16() >= 400 && !json {
            // The transport's own refusals (406, 415, …) come as plain text: the management
            // listener answers errors in its envelope.
            let status = out.status().as_u16();
            let code = match status {
                405 => "method_not_allowed",
                406 => "not_acceptable",
                415 => "unsupported_media_type",
                _ => "invalid_request",
            };
            let message = String::from_utf8_lossy(out.body()).trim().to_string();
            *out.body_mut() =
                super::api::ApiError::new(status, "invalid_request", code, message).into_answer().body;
            out.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        }
        out.headers_mut().remove(http::header::TRANSFER_ENCODING);
        let len = out.body().len();
        out.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
        out
    }
}

/// `modelux mcp --stdio`: the tools over stdin and stdout, calling the gateway at
/// `base_url` with management key `key`.
pub async fn serve_stdio(base_url: String, key: String) -> Result<(), String> {
    use rmcp::ServiceExt as _;
    let tools = Tools::new(Arc::new(Remote { base_url, key }));
    let running = tools.serve(rmcp::transport::stdio()).await.map_err(|e| e.to_string())?;
    running.waiting().await.map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_a_tool_with_the_product_names() {
        let names: Vec<String> = tools().iter().map(|t| t.name.to_string()).collect();
        for expected in [
            "list_providers",
            "get_provider",
            "add_provider",
            "update_provider",
            "delete_provider",
            "list_projects",
            "get_project",
            "create_project",
            "update_project",
            "delete_project",
            "get_provider_health",
            "list_api_keys",
            "create_api_key",
            "revoke_api_key",
            "list_routing_configs",
            "get_routing_config",
            "create_routing_config",
            "update_routing_config",
            "delete_routing_config",
            "list_routing_config_versions",
            "rollback_routing_config",
            "list_budgets",
            "get_budget",
            "create_budget",
            "update_budget",
            "delete_budget",
            "list_logs",
            "get_log",
            "get_trace",
            "get_analytics_report",
            "create_experiment",
            "get_experiment",
            "promote_experiment",
            "create_scheduled_experiment",
            "list_webhook_endpoints",
            "create_webhook_endpoint",
            "list_audit_logs",
            "get_setup_status",
        ] {
            assert!(names.iter().any(|n| n == expected), "no tool {expected}: {names:?}");
        }
        assert_eq!(names.len(), ROUTES.len(), "one per route (less the OpenAPI document) plus setup status");
        let create = tools().iter().find(|t| t.name == "create_project").unwrap();
        let schema = Value::Object((*create.input_schema).clone());
        assert!(schema["properties"]["name"].is_object(), "{schema}");
        let rollback = tools().iter().find(|t| t.name == "rollback_routing_config").unwrap();
        let schema = Value::Object((*rollback.input_schema).clone());
        assert_eq!(schema["required"][0], "id", "{schema}");
        assert!(schema["properties"]["version"].is_object(), "{schema}");
    }
}
