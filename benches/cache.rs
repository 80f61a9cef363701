//! The response cache's own costs, outside pingora and the kernel: an exact lookup that
//! misses (what every cacheable miss pays before going upstream: decode, the key, the
//! store), and a semantic search over 100,000 vectors of 1,536 dimensions in one partition
//! (excluding the embeddings call), with the index's memory.
//! Run: `cargo bench --bench cache` (the semantic index takes a few minutes to build).
//! `CACHE_BENCH_VECTORS` sets the index size (default 100000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use modelux::cache::semantic::{now_ms, Indexed, Vectors};
use modelux::cache::{self, EmbeddedCache, Scope};
use modelux::error::Surface;

const DIMS: usize = 1536;

fn body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "@production",
        "messages": [
            {"role": "system", "content": "You are a support assistant for an online shop. Answer briefly."},
            {"role": "user", "content": "Where is my order? I placed it three days ago and the tracking page has not changed since. ".repeat(4)}
        ],
        "max_tokens": 256,
        "temperature": 0
    }))
    .unwrap()
}

/// Decode, the top level's fields, the key, a store miss: the lookup's work on a miss.
fn exact_lookup_miss(c: &mut Criterion) {
    let store = EmbeddedCache::new(256 << 20, prometheus::IntCounter::new("e", "e").unwrap());
    let body = body();
    let definition = r#"{"strategy":"single","model":"openai/gpt-4o-mini"}"#;
    c.bench_function("cache_exact_lookup_miss", |b| {
        b.iter(|| {
            let decoded = modelux::wire::decode_request(Surface::OpenAi, black_box(&body)).unwrap();
            // The top level, values unparsed (the lookup reads unmodeled fields from it).
            let raw: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
                serde_json::from_slice(&body).unwrap();
            let extras = serde_json::Map::new();
            let scope = Scope {
                project: "default",
                model: "@production",
                config: Some(definition),
                route: "openai/gpt-4o-mini#",
                extras: &extras,
            };
            let key = cache::key(&scope, &decoded);
            black_box((raw.len(), store.get(&key)))
        })
    });
}

fn random_unit(x: &mut u64) -> Vec<f32> {
    (0..DIMS)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            (*x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn semantic_search(c: &mut Criterion) {
    let n: usize = std::env::var("CACHE_BENCH_VECTORS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let vectors = Vectors::new(n);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let partition = [7u8; 32];
    let mut queries = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let v = random_unit(&mut x);
        if i % (n / 100).max(1) == 0 {
            // A paraphrase of a stored question: the stored vector, slightly moved.
            let q: Vec<f32> =
                v.iter().enumerate().map(|(j, a)| if j % 50 == 0 { a * 0.9 } else { *a }).collect();
            queries.push(q);
        }
        let mut answer = [0u8; 32];
        answer[..8].copy_from_slice(&(i as u64).to_le_bytes());
        // The indexer's queue is bounded: wait rather than drop while building.
        while !vectors.insert(Indexed {
            partition,
            answer,
            vector: v.clone(),
            expires_ms: now_ms() + 86_400_000,
        }) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    vectors.flush();
    let stats = &vectors.stats;
    eprintln!(
        "semantic index: {} vectors of {DIMS} dimensions built in {:.1} s; {:.1} MiB ({} bytes/vector); {} writes dropped",
        stats.vectors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        stats.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        stats.bytes.load(Ordering::Relaxed) / stats.vectors.load(Ordering::Relaxed).max(1),
        stats.dropped.load(Ordering::Relaxed),
    );
    let found = queries.iter().filter(|q| !vectors.search(&partition, q, 0.95).is_empty()).count();
    eprintln!("semantic index: {found} of {} paraphrases found above 0.95", queries.len());
    let mut i = 0;
    c.bench_function(&format!("cache_semantic_search_{n}x{DIMS}"), |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            black_box(vectors.search(&partition, &queries[i], 0.95))
        })
    });
}

criterion_group!(benches, exact_lookup_miss, semantic_search);
criterion_main!(benches);
