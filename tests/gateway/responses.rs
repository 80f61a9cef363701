//! The OpenAI Responses API (PRODUCT.md §1.3, §4.7): created through `@config` fallback
//! among OpenAI-family providers (others skipped), bytes passed through, usage priced and
//! traced; the response remembered with the provider that made it, so follow-ups and
//! retrieve/delete/input_items reach it, per project, across a restart.

use super::*;

const RESPONSES: &str = "/openai/v1/responses";
const CALLER_KEY: &str = "sk-proj-CallerOwnedSecret0123456789abcdefTA0A";

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    key: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> Response {
    let auth = format!("Bearer {key}");
    let mut h = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
    h.extend_from_slice(extra);
    httpc::request(gw.proxy, method, path, &h, body).await.unwrap()
}

/// `primary` (kind openai) is tried first; `backup` (openai_compatible) after it; an
/// Anthropic target in front of both is skipped.
fn config<'a>(primary: &'a str, backup: &str, anthropic: &'a str, data_dir: &'a str) -> Cfg<'a> {
    let mut cfg = Cfg::new(primary);
    cfg.anthropic = Some(anthropic);
    cfg.server_extra = data_dir;
    let azure_root = primary.trim_end_matches("/v1");
    cfg.more_providers = format!(
        "  - {{ id: backup, kind: openai_compatible, base_url: \"{backup}\", api_key: \"sk-backup\" }}\n  \
         - {{ id: az, kind: azure, base_url: \"{azure_root}\", api_key: \"az-key\" }}\n"
    );
    cfg.more_configs = "  resp: { project: default, strategy: fallback, retry_on: [\"5xx\"], attempts: \
                        [\"anthropic/claude-3-5-haiku-latest\", \"openai/gpt-4o-mini\", \"backup/gpt-4o-mini\"] }\n  \
                        ens: { project: default, strategy: ensemble, aggregation: first_valid, members: [\"openai/gpt-4o-mini\", \"backup/gpt-4o-mini\"] }\n"
        .into();
    cfg.top_extra = "traces: { flush_interval_ms: 50, bodies: false }\n".into();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_fall_back_among_openai_providers_and_follow_ups_reach_their_creator() {
    let primary = mock(MockConfig { tokens: 4, ..MockConfig::default() }).await;
    let backup = mock(MockConfig { tokens: 4, ..MockConfig::default() }).await;
    let anthropic = mock(MockConfig::default()).await;
    let data = tempfile::tempdir().unwrap();
    let data_dir = format!("  data_dir: \"{}\"\n", data.path().display());
    let (p, b, a) = (primary.base_url(), backup.base_url(), anthropic.root_url());
    let gw = start(config(&p, &b, &a, &data_dir)).await;

    // 1. Plain create through @resp: the Anthropic target is skipped, the primary fails
    // with a 500, the backup answers. Only `model` was rewritten: every other byte as sent.
    primary.push_script([Behavior::Status(500)]);
    let body = br#"{ "model" : "@resp", "input": "Say hi",  "temperature": 0.70, "max_output_tokens": 8 }"#;
    let r = call(&gw, "POST", RESPONSES, KEY, body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-modelux-provider-used"), Some("backup"));
    assert_eq!(r.header("x-modelux-routing-config"), Some("@resp"));
    assert_eq!(anthropic.request_count(), 0, "a non-OpenAI target is never called");
    let sent = backup.requests().last().unwrap().clone();
    assert_eq!(sent.path, "/v1/responses");
    assert_eq!(
        String::from_utf8(sent.body.clone()).unwrap(),
        r#"{"model":"gpt-4o-mini","input":"Say hi","temperature":0.70,"max_output_tokens":8}"#
    );
    assert_eq!(sent.header("authorization"), Some("Bearer sk-backup"));
    let created = r.json().unwrap();
    assert_eq!(created["object"], "response");
    assert_eq!(created["status"], "completed");
    let id = created["id"].as_str().unwrap().to_string();
    let cost: f64 = r.header("x-modelux-cost-usd").unwrap().parse().unwrap();
    assert!(cost > 0.0, "the answer is priced from its usage");
    let log = wait_for_log(&gw, &request_id(&r)).await;
    assert_eq!(log["provider_used"], "backup");
    assert_eq!(log["input_tokens"], created["usage"]["input_tokens"]);
    assert_eq!(log["output_tokens"], 4);
    assert_eq!(log["owned_ids"], json!([id]));
    let statuses: Vec<&str> =
        log["attempt_details"].as_array().unwrap().iter().map(|a| a["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["rejected", "upstream_error", "success"], "{log}");

    // 2. A bare model name is forwarded byte for byte, whitespace included.
    let verbatim = br#"{"model": "gpt-4o-mini",   "input": "x"}"#;
    let r = call(&gw, "POST", RESPONSES, KEY, verbatim, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(primary.requests().last().unwrap().body, verbatim);

    // 3. A follow-up goes where its previous response lives, though the primary is first
    // and healthy now: the backup knows the id (the primary would answer 400).
    let follow = json!({"model": "@resp", "previous_response_id": id, "input": "And again"});
    let r = call(&gw, "POST", RESPONSES, KEY, &serde_json::to_vec(&follow).unwrap(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-modelux-provider-used"), Some("backup"));

    // 4. Streamed: the SSE passes through; usage from `response.completed` is priced.
    let stream = json!({"model": "@resp", "input": "Stream it", "stream": true});
    let r = call(&gw, "POST", RESPONSES, KEY, &serde_json::to_vec(&stream).unwrap(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let events = sse_events(&r.text());
    assert_eq!(events.first().unwrap().0, "response.created");
    let (last, completed) = events.last().unwrap();
    assert_eq!(last, "response.completed");
    let streamed_id = completed["response"]["id"].as_str().unwrap().to_string();
    assert_eq!(r.header("x-modelux-provider-used"), Some("openai"));
    let log = wait_for_log(&gw, &request_id(&r)).await;
    assert_eq!(log["output_tokens"], 4);
    assert!(log["cost_usd"]["total"].as_f64().unwrap() > 0.0, "{log}");
    assert_eq!(log["owned_ids"], json!([streamed_id]));

    // 5. Retrieve, replay, input items, delete: to the provider holding the response.
    let item = format!("{RESPONSES}/{id}");
    let r = call(&gw, "GET", &item, KEY, b"", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["id"], id.as_str());
    assert_eq!(backup.requests().last().unwrap().path, format!("/v1/responses/{id}"));
    let r =
        call(&gw, "GET", &format!("{item}?stream=true"), KEY, b"", &[("accept", "text/event-stream")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(sse_events(&r.text()).last().unwrap().0, "response.completed");
    let r = call(&gw, "GET", &format!("{item}/input_items?order=asc&limit=5"), KEY, b"", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["data"][0]["content"][0]["text"], "Say hi");
    assert_eq!(
        backup.requests().last().unwrap().path,
        format!("/v1/responses/{id}/input_items?order=asc&limit=5")
    );
    // Cancelling a response that was not created in the background: the provider's 400, as sent.
    let r = call(&gw, "POST", &format!("{item}/cancel"), KEY, b"", &[]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("background"));
    // Another project cannot reach it: the stored credentials are shared.
    let r = call(&gw, "GET", &item, OTHER_KEY, b"", &[]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "not_found");
    let r = call(&gw, "DELETE", &item, KEY, b"", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["deleted"], true);
    // The provider's own 404 passes through with its body.
    let r = call(&gw, "GET", &item, KEY, b"", &[]).await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("not found"), "{}", r.text());

    // 6. Refusals, in OpenAI's format: no OpenAI-family target, an ensemble, a bad id, a method.
    let r = call(
        &gw,
        "POST",
        RESPONSES,
        KEY,
        br#"{"model":"anthropic/claude-3-5-haiku-latest","input":"x"}"#,
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "unsupported_provider");
    assert!(error_of(&r)["message"].as_str().unwrap().contains("anthropic (anthropic)"));
    let r = call(&gw, "POST", RESPONSES, KEY, br#"{"model":"@ens","input":"x"}"#, &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&r)["code"], "unsupported_policy");
    let r = call(&gw, "GET", &format!("{RESPONSES}/resp_x%2F..%2Fy"), KEY, b"", &[]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = call(&gw, "PUT", &item, KEY, b"", &[]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, DELETE"));
    let r = call(&gw, "GET", RESPONSES, KEY, b"", &[]).await;
    assert_eq!(r.status, 405);

    // 7. BYOK: the caller's key reaches the provider on create and on retrieve; an id no
    // record names is looked for with it at the first provider the key fits.
    let r = call(
        &gw,
        "POST",
        RESPONSES,
        KEY,
        br#"{"model":"openai/gpt-4o-mini","input":"mine"}"#,
        &[("x-modelux-provider-key", CALLER_KEY)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        primary.requests().last().unwrap().header("authorization"),
        Some(format!("Bearer {CALLER_KEY}").as_str())
    );
    let mine = r.json().unwrap()["id"].as_str().unwrap().to_string();
    let r = call(
        &gw,
        "GET",
        &format!("{RESPONSES}/{mine}"),
        OTHER_KEY,
        b"",
        &[("x-modelux-provider-key", CALLER_KEY)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        primary.requests().last().unwrap().header("authorization"),
        Some(format!("Bearer {CALLER_KEY}").as_str())
    );

    // 8. Azure: its v1 API, the deployment as the model, its own key header.
    let r = call(&gw, "POST", RESPONSES, KEY, br#"{"model":"az/my-deployment","input":"hi"}"#, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = primary.requests().last().unwrap().clone();
    assert_eq!(sent.path, "/openai/v1/responses");
    assert_eq!(sent.header("api-key"), Some("az-key"));
    assert_eq!(r.json().unwrap()["model"], "my-deployment");

    // 9. After a restart the store still knows where the streamed response lives.
    drop(gw);
    let gw = start(config(&p, &b, &a, &data_dir)).await;
    let r = call(&gw, "GET", &format!("{RESPONSES}/{streamed_id}"), KEY, b"", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-modelux-provider-used"), Some("openai"), "the primary streamed it");
}
