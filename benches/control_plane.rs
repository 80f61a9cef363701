//! A management change as the management API applies it: the would-be snapshot rebuilt from
//! the config file plus every stored resource, validated, and swapped in. Measured with
//! 1,000 routing configs and 10,000 project keys in the store (target: under 50 ms).
//! Run: `cargo bench --bench control_plane`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The gateway binary's allocator, so allocation costs are the ones it pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use modelux::config::store::ConfigStore;
use modelux::metrics::Metrics;
use modelux::state::secrets::MasterKey;
use modelux::state::{Kind, Stored};
use serde_json::json;

fn stored(kind: Kind, i: usize, project: &str, slug: String, body: serde_json::Value) -> Stored {
    Stored {
        kind,
        id: format!("{}{i:08}", kind.id_prefix()),
        project: project.into(),
        slug,
        body,
        version: 1,
        seq: i as i64,
        created_ms: 0,
        updated_ms: 0,
        deleted_ms: None,
    }
}

fn resources(configs: usize, keys: usize) -> Vec<Stored> {
    let mut out = Vec::new();
    for p in 0..10 {
        out.push(stored(Kind::Project, p, "", format!("team-{p}"), json!({"name": format!("team {p}")})));
    }
    for i in 0..configs {
        let project = format!("team-{}", i % 10);
        let body = json!({"project": project, "strategy": "fallback",
            "attempts": [{"model": "openai/gpt-4o-mini"}, {"model": "openai/gpt-4o"}], "retry_on": ["429", "5xx"]});
        out.push(stored(Kind::RoutingConfig, 100 + i, &project, format!("cfg-{i}"), body));
    }
    for i in 0..keys {
        let project = format!("team-{}", i % 10);
        let digest = hex::encode(modelux::auth::digest(&format!("mlx_sk_bench_{i:020}")));
        let body = json!({"name": format!("key-{i}"), "key_sha256": digest, "key_last4": "0000"});
        out.push(stored(Kind::ApiKey, 100_000 + i, &project, format!("key-{i}"), body));
    }
    out
}

fn rebuild_and_swap(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("modelux.yaml");
    std::fs::write(
        &path,
        "providers:\n  - { id: openai, kind: openai, api_key: sk-bench }\nprojects:\n  - id: default\n",
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let store = ConfigStore::open(Some(path), metrics).unwrap();
    let master = Arc::new(MasterKey::from_bytes(&[7; 32]));
    let all = resources(1_000, 10_000);
    store.load_resources(all.clone(), master, &[]).unwrap();
    assert_eq!(store.load().routing_configs.len(), 1_000);
    assert_eq!(store.load().project_keys.len(), 10_000);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut group = c.benchmark_group("management_change");
    group.sample_size(20);
    group.bench_function("rebuild_validate_swap_1000_configs_10000_keys", |b| {
        b.iter(|| {
            rt.block_on(async {
                let staged = store.stage().await;
                let snapshot = staged.build(&all).unwrap();
                staged.install(snapshot, all.clone());
            })
        })
    });
    // The fixed cost: a small config and one stored routing config.
    let small = resources(1, 0);
    store.load_resources(small.clone(), Arc::new(MasterKey::from_bytes(&[7; 32])), &[]).unwrap();
    group.bench_function("rebuild_validate_swap_1_config", |b| {
        b.iter(|| {
            rt.block_on(async {
                let staged = store.stage().await;
                let snapshot = staged.build(&small).unwrap();
                staged.install(snapshot, small.clone());
            })
        })
    });
    group.finish();
}

criterion_group!(benches, rebuild_and_swap);
criterion_main!(benches);
