//! Per-request work the gateway does on the hot path, outside pingora and the kernel:
//! decode + rewrite of a chat body, key authentication, model resolution, metrics.
//! Run: `cargo bench --bench hot_path`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use modelux::auth::{digest, KeyIndex, Principal};
use modelux::config::raw::ProviderKind;
use modelux::metrics::Metrics;
use modelux::providers::{resolve_model, Provider};
use modelux::wire::openai::ChatRequest;

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
                let req = ChatRequest::parse(black_box(body)).unwrap();
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
        index.insert(digest(&key), Principal { project: "p".into(), key_name: format!("k{i}").into() });
    }
    c.bench_function("authenticate_1000_keys", |b| {
        b.iter(|| black_box(index.authenticate(black_box("mlx_sk_bench_0000000000000500"))))
    });
}

fn resolve(c: &mut Criterion) {
    let mut providers = HashMap::new();
    for (id, kind) in [("openai", ProviderKind::Openai), ("local", ProviderKind::OpenaiCompatible)] {
        let p = Provider::new(id.into(), kind, "http://127.0.0.1:9/v1", Some("k".into()), vec![]).unwrap();
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

criterion_group!(benches, decode_and_rewrite, authenticate, resolve, metrics);
criterion_main!(benches);
