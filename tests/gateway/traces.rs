//! Decision traces end to end on the embedded store: every request (answered, refused or
//! failed) gets one record with its decision; the logs and analytics API and the
//! `modelux logs` command read them back.

use super::*;

const FALLBACK: &str = "  fb: { project: default, strategy: fallback, retry_on: [\"5xx\"], attempts: [\"openai/gpt-4o-mini\", \"local/m1\"] }\n";

async fn traced_gateway(top_extra: &str) -> (Gateway, MockServer, MockServer) {
    let failing = mock(MockConfig { script: vec![Behavior::Status(500); 64], ..MockConfig::default() }).await;
    let good = mock(MockConfig::default()).await;
    let failing_url = failing.base_url();
    let good_url = good.base_url();
    let mut cfg = Cfg::new(failing_url.leak());
    cfg.local = Some(good_url.leak());
    cfg.more_configs = FALLBACK.into();
    cfg.top_extra = top_extra.into();
    (start(cfg).await, failing, good)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_traced_and_readable_through_the_logs_api_and_cli() {
    let (gw, _failing, _good) = traced_gateway("").await;
    let auth = format!("Bearer {KEY}");
    let body = json!({"model": "@fb", "messages": [{"role": "user", "content": "hello"}], "mlx:tags": {"tenant": "acme"}});
    let resp = post_to(
        &gw,
        CHAT,
        &[
            ("authorization", auth.as_str()),
            ("x-modelux-trace-id", "turn-17"),
            ("x-modelux-conversation-id", "chat-42"),
            ("x-modelux-user-id", "user_abc"),
        ],
        &body,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let fb_id = request_id(&resp);

    // A direct request with another tag, one refused before routing, one unknown model.
    let direct = json!({"model": "local/m1", "messages": [{"role": "user", "content": "hi"}], "mlx:tags": {"tenant": "globex"}});
    let resp = post_to(&gw, CHAT, &[("authorization", auth.as_str())], &direct).await;
    assert_eq!(resp.status, 200);
    let direct_id = request_id(&resp);
    let unauth = post(&gw, None, &chat_body("gpt-4o-mini")).await;
    assert_eq!(unauth.status, 401);
    let unauth_id = request_id(&unauth);
    let unknown = post(&gw, Some(KEY), &chat_body("@nope")).await;
    assert_eq!(unknown.status, 404);
    let unknown_id = request_id(&unknown);

    let rec = wait_for_log(&gw, &fb_id).await;
    assert_eq!(rec["request_id"], fb_id.as_str());
    assert_eq!(rec["project_id"], "default");
    assert_eq!(rec["api_key_name"], "dev");
    assert_eq!(rec["surface"], "openai");
    assert_eq!(rec["endpoint"], CHAT);
    assert_eq!(rec["model_requested"], "@fb");
    assert_eq!(rec["resolved"], "config");
    assert_eq!(rec["routing_config"], "@fb");
    assert_eq!(rec["config_version"], 1);
    assert_eq!(rec["strategy"], "fallback");
    assert_eq!(rec["provider_used"], "local");
    assert_eq!(rec["model_used"], "m1");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["attempts"], 2);
    assert_eq!(rec["tags"], json!({"tenant": "acme"}));
    assert_eq!(rec["trace_id"], "turn-17");
    assert_eq!(rec["conversation_id"], "chat-42");
    assert_eq!(rec["end_user"], "user_abc");
    assert_eq!(rec["streamed"], false);
    assert!(rec["input_tokens"].as_u64().unwrap() > 0, "{rec}");
    assert!(rec["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(rec["bytes_out"].as_u64().unwrap() > 0);
    let attempts = rec["attempt_details"].as_array().unwrap();
    assert_eq!(attempts[0]["provider"], "openai");
    assert_eq!(attempts[0]["status"], "upstream_error");
    assert_eq!(attempts[0]["http_status"], 500);
    assert_eq!(attempts[1]["provider"], "local");
    assert_eq!(attempts[1]["status"], "success");
    assert_eq!(rec["decision_trace"]["decision"]["winner_attempt"], 2);
    // Bodies are off by default.
    assert_eq!(rec["request_body"], Value::Null);
    assert_eq!(rec["response_body"], Value::Null);

    let trace = manage_get(&gw, &format!("/manage/v1/logs/{fb_id}/trace")).await;
    assert_eq!(trace.status, 200);
    let trace = trace.json().unwrap()["data"].clone();
    assert_eq!(trace["routing_config"], "@fb");
    assert_eq!(trace["attempts"].as_array().unwrap().len(), 2);

    let refused = wait_for_log(&gw, &unauth_id).await;
    assert_eq!(refused["status"], 401);
    assert_eq!(refused["error_class"], "invalid_api_key");
    assert_eq!(refused["project_id"], Value::Null);
    let missing = wait_for_log(&gw, &unknown_id).await;
    assert_eq!(missing["status"], 404);
    assert_eq!(missing["error_class"], "routing_config_not_found");
    wait_for_log(&gw, &direct_id).await;

    // Search by tag, model and status; page through everything with a cursor.
    let by_tag = manage_get(&gw, "/manage/v1/logs?tag=tenant%3Dacme").await.json().unwrap();
    let ids: Vec<&str> =
        by_tag["data"].as_array().unwrap().iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![fb_id.as_str()]);
    let by_json_tags =
        manage_get(&gw, "/manage/v1/logs?tags=%7B%22tenant%22%3A%22globex%22%7D").await.json().unwrap();
    assert_eq!(by_json_tags["data"][0]["request_id"], direct_id.as_str());
    let errors = manage_get(&gw, "/manage/v1/logs?status=4xx").await.json().unwrap();
    assert_eq!(errors["data"].as_array().unwrap().len(), 2);
    let by_trace =
        manage_get(&gw, "/manage/v1/logs?trace_id=turn-17&conversation_id=chat-42").await.json().unwrap();
    assert_eq!(by_trace["data"].as_array().unwrap().len(), 1);
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = manage_get(&gw, &format!("/manage/v1/logs?limit=1{cursor}")).await.json().unwrap();
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 1);
        seen.extend(data.iter().map(|r| r["request_id"].as_str().unwrap().to_string()));
        if page["has_more"] == false {
            assert_eq!(page["next_cursor"], Value::Null);
            break;
        }
        cursor = format!("&cursor={}", page["next_cursor"].as_str().unwrap());
    }
    let mut expected = vec![fb_id.clone(), direct_id.clone(), unauth_id.clone(), unknown_id.clone()];
    expected.sort();
    expected.reverse(); // UUIDv7: newest first is descending id order.
    assert_eq!(seen, expected);

    // Bad parameters are 400s in the management error shape.
    let bad = manage_get(&gw, "/manage/v1/logs?status=9xx").await;
    assert_eq!(bad.status, 400);
    assert!(bad.json().unwrap()["error"]["message"].as_str().unwrap().contains("status"));
    let none = manage_get(&gw, "/manage/v1/logs/00000000-0000-7000-8000-000000000000").await;
    assert_eq!(none.status, 404);
    assert_eq!(none.json().unwrap()["error"]["code"], "log_not_found");

    // Analytics: grouped by model, and by tag.
    let report = manage_get(&gw, "/manage/v1/analytics/report?group_by=model&granularity=day").await;
    assert_eq!(report.status, 200, "{}", report.text());
    let report = report.json().unwrap()["data"].clone();
    assert_eq!(report["totals"]["requests"], 4);
    assert_eq!(report["totals"]["errors"], 2);
    let m1 = report["series"].as_array().unwrap().iter().find(|s| s["group"] == "m1").unwrap();
    assert_eq!(m1["requests"], 2);
    assert!(m1["p50_latency_ms"].as_f64().unwrap() > 0.0);
    let by_tenant = manage_get(&gw, "/manage/v1/analytics/report?group_by=tag:tenant").await.json().unwrap();
    let groups: Vec<&str> = by_tenant["data"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["group"].as_str().unwrap())
        .collect();
    assert!(groups.contains(&"acme") && groups.contains(&"globex") && groups.contains(&""), "{groups:?}");

    // Every record was written; none dropped.
    assert_metric(&gw, "modelux_trace_records_total", &[("result", "dropped")], 0.0).await;
    let written = metric_value(&metrics(&gw).await, "modelux_trace_records_total", &[("result", "written")]);
    assert!(written >= 4.0, "written {written}");

    // The CLI reads the same store through the config.
    let cli = env!("CARGO_BIN_EXE_modelux");
    let out = std::process::Command::new(cli)
        .args(["logs", "--config", gw.config_path.to_str().unwrap(), "--trace", &fb_id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("config     @fb (v1)  strategy fallback"), "{text}");
    assert!(text.contains("upstream_error"), "{text}");
    assert!(text.contains("local/m1"), "{text}");
    assert!(text.contains("decision   attempt 2:"), "{text}");
    assert!(text.contains("tags       tenant=acme"), "{text}");
    let out = std::process::Command::new(cli)
        .args([
            "logs",
            "--config",
            gw.config_path.to_str().unwrap(),
            "--tag",
            "tenant=globex",
            "--since",
            "1h",
            "--model",
            "m1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(&direct_id), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_kept_only_when_enabled_and_cut_to_size() {
    let (gw, _failing, _good) = traced_gateway("traces: { bodies: true, max_body_bytes: 40 }\n").await;
    let auth = format!("Bearer {KEY}");
    let body = json!({"model": "local/m1", "messages": [{"role": "user", "content": "héllo wörld, a long enough prompt"}]});
    let resp = post_to(&gw, CHAT, &[("authorization", auth.as_str())], &body).await;
    assert_eq!(resp.status, 200);
    let id = request_id(&resp);
    let rec = wait_for_log(&gw, &id).await;
    let req = rec["request_body"].as_str().expect("a cut body comes back as text");
    let sent = serde_json::to_string(&body).unwrap();
    assert!(req.len() <= 40 && req.len() >= 37 && sent.starts_with(req), "{req}");
    let resp_body = rec["response_body"].as_str().unwrap();
    assert!(resp_body.len() <= 40 && resp.text().starts_with(resp_body), "{resp_body}");

    // Streams keep the start of what the client received.
    let stream =
        json!({"model": "local/m1", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_to(&gw, CHAT, &[("authorization", auth.as_str())], &stream).await;
    let id = request_id(&resp);
    let rec = wait_for_log(&gw, &id).await;
    assert_eq!(rec["streamed"], true);
    assert!(rec["response_body"].as_str().unwrap().starts_with("data: "), "{rec}");
}
