//! Trace writer throughput: records pushed onto the queue as the logging phase does, drained,
//! batched and written by the real writer into a local ClickHouse, timed until the last record is acknowledged. The baseline, measured in the same
//! run, is the store's own insert of the same rows in the same batch size.
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
        ts_ms: 1_763_700_000_000 + i,
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

/// Pushes `RECORDS` events through queue → writer → store; records per second.
fn through_writer(rt: &tokio::runtime::Runtime, store: Arc<dyn TraceStore>) -> f64 {
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
                spill_dir: dir.path().join("spill"),
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
    queue.submit(Box::new(event(u64::MAX / 2)));
    let written = || metrics.trace_records.with_label_values(&["written"]).get();
    while written() < 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let events: Vec<Box<TraceEvent>> = (0..RECORDS).map(|i| Box::new(event(i))).collect();
    let started = Instant::now();
    for e in events {
        // Offered as fast as the writer takes them (a full queue would drop).
        while queue.depth() >= 60_000 {
            std::thread::sleep(Duration::from_micros(200));
        }
        queue.submit(e);
    }
    while written() < RECORDS + 1 {
        assert!(started.elapsed() < Duration::from_secs(120), "writer stalled at {}", written());
        std::thread::sleep(Duration::from_millis(5));
    }
    let rate = RECORDS as f64 / started.elapsed().as_secs_f64();
    assert_eq!(metrics.trace_records.with_label_values(&["dropped"]).get(), 0);
    let _ = stop.send(true);
    rt.block_on(task).unwrap();
    rate
}

/// The store alone: the same rows, already flattened, inserted in batches of `BATCH`.
fn store_alone(rt: &tokio::runtime::Runtime, store: &dyn TraceStore) -> f64 {
    let rows: Vec<_> = (RECORDS..2 * RECORDS).map(|i| event(i).into_row()).collect();
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
    let writer_rate = through_writer(&rt, ch_writer);
    let alone_rate = store_alone(&rt, &ch_alone);
    println!(
        "clickhouse: writer {writer_rate:.0} records/s, store insert alone {alone_rate:.0} records/s ({:.0}% of the store's own rate); {RECORDS} records, batches of {BATCH}",
        writer_rate / alone_rate * 100.0
    );
}
