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
    let mut h = vec![("authorization", auth.as_str())];
    if !extra.iter().any(|(n, _)| *n == "content-type") {
        h.push(("content-type", "application/json"));
    }
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

    // Another project cannot continue it on the shared credentials, nor with a key of its
    // own that fits no provider the model routes to (the stored one would be used).
    let r = call(&gw, "POST", RESPONSES, OTHER_KEY, &serde_json::to_vec(&follow).unwrap(), &[]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call(
        &gw,
        "POST",
        RESPONSES,
        OTHER_KEY,
        &serde_json::to_vec(&follow).unwrap(),
        &[("x-modelux-provider-key", "sk-ant-api03-not-an-openai-key")],
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());

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

fn beta_of(key: &str) -> [(&str, &str); 3] {
    [("x-api-key", key), ("anthropic-version", "2023-06-01"), ("anthropic-beta", "files-api-2025-04-14")]
}

fn multipart(boundary: &str, fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, data) in fields {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(f) = filename {
            out.extend_from_slice(
                format!("; filename=\"{f}\"\r\nContent-Type: application/jsonl").as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_batches_reach_the_provider_holding_them_on_both_surfaces() {
    let openai = mock(MockConfig { tokens: 3, ..MockConfig::default() }).await;
    let anthropic = mock(MockConfig { tokens: 3, ..MockConfig::default() }).await;
    let mut cfg = Cfg::new(openai.base_url().leak());
    let anthropic_root = anthropic.root_url();
    cfg.anthropic = Some(&anthropic_root);
    cfg.top_extra = "traces: { flush_interval_ms: 50 }\n".into();
    let gw = start(cfg).await;
    let ct = "multipart/form-data; boundary=mlxTestBoundary";

    // OpenAI: upload, list, metadata, content, batch from it, its output file, delete.
    let lines = b"{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"gpt-4o-mini\",\"messages\":[]}}\n{\"custom_id\":\"b\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"gpt-4o-mini\",\"messages\":[]}}\n";
    let form =
        multipart("mlxTestBoundary", &[("purpose", None, b"batch"), ("file", Some("in.jsonl"), lines)]);
    let r = call(&gw, "POST", "/openai/v1/files", KEY, &form, &[("content-type", ct)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let file = r.json().unwrap();
    let file_id = file["id"].as_str().unwrap().to_string();
    assert_eq!(file["bytes"], lines.len());
    assert_eq!(r.header("x-modelux-provider-used"), Some("openai"));
    let sent = openai.requests().last().unwrap().clone();
    assert_eq!(sent.header("content-type"), Some(ct), "the multipart type and boundary go through");
    assert_eq!(sent.body, form, "the upload arrives byte for byte");
    let log = wait_for_log(&gw, &request_id(&r)).await;
    assert_eq!(log["owned_ids"], json!([file_id]));
    assert_eq!(log["bytes_in"], form.len());

    let r = call(&gw, "GET", "/openai/v1/files?purpose=batch&limit=5", KEY, b"", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["data"][0]["id"], file_id.as_str());
    assert_eq!(openai.requests().last().unwrap().path, "/v1/files?purpose=batch&limit=5");
    let r = call(&gw, "GET", &format!("/openai/v1/files/{file_id}/content"), KEY, b"", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, lines);

    let batch =
        json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let r = call(&gw, "POST", "/openai/v1/batches", KEY, &serde_json::to_vec(&batch).unwrap(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let batch_id = r.json().unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(r.json().unwrap()["status"], "validating");
    let r = call(&gw, "GET", &format!("/openai/v1/batches/{batch_id}"), KEY, b"", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let done = r.json().unwrap();
    assert_eq!(done["status"], "completed");
    let output = done["output_file_id"].as_str().unwrap().to_string();
    // The output file was learned from the batch: it is reachable.
    let r = call(&gw, "GET", &format!("/openai/v1/files/{output}/content"), KEY, b"", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text().lines().count(), 2);
    let r = call(&gw, "GET", "/openai/v1/batches?limit=2", KEY, b"", &[]).await;
    assert_eq!(r.json().unwrap()["data"][0]["id"], batch_id.as_str());
    let r = call(&gw, "POST", &format!("/openai/v1/batches/{batch_id}/cancel"), KEY, b"", &[]).await;
    assert_eq!(r.status, 400, "the provider's refusal passes through: {}", r.text());
    // Another project reaches none of it; a batch from a file it does not hold is refused.
    let r = call(&gw, "GET", &format!("/openai/v1/files/{file_id}"), OTHER_KEY, b"", &[]).await;
    assert_eq!(r.status, 404);
    let r =
        call(&gw, "POST", "/openai/v1/batches", OTHER_KEY, &serde_json::to_vec(&batch).unwrap(), &[]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call(&gw, "POST", "/openai/v1/batches", KEY, b"{}", &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&r)["code"], "missing_field");
    let r = call(&gw, "DELETE", &format!("/openai/v1/files/{file_id}"), KEY, b"", &[]).await;
    assert_eq!((r.status, r.json().unwrap()["deleted"].clone()), (200, json!(true)));
    let r = call(&gw, "PUT", "/openai/v1/files", KEY, b"", &[]).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, POST")));
    // A 403 is about the resource here: passed through, unlike a 401 on the stored key.
    openai.push_script([Behavior::Status(403)]);
    let r = call(&gw, "GET", "/openai/v1/files", KEY, b"", &[]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    openai.push_script([Behavior::Status(401)]);
    let r = call(&gw, "GET", "/openai/v1/files", KEY, b"", &[]).await;
    assert_eq!((r.status, error_of(&r)["code"].clone()), (502, json!("provider_auth_failed")));
    // A response id on the files path is not a file, though this project created it.
    let resp = call(&gw, "POST", RESPONSES, KEY, br#"{"model":"gpt-4o-mini","input":"x"}"#, &[]).await;
    let resp_id = resp.json().unwrap()["id"].as_str().unwrap().to_string();
    let r = call(&gw, "GET", &format!("/anthropic/v1/files/{resp_id}"), KEY, b"", &beta_of(KEY)).await;
    assert_eq!(r.status, 404, "{}", r.text());

    // `Expect: 100-continue` (curl's large uploads) is answered before the body is sent.
    let mut sock = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST /openai/v1/files HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {ct}\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        form.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(500), sock.read(&mut buf))
        .await
        .expect("no 100 Continue")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 100"), "{}", String::from_utf8_lossy(&buf[..n]));
    sock.write_all(&form).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = sock.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..n]);
            if answer.windows(7).any(|w| w == b"\"bytes\"") {
                break;
            }
        }
    })
    .await;
    assert!(
        String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Anthropic: message batches, their results through the gateway, files (beta header kept).
    let av = [("x-api-key", KEY), ("anthropic-version", "2023-06-01")];
    let create = json!({"requests": [
        {"custom_id": "one", "params": {"model": "claude-3-5-haiku-latest", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "two", "params": {"model": "claude-3-5-haiku-latest", "max_tokens": 8, "messages": [{"role": "user", "content": "yo"}]}}
    ]});
    let r =
        call(&gw, "POST", "/anthropic/v1/messages/batches", KEY, &serde_json::to_vec(&create).unwrap(), &av)
            .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mb = r.json().unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(r.header("x-modelux-provider-used"), Some("anthropic"));
    assert_eq!(anthropic.requests().last().unwrap().header("anthropic-version"), Some("2023-06-01"));
    let r = call(&gw, "GET", &format!("/anthropic/v1/messages/batches/{mb}"), KEY, b"", &av).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ended = r.json().unwrap();
    assert_eq!(ended["processing_status"], "ended");
    let url = ended["results_url"].as_str().unwrap();
    let expected = format!("http://{}/anthropic/v1/messages/batches/{mb}/results", gw.proxy);
    assert_eq!(url, expected, "results_url points at the gateway");
    let r = call(&gw, "GET", &format!("/anthropic/v1/messages/batches/{mb}/results"), KEY, b"", &av).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results: Vec<Value> = r.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["result"]["type"], "succeeded");
    let r = call(&gw, "GET", "/anthropic/v1/messages/batches?limit=5", KEY, b"", &av).await;
    assert!(r.text().contains(&expected), "{}", r.text());
    let r = call(&gw, "DELETE", &format!("/anthropic/v1/messages/batches/{mb}"), KEY, b"", &av).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["type"], "message_batch_deleted");
    let r = call(&gw, "GET", &format!("/anthropic/v1/messages/batches/{mb}"), KEY, b"", &av).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json().unwrap()["type"], "error", "the provider's 404 in its own shape");

    let beta = [
        ("x-api-key", KEY),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "files-api-2025-04-14"),
        ("content-type", ct),
    ];
    let form = multipart("mlxTestBoundary", &[("file", Some("notes.txt"), b"hello files")]);
    let r = call(&gw, "POST", "/anthropic/v1/files", KEY, &form, &beta).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let afile = r.json().unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(anthropic.requests().last().unwrap().header("anthropic-beta"), Some("files-api-2025-04-14"));
    let r = call(&gw, "GET", &format!("/anthropic/v1/files/{afile}"), KEY, b"", &beta[..3]).await;
    assert_eq!(r.json().unwrap()["size_bytes"], 11);
    let r = call(&gw, "GET", &format!("/anthropic/v1/files/{afile}/content"), KEY, b"", &beta[..3]).await;
    assert_eq!(r.body, b"hello files");
    let r = call(&gw, "DELETE", &format!("/anthropic/v1/files/{afile}"), KEY, b"", &beta[..3]).await;
    assert_eq!(r.json().unwrap()["type"], "file_deleted");
    // The bare `/v1` base: an Anthropic client's files are Anthropic's, batches too.
    let r = call(&gw, "GET", "/v1/files", KEY, b"", &beta[..3]).await;
    assert_eq!((r.status, r.header("x-modelux-provider-used")), (200, Some("anthropic")), "{}", r.text());
    let r = call(&gw, "GET", "/v1/messages/batches", KEY, b"", &av).await;
    assert_eq!((r.status, r.header("x-modelux-provider-used")), (200, Some("anthropic")), "{}", r.text());
    let r = call(&gw, "GET", "/v1/files", KEY, b"", &[]).await;
    assert_eq!((r.status, r.header("x-modelux-provider-used")), (200, Some("openai")), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_and_images_are_routed_by_model_to_openai_and_azure_only() {
    let openai = mock(MockConfig { tokens: 3, ..MockConfig::default() }).await;
    let azure = mock(MockConfig::default()).await;
    let anthropic = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(openai.base_url().leak());
    let anthropic_root = anthropic.root_url();
    cfg.anthropic = Some(&anthropic_root);
    cfg.more_providers = format!(
        "  - {{ id: az, kind: azure, base_url: \"{}\", api_key: \"az-key\", api_version: \"2024-10-21\" }}\n",
        azure.root_url()
    );
    cfg.more_configs = "  voice: { project: default, strategy: fallback, retry_on: [\"5xx\"], attempts: \
                        [\"anthropic/claude-3-5-haiku-latest\", \"openai/gpt-4o-transcribe\", \"az/whisper-dep\"] }\n  \
                        draw: { project: default, strategy: ensemble, aggregation: first_valid, members: [\"openai/gpt-image-1\", \"az/img\"] }\n"
        .into();
    cfg.top_extra = "traces: { flush_interval_ms: 50 }\nprices:\n  gpt-image-1: { input_per_mtok: 5.0, output_per_mtok: 40.0 }\n".into();
    let gw = start(cfg).await;
    let ct = "multipart/form-data; boundary=mlxAudio";
    let audio: Vec<u8> = (0..40_000u32).map(|i| (i % 256) as u8).collect();

    // Transcription through @voice: the Anthropic target skipped, OpenAI's 500 fallen over,
    // Azure's deployment answers; only the model field was rewritten.
    openai.push_script([Behavior::Status(500)]);
    let form = multipart("mlxAudio", &[("file", Some("a.wav"), &audio), ("model", None, b"@voice")]);
    let r = call(&gw, "POST", "/openai/v1/audio/transcriptions", KEY, &form, &[("content-type", ct)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-modelux-provider-used"), Some("az"));
    assert_eq!(r.json().unwrap()["text"], "mock transcript of 40000 bytes");
    assert_eq!(anthropic.request_count(), 0);
    let sent = azure.requests().last().unwrap().clone();
    assert_eq!(sent.path, "/openai/deployments/whisper-dep/audio/transcriptions?api-version=2024-10-21");
    assert_eq!(sent.header("api-key"), Some("az-key"));
    assert_eq!(
        sent.body,
        multipart("mlxAudio", &[("file", Some("a.wav"), &audio), ("model", None, b"whisper-dep")])
    );
    let log = wait_for_log(&gw, &request_id(&r)).await;
    let statuses: Vec<&str> =
        log["attempt_details"].as_array().unwrap().iter().map(|a| a["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["rejected", "upstream_error", "success"], "{log}");
    assert!(log["input_tokens"].as_u64().unwrap() < 100, "audio bytes are not counted as tokens: {log}");

    // No model: openai/whisper-1, added to the form.
    let form = multipart("mlxAudio", &[("file", Some("a.wav"), &audio[..100])]);
    let r = call(&gw, "POST", "/openai/v1/audio/translations", KEY, &form, &[("content-type", ct)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = openai.requests().last().unwrap().clone();
    assert_eq!(sent.path, "/v1/audio/translations");
    assert!(String::from_utf8_lossy(&sent.body).contains("name=\"model\"\r\n\r\nwhisper-1\r\n"));
    let r = call(&gw, "POST", "/openai/v1/audio/transcriptions", KEY, b"not a form", &[("content-type", ct)])
        .await;
    assert_eq!((r.status, error_of(&r)["code"].clone()), (400, json!("invalid_multipart")));

    // Speech: binary audio streamed back as it comes.
    let r = call(
        &gw,
        "POST",
        "/openai/v1/audio/speech",
        KEY,
        br#"{"model":"openai/tts-1","input":"hello","voice":"alloy"}"#,
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("audio/mpeg"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body.len(), 10 + 5 * 4096);
    assert!(r.body.starts_with(b"ID3"));
    assert_eq!(r.body[10..20], (0..10u8).collect::<Vec<_>>()[..]);

    // Images: priced from the answer's usage where the table has the model.
    let r = call(
        &gw,
        "POST",
        "/openai/v1/images/generations",
        KEY,
        br#"{"model":"gpt-image-1","prompt":"a cat"}"#,
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["usage"]["output_tokens"], 1056);
    let cost: f64 = r.header("x-modelux-cost-usd").unwrap().parse().unwrap();
    assert!((cost - (2.0 * 5.0 + 1056.0 * 40.0) / 1e6).abs() < 1e-9, "{cost}");
    let r = call(&gw, "POST", "/openai/v1/images/generations", KEY, br#"{"prompt":"a dog"}"#, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(openai.requests().last().unwrap().json().unwrap()["model"], "dall-e-2");
    let r =
        call(&gw, "POST", "/openai/v1/images/generations", KEY, br#"{"model":"@draw","prompt":"x"}"#, &[])
            .await;
    assert_eq!((r.status, error_of(&r)["code"].clone()), (400, json!("unsupported_policy")));
    let r = call(
        &gw,
        "POST",
        "/openai/v1/audio/speech",
        KEY,
        br#"{"model":"anthropic/claude-3-5-haiku-latest","input":"x"}"#,
        &[],
    )
    .await;
    assert_eq!((r.status, error_of(&r)["code"].clone()), (400, json!("unsupported_provider")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_trickling_below_the_minimum_rate_is_cut_with_408() {
    let openai = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(openai.base_url().leak());
    cfg.server_extra = "  client_body_timeout_ms: 300\n";
    let gw = start(cfg).await;
    let mut sock = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST /openai/v1/files HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    // One byte every 100 ms: each piece comes within the 300 ms wait, the average never
    // reaches 64 KiB/s, so the upload is cut once 300 ms of waiting have passed.
    let started = Instant::now();
    let mut answer = Vec::new();
    for _ in 0..30 {
        if sock.write_all(b"-").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), sock.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2), "cut after {:?}", started.elapsed());
    assert_eq!(openai.request_count(), 0, "nothing complete reached the provider");
}
