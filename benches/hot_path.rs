//! Per-request work the gateway does on the hot path, outside pingora and the kernel:
//! decode + rewrite of a chat body, key authentication, model resolution, metrics, routing
//! decisions, budget and rate-limit checks.
//! Run: `cargo bench --bench hot_path`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The gateway binary's allocator, so allocation costs are the ones it pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use modelux::auth::{digest, KeyIndex, Principal};
use modelux::error::Surface;
use modelux::metrics::Metrics;
use modelux::providers::{resolve_model, Provider};
use modelux::wire::routed::RoutedRequest;
use modelux::wire::{self, Transcoder};

fn chat_body(content_len: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "@fast",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "x".repeat(content_len)}
        ],
        "temperature": 0.2,
        "mlx:tags": {"team": "ml", "feature": "search"},
        "mlx:end_user": "user-42"
    }))
    .unwrap()
}

fn decode_and_rewrite(c: &mut Criterion) {
    let mut group = c.benchmark_group("chat_decode_rewrite");
    for size in [64usize, 4 * 1024, 64 * 1024] {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| {
                let req = RoutedRequest::parse(black_box(body)).unwrap();
                black_box(req.encode_for_upstream("gpt-4o-mini"))
            })
        });
    }
    group.finish();
}

fn authenticate(c: &mut Criterion) {
    let mut index = KeyIndex::default();
    for i in 0..1000 {
        let key = format!("mlx_sk_bench_{i:016}");
        index.insert(digest(&key), Principal::new("p", &format!("k{i}"), 600, 0));
    }
    c.bench_function("authenticate_1000_keys", |b| {
        b.iter(|| black_box(index.authenticate(black_box("mlx_sk_bench_0000000000000500"))))
    });
}

fn resolve(c: &mut Criterion) {
    let mut providers = HashMap::new();
    for (id, kind) in [("openai", "openai"), ("local", "openai_compatible")] {
        let adapter = modelux::providers::adapter(kind).unwrap();
        let p =
            Provider::new(id.into(), adapter, "http://127.0.0.1:9/v1", adapter.credential("k").ok(), vec![])
                .unwrap();
        providers.insert(id.to_string(), Arc::new(p));
    }
    c.bench_function("resolve_bare_model", |b| {
        b.iter(|| black_box(resolve_model(&providers, black_box("gpt-4o-mini")).unwrap()))
    });
    c.bench_function("resolve_provider_model", |b| {
        b.iter(|| black_box(resolve_model(&providers, black_box("local/llama-3.1-8b")).unwrap()))
    });
}

fn metrics(c: &mut Criterion) {
    let m = Metrics::new().unwrap();
    c.bench_function("record_request_metrics", |b| {
        b.iter(|| {
            let model = m.model_label(black_box("gpt-4o-mini"));
            m.requests.with_label_values(&["openai", "openai", model, "200"]).inc();
            m.duration.with_label_values(&["openai"]).observe(0.0123);
            m.overhead.with_label_values(&["openai"]).observe(0.00004);
        })
    });
}

fn translate_request(c: &mut Criterion) {
    let body = chat_body(4 * 1024 - 200);
    let mut group = c.benchmark_group("translate_request");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("openai_to_anthropic_4k", |b| {
        b.iter(|| {
            let req = wire::decode_request(Surface::OpenAi, black_box(&body)).unwrap();
            black_box(wire::encode_request(wire::WireFormat::Anthropic, &req, "claude-sonnet-4-5"))
        })
    });
    group.finish();
}

/// What the load harness's translated route does per request: a small OpenAI request to
/// an Anthropic upstream and the answer back.
fn translate_small_round_trip(c: &mut Criterion) {
    let request = br#"{"model":"mockant/claude-mock","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}"#;
    let response = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-mock","content":[{"type":"text","text":"Hello there, it is nice to meet you today."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":11}}"#;
    c.bench_function("translate_small_round_trip_openai_anthropic", |b| {
        b.iter(|| {
            let req = wire::decode_request(Surface::OpenAi, black_box(request)).unwrap();
            let up = wire::encode_request(wire::WireFormat::Anthropic, &req, "claude-mock").unwrap();
            let resp = wire::decode_response(wire::WireFormat::Anthropic, black_box(response)).unwrap();
            black_box((up, wire::encode_response(Surface::OpenAi, &resp)))
        })
    });
}

/// One AWS event-stream frame, as Bedrock's ConverseStream sends it.
fn bedrock_frame(event_type: &str, payload: String) -> Vec<u8> {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let m = Message::new(payload.into_bytes())
        .add_header(Header::new(":event-type", HeaderValue::String(event_type.to_string().into())))
        .add_header(Header::new(":content-type", HeaderValue::String("application/json".into())))
        .add_header(Header::new(":message-type", HeaderValue::String("event".into())));
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&m, &mut out).unwrap();
    out
}

/// A 200-event stream in each upstream format, each event its own network read.
fn stream_events(format: wire::WireFormat) -> Vec<Vec<u8>> {
    use wire::WireFormat;
    let mut events = Vec::new();
    match format {
        WireFormat::Gemini => {
            for i in 0..199 {
                events.push(format!(r#"data: {{"candidates":[{{"content":{{"parts":[{{"text":" word{i}"}}],"role":"model"}},"index":0}}],"usageMetadata":{{"promptTokenCount":10,"totalTokenCount":10}},"modelVersion":"gemini-2.5-flash","responseId":"r1"}}"#) + "\r\n\r\n");
            }
            events.push(r#"data: {"candidates":[{"content":{"parts":[{"text":"."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":200,"totalTokenCount":210},"modelVersion":"gemini-2.5-flash","responseId":"r1"}"#.to_string() + "\r\n\r\n");
        }
        WireFormat::Cohere => {
            let ev = |name: &str, data: String| format!("event: {name}\ndata: {data}\n\n");
            events.push(ev("message-start", r#"{"id":"c1","type":"message-start","delta":{"message":{"role":"assistant","content":[],"tool_plan":"","tool_calls":[],"citations":[]}}}"#.into()));
            events.push(ev("content-start", r#"{"type":"content-start","index":0,"delta":{"message":{"content":{"type":"text","text":""}}}}"#.into()));
            for i in 0..195 {
                events.push(ev("content-delta", format!(r#"{{"type":"content-delta","index":0,"delta":{{"message":{{"content":{{"text":" word{i}"}}}}}}}}"#)));
            }
            events.push(ev("content-end", r#"{"type":"content-end","index":0}"#.into()));
            events.push(ev("message-end", r#"{"type":"message-end","delta":{"finish_reason":"COMPLETE","usage":{"billed_units":{"input_tokens":10,"output_tokens":195},"tokens":{"input_tokens":74,"output_tokens":195}}}}"#.into()));
            events.push("data: [DONE]\n\n".to_string());
        }
        WireFormat::Bedrock => {
            let mut frames = vec![bedrock_frame("messageStart", r#"{"role":"assistant"}"#.into())];
            for i in 0..196 {
                frames.push(bedrock_frame(
                    "contentBlockDelta",
                    format!(r#"{{"contentBlockIndex":0,"delta":{{"text":" word{i}"}}}}"#),
                ));
            }
            frames.push(bedrock_frame("contentBlockStop", r#"{"contentBlockIndex":0}"#.into()));
            frames.push(bedrock_frame("messageStop", r#"{"stopReason":"end_turn"}"#.into()));
            frames.push(bedrock_frame("metadata", r#"{"usage":{"inputTokens":10,"outputTokens":196,"totalTokens":206},"metrics":{"latencyMs":100}}"#.into()));
            return frames;
        }
        WireFormat::OpenAi => {
            let chunk = |delta: &str, finish: &str| {
                format!(
                    r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}"#
                ) + "\n\n"
            };
            events.push(chunk(r#"{"role":"assistant","content":""}"#, "null"));
            for i in 0..197 {
                events.push(chunk(&format!(r#"{{"content":" word{i}"}}"#), "null"));
            }
            events.push(chunk("{}", r#""stop""#));
            events.push("data: [DONE]\n\n".to_string());
        }
        WireFormat::Anthropic => {
            let ev = |name: &str, data: String| format!("event: {name}\ndata: {data}\n\n");
            events.push(ev("message_start", r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1}}}"#.into()));
            events.push(ev(
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#
                    .into(),
            ));
            for i in 0..195 {
                events.push(ev("content_block_delta", format!(r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":" word{i}"}}}}"#)));
            }
            events.push(ev("content_block_stop", r#"{"type":"content_block_stop","index":0}"#.into()));
            events.push(ev("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":195}}"#.into()));
            events.push(ev("message_stop", r#"{"type":"message_stop"}"#.into()));
        }
    }
    events.into_iter().map(String::into_bytes).collect()
}

fn transcode_stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("transcode_stream_200_events");
    group.throughput(Throughput::Elements(200));
    use wire::WireFormat;
    for (name, upstream, kind, client) in [
        ("openai_to_anthropic", WireFormat::OpenAi, "openai", Surface::Anthropic),
        ("anthropic_to_openai", WireFormat::Anthropic, "anthropic", Surface::OpenAi),
        ("gemini_to_openai", WireFormat::Gemini, "google", Surface::OpenAi),
        ("gemini_to_anthropic", WireFormat::Gemini, "google", Surface::Anthropic),
        ("cohere_to_openai", WireFormat::Cohere, "cohere", Surface::OpenAi),
        ("bedrock_to_openai", WireFormat::Bedrock, "bedrock", Surface::OpenAi),
        ("bedrock_to_anthropic", WireFormat::Bedrock, "bedrock", Surface::Anthropic),
    ] {
        let adapter = modelux::providers::adapter(kind).unwrap();
        let events = stream_events(upstream);
        assert_eq!(events.len(), 200);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut t = Transcoder::new(adapter.stream_framer(), upstream, client, "target", true);
                let mut out = Vec::with_capacity(256);
                for e in &events {
                    out.clear();
                    t.feed(black_box(e), &mut out).unwrap();
                    black_box(&out);
                }
                t.finish(&mut out).unwrap();
            })
        });
    }
    group.finish();
}

/// A routing decision (snapshot load from the ArcSwap included) for the configs in
/// `benches/routing.yaml`: a 3-attempt fallback, 10-candidate cost and latency choices.
fn route_decisions(c: &mut Criterion) {
    use modelux::routing::{self, health, RequestFacts};
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/benches"));
    let text = std::fs::read_to_string(dir.join("routing.yaml")).unwrap();
    let snapshot = modelux::config::build_snapshot_in(&text, &|_| None, None, dir).unwrap();
    let store = arc_swap::ArcSwap::from_pointee(snapshot);
    let tags = vec![("tenant".to_string(), "smallco".to_string())];
    let facts = RequestFacts {
        model: "@x",
        tags: &tags,
        end_user: Some("user-42"),
        trace_id: None,
        est_input_tokens: 500,
        max_tokens: Some(256),
        budget_remaining_usd: None,
        budget_remaining_pct: None,
        seed: 7,
    };
    {
        // Live latencies for the latency strategy to rank.
        let snap = store.load();
        let now = health::now_ms();
        for (i, m) in snap.routing_configs["latency10"].strategy.members().iter().enumerate() {
            let ms = 50 + (i as u64 * 37) % 200;
            m.health.record(
                health::Sample::Success,
                std::time::Duration::from_millis(ms),
                now,
                &snap.health_settings,
            );
        }
    }
    let mut group = c.benchmark_group("route_decision");
    for slug in ["fallback3", "cost10", "latency10", "ab", "rules"] {
        group.bench_function(slug, |b| {
            b.iter(|| {
                let snap = store.load();
                let config = &snap.routing_configs[slug];
                let d = routing::decide(
                    &snap.routing_configs,
                    &snap.health_settings,
                    config,
                    black_box(&facts),
                    health::now_ms(),
                    true,
                );
                black_box(d.candidates.len())
            })
        });
    }
    group.finish();
}

/// Budget and rate-limit checks of one request with 1,000 budgets configured: the key's
/// request rate, the budgets that match (org, project, routing config, per-end-user, two
/// tags: 6 of 1,000), a reservation on each and its settlement.
fn spend_checks(c: &mut Criterion) {
    use modelux::spend::budgets::{Action, Budget, BudgetRequest, Budgets, Scope};
    use modelux::spend::counters::{to_nanos, Counters, LocalCounters, RateKind};
    use modelux::spend::period::Period;
    let budget = |i: usize, scope: Scope| Budget {
        name: format!("b{i}").into(),
        scope,
        period: [Period::Daily, Period::Weekly, Period::Monthly][i % 3],
        cap: to_nanos(1e6),
        cap_usd: 1e6,
        soft: to_nanos(8e5),
        soft_limit_pct: 80.0,
        alert_pcts: vec![80.0],
        action: if i.is_multiple_of(2) { Action::Block } else { Action::WarnOnly },
    };
    let mut list = vec![budget(0, Scope::Org), budget(1, Scope::EndUser(None))];
    list.push(budget(2, Scope::Tag { key: "feature".into(), value: None }));
    for i in 3..1000 {
        let scope = match i % 4 {
            0 => Scope::Project(format!("p{i}")),
            1 => Scope::RoutingConfig(format!("c{i}")),
            2 => Scope::Tag { key: "tenant".into(), value: Some(format!("t{i}")) },
            _ => Scope::EndUser(Some(format!("u{i}"))),
        };
        list.push(budget(i, scope));
    }
    let budgets = Budgets::new(list);
    assert_eq!(budgets.len(), 1000);
    let counters: Arc<dyn Counters> = Arc::new(LocalCounters::new());
    let tags = vec![("tenant".to_string(), "t6".to_string()), ("feature".to_string(), "search".to_string())];
    let req = BudgetRequest { project: "p4", config: Some("c5"), end_user: Some("user-42"), tags: &tags };
    let now = modelux::spend::unix_now();
    assert_eq!(budgets.evaluate(&*counters, &req, true, now).hits.len(), 6);
    c.bench_function("spend_checks_1000_budgets", |b| {
        b.iter(|| {
            let rate = counters.take(
                RateKind::Requests,
                "default/dev",
                1_000_000_000,
                1,
                modelux::spend::unix_now_us(),
            );
            let eval = budgets.evaluate(&*counters, black_box(&req), true, modelux::spend::unix_now());
            // In-process counters answer at once: no executor needed.
            let reserved = futures::FutureExt::now_or_never(eval.reserve(&*counters, 1_000));
            let mut reservation = reserved.expect("ready").expect("reachable").expect("uncapped");
            reservation.settle(black_box(700));
            black_box((rate.allowed, eval.hits.len()))
        })
    });
}

/// A record as the logging phase builds it: a routed request with two attempts.
fn trace_event(i: u64) -> modelux::trace::TraceEvent {
    use modelux::routing::trace::{DecisionTrace, HealthRecord};
    let health = HealthRecord {
        healthy: true,
        success_rate: Some(1.0),
        samples: 10,
        p50_ms: Some(100.0),
        ewma_ms: None,
        last_sample_age_ms: None,
    };
    let mut trace = DecisionTrace::direct("auto", "openai", "gpt-4o-mini", health);
    let d = std::time::Duration::from_millis(120);
    trace.push_attempt(
        "openai",
        "gpt-4o-mini",
        "timeout",
        None,
        Some("timeout after 2000ms".into()),
        d,
        None,
        d,
    );
    trace.push_attempt("openai", "gpt-4o-mini", "success", Some(200), None, d, Some(d), d);
    trace.conclude(Some(2), None);
    modelux::trace::TraceEvent {
        request_id: format!("0193a1b2-c3d4-7e5f-8a9b-{i:012}"),
        ts_ms: 1_763_700_000_000 + i,
        latency: d,
        ttfb: Some(d),
        principal: Some(Arc::new(Principal::new("default", "dev", 600, 0))),
        surface: "openai",
        endpoint: "/openai/v1/chat/completions".into(),
        model_requested: Some("gpt-4o-mini".into()),
        resolution: Some("auto"),
        provider: Some("openai".into()),
        model: Some("gpt-4o-mini".into()),
        status: 200,
        error_code: None,
        trace: Some(Box::new(trace)),
        usage: None,
        cost: Default::default(),
        tags: vec![("tenant".into(), "acme".into())],
        end_user: Some("user_abc".into()),
        trace_id: None,
        conversation_id: None,
        streamed: false,
        bytes_in: 120,
        bytes_out: 480,
        request_body: None,
        response_body: None,
        max_tokens: None,
        replay_body: None,
        replay_answer: Vec::new(),
        cache_hit: false,
        cache_saved_usd: 0.0,
        cache_embedding_usd: 0.0,
        provider_key: String::new(),
        owned_ids: Vec::new(),
    }
}

/// The logging phase's handoff: box the record and push it onto the bounded queue, with
/// the writer's end draining it on another thread (as in the gateway).
fn trace_handoff(c: &mut Criterion) {
    use modelux::trace::writer::TraceQueue;
    use std::sync::atomic::{AtomicBool, Ordering};
    let metrics = Arc::new(Metrics::new().unwrap());
    let queue = Arc::new(TraceQueue::new(65_536, metrics));
    let running = Arc::new(AtomicBool::new(true));
    let drain = {
        let (queue, running) = (queue.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                while let Some(event) = queue.pop() {
                    drop(event);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let mut i = 0;
    c.bench_function("trace_handoff", |b| {
        b.iter_batched(
            || {
                i += 1;
                trace_event(i)
            },
            |event| queue.submit(Box::new(event)),
            criterion::BatchSize::SmallInput,
        )
    });
    // Writer side, per record: flatten and serialize the decision trace.
    c.bench_function("trace_into_row", |b| {
        b.iter_batched(
            || trace_event(1),
            |event| black_box(event.into_row()),
            criterion::BatchSize::SmallInput,
        )
    });
    running.store(false, Ordering::Relaxed);
    drain.join().unwrap();
}

criterion_group!(
    benches,
    trace_handoff,
    spend_checks,
    decode_and_rewrite,
    authenticate,
    resolve,
    metrics,
    translate_request,
    translate_small_round_trip,
    transcode_stream,
    route_decisions
);
criterion_main!(benches);
