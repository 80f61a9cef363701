//! Several gateway nodes, one policy: three gateways on one PostgreSQL (management state)
//! and one Redis (budget and rate counters), each started by the test on loopback. Budgets
//! and rate limits hold across the nodes, a Redis outage follows the configured policy and
//! loses no settled spend, and a management change made on one node is served by the others
//! within a second.

use super::pg::PgServer;
use super::redis::RedisServer;
use super::spend::{body_for, cost_of, post_all, CENT_A_TOKEN};
use super::*;
use modelux::spend::shared::{NodeSpendRow, OnError, SeedSource, SharedCounters, SharedSettings};

const NODES: usize = 3;

struct Cluster {
    nodes: Vec<Gateway>,
    pg: PgServer,
    pg_url: String,
    redis: Option<RedisServer>,
}

/// Three gateways sharing one database and (`counters`: `Some(policy)`) one Redis.
async fn cluster(upstream: &MockServer, counters: Option<&str>, top_extra: &str) -> Cluster {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let pg_url = pg.database("modelux_nodes").await;
    let redis = match counters {
        Some(_) => Some(tokio::task::spawn_blocking(RedisServer::start).await.unwrap()),
        None => None,
    };
    let mut yaml = format!("state: {{ backend: postgres, url: \"{pg_url}\" }}\n{CENT_A_TOKEN}{top_extra}");
    if let (Some(policy), Some(r)) = (counters, &redis) {
        yaml.push_str(&format!(
            "redis: {{ url: \"{}\" }}\nspend: {{ counters: redis, on_counter_error: {policy} }}\n",
            r.url()
        ));
    }
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        let mut cfg = Cfg::new(upstream.base_url().leak());
        cfg.top_extra = yaml.clone();
        cfg.more_configs = "  cheap: { project: default, strategy: single, model: \"local/m1\" }\n".into();
        nodes.push(start(cfg).await);
    }
    Cluster { nodes, pg, pg_url, redis }
}

async fn ask_node(gw: &Gateway, model: &str) -> Response {
    let auth = format!("Bearer {KEY}");
    post_to(gw, CHAT, &[("authorization", &auth)], &body_for(model, json!({}))).await
}

async fn manage_call(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> Response {
    let auth = format!("Bearer {ADMIN_KEY}");
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    httpc::request(
        gw.manage,
        method,
        path,
        &[("authorization", &auth), ("content-type", "application/json")],
        &bytes,
    )
    .await
    .unwrap()
}

/// A budget's settled spend as the management API of `gw` reports it (across all nodes).
async fn budget_spend(gw: &Gateway, name: &str) -> f64 {
    let r = manage_call(gw, "GET", &format!("/manage/v1/budgets/{name}"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()["data"]["spend_usd"].as_f64().unwrap()
}

/// Every node's durable figure for `budget`, summed, from PostgreSQL.
async fn durable_spend(url: &str, budget: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT COALESCE(SUM(spend_nanos), 0)::BIGINT FROM budget_spend_nodes WHERE budget = $1",
            &[&budget],
        )
        .await
        .unwrap();
    row.get(0)
}

/// Shared counters of node `node` on `redis`, opened (it blocks) on a thread of its own.
fn open_counters(
    redis: &RedisServer,
    node: &str,
    own: Vec<NodeSpendRow>,
    source: &SeedSource,
    metrics: &modelux::metrics::Metrics,
) -> Result<SharedCounters, String> {
    let settings = SharedSettings {
        url: redis.url(),
        timeout: Duration::from_millis(250),
        on_error: OnError::FailClosed,
        node: node.into(),
    };
    let (source, m) = (source.clone(), metrics.shared_counters.clone());
    std::thread::spawn(move || SharedCounters::open(settings, own, source, m)).join().unwrap()
}

/// A Redis and one node's counters on it (`fail_closed`, no durable rows), their metrics,
/// and today's daily period.
struct OneNode {
    redis: RedisServer,
    a: SharedCounters,
    metrics: modelux::metrics::Metrics,
    start: i64,
    end: i64,
}

async fn one_node() -> OneNode {
    let redis = tokio::task::spawn_blocking(RedisServer::start).await.unwrap();
    let source: SeedSource = std::sync::Arc::new(|| Ok(Vec::new()));
    let metrics = modelux::metrics::Metrics::new().unwrap();
    let a = open_counters(&redis, "a", Vec::new(), &source, &metrics).unwrap();
    let (start, end) = modelux::spend::period::Period::Daily.window(modelux::spend::unix_now());
    OneNode { redis, a, metrics, start, end }
}

/// Polls `check` every 20 ms until it holds; how long that took (panics after `limit`).
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_never_overspend_a_shared_budget() {
    let upstream = mock(MockConfig { latency: Duration::from_millis(30), ..MockConfig::default() }).await;
    let budgets = "budgets:\n  - { name: small, scope: routing_config, routing_config: \"@cheap\", period: daily, cap_usd: 2.0, action: block }\n";
    let c = cluster(&upstream, Some("fail_closed"), budgets).await;
    let body = serde_json::to_vec(&body_for("@cheap", json!({}))).unwrap();
    let proxies: Vec<_> = c.nodes.iter().map(|g| g.proxy).collect();
    let tasks = post_all(&proxies, &body, 256);
    let (mut served, mut blocked, mut held, mut billed) = (0usize, 0, 0, 0.0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => {
                served += 1;
                billed += cost_of(&r);
            }
            402 => {
                // A 402 only once settled spend is at the cap, whichever node answers.
                let spent = error_of(&r)["budget"]["spend_usd"].as_f64().unwrap();
                assert!(spent >= 2.0 - 1e-9, "402 at ${spent} of a $2 cap: {}", r.text());
                blocked += 1;
            }
            429 => {
                assert_eq!(error_of(&r)["code"], "budget_reserved", "{}", r.text());
                held += 1;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(served + blocked + held, 256);
    assert!(served > 0 && blocked + held > 0, "{served} served, {blocked} blocked, {held} held");
    let reservation = (body.len() as f64 / 3.0).ceil() * 0.01 + 16.0 * 0.01;
    // A node's read includes what it settled itself; another node's last settlements
    // arrive within milliseconds (each waits up to one to ride with a batch).
    for gw in &c.nodes {
        within(Duration::from_secs(1), "every node sees what was billed", || async {
            (budget_spend(gw, "small").await - billed).abs() < 1e-6
        })
        .await;
        let spent = budget_spend(gw, "small").await;
        assert!(spent <= 2.0 + reservation, "spent ${spent} over a $2 cap (+{reservation})");
    }
    assert_eq!(upstream.request_count(), served);
    // Each node's settled figure reaches the database (the re-seed's source).
    let billed_nanos = modelux::spend::counters::to_nanos(billed);
    within(Duration::from_secs(5), "durable spend", || async {
        (durable_spend(&c.pg_url, "small").await - billed_nanos).abs() <= served as i64
    })
    .await;
    let node = manage_call(&c.nodes[1], "GET", "/manage/v1/node", None).await.json().unwrap();
    assert_eq!(
        node["data"]["counters"],
        json!({"backend": "redis", "reachable": true, "on_counter_error": "fail_closed"})
    );
    assert_eq!(node["data"]["state"]["backend"], "postgres");
    assert!(node["data"]["node"].as_str().unwrap().ends_with(&format!(":{}", c.nodes[1].proxy.port())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_three_nodes() {
    let upstream = mock(MockConfig::default()).await;
    let limits = "rate_limits: { requests_per_minute: 600, management_requests_per_minute: 0 }\n";
    let c = cluster(&upstream, Some("fail_closed"), limits).await;
    let body = serde_json::to_vec(&body_for("local/m1", json!({}))).unwrap();
    let started = Instant::now();
    let sent = std::sync::Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..48)
        .map(|w| {
            let (proxies, body, sent): (Vec<_>, _, _) =
                (c.nodes.iter().map(|g| g.proxy).collect(), body.clone(), sent.clone());
            tokio::spawn(async move {
                let (mut allowed, mut limited) = (0usize, 0usize);
                loop {
                    let i = sent.fetch_add(1, Ordering::Relaxed);
                    if i >= 900 {
                        return (allowed, limited);
                    }
                    let auth = format!("Bearer {KEY}");
                    let r = httpc::request(
                        proxies[(i + w) % NODES],
                        "POST",
                        CHAT,
                        &[("authorization", &auth), ("content-type", "application/json")],
                        &body,
                    )
                    .await
                    .unwrap();
                    match r.status {
                        200 => allowed += 1,
                        429 => {
                            assert_eq!(error_of(&r)["code"], "rate_limited", "{}", r.text());
                            limited += 1;
                        }
                        s => panic!("unexpected {s}: {}", r.text()),
                    }
                }
            })
        })
        .collect();
    let (mut allowed, mut limited) = (0, 0);
    for w in workers {
        let (a, l) = w.await.unwrap();
        allowed += a;
        limited += l;
    }
    let elapsed = started.elapsed();
    // GCRA: a minute's allowance in a burst, then one request per 100 ms comes back.
    let refilled = (elapsed.as_millis() / 100) as usize + 1;
    assert_eq!(allowed + limited, 900);
    assert!(
        (600..=600 + refilled).contains(&allowed),
        "{allowed} admitted in {elapsed:?} across three nodes"
    );
}

/// Redis killed and restarted (empty) mid-run under `fail_closed`: policed requests get
/// 503 `counters_unavailable` meanwhile, counted-only traffic is served and reconciled, and
/// the re-seed from PostgreSQL loses no settled spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fail_closed_refuses_policed_requests_and_loses_no_spend() {
    let upstream = mock(MockConfig::default()).await;
    let budgets = "budgets:\n  - { name: day, scope: project, project: default, period: daily, cap_usd: 100, action: block }\n  - { name: cheap-day, scope: routing_config, routing_config: \"@cheap\", period: daily, cap_usd: 100, action: block }\n";
    let mut c = cluster(&upstream, Some("fail_closed"), budgets).await;
    let mut billed = 0.0;
    for gw in &c.nodes[..2] {
        let r = ask_node(gw, "@cheap").await;
        assert_eq!(r.status, 200, "{}", r.text());
        billed += cost_of(&r);
    }
    // Written to the database before the outage (the flusher runs every 500 ms).
    let before = modelux::spend::counters::to_nanos(billed);
    within(Duration::from_secs(5), "durable spend", || async {
        durable_spend(&c.pg_url, "day").await == before
    })
    .await;

    c.redis.as_mut().unwrap().stop();
    let r = ask_node(&c.nodes[2], "@cheap").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "counters_unavailable");
    assert_eq!(error_of(&r)["type"], "server_error");
    let anthropic = post_to(
        &c.nodes[2],
        "/anthropic/v1/messages",
        &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")],
        &json!({"model": "@cheap", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(anthropic.status, 503, "{}", anthropic.text());
    assert_eq!(anthropic.json().unwrap()["type"], "error");
    // Direct traffic is counted, not policed: served, and counted in process meanwhile.
    let direct = ask_node(&c.nodes[2], "local/m1").await;
    assert_eq!(direct.status, 200, "{}", direct.text());
    billed += cost_of(&direct);
    assert!(
        metric_value(&metrics(&c.nodes[2]).await, "modelux_counters_transitions_total", &[("to", "down")])
            >= 1.0
    );

    c.redis.as_mut().unwrap().restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = ask_node(&c.nodes[0], "@cheap").await;
        if r.status == 200 {
            billed += cost_of(&r);
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "not served again after Redis came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Re-seeded from the database by one node, the outage's spend pushed by the node that
    // counted it: every node reads the whole figure again, nothing twice.
    for gw in &c.nodes {
        within(Duration::from_secs(5), "spend after the re-seed", || async {
            (budget_spend(gw, "day").await - billed).abs() < 1e-6
        })
        .await;
    }
    assert!(
        metric_value(&metrics(&c.nodes[2]).await, "modelux_counters_transitions_total", &[("to", "up")])
            >= 1.0
    );
}

/// The same outage under `fail_open`: served throughout, counted in process, reconciled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fail_open_serves_and_reconciles() {
    let upstream = mock(MockConfig::default()).await;
    // A rate limit too: the takes that go with each reservation fall back in process.
    let budgets = "budgets:\n  - { name: day, scope: project, project: default, period: daily, cap_usd: 100, action: block }\nrate_limits: { requests_per_minute: 1000, management_requests_per_minute: 0 }\n";
    let mut c = cluster(&upstream, Some("fail_open"), budgets).await;
    let mut billed = 0.0;
    let r = ask_node(&c.nodes[0], "@cheap").await;
    assert_eq!(r.status, 200, "{}", r.text());
    billed += cost_of(&r);
    c.redis.as_mut().unwrap().stop();
    for gw in &c.nodes {
        let r = ask_node(gw, "@cheap").await;
        assert_eq!(r.status, 200, "fail_open serves during the outage: {}", r.text());
        billed += cost_of(&r);
    }
    let text = metrics(&c.nodes[1]).await;
    assert!(metric_value(&text, "modelux_counters_local_total", &[("op", "reserve")]) >= 1.0, "{text}");
    assert!(metric_value(&text, "modelux_counters_local_total", &[("op", "take")]) >= 1.0, "{text}");
    c.redis.as_mut().unwrap().restart();
    for gw in &c.nodes {
        within(Duration::from_secs(5), "reconciled spend", || async {
            (budget_spend(gw, "day").await - billed).abs() < 1e-6
        })
        .await;
    }
    let r = ask_node(&c.nodes[2], "@cheap").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        manage_call(&c.nodes[2], "GET", "/manage/v1/node", None).await.json().unwrap()["data"]["counters"]
            ["reachable"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_on_one_node_is_served_by_the_others_within_a_second() {
    let upstream = mock(MockConfig::default()).await;
    let c = cluster(&upstream, None, "").await;
    let (a, b, cc) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);

    // A key made on A works on C.
    let made =
        manage_call(a, "POST", "/manage/v1/api-keys", Some(json!({"project": "default", "name": "shared"})))
            .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let key = made.json().unwrap()["data"].clone();
    let secret = key["key"].as_str().unwrap().to_string();
    let chat = |gw: &Gateway, model: &str| {
        let (proxy, auth, body) = (gw.proxy, format!("Bearer {secret}"), chat_body(model));
        async move { httpc::request(proxy, "POST", CHAT, &[("authorization", &auth)], &body).await.unwrap() }
    };
    within(Duration::from_secs(1), "a new key on node C", || async { chat(cc, "@fast").await.status == 200 })
        .await;

    // Revoked on A: refused by B and C within a second.
    let revoked =
        manage_call(a, "DELETE", &format!("/manage/v1/api-keys/{}", key["id"].as_str().unwrap()), None).await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    for gw in [b, cc] {
        within(Duration::from_secs(1), "a revoked key refused", || async {
            chat(gw, "@fast").await.status == 401
        })
        .await;
    }

    // A routing config made and patched on B is served at its new version by C.
    let rc = json!({"slug": "production", "project": "default", "strategy": "single", "model": "openai/gpt-4o-mini"});
    assert_eq!(manage_call(b, "POST", "/manage/v1/routing-configs", Some(rc)).await.status, 201);
    let patched = manage_call(
        b,
        "PATCH",
        "/manage/v1/routing-configs/production",
        Some(json!({"model": "openai/gpt-4o"})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    let version_on_c = || async {
        let r = ask_node(cc, "@production").await;
        r.status == 200 && r.header("x-modelux-config-version") == Some("v2")
    };
    within(Duration::from_secs(1), "the patched config on node C", version_on_c).await;
    // And a change made on C while its snapshot is current keeps B's change (planned on the
    // shared state, not on a node's copy).
    let again = manage_call(
        cc,
        "PATCH",
        "/manage/v1/routing-configs/production",
        Some(json!({"model": "openai/gpt-4o-mini"})),
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json().unwrap()["data"]["version"], 3);
    drop(c.pg);
}

/// The counters' scripts against a real Redis, without a gateway: an emptied Redis is
/// re-seeded once however many nodes notice at once, each node's newer figure is pushed on
/// top without counting anything twice, and a hold is released once however often asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_redis_is_reseeded_once_and_holds_release_once() {
    use modelux::spend::counters::{Counters, ReserveItem, SpendKey};
    use modelux::spend::period::Period;

    let mut redis = tokio::task::spawn_blocking(RedisServer::start).await.unwrap();
    let (start, end) = Period::Daily.window(modelux::spend::unix_now());
    let row = |node: &str, spend_nanos: i64| NodeSpendRow {
        budget: "b".into(),
        instance: String::new(),
        period_start: start,
        period_end: end,
        node: node.into(),
        spend_nanos,
    };
    // The store: a node that is gone, and node a's figure as it last wrote it.
    let rows = vec![row("gone", 1_000), row("a", 50)];
    let source: SeedSource = std::sync::Arc::new(move || Ok(rows.clone()));
    let metrics = modelux::metrics::Metrics::new().unwrap();
    let open = |node: &str| {
        let own = if node == "a" { vec![row("a", 50)] } else { vec![] };
        open_counters(&redis, node, own, &source, &metrics).unwrap()
    };
    let (a, b) = (open("a"), open("b"));
    let key = SpendKey { budget: "b", instance: "", period_start: start };
    assert_eq!(a.level_now(key).await.unwrap().committed, 1_050, "seeded once at start");

    let items = [ReserveItem { key, cap: Some(2_000), enforced: true, counter: None, period_end: end }];
    let hold = a.reserve_all(&items, 10).await.unwrap().unwrap();
    assert_eq!(b.level_now(key).await.unwrap().used, 1_060);
    hold.settle(10, 4);
    hold.settle(10, 0);
    within(Duration::from_secs(2), "settled once", || async {
        let l = b.level_now(key).await.unwrap();
        l.committed == 1_054 && l.used == 1_054
    })
    .await;

    // Redis restarts empty: both nodes notice and re-seed at once from the same rows (a's
    // stale 50 among them); a then pushes its 54. Nothing counts twice.
    tokio::task::block_in_place(|| redis.restart());
    let (ra, rb) = tokio::join!(a.reserve_all(&items, 10), b.reserve_all(&items, 10));
    assert!(ra.is_err() && rb.is_err(), "fail_closed refuses until the re-seed");
    within(Duration::from_secs(3), "re-seeded and reconciled", || async {
        matches!(a.level_now(key).await, Ok(l) if l.committed == 1_054)
            && matches!(b.level_now(key).await, Ok(l) if l.committed == 1_054)
    })
    .await;
    // The refused reservations' holds (their scripts never ran) leave nothing held.
    let l = a.level_now(key).await.unwrap();
    assert_eq!(l.used, 1_054, "{l:?}");
}

/// Two running processes under one node name would each raise the same figure and count
/// half the spend: the second is refused at start, naming the setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_a_running_nodes_name_is_refused() {
    let redis = tokio::task::spawn_blocking(RedisServer::start).await.unwrap();
    let source: SeedSource = std::sync::Arc::new(|| Ok(Vec::new()));
    let metrics = modelux::metrics::Metrics::new().unwrap();
    let open = |node: &str| open_counters(&redis, node, Vec::new(), &source, &metrics);
    let first = open("edge-1").unwrap();
    let err = open("edge-1").err().expect("a second edge-1 is refused");
    assert!(err.contains("spend.node_id") && err.contains("edge-1"), "{err}");
    assert!(open("edge-2").is_ok(), "another name starts");
    // Once the first is gone, its name is free again after its claim runs out.
    drop(first);
    let started = Instant::now();
    assert!(open("edge-1").is_ok(), "the name is free again");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Reservations Redis holds right now, summed over every budget counter (`r`), and the
/// hold members still listed.
async fn held_in_redis(url: &str) -> (i64, usize) {
    let client = ::redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS").arg("mlx:spend:*").query_async(&mut c).await.unwrap();
    let (mut reserved, mut members) = (0i64, 0usize);
    for k in keys.iter().filter(|k| *k != "mlx:spend:epoch") {
        if k.ends_with(":h") {
            let n: usize = ::redis::cmd("ZCARD").arg(k).query_async(&mut c).await.unwrap();
            members += n;
        } else {
            let r: Option<i64> = ::redis::cmd("HGET").arg(k).arg("r").query_async(&mut c).await.unwrap();
            reserved += r.unwrap_or(0);
        }
    }
    (reserved, members)
}

/// With counters on Redis, a request's rate-limit takes go with its reservation in one
/// script call (one round trip before the upstream call, where there were two), judged as
/// before: the same headers, a refusal holds nothing, a request that fails still counts, a
/// 429 still comes before any other error, and a cache hit counts like any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_takes_ride_with_the_reservation_in_one_round_trip() {
    let upstream = mock(MockConfig::default()).await;
    let redis = tokio::task::spawn_blocking(RedisServer::start).await.unwrap();
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra = format!(
        "{CENT_A_TOKEN}rate_limits: {{ requests_per_minute: 4, tokens_per_minute: 100000, management_requests_per_minute: 0 }}\n\
         budgets:\n  - {{ name: day, scope: project, project: default, period: daily, cap_usd: 100, action: block }}\n\
         redis: {{ url: \"{}\" }}\nspend: {{ counters: redis, on_counter_error: fail_closed }}\n",
        redis.url()
    );
    cfg.more_configs = "  cached: { project: default, strategy: single, model: \"local/m1\", cache: { mode: exact, ttl_seconds: 60 } }\n".into();
    let gw = start(cfg).await;
    let batches = |text: &str| metric_value(text, "modelux_counters_round_trips_total", &[("op", "batch")]);

    // Two requests alone: requests take, tokens take and reservation in one call each.
    for remaining in ["3", "2"] {
        let before = batches(&metrics(&gw).await);
        let r = ask_node(&gw, "local/m1").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining));
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100000"));
        assert_eq!(batches(&metrics(&gw).await) - before, 1.0, "round trips before the call");
    }
    // A miss, then its hit: the hit is counted against the limit too.
    let r = ask_node(&gw, "@cached").await;
    assert_eq!((r.status, r.header("x-modelux-cache")), (200, Some("MISS")), "{}", r.text());
    let r = ask_node(&gw, "@cached").await;
    assert_eq!((r.status, r.header("x-modelux-cache")), (200, Some("HIT")), "{}", r.text());
    // Over the limit: refused with nothing reserved, before the body is even judged.
    let r = ask_node(&gw, "local/m1").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "rate_limited");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let auth = format!("Bearer {KEY}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let bad = httpc::request(gw.proxy, "POST", CHAT, &headers, b"{not json").await.unwrap();
    assert_eq!(bad.status, 429, "a 429 comes before a 400: {}", bad.text());
    assert_eq!(upstream.request_count(), 3);
    within(Duration::from_secs(3), "holds released", || async {
        held_in_redis(&redis.url()).await == (0, 0)
    })
    .await;
}

/// A settlement goes in front of its thread's next batch, pipelined in the same round trip
/// and settling first (a request costs one round trip, not two); with no batch to carry it,
/// it goes alone a moment later. Scripts Redis lost (`SCRIPT FLUSH`) are loaded again and
/// both calls sent again, in the same call.
#[tokio::test]
async fn a_settlement_rides_in_front_of_the_next_batch() {
    use modelux::spend::counters::{Counters, ReserveItem, SpendKey};

    let OneNode { redis, a, metrics, start, end } = one_node().await;
    let counted = |name: &str, op: &str| {
        let text = String::from_utf8(metrics.render()).unwrap();
        metric_value(&text, name, &[("op", op)])
    };
    let round_trips = |op: &str| counted("modelux_counters_round_trips_total", op);
    let item = |budget: &'static str, cap: i64| ReserveItem {
        key: SpendKey { budget, instance: "", period_start: start },
        cap: Some(cap),
        enforced: true,
        counter: None,
        period_end: end,
    };

    // Nothing to carry it: it goes alone.
    let warm = [item("warm", 1_000)];
    let settles = round_trips("settle");
    a.reserve_all(&warm, 100).await.unwrap().unwrap().settle(100, 40);
    within(Duration::from_secs(2), "settled alone", || async { held_in_redis(&redis.url()).await == (0, 0) })
        .await;
    assert_eq!(round_trips("settle") - settles, 1.0);

    // Under a cap of 90, a second hold of 100 fits only if the first was released before
    // it. The settlement waits a millisecond for the batch: a machine that stalls this
    // thread longer sends it alone, so a budget of its own per attempt, a few attempts.
    const BUDGETS: [&str; 5] = ["b1", "b2", "b3", "b4", "b5"];
    let mut rode = None;
    for budget in BUDGETS {
        let items = [item(budget, 90)];
        let first = a.reserve_all(&items, 100).await.unwrap().unwrap();
        let (batches, settles) = (round_trips("batch"), round_trips("settle"));
        first.settle(100, 30);
        let second = a.reserve_all(&items, 100).await.unwrap();
        if (round_trips("batch") - batches, round_trips("settle") - settles) != (1.0, 0.0) {
            continue;
        }
        let second = match second {
            Ok(hold) => hold,
            Err(refused) => panic!("the release did not go first: {refused:?}"),
        };
        let level = a.level_now(items[0].key).await.unwrap();
        assert_eq!((level.committed, level.used), (30, 130), "settled, and only the second hold left");
        rode = Some((budget, second));
        break;
    }
    let Some((budget, second)) = rode else { panic!("no settlement rode in front of a batch") };

    // Redis loses its scripts while a settlement rides: both are loaded and sent again in
    // that call, nothing owed, nothing marked down.
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    let settles = round_trips("settle");
    second.settle(100, 20);
    let items = [item(budget, 1_000)];
    let third = a.reserve_all(&items, 10).await.expect("answered after loading the scripts again");
    let third = third.expect("granted");
    if round_trips("settle") == settles {
        let level = a.level_now(items[0].key).await.unwrap();
        assert_eq!((level.committed, level.used), (50, 60), "the settlement went first, in the call");
    }
    third.settle(10, 0);
    within(Duration::from_secs(2), "all released", || async { held_in_redis(&redis.url()).await == (0, 0) })
        .await;
    assert_eq!(a.level_now(items[0].key).await.unwrap().committed, 50);
    assert_eq!(counted("modelux_counters_errors_total", "settle"), 0.0);
    assert_eq!(counted("modelux_counters_errors_total", "batch"), 0.0);

    // A level read sends what is still waiting to ride first: it includes every answer
    // this node has given.
    let items = [item("read", 1_000)];
    a.reserve_all(&items, 100).await.unwrap().unwrap().settle(100, 25);
    let level = a.level_now(items[0].key).await.unwrap();
    assert_eq!((level.committed, level.used), (25, 25));
}

/// On its way out a node releases the holds still waiting: a settlement about to ride,
/// and a release owed after Redis failed to answer, even within the pause that follows a
/// failure (a hold left in Redis would keep its budget's room for an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exiting_node_releases_its_waiting_holds() {
    use modelux::spend::counters::{Counters, ReserveItem, SpendKey};

    let OneNode { redis, a, metrics, start, end } = one_node().await;
    let key = SpendKey { budget: "b", instance: "", period_start: start };
    let items = [ReserveItem { key, cap: Some(1_000), enforced: true, counter: None, period_end: end }];

    // Queued to ride: sent at once.
    a.reserve_all(&items, 100).await.unwrap().unwrap().settle(100, 10);
    assert!(tokio::task::block_in_place(|| a.settle_before_exit(Duration::from_secs(2))));
    assert_eq!(held_in_redis(&redis.url()).await, (0, 0));

    // Owed: Redis holds its writes past the call's timeout, so the release is owed and
    // calls pause for half a second; the exit does not wait that pause out.
    let hold = a.reserve_all(&items, 100).await.unwrap().unwrap();
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("CLIENT").arg("PAUSE").arg(400).arg("WRITE").query_async(&mut c).await.unwrap();
    hold.settle(100, 20);
    let failed = || {
        let text = String::from_utf8(metrics.render()).unwrap();
        metric_value(&text, "modelux_counters_errors_total", &[("op", "settle")]) >= 1.0
    };
    within(Duration::from_secs(2), "the settlement timed out", || async { failed() }).await;
    assert!(tokio::task::block_in_place(|| a.settle_before_exit(Duration::from_secs(2))));
    assert_eq!(held_in_redis(&redis.url()).await, (0, 0));
    assert_eq!(a.level_now(key).await.unwrap().committed, 30);
}

/// A take-and-reserve call that finds Redis emptied (no epoch): its takes were judged there,
/// and its reservation goes the way a reservation alone would while Redis is re-seeded (in
/// process where nothing is enforced, under `fail_closed` too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_and_reserve_on_an_emptied_redis_keeps_its_verdicts() {
    use modelux::spend::counters::{Counters, RateKind, ReserveItem, SpendKey, Take};

    let OneNode { redis, a, metrics, start, end } = one_node().await;
    let key = SpendKey { budget: "b", instance: "", period_start: start };
    let counted = [ReserveItem { key, cap: None, enforced: false, counter: None, period_end: end }];
    let take = [Take { kind: RateKind::Requests, key: "k".into(), per_minute: 600, cost: 1 }];
    let (verdicts, held) = a.take_and_reserve(&take, &counted, 10).await.unwrap();
    assert!(verdicts.len() == 1 && verdicts[0].allowed && verdicts[0].remaining == 599, "{verdicts:?}");
    assert!(matches!(held, Some(Ok(_))));

    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    let (verdicts, held) = a.take_and_reserve(&take, &counted, 10).await.unwrap();
    assert!(verdicts.len() == 1 && verdicts[0].allowed, "{verdicts:?}");
    assert!(matches!(held, Some(Ok(_))), "reserved in process while Redis is re-seeded");
    let local = metric_value(
        &String::from_utf8(metrics.render()).unwrap(),
        "modelux_counters_local_total",
        &[("op", "reserve")],
    );
    assert_eq!(local, 1.0);
}
