//! Routing strategies end to end: scripted mock upstreams (429 then 200, 5xx, slow, reset
//! before and after the first byte, flapping health) behind one gateway per test.

use super::*;

/// `p1`, `p2`, … as OpenAI-compatible providers, one per mock.
fn providers_for(mocks: &[&MockServer]) -> String {
    mocks
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "  - {{ id: p{}, kind: openai_compatible, base_url: \"{}\", models: [\"m\"] }}\n",
                i + 1,
                m.base_url()
            )
        })
        .collect()
}

async fn routed(mocks: &[&MockServer], configs: &str, top_extra: &str) -> Gateway {
    let mut cfg = Cfg::new(mocks[0].base_url().leak());
    cfg.more_providers = providers_for(mocks);
    cfg.more_configs = configs.to_string();
    cfg.top_extra = top_extra.to_string();
    start(cfg).await
}

fn body_for(model: &str, extra: Value) -> Vec<u8> {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    serde_json::to_vec(&v).unwrap()
}

async fn ask(gw: &Gateway, model: &str, extra: Value) -> Response {
    post(gw, Some(KEY), &body_for(model, extra)).await
}

async fn ask_with(gw: &Gateway, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let auth = format!("Bearer {KEY}");
    let mut h = vec![("content-type", "application/json"), ("authorization", auth.as_str())];
    h.extend_from_slice(headers);
    httpc::request(gw.proxy, "POST", path, &h, body).await.unwrap()
}

fn trace_of(resp: &Response) -> Value {
    let v: Value = resp.json().unwrap_or_else(|_| panic!("not JSON: {}", resp.text()));
    v["mlx:trace"].clone()
}

fn attempt_statuses(trace: &Value) -> Vec<String> {
    trace["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}:{}", a["provider"].as_str().unwrap(), a["status"].as_str().unwrap()))
        .collect()
}

fn answer_text(resp: &Response) -> String {
    let v: Value = resp.json().unwrap_or_else(|_| panic!("not JSON: {}", resp.text()));
    v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string()
}

const FALLBACK: &str = "  chain: { project: default, strategy: fallback, retry_on: [\"429\", \"5xx\", \"timeout\", \"connect\"], attempts: [ { model: \"p1/m\", timeout_ms: 400 }, { model: \"p2/m\", timeout_ms: 2000 } ] }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_moves_on_before_the_first_byte_and_the_client_never_sees_it() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig { tokens: 3, ..Default::default() }).await;
    // Health thresholds high enough that p1 stays in the chain through these failures.
    let gw = routed(&[&a, &b], FALLBACK, "health: { consecutive_failures: 100, min_requests: 1000 }\n").await;

    for (behavior, status) in [
        (Behavior::Status(429), "rate_limited"),
        (Behavior::Status(503), "upstream_error"),
        (Behavior::ResetBeforeHeaders, "connect_error"),
        (Behavior::Hang, "timeout"),
    ] {
        // A reset on a pooled connection looks like a stale connection and is retried once
        // on a fresh one (upstream.rs): script it twice so the attempt really fails.
        let times = if behavior == Behavior::ResetBeforeHeaders { 2 } else { 1 };
        a.push_script(vec![behavior.clone(); times]);
        let started = Instant::now();
        let r = ask(&gw, "@chain", json!({"mlx:trace": true})).await;
        assert_eq!(r.status, 200, "{behavior:?}: {}", r.text());
        assert_eq!(r.header("x-modelux-provider-used"), Some("p2"), "{behavior:?}: {}", r.text());
        assert_eq!(r.header("x-modelux-attempts"), Some("2"));
        assert_eq!(r.header("x-modelux-routing-config"), Some("@chain"));
        assert_eq!(r.header("x-modelux-config-version"), Some("v1"));
        assert_eq!(answer_text(&r), " tok0 tok1 tok2");
        let trace = trace_of(&r);
        assert_eq!(trace["strategy"], "fallback");
        assert_eq!(trace["routing_config"], "@chain");
        assert_eq!(attempt_statuses(&trace), vec![format!("p1:{status}"), "p2:success".to_string()]);
        assert_eq!(trace["decision"]["winner_attempt"], 2);
        drain_script(&a).await;
        if behavior == Behavior::Hang {
            // The per-attempt timeout (400 ms) bounded the hang.
            assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
            assert!(trace["attempts"][0]["duration_ms"].as_f64().unwrap() >= 390.0);
        }
    }

    // Streams: a reset before any byte is invisible too.
    a.push_script([Behavior::ResetMidStream { after_chunks: 0 }]);
    let r = ask(&gw, "@chain", json!({"stream": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    assert!(r.text().contains("tok2") && r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());

    // After the first byte there is no way back: the failure is an in-stream error event.
    a.push_script([Behavior::ResetMidStream { after_chunks: 2 }]);
    let r = ask(&gw, "@chain", json!({"stream": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-modelux-provider-used"), Some("p1"));
    let text = r.text();
    assert!(text.contains("\"error\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");

    // A client error is the request's fault: never retried, passed through.
    let b_before = b.request_count();
    a.push_script([Behavior::Status(400)]);
    let r = ask(&gw, "@chain", json!({})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(b.request_count(), b_before);
    assert_metric(
        &gw,
        "modelux_upstream_attempts_total",
        &[("provider", "p1"), ("outcome", "client_error")],
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_total_budget_and_the_last_failure() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let configs = "  only5xx: { project: default, strategy: fallback, retry_on: [\"5xx\"], attempts: [\"p1/m\", \"p2/m\"] }\n  \
                   budget: { project: default, strategy: fallback, total_budget_ms: 500, attempts: [ { model: \"p1/m\", timeout_ms: 300 }, { model: \"p2/m\" } ] }\n";
    let gw = routed(&[&a, &b], configs, "health: { consecutive_failures: 100, min_requests: 1000 }\n").await;

    // 429 is not in retry_on: it reaches the client as a 429.
    a.push_script([Behavior::Status(429)]);
    let r = ask(&gw, "@only5xx", json!({})).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(b.request_count(), 0);

    // Both fail with 5xx: the last failure's status, mapped (5xx → 502).
    a.push_script([Behavior::Status(500)]);
    b.push_script([Behavior::Status(503)]);
    let r = ask(&gw, "@only5xx", json!({})).await;
    assert_eq!(r.status, 502, "{}", r.text());

    // p1 times out at 300 ms; p2 is slower than the 200 ms left of the budget: 504.
    a.push_script([Behavior::Hang]);
    b.push_script([Behavior::Delay(Duration::from_millis(1500))]);
    let started = Instant::now();
    let r = ask(&gw, "@budget", json!({"mlx:trace": true})).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_millis(1200), "{:?}", started.elapsed());
    assert_eq!(error_of(&r)["code"], "upstream_timeout");
}

/// The seeds' own example, `retry_on: ["429", "5xx", "timeout"]`: a provider that is down
/// (nothing listening, TLS that fails, a reset before the answer) is a 5xx to the client,
/// so it fails over. `connect` alone still selects only that class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_fails_over_under_5xx() {
    let plain = mock(MockConfig::default()).await;
    let good = mock(MockConfig { tokens: 3, ..Default::default() }).await;
    // Nothing listens here; an HTTPS URL to a plain-HTTP server fails the TLS handshake.
    let refused = format!("http://127.0.0.1:{}/v1", free_port());
    let tls_fails = plain.base_url().replace("http://", "https://");
    let mut providers = providers_for(&[&plain, &good]);
    for (id, url) in [("down", &refused), ("tls", &tls_fails)] {
        providers.push_str(&format!(
            "  - {{ id: {id}, kind: openai_compatible, base_url: \"{url}\", models: [\"m\"] }}\n"
        ));
    }
    let configs = "  seed: { project: default, strategy: fallback, retry_on: [\"429\", \"5xx\", \"timeout\"], attempts: [\"down/m\", \"tls/m\", \"p2/m\"] }\n  \
                   reset: { project: default, strategy: fallback, retry_on: [\"429\", \"5xx\", \"timeout\"], attempts: [\"p1/m\", \"p2/m\"] }\n  \
                   only_connect: { project: default, strategy: fallback, retry_on: [\"connect\"], attempts: [\"down/m\", \"p2/m\"] }\n  \
                   only_429: { project: default, strategy: fallback, retry_on: [\"429\"], attempts: [\"down/m\", \"p2/m\"] }\n";
    let mut cfg = Cfg::new(plain.base_url().leak());
    cfg.more_providers = providers;
    cfg.more_configs = configs.to_string();
    cfg.top_extra = "health: { consecutive_failures: 100, min_requests: 1000 }\n".into();
    let gw = start(cfg).await;

    for stream in [false, true] {
        let r = ask(&gw, "@seed", json!({"mlx:trace": !stream, "stream": stream})).await;
        assert_eq!(r.status, 200, "stream={stream}: {}", r.text());
        assert_eq!(r.header("x-modelux-provider-used"), Some("p2"), "{}", r.text());
        assert_eq!(r.header("x-modelux-attempts"), Some("3"));
        if !stream {
            let trace = trace_of(&r);
            assert_eq!(
                attempt_statuses(&trace),
                vec!["down:connect_error", "tls:connect_error", "p2:success"],
                "{trace}"
            );
        } else {
            assert!(r.text().contains("tok2") && r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
        }
    }

    // A reset before the answer (twice: a pooled connection's reset is retried once).
    plain.push_script(vec![Behavior::ResetBeforeHeaders; 2]);
    let r = ask(&gw, "@reset", json!({"mlx:trace": true})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(attempt_statuses(&trace_of(&r)), vec!["p1:connect_error", "p2:success"]);
    drain_script(&plain).await;

    let r = ask(&gw, "@only_connect", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));

    // Without 5xx or connect in retry_on, the failure is the client's answer: a 502.
    let before = good.request_count();
    let r = ask(&gw, "@only_429", json!({})).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "upstream_unavailable");
    assert_eq!(good.request_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_targets_are_skipped_and_probed_back() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let gw = routed(
        &[&a, &b],
        FALLBACK,
        "health: { consecutive_failures: 2, min_requests: 1000, probe_after_ms: 400 }\n",
    )
    .await;
    a.push_script([Behavior::Status(500), Behavior::Status(500)]);
    for _ in 0..2 {
        assert_eq!(ask(&gw, "@chain", json!({})).await.status, 200);
    }
    // p1 is open now: skipped without being called.
    let a_calls = a.request_count();
    let r = ask(&gw, "@chain", json!({"mlx:trace": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(a.request_count(), a_calls);
    let trace = trace_of(&r);
    assert_eq!(attempt_statuses(&trace), vec!["p2:success"]);
    let rejected = &trace["candidates"][1];
    assert_eq!(
        (rejected["provider"].as_str(), rejected["status"].as_str()),
        (Some("p1"), Some("last_resort"))
    );
    assert_eq!(rejected["reason"], "provider unhealthy; tried only if every other candidate fails");
    assert_eq!(rejected["health"]["healthy"], false);
    assert_metric(&gw, "modelux_target_healthy", &[("provider", "p1"), ("model", "m")], 0.0).await;

    // Flapping: the probe after 400 ms fails (p1 stays out, the client still gets p2) ...
    tokio::time::sleep(Duration::from_millis(450)).await;
    a.push_script([Behavior::Status(500)]);
    let r = ask(&gw, "@chain", json!({"mlx:trace": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(trace_of(&r)["candidates"][0]["reason"], "half-open probe of an unhealthy target");
    assert_eq!(a.request_count(), a_calls + 1);
    let r = ask(&gw, "@chain", json!({})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    assert_eq!(a.request_count(), a_calls + 1, "no second probe within the interval");
    // ... the next probe succeeds and p1 is back.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let r = ask(&gw, "@chain", json!({})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p1"));
    let r = ask(&gw, "@chain", json!({})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p1"));
    assert_metric(&gw, "modelux_target_healthy", &[("provider", "p1"), ("model", "m")], 1.0).await;
    let m = metrics(&gw).await;
    assert!(
        metric_value(&m, "modelux_target_success_rate", &[("provider", "p1"), ("model", "m")]) > 0.0,
        "{m}"
    );
    assert!(
        metric_value(&m, "modelux_target_latency_p50_seconds", &[("provider", "p2"), ("model", "m")]) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_and_latency_optimized_choose_and_fall_back() {
    let cheap = mock(MockConfig::default()).await;
    let mid = mock(MockConfig::default()).await;
    let premium = mock(MockConfig { latency: Duration::from_millis(60), ..Default::default() }).await;
    let configs = "  cost: { project: default, strategy: cost_optimized, quality_tier: standard, allowed_models: [ \
                   { model: \"p3/m\", tier: premium, input_per_mtok: 10, output_per_mtok: 30 }, \
                   { model: \"p1/m\", tier: economy, input_per_mtok: 0.1, output_per_mtok: 0.4 }, \
                   { model: \"p2/m\", tier: standard, input_per_mtok: 1, output_per_mtok: 4 } ] }\n  \
                   fastest: { project: default, strategy: latency_optimized, explore_pct: 0, candidates: [\"p3/m\", \"p2/m\"] }\n";
    let gw = routed(&[&cheap, &mid, &premium], configs, "").await;

    // Latency: cold start follows list order (p3), then the live p50 ranks p2 first.
    let r = ask(&gw, "@fastest", json!({})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p3"));
    for _ in 0..3 {
        assert_eq!(ask(&gw, "p2/m", json!({})).await.status, 200);
    }
    let r = ask(&gw, "@fastest", json!({"mlx:trace": true})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    let trace = trace_of(&r);
    let p50 = |i: usize| trace["candidates"][i]["health"]["p50_ms"].as_f64().unwrap();
    assert!(p50(0) < 30.0 && p50(1) >= 50.0, "{trace}");

    let r = ask(&gw, "@cost", json!({"mlx:trace": true, "max_tokens": 100})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    let trace = trace_of(&r);
    let statuses: Vec<(&str, &str)> = trace["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["provider"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses, vec![("p2", "selected"), ("p3", "fallback"), ("p1", "rejected")]);
    assert!(trace["candidates"][0]["reason"].as_str().unwrap().starts_with("estimated cost $0.000"));
    assert_eq!(trace["candidates"][2]["reason"], "quality tier economy is below the required one");
    // The pick fails: the next-cheapest qualifying model answers.
    mid.push_script([Behavior::Status(502)]);
    let r = ask(&gw, "@cost", json!({})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p3"));
    assert_eq!(cheap.request_count(), 0, "below-tier models are never used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensembles_vote_take_the_first_valid_and_stream_the_winner() {
    let a = mock(MockConfig { tokens: 3, ..Default::default() }).await;
    let b = mock(MockConfig { tokens: 3, ..Default::default() }).await;
    let c = mock(MockConfig { tokens: 5, ..Default::default() }).await;
    let configs = "  vote: { project: default, strategy: ensemble, aggregation: majority, timeout_ms: 2000, members: [\"p3/m\", \"p1/m\", \"p2/m\"] }\n  \
                   weighted: { project: default, strategy: ensemble, aggregation: weighted, members: [ { model: \"p1/m\", weight: 1 }, { model: \"p2/m\", weight: 1 }, { model: \"p3/m\", weight: 3 } ] }\n  \
                   first: { project: default, strategy: ensemble, aggregation: first_valid, members: [\"p1/m\", \"p3/m\"] }\n";
    let gw = routed(&[&a, &b, &c], configs, "").await;

    let r = ask(&gw, "@vote", json!({"mlx:trace": true})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answer_text(&r), " tok0 tok1 tok2");
    let trace = trace_of(&r);
    assert_eq!(trace["aggregation"], "majority");
    assert_eq!(trace["attempts"].as_array().unwrap().len(), 3);
    assert!(
        trace["decision"]["reason"].as_str().unwrap().starts_with("majority with 2 of 3 votes"),
        "{trace}"
    );

    let r = ask(&gw, "@weighted", json!({})).await;
    assert_eq!(answer_text(&r), " tok0 tok1 tok2 tok3 tok4");
    assert_eq!(r.header("x-modelux-provider-used"), Some("p3"));

    // A failing member is left out; the rest still vote.
    c.push_script([Behavior::Status(500)]);
    let r = ask(&gw, "@weighted", json!({})).await;
    assert_eq!(answer_text(&r), " tok0 tok1 tok2");

    // first_valid: the fast member wins, the slow one is cancelled.
    a.push_script([Behavior::Delay(Duration::from_millis(1500))]);
    let started = Instant::now();
    let r = ask(&gw, "@first", json!({"mlx:trace": true})).await;
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(r.header("x-modelux-provider-used"), Some("p3"));
    assert!(trace_of(&r)["decision"]["reason"].as_str().unwrap().contains("cancelled"));

    // Asked for a stream: the winner is streamed in the client's format.
    let r = ask(&gw, "@vote", json!({"stream": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text: String = sse_events(&r.text())
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, " tok0 tok1 tok2");
    assert!(r.text().ends_with("data: [DONE]\n\n"));

    // No valid member at all: 502.
    for m in [&a, &b, &c] {
        m.push_script([Behavior::Status(500)]);
    }
    let r = ask(&gw, "@vote", json!({})).await;
    assert_eq!(r.status, 502, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascade_escalates_on_unacceptable_answers() {
    let small = mock(MockConfig { tokens: 1, ..Default::default() }).await;
    let big = mock(MockConfig { tokens: 8, ..Default::default() }).await;
    let configs = "  esc: { project: default, strategy: cascade, steps: [ { model: \"p1/m\", accept: { min_length: 20, finish_reason: [stop] } }, { model: \"p2/m\" } ] }\n  \
                   json: { project: default, strategy: cascade, steps: [ { model: \"p1/m\", accept: { valid_json: true } }, { model: \"p2/m\" } ] }\n  \
                   short: { project: default, strategy: cascade, steps: [ { model: \"p2/m\", accept: { min_output_tokens: 1 } }, { model: \"p1/m\" } ] }\n";
    let gw = routed(&[&small, &big], configs, "").await;
    let r = ask(&gw, "@esc", json!({"mlx:trace": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    let trace = trace_of(&r);
    assert_eq!(attempt_statuses(&trace), vec!["p1:rejected", "p2:success"]);
    assert!(trace["attempts"][0]["error"].as_str().unwrap().contains("fewer than 20"), "{trace}");
    let r = ask(&gw, "@json", json!({})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    // The first step's answer passes: no escalation.
    let r = ask(&gw, "@short", json!({})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    assert_eq!(small.request_count(), 2);
    // Streaming works with cascades: the accepted answer is streamed.
    let r = ask(&gw, "@esc", json!({"stream": true, "stream_options": {"include_usage": true}})).await;
    let events = sse_events(&r.text());
    let text: String = events
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, (0..8).map(|i| format!(" tok{i}")).collect::<String>());
    assert!(events.iter().any(|(_, v)| v["usage"]["completion_tokens"].as_u64() == Some(8)), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_tests_split_stickily_and_name_the_variant() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let configs = "  control: { project: default, strategy: single, model: \"p1/m\" }\n  \
                   candidate: { project: default, strategy: single, model: \"p2/m\" }\n  \
                   exp: { project: default, strategy: ab_test, variants: [ { name: ctl, weight: 50, config: \"@control\" }, { weight: 50, config: \"@candidate\" } ] }\n";
    let gw = routed(&[&a, &b], configs, "").await;
    let mut seen = std::collections::HashMap::new();
    for user in 0..40 {
        let u = format!("user-{user}");
        let first = ask(&gw, "@exp", json!({"mlx:end_user": u})).await;
        let variant = first.header("x-modelux-ab-variant").unwrap().to_string();
        let provider = first.header("x-modelux-provider-used").unwrap().to_string();
        let pair = (variant.as_str(), provider.as_str());
        assert!(pair == ("ctl", "p1") || pair == ("candidate", "p2"), "{pair:?}");
        // Sticky: the same user, by body field or header, always gets the same variant.
        for _ in 0..2 {
            let again = ask_with(&gw, CHAT, &[("x-modelux-user-id", &u)], &body_for("@exp", json!({}))).await;
            assert_eq!(again.header("x-modelux-ab-variant"), Some(variant.as_str()));
        }
        *seen.entry(variant).or_insert(0) += 1;
    }
    assert!(
        seen.get("ctl").copied().unwrap_or(0) >= 8 && seen.get("candidate").copied().unwrap_or(0) >= 8,
        "{seen:?}"
    );
    let r = ask(&gw, "@exp", json!({"mlx:trace": true})).await;
    let trace = trace_of(&r);
    assert_eq!(trace["routing_config"], "@exp");
    assert_eq!(trace["hops"][0]["strategy"], "ab_test");
    assert_eq!(trace["ab_variant"], r.header("x-modelux-ab-variant").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_rules_route_on_tags_and_reload_with_a_new_version() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("tenants.rules");
    std::fs::write(
        &rules,
        "# enterprise tenants get p2\nwhen tags.tenant == \"enterprise\" use @premium\ndefault use p1/m\n",
    )
    .unwrap();
    let configs = format!(
        "  premium: {{ project: default, strategy: single, model: \"p2/m\" }}\n  \
         rules: {{ project: default, strategy: custom_rules, rules_file: \"{}\" }}\n",
        rules.display()
    );
    let gw = routed(&[&a, &b], &configs, "").await;
    let r = ask(&gw, "@rules", json!({"mlx:tags": {"tenant": "enterprise"}, "mlx:trace": true})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    let trace = trace_of(&r);
    assert!(trace["hops"][0]["choice"].as_str().unwrap().starts_with("rule 1 ("), "{trace}");
    assert_eq!(trace["strategy"], "single");
    let r = ask_with(
        &gw,
        CHAT,
        &[("x-modelux-user-tags", "tenant=enterprise,team=x")],
        &body_for("@rules", json!({})),
    )
    .await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    let r = ask(&gw, "@rules", json!({"mlx:tags": {"tenant": "smallco"}})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p1"));
    assert_eq!(r.header("x-modelux-config-version"), Some("v1"));

    // Editing the rule file is a config change: a new version, picked up by the watcher.
    let generation = gw.handles.store.load().generation;
    std::fs::write(&rules, "when tags.tenant == \"smallco\" use @premium\ndefault use p1/m\n").unwrap();
    wait_for_generation(&gw.handles, generation + 1).await;
    let r = ask(&gw, "@rules", json!({"mlx:tags": {"tenant": "smallco"}})).await;
    assert_eq!(r.header("x-modelux-provider-used"), Some("p2"));
    assert_eq!(r.header("x-modelux-config-version"), Some("v2"));

    // A broken rule file is rejected with file:line:col; the old version keeps serving.
    std::fs::write(&rules, "when tags.tenant = \"x\" use @premium\ndefault use p1/m\n").unwrap();
    let errors = gw.handles.store.reload(true).await.unwrap_err();
    assert!(errors[0].to_string().contains(".rules:1:18:"), "{errors:?}");
    let r = ask(&gw, "@rules", json!({"mlx:tags": {"tenant": "smallco"}})).await;
    assert_eq!(r.header("x-modelux-config-version"), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_decide_without_calling_anyone() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let gw = routed(&[&a, &b], FALLBACK, "").await;
    let body = body_for("@chain", json!({"max_tokens": 50}));
    let r = ask_with(&gw, "/openai/v1/dry-run", &[], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["object"], "modelux.dry_run");
    assert_eq!(v["resolved"], "config");
    assert_eq!(v["routing_config"], "@chain");
    assert_eq!(v["config_version"], 1);
    assert_eq!(v["strategy"], "fallback");
    assert_eq!(v["selected"], json!({"provider": "p1", "model": "m"}));
    assert_eq!(v["candidates"][1]["status"], "fallback");
    assert_eq!(v["request_id"], r.header("x-modelux-request-id").unwrap());
    let r = ask_with(&gw, CHAT, &[("x-modelux-dry-run", "true")], &body).await;
    assert_eq!(r.json().unwrap()["object"], "modelux.dry_run");
    let anthropic = serde_json::to_vec(
        &json!({"model": "p2/m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .unwrap();
    let r = ask_with(&gw, "/anthropic/v1/dry-run", &[], &anthropic).await;
    assert_eq!(r.json().unwrap()["resolved"], "direct");
    assert_eq!(r.json().unwrap()["selected"]["provider"], "p2");
    assert_eq!(a.request_count() + b.request_count(), 0, "a dry run calls no upstream");
    // Errors are still errors.
    let r = ask_with(&gw, "/openai/v1/dry-run", &[], &body_for("@nope", json!({}))).await;
    assert_eq!(r.status, 404);
}

/// Property: whatever the failures, a fallback chain with at least one healthy member
/// answers 200 and the client never sees an upstream error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_a_chain_with_one_healthy_member_never_surfaces_an_upstream_error() {
    use rand::{Rng, SeedableRng};
    let mocks = [
        mock(MockConfig::default()).await,
        mock(MockConfig::default()).await,
        mock(MockConfig::default()).await,
        mock(MockConfig::default()).await,
    ];
    let refs: Vec<&MockServer> = mocks.iter().collect();
    let configs = "  prop: { project: default, strategy: fallback, attempts: [ { model: \"p1/m\", timeout_ms: 300 }, { model: \"p2/m\", timeout_ms: 300 }, { model: \"p3/m\", timeout_ms: 300 }, { model: \"p4/m\", timeout_ms: 2000 } ] }\n";
    // Default thresholds: members open and get probed while the property runs.
    let gw = routed(&refs, configs, "health: { consecutive_failures: 3, probe_after_ms: 200 }\n").await;
    let seed: u64 =
        std::env::var("MODELUX_PROPERTY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let failures = [
        Behavior::Status(429),
        Behavior::Status(500),
        Behavior::Status(503),
        Behavior::ResetBeforeHeaders,
        Behavior::ResetMidStream { after_chunks: 0 },
        Behavior::Hang,
    ];
    for case in 0..60 {
        let healthy = rng.random_range(0..4);
        let stream = rng.random_bool(0.5);
        let mut plan = Vec::new();
        for (i, m) in mocks.iter().enumerate() {
            // Every member gets a scripted answer for this case; pending unused scripts from
            // skipped (open) members are flushed with Normal answers below.
            let b = if i == healthy {
                Behavior::Normal
            } else {
                failures[rng.random_range(0..failures.len())].clone()
            };
            plan.push(b.clone());
            m.push_script([b]);
        }
        let r = ask(&gw, "@prop", json!({"stream": stream})).await;
        let text = r.text();
        assert_eq!(r.status, 200, "case {case} seed {seed} plan {plan:?}: {text}");
        assert!(!text.contains("\"error\""), "case {case} seed {seed} plan {plan:?}: {text}");
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "case {case} seed {seed} plan {plan:?}: {text}");
        }
        // Members the decision skipped (open circuit) or never reached keep their script
        // entry; drain it so the next case starts clean.
        for m in &mocks {
            drain_script(m).await;
        }
    }
}

/// Consumes whatever script entries a mock still holds, by calling it directly.
async fn drain_script(m: &MockServer) {
    while m.script_pending() > 0 {
        let addr: SocketAddr = m.base_url()["http://".len()..m.base_url().len() - 3].parse().unwrap();
        let body = chat_body("m");
        let fut = httpc::request(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            &body,
        );
        let _ = tokio::time::timeout(Duration::from_millis(400), fut).await;
    }
}

#[test]
fn every_example_config_is_valid_and_shows_its_strategy() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/examples"));
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let snapshot = modelux::config::build_snapshot_in(&text, &|_| None, None, &dir)
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let strategy = path.file_stem().unwrap().to_str().unwrap().to_string();
        if strategy == "budgets" {
            // Not a strategy: the spend-control example (budgets, prices, rate limits).
            assert_eq!(snapshot.budgets.len(), 4, "{}", path.display());
            assert!(snapshot.prices.lookup("llama-3.1-8b").is_some());
            continue;
        }
        assert!(
            snapshot.routing_configs.values().any(|rc| rc.strategy.name() == strategy),
            "{} has no {strategy} config",
            path.display()
        );
        seen.push(strategy);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "ab_test",
            "cascade",
            "cost_optimized",
            "custom_rules",
            "ensemble",
            "fallback",
            "latency_optimized",
            "single"
        ]
    );
}
