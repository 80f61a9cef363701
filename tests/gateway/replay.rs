//! Experiments end to end: real traffic through the gateway to mock providers (fallbacks
//! that happened, a budget that blocked, several configs), then replays checked against
//! figures computed here from the stored records and the price table; promote, cancel,
//! and the errors of bad definitions.

use super::*;
use modelux::trace::{LogQuery, TraceRow};

/// A cent a token on `local/m1`: costs are exact sums of token counts.
const PRICES: &str = "prices:\n  m1: { input_per_mtok: 10000, output_per_mtok: 10000 }\n";
const CONFIGS: &str = "  cheaper: { project: default, strategy: single, model: \"local/m1\" }\n  \
    capped: { project: default, strategy: single, model: \"local/m1\" }\n";
const BUDGET: &str =
    "budgets:\n  - { name: capped-daily, scope: routing_config, routing_config: \"@capped\", \
    period: daily, cap_usd: 0.5, action: block }\n";

async fn manage(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> Response {
    let auth = format!("Bearer {ADMIN_KEY}");
    let h = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    httpc::request(gw.manage, method, path, &h, &bytes).await.unwrap()
}

async fn chat(gw: &Gateway, model: &str, extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {KEY}");
    let mut h = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
    h.extend_from_slice(extra);
    let body =
        json!({"model": model, "messages": [{"role": "user", "content": "say hello"}], "max_tokens": 20});
    httpc::request(gw.proxy, "POST", CHAT, &h, &serde_json::to_vec(&body).unwrap()).await.unwrap()
}

/// Every stored record of the project, oldest first, once the writer has stored `n`.
async fn stored_rows(gw: &Gateway, n: usize) -> Vec<TraceRow> {
    let store = gw.handles.trace_writer.store().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = store.list(&LogQuery { limit: 200, ..LogQuery::default() }).await.unwrap();
        if page.rows.len() >= n {
            let mut rows = page.rows;
            rows.reverse();
            return rows;
        }
        assert!(Instant::now() < deadline, "only {} of {n} records stored", page.rows.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finished(gw: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = manage(gw, "GET", &format!("/manage/v1/experiments/{id}"), None).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let v = resp.json().unwrap()["data"].clone();
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "experiment {id} never finished: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(gw: &Gateway, body: Value) -> Value {
    let resp = manage(gw, "POST", "/manage/v1/experiments", Some(body)).await;
    assert_eq!(resp.status, 202, "{}", resp.text());
    let v = resp.json().unwrap()["data"].clone();
    assert!(["queued", "running", "completed"].contains(&v["status"].as_str().unwrap()), "{v}");
    let done = finished(gw, v["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    done
}

fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64) as usize).min(v.len().checked_sub(1)?);
    v.get(i).copied()
}

fn close(a: &Value, b: f64) {
    let a = a.as_f64().unwrap_or_else(|| panic!("not a number: {a}"));
    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} != {b}");
}

/// What production did, computed from the records: cost, answered latencies, errors and
/// where the answered ones went.
fn baseline_of(rows: &[&TraceRow]) -> (f64, Vec<f64>, u64, BTreeMap<String, u64>) {
    let mut cost = 0.0;
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut routes = BTreeMap::new();
    for r in rows {
        cost += r.cost_total;
        if r.status >= 400 || r.status == 0 {
            errors += 1;
        } else {
            latencies.push(r.latency_ms);
            *routes.entry(format!("{}:{}", r.model, r.provider)).or_insert(0) += 1;
        }
    }
    (cost, latencies, errors, routes)
}

fn shares(counts: &BTreeMap<String, u64>) -> Value {
    let total: u64 = counts.values().sum();
    Value::Object(counts.iter().map(|(k, n)| (k.clone(), json!(*n as f64 / total as f64))).collect())
}

use std::collections::BTreeMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiments_replay_stored_traffic_and_promote_the_candidate() {
    experiments_replay_stored_traffic_and_promote_the_candidate_on(String::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiments_replay_stored_traffic_and_promote_the_candidate_on_postgres() {
    let pg = tokio::task::spawn_blocking(super::pg::PgServer::start).await.unwrap();
    let url = pg.database("modelux_replay").await;
    experiments_replay_stored_traffic_and_promote_the_candidate_on(format!(
        "state: {{ backend: postgres, url: \"{url}\" }}\n"
    ))
    .await
}

/// `state`: the `state:` section (empty: the embedded SQLite store).
async fn experiments_replay_stored_traffic_and_promote_the_candidate_on(state: String) {
    // The OpenAI mock fails every fourth call: production's fallback moves those to local.
    let mut script = Vec::new();
    for _ in 0..6 {
        script.extend([Behavior::Status(500), Behavior::Normal, Behavior::Normal, Behavior::Normal]);
    }
    let openai = mock(MockConfig { script, ..MockConfig::default() }).await;
    let local = mock(MockConfig { tokens: 7, ..MockConfig::default() }).await;
    let openai_url = openai.base_url();
    let local_url = local.base_url();
    let mut cfg = Cfg::new(openai_url.leak());
    cfg.local = Some(local_url.leak());
    // Health never steps in: every fallback below is the scripted failure's.
    cfg.top_extra = format!(
        "{state}{PRICES}{BUDGET}traces: {{ flush_interval_ms: 50 }}\n\
         health: {{ min_requests: 1000, consecutive_failures: 1000 }}\n"
    );
    cfg.more_configs = CONFIGS.into();
    let gw = start(cfg).await;

    // @production lives in the state store, so promote can write its next version.
    let created = manage(
        &gw,
        "POST",
        "/manage/v1/routing-configs",
        Some(json!({"slug": "production", "project": "default", "strategy": "fallback",
                    "retry_on": ["5xx"], "attempts": ["openai/gpt-4o-mini", "local/m1"]})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());

    let mut sent = 0;
    for i in 0..24 {
        let user = format!("user-{}", i % 3);
        let resp =
            chat(&gw, "@production", &[("x-modelux-user-id", &user), ("x-modelux-user-tags", "team=search")])
                .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        sent += 1;
    }
    for _ in 0..6 {
        assert_eq!(chat(&gw, "@fast", &[]).await.status, 200);
        sent += 1;
    }
    // @capped: $0.50 a day at a cent a token; each answer costs well over that in total.
    let mut blocked = 0;
    for _ in 0..8 {
        let resp = chat(&gw, "@capped", &[]).await;
        assert!(resp.status == 200 || resp.status == 402, "{}", resp.text());
        blocked += usize::from(resp.status == 402);
        sent += 1;
    }
    assert!(blocked > 0, "the budget never blocked");
    let rows = stored_rows(&gw, sent).await;
    assert_eq!(rows.len(), sent);
    let production: Vec<&TraceRow> = rows.iter().filter(|r| r.model_requested == "@production").collect();
    assert_eq!(production.len(), 24);
    let fell_back = production.iter().filter(|r| r.provider == "local").count();
    assert_eq!(fell_back, 6, "every fourth first attempt failed");
    assert!(production.iter().all(|r| !r.replay_body.is_empty() && r.max_tokens == 20));

    // 1. A candidate identical to production reproduces it exactly.
    let same = run(
        &gw,
        json!({"name": "same", "candidate": "@production", "filters": {"routing_config": "@production"}}),
    )
    .await;
    let (cost, latencies, errors, routes) = baseline_of(&production);
    assert_eq!(same["requests"], 24);
    assert_eq!(same["route_distribution"], shares(&routes), "{same}");
    assert_eq!(same["baseline_route_distribution"], shares(&routes));
    for side in ["baseline_summary", "candidate_summary"] {
        close(&same[side]["cost_usd"], cost);
        close(&same[side]["p50_ms"], quantile(latencies.clone(), 0.5).unwrap());
        close(&same[side]["p95_ms"], quantile(latencies.clone(), 0.95).unwrap());
        assert_eq!(same[side]["errors"], errors);
    }
    assert_eq!(same["cost_delta_pct"], 0.0);
    assert_eq!(same["deltas"]["p95_latency_delta_pct"], 0.0);
    // The documented result shape too.
    assert_eq!(same["baseline"], same["baseline_summary"]);
    assert_eq!(same["candidate"], same["candidate_summary"]);

    // 2. Everything on local/m1, priced at a cent a token from the recorded tokens.
    let inline = json!({"strategy": "single", "model": "local/m1"});
    let cheap = run(
        &gw,
        json!({"candidate": inline, "filters": {"routing_config": "@production"}, "mode": "routing_only"}),
    )
    .await;
    let want_cost: f64 = production.iter().map(|r| (r.input_tokens + r.output_tokens) as f64 * 0.01).sum();
    close(&cheap["candidate_summary"]["cost_usd"], want_cost);
    close(&cheap["baseline_summary"]["cost_usd"], cost);
    close(&cheap["cost_delta_pct"], (want_cost - cost) / cost * 100.0);
    assert_eq!(cheap["route_distribution"], json!({"m1:local": 1.0}));
    assert_eq!(cheap["candidate_summary"]["errors"], 0);
    assert_eq!(cheap["candidate_summary"]["latency_unknown"], 0);
    // Per request: where each went, paged.
    let mut decisions = Vec::new();
    let mut cursor = String::new();
    loop {
        let path =
            format!("/manage/v1/experiments/{}/decisions?limit=10{cursor}", cheap["id"].as_str().unwrap());
        let page = manage(&gw, "GET", &path, None).await.json().unwrap();
        decisions.extend(page["data"].as_array().unwrap().clone());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(decisions.len(), 24);
    for (d, r) in decisions.iter().zip(&production) {
        assert_eq!(d["request_id"], r.request_id.as_str());
        assert_eq!(d["baseline"]["provider"], r.provider.as_str());
        assert_eq!(d["candidate"]["provider"], "local");
        close(&d["candidate"]["cost_usd"], (r.input_tokens + r.output_tokens) as f64 * 0.01);
        if r.provider == "local" {
            // Where production was served by the same target, its own latency stands.
            close(&d["candidate"]["latency_ms"], r.latency_ms);
        }
    }

    // The CLI: a candidate file naming the config it stands in for, the table, --json.
    let file = gw.config_path.with_file_name("cheaper.yaml");
    std::fs::write(
        &file,
        "routing_configs:\n  production: { project: default, strategy: single, model: \"local/m1\" }\n",
    )
    .unwrap();
    let (ok, out, err) =
        super::manage::cli(&gw, &["replay", "--candidate", file.to_str().unwrap(), "--since", "1h"]).await;
    assert!(ok, "{out}{err}");
    for needle in [
        "BASELINE",
        "CANDIDATE",
        "cost (USD)",
        "p95 latency (ms)",
        "m1:local",
        "gpt-4o-mini:openai",
        "promote with",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    let (ok, out, err) = super::manage::cli(
        &gw,
        &[
            "replay",
            "--candidate",
            file.to_str().unwrap(),
            "--since",
            "1h",
            "--routing-config",
            "@production",
            "--json",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["candidate_summary"], cheap["candidate_summary"], "{v}");
    let (ok, out, _) = super::manage::cli(&gw, &["experiments", "list"]).await;
    assert!(ok && out.contains(v["id"].as_str().unwrap()), "{out}");
    let (ok, out, _) = super::manage::cli(&gw, &["experiments", "show", v["id"].as_str().unwrap()]).await;
    assert!(ok && out.contains("ROUTE (model:provider)"), "{out}");
    let (ok, _, err) = super::manage::cli(&gw, &["replay", "--candidate", "@nope", "--since", "1h"]).await;
    assert!(!ok && err.contains("candidate"), "{err}");

    // 3. Filters: one end user's traffic only.
    let one_user = run(
        &gw,
        json!({"candidate": "@cheaper", "filters": {"routing_config": "@production", "end_user": "user-1"}}),
    )
    .await;
    assert_eq!(one_user["requests"], 8);

    // 4. The budget that blocked still blocks (budgets as of now): every request an error.
    let capped_rows: Vec<&TraceRow> = rows.iter().filter(|r| r.model_requested == "@capped").collect();
    let capped = run(&gw, json!({"candidate": "@capped", "filters": {"routing_config": "@capped"}})).await;
    assert_eq!(capped["baseline_summary"]["errors"], blocked);
    assert_eq!(capped["candidate_summary"]["errors"], capped_rows.len());
    close(&capped["candidate_summary"]["error_rate"], 1.0);

    // 5. Promote the cheap candidate: @production v2, audited, served at once, rollback-able.
    let id = cheap["id"].as_str().unwrap();
    let promoted = manage(
        &gw,
        "POST",
        &format!("/manage/v1/experiments/{id}/promote"),
        Some(json!({"routing_config": "@production"})),
    )
    .await;
    assert_eq!(promoted.status, 200, "{}", promoted.text());
    let p = promoted.json().unwrap()["data"].clone();
    assert_eq!(p["promoted"]["version"], 2, "{p}");
    let resp = chat(&gw, "@production", &[]).await;
    assert_eq!(resp.header("x-modelux-provider-used"), Some("local"));
    assert_eq!(resp.header("x-modelux-config-version"), Some("v2"));
    let audit = manage(&gw, "GET", "/manage/v1/audit-logs?action=routing_config.updated", None).await;
    let entries = audit.json().unwrap()["data"].clone();
    assert_eq!(entries[0]["after"]["promoted_from_experiment"], id, "{entries}");
    let rollback =
        manage(&gw, "POST", "/manage/v1/routing-configs/production/rollback", Some(json!({"version": 1})))
            .await;
    assert_eq!(rollback.status, 200, "{}", rollback.text());
    // A file config is read-only.
    let file = manage(
        &gw,
        "POST",
        &format!("/manage/v1/experiments/{id}/promote"),
        Some(json!({"routing_config": "@fast"})),
    )
    .await;
    assert_eq!((file.status, file.json().unwrap()["error"]["code"].clone()), (409, json!("managed_by_file")));

    // 6. Lists, and delete.
    let list =
        manage(&gw, "GET", "/manage/v1/experiments?status=completed&limit=2", None).await.json().unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(list["has_more"], true);
    let gone =
        manage(&gw, "DELETE", &format!("/manage/v1/experiments/{}", same["id"].as_str().unwrap()), None)
            .await;
    assert_eq!(gone.status, 200);
    let again =
        manage(&gw, "GET", &format!("/manage/v1/experiments/{}", same["id"].as_str().unwrap()), None).await;
    assert_eq!(again.status, 404);
    // Retention: finished experiments created before the cut go, with their decisions.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let pruned = gw.handles.state.prune_experiments(now + 1).await.unwrap();
    assert!(pruned >= 4, "{pruned}");
    let left = manage(&gw, "GET", "/manage/v1/experiments", None).await.json().unwrap();
    assert_eq!(left["data"], json!([]), "{left}");
    let decisions = manage(&gw, "GET", &format!("/manage/v1/experiments/{id}/decisions"), None).await;
    assert_eq!(decisions.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_experiments_name_their_field_and_a_cancelled_one_stops() {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra = "traces: { flush_interval_ms: 50 }\n".into();
    let gw = start(cfg).await;
    assert_eq!(chat(&gw, "@fast", &[]).await.status, 200);
    stored_rows(&gw, 1).await;

    let bad = |body: Value, status: u16, path: &'static str| {
        let gw = &gw;
        async move {
            let resp = manage(gw, "POST", "/manage/v1/experiments", Some(body.clone())).await;
            assert_eq!(resp.status, status, "{body}: {}", resp.text());
            let e = resp.json().unwrap()["error"].clone();
            let paths: Vec<&str> =
                e["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
            assert!(paths.contains(&path), "{body}: {e}");
        }
    };
    bad(json!({"candidate": "@nope"}), 422, "candidate").await;
    // The message names the missing field.
    bad(json!({"candidate": {"strategy": "single"}, "projectId": "default"}), 422, "candidate").await;
    bad(json!({"candidate": {"strategy": "warp"}, "projectId": "default"}), 422, "candidate.strategy").await;
    bad(json!({"candidate": "@fast", "windowStart": "2030-01-01T00:00:00Z"}), 422, "windowStart").await;
    bad(
        json!({"candidate": "@fast", "window_start": "2026-01-01T00:00:00Z", "window_end": "2026-01-01T00:00:00Z"}),
        422,
        "window_end",
    )
    .await;
    // A window with no traffic in it.
    bad(
        json!({"candidate": "@fast", "windowStart": "2020-01-01T00:00:00Z", "windowEnd": "2020-01-02T00:00:00Z"}),
        422,
        "windowStart",
    )
    .await;
    bad(json!({"candidate": "@fast", "sampleSize": 50_001}), 422, "sampleSize").await;
    bad(json!({"candidatePolicy": "single", "candidateConfig": {"model": "m1", "provider_credential_id": "nope"}, "projectId": "default"}), 422, "candidateConfig.provider_credential_id").await;

    // The documented body: a policy and its provider credential.
    let ok = manage(
        &gw,
        "POST",
        "/manage/v1/experiments",
        Some(json!({"name": "to m1", "projectId": "default", "candidatePolicy": "single",
                    "candidateConfig": {"model": "m1", "provider_credential_id": "local"}})),
    )
    .await;
    assert_eq!(ok.status, 202, "{}", ok.text());
    let done = finished(&gw, ok.json().unwrap()["data"]["id"].as_str().unwrap()).await;
    assert_eq!(done["route_distribution"], json!({"m1:local": 1.0}), "{done}");
    assert_eq!(done["candidate_config"]["model"], "local/m1");

    // Enough stored traffic that a run takes a while: cancel it and it stays cancelled.
    let store = gw.handles.trace_writer.store().clone();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let template = stored_rows(&gw, 1).await.remove(0);
    for batch in 0..20 {
        let rows: Vec<TraceRow> = (0..5_000)
            .map(|i| {
                let mut r = template.clone();
                r.request_id = format!("synthetic-{batch}-{i}");
                r.ts_ms = now - 3_600_000 + (batch * 5_000 + i) as u64;
                r.ts = (r.ts_ms / 1000) as u32;
                r
            })
            .collect();
        store.insert(&rows).await.unwrap();
    }
    let resp = manage(
        &gw,
        "POST",
        "/manage/v1/experiments",
        Some(json!({"candidate": {"strategy": "single", "model": "local/m1"}, "projectId": "default"})),
    )
    .await;
    assert_eq!(resp.status, 202, "{}", resp.text());
    let id = resp.json().unwrap()["data"]["id"].as_str().unwrap().to_string();
    let cancel = manage(&gw, "POST", &format!("/manage/v1/experiments/{id}/cancel"), None).await;
    assert_eq!(cancel.status, 200, "{}", cancel.text());
    assert_eq!(cancel.json().unwrap()["data"]["status"], "cancelled");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = finished(&gw, &id).await;
    assert_eq!(after["status"], "cancelled");
    assert_eq!(after["requests"], Value::Null);
    let again = manage(&gw, "POST", &format!("/manage/v1/experiments/{id}/cancel"), None).await;
    assert_eq!(again.status, 409);
    let not_done = manage(&gw, "POST", &format!("/manage/v1/experiments/{id}/promote"), None).await;
    assert_eq!(not_done.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_experiments_fire_on_their_cron_and_judge_each_run() {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra =
        format!("{PRICES}traces: {{ flush_interval_ms: 50 }}\nwebhooks: {{ poll_interval_ms: 50 }}\n");
    let gw = start(cfg).await;
    for _ in 0..5 {
        assert_eq!(chat(&gw, "@fast", &[]).await.status, 200);
    }
    stored_rows(&gw, 5).await;
    let receiver = super::webhooks::Receiver::start(200).await;
    let hook = manage(
        &gw,
        "POST",
        "/manage/v1/webhooks/endpoints",
        Some(json!({"url": receiver.url(), "event_types": ["experiment.completed", "experiment.regression_detected"]})),
    )
    .await;
    assert_eq!(hook.status, 201, "{}", hook.text());

    let definition = json!({
        "projectId": "default", "name": "daily m1 check", "candidatePolicy": "single",
        "candidateConfig": {"model": "m1", "provider_credential_id": "local"},
        "cronExpression": "0 9 * * *", "windowHours": 1, "mode": "routing_only",
        "hypothesis": "m1 is good enough",
        "successCriteria": {"logic": "and", "min_sample_size": 1,
                            "predicates": [{"metric": "error_rate_delta_pct", "op": "lte", "value": 5}]}
    });
    let created = manage(&gw, "POST", "/manage/v1/scheduled_experiments", Some(definition.clone())).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let s = created.json().unwrap()["data"].clone();
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!((s["cron_expression"].clone(), s["version"].clone()), (json!("0 9 * * *"), json!(1)));
    assert!(s["next_run_at"].as_str().unwrap().contains("T09:00:00"), "{s}");

    // Bad definitions name their field.
    for (patch, path) in [
        (json!({"cronExpression": "every day"}), "cronExpression"),
        (
            json!({"successCriteria": {"predicates": [{"metric": "vibes", "op": "gte", "value": 1}]}}),
            "successCriteria.predicates[0].metric",
        ),
        (json!({"windowStart": "2026-01-01T00:00:00Z"}), "windowStart"),
        (json!({"candidate": "@nope"}), "candidate"),
    ] {
        let mut body = definition.clone();
        if patch.get("candidate").is_some() {
            body.as_object_mut().unwrap().remove("candidatePolicy");
            body.as_object_mut().unwrap().remove("candidateConfig");
        }
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let resp = manage(&gw, "POST", "/manage/v1/scheduled_experiments", Some(body)).await;
        assert_eq!(resp.status, 422, "{patch}: {}", resp.text());
        let e = resp.json().unwrap()["error"]["errors"].clone();
        assert!(e.as_array().unwrap().iter().any(|x| x["path"] == path), "{patch}: {e}");
    }

    let fire = || async {
        let resp = manage(&gw, "POST", &format!("/manage/v1/scheduled_experiments/{id}/run"), None).await;
        assert_eq!(resp.status, 202, "{}", resp.text());
        finished(&gw, resp.json().unwrap()["data"]["id"].as_str().unwrap()).await
    };
    let first = fire().await;
    assert_eq!(
        (first["verdict"].clone(), first["regression_detected"].clone()),
        (json!("pass"), json!(false)),
        "{first}"
    );
    assert_eq!(first["schedule_id"], id.as_str());
    assert_eq!(first["requests"], 5);
    // A criterion the run cannot meet: the first failing run is the regression, the next is not.
    let patched = manage(
        &gw,
        "PATCH",
        &format!("/manage/v1/scheduled_experiments/{id}"),
        Some(json!({"successCriteria": {"predicates": [{"metric": "cost_delta_pct", "op": "lte", "value": -1000}]}})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(patched.json().unwrap()["data"]["version"], 2);
    let second = fire().await;
    assert_eq!(
        (second["verdict"].clone(), second["regression_detected"].clone()),
        (json!("fail"), json!(true)),
        "{second}"
    );
    assert_eq!(second["signal_key"], format!("{id}:regression"));
    let third = fire().await;
    assert_eq!(
        (third["verdict"].clone(), third["regression_detected"].clone()),
        (json!("fail"), json!(false))
    );
    // Each run sends experiment.completed; only the transition into breach sends
    // experiment.regression_detected.
    let got = receiver
        .until("three completions", |g| {
            g.iter().filter(|r| r.header("x-modelux-event") == "experiment.completed").count() >= 3
                && g.iter().any(|r| r.header("x-modelux-event") == "experiment.regression_detected")
        })
        .await;
    let completed: Vec<Value> = got
        .iter()
        .filter(|r| r.header("x-modelux-event") == "experiment.completed")
        .map(|r| r.json()["data"]["experiment"].clone())
        .collect();
    let of = |run: &Value| completed.iter().find(|e| e["id"] == run["id"]).cloned();
    assert_eq!(completed.len(), 3, "{completed:?}");
    assert_eq!(of(&first).unwrap()["verdict"], "pass");
    assert_eq!(of(&second).unwrap()["verdict"], "fail");
    assert_eq!(of(&third).unwrap()["schedule_id"], id.as_str());
    let regressions = receiver.of_type("experiment.regression_detected");
    assert_eq!(regressions.len(), 1, "{regressions:?}");
    let r = regressions[0].json();
    assert_eq!(r["data"]["experiment"]["id"], second["id"], "{r}");
    assert_eq!(r["data"]["signal_key"], format!("{id}:regression"));

    // Similarity is not measured by routing_only: inconclusive.
    manage(
        &gw,
        "PATCH",
        &format!("/manage/v1/scheduled_experiments/{id}"),
        Some(json!({"successCriteria": {"predicates": [{"metric": "similarity_pct_above_threshold", "op": "gte", "value": 80, "params": {"threshold": 0.9}}]}})),
    )
    .await;
    assert_eq!(fire().await["verdict"], "inconclusive");
    let runs = manage(&gw, "GET", &format!("/manage/v1/scheduled_experiments/{id}/runs"), None)
        .await
        .json()
        .unwrap();
    let runs = runs["data"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 4);
    assert_eq!(runs[3]["id"], first["id"], "newest first");

    // The cron itself: every two seconds (six fields, seconds first) until disabled.
    let every = manage(
        &gw,
        "POST",
        "/manage/v1/scheduled_experiments",
        Some(json!({"projectId": "default", "candidate": "@fast", "cronExpression": "*/2 * * * * *", "windowHours": 1})),
    )
    .await;
    assert_eq!(every.status, 201, "{}", every.text());
    let every_id = every.json().unwrap()["data"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    let fired = loop {
        let runs = manage(&gw, "GET", &format!("/manage/v1/scheduled_experiments/{every_id}/runs"), None)
            .await
            .json()
            .unwrap();
        let runs = runs["data"].as_array().unwrap().clone();
        if runs.len() >= 2 {
            break runs;
        }
        assert!(Instant::now() < deadline, "the schedule never fired twice: {runs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(fired[0]["id"], fired[1]["id"]);
    let off = manage(
        &gw,
        "PATCH",
        &format!("/manage/v1/scheduled_experiments/{every_id}"),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(off.status, 200, "{}", off.text());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let count = |v: Value| v["data"].as_array().unwrap().len();
    let before = count(
        manage(&gw, "GET", &format!("/manage/v1/scheduled_experiments/{every_id}/runs"), None)
            .await
            .json()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let after = count(
        manage(&gw, "GET", &format!("/manage/v1/scheduled_experiments/{every_id}/runs"), None)
            .await
            .json()
            .unwrap(),
    );
    assert_eq!(before, after, "a disabled schedule fired");
    let gone = manage(&gw, "DELETE", &format!("/manage/v1/scheduled_experiments/{every_id}"), None).await;
    assert_eq!(gone.status, 200);
    let audit = manage(&gw, "GET", "/manage/v1/audit-logs?resource_type=scheduled_experiment", None)
        .await
        .json()
        .unwrap();
    assert!(audit["data"].as_array().unwrap().len() >= 4, "{audit}");
}

/// `with_responses`: the sample goes through the candidate for real (both surfaces, plain
/// and streamed), measured from the candidate's own trace records, spend counted in the
/// budgets, answers compared by the embeddings of the configured model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_responses_sends_the_sample_through_the_candidate_and_compares_answers() {
    let openai = mock(MockConfig::default()).await;
    // Shorter answers: a different text than production's.
    let local = mock(MockConfig { tokens: 7, ..MockConfig::default() }).await;
    let openai_url = openai.base_url();
    let local_url = local.base_url();
    let mut cfg = Cfg::new(openai_url.leak());
    cfg.local = Some(local_url.leak());
    cfg.top_extra = format!(
        "{PRICES}budgets:\n  - {{ name: project-daily, scope: project, project: default, period: daily, \
         cap_usd: 1000, action: block }}\ntraces: {{ flush_interval_ms: 50 }}\n\
         experiments: {{ embedding_model: \"openai/text-embedding-3-small\" }}\n"
    );
    cfg.more_configs = format!(
        "{CONFIGS}  production: {{ project: default, strategy: fallback, attempts: [\"openai/gpt-4o-mini\", \"local/m1\"] }}\n"
    );
    let gw = start(cfg).await;

    let auth = format!("Bearer {KEY}");
    let json_h = [("authorization", auth.as_str()), ("content-type", "application/json")];
    for i in 0..6 {
        let user = format!("user-{i}");
        let resp =
            chat(&gw, "@production", &[("x-modelux-user-id", &user), ("x-modelux-user-tags", "team=a")])
                .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    for _ in 0..3 {
        let body = json!({"model": "@production", "stream": true, "max_tokens": 20,
                          "messages": [{"role": "user", "content": "stream it"}]});
        let resp = httpc::request(gw.proxy, "POST", CHAT, &json_h, &serde_json::to_vec(&body).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.text().contains("data: [DONE]"), "{}", resp.text());
    }
    for stream in [false, true, false] {
        let body = json!({"model": "@production", "max_tokens": 20, "stream": stream,
                          "messages": [{"role": "user", "content": "from claude's sdk"}]});
        let h =
            [("x-api-key", KEY), ("content-type", "application/json"), ("anthropic-version", "2023-06-01")];
        let resp = httpc::request(
            gw.proxy,
            "POST",
            "/anthropic/v1/messages",
            &h,
            &serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let rows = stored_rows(&gw, 12).await;
    assert!(rows.iter().all(|r| !r.replay_answer.is_empty()), "every answer is kept for replay");
    let spend = |gw: &Gateway| {
        let gw_manage = gw.manage;
        async move {
            let auth = format!("Bearer {ADMIN_KEY}");
            let list = httpc::request(
                gw_manage,
                "GET",
                "/manage/v1/budgets",
                &[("authorization", auth.as_str())],
                b"",
            )
            .await
            .unwrap();
            let v = list.json().unwrap();
            let b =
                v["data"].as_array().unwrap().iter().find(|b| b["name"] == "project-daily").unwrap().clone();
            b["spend_usd"].as_f64().unwrap()
        }
    };
    let spend_before = spend(&gw).await;
    let openai_before = openai.request_count();

    // 1. The candidate is production itself: same answers, similarity 1 for every pair.
    let same = run(
        &gw,
        json!({"name": "same, for real", "candidate": "@production", "mode": "with_responses",
               "filters": {"routing_config": "@production"}}),
    )
    .await;
    let id = same["id"].as_str().unwrap().to_string();
    assert_eq!(same["mode"], "with_responses");
    assert_eq!(same["requests"], 12, "{same}");
    assert_eq!(same["not_replayable"], 0);
    let sim = &same["similarity"];
    assert_eq!(sim["embedding_model"], "openai/text-embedding-3-small");
    assert_eq!(sim["compared"], 12, "every pair compared, JSON and streamed, both surfaces: {sim}");
    assert_eq!(sim["min"], 1.0, "{sim}");
    assert_eq!(sim["pct_above_threshold"], 100.0);
    assert_eq!(same["similarity_pct_above_threshold"], 100.0);
    assert_eq!(same["route_distribution"], json!({"gpt-4o-mini:openai": 1.0}));
    // 12 chat calls and one embeddings call (24 texts) reached the provider.
    assert_eq!(openai.request_count() - openai_before, 13);
    // The candidate's side is its own trace records: tagged, priced, timed by the gateway.
    let store = gw.handles.trace_writer.store().clone();
    // 12 chat records and the embeddings call's (written just after the run finished).
    let deadline = Instant::now() + Duration::from_secs(10);
    let tagged = loop {
        let q = LogQuery { limit: 100, tags: vec![("experiment".into(), id.clone())], ..LogQuery::default() };
        let rows = store.list(&q).await.unwrap().rows;
        if rows.len() >= 13 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(tagged.len(), 13);
    let chats: Vec<&TraceRow> = tagged
        .iter()
        .filter(|r| r.endpoint.ends_with("/chat/completions") || r.endpoint.ends_with("/messages"))
        .collect();
    assert_eq!(chats.len(), 12);
    let seen: Vec<(&str, &str, usize)> =
        chats.iter().map(|r| (r.key_name.as_str(), r.routing_config.as_str(), r.replay_body.len())).collect();
    assert!(seen.iter().all(|(k, c, b)| *k == "dev" && *c == "@production" && *b == 0), "{seen:?}");
    assert_eq!(chats.iter().filter(|r| r.streamed).count(), 4);
    let (cost, latencies, errors, _) = baseline_of(&chats);
    assert_eq!(errors, 0);
    close(&same["candidate_summary"]["cost_usd"], cost);
    close(&same["candidate_summary"]["p50_ms"], quantile(latencies, 0.5).unwrap());
    let embed_cost =
        tagged.iter().filter(|r| r.endpoint.ends_with("/embeddings")).map(|r| r.cost_total).sum::<f64>();
    close(&sim["embedding_cost_usd"], embed_cost);
    // Spent and budgeted like any traffic.
    let spent = spend(&gw).await - spend_before;
    assert!(
        (spent - cost - embed_cost).abs() < 1e-6,
        "budget moved by {spent}, experiment cost {cost} + {embed_cost}"
    );
    let decisions =
        manage(&gw, "GET", &format!("/manage/v1/experiments/{id}/decisions?limit=100"), None).await;
    let decisions = decisions.json().unwrap()["data"].as_array().unwrap().clone();
    assert_eq!(decisions.len(), 12);
    assert!(
        decisions.iter().all(|d| d["similarity"] == 1.0 && d["candidate"]["provider"] == "openai"),
        "{decisions:?}"
    );

    // 2. A cheaper candidate with shorter answers: a sample of 5, two at a time.
    let cheaper = run(
        &gw,
        json!({"candidate": "@cheaper", "mode": "with_responses", "sample_size": 5, "concurrency": 2,
               "similarity_threshold": 0.5, "filters": {"routing_config": "@production"}}),
    )
    .await;
    assert_eq!(cheaper["requests"], 5);
    assert_eq!(cheaper["route_distribution"], json!({"m1:local": 1.0}));
    assert_eq!(cheaper["similarity"]["compared"], 5);
    assert_eq!(cheaper["similarity"]["threshold"], 0.5);
    assert_eq!(cheaper["similarity"]["pct_above_threshold"], 0.0, "{}", cheaper["similarity"]);
    assert!(cheaper["similarity"]["max"].as_f64().unwrap() < 0.5);
    assert_eq!(local.request_count(), 5);

    // Experiment traffic is never replayed itself.
    let again =
        run(&gw, json!({"candidate": "@production", "filters": {"routing_config": "@production"}})).await;
    assert_eq!(again["requests"], 12);

    // Its own fields are checked, and refused where they do not apply.
    for (body, field) in [
        (json!({"candidate": "@production", "mode": "with_responses", "concurrency": 0}), "concurrency"),
        (
            json!({"candidate": "@production", "mode": "with_responses", "similarityThreshold": 1.5}),
            "similarityThreshold",
        ),
        (json!({"candidate": "@production", "concurrency": 2}), "concurrency"),
    ] {
        let resp = manage(&gw, "POST", "/manage/v1/experiments", Some(body)).await;
        assert_eq!(resp.status, 422, "{}", resp.text());
        assert_eq!(resp.json().unwrap()["error"]["errors"][0]["path"], field, "{}", resp.text());
    }
}

/// Without an embeddings model the run still measures cost, latency and errors and says why
/// nothing was compared; a cancel stops the sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_responses_without_an_embedding_model_and_cancelled_mid_way() {
    let openai = mock(MockConfig { latency: Duration::from_millis(150), ..MockConfig::default() }).await;
    let openai_url = openai.base_url();
    let mut cfg = Cfg::new(openai_url.leak());
    // At most 3 answers a second are kept: the run samples only requests whose answer is.
    cfg.top_extra = "traces: { flush_interval_ms: 50, replay_answers_per_second: 3 }\n".into();
    let gw = start(cfg).await;
    for _ in 0..8 {
        assert_eq!(chat(&gw, "@fast", &[]).await.status, 200);
    }
    let rows = stored_rows(&gw, 8).await;
    let kept = rows.iter().filter(|r| !r.replay_answer.is_empty()).count();
    assert!(rows.iter().all(|r| !r.replay_body.is_empty()));
    assert!((3..8).contains(&kept), "{kept} answers kept over ~1.2 s at 3 a second");
    let before = openai.request_count();
    let done = run(
        &gw,
        json!({"candidate": "@fast", "mode": "with_responses", "concurrency": 4, "filters": {"routing_config": "@fast"}}),
    )
    .await;
    assert_eq!(done["requests"], kept);
    assert_eq!(done["not_replayable"], 8 - kept);
    assert_eq!(done["candidate_summary"]["errors"], 0);
    assert!(done["candidate_summary"]["p50_ms"].as_f64().unwrap() >= 150.0, "{done}");
    assert_eq!(done["similarity"]["compared"], 0);
    assert_eq!(done["similarity"]["unavailable"], "experiments.embedding_model is not set");
    assert_eq!(done["similarity_pct_above_threshold"], Value::Null);
    assert_eq!(openai.request_count() - before, kept);

    let before = openai.request_count();
    let resp = manage(
        &gw,
        "POST",
        "/manage/v1/experiments",
        Some(json!({"candidate": "@fast", "mode": "with_responses", "concurrency": 1,
                    "filters": {"routing_config": "@fast"}})),
    )
    .await;
    assert_eq!(resp.status, 202, "{}", resp.text());
    let id = resp.json().unwrap()["data"]["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cancel = manage(&gw, "POST", &format!("/manage/v1/experiments/{id}/cancel"), None).await;
    assert_eq!(cancel.status, 200, "{}", cancel.text());
    assert_eq!(finished(&gw, &id).await["status"], "cancelled");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sent = openai.request_count() - before;
    assert!(sent < kept, "a cancelled run stops sending ({sent} of {kept} sent)");
}
