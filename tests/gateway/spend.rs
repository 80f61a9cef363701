//! Spend control end to end: per-request cost from the upstream's usage, budgets that
//! block (402), downgrade or warn, reservations under concurrency, durable spend and per-key
//! rate limits.

use super::*;
use modelux::spend::counters::{to_nanos, SpendKey};
use modelux::spend::period::Period;

/// `local/m1` costs a cent per token (prompt or completion), so budgets of a few dollars
/// are reached in a few requests.
pub(super) const CENT_A_TOKEN: &str = "prices:\n  m1: { input_per_mtok: 10000, output_per_mtok: 10000 }\n";

pub(super) fn body_for(model: &str, extra: Value) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16});
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v
}

async fn ask(gw: &Gateway, model: &str, extra: Value, headers: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {KEY}");
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(headers);
    post_to(gw, CHAT, &h, &body_for(model, extra)).await
}

async fn budget_gateway(upstream: &MockServer, budgets: &str, extra_configs: &str) -> Gateway {
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra = format!("{CENT_A_TOKEN}budgets:\n{budgets}");
    cfg.more_configs =
        format!("  cheap: {{ project: default, strategy: single, model: \"local/m1\" }}\n{extra_configs}");
    start(cfg).await
}

/// `n` chat requests with `body`, all at once, spread over `proxies` in turn.
pub(super) fn post_all(
    proxies: &[SocketAddr],
    body: &[u8],
    n: usize,
) -> Vec<tokio::task::JoinHandle<Response>> {
    (0..n)
        .map(|i| {
            let (proxy, body) = (proxies[i % proxies.len()], body.to_vec());
            tokio::spawn(async move {
                let auth = format!("Bearer {KEY}");
                let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
                httpc::request(proxy, "POST", CHAT, &headers, &body).await.unwrap()
            })
        })
        .collect()
}

pub(super) fn cost_of(resp: &Response) -> f64 {
    resp.header("x-modelux-cost-usd")
        .unwrap_or_else(|| panic!("no cost header: {}", resp.text()))
        .parse()
        .unwrap()
}

fn spend_of(gw: &Gateway, budget: &str, instance: &str) -> i64 {
    let start = Period::Daily.window(modelux::spend::unix_now()).0;
    gw.handles.spend.counters.spend(&SpendKey { budget, instance, period_start: start }).committed
}

fn seconds_to_midnight() -> i64 {
    let now = modelux::spend::unix_now();
    Period::Daily.window(now).1 - now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_is_usage_times_price_in_headers_trace_and_metrics() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let table = modelux::prices::PriceTable::embedded().unwrap();
    let price = table.lookup("gpt-4o-mini").unwrap();

    let resp = ask(&gw, "@fast", json!({"mlx:trace": true}), &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json().unwrap();
    let (input, output) =
        (v["usage"]["prompt_tokens"].as_u64().unwrap(), v["usage"]["completion_tokens"].as_u64().unwrap());
    let expected = input as f64 * price.input + output as f64 * price.output;
    assert!((cost_of(&resp) - expected).abs() < 1e-12, "{} vs {expected}", cost_of(&resp));
    let trace = &v["mlx:trace"];
    assert_eq!(trace["usage"]["input_tokens"], input);
    assert_eq!(trace["usage"]["output_tokens"], output);
    assert!((trace["cost_usd"]["total"].as_f64().unwrap() - expected).abs() < 1e-12, "{trace}");

    // A passthrough stream: the gateway asks the upstream for usage, the client that did not
    // ask gets exactly the stream it would have got (no usage chunk, no "usage":null).
    let resp = ask(&gw, "@fast", json!({"stream": true}), &[]).await;
    assert_eq!(resp.status, 200);
    assert!(resp.header("x-modelux-cost-usd").is_none(), "streams cannot carry the cost header");
    let text = resp.text();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let sent = upstream.requests().pop().unwrap().json().unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    // A client that asked for usage gets it, untouched.
    let resp =
        ask(&gw, "@fast", json!({"stream": true, "stream_options": {"include_usage": true}}), &[]).await;
    let events = sse_events(&resp.text());
    let usage_chunks: Vec<_> = events.iter().filter(|(_, v)| v["usage"].is_object()).collect();
    assert_eq!(usage_chunks.len(), 1);
    let streamed_cost = usage_chunks[0].1["usage"]["prompt_tokens"].as_u64().unwrap() as f64 * price.input
        + usage_chunks[0].1["usage"]["completion_tokens"].as_u64().unwrap() as f64 * price.output;
    // A streamed trace carries the cost of the stream.
    let resp = ask(&gw, "@fast", json!({"stream": true, "mlx:trace": true}), &[]).await;
    let events = sse_events(&resp.text());
    let trace = events.iter().find_map(|(_, v)| v.get("mlx:trace").cloned()).expect("trace chunk");
    let traced_cost = trace["usage"]["input_tokens"].as_u64().unwrap() as f64 * price.input
        + trace["usage"]["output_tokens"].as_u64().unwrap() as f64 * price.output;
    assert_eq!(trace["usage"]["output_tokens"], 16);
    assert!((trace["cost_usd"]["total"].as_f64().unwrap() - traced_cost).abs() < 1e-12, "{trace}");

    // Four priced answers, one of them a stream the client never saw usage for.
    let total = expected + streamed_cost * 2.0 + traced_cost;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metric_value(&metrics(&gw).await, "modelux_cost_usd_total", &[("model", "gpt-4o-mini")]);
        if (m - total).abs() < 1e-9 {
            break;
        }
        assert!(Instant::now() < deadline, "cost metric {m}, expected {total}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_at_its_cap_blocks_with_the_exact_402_on_both_surfaces() {
    let upstream = mock(MockConfig::default()).await;
    let budgets = "  - { name: team-ml, scope: project, project: default, period: daily, cap_usd: 0.5, action: block }\n";
    let gw = budget_gateway(&upstream, budgets, "").await;

    let first = ask(&gw, "@cheap", json!({}), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let cost = cost_of(&first);
    assert!(cost > 0.2, "a cent a token: {cost}");
    assert_eq!(first.header("x-modelux-budget-name"), Some("team-ml"));
    let remaining: f64 = first.header("x-modelux-budget-remaining").unwrap().parse().unwrap();
    assert_eq!(format!("{remaining:.4}"), format!("{:.4}", 0.5 - cost));
    assert_eq!(first.header("x-modelux-budget-remaining").unwrap().split('.').nth(1).unwrap().len(), 4);
    assert!(first.header("x-modelux-budget-reset").is_none(), "no enforcement yet");
    // Bare and provider/model traffic is not policed but its spend counts.
    let direct = ask(&gw, "local/m1", json!({}), &[]).await;
    assert_eq!(direct.status, 200);
    let spent = cost + cost_of(&direct);
    assert_eq!(spend_of(&gw, "team-ml", ""), to_nanos(spent));
    // Over the cap: the next @config request is refused before any upstream call.
    let calls = upstream.request_count();
    let blocked = ask(&gw, "@cheap", json!({}), &[]).await;
    assert_eq!(blocked.status, 402, "{}", blocked.text());
    assert_eq!(upstream.request_count(), calls);
    let v = blocked.json().unwrap();
    let resets_at = modelux::spend::period::iso8601(Period::Daily.window(modelux::spend::unix_now()).1);
    assert_eq!(
        v,
        json!({"error": {
            "type": "budget_exceeded",
            "message": format!("budget \"team-ml\" exceeded (${spent:.2} / $0.50)"),
            "code": 402,
            "budget": {"name": "team-ml", "spend_usd": (spent * 1e6).round() / 1e6, "cap_usd": 0.5, "period": "daily", "period_resets_at": resets_at},
        }})
    );
    let retry: i64 = blocked.header("retry-after").unwrap().parse().expect("integer Retry-After");
    assert!((retry - seconds_to_midnight()).abs() <= 2, "{retry}");
    assert_eq!(blocked.header("x-modelux-budget-name"), Some("team-ml"));
    assert_eq!(blocked.header("x-modelux-budget-action"), Some("block"));
    assert_eq!(blocked.header("x-modelux-budget-reset"), Some(resets_at.as_str()));
    assert_eq!(blocked.header("x-modelux-budget-remaining"), Some("0.0000"));
    // Streams and dry runs are refused the same way.
    assert_eq!(ask(&gw, "@cheap", json!({"stream": true}), &[]).await.status, 402);
    assert_eq!(ask(&gw, "@cheap", json!({}), &[("x-modelux-dry-run", "true")]).await.status, 402);

    // The Anthropic surface: its own envelope, the same budget object.
    let body = json!({"model": "@cheap", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_to(
        &gw,
        "/anthropic/v1/messages",
        &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")],
        &body,
    )
    .await;
    assert_eq!(resp.status, 402);
    let v = resp.json().unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "budget_exceeded");
    assert_eq!(v["error"]["budget"]["name"], "team-ml");
    assert_eq!(v["error"]["budget"]["period_resets_at"], resets_at.as_str());
    assert!(resp.header("retry-after").unwrap().parse::<u64>().is_ok());
    // Direct traffic still goes through.
    assert_eq!(ask(&gw, "local/m1", json!({}), &[]).await.status, 200);
    assert_metric(&gw, "modelux_budget_outcomes_total", &[("budget", "team-ml"), ("action", "block")], 4.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_serves_the_cheaper_model_and_soft_limits_warn() {
    let upstream = mock(MockConfig::default()).await;
    let budgets = "  - { name: acme, scope: tag, tag: \"tenant=acme\", period: daily, cap_usd: 0.3, action: downgrade, downgrade_to: \"gpt-4o-mini\" }\n\
                   \x20 - { name: per-user, scope: end_user, period: daily, cap_usd: 1.0, soft_limit_pct: 50, action: warn_only }\n";
    let gw = budget_gateway(&upstream, budgets, "").await;
    let acme = [("x-modelux-user-tags", "tenant=acme")];

    let first = ask(&gw, "@cheap", json!({}), &acme).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-modelux-model-used"), Some("m1"));
    assert_eq!(first.header("x-modelux-budget-name"), Some("acme"));
    assert!(first.header("x-modelux-budget-action").is_none());
    // The cap is reached: acme's @config traffic moves to gpt-4o-mini.
    let resp = ask(&gw, "@cheap", json!({"mlx:trace": true}), &acme).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-modelux-model-used"), Some("gpt-4o-mini"));
    assert_eq!(resp.header("x-modelux-provider-used"), Some("openai"));
    assert_eq!(resp.header("x-modelux-budget-action"), Some("downgrade"));
    assert_eq!(resp.header("x-modelux-budget-name"), Some("acme"));
    assert!(resp.header("x-modelux-budget-reset").unwrap().ends_with("T00:00:00Z"));
    let trace = &resp.json().unwrap()["mlx:trace"];
    assert_eq!(trace["budget"]["action"], "downgrade");
    assert_eq!(trace["budget"]["downgraded_from"], "@cheap");
    // A dry run shows the same outcome, and reserves nothing.
    let dry = ask(&gw, "@cheap", json!({}), &[acme[0], ("x-modelux-dry-run", "true")]).await;
    let v = dry.json().unwrap();
    assert_eq!(v["selected"]["model"], "gpt-4o-mini", "{v}");
    assert_eq!(v["budget"]["name"], "acme");
    assert_eq!(v["budget"]["action"], "downgrade");
    assert_eq!(v["budget"]["remaining_usd"], 0.0);
    // Other tenants are not affected.
    let other = ask(&gw, "@cheap", json!({}), &[("x-modelux-user-tags", "tenant=globex")]).await;
    assert_eq!(other.header("x-modelux-model-used"), Some("m1"));

    // Each end user has their own counter; past half of it the answers warn.
    let alice = [("x-modelux-user-id", "alice")];
    let r = ask(&gw, "@cheap", json!({}), &alice).await;
    assert_eq!(r.header("x-modelux-budget-name"), Some("per-user"));
    assert!(r.header("x-modelux-budget-action").is_none());
    let mut warned = None;
    for _ in 0..4 {
        let r = ask(&gw, "@cheap", json!({}), &alice).await;
        assert_eq!(r.status, 200);
        if r.header("x-modelux-budget-action").is_some() {
            warned = Some(r);
            break;
        }
    }
    let warned = warned.expect("a warning past the soft limit");
    assert_eq!(warned.header("x-modelux-budget-action"), Some("warn_only"));
    assert!(warned.header("x-modelux-budget-reset").is_none(), "the soft limit enforces nothing");
    let remaining: f64 = warned.header("x-modelux-budget-remaining").unwrap().parse().unwrap();
    assert!(remaining < 0.5, "{remaining}");
    assert!(spend_of(&gw, "per-user", "alice") >= to_nanos(0.5));
    let bob = ask(&gw, "@cheap", json!({}), &[("x-modelux-user-id", "bob")]).await;
    assert!(bob.header("x-modelux-budget-action").is_none(), "bob has his own counter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_overspend_by_more_than_one_reservation() {
    let upstream = mock(MockConfig { latency: Duration::from_millis(30), ..MockConfig::default() }).await;
    let budgets = "  - { name: small, scope: routing_config, routing_config: \"@cheap\", period: daily, cap_usd: 2.0, action: block }\n";
    let gw = budget_gateway(&upstream, budgets, "").await;
    let body = serde_json::to_vec(&body_for("@cheap", json!({}))).unwrap();
    let tasks = post_all(&[gw.proxy], &body, 256);
    let (mut served, mut refused, mut billed) = (0, 0, 0.0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => {
                served += 1;
                billed += cost_of(&r);
            }
            402 => refused += 1,
            // Held by reservations in flight, not yet spent: retry shortly.
            429 => {
                assert_eq!(error_of(&r)["code"], "budget_reserved", "{}", r.text());
                assert_eq!(r.header("retry-after"), Some("1"));
                refused += 1;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(served + refused, 256);
    assert!(served > 0 && refused > 0, "{served} served, {refused} refused");
    // Reserved per request: a third of the body's bytes as prompt tokens plus max_tokens,
    // at a cent a token.
    let reservation = (body.len() as f64 / 3.0).ceil() * 0.01 + 16.0 * 0.01;
    let spent = spend_of(&gw, "small", "");
    assert!((spent - to_nanos(billed)).abs() <= served as i64, "every served request is settled at its cost");
    assert!(
        modelux::spend::counters::to_usd(spent) <= 2.0 + reservation,
        "spent {spent} nano-USD over a $2 cap (+{reservation})"
    );
    assert_eq!(upstream.request_count(), served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_survives_a_restart() {
    let upstream = mock(MockConfig::default()).await;
    let data = tempfile::tempdir().unwrap();
    let server_extra = format!("  data_dir: \"{}\"", data.path().display());
    let budgets = "  - { name: team-ml, scope: org, period: monthly, cap_usd: 0.2, action: block }\n";
    let config = |upstream: &MockServer| {
        let mut cfg = Cfg::new(upstream.base_url().leak());
        cfg.server_extra = server_extra.clone().leak();
        cfg.top_extra = format!("{CENT_A_TOKEN}budgets:\n{budgets}");
        cfg.more_configs = "  cheap: { project: default, strategy: single, model: \"local/m1\" }\n".into();
        cfg
    };
    let gw = start(config(&upstream)).await;
    assert_eq!(ask(&gw, "@cheap", json!({}), &[]).await.status, 200);
    assert_metric(&gw, "modelux_spend_flushes_total", &[("result", "ok")], 1.0).await;
    drop(gw);
    let gw = start(config(&upstream)).await;
    let resp = ask(&gw, "@cheap", json!({}), &[]).await;
    assert_eq!(resp.status, 402, "{}", resp.text());
    assert_eq!(resp.json().unwrap()["error"]["budget"]["period"], "monthly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_held_to_their_request_and_token_rates() {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    // Defaults (600 and 60 per minute) for every key but the ones given their own limits.
    cfg.top_extra = "rate_limits: {}\n".into();
    cfg.more_providers = String::new();
    let gw = start(cfg).await;
    let text = std::fs::read_to_string(&gw.config_path).unwrap().replace(
        &format!("{{ name: o, key: \"{OTHER_KEY}\" }}"),
        &format!("{{ name: o, key: \"{OTHER_KEY}\", requests_per_minute: 3, tokens_per_minute: 400 }}"),
    );
    write_config_atomically(&gw.config_path, &text);
    wait_for_generation(&gw.handles, 2).await;

    // The default: 600 a minute, with OpenAI-style headers.
    let mut conn = Conn::connect(gw.proxy).await.unwrap();
    let auth = format!("Bearer {KEY}");
    let body = serde_json::to_vec(&body_for("gpt-4o-mini", json!({}))).unwrap();
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    // The allowance refills one request per 100 ms, so a burst gets 600 plus what came
    // back while it ran.
    let started = Instant::now();
    let mut sent = 0u64;
    let r = loop {
        let r = conn.request("POST", CHAT, &headers, &body).await.unwrap();
        sent += 1;
        if sent == 1 {
            assert_eq!(r.header("x-ratelimit-limit-requests"), Some("600"));
            assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("599"));
            assert!(r.header("x-ratelimit-reset-requests").unwrap().ends_with("ms"));
        }
        if r.status != 200 {
            break r;
        }
        assert!(sent <= 2000, "never limited");
    };
    let allowed = sent - 1;
    let refilled = started.elapsed().as_millis() as u64 / 100 + 1;
    assert!((600..=600 + refilled).contains(&allowed), "{allowed} allowed in {:?}", started.elapsed());
    assert_eq!(r.status, 429, "{}", r.text());
    let e = error_of(&r);
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(e["code"], "rate_limited");
    assert_eq!(e["message"], "rate limit of 600 requests/minute exceeded for this API key");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("600"));

    // A key with its own limit; the Anthropic surface answers in its envelope.
    let other = |model: &str, max_tokens: u64| json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]});
    let anthropic_headers = [("x-api-key", OTHER_KEY), ("anthropic-version", "2023-06-01")];
    // Tokens per minute: a request that alone needs more than the minute's allowance.
    let r = post_to(&gw, "/anthropic/v1/messages", &anthropic_headers, &other("local/m1", 1000)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("limit of 400 tokens/minute"), "{v}");
    for i in 0..2 {
        let r = post_to(&gw, "/anthropic/v1/messages", &anthropic_headers, &other("local/m1", 16)).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("400"));
    }
    let r = post_to(&gw, "/anthropic/v1/messages", &anthropic_headers, &other("local/m1", 16)).await;
    assert_eq!(r.status, 429);
    assert!(r.json().unwrap()["error"]["message"].as_str().unwrap().contains("3 requests/minute"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");

    // Management keys: 60 a minute.
    let admin = format!("Bearer {ADMIN_KEY}");
    let started = Instant::now();
    let mut sent = 0u64;
    let r = loop {
        let r = httpc::request(gw.manage, "GET", "/manage/v1/nothing", &[("authorization", &admin)], b"")
            .await
            .unwrap();
        sent += 1;
        if r.status != 404 {
            break r;
        }
        assert!(sent <= 200, "never limited");
    };
    let refilled = started.elapsed().as_secs() + 1;
    assert!((60..=60 + refilled).contains(&(sent - 1)), "{} allowed", sent - 1);
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(error_of(&r)["code"], "rate_limited");
    assert_metric(&gw, "modelux_rate_limited_total", &[("kind", "requests")], 2.0).await;
}

#[test]
fn budget_config_errors_name_their_paths() {
    let base = |budgets: &str| {
        format!(
            "providers:\n  - {{ id: local, kind: openai_compatible, base_url: \"http://127.0.0.1:1/v1\" }}\n\
             projects:\n  - {{ id: default }}\n\
             routing_configs:\n  fast: {{ project: default, strategy: single, model: \"local/m\" }}\n\
             budgets:\n{budgets}"
        )
    };
    let errors = |budgets: &str| -> Vec<String> {
        match modelux::config::build_snapshot(&base(budgets), &|_| None, None) {
            Ok(_) => vec![],
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    };
    assert_eq!(
        errors("  - { name: ok, scope: org, period: daily, cap_usd: 1, action: block }\n"),
        Vec::<String>::new()
    );
    assert_eq!(
        errors("  - { name: a, scope: project, project: nope, period: daily, cap_usd: 1, action: block }\n"),
        vec!["budgets[0].project: unknown project \"nope\""]
    );
    assert_eq!(
        errors("  - { name: a, scope: tag, period: weekly, cap_usd: 1, action: downgrade }\n"),
        vec![
            "budgets[0].tag: is required with scope: tag",
            "budgets[0].downgrade_to: is required with action: downgrade"
        ]
    );
    assert_eq!(
        errors("  - { name: a, scope: org, project: default, period: monthly, cap_usd: -1, soft_limit_pct: 120, action: warn_only, downgrade_to: \"@fast\" }\n"),
        vec![
            "budgets[0].project: only applies to scope: project",
            "budgets[0].cap_usd: must be a non-negative number of USD",
            "budgets[0].soft_limit_pct: must be in (0, 100]",
            "budgets[0].downgrade_to: only applies to action: downgrade"
        ]
    );
    assert_eq!(
        errors("  - { name: a, scope: routing_config, routing_config: \"@slow\", period: daily, cap_usd: 1, action: downgrade, downgrade_to: \"nope-model\" }\n  - { name: a, scope: end_user, period: daily, cap_usd: 1, action: block }\n"),
        vec![
            "budgets[0].routing_config: unknown routing config \"@slow\"",
            "budgets[0].downgrade_to: \"nope-model\" is neither a routing config (@slug) nor a model a configured provider serves",
            "budgets[1].name: duplicate budget name \"a\""
        ]
    );
    assert_eq!(
        errors("  - { name: a, scope: org, period: yearly, cap_usd: 1, action: block }\n").len(),
        1,
        "unknown period"
    );
}
