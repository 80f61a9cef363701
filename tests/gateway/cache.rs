//! The response cache end to end: exact hits on both surfaces and across them, streamed
//! hits and streamed misses, bypasses, not-cached requests, TTL expiry, and what the trace
//! and the metrics say.

use super::*;

const CONFIGS: &str = "  cached: { project: default, strategy: single, model: \"openai/gpt-4o-mini\", \
    cache: { mode: exact, ttl_seconds: 2 } }\n  \
    tooled: { project: default, strategy: single, model: \"openai/gpt-4o-mini\", \
    cache: { allow_tools: true, allow_nonzero_temperature: true } }\n";

async fn send(gw: &Gateway, path: &str, body: &str, extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {KEY}");
    let mut h = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
    if path.starts_with("/anthropic") {
        h.push(("anthropic-version", "2023-06-01"));
    }
    h.extend_from_slice(extra);
    httpc::request(gw.proxy, "POST", path, &h, body.as_bytes()).await.unwrap()
}

/// The text of an OpenAI answer, whole or streamed.
fn openai_text(resp: &Response) -> String {
    if resp.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
        let mut out = String::new();
        for line in resp.text().lines() {
            if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).unwrap();
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    out.push_str(t);
                }
            }
        }
        out
    } else {
        resp.json().unwrap()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    }
}

fn anthropic_text(resp: &Response) -> String {
    if resp.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
        let mut out = String::new();
        for line in resp.text().lines() {
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                if v["type"] == "content_block_delta" {
                    out.push_str(v["delta"]["text"].as_str().unwrap_or(""));
                }
            }
        }
        out
    } else {
        resp.json().unwrap()["content"][0]["text"].as_str().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_cache_hits_across_surfaces_and_streams() {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra = "traces: { flush_interval_ms: 50 }\n".into();
    cfg.more_configs = CONFIGS.into();
    let gw = start(cfg).await;
    let calls = || upstream.request_count();

    // 1. A miss goes to the provider and is stored.
    let first = send(
        &gw,
        CHAT,
        r#"{"model":"@cached","messages":[{"role":"user","content":"say hello"}],"max_tokens":20}"#,
        &[],
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-modelux-cache"), Some("MISS"));
    let paid: f64 = first.header("x-modelux-cost-usd").unwrap().parse().unwrap();
    assert!(paid > 0.0);
    let text = openai_text(&first);
    assert!(!text.is_empty());
    assert_eq!(calls(), 1);

    // 2. The same request, formatted differently: a hit, at $0, no provider call.
    let hit = send(
        &gw,
        CHAT,
        r#"{ "max_tokens": 20, "messages": [ { "content": [{"type": "text", "text": "say hello"}], "role": "user" } ], "model": "@cached" }"#,
        &[],
    )
    .await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-modelux-cache"), Some("HIT"));
    assert_eq!(hit.header("x-modelux-cache-similarity"), Some("1.0"));
    assert_eq!(hit.header("x-modelux-cost-usd"), Some("0"));
    assert_eq!(hit.header("x-modelux-provider-used"), Some("openai"));
    assert_eq!(openai_text(&hit), text);
    assert_eq!(hit.json().unwrap()["object"], "chat.completion");
    assert_eq!(calls(), 1);
    // The embedded store's size as it is when scraped (moka applies writes lazily: read
    // at the store, a cache of one entry showed 0).
    let metrics = httpc::request(gw.manage, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert_eq!(metric_value(&metrics, "modelux_cache_entries", &[]), 1.0, "{metrics}");
    assert!(metric_value(&metrics, "modelux_cache_bytes", &[]) > 100.0, "{metrics}");

    // 3. The other surface shares the entry, answered in its own shape.
    let claude = send(
        &gw,
        "/anthropic/v1/messages",
        r#"{"model":"@cached","max_tokens":20,"messages":[{"role":"user","content":"say hello"}]}"#,
        &[],
    )
    .await;
    assert_eq!(claude.status, 200, "{}", claude.text());
    assert_eq!(claude.header("x-modelux-cache"), Some("HIT"));
    assert_eq!(claude.json().unwrap()["type"], "message");
    assert_eq!(anthropic_text(&claude), text);

    // 4. Streamed hits replay as well-formed streams of each surface, usage included.
    let streamed = send(
        &gw,
        CHAT,
        r#"{"model":"@cached","messages":[{"role":"user","content":"say hello"}],"max_tokens":20,"stream":true,"stream_options":{"include_usage":true}}"#,
        &[],
    )
    .await;
    assert_eq!(streamed.header("x-modelux-cache"), Some("HIT"));
    let sse = streamed.text();
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    assert!(sse.contains("\"usage\":{"), "{sse}");
    assert_eq!(openai_text(&streamed), text);
    let claude_stream = send(
        &gw,
        "/anthropic/v1/messages",
        r#"{"model":"@cached","max_tokens":20,"stream":true,"messages":[{"role":"user","content":"say hello"}]}"#,
        &[],
    )
    .await;
    assert_eq!(claude_stream.header("x-modelux-cache"), Some("HIT"));
    assert!(claude_stream.text().contains("event: message_stop"));
    assert_eq!(anthropic_text(&claude_stream), text);
    assert_eq!(calls(), 1);

    // 5. A streamed miss is assembled as it passes and stored: a whole request then hits.
    let body = r#"{"model":"@cached","messages":[{"role":"user","content":"stream first"}],"max_tokens":20,"stream":true}"#;
    let miss = send(&gw, CHAT, body, &[]).await;
    assert_eq!(miss.header("x-modelux-cache"), Some("MISS"));
    let streamed_text = openai_text(&miss);
    let whole = send(
        &gw,
        CHAT,
        r#"{"model":"@cached","messages":[{"role":"user","content":"stream first"}],"max_tokens":20}"#,
        &[],
    )
    .await;
    assert_eq!(whole.header("x-modelux-cache"), Some("HIT"), "{}", whole.text());
    assert_eq!(openai_text(&whole), streamed_text);
    assert_eq!(calls(), 2);

    // 6. Bypasses: not read; `no-cache` still stores, `no-store` and skip do not.
    let hello = r#"{"model":"@cached","messages":[{"role":"user","content":"say hello"}],"max_tokens":20}"#;
    for (header, body) in [
        (Some(("cache-control", "no-cache")), hello.to_string()),
        (Some(("cache-control", "no-store")), hello.to_string()),
        (None, hello.replace("\"max_tokens\":20", "\"max_tokens\":20,\"mlx:cache\":{\"skip\":true}")),
    ] {
        let before = calls();
        let extra: Vec<(&str, &str)> = header.into_iter().collect();
        let resp = send(&gw, CHAT, &body, &extra).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("x-modelux-cache"), Some("BYPASS"), "{extra:?} {body}");
        assert_eq!(calls(), before + 1);
    }
    let fresh =
        r#"{"model":"@cached","messages":[{"role":"user","content":"never stored"}],"max_tokens":20}"#;
    let resp = send(&gw, CHAT, fresh, &[("cache-control", "no-store")]).await;
    assert_eq!(resp.header("x-modelux-cache"), Some("BYPASS"));
    let resp = send(&gw, CHAT, fresh, &[]).await;
    assert_eq!(resp.header("x-modelux-cache"), Some("MISS"), "a no-store answer is not written");

    // 7. Not cached without opt-in: a temperature above 0, tools. Opted in: cached.
    let warm = r#"{"model":"@cached","messages":[{"role":"user","content":"warm"}],"max_tokens":20,"temperature":0.7}"#;
    assert_eq!(send(&gw, CHAT, warm, &[]).await.header("x-modelux-cache"), Some("BYPASS"));
    // `no-cache` on a request the rules keep out stores nothing either.
    assert_eq!(
        send(&gw, CHAT, warm, &[("cache-control", "no-cache")]).await.header("x-modelux-cache"),
        Some("BYPASS")
    );
    let cool = warm.replace("0.7", "0");
    assert_eq!(send(&gw, CHAT, &cool, &[]).await.header("x-modelux-cache"), Some("MISS"));
    // A vendor field the canonical request does not model is part of the key.
    let vendor =
        r#"{"model":"@cached","messages":[{"role":"user","content":"say hello"}],"max_tokens":20,"top_k":3}"#;
    assert_eq!(send(&gw, CHAT, vendor, &[]).await.header("x-modelux-cache"), Some("MISS"));
    let tools = r#"{"model":"@cached","messages":[{"role":"user","content":"weather?"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{}}}}]}"#;
    assert_eq!(send(&gw, CHAT, tools, &[]).await.header("x-modelux-cache"), Some("BYPASS"));
    let opted = tools.replace("@cached", "@tooled");
    assert_eq!(send(&gw, CHAT, &opted, &[]).await.header("x-modelux-cache"), Some("MISS"));
    assert_eq!(send(&gw, CHAT, &opted, &[]).await.header("x-modelux-cache"), Some("HIT"));

    // 8. A config without `cache:` says nothing about it.
    let plain = send(&gw, CHAT, &hello.replace("@cached", "@fast"), &[]).await;
    assert_eq!(plain.header("x-modelux-cache"), None);

    // 9. Trace and logs: the hit is marked, with what it saved; metrics count.
    let store = gw.handles.trace_writer.store().clone();
    let hit_id = hit.header("x-modelux-request-id").unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        if let Some(r) = store.get(&hit_id).await.unwrap() {
            break r;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(row.cache_hit);
    assert!((row.cache_saved_usd - paid).abs() < 1e-9, "{} vs {paid}", row.cache_saved_usd);
    assert_eq!(row.cost_total, 0.0);
    let auth = format!("Bearer {ADMIN_KEY}");
    let log = httpc::request(
        gw.manage,
        "GET",
        &format!("/manage/v1/logs/{hit_id}"),
        &[("authorization", &auth)],
        b"",
    )
    .await
    .unwrap();
    let log = log.json().unwrap();
    assert_eq!(log["data"]["cache_hit"], true, "{log}");
    let metrics = httpc::request(gw.manage, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert!(metrics.contains("modelux_cache_lookups_total{result=\"hit\"} 6"), "{metrics}");
    assert!(metrics.contains("modelux_cache_stores_total"), "{metrics}");

    // 10. Configs made through the management API take the same `cache:`, checked alike.
    let manage = |body: Value| {
        let auth = format!("Bearer {ADMIN_KEY}");
        let gw_manage = gw.manage;
        async move {
            let h = [("authorization", auth.as_str()), ("content-type", "application/json")];
            httpc::request(
                gw_manage,
                "POST",
                "/manage/v1/routing-configs",
                &h,
                &serde_json::to_vec(&body).unwrap(),
            )
            .await
            .unwrap()
        }
    };
    let created = manage(json!({"slug": "apicached", "project": "default", "strategy": "single",
                                "model": "openai/gpt-4o-mini", "cache": {"mode": "exact", "ttl_seconds": 60}}))
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let api_body = hello.replace("@cached", "@apicached");
    assert_eq!(send(&gw, CHAT, &api_body, &[]).await.header("x-modelux-cache"), Some("MISS"));
    assert_eq!(send(&gw, CHAT, &api_body, &[]).await.header("x-modelux-cache"), Some("HIT"));
    let bad = manage(json!({"slug": "badcache", "project": "default", "strategy": "single",
                            "model": "openai/gpt-4o-mini", "cache": {"mode": "sometimes"}}))
    .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert!(bad.text().contains("cache.mode"), "{}", bad.text());

    // 11. A project made through the API with a default cache: its direct-model traffic is
    // cached; a bad `cache` names its field; PATCH null turns it off.
    let admin = format!("Bearer {ADMIN_KEY}");
    let call = |method: &'static str, path: String, body: Value| {
        let (auth, gw_manage) = (admin.clone(), gw.manage);
        async move {
            let h = [("authorization", auth.as_str()), ("content-type", "application/json")];
            httpc::request(gw_manage, method, &path, &h, &serde_json::to_vec(&body).unwrap()).await.unwrap()
        }
    };
    let bad =
        call("POST", "/manage/v1/projects".into(), json!({"name": "Bad Cache", "cache": {"mode": "often"}}))
            .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert!(bad.text().contains("cache.mode"), "{}", bad.text());
    let project = call(
        "POST",
        "/manage/v1/projects".into(),
        json!({"name": "Cached Co", "slug": "cachedco", "cache": {"mode": "exact", "ttl_seconds": 60}}),
    )
    .await;
    assert_eq!(project.status, 201, "{}", project.text());
    assert_eq!(project.json().unwrap()["data"]["cache"]["ttl_seconds"], 60);
    let key = call(
        "POST",
        "/manage/v1/api-keys".into(),
        json!({"project": "cachedco", "name": "ci", "requests_per_minute": 0}),
    )
    .await;
    assert_eq!(key.status, 201, "{}", key.text());
    let secret = key.json().unwrap()["data"]["key"].as_str().unwrap().to_string();
    let direct = r#"{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"project default"}],"max_tokens":20}"#;
    let as_project = |body: &'static str| {
        let (secret, proxy) = (secret.clone(), gw.proxy);
        async move {
            let auth = format!("Bearer {secret}");
            let h = [("authorization", auth.as_str()), ("content-type", "application/json")];
            httpc::request(proxy, "POST", CHAT, &h, body.as_bytes()).await.unwrap()
        }
    };
    assert_eq!(as_project(direct).await.header("x-modelux-cache"), Some("MISS"));
    assert_eq!(as_project(direct).await.header("x-modelux-cache"), Some("HIT"));
    // The same prompt from another project is never its hit.
    assert_eq!(send(&gw, CHAT, direct, &[]).await.header("x-modelux-cache"), None);
    // A config's own `mode: off` wins over its project's default.
    let off_config = call(
        "POST",
        "/manage/v1/routing-configs".into(),
        json!({"slug": "offco", "project": "cachedco", "strategy": "single", "model": "openai/gpt-4o-mini",
               "cache": {"mode": "off"}}),
    )
    .await;
    assert_eq!(off_config.status, 201, "{}", off_config.text());
    let via_off =
        r#"{"model":"@offco","messages":[{"role":"user","content":"project default"}],"max_tokens":20}"#;
    assert_eq!(as_project(via_off).await.header("x-modelux-cache"), None);
    let off = call("PATCH", "/manage/v1/projects/cachedco".into(), json!({"cache": null})).await;
    assert_eq!(off.status, 200, "{}", off.text());
    assert_eq!(as_project(direct).await.header("x-modelux-cache"), None);

    // 12. Entries live their config's TTL.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = send(&gw, CHAT, hello, &[]).await;
    assert_eq!(expired.header("x-modelux-cache"), Some("MISS"));
}

/// Two gateways on one Redis: an answer bought through one is a hit on the other, in the
/// other surface; with Redis gone both keep serving, uncached, and say so in a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_the_cache_on_redis_and_survive_its_outage() {
    let mut redis = tokio::task::spawn_blocking(super::redis::RedisServer::start).await.unwrap();
    let upstream = mock(MockConfig::default()).await;
    let url = upstream.base_url();
    let node = |url: String| {
        let mut cfg = Cfg::new(url.leak());
        cfg.top_extra = format!("cache: {{ redis: {{ url: \"{}\", timeout_ms: 200 }} }}\n", redis.url());
        cfg.more_configs = CONFIGS.replace("ttl_seconds: 2", "ttl_seconds: 60");
        start(cfg)
    };
    let a = node(url.clone()).await;
    let b = node(url.clone()).await;
    let hello = r#"{"model":"@cached","messages":[{"role":"user","content":"shared"}],"max_tokens":20}"#;
    let first = send(&a, CHAT, hello, &[]).await;
    assert_eq!(first.header("x-modelux-cache"), Some("MISS"));
    // Stored once `a` logged the request: poll `b` briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let hit = loop {
        let r = send(
            &b,
            "/anthropic/v1/messages",
            r#"{"model":"@cached","max_tokens":20,"messages":[{"role":"user","content":"shared"}]}"#,
            &[],
        )
        .await;
        if r.header("x-modelux-cache") == Some("HIT") || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hit.header("x-modelux-cache"), Some("HIT"), "{}", hit.text());
    assert_eq!(anthropic_text(&hit), openai_text(&first));
    assert_eq!(upstream.request_count(), 1, "b's hit never reached the provider");

    // Redis goes away: requests are served, uncached, and counted.
    redis.stop();
    for gw in [&a, &b] {
        let started = Instant::now();
        let resp = send(gw, CHAT, hello, &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("x-modelux-cache"), Some("MISS"));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
    let metrics = httpc::request(a.manage, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert!(metrics.contains("modelux_cache_errors_total{op=\"get\"}"), "{metrics}");
}

const SEMANTIC: &str = "  semantic: { project: default, strategy: single, model: \"openai/gpt-4o-mini\", \
    cache: { mode: semantic, threshold: 0.95, ttl_seconds: 60, \
    embedding_model: \"openai/text-embedding-3-small\" } }\n";

/// A chat body for `@semantic` whose last user message embeds (at the mock) to `vec`.
fn ask(vec: &str, earlier: &str) -> String {
    format!(
        r#"{{"model":"@semantic","max_tokens":20,"messages":[{earlier}{{"role":"user","content":"question [[vec:{vec}]]"}}]}}"#
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `mode: semantic`: paraphrases at or above the threshold hit with their similarity, in
/// either surface and streamed; below it, or with other earlier turns, they miss; the
/// embeddings call's cost is in the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_cache_hits_paraphrases_above_the_threshold_only() {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra = "traces: { flush_interval_ms: 50 }\n".into();
    cfg.more_configs = SEMANTIC.into();
    let gw = start(cfg).await;

    // 1. A miss: embedded, answered by the provider, stored and indexed.
    let first = send(&gw, CHAT, &ask("1,0,0", ""), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-modelux-cache"), Some("MISS"));
    let first_id = first.json().unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(upstream.request_count(), 2, "one embeddings call, one chat call");

    // 2. A paraphrase at cosine 0.96: the stored answer, at $0, with its similarity. (Not
    // polled: a miss would be stored under its own vector.)
    let hit = send(&gw, CHAT, &ask("0.96,0.28,0", ""), &[]).await;
    assert_eq!(hit.header("x-modelux-cache"), Some("HIT"), "{}", hit.text());
    assert_eq!(hit.header("x-modelux-cache-similarity"), Some("0.96"));
    assert_eq!(hit.header("x-modelux-cost-usd"), Some("0"));
    assert_eq!(hit.json().unwrap()["id"], first_id.as_str());
    let calls = upstream.request_count();

    // 3. Streamed, in the other surface: the same answer, as Anthropic events.
    let claude = send(
        &gw,
        "/anthropic/v1/messages",
        r#"{"model":"@semantic","max_tokens":20,"stream":true,"messages":[{"role":"user","content":"question [[vec:0.97,0.2431,0]]"}]}"#,
        &[],
    )
    .await;
    assert_eq!(claude.header("x-modelux-cache"), Some("HIT"), "{}", claude.text());
    assert!(claude.text().contains("event: message_stop"));
    assert_eq!(anthropic_text(&claude), openai_text(&first));
    assert_eq!(upstream.request_count(), calls + 1, "only the embeddings call");

    // 4. Below the threshold (cosine 0.9): a miss, answered by the provider.
    let far = send(&gw, CHAT, &ask("0.9,0.43589,0", ""), &[]).await;
    assert_eq!(far.header("x-modelux-cache"), Some("MISS"));
    assert_ne!(far.json().unwrap()["id"], first_id.as_str());

    // 5. The same last question after other turns: another conversation, a miss.
    let earlier = r#"{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},"#;
    let turns = send(&gw, CHAT, &ask("1,0,0", earlier), &[]).await;
    assert_eq!(turns.header("x-modelux-cache"), Some("MISS"));

    // 6. The exact request is still an exact hit (tried first, similarity 1.0); asked
    // with `mlx:trace`, the hit carries its decision trace.
    let traced = ask("1,0,0", "").replacen('{', r#"{"mlx:trace":true,"#, 1);
    let exact = send(&gw, CHAT, &traced, &[]).await;
    assert_eq!(exact.header("x-modelux-cache"), Some("HIT"));
    assert_eq!(exact.header("x-modelux-cache-similarity"), Some("1.0"));
    let body = exact.json().unwrap();
    assert_eq!(body["id"], first_id.as_str());
    assert!(body["mlx:trace"].is_object(), "{body}");

    // 7. Metrics and the trace: the embeddings calls are priced.
    let metrics = httpc::request(gw.manage, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert!(metric(&metrics, "modelux_cache_semantic_lookups_total{result=\"hit\"}") >= 2.0, "{metrics}");
    assert!(metric(&metrics, "modelux_cache_semantic_lookups_total{result=\"miss\"}") >= 3.0, "{metrics}");
    let hit_id = hit.header("x-modelux-request-id").unwrap().to_string();
    let data = wait_for_log(&gw, &hit_id).await;
    assert_eq!(data["cache_hit"], true, "{data}");
    assert!(data["cache_embedding_usd"].as_f64().unwrap() > 0.0, "{data}");
}

/// Two gateways on one Redis: a vector indexed by one is found by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_vectors_are_shared_through_redis() {
    let redis = tokio::task::spawn_blocking(super::redis::RedisServer::start).await.unwrap();
    let upstream = mock(MockConfig::default()).await;
    let url = upstream.base_url();
    let node = |url: String| {
        let mut cfg = Cfg::new(url.leak());
        cfg.top_extra = format!("cache: {{ redis: {{ url: \"{}\", timeout_ms: 500 }} }}\n", redis.url());
        cfg.more_configs = SEMANTIC.into();
        start(cfg)
    };
    let a = node(url.clone()).await;
    let b = node(url.clone()).await;
    let first = send(&a, CHAT, &ask("0,1,0", ""), &[]).await;
    assert_eq!(first.header("x-modelux-cache"), Some("MISS"));
    // The vector reaches `b` through the stream within milliseconds; a miss would be stored
    // under its own vector, so this waits instead of polling.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hit = send(&b, CHAT, &ask("0.28,0.96,0", ""), &[]).await;
    assert_eq!(hit.header("x-modelux-cache"), Some("HIT"), "{}", hit.text());
    assert_eq!(hit.header("x-modelux-cache-similarity"), Some("0.96"));
    assert_eq!(hit.json().unwrap()["id"], first.json().unwrap()["id"]);
    // A third node started afterwards reads the stream from its start.
    let c = node(url.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = send(&c, CHAT, &ask("0.2431,0.97,0", ""), &[]).await;
    assert_eq!(late.header("x-modelux-cache"), Some("HIT"), "{}", late.text());
}

/// Embeddings answers are cached by their inputs, and a hit is encoded as its caller asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_answers_are_cached() {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.more_configs = "  embedded: { project: default, strategy: single, \
        model: \"openai/text-embedding-3-small\", cache: { mode: exact, ttl_seconds: 60 } }\n"
        .into();
    let gw = start(cfg).await;
    let path = "/openai/v1/embeddings";
    let body = r#"{"model":"@embedded","input":["alpha","beta"],"encoding_format":"float"}"#;
    let first = send(&gw, path, body, &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-modelux-cache"), Some("MISS"));
    let hit = send(&gw, path, body, &[]).await;
    assert_eq!(hit.header("x-modelux-cache"), Some("HIT"));
    assert_eq!(hit.header("x-modelux-cost-usd"), Some("0"));
    let (a, b) = (first.json().unwrap(), hit.json().unwrap());
    assert_eq!(a["data"], b["data"]);
    assert_eq!(a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"]);
    assert_eq!(upstream.request_count(), 1);
    // base64, as the OpenAI SDK asks by default: the same entry, the same floats.
    let b64 =
        send(&gw, path, r#"{"input":["alpha","beta"],"model":"@embedded","encoding_format":"base64"}"#, &[])
            .await;
    assert_eq!(b64.header("x-modelux-cache"), Some("HIT"));
    let v = b64.json().unwrap();
    use base64::Engine as _;
    let b64_text = v["data"][1]["embedding"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64_text).unwrap();
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let want: Vec<f32> =
        a["data"][1]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(floats, want);
    // Other dimensions, or no-store: not this entry.
    let dims = send(&gw, path, r#"{"model":"@embedded","input":["alpha","beta"],"dimensions":8}"#, &[]).await;
    assert_eq!(dims.header("x-modelux-cache"), Some("MISS"));
    let skip = send(&gw, path, body, &[("cache-control", "no-store")]).await;
    assert_eq!(skip.header("x-modelux-cache"), Some("BYPASS"));
    assert_eq!(upstream.request_count(), 3);
}

/// The embeddings provider is down: semantic requests are served uncached, at once, and
/// counted; nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_cache_with_its_embeddings_provider_down_serves_uncached() {
    let upstream = mock(MockConfig::default()).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.more_providers =
        format!("  - {{ id: deademb, kind: openai, base_url: \"{dead}\", api_key: \"sk-x\" }}\n");
    cfg.more_configs = SEMANTIC.replace("openai/text-embedding-3-small", "deademb/text-embedding-3-small");
    let gw = start(cfg).await;
    for _ in 0..2 {
        let started = Instant::now();
        let r = send(&gw, CHAT, &ask("1,0,0", ""), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The exact entry is stored and found; the semantic part is skipped, not failed.
        assert!(matches!(r.header("x-modelux-cache"), Some("MISS") | Some("HIT")));
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }
    let other = send(&gw, CHAT, &ask("0.96,0.28,0", ""), &[]).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("x-modelux-cache"), Some("MISS"));
    let metrics = httpc::request(gw.manage, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert!(metric(&metrics, "modelux_cache_errors_total{op=\"embed\"}") >= 2.0, "{metrics}");
    assert!(metric(&metrics, "modelux_cache_semantic_lookups_total{result=\"error\"}") >= 2.0, "{metrics}");
}
