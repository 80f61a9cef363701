//! Webhooks end to end: a receiver on loopback that verifies each signature and fails on
//! purpose; retries with backoff (the clock shortened by config), failure after the retry
//! window, replay, secret rotation with both signatures during the overlap, events from
//! management changes, budgets and provider health, and a delivery that survives a gateway
//! restart in the middle of its attempt, on SQLite and PostgreSQL.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;

use super::manage::{call, data, with_data_dir, Backend};
use super::spend::CENT_A_TOKEN;
use super::*;

/// Retries every 200 ms, then 400 ms; a delivery is given up after 2.5 s.
const FAST: &str = "webhooks: { timeout_ms: 1000, backoff_base_ms: 200, backoff_cap_ms: 400, \
                    retry_window_ms: 2500, poll_interval_ms: 50, secret_overlap_ms: 60000 }\n";

#[derive(Clone)]
pub(super) struct Received {
    at: Instant,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.header("x-modelux-delivery-id"), String::from_utf8_lossy(&self.body))
    }
}

impl Received {
    pub(super) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub(super) fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Status(u16),
    /// Answer after this long.
    Slow(Duration, u16),
}

#[derive(Default)]
struct Book {
    got: Vec<Received>,
    /// Replies for the next requests, in order; then `default`.
    plan: VecDeque<Reply>,
    default: u16,
}

/// A webhook receiver: a plain HTTP/1.1 server on loopback that records every request.
pub(super) struct Receiver {
    addr: SocketAddr,
    book: Arc<Mutex<Book>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(
    sock: &mut tokio::net::TcpStream,
) -> Option<(String, HashMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((path, headers, body))
}

impl Receiver {
    pub(super) async fn start(default: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let book = Arc::new(Mutex::new(Book { default, ..Book::default() }));
        let shared = book.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let book = shared.clone();
                tokio::spawn(async move {
                    let Some((path, headers, body)) = read_request(&mut sock).await else { return };
                    let reply = {
                        let mut b = book.lock().unwrap();
                        b.got.push(Received { at: Instant::now(), path, headers, body });
                        b.plan.pop_front().unwrap_or(Reply::Status(b.default))
                    };
                    let status = match reply {
                        Reply::Status(s) => s,
                        Reply::Slow(wait, s) => {
                            tokio::time::sleep(wait).await;
                            s
                        }
                    };
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\nlocation: /elsewhere\r\ncontent-length: 9\r\nconnection: close\r\n\r\nanswer{status}"
                    );
                    let _ = sock.write_all(answer.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Receiver { addr, book, task }
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn plan(&self, replies: &[Reply]) {
        self.book.lock().unwrap().plan.extend(replies.iter().copied());
    }

    fn set_default(&self, status: u16) {
        self.book.lock().unwrap().default = status;
    }

    pub(super) fn got(&self) -> Vec<Received> {
        self.book.lock().unwrap().got.clone()
    }

    pub(super) fn of_type(&self, event_type: &str) -> Vec<Received> {
        self.got().into_iter().filter(|r| r.header("x-modelux-event") == event_type).collect()
    }

    /// Waits until `done` holds for what was received.
    pub(super) async fn until(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.got();
            if done(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "receiver: timed out waiting for {what}; got {got:#?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// What a receiver does: a constant-time check of the signature over the raw body.
fn verifies(r: &Received, header: &str, secret: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&r.body);
    hex::decode(r.header(header)).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
}

async fn delivery_status(gw: &Gateway, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = data(&call(gw, "GET", &format!("/manage/v1/webhooks/deliveries/{id}"), None, &[]).await);
        if d["status"] == want {
            return d;
        }
        assert!(Instant::now() < deadline, "delivery {id} never became {want}: {d:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST …/endpoints/{id}/test` with an event of `event_type`.
async fn send_test(gw: &Gateway, id: &str, event_type: &str) -> Response {
    let path = format!("/manage/v1/webhooks/endpoints/{id}/test");
    call(gw, "POST", &path, Some(json!({ "event_type": event_type })), &[]).await
}

async fn create_endpoint(gw: &Gateway, url: &str, types: &[&str]) -> (String, String) {
    let r = call(
        gw,
        "POST",
        "/manage/v1/webhooks/endpoints",
        Some(json!({"url": url, "event_types": types, "description": "test receiver"})),
        &[],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let d = data(&r);
    let secret = d["signing_secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_") && secret.len() == 70, "{secret}");
    (d["id"].as_str().unwrap().to_string(), secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_replayed_and_rotated() {
    webhooks_are_signed_retried_replayed_and_rotated_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_replayed_and_rotated_on_postgres() {
    webhooks_are_signed_retried_replayed_and_rotated_on(Backend::postgres().await).await
}

async fn webhooks_are_signed_retried_replayed_and_rotated_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut cfg = with_data_dir(&upstream, &data_dir, &backend);
    cfg.top_extra.push_str(FAST);
    let gw = start(cfg).await;
    let a = Receiver::start(200).await;
    let b = Receiver::start(500).await;

    // Bad endpoints are refused with the field's path.
    let own = format!("http://127.0.0.1:{}/x", gw.manage.port());
    let own_mapped = format!("http://[::ffff:127.0.0.1]:{}/x", gw.proxy.port());
    let own_by_name = format!("http://localhost:{}/x", gw.proxy.port());
    for (body, path) in [
        (json!({"url": "ftp://x/y", "event_types": ["budget.exceeded"]}), "url"),
        (json!({"url": own, "event_types": ["budget.exceeded"]}), "url"),
        (json!({"url": own_mapped, "event_types": ["budget.exceeded"]}), "url"),
        (json!({"url": own_by_name, "event_types": ["budget.exceeded"]}), "url"),
        (json!({"url": a.url(), "event_types": ["budget.nope"]}), "event_types[0]"),
        (json!({"url": a.url(), "event_types": []}), "event_types"),
        (json!({"url": a.url(), "event_types": "budget.exceeded"}), "event_types"),
    ] {
        let r = call(&gw, "POST", "/manage/v1/webhooks/endpoints", Some(body.clone()), &[]).await;
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        assert_eq!(r.json().unwrap()["error"]["errors"][0]["path"], path, "{}", r.text());
    }
    let types = data(&call(&gw, "GET", "/manage/v1/webhooks/event-types", None, &[]).await);
    let names: Vec<&str> = types.as_array().unwrap().iter().map(|t| t["type"].as_str().unwrap()).collect();
    for t in ["budget.threshold_reached", "routing_config.updated", "api_key.revoked", "experiment.completed"]
    {
        assert!(names.contains(&t), "{names:?}");
    }

    // A: the receiver fails twice, then takes it; subscribed to routing-config updates.
    let (a_id, a_secret) = create_endpoint(&gw, &a.url(), &["routing_config.updated"]).await;
    let shown = data(&call(&gw, "GET", &format!("/manage/v1/webhooks/endpoints/{a_id}"), None, &[]).await);
    assert!(shown.get("signing_secret").is_none() && !shown.to_string().contains(&a_secret), "{shown}");
    a.plan(&[Reply::Status(302), Reply::Status(503)]);
    let rc = json!({"slug": "hooked", "project": "default", "strategy": "single", "model": "gpt-4o-mini"});
    let r = call(&gw, "POST", "/manage/v1/routing-configs", Some(rc), &[]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = call(&gw, "PATCH", "/manage/v1/routing-configs/hooked", Some(json!({"model": "local/m1"})), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = a.until("three attempts", |g| g.len() >= 3).await;
    // Only the update was subscribed to: three attempts of one delivery.
    let ids: HashSet<&str> = got.iter().map(|r| r.header("x-modelux-delivery-id")).collect();
    assert_eq!(ids.len(), 1, "{got:#?}");
    let delivery_id = got[0].header("x-modelux-delivery-id").to_string();
    for r in &got {
        assert!(verifies(r, "x-modelux-signature", &a_secret), "{r:?}");
        assert_eq!(r.header("x-modelux-signature"), hmac_hex(&a_secret, &r.body));
        assert_eq!(r.header("x-modelux-event"), "routing_config.updated");
        assert_eq!(r.header("content-type"), "application/json");
        assert!(r.header("x-modelux-timestamp").parse::<i64>().unwrap() > 1_700_000_000);
        assert!(!r.headers.contains_key("x-modelux-signature-previous"));
        assert_eq!(r.body, got[0].body, "every attempt sends the same bytes");
    }
    let envelope = got[0].json();
    assert!(envelope["id"].as_str().unwrap().starts_with("evt_"), "{envelope}");
    assert_eq!(envelope["type"], "routing_config.updated");
    assert_eq!(envelope["org_id"], "default");
    assert!(envelope["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(envelope["data"]["routing_config"]["model"], "local/m1", "{envelope}");
    assert_eq!(envelope["data"]["previous"]["model"], "gpt-4o-mini");
    assert_eq!(envelope["data"]["actor"]["type"], "management_key");
    // Backoff: 200 ms after the first failure, 400 ms after the second.
    let gaps: Vec<u128> = got.windows(2).map(|w| (w[1].at - w[0].at).as_millis()).collect();
    assert!(gaps[0] >= 190 && gaps[1] >= 390, "{gaps:?}");
    let d = delivery_status(&gw, &delivery_id, "delivered").await;
    let history: Vec<Value> = d["attempt_history"].as_array().unwrap().clone();
    let statuses: Vec<&Value> = history.iter().map(|a| &a["status_code"]).collect();
    assert_eq!(statuses, [&json!(302), &json!(503), &json!(200)], "{d:#}");
    assert!(got.iter().all(|r| r.path == "/hook"), "a redirect is never followed: {got:?}");
    assert_eq!(history[2]["response_body"], "answer200");
    assert_eq!(d["payload"], envelope);
    assert_eq!(d["endpoint_id"], a_id);
    assert_eq!(d["attempts"], 3);

    // B always fails: given up after the retry window, then replayed once it recovers.
    let (b_id, b_secret) = create_endpoint(&gw, &b.url(), &["budget.exceeded"]).await;
    let r = send_test(&gw, &b_id, "budget.exceeded").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let test_id = data(&r)["id"].as_str().unwrap().to_string();
    let failed = delivery_status(&gw, &test_id, "failed").await;
    let tries = failed["attempts"].as_i64().unwrap();
    assert!((4..=9).contains(&tries), "{failed:#}");
    assert_eq!(b.got().len() as i64, tries);
    assert!(b.got().iter().all(|r| verifies(r, "x-modelux-signature", &b_secret)));
    assert_eq!(b.got()[0].json()["data"]["test"], true);
    let listed = call(
        &gw,
        "GET",
        &format!(
            "/manage/v1/webhooks/deliveries?status=failed&endpoint_id={b_id}&event_type=budget.exceeded"
        ),
        None,
        &[],
    )
    .await
    .json()
    .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["data"][0]["id"], test_id.as_str());
    let none = call(
        &gw,
        "GET",
        "/manage/v1/webhooks/deliveries?status=failed&event_type=routing_config.updated",
        None,
        &[],
    )
    .await;
    assert_eq!(none.json().unwrap()["data"], json!([]));
    let bad = call(&gw, "GET", "/manage/v1/webhooks/deliveries?status=lost", None, &[]).await;
    assert_eq!(bad.status, 400);
    b.set_default(200);
    let r = call(&gw, "POST", &format!("/manage/v1/webhooks/deliveries/{test_id}/replay"), None, &[]).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let replayed = delivery_status(&gw, &test_id, "delivered").await;
    assert_eq!(replayed["attempts"].as_i64().unwrap(), tries + 1);
    let last = b.got().last().unwrap().clone();
    assert_eq!(last.header("x-modelux-delivery-id"), test_id, "replay sends the same delivery");
    assert_eq!(last.body, b.got()[0].body, "replay sends the same payload");

    // Rotation: the new secret signs; the old one signs alongside during the overlap.
    let r =
        call(&gw, "POST", &format!("/manage/v1/webhooks/endpoints/{a_id}/rotate-secret"), None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rotated = data(&r);
    let new_secret = rotated["signing_secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, a_secret);
    assert!(rotated["previous_secret_expires_at"].is_string(), "{rotated}");
    let before = a.got().len();
    let r = send_test(&gw, &a_id, "provider.health_changed").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let got = a.until("the test event", |g| g.len() > before).await;
    let r = &got[before];
    assert!(verifies(r, "x-modelux-signature", &new_secret), "{r:?}");
    assert!(verifies(r, "x-modelux-signature-previous", &a_secret), "{r:?}");
    assert!(!verifies(r, "x-modelux-signature", &a_secret));

    // An idempotent create replays the endpoint without its secret (shown once; the
    // replay record keeps no copy).
    let body = json!({"url": a.url(), "event_types": ["api_key.revoked"]});
    let first = call(
        &gw,
        "POST",
        "/manage/v1/webhooks/endpoints",
        Some(body.clone()),
        &[("idempotency-key", "hook-1")],
    )
    .await;
    assert_eq!(first.status, 201, "{}", first.text());
    let idem_secret = data(&first)["signing_secret"].as_str().unwrap().to_string();
    let again =
        call(&gw, "POST", "/manage/v1/webhooks/endpoints", Some(body), &[("idempotency-key", "hook-1")])
            .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(data(&again)["id"], data(&first)["id"]);
    assert!(data(&again)["signing_secret"].is_null(), "{}", again.text());
    let r = call(
        &gw,
        "DELETE",
        &format!("/manage/v1/webhooks/endpoints/{}", data(&first)["id"].as_str().unwrap()),
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, 200);

    // The audit log and the stored state never hold a signing secret in plaintext.
    let audit = call(&gw, "GET", "/manage/v1/audit-logs?resource_type=webhook_endpoint", None, &[]).await;
    let audit = audit.text();
    assert!(audit.contains("webhook_endpoint.secret_rotated"), "{audit}");
    for secret in [&a_secret, &new_secret, &b_secret, &idem_secret] {
        assert!(!audit.contains(secret.as_str()));
        for file in backend.files(data_dir.path()) {
            if let Ok(bytes) = std::fs::read(&file) {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{} holds a secret",
                    file.display()
                );
            }
        }
    }

    // PATCH and soft delete: a deleted endpoint takes no test event and is still readable.
    let r = call(
        &gw,
        "PATCH",
        &format!("/manage/v1/webhooks/endpoints/{b_id}"),
        Some(json!({"active": false, "event_types": ["*"]})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(data(&r)["active"], false);
    let r = call(&gw, "DELETE", &format!("/manage/v1/webhooks/endpoints/{b_id}"), None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let gone = data(&call(&gw, "GET", &format!("/manage/v1/webhooks/endpoints/{b_id}"), None, &[]).await);
    assert!(gone["deleted_at"].is_string(), "{gone}");
    let r = send_test(&gw, &b_id, "budget.exceeded").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let listed = call(&gw, "GET", "/manage/v1/webhooks/endpoints", None, &[]).await.json().unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    drop(backend);
}

/// A budget's thresholds and its cap each send one event per period; a provider that
/// turns unhealthy and recovers sends one event each way; a revoked key sends one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_health_and_revocations_send_events_once() {
    let upstream = mock(MockConfig::default()).await;
    let receiver = Receiver::start(200).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra = format!(
        "{CENT_A_TOKEN}budgets:\n  - {{ name: team, scope: project, project: default, period: daily, cap_usd: 0.5, action: block, \
         alert_thresholds: [{{ pct: 50 }}, {{ pct: 75, channels: [webhook] }}] }}\n\
         health: {{ consecutive_failures: 2, min_requests: 1000, probe_after_ms: 300 }}\n{FAST}"
    );
    cfg.more_configs = "  cheap: { project: default, strategy: single, model: \"local/m1\" }\n".into();
    let gw = start(cfg).await;
    let all = ["budget.threshold_reached", "budget.exceeded", "provider.health_changed", "api_key.revoked"];
    create_endpoint(&gw, &receiver.url(), &all).await;

    // Spend until the budget blocks.
    let auth = format!("Bearer {KEY}");
    let mut blocked = false;
    for _ in 0..40 {
        let r = post_to(&gw, CHAT, &[("authorization", &auth)], &super::spend::body_for("@cheap", json!({})))
            .await;
        if r.status == 402 {
            blocked = true;
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(blocked, "the budget never blocked");
    receiver
        .until("threshold and exceeded events", |g| {
            g.iter().filter(|r| r.header("x-modelux-event").starts_with("budget.")).count() >= 3
        })
        .await;
    // Several more rounds: nothing is sent twice.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let thresholds: Vec<f64> = receiver
        .of_type("budget.threshold_reached")
        .iter()
        .map(|r| r.json()["data"]["threshold_pct"].as_f64().unwrap())
        .collect();
    assert_eq!(thresholds.len(), 2, "{thresholds:?}");
    assert!(thresholds.contains(&50.0) && thresholds.contains(&75.0), "{thresholds:?}");
    let exceeded = receiver.of_type("budget.exceeded");
    assert_eq!(exceeded.len(), 1);
    let e = exceeded[0].json();
    assert_eq!(e["data"]["budget"]["name"], "team", "{e}");
    assert!(e["data"]["spend_usd"].as_f64().unwrap() >= 0.5, "{e}");
    assert!(e["data"]["period_resets_at"].is_string());

    // The provider fails twice (opens), then answers a probe (closes).
    upstream.push_script([
        Behavior::Status(500),
        Behavior::Status(500),
        Behavior::Status(500),
        Behavior::Status(500),
    ]);
    for _ in 0..2 {
        let r = post(&gw, Some(KEY), &chat_body("openai/gpt-4o-mini")).await;
        assert!(r.status >= 500, "{}", r.text());
    }
    let down = receiver
        .until("provider unhealthy", |g| {
            g.iter().any(|r| {
                r.header("x-modelux-event") == "provider.health_changed"
                    && r.json()["data"]["provider"] == "openai"
                    && r.json()["data"]["model"].is_null()
                    && r.json()["data"]["healthy"] == false
            })
        })
        .await;
    let _ = down;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(&gw, Some(KEY), &chat_body("openai/gpt-4o-mini")).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {}", r.text());
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    receiver
        .until("provider healthy again", |g| {
            g.iter().any(|r| {
                r.header("x-modelux-event") == "provider.health_changed"
                    && r.json()["data"]["provider"] == "openai"
                    && r.json()["data"]["model"].is_null()
                    && r.json()["data"]["healthy"] == true
            })
        })
        .await;
    let provider_level: Vec<bool> = receiver
        .of_type("provider.health_changed")
        .iter()
        .filter(|r| r.json()["data"]["model"].is_null())
        .map(|r| r.json()["data"]["healthy"].as_bool().unwrap())
        .collect();
    assert_eq!(provider_level, [false, true], "one event per transition");

    // A key created and revoked through the API.
    let r =
        call(&gw, "POST", "/manage/v1/api-keys", Some(json!({"project": "default", "name": "temp"})), &[])
            .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let key_id = data(&r)["id"].as_str().unwrap().to_string();
    let plaintext = data(&r)["key"].as_str().unwrap().to_string();
    let r = call(&gw, "DELETE", &format!("/manage/v1/api-keys/{key_id}"), None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let revoked = receiver
        .until("api_key.revoked", |g| g.iter().any(|r| r.header("x-modelux-event") == "api_key.revoked"))
        .await;
    let revoked = revoked.iter().find(|r| r.header("x-modelux-event") == "api_key.revoked").unwrap().json();
    assert_eq!(revoked["data"]["api_key"]["id"], key_id.as_str(), "{revoked}");
    assert!(!revoked.to_string().contains(&plaintext), "no key in the event: {revoked}");
    assert!(!revoked.to_string().contains("key_sha256"), "no key digest in the event: {revoked}");
}

/// The gateway process is killed while the receiver is still answering the first attempt;
/// the one started on the same state sends the delivery again once the lease runs out,
/// with the same delivery id: after deduplication the receiver handled it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_survives_a_crash_mid_attempt_exactly_once_after_dedup() {
    let upstream = mock(MockConfig::default()).await;
    let receiver = Receiver::start(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, manage) = (free_port(), free_port());
    let url = upstream.base_url();
    let mut cfg = Cfg::new(&url);
    cfg.top_extra = FAST.into();
    let text = render(&cfg, proxy, manage).replacen(
        "server:\n",
        &format!("server:\n  data_dir: \"{}\"\n", dir.path().join("data").display()),
        1,
    );
    let config = dir.path().join("modelux.yaml");
    std::fs::write(&config, text).unwrap();
    let manage = SocketAddr::from(([127, 0, 0, 1], manage));
    let spawn = || async {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_modelux"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !httpc::request(manage, "GET", "/healthz", &[], b"").await.is_ok_and(|r| r.status == 200) {
            assert!(Instant::now() < deadline, "gateway did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child
    };
    let manage_call = |method: &'static str, path: String, body: Value| async move {
        let auth = format!("Bearer {ADMIN_KEY}");
        let h = [("authorization", auth.as_str()), ("content-type", "application/json")];
        let bytes = if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).unwrap() };
        httpc::request(manage, method, &path, &h, &bytes).await.unwrap()
    };
    let mut first = spawn().await;
    let r = manage_call(
        "POST",
        "/manage/v1/webhooks/endpoints".into(),
        json!({"url": receiver.url(), "event_types": ["routing_config.created"]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let secret = data(&r)["signing_secret"].as_str().unwrap().to_string();
    // Slower than the gateway lives: the first attempt is never answered to it.
    receiver.plan(&[Reply::Slow(Duration::from_secs(5), 200)]);
    let rc = json!({"slug": "crash", "project": "default", "strategy": "single", "model": "gpt-4o-mini"});
    let r = manage_call("POST", "/manage/v1/routing-configs".into(), rc).await;
    assert_eq!(r.status, 201, "{}", r.text());
    receiver.until("the first attempt", |g| !g.is_empty()).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = spawn().await;
    let got = receiver.until("the attempt after the restart", |g| g.len() >= 2).await;
    let id = got[0].header("x-modelux-delivery-id").to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let d = loop {
        let r = manage_call("GET", format!("/manage/v1/webhooks/deliveries/{id}"), Value::Null).await;
        let d = data(&r);
        if d["status"] == "delivered" {
            break d;
        }
        assert!(Instant::now() < deadline, "never delivered: {d:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    second.kill().unwrap();
    second.wait().unwrap();
    let got = receiver.got();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got.iter().all(|r| verifies(r, "x-modelux-signature", &secret)));
    let ids: HashSet<&str> = got.iter().map(|r| r.header("x-modelux-delivery-id")).collect();
    assert_eq!(ids.len(), 1, "one delivery, sent again with its id: {got:#?}");
    assert_eq!(got[0].body, got[1].body);
    // The killed process never recorded its attempt; the new one recorded the success.
    let history = d["attempt_history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{d:#}");
    assert_eq!(history[0]["status_code"], 200);
    assert!(got[1].at - got[0].at >= Duration::from_millis(1500), "sent again only once the lease ran out");
}
