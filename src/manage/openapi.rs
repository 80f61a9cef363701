//! The management API's routes, in one table, and the OpenAPI 3.1 document generated from
//! it and from the handlers' request types (`utoipa::ToSchema`). The dispatcher answers
//! only what this table lists (anything else is 404 or 405 before a handler runs), so the
//! document cannot leave out a routed path.

use utoipa::openapi::path::{OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ComponentsBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HttpMethod, InfoBuilder, OpenApiBuilder, PathItem, PathsBuilder, RefOr, Required,
    ResponseBuilder,
};
use utoipa::ToSchema;

use super::budgets::BudgetBody;
use super::keys::{KeyCreate, KeyPatch};
use super::projects::{ProjectCreate, ProjectPatch};
use super::providers::{ProviderCreate, ProviderPatch};
use super::routing_configs::Rollback;

/// A request body: its schema's name and the schemas it needs.
pub struct Body {
    name: String,
    schemas: Vec<(String, RefOr<Schema>)>,
}

fn body<T: ToSchema>() -> Body {
    let mut schemas = vec![(T::name().to_string(), T::schema())];
    T::schemas(&mut schemas);
    Body { name: T::name().to_string(), schemas }
}

/// A routing config's body: its YAML entry (fields depend on the strategy) plus `slug`.
fn routing_config_body() -> Body {
    let string = || ObjectBuilder::new().schema_type(Type::String).build();
    let schema = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "The YAML entry of a routing config plus its slug; the other fields depend on the strategy \
             (see the README's Routing section). PATCH takes any subset (a JSON merge patch).",
        ))
        .property("slug", string())
        .property("project", string())
        .property(
            "strategy",
            ObjectBuilder::new().schema_type(Type::String).enum_values(Some([
                "single",
                "fallback",
                "fallback_chain",
                "cost_optimized",
                "latency_optimized",
                "ensemble",
                "ab_test",
                "cascade",
                "custom_rules",
            ])),
        )
        .additional_properties(Some(utoipa::openapi::schema::AdditionalProperties::FreeForm(true)))
        .build();
    let name = "RoutingConfigBody".to_string();
    Body { name: name.clone(), schemas: vec![(name, RefOr::T(Schema::Object(schema)))] }
}

/// An experiment's create body (PRODUCT.md §8.6); snake_case spellings are accepted too.
fn experiment_body() -> Body {
    let of = |t: Type, description: &str| {
        ObjectBuilder::new().schema_type(t).description(Some(description)).build()
    };
    let any = |description: &str| ObjectBuilder::new().description(Some(description)).build();
    let schema = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Replays stored traffic through a candidate routing config. Every field is also accepted \
             in snake_case (project_id, candidate_policy, window_start, ...).",
        ))
        .property("name", of(Type::String, "free text"))
        .property("projectId", of(Type::String, "project id or slug"))
        .property(
            "candidate",
            any("a routing-config body, \"@slug\", \"@slug@vN\" or {\"routing_config\": \"@slug\", \"version\": n}"),
        )
        .property("candidatePolicy", of(Type::String, "a strategy (with candidateConfig)"))
        .property("candidateConfig", of(Type::Object, "the strategy's fields; provider_credential_id names the provider"))
        .property("routing_config", of(Type::String, "@slug the candidate stands in for and promote writes"))
        .property("filters", of(Type::Object, "routing_config, model, end_user, tags"))
        .property("mode", of(Type::String, "routing_only (default) or with_responses"))
        .property(
            "sampleSize",
            of(Type::Integer, "1 to 50000; default every request in the window (routing_only), 100 (with_responses)"),
        )
        .property("concurrency", of(Type::Integer, "with_responses: requests in flight at once, 1 to 32 (default 4)"))
        .property(
            "similarityThreshold",
            of(Type::Number, "with_responses: cosine similarity counted as the same answer (default 0.9)"),
        )
        .property("windowStart", of(Type::String, "RFC 3339 time or unix ms; default 24 h before windowEnd"))
        .property("windowEnd", of(Type::String, "RFC 3339 time or unix ms; default now"))
        .property("windowHours", of(Type::Number, "instead of windowStart"))
        .property("hypothesis", of(Type::String, "free text, at most 2000 characters"))
        .build();
    let name = "ExperimentCreate".to_string();
    Body { name: name.clone(), schemas: vec![(name, RefOr::T(Schema::Object(schema)))] }
}

/// A scheduled experiment: an experiment's create body (without a window) plus its schedule.
fn schedule_body() -> Body {
    let of = |t: Type, description: &str| {
        ObjectBuilder::new().schema_type(t).description(Some(description)).build()
    };
    let schema = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "An experiment's create body (candidate, filters, mode, sampleSize, name, hypothesis; no \
             window) fired on a cron expression over the last windowHours. snake_case accepted too.",
        ))
        .property("cronExpression", of(Type::String, "five fields, UTC (e.g. \"0 9 * * *\")"))
        .property("windowHours", of(Type::Number, "hours replayed at each fire (default 24)"))
        .property(
            "successCriteria",
            of(Type::Object, "{logic: and, min_sample_size, predicates: [{metric, op, value, params}]}"),
        )
        .property("enabled", of(Type::Boolean, "default true"))
        .property("projectId", of(Type::String, "project id or slug"))
        .property("candidatePolicy", of(Type::String, "a strategy (with candidateConfig)"))
        .property("candidateConfig", of(Type::Object, "the strategy's fields"))
        .property(
            "candidate",
            ObjectBuilder::new().description(Some("a routing-config body or \"@slug\"")).build(),
        )
        .property("name", of(Type::String, "free text"))
        .additional_properties(Some(utoipa::openapi::schema::AdditionalProperties::FreeForm(true)))
        .build();
    let name = "ScheduledExperimentBody".to_string();
    Body { name: name.clone(), schemas: vec![(name, RefOr::T(Schema::Object(schema)))] }
}

fn promote_body() -> Body {
    let schema = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "routing_config",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("@slug to write; default the config the experiment replayed")),
        )
        .build();
    let name = "ExperimentPromote".to_string();
    Body { name: name.clone(), schemas: vec![(name, RefOr::T(Schema::Object(schema)))] }
}

/// One route. `path` is relative to `/manage/v1`, with `{name}` parameters.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub operation_id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub body: Option<fn() -> Body>,
    /// A cursor-paged list (`limit`, `cursor`).
    pub paged: bool,
    /// Query parameters besides the page.
    pub query: &'static [(&'static str, &'static str)],
    /// Created (201) instead of 200.
    pub creates: bool,
    /// Accepted for asynchronous work (202).
    pub accepted: bool,
}

const fn route(
    method: &'static str,
    path: &'static str,
    operation_id: &'static str,
    tag: &'static str,
    summary: &'static str,
) -> Route {
    Route {
        method,
        path,
        operation_id,
        tag,
        summary,
        body: None,
        paged: false,
        query: &[],
        creates: false,
        accepted: false,
    }
}

const fn list(
    path: &'static str,
    operation_id: &'static str,
    tag: &'static str,
    summary: &'static str,
    query: &'static [(&'static str, &'static str)],
) -> Route {
    Route { paged: true, query, ..route("GET", path, operation_id, tag, summary) }
}

const fn with_body(mut r: Route, body: fn() -> Body, creates: bool) -> Route {
    r.body = Some(body);
    r.creates = creates;
    r
}

const PROJECT: &[(&str, &str)] = &[("project", "only this project's (id or slug)")];

/// The filters the logs and the analytics report share, then `extra`.
macro_rules! log_filters {
    ($($extra:expr),* $(,)?) => {
        &[
            ("start", "RFC 3339 time or unix ms"),
            ("end", "RFC 3339 time or unix ms"),
            ("project", "project"),
            ("status", "2xx, 4xx, 5xx or a status code"),
            ("model", "requested or served model"),
            ("provider", "provider id"),
            ("routing_config", "@slug"),
            ("end_user", "end user id"),
            ("tags", "JSON object or tag=k=v"),
            ("trace_id", "X-Modelux-Trace-Id"),
            ("conversation_id", "X-Modelux-Conversation-Id"),
            ("min_latency_ms", "slowest only"),
            $($extra),*
        ]
    };
}

pub static ROUTES: &[Route] = &[
    list(
        "/projects",
        "listProjects",
        "projects",
        "List projects",
        &[("include_deleted", "also soft-deleted projects")],
    ),
    with_body(
        route("POST", "/projects", "createProject", "projects", "Create a project"),
        body::<ProjectCreate>,
        true,
    ),
    route("GET", "/projects/{id}", "getProject", "projects", "Get a project by id or slug"),
    with_body(
        route("PATCH", "/projects/{id}", "updateProject", "projects", "Change a project"),
        body::<ProjectPatch>,
        false,
    ),
    route(
        "DELETE",
        "/projects/{id}",
        "deleteProject",
        "projects",
        "Soft-delete a project and revoke its keys",
    ),
    list(
        "/api-keys",
        "listApiKeys",
        "api-keys",
        "List project keys",
        &[("project", "only this project's (id or slug)"), ("include_revoked", "also revoked keys")],
    ),
    with_body(
        route("POST", "/api-keys", "createApiKey", "api-keys", "Create a project key (shown once)"),
        body::<KeyCreate>,
        true,
    ),
    Route {
        query: PROJECT,
        ..route("GET", "/api-keys/{id}", "getApiKey", "api-keys", "Get a project key (id, or name with project)")
    },
    Route {
        query: PROJECT,
        ..with_body(
            route(
                "PATCH",
                "/api-keys/{id}",
                "updateApiKey",
                "api-keys",
                "Rename a project key or change its limits",
            ),
            body::<KeyPatch>,
            false,
        )
    },
    Route {
        query: PROJECT,
        ..route("DELETE", "/api-keys/{id}", "revokeApiKey", "api-keys", "Revoke a project key (id, or name with project)")
    },
    list(
        "/management-keys",
        "listManagementKeys",
        "management-keys",
        "List management keys",
        &[("include_revoked", "also revoked keys")],
    ),
    with_body(
        route(
            "POST",
            "/management-keys",
            "createManagementKey",
            "management-keys",
            "Create a management key (shown once)",
        ),
        body::<KeyCreate>,
        true,
    ),
    route("GET", "/management-keys/{id}", "getManagementKey", "management-keys", "Get a management key"),
    with_body(
        route(
            "PATCH",
            "/management-keys/{id}",
            "updateManagementKey",
            "management-keys",
            "Rename a management key or change its limit",
        ),
        body::<KeyPatch>,
        false,
    ),
    route(
        "DELETE",
        "/management-keys/{id}",
        "revokeManagementKey",
        "management-keys",
        "Revoke a management key",
    ),
    list("/providers", "listProviders", "providers", "List providers", &[]),
    with_body(
        route(
            "POST",
            "/providers",
            "createProvider",
            "providers",
            "Add a provider (its key checked, then stored sealed)",
        ),
        body::<ProviderCreate>,
        true,
    ),
    route("GET", "/providers/{id}", "getProvider", "providers", "Get a provider"),
    with_body(
        route(
            "PATCH",
            "/providers/{id}",
            "updateProvider",
            "providers",
            "Change a provider or rotate its key",
        ),
        body::<ProviderPatch>,
        false,
    ),
    route(
        "DELETE",
        "/providers/{id}",
        "deleteProvider",
        "providers",
        "Remove a provider no routing config uses",
    ),
    route(
        "GET",
        "/providers/{id}/health",
        "getProviderHealth",
        "providers",
        "A provider's live and last-hour health",
    ),
    list("/routing-configs", "listRoutingConfigs", "routing-configs", "List routing configs", PROJECT),
    with_body(
        route(
            "POST",
            "/routing-configs",
            "createRoutingConfig",
            "routing-configs",
            "Create a routing config (v1)",
        ),
        routing_config_body,
        true,
    ),
    with_body(
        route(
            "POST",
            "/routing-configs/validate",
            "validateRoutingConfig",
            "routing-configs",
            "Check a draft without saving it",
        ),
        routing_config_body,
        false,
    ),
    route(
        "GET",
        "/routing-configs/{id}",
        "getRoutingConfig",
        "routing-configs",
        "Get a routing config by id, slug or @slug",
    ),
    with_body(
        route(
            "PATCH",
            "/routing-configs/{id}",
            "updateRoutingConfig",
            "routing-configs",
            "Make the next version (active at once)",
        ),
        routing_config_body,
        false,
    ),
    route(
        "DELETE",
        "/routing-configs/{id}",
        "deleteRoutingConfig",
        "routing-configs",
        "Delete a routing config no other config uses",
    ),
    list(
        "/routing-configs/{id}/versions",
        "listRoutingConfigVersions",
        "routing-configs",
        "Every version, newest first",
        &[],
    ),
    Route {
        query: &[("from", "version number"), ("to", "version number")],
        ..route(
            "GET",
            "/routing-configs/{id}/versions/diff",
            "diffRoutingConfigVersions",
            "routing-configs",
            "What changed between two versions",
        )
    },
    route(
        "GET",
        "/routing-configs/{id}/versions/{version}",
        "getRoutingConfigVersion",
        "routing-configs",
        "One version's body",
    ),
    with_body(
        route(
            "POST",
            "/routing-configs/{id}/rollback",
            "rollbackRoutingConfig",
            "routing-configs",
            "Make a new version equal to an old one",
        ),
        body::<Rollback>,
        false,
    ),
    list("/budgets", "listBudgets", "budgets", "List budgets with spend and forecast", &[]),
    with_body(
        route("POST", "/budgets", "createBudget", "budgets", "Create a budget"),
        body::<BudgetBody>,
        true,
    ),
    route("GET", "/budgets/{id}", "getBudget", "budgets", "Get a budget with its spend and forecast"),
    with_body(
        route("PATCH", "/budgets/{id}", "updateBudget", "budgets", "Change a budget (JSON merge patch)"),
        body::<BudgetBody>,
        false,
    ),
    route("DELETE", "/budgets/{id}", "deleteBudget", "budgets", "Delete a budget"),
    route(
        "GET",
        "/node",
        "getNode",
        "node",
        "The node answering: its name, its shared counters' reachability and failure policy, and the state revision its snapshot was built from",
    ),
    list(
        "/audit-logs",
        "listAuditLogs",
        "audit-logs",
        "Every management change, newest first",
        &[
            ("resource_type", "project, api_key, management_key, provider, routing_config, budget"),
            ("resource_id", "the resource's id"),
            ("action", "e.g. routing_config.updated"),
            ("actor_id", "the management key's name"),
            ("start", "RFC 3339 time or unix ms"),
            ("end", "RFC 3339 time or unix ms"),
        ],
    ),
    list(
        "/logs",
        "listLogs",
        "logs",
        "Request logs, newest first",
        log_filters!(),
    ),
    route("GET", "/logs/{request_id}", "getLog", "logs", "One request's log record"),
    route("GET", "/logs/{request_id}/trace", "getLogTrace", "logs", "One request's decision trace"),
    Route {
        query: log_filters!(
            ("granularity", "minute, hour or day"),
            ("group_by", "model, provider, project, routing_config, end_user or tag:<key>"),
            ("include_comparison", "true: the previous period beside this one"),
        ),
        ..route(
            "GET",
            "/analytics/report",
            "getAnalyticsReport",
            "analytics",
            "Requests, errors, cost, tokens and latency percentiles",
        )
    },
    list(
        "/experiments",
        "listExperiments",
        "experiments",
        "Experiments, newest first",
        &[("project", "project slug"), ("status", "queued, running, completed, failed or cancelled")],
    ),
    Route {
        accepted: true,
        ..with_body(
            route(
                "POST",
                "/experiments",
                "createExperiment",
                "experiments",
                "Replay stored traffic through a candidate",
            ),
            experiment_body,
            false,
        )
    },
    route(
        "GET",
        "/experiments/{id}",
        "getExperiment",
        "experiments",
        "An experiment: status, progress, result",
    ),
    route(
        "DELETE",
        "/experiments/{id}",
        "deleteExperiment",
        "experiments",
        "Delete an experiment (cancels it first)",
    ),
    route(
        "POST",
        "/experiments/{id}/cancel",
        "cancelExperiment",
        "experiments",
        "Stop a queued or running experiment",
    ),
    with_body(
        route(
            "POST",
            "/experiments/{id}/promote",
            "promoteExperiment",
            "experiments",
            "Make the candidate the next version of a routing config",
        ),
        promote_body,
        false,
    ),
    list(
        "/experiments/{id}/decisions",
        "listExperimentDecisions",
        "experiments",
        "Per request: baseline and candidate provider, model, cost, latency and reason",
        &[],
    ),
    list(
        "/scheduled_experiments",
        "listScheduledExperiments",
        "experiments",
        "Scheduled experiments",
        &[("project", "project slug")],
    ),
    with_body(
        route(
            "POST",
            "/scheduled_experiments",
            "createScheduledExperiment",
            "experiments",
            "Replay on a cron schedule",
        ),
        schedule_body,
        true,
    ),
    route(
        "GET",
        "/scheduled_experiments/{id}",
        "getScheduledExperiment",
        "experiments",
        "A schedule and its next fire",
    ),
    with_body(
        route(
            "PATCH",
            "/scheduled_experiments/{id}",
            "updateScheduledExperiment",
            "experiments",
            "Change a schedule (fields given replace the stored ones)",
        ),
        schedule_body,
        false,
    ),
    route(
        "DELETE",
        "/scheduled_experiments/{id}",
        "deleteScheduledExperiment",
        "experiments",
        "Delete a schedule",
    ),
    list(
        "/scheduled_experiments/{id}/runs",
        "listScheduledExperimentRuns",
        "experiments",
        "The schedule's runs (experiments), newest first, each with its verdict",
        &[],
    ),
    Route {
        accepted: true,
        ..route(
            "POST",
            "/scheduled_experiments/{id}/run",
            "runScheduledExperiment",
            "experiments",
            "Fire the schedule now",
        )
    },
    list(
        "/webhooks/endpoints",
        "listWebhookEndpoints",
        "webhooks",
        "Webhook endpoints",
        &[("include_deleted", "also deleted endpoints")],
    ),
    with_body(
        route(
            "POST",
            "/webhooks/endpoints",
            "createWebhookEndpoint",
            "webhooks",
            "Register an endpoint (its signing_secret is shown once)",
        ),
        body::<crate::manage::webhooks::EndpointCreate>,
        true,
    ),
    route("GET", "/webhooks/endpoints/{id}", "getWebhookEndpoint", "webhooks", "An endpoint"),
    with_body(
        route(
            "PATCH",
            "/webhooks/endpoints/{id}",
            "updateWebhookEndpoint",
            "webhooks",
            "Change an endpoint's url, event_types, description or active",
        ),
        body::<crate::manage::webhooks::EndpointPatch>,
        false,
    ),
    route(
        "DELETE",
        "/webhooks/endpoints/{id}",
        "deleteWebhookEndpoint",
        "webhooks",
        "Soft-delete an endpoint (queued deliveries still go out)",
    ),
    route(
        "POST",
        "/webhooks/endpoints/{id}/rotate-secret",
        "rotateWebhookSecret",
        "webhooks",
        "A new signing secret (shown once); the old one keeps signing for 24 h",
    ),
    Route {
        accepted: true,
        ..with_body(
            route(
                "POST",
                "/webhooks/endpoints/{id}/test",
                "testWebhookEndpoint",
                "webhooks",
                "Send a synthetic event of a type to this endpoint",
            ),
            body::<crate::manage::webhooks::TestEvent>,
            false,
        )
    },
    list(
        "/webhooks/deliveries",
        "listWebhookDeliveries",
        "webhooks",
        "Deliveries, newest first",
        &[
            ("endpoint_id", "only this endpoint's"),
            ("status", "pending, delivered or failed"),
            ("event_type", "only this event type's"),
        ],
    ),
    route(
        "GET",
        "/webhooks/deliveries/{id}",
        "getWebhookDelivery",
        "webhooks",
        "A delivery: its payload and every attempt",
    ),
    Route {
        accepted: true,
        ..route(
            "POST",
            "/webhooks/deliveries/{id}/replay",
            "replayWebhookDelivery",
            "webhooks",
            "Send the same payload again",
        )
    },
    route("GET", "/webhooks/event-types", "listWebhookEventTypes", "webhooks", "Event types and what sends them"),
    route("GET", "/openapi.json", "getOpenApi", "meta", "This document"),
];

/// The JSON Schema of an MCP tool's arguments for route `r`: its path parameters, its query
/// parameters (and the page's), and its request body's fields (flattened when the body is an
/// object with properties, else under `body`), with the schemas the body refers to in
/// `$defs`. Built from the same types as the OpenAPI document, so the two cannot drift.
pub fn tool_input_schema(r: &Route) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let mut props = Map::new();
    let mut required: Vec<Value> = Vec::new();
    for name in path_params(r) {
        let description = match name {
            "version" => "a version number",
            "request_id" => "the request's id (X-Modelux-Request-Id)",
            _ => "id (or slug where the resource has one)",
        };
        props.insert(name.into(), json!({"type": "string", "description": description}));
        required.push(json!(name));
    }
    if r.paged {
        props.insert(
            "limit".into(),
            json!({"type": "integer", "minimum": 1, "maximum": 200, "description": "page size (default 50)"}),
        );
        props.insert(
            "cursor".into(),
            json!({"type": "string", "description": "next_cursor of the previous page"}),
        );
    }
    for (name, description) in r.query {
        props.insert((*name).into(), json!({"type": "string", "description": description}));
    }
    let mut defs = Map::new();
    let mut open = false;
    if let Some(body) = r.body {
        let body = body();
        for (name, schema) in &body.schemas {
            let text = serde_json::to_string(schema)
                .unwrap_or_default()
                .replace("#/components/schemas/", "#/$defs/");
            defs.insert(name.clone(), serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        match defs.get(&body.name).and_then(|s| s.get("properties")).and_then(Value::as_object).cloned() {
            Some(fields) => {
                for (k, v) in fields {
                    props.entry(k).or_insert(v);
                }
                let main = &defs[&body.name];
                // A PATCH takes any subset of the fields (a merge patch).
                if r.method != "PATCH" {
                    if let Some(list) = main.get("required").and_then(Value::as_array) {
                        required.extend(list.iter().cloned());
                    }
                }
                open = main.get("additionalProperties").is_some_and(|a| a != &Value::Bool(false));
            }
            None => {
                props.insert("body".into(), json!({"$ref": format!("#/$defs/{}", body.name)}));
                required.push(json!("body"));
            }
        }
    }
    let mut schema = json!({"type": "object", "properties": props, "required": required});
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    if open {
        schema["additionalProperties"] = json!(true);
    }
    schema
}

/// The `{name}` parameters of a route's path, in order.
pub fn path_params(r: &Route) -> impl Iterator<Item = &'static str> {
    r.path.split('/').filter(|s| s.starts_with('{')).map(|s| s.trim_matches(|c| c == '{' || c == '}'))
}

/// The route `method` and `path` (below `/manage/v1`, no leading slash) match: `Ok(route)`,
/// `Err(Some(allowed))` when the path exists with other methods, `Err(None)` when not at all.
pub fn find(method: &str, path: &str) -> Result<&'static Route, Option<String>> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let fits = |r: &Route| {
        let pattern: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        pattern.len() == segments.len()
            && pattern.iter().zip(&segments).all(|(p, s)| (p.starts_with('{') && !s.is_empty()) || p == s)
    };
    // A literal segment beats a parameter (`versions/diff` before `versions/{version}`).
    let literal_count = |r: &Route| r.path.split('/').filter(|p| !p.starts_with('{')).count();
    let mut matching: Vec<&'static Route> = ROUTES.iter().filter(|r| fits(r)).collect();
    if matching.is_empty() {
        return Err(None);
    }
    let best = matching.iter().map(|r| literal_count(r)).max().unwrap_or(0);
    matching.retain(|r| literal_count(r) == best);
    match matching.iter().find(|r| r.method == method) {
        Some(r) => Ok(r),
        None => Err(Some(matching.iter().map(|r| r.method).collect::<Vec<_>>().join(", "))),
    }
}

fn http_method(m: &str) -> HttpMethod {
    match m {
        "POST" => HttpMethod::Post,
        "PATCH" => HttpMethod::Patch,
        "DELETE" => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

fn string_param(
    name: &str,
    at: ParameterIn,
    required: bool,
    description: &str,
) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(at)
        .required(if required { Required::True } else { Required::False })
        .description(Some(description))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    let envelope = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Data"))))
                    .build(),
            )
            .build()
    };
    let error = ResponseBuilder::new()
        .description(
            "an error in the nested envelope: {\"error\": {type, code, message, resource, id, errors}}",
        )
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Error"))))
                .build(),
        )
        .build();
    let mut components = ComponentsBuilder::new()
        .security_scheme(
            "BearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("mlx_mk_…").build(),
            ),
        )
        .schema(
            "Data",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .description(Some("`{\"data\": …}`; lists add `next_cursor` and `has_more`"))
                .property(
                    "data",
                    ObjectBuilder::new().schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                        Type::Object,
                        Type::Array,
                    ])),
                )
                .property(
                    "next_cursor",
                    ObjectBuilder::new().schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                        Type::String,
                        Type::Null,
                    ])),
                )
                .property("has_more", ObjectBuilder::new().schema_type(Type::Boolean))
                .required("data"),
        )
        .schema(
            "Error",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(
                    "error",
                    ObjectBuilder::new()
                        .schema_type(Type::Object)
                        .property("type", ObjectBuilder::new().schema_type(Type::String))
                        .property("code", ObjectBuilder::new().schema_type(Type::String))
                        .property("message", ObjectBuilder::new().schema_type(Type::String))
                        .property("resource", ObjectBuilder::new().schema_type(Type::String))
                        .property("id", ObjectBuilder::new().schema_type(Type::String))
                        .required("type")
                        .required("code")
                        .required("message"),
                )
                .required("error"),
        );
    let mut paths = PathsBuilder::new();
    let mut items: Vec<(String, PathItem)> = Vec::new();
    for r in ROUTES {
        let mut op = OperationBuilder::new()
            .operation_id(Some(r.operation_id))
            .summary(Some(r.summary))
            .tag(r.tag)
            .response(
                if r.accepted {
                    "202"
                } else if r.creates {
                    "201"
                } else {
                    "200"
                },
                envelope(if r.accepted {
                    "accepted: poll the resource until its status is final"
                } else if r.creates {
                    "created"
                } else {
                    "ok"
                }),
            )
            .response("default", error.clone());
        for segment in r.path.split('/').filter(|s| s.starts_with('{')) {
            let name = segment.trim_matches(|c| c == '{' || c == '}');
            op = op.parameter(string_param(
                name,
                ParameterIn::Path,
                true,
                "id (or slug where the resource has one)",
            ));
        }
        if r.paged {
            op = op.parameter(string_param("limit", ParameterIn::Query, false, "1 to 200 (default 50)"));
            op = op.parameter(string_param(
                "cursor",
                ParameterIn::Query,
                false,
                "next_cursor of the previous page",
            ));
        }
        for (name, description) in r.query {
            op = op.parameter(string_param(name, ParameterIn::Query, false, description));
        }
        if let Some(body) = r.body {
            let body = body();
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(&body.name))))
                            .build(),
                    )
                    .build(),
            ));
            if r.method != "GET" {
                op = op.parameter(string_param(
                    "Idempotency-Key",
                    ParameterIn::Header,
                    false,
                    "replays the stored answer for 24 h",
                ));
            }
            for (name, schema) in body.schemas {
                components = components.schema(name, schema);
            }
        }
        if r.method == "PATCH" || r.method == "DELETE" {
            op = op.parameter(string_param(
                "If-Match",
                ParameterIn::Header,
                false,
                "the version the change is based on",
            ));
        }
        let full = format!("/manage/v1{}", r.path);
        match items.iter_mut().find(|(p, _)| *p == full) {
            Some((_, item)) => {
                let other = PathItem::new(http_method(r.method), op.build());
                item.merge_operations(other);
            }
            None => items.push((full, PathItem::new(http_method(r.method), op.build()))),
        }
    }
    for (path, item) in items {
        paths = paths.path(path, item);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("modelux management API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("Projects, keys, providers, routing configs with versions, budgets, audit log, logs and analytics. Also served under /api/manage/v1."))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components.build()))
        .security(Some([SecurityRequirement::new("BearerAuth", Vec::<String>::new())]))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve_literals_before_parameters_and_know_their_methods() {
        assert_eq!(
            find("GET", "routing-configs/prod/versions/diff").map(|r| r.operation_id),
            Ok("diffRoutingConfigVersions")
        );
        assert_eq!(
            find("GET", "routing-configs/prod/versions/3").map(|r| r.operation_id),
            Ok("getRoutingConfigVersion")
        );
        assert_eq!(
            find("POST", "routing-configs/validate").map(|r| r.operation_id),
            Ok("validateRoutingConfig")
        );
        assert_eq!(find("PUT", "projects/x").map(|r| r.operation_id), Err(Some("GET, PATCH, DELETE".into())));
        assert_eq!(find("GET", "nothing/here").map(|r| r.operation_id), Err(None));
        let doc = serde_json::to_value(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"]["/manage/v1/projects/{id}"]["patch"]["requestBody"].is_object());
        assert!(doc["components"]["schemas"]["BudgetBody"].is_object());
        let operations: usize =
            doc["paths"].as_object().unwrap().values().map(|item| item.as_object().unwrap().len()).sum();
        assert_eq!(operations, ROUTES.len());
    }
}
