//! Decision traces into a real ClickHouse server (Debian's 18.16 in CI): no record lost
//! while the server is killed and restarted under load, none duplicated by the replay,
//! everything drained on SIGTERM, and the same answers as the embedded store.

use std::collections::HashSet;

use super::clickhouse::ClickHouseServer;
use super::*;
use modelux::trace::{Granularity, GroupBy, LogQuery, ReportQuery, StatusFilter, TraceStore};

/// Runs SQL over ClickHouse's HTTP interface; the body of the answer, trimmed.
async fn ch_query(ch: &ClickHouseServer, sql: &str) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], ch.http_port));
    let resp = httpc::request(addr, "POST", "/", &[], sql.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 200, "{sql}: {}", resp.text());
    resp.text().trim().to_string()
}

/// Polls until the table holds `expected` distinct requests (bounded).
async fn wait_for_rows(ch: &ClickHouseServer, table: &str, expected: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        // The table appears with the first write.
        let addr = SocketAddr::from(([127, 0, 0, 1], ch.http_port));
        let sql = format!("SELECT count() FROM {table} FINAL");
        let resp = httpc::request(addr, "POST", "/", &[], sql.as_bytes()).await;
        let n: usize =
            resp.ok().filter(|r| r.status == 200).and_then(|r| r.text().trim().parse().ok()).unwrap_or(0);
        if n >= expected || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn clickhouse_yaml(ch: &ClickHouseServer, database: &str) -> String {
    format!(
        "traces:\n  clickhouse: {{ url: \"{}\", database: {database} }}\n  flush_interval_ms: 200\n",
        ch.url
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_requests_survive_a_clickhouse_restart_exactly_once() {
    const TOTAL: usize = 100_000;
    const CONNECTIONS: usize = 32;
    let mut ch = ClickHouseServer::start().await;
    let upstream = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let url = upstream.base_url();
    let mut cfg = Cfg::new(url.leak());
    cfg.top_extra = clickhouse_yaml(&ch, "loss");
    let gw = start(cfg).await;

    let sent = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(chat_body("gpt-4o-mini"));
    let auth = format!("Bearer {KEY}");
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let (sent, body, auth, addr) = (sent.clone(), body.clone(), auth.clone(), gw.proxy);
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await.unwrap();
            let mut ids = Vec::new();
            while sent.fetch_add(1, Ordering::Relaxed) < TOTAL {
                let headers = [("content-type", "application/json"), ("authorization", auth.as_str())];
                let resp = conn.request("POST", CHAT, &headers, &body).await.unwrap();
                assert_eq!(resp.status, 200, "{}", resp.text());
                ids.push(resp.header("x-modelux-request-id").unwrap().to_string());
            }
            ids
        }));
    }
    // Kill the server a third of the way in; bring it back at two thirds.
    let wait_until = |n: usize| {
        let sent = sent.clone();
        async move {
            while sent.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_until(TOTAL / 3).await;
    ch.kill();
    let killed_at = sent.load(Ordering::Relaxed);
    wait_until(TOTAL * 2 / 3).await;
    ch.restart().await;
    let restarted_at = sent.load(Ordering::Relaxed);
    let mut ids = HashSet::new();
    for c in clients {
        ids.extend(c.await.unwrap());
    }
    assert_eq!(ids.len(), TOTAL, "every response had its own request id");
    assert!(restarted_at < TOTAL, "the restart happened under load ({restarted_at})");

    let stored = wait_for_rows(&ch, "loss.requests", TOTAL, Duration::from_secs(120)).await;
    let m = metrics(&gw).await;
    let spilled = metric_value(&m, "modelux_trace_records_total", &[("result", "spilled")]);
    let retried = metric_value(&m, "modelux_trace_records_total", &[("result", "retried")]);
    let dropped = metric_value(&m, "modelux_trace_records_total", &[("result", "dropped")]);
    eprintln!(
        "killed after {killed_at}, restarted after {restarted_at} requests; {stored} stored, {spilled} spilled, {retried} replayed, {dropped} dropped"
    );
    assert_eq!(stored, TOTAL);
    assert!(spilled > 0.0, "the outage spilled records to disk");
    assert_eq!(retried, spilled, "every spilled record was replayed");
    assert_eq!(dropped, 0.0);

    // Exactly once: the stored ids are the ids the clients got, each once, also after the
    // replacing engine merged away any physical duplicate a replay left.
    ch_query(&ch, "OPTIMIZE TABLE loss.requests FINAL").await;
    let physical: usize = ch_query(&ch, "SELECT count() FROM loss.requests").await.parse().unwrap();
    assert_eq!(physical, TOTAL);
    let stored_ids = ch_query(&ch, "SELECT request_id FROM loss.requests").await;
    let stored_ids: HashSet<String> = stored_ids.lines().map(str::to_string).collect();
    assert_eq!(stored_ids.len(), TOTAL);
    assert!(stored_ids == ids, "the stored request ids are exactly the ones answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_record_and_a_dead_store_leaves_them_on_disk_for_the_next_start() {
    let mut ch = ClickHouseServer::start().await;
    let upstream = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, manage) = (free_port(), free_port());
    let url = upstream.base_url();
    let mut cfg = Cfg::new(url.leak());
    // A long flush interval: only the shutdown drain can write these records.
    cfg.top_extra = format!(
        "traces:\n  clickhouse: {{ url: \"{}\", database: drain }}\n  flush_interval_ms: 600000\n  batch_size: 100000\n",
        ch.url
    );
    let config = dir.path().join("modelux.yaml");
    std::fs::write(&config, render(&cfg, proxy, manage)).unwrap();
    let serve = |config: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_modelux"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let proxy_addr = SocketAddr::from(([127, 0, 0, 1], proxy));
    let send = |n: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(proxy_addr).await.is_err() {
            assert!(Instant::now() < deadline, "gateway did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut conn = Conn::connect(proxy_addr).await.unwrap();
        let auth = format!("Bearer {KEY}");
        let mut ids = Vec::new();
        for _ in 0..n {
            let headers = [("content-type", "application/json"), ("authorization", auth.as_str())];
            let resp = conn.request("POST", CHAT, &headers, &chat_body("gpt-4o-mini")).await.unwrap();
            assert_eq!(resp.status, 200);
            ids.push(resp.header("x-modelux-request-id").unwrap().to_string());
        }
        ids
    };
    let sigterm = |child: &mut std::process::Child| {
        let status =
            std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                return;
            }
            assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // 1. Store up: SIGTERM writes everything the flush interval was holding back.
    let mut child = serve(&config);
    let first = send(500).await;
    sigterm(&mut child);
    assert_eq!(wait_for_rows(&ch, "drain.requests", 500, Duration::from_secs(5)).await, 500);

    // 2. Store down: SIGTERM spills to disk; the next start replays once the store is back.
    ch.kill();
    let mut child = serve(&config);
    let second = send(300).await;
    sigterm(&mut child);
    let spill = dir.path().join("data/trace-spill");
    let on_disk: usize = std::fs::read_dir(&spill)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap().lines().count())
        .sum();
    assert_eq!(on_disk, 300, "spilled at shutdown");
    ch.restart().await;
    let mut child = serve(&config);
    send(0).await;
    let stored = wait_for_rows(&ch, "drain.requests", 800, Duration::from_secs(30)).await;
    sigterm(&mut child);
    assert_eq!(stored, 800);
    let ids = ch_query(&ch, "SELECT request_id FROM drain.requests FINAL").await;
    let ids: HashSet<&str> = ids.lines().collect();
    assert!(first.iter().chain(&second).all(|id| ids.contains(id.as_str())));
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0, "the disk queue is empty after the replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_and_the_embedded_store_give_the_same_answers() {
    let ch = ClickHouseServer::start().await;
    let failing = mock(MockConfig { script: vec![Behavior::Status(500); 8], ..MockConfig::default() }).await;
    let good = mock(MockConfig { ttft: Duration::from_millis(3), ..MockConfig::default() }).await;
    let (failing_url, good_url) = (failing.base_url(), good.base_url());
    let mut cfg = Cfg::new(failing_url.leak());
    cfg.local = Some(good_url.leak());
    cfg.more_configs = "  fb: { project: default, strategy: fallback, retry_on: [\"5xx\"], attempts: [\"openai/gpt-4o-mini\", \"local/m1\"] }\n".into();
    cfg.top_extra = clickhouse_yaml(&ch, "same");
    let gw = start(cfg).await;
    let auth = format!("Bearer {KEY}");
    let mut ids = Vec::new();
    for i in 0..60 {
        let model = ["@fb", "local/m1", "gpt-4o-mini", "@nope"][i % 4];
        let tenant = ["acme", "globex", "initech"][i % 3];
        let body = json!({"model": model, "stream": i % 5 == 0, "messages": [{"role": "user", "content": "hi"}], "mlx:tags": {"tenant": tenant}});
        let resp = post_to(&gw, CHAT, &[("authorization", auth.as_str())], &body).await;
        ids.push(request_id(&resp));
    }
    assert_eq!(wait_for_rows(&ch, "same.requests", ids.len(), Duration::from_secs(10)).await, ids.len());

    // The same rows, read back from ClickHouse, written into an embedded store.
    let clickhouse = modelux::server::open_trace_store(&gw.handles.store.load().settings).unwrap();
    let page = clickhouse.list(&LogQuery { limit: 200, ..LogQuery::default() }).await.unwrap();
    assert_eq!(page.rows.len(), ids.len());
    let dir = tempfile::tempdir().unwrap();
    let embedded =
        modelux::trace::embedded::EmbeddedStore::open(&dir.path().join("traces.db"), Default::default())
            .unwrap();
    embedded.prepare().await.unwrap();
    embedded.insert(&page.rows).await.unwrap();

    let now = modelux::spend::unix_now() as u64 * 1000;
    let filters = [
        LogQuery::default(),
        LogQuery { tags: vec![("tenant".into(), "acme".into())], ..LogQuery::default() },
        LogQuery { model: Some("m1".into()), ..LogQuery::default() },
        LogQuery { status: Some(StatusFilter::Class(4)), ..LogQuery::default() },
        LogQuery { provider: Some("local".into()), min_latency_ms: Some(1.0), ..LogQuery::default() },
    ];
    for filter in &filters {
        for limit in [7, 200] {
            let q = LogQuery { limit, ..filter.clone() };
            let (a, b) = (clickhouse.list(&q).await.unwrap(), embedded.list(&q).await.unwrap());
            assert_eq!(a, b, "list {q:?}");
            if let Some(cursor) = a.next_cursor {
                let next = LogQuery { cursor: Some(cursor), ..q.clone() };
                assert_eq!(clickhouse.list(&next).await.unwrap(), embedded.list(&next).await.unwrap());
            }
        }
        for group_by in
            [None, Some(GroupBy::Model), Some(GroupBy::Provider), Some(GroupBy::Tag("tenant".into()))]
        {
            for granularity in [Granularity::Minute, Granularity::Day] {
                let q = ReportQuery {
                    start_ms: now - 3_600_000,
                    end_ms: now + 60_000,
                    granularity,
                    group_by: group_by.clone(),
                    filter: filter.clone(),
                };
                let (a, b) = (clickhouse.report(&q).await.unwrap(), embedded.report(&q).await.unwrap());
                assert_eq!(a, b, "report {q:?}");
                assert_eq!(
                    a.totals.requests as usize,
                    page.rows.iter().filter(|r| filter.matches(r)).count()
                );
            }
        }
    }
    for id in &ids {
        assert_eq!(clickhouse.get(id).await.unwrap(), embedded.get(id).await.unwrap());
    }
}
