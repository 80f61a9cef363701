//! Trace writer throughput: records pushed onto the queue as the logging phase does, drained,
//! batched and written by the real writer into a local ClickHouse, timed until the last
//! record is acknowledged. Offered at fixed rates (does the writer keep up without spilling
//! or dropping?) and as a burst (overload). The baseline, measured in the same run, is the
//! store's own insert of the same rows in the same batch size.
//!
//! Run: `cargo bench --bench trace_writer` (starts its own `clickhouse-server` on loopback;
//! or set `CLICKHOUSE_URL=http://127.0.0.1:8123` to use a running one).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use modelux::metrics::Metrics;
use modelux::routing::trace::{DecisionTrace, HealthRecord};
use modelux::trace::clickhouse::{ClickHouseSettings, ClickHouseStore};
use modelux::trace::writer::{TraceQueue, TraceWriter, WriterSettings};
use modelux::trace::{TraceEvent, TraceStore};
use pingora::services::background::BackgroundService;

const RECORDS: u64 = 300_000;
const BATCH: usize = 10_000;

fn event(i: u64) -> TraceEvent {
    let health = HealthRecord {
        healthy: true,
        success_rate: Some(1.0),
        samples: 10,
        p50_ms: None,
        ewma_ms: None,
        last_sample_age_ms: None,
    };
    let mut trace = DecisionTrace::direct("auto", "openai", "gpt-4o-mini", health);
    let d = Duration::from_millis(120);
    trace.push_attempt("openai", "gpt-4o-mini", "success", Some(200), None, Duration::ZERO, Some(d), d);
    trace.conclude(Some(1), None);
    TraceEvent {
        request_id: format!("0193a1b2-c3d4-7e5f-8a9b-{i:012}"),
        ts_ms: 1_763_700_000_000 + i % 86_400_000,
        latency: d,
        ttfb: Some(d),
        principal: Some(Arc::new(modelux::auth::Principal::new("default", "dev", 0, 0))),
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
        tags: vec![("tenant".into(), format!("t{}", i % 7))],
        end_user: None,
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

/// A throwaway ClickHouse on loopback, stopped (by PID) when dropped.
struct Server {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_clickhouse() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = dir.path().display();
    std::fs::write(
        dir.path().join("config.xml"),
        format!(
            "<?xml version=\"1.0\"?><yandex><logger><level>warning</level><console>1</console></logger>\
             <http_port>{port}</http_port><tcp_port>{tcp}</tcp_port><listen_host>127.0.0.1</listen_host>\
             <path>{p}/data/</path><tmp_path>{p}/tmp/</tmp_path><user_files_path>{p}/uf/</user_files_path>\
             <format_schema_path>{p}/fs/</format_schema_path><users_config>users.xml</users_config>\
             <default_profile>default</default_profile><default_database>default</default_database>\
             <mark_cache_size>536870912</mark_cache_size></yandex>"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("users.xml"),
        "<?xml version=\"1.0\"?><yandex><profiles><default></default></profiles><users><default><password></password>\
         <networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>\
         <quotas><default></default></quotas></yandex>",
    )
    .unwrap();
    let bin = ["/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists())
        .unwrap_or("clickhouse-server");
    let child = std::process::Command::new(bin)
        .arg(format!("--config-file={}", dir.path().join("config.xml").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("clickhouse-server (apt-get install clickhouse-server)");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "clickhouse-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, _dir: dir, url }
}

/// How records are offered to the queue.
#[derive(Clone, Copy)]
enum Offer {
    /// As fast as the queue takes them (the producer only waits while the queue is nearly
    /// full): more than any store can absorb, so this measures the writer under overload.
    Burst,
    /// At a fixed rate, in 1 ms slices, as steady traffic would arrive.
    Paced(u64),
}

struct Outcome {
    /// Records acknowledged by the store per second, first offer to last acknowledgement.
    rate: f64,
    spilled: u64,
    dropped: u64,
    /// From the last offer to the last acknowledgement.
    lag: Duration,
}

/// Pushes `count` events (ids from `first`) through queue → writer → store.
fn through_writer(
    rt: &tokio::runtime::Runtime,
    store: Arc<dyn TraceStore>,
    offer: Offer,
    first: u64,
    count: u64,
) -> Outcome {
    let metrics = Arc::new(Metrics::new().unwrap());
    let queue = Arc::new(TraceQueue::new(65_536, metrics.clone()));
    let dir = tempfile::tempdir().unwrap();
    let writer = Arc::new(
        TraceWriter::new(
            queue.clone(),
            store,
            metrics.clone(),
            WriterSettings {
                batch_size: BATCH,
                flush_interval: Duration::from_millis(200),
                retention: Duration::from_secs(86_400 * 365 * 50),
                replay_retention: Duration::from_secs(86_400),
                spill_dir: dir.path().join("spill"),
                max_spill_bytes: u64::MAX,
                dead_letter: dir.path().join("dead.jsonl"),
            },
        )
        .unwrap(),
    );
    let (stop, watch) = tokio::sync::watch::channel(false);
    let task = {
        let writer = writer.clone();
        rt.spawn(async move { writer.start(watch).await })
    };
    // Warm up (schema, connections) before timing.
    queue.submit(Box::new(event(u64::MAX / 2 - first)));
    let count_of = |r: &str| metrics.trace_records.with_label_values(&[r]).get();
    while count_of("written") < 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut events: Vec<Box<TraceEvent>> = (first..first + count).map(|i| Box::new(event(i))).collect();
    events.reverse();
    let started = Instant::now();
    match offer {
        Offer::Burst => {
            while let Some(e) = events.pop() {
                // A full queue would drop: wait for the writer instead.
                while queue.depth() >= 60_000 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                queue.submit(e);
            }
        }
        Offer::Paced(per_second) => {
            let mut offered = 0u64;
            while !events.is_empty() {
                let due = (started.elapsed().as_secs_f64() * per_second as f64) as u64;
                while offered < due {
                    let Some(e) = events.pop() else { break };
                    queue.submit(e);
                    offered += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let offered_at = Instant::now();
    // Every record ends written or dropped (a full queue, counted by the request path).
    while count_of("written") + count_of("dropped") < count + 1 {
        assert!(started.elapsed() < Duration::from_secs(300), "writer stalled at {}", count_of("written"));
        std::thread::sleep(Duration::from_millis(2));
    }
    let outcome = Outcome {
        rate: count as f64 / started.elapsed().as_secs_f64(),
        spilled: count_of("spilled"),
        dropped: count_of("dropped"),
        lag: offered_at.elapsed(),
    };
    let _ = stop.send(true);
    rt.block_on(task).unwrap();
    outcome
}

/// The store alone: the same rows, already flattened, inserted in batches of `BATCH`.
fn store_alone(rt: &tokio::runtime::Runtime, store: &dyn TraceStore) -> f64 {
    let rows: Vec<_> = (0..RECORDS).map(|i| event(u64::MAX / 4 + i).into_row()).collect();
    let started = Instant::now();
    rt.block_on(async {
        for chunk in rows.chunks(BATCH) {
            store.insert(chunk).await.unwrap();
        }
    });
    RECORDS as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs bench binaries with --test-ish flags: only run under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // The writer's warnings (spills, store errors) with RUST_LOG=modelux=warn.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _server;
    let url = match std::env::var("CLICKHOUSE_URL") {
        Ok(u) => u,
        Err(_) => {
            _server = start_clickhouse();
            _server.url.clone()
        }
    };
    let settings = |db: &str| ClickHouseSettings {
        url: url.clone(),
        database: db.into(),
        user: "default".into(),
        password: String::new(),
        table: "requests".into(),
    };
    let ch_writer: Arc<dyn TraceStore> = Arc::new(ClickHouseStore::new(settings("bench_writer")));
    let ch_alone = ClickHouseStore::new(settings("bench_alone"));
    rt.block_on(ch_alone.prepare()).unwrap();
    rt.block_on(ch_writer.prepare()).unwrap();
    let alone_rate = store_alone(&rt, &ch_alone);
    println!("clickhouse, batches of {BATCH}: store insert alone {alone_rate:.0} records/s");
    // Steady offers: the writer keeps up when nothing is spilled and the last record is
    // acknowledged within a flush interval or two of being offered.
    let mut first = 0;
    for per_second in [50_000, 100_000, 150_000, 200_000] {
        let count = per_second * 3;
        let o = through_writer(&rt, ch_writer.clone(), Offer::Paced(per_second), first, count);
        first += count;
        println!(
            "  offered {per_second} records/s for 3 s: written {:.0}/s, spilled {}, dropped {}, last record acknowledged {} ms after it was offered",
            o.rate,
            o.spilled,
            o.dropped,
            o.lag.as_millis()
        );
    }
    let o = through_writer(&rt, ch_writer.clone(), Offer::Burst, first, RECORDS);
    println!(
        "  burst of {RECORDS}: written {:.0}/s ({:.0}% of the store alone), spilled {}, dropped {}",
        o.rate,
        o.rate / alone_rate * 100.0,
        o.spilled,
        o.dropped
    );
}
