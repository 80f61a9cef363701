//! The ClickHouse trace store against a real server: a private `clickhouse-server` per
//! test (temp data dir, free loopback ports), killed and restarted at will. Written for
//! Debian's 18.16; the same config works on current versions.

use super::*;
use modelux::trace::clickhouse::{classify_response, ClickHouseSettings, ClickHouseStore};
use modelux::trace::query::{report_from_rows, StatusFilter};
use modelux::trace::replay::{Bodies, ReplayQuery, ReplayRow};
use modelux::trace::{Cursor, Granularity, GroupBy, LogQuery, ReportQuery, StoreError, TraceRow, TraceStore};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};

pub struct ClickHouseServer {
    pub url: String,
    pub http_port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// A program on PATH or in the sbin directories (not on a non-root PATH on Debian).
fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `clickhouse-server`, or the single `clickhouse` binary of current releases.
fn server_command(config: &std::path::Path) -> Command {
    let config = format!("--config-file={}", config.display());
    if let Some(server) = find_program("clickhouse-server") {
        let mut cmd = Command::new(server);
        cmd.arg(config);
        cmd
    } else if let Some(multi) = find_program("clickhouse") {
        let mut cmd = Command::new(multi);
        cmd.arg("server").arg(config);
        cmd
    } else {
        panic!("clickhouse-server not installed: apt-get install clickhouse-server");
    }
}

impl ClickHouseServer {
    pub async fn start() -> ClickHouseServer {
        let dir = tempfile::tempdir().unwrap();
        let http_port = free_port();
        let tcp_port = free_port();
        let root = dir.path();
        for sub in ["data", "tmp", "user_files", "format_schemas"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let p = |s: &str| format!("{}/{s}/", root.display());
        // No interserver_http_port: 18.16 would bind 9009 for it.
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{}</path>
  <tmp_path>{}</tmp_path>
  <user_files_path>{}</user_files_path>
  <format_schema_path>{}</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
</yandex>
"#,
            p("data"),
            p("tmp"),
            p("user_files"),
            p("format_schemas")
        );
        let users = r#"<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#;
        std::fs::write(root.join("config.xml"), config).unwrap();
        std::fs::write(root.join("users.xml"), users).unwrap();
        let mut server =
            ClickHouseServer { url: format!("http://127.0.0.1:{http_port}"), http_port, child: None, dir };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let root = self.dir.path();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(root.join("server.log")).unwrap();
        let child = server_command(&root.join("config.xml"))
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("clickhouse-server not installed: apt-get install clickhouse-server ({e})")
            });
        self.child = Some(child);
        let client = ::clickhouse::Client::default().with_url(self.url.clone()).with_validation(false);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Ok(1u8)) =
                tokio::time::timeout(Duration::from_secs(2), client.query("SELECT 1").fetch_one::<u8>()).await
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("clickhouse-server exited ({status}): {}", self.log());
            }
            if Instant::now() > deadline {
                panic!("clickhouse-server not ready after 20 s: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILL, no shutdown: what a crash or an OOM kill looks like to the gateway.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn settings(&self, database: &str) -> ClickHouseSettings {
        ClickHouseSettings {
            url: self.url.clone(),
            database: database.to_string(),
            user: String::new(),
            password: String::new(),
            table: "requests".to_string(),
        }
    }

    pub fn client(&self) -> ::clickhouse::Client {
        ::clickhouse::Client::default().with_url(self.url.clone()).with_validation(false)
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn store(server: &ClickHouseServer, database: &str) -> ClickHouseStore {
    let store = ClickHouseStore::new(server.settings(database));
    store.prepare().await.unwrap();
    store
}

/// A record with every field set, none of them to its default.
fn full_row(id: &str, ts_ms: u64) -> TraceRow {
    TraceRow {
        ts: (ts_ms / 1000) as u32,
        ts_ms,
        request_id: id.to_string(),
        project: "proj".into(),
        key_name: "key-1".into(),
        surface: "openai".into(),
        endpoint: "/openai/v1/chat/completions".into(),
        model_requested: "fast".into(),
        resolution: "config".into(),
        routing_config: "@fast".into(),
        config_version: 7,
        strategy: "fallback".into(),
        ab_variant: "b".into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        status: 200,
        error_code: "upstream_timeout".into(),
        attempt_providers: vec!["anthropic".into(), "openai".into()],
        attempt_models: vec!["claude".into(), "gpt-4o-mini".into()],
        attempt_statuses: vec!["timeout".into(), "success".into()],
        attempt_http_statuses: vec![0, 200],
        attempt_errors: vec!["timed out after 30s".into(), String::new()],
        attempt_ttfb_ms: vec![-1.0, 12.345],
        attempt_duration_ms: vec![30_000.0, 456.789],
        input_tokens: 1234,
        output_tokens: 567,
        cached_tokens: 89,
        reasoning_tokens: 10,
        cost_input: 0.000_123_4,
        cost_output: 0.000_567_8,
        cost_total: 0.000_691_2,
        latency_ms: 30_457.123,
        ttfb_ms: Some(30_012.5),
        tag_keys: vec!["team".into(), "env".into()],
        tag_values: vec!["search".into(), "prod".into()],
        end_user: "user-42".into(),
        trace_id: "trace-abc".into(),
        conversation_id: "conv-1".into(),
        budget_name: "monthly".into(),
        budget_action: "warn_only".into(),
        streamed: true,
        bytes_in: 2048,
        bytes_out: 4096,
        decision_trace: r#"{"strategy":"fallback","attempts":[]}"#.into(),
        request_body: "{\"messages\":[{\"role\":\"user\",\"content\":\"h\u{e9}llo \\n\\t'`?\"}]}".into(),
        response_body: "données ✓ \0 end".into(),
        max_tokens: 512,
        replay_body: modelux::trace::replay::compress(b"{\"model\":\"@production\"}"),
        replay_body_truncated: true,
        replay_answer: modelux::trace::replay::compress(b"data: {\"choices\":[]}\n\n"),
        cache_hit: true,
        cache_saved_usd: 0.000321,
        cache_embedding_usd: 0.0,
        provider_key: String::new(),
        owned_ids: vec![],
    }
}

/// A record with every optional thing absent.
fn bare_row(id: &str, ts_ms: u64) -> TraceRow {
    TraceRow {
        ts: (ts_ms / 1000) as u32,
        ts_ms,
        request_id: id.to_string(),
        project: String::new(),
        key_name: String::new(),
        surface: "openai".into(),
        endpoint: "/v1/models".into(),
        model_requested: String::new(),
        resolution: String::new(),
        routing_config: String::new(),
        config_version: 0,
        strategy: String::new(),
        ab_variant: String::new(),
        provider: String::new(),
        model: String::new(),
        status: 0,
        error_code: String::new(),
        attempt_providers: vec![],
        attempt_models: vec![],
        attempt_statuses: vec![],
        attempt_http_statuses: vec![],
        attempt_errors: vec![],
        attempt_ttfb_ms: vec![],
        attempt_duration_ms: vec![],
        input_tokens: 0,
        output_tokens: 0,
        cached_tokens: 0,
        reasoning_tokens: 0,
        cost_input: 0.0,
        cost_output: 0.0,
        cost_total: 0.0,
        latency_ms: 0.25,
        ttfb_ms: None,
        tag_keys: vec![],
        tag_values: vec![],
        end_user: String::new(),
        trace_id: String::new(),
        conversation_id: String::new(),
        budget_name: String::new(),
        budget_action: String::new(),
        streamed: false,
        bytes_in: 0,
        bytes_out: 0,
        decision_trace: String::new(),
        request_body: String::new(),
        response_body: String::new(),
        max_tokens: 0,
        replay_body: Vec::new(),
        replay_body_truncated: false,
        replay_answer: Vec::new(),
        cache_hit: false,
        cache_saved_usd: 0.0,
        cache_embedding_usd: 0.0,
        provider_key: String::new(),
        owned_ids: vec![],
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_prepare_is_idempotent() {
    let server = ClickHouseServer::start().await;
    assert!(server.url.ends_with(&format!(":{}", server.http_port)));
    let store = ClickHouseStore::new(server.settings("traces"));
    assert_eq!(store.kind(), "clickhouse");
    store.prepare().await.unwrap();
    store.prepare().await.unwrap();
    // A second store on the same database (another gateway) finds the schema applied.
    ClickHouseStore::new(server.settings("traces")).prepare().await.unwrap();
    let versions: Vec<(String, u32)> = server
        .client()
        .query("SELECT table_name, version FROM traces.schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        versions,
        vec![
            ("requests".to_string(), 1),
            ("requests".to_string(), 2),
            ("requests".to_string(), 3),
            ("requests".to_string(), 4),
            ("requests".to_string(), 5),
            ("requests".to_string(), 6),
            ("requests".to_string(), 7)
        ]
    );
    let engine: String = server
        .client()
        .query("SELECT engine FROM system.tables WHERE database = 'traces' AND name = 'requests'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(engine, "ReplacingMergeTree");
    // Another table in the same database gets its own migration record.
    let mut other = server.settings("traces");
    other.table = "requests_b".into();
    ClickHouseStore::new(other).prepare().await.unwrap();
    let n: u64 =
        server.client().query("SELECT count() FROM traces.schema_migrations").fetch_one().await.unwrap();
    assert_eq!(n, 14);
    // A crash part-way through 0002 (one column added, the migration not recorded): the
    // rerun completes it.
    let mut torn = server.settings("traces");
    torn.table = "requests_torn".into();
    ClickHouseStore::new(torn.clone()).prepare().await.unwrap();
    for sql in [
        "ALTER TABLE traces.requests_torn DROP COLUMN replay_body",
        "ALTER TABLE traces.requests_torn DROP COLUMN replay_body_truncated",
        "ALTER TABLE traces.schema_migrations DELETE WHERE table_name = 'requests_torn' AND version = 2",
        // And as if the table predated 0007.
        "ALTER TABLE traces.requests_torn DROP COLUMN owned_ids",
        "ALTER TABLE traces.schema_migrations DELETE WHERE table_name = 'requests_torn' AND version = 7",
    ] {
        server.client().query(sql).execute().await.unwrap();
    }
    // Mutations apply in the background.
    for _ in 0..100 {
        let left: u64 = server
            .client()
            .query("SELECT count() FROM traces.schema_migrations WHERE table_name = 'requests_torn' AND version IN (2, 7)")
            .fetch_one()
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A row written before 0007 (no owned_ids in its part) reads back with none.
    server
        .client()
        .query("INSERT INTO traces.requests_torn (ts, ts_ms, request_id, project, provider) VALUES (1763700000, 1763700000000, 'old', 'proj', 'openai')")
        .execute()
        .await
        .unwrap();
    let torn_store = ClickHouseStore::new(torn);
    torn_store.prepare().await.unwrap();
    assert_eq!(torn_store.get("old").await.unwrap().map(|r| r.owned_ids), Some(vec![]));
    assert_eq!(torn_store.owner("proj", "x").await.unwrap(), None);
    let mut row = full_row("torn", 1_763_700_000_000);
    row.replay_body = modelux::trace::replay::compress(b"{}");
    torn_store.insert(std::slice::from_ref(&row)).await.unwrap();
    assert_eq!(torn_store.get("torn").await.unwrap(), Some(row));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_rows_round_trip() {
    let server = ClickHouseServer::start().await;
    let store = store(&server, "traces").await;
    let t = 1_763_700_000_123;
    let full = full_row("req-full", t);
    let mut no_ttfb = full_row("req-no-ttfb", t + 1);
    no_ttfb.ttfb_ms = None;
    let bare = bare_row("req-bare", t + 2);
    store.insert(&[full.clone(), no_ttfb.clone(), bare.clone()]).await.unwrap();
    store.insert(&[]).await.unwrap();
    assert_eq!(store.get("req-full").await.unwrap(), Some(full.clone()));
    assert_eq!(store.get("req-no-ttfb").await.unwrap(), Some(no_ttfb.clone()));
    assert_eq!(store.get("req-bare").await.unwrap(), Some(bare.clone()));
    assert_eq!(store.get("missing").await.unwrap(), None);
    // A request id that looks like SQL is just a value.
    assert_eq!(store.get("x' OR 1 = 1 --").await.unwrap(), None);
    let page = store.list(&LogQuery { limit: 10, ..LogQuery::default() }).await.unwrap();
    assert_eq!(page.rows, vec![bare, no_ttfb, full]);
    assert_eq!(page.next_cursor, None);
    // Who holds an id an answer created: the newest request of that project naming it.
    let mut owner = full_row("req-owner", t + 3);
    owner.owned_ids = vec!["resp_ch1".into(), "file-ch2".into()];
    owner.provider = "azure-east".into();
    store.insert(&[owner]).await.unwrap();
    assert_eq!(store.owner("proj", "file-ch2").await.unwrap().as_deref(), Some("azure-east"));
    assert_eq!(store.owner("other", "file-ch2").await.unwrap(), None);
    assert_eq!(store.owner("proj", "resp_none").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_duplicate_inserts_count_once() {
    let server = ClickHouseServer::start().await;
    let store = store(&server, "traces").await;
    let t = 1_763_700_000_000;
    let rows: Vec<TraceRow> = (0..20).map(|i| full_row(&format!("r{i:02}"), t + i * 1000)).collect();
    store.insert(&rows).await.unwrap();
    // A retry after a lost acknowledgement, and a spill replayed with part of the batch.
    store.insert(&rows).await.unwrap();
    store.insert(&rows[5..10]).await.unwrap();
    let raw: u64 = server.client().query("SELECT count() FROM traces.requests").fetch_one().await.unwrap();
    assert_eq!(raw, 45, "the duplicates are stored until merged");
    let page = store.list(&LogQuery { limit: 100, ..LogQuery::default() }).await.unwrap();
    assert_eq!(page.rows.len(), 20);
    let q = ReportQuery {
        start_ms: t,
        end_ms: t + 3_600_000,
        granularity: Granularity::Hour,
        group_by: None,
        filter: LogQuery::default(),
    };
    let report = store.report(&q).await.unwrap();
    assert_eq!(report.totals.requests, 20);
    assert_eq!(report, report_from_rows(&q, &rows));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_refused_rows_are_data_errors() {
    let server = ClickHouseServer::start().await;
    let _schema = store(&server, "traces").await;
    // A table that derives a number from `error_code` (as an operator might add): a row
    // whose code is not a number cannot be stored there, however often it is retried.
    let admin = server.client();
    admin.query("CREATE TABLE traces.strict AS traces.requests").execute().await.unwrap();
    admin
        .query("ALTER TABLE traces.strict ADD COLUMN code_number UInt32 MATERIALIZED toUInt32(error_code)")
        .execute()
        .await
        .unwrap();
    let mut settings = server.settings("traces");
    settings.table = "strict".into();
    let strict = ClickHouseStore::new(settings);
    let t = 1_763_700_000_000;
    let mut fine = full_row("fine", t);
    fine.error_code = "429".into();
    strict.insert(std::slice::from_ref(&fine)).await.unwrap();
    let bad = full_row("bad", t); // error_code "upstream_timeout"
    let err = strict.insert(&[fine.clone(), bad]).await.unwrap_err();
    assert!(matches!(err, StoreError::Data(ref m) if m.contains("Code: 6")), "{err:?}");
    // The batch is refused as a whole: nothing of it was stored.
    let n: u64 = admin.query("SELECT count() FROM traces.strict").fetch_one().await.unwrap();
    assert_eq!(n, 1);
    assert_eq!(strict.get("fine").await.unwrap(), Some(fine));

    // Missing table and database: transient (the schema may be created, rows are kept).
    let mut missing = server.settings("traces");
    missing.table = "nope".into();
    let err = ClickHouseStore::new(missing).insert(&[full_row("x", t)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Transient(ref m) if m.contains("Code: 60")), "{err:?}");
    let err = ClickHouseStore::new(server.settings("nodb")).insert(&[full_row("x", t)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Transient(ref m) if m.contains("Code: 81")), "{err:?}");

    // The classifier on answers of this server.
    for (sql, data) in [
        ("SELECT toUInt32('abc')", true),                    // 6 CANNOT_PARSE_TEXT
        ("SELECT arrayElement(materialize([1]), 0)", false), // 135: a query bug, not the data
        ("SELECT * FROM traces.nope", false),                // 60 UNKNOWN_TABLE
        ("SELECT count() FROM system.numbers", false),       // 159 TIMEOUT_EXCEEDED
    ] {
        let query = admin.query(sql).with_setting("max_execution_time", "1");
        let Err(::clickhouse::error::Error::BadResponse(m)) = query.execute().await else {
            panic!("{sql} did not fail")
        };
        let is_data = matches!(classify_response(&m), StoreError::Data(_));
        assert_eq!(is_data, data, "{sql}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_or_hung_is_transient_quickly() {
    let mut server = ClickHouseServer::start().await;
    let store = store(&server, "traces").await;
    let t = now_ms();
    store.insert(&[full_row("before", t)]).await.unwrap();
    server.kill();
    let started = Instant::now();
    let err = store.insert(&[full_row("during", t + 1)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
    let err = store.list(&LogQuery { limit: 10, ..LogQuery::default() }).await.unwrap_err();
    assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    server.restart().await;
    store.insert(&[full_row("after", t + 2)]).await.unwrap();
    let ids: Vec<String> = store
        .list(&LogQuery { limit: 10, ..LogQuery::default() })
        .await
        .unwrap()
        .rows
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(ids, ["after", "before"]);

    // A server that accepts the connection and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hung.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = hung.accept().await {
            held.push(sock);
        }
    });
    let mut settings = server.settings("traces");
    settings.url = format!("http://{addr}");
    let hung_store = ClickHouseStore::new(settings).with_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = hung_store.insert(&[full_row("hung", t)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
    let err = hung_store.get("hung").await.unwrap_err();
    assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_prune_drops_old_days() {
    let server = ClickHouseServer::start().await;
    let store = store(&server, "traces").await;
    let day = 86_400_000;
    let now = now_ms();
    let today = now - now % day;
    let rows: Vec<TraceRow> = (0..4u64)
        .flat_map(|d| {
            // First and last millisecond of each day: each lands in its own day partition.
            let start = today - d * day;
            [full_row(&format!("d{d}-a"), start), full_row(&format!("d{d}-b"), start + day - 1)]
        })
        .filter(|r| r.ts_ms <= now)
        .collect();
    store.insert(&rows).await.unwrap();
    // Only whole days before the day of `before_ms` go: today's survives although part of
    // it is older than `now - 1h`.
    let dropped = store.prune(now).await.unwrap();
    assert_eq!(dropped, 3);
    let left: Vec<String> = store
        .list(&LogQuery { limit: 50, ..LogQuery::default() })
        .await
        .unwrap()
        .rows
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert!(left.iter().all(|id| id.starts_with("d0-")) && !left.is_empty(), "{left:?}");
    assert_eq!(store.prune(now).await.unwrap(), 0);
    // A cutoff mid-day keeps that day.
    assert_eq!(store.prune(today + day / 2).await.unwrap(), 0);
    assert_eq!(store.prune(today + day).await.unwrap(), 1);
}

/// A small deterministic generator (the test must not depend on an RNG's stream).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// A few hundred records over three days: several projects, models, providers, statuses
/// (0 included), with and without TTFB, tied timestamps and latencies, tags present,
/// absent and repeated.
fn varied_rows(base: u64) -> Vec<TraceRow> {
    let mut g = Lcg(42);
    (0..400)
        .map(|i| {
            // Clusters of equal timestamps exercise the request_id tie-break.
            let ts_ms =
                base + (g.next() % (3 * 86_400_000)) / 7 * 7 + if i % 9 == 0 { 0 } else { g.next() % 3 };
            let mut r = bare_row(&format!("{:04x}-{}", g.next() % 65_536, i), ts_ms);
            r.project = g.pick(&["p1", "p2", "", "p3"]).into();
            r.model = g.pick(&["gpt-4o", "claude", "", "llama"]).into();
            r.model_requested = g.pick(&["fast", "gpt-4o", "smart"]).into();
            r.provider = g.pick(&["openai", "anthropic", "", "local"]).into();
            r.routing_config = g.pick(&["@fast", "", "@smart"]).into();
            r.end_user = g.pick(&["u1", "u2", "", "u3", "u4"]).into();
            r.trace_id = g.pick(&["t1", "t2", ""]).into();
            r.conversation_id = g.pick(&["c1", ""]).into();
            r.status = [200, 200, 200, 201, 429, 500, 502, 0, 404, 400][(g.next() % 10) as usize];
            r.input_tokens = g.next() % 5000;
            r.output_tokens = g.next() % 2000;
            // Whole nano-USD amounts, as the pricing produces.
            r.cost_total = (g.next() % 5_000_000) as f64 / 1e9;
            r.latency_ms = if i % 11 == 0 { 250.0 } else { (g.next() % 3_000_000) as f64 / 1000.0 };
            r.ttfb_ms =
                if g.next().is_multiple_of(3) { None } else { Some((g.next() % 500_000) as f64 / 1000.0) };
            r.endpoint = g
                .pick(&["/openai/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/models"])
                .into();
            r.max_tokens = g.next() % 3 * 100;
            r.cache_hit = g.next().is_multiple_of(10);
            if g.next().is_multiple_of(2) {
                r.replay_body = modelux::trace::replay::compress(r.request_id.as_bytes());
                r.replay_answer = modelux::trace::replay::compress(r.endpoint.as_bytes());
                r.replay_body_truncated = g.next().is_multiple_of(5);
            }
            match g.next() % 6 {
                5 => {
                    r.tag_keys = vec!["experiment".into()];
                    r.tag_values = vec!["exp_1".into()];
                }
                0 => {}
                1 => {
                    r.tag_keys = vec!["team".into()];
                    r.tag_values = vec![g.pick(&["search", "ads", ""]).into()];
                }
                2 => {
                    r.tag_keys = vec!["env".into(), "team".into()];
                    r.tag_values = vec![g.pick(&["prod", "dev"]).into(), g.pick(&["search", "ads"]).into()];
                }
                3 => {
                    // A repeated key: the first occurrence counts.
                    r.tag_keys = vec!["team".into(), "team".into()];
                    r.tag_values = vec!["ads".into(), "search".into()];
                }
                _ => {
                    r.tag_keys = vec!["env".into()];
                    r.tag_values = vec![g.pick(&["prod", "dev"]).into()];
                }
            }
            r
        })
        .collect()
}

fn filters(base: u64, rows: &[TraceRow]) -> Vec<LogQuery> {
    let some_latency = rows[17].latency_ms;
    let q = LogQuery::default;
    vec![
        q(),
        LogQuery { project: Some("p1".into()), ..q() },
        LogQuery { project: Some(String::new()), ..q() },
        LogQuery { status: Some(StatusFilter::Class(5)), ..q() },
        LogQuery { status: Some(StatusFilter::Exact(0)), ..q() },
        LogQuery { status: Some(StatusFilter::Class(2)), model: Some("gpt-4o".into()), ..q() },
        LogQuery { provider: Some("anthropic".into()), routing_config: Some("@fast".into()), ..q() },
        LogQuery { end_user: Some("u2".into()), ..q() },
        LogQuery { model_requested: Some("smart".into()), ..q() },
        LogQuery { trace_id: Some("t1".into()), conversation_id: Some("c1".into()), ..q() },
        LogQuery { min_latency_ms: Some(some_latency), ..q() },
        LogQuery { tags: vec![("team".into(), "ads".into())], ..q() },
        // Records with `team` twice (`ads`, then `search`) match too.
        LogQuery { tags: vec![("team".into(), "search".into())], ..q() },
        LogQuery { tags: vec![("team".into(), "search".into()), ("env".into(), "prod".into())], ..q() },
        LogQuery { tags: vec![("team".into(), String::new())], ..q() },
        LogQuery { tags: vec![("nope".into(), String::new())], ..q() },
        LogQuery { start_ms: Some(base + 86_400_000 + 1234), end_ms: Some(base + 2 * 86_400_000 - 1), ..q() },
        LogQuery { start_ms: Some(rows[3].ts_ms), end_ms: Some(rows[3].ts_ms + 1), ..q() },
        LogQuery { model: Some("'; DROP TABLE requests; --".into()), ..q() },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_reports_and_pages_match_the_reference() {
    let server = ClickHouseServer::start().await;
    let store = store(&server, "traces").await;
    // 2025-11-20 00:00 UTC plus a bit: buckets of every size fall mid-series.
    let base = 1_763_596_800_000 + 1_234_567;
    let rows = varied_rows(base);
    for chunk in rows.chunks(64) {
        store.insert(chunk).await.unwrap();
    }
    // Duplicates: a batch replayed, and scattered rows again.
    store.insert(&rows[64..128]).await.unwrap();
    let again: Vec<TraceRow> = rows.iter().step_by(13).cloned().collect();
    store.insert(&again).await.unwrap();
    let unique: BTreeMap<&str, &TraceRow> = rows.iter().map(|r| (r.request_id.as_str(), r)).collect();
    assert_eq!(unique.len(), rows.len());

    let groupings = [
        None,
        Some(GroupBy::Model),
        Some(GroupBy::Provider),
        Some(GroupBy::Project),
        Some(GroupBy::RoutingConfig),
        Some(GroupBy::EndUser),
        Some(GroupBy::Tag("team".into())),
        Some(GroupBy::Tag("missing".into())),
    ];
    let mut compared = 0;
    for filter in filters(base, &rows) {
        for granularity in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
            for group_by in &groupings {
                // The report's own window cuts into the first and last day.
                let q = ReportQuery {
                    start_ms: base + 3_600_000 + 17,
                    end_ms: base + 3 * 86_400_000 - 5_000_000,
                    granularity,
                    group_by: group_by.clone(),
                    filter: filter.clone(),
                };
                let got = store.report(&q).await.unwrap();
                let want = report_from_rows(&q, &rows);
                assert_eq!(got, want, "{q:?}");
                compared += usize::from(!want.series.is_empty());
            }
        }

        // Pages: every matching row once, newest first, then no cursor.
        let mut want: Vec<&TraceRow> = rows.iter().filter(|r| filter.matches(r)).collect();
        want.sort_by(|a, b| (b.ts_ms, &b.request_id).cmp(&(a.ts_ms, &a.request_id)));
        for limit in [7, 200] {
            let mut got: Vec<TraceRow> = Vec::new();
            let mut cursor: Option<Cursor> = None;
            loop {
                let page =
                    store.list(&LogQuery { cursor: cursor.clone(), limit, ..filter.clone() }).await.unwrap();
                assert!(page.rows.len() <= limit);
                got.extend(page.rows);
                match page.next_cursor {
                    Some(c) => {
                        assert_eq!(Some(&c), got.last().map(Cursor::after).as_ref());
                        cursor = Some(c);
                    }
                    None => break,
                }
            }
            let got: Vec<&TraceRow> = got.iter().collect();
            assert_eq!(got, want, "{filter:?} limit {limit}");
        }

        // Replay pages: oldest first, only the replay set, bodies when asked.
        // The last two: an experiment's own traffic, and a few named records.
        let some_ids: Vec<String> = rows.iter().step_by(37).map(|r| r.request_id.clone()).collect();
        for (limit, bodies, experiment_traffic, request_ids) in [
            (9, Bodies::Full, false, Vec::new()),
            (500, Bodies::Skip, false, Vec::new()),
            (50, Bodies::Presence, true, Vec::new()),
            (50, Bodies::Presence, false, some_ids),
        ] {
            let mut filters = filter.clone();
            if experiment_traffic {
                filters.tags = vec![("experiment".into(), "exp_1".into())];
            }
            let base_q = ReplayQuery { filters, after: None, limit, bodies, request_ids, experiment_traffic };
            let mut want: Vec<ReplayRow> =
                rows.iter().filter(|r| base_q.matches(r)).map(|r| ReplayRow::from_row(r, bodies)).collect();
            want.sort_by(|a, b| (a.ts_ms, &a.request_id).cmp(&(b.ts_ms, &b.request_id)));
            let mut got = Vec::new();
            let mut q = base_q.clone();
            loop {
                let page = store.replay(&q).await.unwrap();
                assert!(page.len() <= limit);
                let Some(last) = page.last() else { break };
                q.after = Some(last.cursor());
                got.extend(page);
            }
            assert_eq!(got, want, "{filter:?} replay limit {limit}");
        }
    }

    // Bodies older than the cut are emptied (a background mutation), the rest kept.
    let cut = base + 86_400_000;
    let old_bodies =
        unique.values().filter(|r| r.ts_ms / 1000 < cut / 1000 && !r.replay_body.is_empty()).count();
    assert_eq!(store.expire_replay_bodies(cut).await.unwrap(), old_bodies as u64);
    let all = ReplayQuery {
        filters: LogQuery::default(),
        after: None,
        limit: 1000,
        bodies: Bodies::Full,
        ..ReplayQuery::default()
    };
    for _ in 0..100 {
        let left = store.replay(&all).await.unwrap();
        if left
            .iter()
            .all(|r| r.ts_ms / 1000 >= cut / 1000 || (r.replay_body.is_empty() && r.replay_answer.is_empty()))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after: Vec<ReplayRow> = store.replay(&all).await.unwrap();
    let mut want: Vec<ReplayRow> = rows
        .iter()
        .filter(|r| all.matches(r))
        .map(|r| {
            let mut w = ReplayRow::from_row(r, Bodies::Full);
            if r.ts_ms / 1000 < cut / 1000 {
                w.replay_body.clear();
                w.replay_answer.clear();
            }
            w
        })
        .collect();
    want.sort_by(|a, b| (a.ts_ms, &a.request_id).cmp(&(b.ts_ms, &b.request_id)));
    assert_eq!(after, want);
    // The filters are not all empty: the comparison compared something.
    assert!(compared > 200, "{compared}");
}
