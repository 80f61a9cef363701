//! `/manage/v1/scheduled_experiments` (PRODUCT.md §8.6): a cron expression that replays the
//! last `windowHours` of traffic through a candidate at every fire. Each fire is an
//! experiment of its own (`GET …/{id}/runs`), given a verdict by the schedule's success
//! criteria; a run whose verdict turns to `fail` after one that did not is marked
//! `regression_detected` (with its `signal_key`). Nothing is paused or promoted on its own.
//! Schedules are versioned, audited resources like routing configs; the `Scheduler`
//! background service fires them.

use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Map, Value};

use super::api::{self, Answer, ApiError, Call};
use super::experiments;
use super::ManageApp;
use crate::config::ConfigError;
use crate::replay::criteria::Criteria;
use crate::spend::period::iso8601_ms;
use crate::state::{Kind, ListQuery, Stored};

const RESOURCE: &str = "scheduled_experiment";
/// The schedule's own fields; the rest of a body defines the experiment each fire runs.
const OWN: &[&str] = &[
    "cronExpression",
    "cron_expression",
    "windowHours",
    "window_hours",
    "successCriteria",
    "success_criteria",
    "enabled",
];
/// How often schedules are checked.
const TICK: Duration = Duration::from_secs(1);

fn cron_of(text: &str) -> Result<croner::Cron, String> {
    croner::Cron::from_str(text).map_err(|e| e.to_string())
}

/// The next fire after now, as RFC 3339.
fn next_run(cron: &str) -> Value {
    let Ok(c) = cron_of(cron) else { return Value::Null };
    match c.find_next_occurrence(&chrono::Utc::now(), false) {
        Ok(t) => json!(iso8601_ms(t.timestamp_millis())),
        Err(_) => Value::Null,
    }
}

fn view(r: &Stored) -> Value {
    let b = &r.body;
    let mut v = json!({
        "id": r.id,
        "object": RESOURCE,
        "name": b["name"],
        "project": r.project,
        "cron_expression": b["cron_expression"],
        "window_hours": b["window_hours"],
        "mode": b["experiment"]["mode"].as_str().unwrap_or("routing_only"),
        "hypothesis": b["experiment"]["hypothesis"],
        "success_criteria": b["success_criteria"],
        "enabled": b["enabled"],
        "experiment": b["experiment"],
        "next_run_at": if b["enabled"] == false { Value::Null } else { next_run(b["cron_expression"].as_str().unwrap_or("")) },
        "version": r.version,
        "created_at": api::time(r.created_ms),
        "updated_at": api::time(r.updated_ms),
    });
    if r.deleted_ms.is_some() {
        v["deleted"] = json!(true);
    }
    v
}

pub async fn handle(app: &ManageApp, call: &Call<'_>, path: &str, rest: &[&str]) -> Answer {
    let result = match (call.method, rest) {
        ("GET", []) => list(app, call).await,
        ("POST", []) => return create(app, call, path).await,
        ("GET", [id]) => get(app, id).await,
        ("PATCH", [id]) => return patch(app, call, path, id).await,
        ("DELETE", [id]) => return delete(app, call, path, id).await,
        ("GET", [id, "runs"]) => runs(app, call, id).await,
        ("POST", [id, "run"]) => run_now(app, id).await,
        _ => Err(ApiError::not_found("endpoint", path)),
    };
    result.unwrap_or_else(ApiError::into_answer)
}

async fn find(app: &ManageApp, id: &str) -> Result<Stored, ApiError> {
    app.state
        .get(Kind::ScheduledExperiment, id, "")
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .filter(|r| r.deleted_ms.is_none())
        .ok_or_else(|| ApiError::not_found(RESOURCE, id))
}

async fn get(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    Ok(Answer::data(200, view(&find(app, id).await?)))
}

async fn list(app: &ManageApp, call: &Call<'_>) -> Result<Answer, ApiError> {
    let query = ListQuery { project: call.param("project"), ..Default::default() };
    api::list_page(app.state.as_ref(), call, Kind::ScheduledExperiment, Vec::new(), query, view).await
}

async fn runs(app: &ManageApp, call: &Call<'_>, id: &str) -> Result<Answer, ApiError> {
    find(app, id).await?;
    experiments::list_runs(app, call, Some(id)).await
}

async fn run_now(app: &ManageApp, id: &str) -> Result<Answer, ApiError> {
    let schedule = find(app, id).await?;
    let run_id = format!("exp_{}", uuid::Uuid::now_v7().simple());
    let row = fire(app, &schedule, &run_id, api::now_ms()).await?;
    Ok(Answer::data(202, crate::replay::runner::view(&row)))
}

/// A schedule's body from a create or PATCH body: `(name, schedule fields, experiment
/// fields)`, checked. The experiment part is checked as a create body would be (its
/// candidate built into a would-be config), without requiring traffic.
async fn checked(app: &ManageApp, input: &Map<String, Value>) -> Result<(String, Value), ApiError> {
    let mut errors = Vec::new();
    let pick =
        |camel: &str, snake: &str| input.get(camel).or_else(|| input.get(snake)).filter(|v| !v.is_null());
    let cron = match pick("cronExpression", "cron_expression") {
        Some(Value::String(s)) => match cron_of(s) {
            Ok(_) => Some(s.trim().to_string()),
            Err(e) => {
                errors.push(ConfigError::new("cronExpression", format!("not a cron expression: {e}")));
                None
            }
        },
        Some(_) => {
            errors.push(ConfigError::new("cronExpression", "must be a string"));
            None
        }
        None => {
            errors.push(ConfigError::new("cronExpression", "is required (e.g. \"0 9 * * *\")"));
            None
        }
    };
    let window_hours = match pick("windowHours", "window_hours") {
        None => 24.0,
        Some(v) => match v.as_f64() {
            Some(h) if h > 0.0 && h <= 24.0 * 366.0 => h,
            _ => {
                errors.push(ConfigError::new("windowHours", "must be a number of hours above 0"));
                24.0
            }
        },
    };
    let criteria = match pick("successCriteria", "success_criteria") {
        None => Value::Null,
        Some(v) => match Criteria::parse(v, "successCriteria") {
            Ok(_) => v.clone(),
            Err(e) => {
                errors.extend(e);
                Value::Null
            }
        },
    };
    let enabled = match input.get("enabled") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.push(ConfigError::new("enabled", "must be true or false"));
            true
        }
    };
    for k in ["windowStart", "window_start", "windowEnd", "window_end"] {
        if input.contains_key(k) {
            errors.push(ConfigError::new(k, "a schedule replays the last windowHours of each fire"));
        }
    }
    let mut experiment: Map<String, Value> = input
        .iter()
        .filter(|(k, _)| !OWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    experiment.retain(|k, _| !k.starts_with("window"));
    let mut probe = experiment.clone();
    probe.insert("windowHours".into(), json!(window_hours));
    let prepared = match experiments::prepare(app, &Value::Object(probe), false).await {
        Ok(p) => Some(p),
        Err(e) if errors.is_empty() => return Err(e),
        Err(_) => None,
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let Some(prepared) = prepared else { return Err(ApiError::invalid(errors)) };
    let name = experiment
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("scheduled replay of {}", prepared.routing_config()));
    let body = json!({
        "name": name,
        "project": prepared.project(),
        "cron_expression": cron,
        "window_hours": window_hours,
        "success_criteria": criteria,
        "enabled": enabled,
        "experiment": experiment,
    });
    Ok((prepared.project().to_string(), body))
}

async fn create(app: &ManageApp, call: &Call<'_>, path: &str) -> Answer {
    let input: Value = match api::body(call.body) {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    let Value::Object(input) = input else {
        return ApiError::invalid(vec![ConfigError::new("", "must be a JSON object")]).into_answer();
    };
    let (project, body) = match checked(app, &input).await {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    let slug = format!("sched-{}", uuid::Uuid::now_v7().simple());
    api::mutate(&app.store, &app.state, &app.changing, call, path, &slug, |_, _| {
        let r = api::new_resource(Kind::ScheduledExperiment, project.clone(), slug.clone(), body.clone());
        Ok(api::create_plan(call, r, "scheduled_experiment.created", view))
    })
    .await
}

async fn patch(app: &ManageApp, call: &Call<'_>, path: &str, id: &str) -> Answer {
    let old = match find(app, id).await {
        Ok(r) => r,
        Err(e) => return e.into_answer(),
    };
    let input: Value = match api::body(call.body) {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    let Value::Object(patch) = input else {
        return ApiError::invalid(vec![ConfigError::new("", "must be a JSON object")]).into_answer();
    };
    // The stored schedule as a create body, the patch merged over it.
    let mut merged = old.body["experiment"].as_object().cloned().unwrap_or_default();
    merged.insert("cronExpression".into(), old.body["cron_expression"].clone());
    merged.insert("windowHours".into(), old.body["window_hours"].clone());
    merged.insert("successCriteria".into(), old.body["success_criteria"].clone());
    merged.insert("enabled".into(), old.body["enabled"].clone());
    for (k, v) in patch {
        let camel = match k.as_str() {
            "cron_expression" => "cronExpression".to_string(),
            "window_hours" => "windowHours".to_string(),
            "success_criteria" => "successCriteria".to_string(),
            other => other.to_string(),
        };
        // One spelling per field: the patch's replaces the stored one's.
        if let Some((c, n)) =
            crate::replay::definition::FIELDS.iter().find(|(c, n)| *c == camel || *n == camel)
        {
            merged.remove(*c);
            merged.remove(*n);
        }
        merged.insert(camel, v);
    }
    let (_, body) = match checked(app, &merged).await {
        Ok(v) => v,
        Err(e) => return e.into_answer(),
    };
    let lock = format!("{RESOURCE}:{}", old.id);
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, _| {
        let old = api::editable_named(current, Kind::ScheduledExperiment, id, false, call)?;
        Ok(api::update_plan(
            call,
            old,
            api::next_version(old, body.clone()),
            "scheduled_experiment.updated",
            view,
        ))
    })
    .await
}

async fn delete(app: &ManageApp, call: &Call<'_>, path: &str, id: &str) -> Answer {
    let lock = format!("{RESOURCE}:{id}");
    api::mutate(&app.store, &app.state, &app.changing, call, path, &lock, |current, _| {
        let old = api::editable_named(current, Kind::ScheduledExperiment, id, false, call)?;
        Ok(api::delete_plan(call, old, "scheduled_experiment.deleted", view))
    })
    .await
}

/// Starts one run of `schedule` as experiment `run_id`, fired at `fire_ms`. A run whose
/// definition no longer holds (its candidate gone, say) is recorded as failed.
async fn fire(
    app: &ManageApp,
    schedule: &Stored,
    run_id: &str,
    fire_ms: i64,
) -> Result<crate::state::ExperimentRow, ApiError> {
    let mut input = schedule.body["experiment"].as_object().cloned().unwrap_or_default();
    input.insert("windowHours".into(), schedule.body["window_hours"].clone());
    input.insert("windowEnd".into(), json!(fire_ms));
    input.insert(
        "name".into(),
        json!(format!(
            "{} — {}",
            schedule.body["name"].as_str().unwrap_or("scheduled run"),
            iso8601_ms(fire_ms)
        )),
    );
    let criteria = schedule.body["success_criteria"].clone();
    let run = experiments::Run { id: run_id.to_string(), schedule_id: schedule.id.clone(), criteria };
    match experiments::launch(app, &Value::Object(input), Some(run)).await {
        Ok(row) => Ok(row),
        Err(e) => {
            let answer = e.into_answer();
            let message = serde_json::from_slice::<Value>(&answer.body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            experiments::record_failed_run(app, schedule, run_id, fire_ms, &message).await
        }
    }
}

/// Fires due schedules, once a second. A fire missed while the gateway was down runs once,
/// at the next start (only the latest one). With several gateways on one database each
/// fire's run id is derived from the schedule and the fire time, so a second node's attempt
/// finds it taken.
pub struct Scheduler {
    pub app: ManageApp,
}

/// How often finished experiments past `experiments.retention_days` are deleted.
const PRUNE_EVERY: u64 = 3600;

impl Scheduler {
    async fn prune(&self) {
        let days = i64::from(self.app.store.load().settings.experiment_retention_days);
        let before = api::now_ms() - days * 86_400_000;
        match self.app.state.prune_experiments(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "finished experiments past their retention deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete old experiments"),
        }
    }

    async fn tick(&self) {
        let query = ListQuery { limit: 10_000, ..Default::default() };
        let schedules = match self.app.state.list(Kind::ScheduledExperiment, &query).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list scheduled experiments");
                return;
            }
        };
        let now = chrono::Utc::now();
        for s in schedules.iter().filter(|s| s.deleted_ms.is_none() && s.body["enabled"] != false) {
            let Ok(cron) = cron_of(s.body["cron_expression"].as_str().unwrap_or("")) else { continue };
            let Ok(due) = cron.find_previous_occurrence(&now, true) else { continue };
            let due_ms = due.timestamp_millis();
            // Fires before the schedule (or its last change) existed are not owed.
            if due_ms < s.updated_ms.max(s.created_ms) {
                continue;
            }
            let run_id = format!(
                "exp_{}_{}",
                s.id.trim_start_matches(Kind::ScheduledExperiment.id_prefix()),
                due_ms / 1000
            );
            match self.app.state.experiment(&run_id).await {
                Ok(None) => {}
                Ok(Some(_)) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check a scheduled run");
                    continue;
                }
            }
            tracing::info!(schedule = %s.id, run = %run_id, "scheduled experiment fired");
            if let Err(e) = fire(&self.app, s, &run_id, due_ms).await {
                tracing::warn!(schedule = %s.id, status = e.into_answer().status, "scheduled run not started");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Scheduler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            self.tick().await;
            // At start, then hourly.
            if ticks.is_multiple_of(PRUNE_EVERY) {
                self.prune().await;
            }
            ticks += 1;
        }
    }
}
