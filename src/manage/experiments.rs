//! `/manage/v1/experiments`: replay stored traffic through a candidate routing config
//! (PRODUCT.md §8.6). Creating one checks the whole definition (the candidate is built
//! into a would-be snapshot, the window must hold traffic) and answers 202 at once; the
//! run happens on the experiment worker (`replay::runner`), which the client polls.

use serde_json::{json, Map, Value};

use super::api::{self, Answer, ApiError, Call};
use super::routing_configs;
use super::ManageApp;
use crate::config::ConfigError;
use crate::replay::definition::{CandidateSpec, Definition, Mode};
use crate::replay::live;
use crate::replay::runner::{self, Job};
use crate::spend::period::iso8601_ms;
use crate::state::{ExperimentQuery, ExperimentRow, Kind, Stored};
use crate::trace::replay::ReplayQuery;

const RESOURCE: &str = "experiment";

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call).await,
        ("POST", []) => create(app, call).await,
        ("GET", [id]) => get(app, id).await,
        ("DELETE", [id]) => delete(app, id).await,
        ("POST", [id, "cancel"]) => cancel(app, id).await,
        ("POST", [id, "promote"]) => return promote(app, call, path, id).await,
        ("GET", [id, "decisions"]) => decisions(app, call, id).await,
        // The route table (openapi.rs) answered unknown paths and methods already.
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

fn unavailable(e: crate::state::StateError) -> ApiError {
    ApiError::unavailable(&e)
}

async fn find(app: &ManageApp, id: &str) -> Result<ExperimentRow, ApiError> {
    app.state.experiment(id).await.map_err(unavailable)?.ok_or_else(|| ApiError::not_found(RESOURCE, id))
}

async fn get(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    Ok(Answer::data(200, runner::view(&find(app, id).await?)))
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    list_runs(app, call, None).await
}

/// Experiments newest first; `schedule`: only that schedule's runs.
pub async fn list_runs(app: &ManageApp, call: &Call<'_>, schedule: Option<&str>) -> Result<Answer, ApiError> {
    let page = api::page(call)?;
    let before_seq =
        match page.cursor.as_deref() {
            None => None,
            Some(c) => Some(c.strip_prefix('e').and_then(|n| n.parse::<i64>().ok()).ok_or_else(|| {
                ApiError::bad_request("invalid_cursor", "cursor is not one this API gave out")
            })?),
        };
    let status = call.param("status");
    if let Some(s) = &status {
        if !["queued", "running", "completed", "failed", "cancelled"].contains(&s.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_status",
                "status must be queued, running, completed, failed or cancelled",
            ));
        }
    }
    let query = ExperimentQuery {
        project: call.param("project").or_else(|| call.param("project_id")),
        schedule_id: schedule.map(str::to_string),
        status,
        before_seq,
        limit: page.limit + 1,
    };
    let rows = app.state.experiments(&query).await.map_err(unavailable)?;
    let more = rows.len() > page.limit;
    let rows = &rows[..rows.len().min(page.limit)];
    let next = if more { rows.last().map(|r| format!("e{}", r.seq)) } else { None };
    Ok(api::list_answer(rows.iter().map(runner::view).collect(), next))
}

async fn decisions(app: &ManageApp, call: &Call<'_>, id: &str) -> Result<Answer, ApiError> {
    let page = api::page(call)?;
    find(app, id).await?;
    let after = match page.cursor.as_deref() {
        None => 0,
        Some(c) => c
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request("invalid_cursor", "cursor is not one this API gave out"))?,
    };
    let rows = app.state.decisions(id, after, page.limit + 1).await.map_err(unavailable)?;
    let more = rows.len() > page.limit;
    let rows = &rows[..rows.len().min(page.limit)];
    let next = if more { rows.last().map(|(seq, _)| seq.to_string()) } else { None };
    Ok(api::list_answer(rows.iter().map(|(_, v)| v.clone()).collect(), next))
}

async fn cancel(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    let mut row = find(app, id).await?;
    if !matches!(row.status.as_str(), "queued" | "running") {
        return Err(ApiError::conflict(
            "experiment_finished",
            RESOURCE,
            id,
            format!("experiment {id} is {}; only a queued or running one can be cancelled", row.status),
        ));
    }
    row.status = "cancelled".into();
    row.updated_ms = api::now_ms();
    if let Value::Object(m) = &mut row.body {
        m.insert("completed_at".into(), json!(iso8601_ms(row.updated_ms)));
    }
    // Only while it is still queued or running: the worker may have finished it meanwhile.
    if !app.state.update_experiment(&row, &["queued", "running"]).await.map_err(unavailable)? {
        let now = find(app, id).await?;
        return Err(ApiError::conflict(
            "experiment_finished",
            RESOURCE,
            id,
            format!("experiment {id} is {}; only a queued or running one can be cancelled", now.status),
        ));
    }
    app.experiments.cancel(id);
    Ok(Answer::data(200, runner::view(&row)))
}

async fn delete(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    app.experiments.cancel(id);
    if !app.state.delete_experiment(id).await.map_err(unavailable)? {
        return Err(ApiError::not_found(RESOURCE, id));
    }
    Ok(Answer::data(200, json!({ "id": id, "object": RESOURCE, "deleted": true })))
}

async fn promote(app: &ManageApp, call: &Call<'_>, path: &str, id: &str) -> Answer {
    let row = match find(app, id).await {
        Ok(r) => r,
        Err(e) => return e.into_answer(),
    };
    if row.status != "completed" {
        return ApiError::conflict(
            "experiment_not_completed",
            RESOURCE,
            id,
            format!("experiment {id} is {}; only a completed one can be promoted", row.status),
        )
        .into_answer();
    }
    let job = match runner::job_of(&row) {
        Ok(j) => j,
        Err(e) => return ApiError::new(500, "api_error", "experiment_unreadable", e).into_answer(),
    };
    let input: Value = if call.body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match api::body(call.body) {
            Ok(v) => v,
            Err(e) => return e.into_answer(),
        }
    };
    let named = match input.get("routing_config").or_else(|| input.get("routingConfig")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if crate::config::valid_id(s.trim_start_matches('@')) => {
            Some(s.trim_start_matches('@').to_string())
        }
        Some(_) => {
            return ApiError::invalid(vec![ConfigError::new("routing_config", "must be \"@slug\"")])
                .into_answer()
        }
    };
    let Some(slug) = named.or_else(|| job.promote_to.clone()) else {
        return ApiError::invalid(vec![ConfigError::new(
            "routing_config",
            "is required: the experiment replayed no named config; say which one the candidate becomes",
        )])
        .into_answer();
    };
    let answer = routing_configs::promote(app, call, path, &slug, job.candidate_config.clone(), id).await;
    if !(200..300).contains(&answer.status) {
        return answer;
    }
    let config: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let version = config["data"]["version"].clone();
    let mut row = row;
    if let Value::Object(m) = &mut row.body {
        m.insert(
            "promoted".into(),
            json!({ "routing_config": format!("@{slug}"), "version": version, "at": iso8601_ms(api::now_ms()) }),
        );
    }
    row.updated_ms = api::now_ms();
    if let Err(e) = app.state.update_experiment(&row, &["completed"]).await {
        tracing::warn!(experiment = %id, error = %e, "promoted, but the experiment could not record it");
    }
    let mut data = runner::view(&row);
    data["routing_config"] = config["data"].clone();
    Answer::data(200, data)
}

/// A candidate body with `project` set to `project` (an inline body may name it, but not
/// another one).
fn with_project(
    mut body: Map<String, Value>,
    project: &str,
    field: &str,
    errors: &mut Vec<ConfigError>,
) -> Value {
    body.remove("slug");
    match body.get("project").and_then(Value::as_str) {
        Some(p) if p != project => errors.push(ConfigError::new(
            format!("{field}.project"),
            format!("names project \"{p}\", not the experiment's \"{project}\""),
        )),
        _ => {
            body.insert("project".into(), json!(project));
        }
    }
    Value::Object(body)
}

/// The body of routing config `@slug`, live or at `version`.
async fn referenced(
    app: &ManageApp,
    slug: &str,
    version: Option<i64>,
    field: &str,
) -> Result<Map<String, Value>, ApiError> {
    let unknown = |message: String| ApiError::invalid(vec![ConfigError::new(field, message)]);
    let body = if let Some(r) = routing_configs::stored(app, slug).await?.filter(|r| r.deleted_ms.is_none()) {
        match version {
            None => r.body.clone(),
            Some(n) => {
                let versions = app.state.versions(&r.id).await.map_err(unavailable)?;
                match versions.into_iter().find(|v| v.version == n && !v.deleted) {
                    Some(v) => v.body,
                    None => {
                        return Err(unknown(format!(
                            "@{slug} has no version {n} (versions 1 to {})",
                            r.version
                        )))
                    }
                }
            }
        }
    } else {
        let snapshot = app.store.load();
        let Some(rc) = snapshot
            .routing_configs
            .get(slug)
            .filter(|_| snapshot.file_owned.routing_configs.iter().any(|s| s == slug))
        else {
            return Err(unknown(format!("unknown routing config @{slug}")));
        };
        if version.is_some_and(|n| n != i64::from(rc.version)) {
            return Err(unknown(format!(
                "@{slug} is defined in the config file, which keeps only its current version ({})",
                rc.version
            )));
        }
        serde_json::from_str(&rc.definition).unwrap_or(Value::Null)
    };
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(unknown(format!("@{slug} has no readable definition"))),
    }
}

/// `candidatePolicy` + `candidateConfig` as a routing-config body: the policy is the
/// strategy; `provider_credential_id` (a provider's id or slug) qualifies `model`.
fn policy_body(
    policy: &str,
    mut config: Map<String, Value>,
    resources: &[Stored],
    snapshot: &crate::config::Snapshot,
    errors: &mut Vec<ConfigError>,
) -> Map<String, Value> {
    let credential =
        config.remove("provider_credential_id").or_else(|| config.remove("providerCredentialId"));
    if let Some(c) = credential {
        let key = c.as_str().unwrap_or_default();
        let provider = resources
            .iter()
            .find(|r| r.kind == Kind::Provider && r.deleted_ms.is_none() && (r.id == key || r.slug == key))
            .map(|r| r.slug.clone())
            .or_else(|| snapshot.providers.contains_key(key).then(|| key.to_string()));
        match (provider, config.get("model").and_then(Value::as_str)) {
            (None, _) => errors.push(ConfigError::new(
                "candidateConfig.provider_credential_id",
                format!("unknown provider \"{key}\""),
            )),
            (Some(p), Some(model)) if !model.contains('/') => {
                config.insert("model".into(), json!(format!("{p}/{model}")));
            }
            _ => {}
        }
    }
    config.insert("strategy".into(), json!(policy));
    config
}

/// A scheduled run: its id, its schedule, and the schedule's success criteria.
pub struct Run {
    pub id: String,
    pub schedule_id: String,
    pub criteria: Value,
}

/// A checked experiment, ready to be stored and queued.
pub struct Prepared {
    row: ExperimentRow,
}

impl Prepared {
    pub fn project(&self) -> &str {
        &self.row.project
    }

    /// `@slug` of the config the candidate stands in for.
    pub fn routing_config(&self) -> String {
        self.row.body["routing_config"].as_str().unwrap_or_default().to_string()
    }
}

fn new_id() -> String {
    format!("exp_{}", uuid::Uuid::now_v7().simple())
}

/// Checks a create body (its candidate built into a would-be config; with
/// `require_traffic`, the window must hold matching traffic).
pub async fn prepare(app: &ManageApp, input: &Value, require_traffic: bool) -> Result<Prepared, ApiError> {
    prepare_as(app, input, require_traffic, new_id()).await
}

/// Stores and queues an experiment: a one-off (`run` is `None`: the window must hold
/// traffic) or one run of a schedule.
pub async fn launch(app: &ManageApp, input: &Value, run: Option<Run>) -> Result<ExperimentRow, ApiError> {
    let id = run.as_ref().map_or_else(new_id, |r| r.id.clone());
    let mut row = prepare_as(app, input, run.is_none(), id).await?.row;
    if let Some(run) = run {
        row.schedule_id = run.schedule_id.clone();
        if let Value::Object(m) = &mut row.body {
            m.insert("schedule_id".into(), json!(run.schedule_id));
            m.insert("success_criteria".into(), run.criteria.clone());
            m.insert("verdict".into(), Value::Null);
        }
        if !run.criteria.is_null() {
            row.body["job"]["success_criteria"] = run.criteria;
        }
    }
    if !app.state.create_experiment(&row).await.map_err(unavailable)? {
        return Err(ApiError::conflict(
            "experiment_exists",
            RESOURCE,
            &row.id,
            format!("experiment {} exists already (a fire that another node ran)", row.id),
        ));
    }
    app.experiments.submit(&row.id);
    Ok(row)
}

/// A scheduled run that could not start (its definition no longer holds), recorded as
/// failed so the schedule's history shows it.
pub async fn record_failed_run(
    app: &ManageApp,
    schedule: &Stored,
    run_id: &str,
    fire_ms: i64,
    message: &str,
) -> Result<ExperimentRow, ApiError> {
    let now = api::now_ms();
    let row = ExperimentRow {
        id: run_id.to_string(),
        project: schedule.project.clone(),
        schedule_id: schedule.id.clone(),
        status: "failed".into(),
        body: json!({
            "id": run_id,
            "object": RESOURCE,
            "name": schedule.body["name"],
            "project": schedule.project,
            "schedule_id": schedule.id,
            "fired_at": iso8601_ms(fire_ms),
            "verdict": "inconclusive",
            "error": { "code": "experiment_failed", "message": message },
            "created_at": iso8601_ms(now),
            "completed_at": iso8601_ms(now),
        }),
        seq: 0,
        created_ms: now,
        updated_ms: now,
    };
    app.state.create_experiment(&row).await.map_err(unavailable)?;
    Ok(row)
}

async fn create(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let input: Value = api::body(call.body)?;
    let row = launch(app, &input, None).await?;
    let id = row.id.clone();
    let mut answer = Answer::data(202, runner::view(&row));
    answer.headers.push(("location", format!("/manage/v1/experiments/{id}")));
    Ok(answer)
}

async fn prepare_as(
    app: &ManageApp,
    input: &Value,
    require_traffic: bool,
    id: String,
) -> Result<Prepared, ApiError> {
    let now = api::now_ms();
    let def = Definition::parse(input, now as u64).map_err(ApiError::invalid)?;
    let snapshot = app.store.load();
    if def.mode == Mode::WithResponses && snapshot.settings.traces.replay_hours == 0 {
        return Err(ApiError::invalid(vec![ConfigError::new(
            "mode",
            "with_responses re-sends stored request bodies, and none are kept: set traces.replay_hours above 0",
        )]));
    }
    let resources = app.store.stage().await.resources();
    let field = def.candidate_field;
    let mut errors = Vec::new();
    let reference = match &def.candidate {
        CandidateSpec::Reference { slug, .. } => Some(slug.clone()),
        _ => None,
    };
    // The config the candidate stands in for: replayed requests name it, its budgets apply.
    let slug = def
        .promote_to
        .clone()
        .or_else(|| def.filters.routing_config.clone())
        .or_else(|| reference.clone())
        .unwrap_or_else(|| id.clone());
    let body = match &def.candidate {
        CandidateSpec::Inline(m) => m.clone(),
        CandidateSpec::Reference { slug, version } => referenced(app, slug, *version, field).await?,
        CandidateSpec::Policy { policy, config } => {
            policy_body(policy, config.clone(), &resources, &snapshot, &mut errors)
        }
    };
    // The project: as named, else the replaced config's, else the referenced config's.
    let project = match &def.project {
        Some(p) => match api::find_project(&resources, &snapshot, p) {
            Some(api::Found::Api(r)) => r.slug.clone(),
            Some(api::Found::File(s)) => s,
            None => {
                let name = if input.get("projectId").is_some() { "projectId" } else { "project_id" };
                return Err(ApiError::invalid(vec![ConfigError::new(
                    name,
                    format!("unknown project \"{p}\""),
                )]));
            }
        },
        None => {
            let of_reference =
                reference.is_some().then(|| body.get("project").and_then(Value::as_str)).flatten();
            match snapshot
                .routing_configs
                .get(&slug)
                .map(|rc| rc.project.clone())
                .or(of_reference.map(str::to_string))
            {
                Some(p) => p,
                None => {
                    return Err(ApiError::invalid(vec![ConfigError::new(
                    "projectId",
                    "is required when neither the candidate nor the filters name an existing routing config",
                )]))
                }
            }
        }
    };
    let candidate_config = with_project(body, &project, field, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let built = app.store.build_replacing(&slug, &candidate_config).await;
    if let Err(errors) = built {
        let prefix = format!("routing_configs.{slug}");
        let mapped = errors
            .into_iter()
            .map(|e| match e.path.strip_prefix(&prefix) {
                Some(rest) => ConfigError::new(format!("{field}{rest}"), e.message),
                None => e,
            })
            .collect();
        return Err(ApiError::invalid(mapped));
    }
    let job = Job {
        project: project.clone(),
        slug: slug.clone(),
        promote_to: def.promote_to.clone().or_else(|| def.filters.routing_config.clone()),
        candidate_config: candidate_config.clone(),
        mode: def.mode.as_str().into(),
        window_start_ms: def.window_start_ms,
        window_end_ms: def.window_end_ms,
        sample_size: def.sample_size,
        filter_routing_config: def.filters.routing_config.clone(),
        filter_model: def.filters.model.clone(),
        filter_end_user: def.filters.end_user.clone(),
        filter_tags: def.filters.tags.clone(),
        success_criteria: None,
        concurrency: def.concurrency,
        similarity_threshold: def.similarity_threshold,
    };
    let probe = ReplayQuery { filters: job.query(), limit: 1, ..Default::default() };
    let any = if require_traffic {
        app.trace_store.replay(&probe).await.map_err(|e| {
            ApiError::new(503, "service_unavailable", "trace_store_unavailable", e.to_string())
        })?
    } else {
        Vec::new()
    };
    if require_traffic && any.is_empty() {
        let name = ["windowStart", "window_start", "windowHours", "window_hours"]
            .into_iter()
            .find(|f| input.get(*f).is_some())
            .unwrap_or("windowStart");
        return Err(ApiError::invalid(vec![ConfigError::new(
            name,
            format!(
                "no recorded chat traffic of project {project} from {} to {} matches the filters: nothing to replay",
                iso8601_ms(def.window_start_ms as i64),
                iso8601_ms(def.window_end_ms as i64)
            ),
        )]));
    }
    let source = match &def.candidate {
        CandidateSpec::Inline(_) => "inline".to_string(),
        CandidateSpec::Reference { slug, version: None } => format!("@{slug}"),
        CandidateSpec::Reference { slug, version: Some(n) } => format!("@{slug}@v{n}"),
        CandidateSpec::Policy { .. } => "policy".to_string(),
    };
    let body = json!({
        "id": id,
        "object": RESOURCE,
        "name": def.name.clone().unwrap_or_else(|| format!("replay of @{slug}")),
        "project": project,
        "mode": def.mode.as_str(),
        "hypothesis": def.hypothesis,
        "routing_config": format!("@{slug}"),
        "candidate_source": source,
        "candidate_config": candidate_config,
        "filters": def.filters.view(),
        "window": { "start": iso8601_ms(def.window_start_ms as i64), "end": iso8601_ms(def.window_end_ms as i64) },
        "sample_size": match def.mode {
            Mode::WithResponses => Some(def.sample_size.unwrap_or(live::DEFAULT_SAMPLE)),
            Mode::RoutingOnly => def.sample_size,
        },
        "progress": { "requests_read": 0, "percent": 0.0 },
        "requests": null,
        "baseline_summary": null,
        "candidate_summary": null,
        "route_distribution": null,
        "baseline_route_distribution": null,
        "deltas": null,
        "similarity": null,
        "concurrency": (def.mode == Mode::WithResponses)
            .then(|| def.concurrency.unwrap_or(live::DEFAULT_CONCURRENCY)),
        "similarity_threshold": (def.mode == Mode::WithResponses)
            .then(|| def.similarity_threshold.unwrap_or(live::DEFAULT_THRESHOLD)),
        "embedding_model": (def.mode == Mode::WithResponses)
            .then(|| snapshot.settings.experiment_embedding_model.clone())
            .flatten(),
        "error": null,
        "promoted": null,
        "created_at": iso8601_ms(now),
        "started_at": null,
        "completed_at": null,
        "job": serde_json::to_value(&job).unwrap_or(Value::Null),
    });
    let row = ExperimentRow {
        id: id.clone(),
        project,
        schedule_id: String::new(),
        status: "queued".into(),
        body,
        seq: 0,
        created_ms: now,
        updated_ms: now,
    };
    Ok(Prepared { row })
}
