//! End-to-end tests: the real gateway (pingora server on its own threads) and mock
//! upstreams speaking OpenAI's wire format, all in this process over loopback sockets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelux::server::{self, Handles, Options};
use modelux_loadtest::httpc::{self, Conn, Response};
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "mlx_sk_test_0123456789abcdef";
const OTHER_KEY: &str = "mlx_sk_other_0123456789abcdef";
const ADMIN_KEY: &str = "mlx_mk_test_0123456789abcdef";
const CHAT: &str = "/openai/v1/chat/completions";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Gateway {
    proxy: SocketAddr,
    manage: SocketAddr,
    handles: Handles,
    config_path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The test config: `openai` points at `upstream`, `local` at `local` (defaults to the same).
struct Cfg<'a> {
    upstream: &'a str,
    local: Option<&'a str>,
    server_extra: &'a str,
    fast_model: &'a str,
    /// Extra flow-mapping entries for the `openai` provider, e.g. `, tls_ca_file: "…"`.
    openai_extra: &'a str,
    /// Base URL of an `anthropic` provider (kind anthropic), when the test needs one.
    anthropic: Option<&'a str>,
    /// More provider entries, each a full `  - { … }` line.
    more_providers: String,
    /// More routing configs, each a full `  slug: { … }` line.
    more_configs: String,
    /// Top-level sections placed before `routing_configs:` (e.g. `health:`).
    top_extra: String,
}

impl<'a> Cfg<'a> {
    fn new(upstream: &'a str) -> Self {
        Cfg {
            upstream,
            local: None,
            server_extra: "",
            fast_model: "gpt-4o-mini",
            openai_extra: "",
            anthropic: None,
            more_providers: String::new(),
            more_configs: String::new(),
            top_extra: String::new(),
        }
    }
}

fn render(cfg: &Cfg, proxy: u16, manage: u16) -> String {
    format!(
        r#"
server:
  proxy_listen: "127.0.0.1:{proxy}"
  manage_listen: "127.0.0.1:{manage}"
  threads: 2
  # Many servers share this test process. Pingora's per-thread runtimes (the default,
  # covered by the SDK suite against the real binary) register themselves in a
  # process-global thread-local that a later server in the same process inherits stale
  # entries from, so in-process tests use the shared work-stealing runtime.
  work_stealing: true
{server_extra}
providers:
  - {{ id: openai, kind: openai, base_url: "{upstream}", api_key: "sk-test-upstream"{openai_extra} }}
  - {{ id: local, kind: openai_compatible, base_url: "{local}", models: ["m1"] }}
{anthropic}{more_providers}projects:
  - id: default
    keys:
      - {{ name: dev, key: "{KEY}" }}
  - id: other
    keys:
      - {{ name: o, key: "{OTHER_KEY}" }}
management_keys:
  - {{ name: admin, key: "{ADMIN_KEY}" }}
{rate_limits}{top_extra}routing_configs:
  fast: {{ project: default, strategy: single, model: "{fast}" }}
  theirs: {{ project: other, strategy: single, model: "local/m1" }}
{more_configs}"#,
        top_extra = cfg.top_extra,
        // Tests send bursts far above the default 600/minute; rate limit tests set their own.
        rate_limits = if cfg.top_extra.contains("rate_limits:") {
            ""
        } else {
            "rate_limits: { requests_per_minute: 0, management_requests_per_minute: 0 }\n"
        },
        more_configs = cfg.more_configs,
        server_extra = cfg.server_extra,
        upstream = cfg.upstream,
        local = cfg.local.unwrap_or(cfg.upstream),
        fast = cfg.fast_model,
        openai_extra = cfg.openai_extra,
        anthropic = cfg
            .anthropic
            .map(|url| format!(
                "  - {{ id: anthropic, kind: anthropic, base_url: \"{url}\", api_key: \"sk-ant-test\" }}\n"
            ))
            .unwrap_or_default(),
        more_providers = cfg.more_providers,
    )
}

async fn start(cfg: Cfg<'_>) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let (proxy_port, manage_port) = (free_port(), free_port());
    let config_path = dir.path().join("modelux.yaml");
    let mut text = render(&cfg, proxy_port, manage_port);
    if !cfg.server_extra.contains("data_dir") {
        // Each gateway its own data dir: spend and management state never leak between tests.
        let data = dir.path().join("data");
        text = text.replacen("server:\n", &format!("server:\n  data_dir: \"{}\"\n", data.display()), 1);
    }
    std::fs::write(&config_path, text).unwrap();
    let options = Options { config_path: Some(config_path.clone()), handle_sighup: false };
    let handles = server::open(&options).unwrap();
    let srv = server::build(&handles, &options);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || server::run_until(srv, rx));
    let gw = Gateway {
        proxy: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
        manage: SocketAddr::from(([127, 0, 0, 1], manage_port)),
        handles,
        config_path,
        stop: Some(tx),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = httpc::request(gw.manage, "GET", "/healthz", &[], b"").await;
        let proxy_up = tokio::net::TcpStream::connect(gw.proxy).await.is_ok();
        if proxy_up && health.map(|r| r.status == 200).unwrap_or(false) {
            break;
        }
        assert!(Instant::now() < deadline, "gateway did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw
}

async fn mock(cfg: MockConfig) -> MockServer {
    MockServer::start(cfg).await.unwrap()
}

fn chat_body(model: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})).unwrap()
}

async fn post(gw: &Gateway, key: Option<&str>, body: &[u8]) -> Response {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("authorization", a));
    }
    httpc::request(gw.proxy, "POST", CHAT, &headers, body).await.unwrap()
}

fn error_of(resp: &Response) -> Value {
    let v = resp.json().unwrap_or_else(|_| panic!("not JSON: {}", resp.text()));
    assert!(v["error"]["message"].is_string(), "OpenAI error shape: {v}");
    assert!(v["error"]["type"].is_string(), "OpenAI error shape: {v}");
    v["error"].clone()
}

fn request_id(resp: &Response) -> String {
    let id = resp.header("x-modelux-request-id").expect("request id header").to_string();
    assert_eq!(id.len(), 36, "uuid: {id}");
    id
}

async fn metrics(gw: &Gateway) -> String {
    httpc::request(gw.manage, "GET", "/metrics", &[], b"").await.unwrap().text()
}

fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Metrics are recorded in the logging phase, after the response went out: poll until the
/// expected value shows up (bounded), then assert it exactly.
async fn assert_metric(gw: &Gateway, name: &str, labels: &[(&str, &str)], expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric_value(&metrics(gw).await, name, labels);
        if v == expected || Instant::now() > deadline {
            assert_eq!(v, expected, "{name}{labels:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_through_all_three_model_forms() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    for (model, config) in [("@fast", true), ("gpt-4o-mini", false), ("openai/gpt-4o-mini", false)] {
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"temperature":0.70,"mlx:tags":{{"team":"ml"}},"mlx:end_user":"u-1","seed":7}}"#
        );
        let resp = post(&gw, Some(KEY), body.as_bytes()).await;
        assert_eq!(resp.status, 200, "{model}: {}", resp.text());
        request_id(&resp);
        assert_eq!(resp.header("x-modelux-provider-used"), Some("openai"));
        assert_eq!(resp.header("x-modelux-model-used"), Some("gpt-4o-mini"));
        assert_eq!(resp.header("x-modelux-routing-config").is_some(), config);
        let v = resp.json().unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o-mini");
        assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("tok0"));
        let seen = upstream.requests().pop().unwrap();
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("POST", "/v1/chat/completions"));
        assert_eq!(seen.header("authorization"), Some("Bearer sk-test-upstream"));
        // model rewritten, mlx:* stripped, every other byte (order, 0.70) unchanged
        assert_eq!(
            String::from_utf8(seen.body).unwrap(),
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":0.70,"seed":7}"#
        );
    }
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.header("x-modelux-routing-config"), Some("@fast"));
    assert_eq!(resp.header("x-modelux-config-version"), Some("v1"));
    // the /v1 alias behaves the same
    let resp = httpc::request(
        gw.proxy,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {KEY}")), ("content-type", "application/json")],
        &chat_body("local/m1"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-modelux-provider-used"), Some("local"));
    assert_eq!(resp.header("x-modelux-model-used"), Some("m1"));
    // the local provider has no api_key: no Authorization goes upstream
    assert_eq!(upstream.requests().pop().unwrap().header("authorization"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_project_isolation() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    for key in [None, Some("mlx_sk_wrong_0123456789abcdef"), Some(ADMIN_KEY)] {
        let resp = post(&gw, key, &chat_body("@fast")).await;
        assert_eq!(resp.status, 401, "{key:?}");
        request_id(&resp);
        let e = error_of(&resp);
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("authentication_error"), Some("invalid_api_key"))
        );
    }
    // a key may only call its own project's routing configs
    let resp = post(&gw, Some(OTHER_KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 404);
    assert_eq!(error_of(&resp)["code"], "routing_config_not_found");
    let resp = post(&gw, Some(OTHER_KEY), &chat_body("@theirs")).await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.request_count(), 1);
    assert_metric(&gw, "modelux_errors_total", &[("code", "invalid_api_key")], 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_is_counted() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let cases: Vec<(&[u8], u16, &str, &str)> = vec![
        (b"{\"model\": ", 400, "invalid_json", "not valid JSON"),
        (b"[]", 400, "invalid_json", "JSON object"),
        (br#"{"messages":[]}"#, 400, "missing_field", "Missing required field: model"),
        (br#"{"model":"gpt-4o"}"#, 400, "missing_field", "Missing required field: messages"),
        (
            br#"{"model":"llama-3","messages":[]}"#,
            400,
            "invalid_request",
            "Recognized prefixes: gpt-*, o1*, o3*, o4*, text-embedding-*, claude-*, gemini-*",
        ),
        (br#"{"model":"claude-sonnet-4-5","messages":[]}"#, 400, "invalid_request", "'anthropic'"),
        (br#"{"model":"@nope","messages":[]}"#, 404, "routing_config_not_found", "@nope"),
    ];
    for (body, status, code, message) in cases {
        let resp = post(&gw, Some(KEY), body).await;
        assert_eq!(resp.status, status, "{}: {}", String::from_utf8_lossy(body), resp.text());
        request_id(&resp);
        let e = error_of(&resp);
        assert_eq!(e["code"], code);
        assert!(e["message"].as_str().unwrap().contains(message), "{e}");
    }
    let auth = format!("Bearer {KEY}");
    let resp = httpc::request(
        gw.proxy,
        "POST",
        CHAT,
        &[("authorization", &auth), ("content-type", "text/plain")],
        &chat_body("@fast"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 415);
    assert_eq!(error_of(&resp)["code"], "unsupported_media_type");
    let resp = httpc::request(gw.proxy, "GET", CHAT, &[("authorization", &auth)], b"").await.unwrap();
    assert_eq!((resp.status, resp.header("allow")), (405, Some("POST")));
    let resp = httpc::request(gw.proxy, "POST", "/openai/v1/nope", &[("authorization", &auth)], b"{}")
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
    assert_eq!(error_of(&resp)["code"], "not_found");
    assert_eq!(upstream.request_count(), 0, "nothing invalid reaches the upstream");
    assert_metric(&gw, "modelux_errors_total", &[("code", "invalid_json")], 2.0).await;
    assert_metric(&gw, "modelux_errors_total", &[("code", "missing_field")], 2.0).await;
    assert_metric(&gw, "modelux_errors_total", &[("code", "unsupported_media_type")], 1.0).await;
    assert_metric(&gw, "modelux_requests_total", &[("status", "400")], 6.0).await;
    // the gateway still serves after all that
    assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_chunks_reach_the_client_before_the_next_exists() {
    let inter_token = Duration::from_millis(300);
    let upstream = mock(MockConfig { tokens: 4, inter_token, ..MockConfig::default() }).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let body = serde_json::to_vec(
        &json!({"model": "@fast", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .unwrap();
    let auth = format!("Bearer {KEY}");
    let mut conn = Conn::connect(gw.proxy).await.unwrap();
    let sent = Instant::now();
    let mut resp = conn
        .request_streaming(
            "POST",
            CHAT,
            &[("authorization", &auth), ("content-type", "application/json")],
            &body,
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.header("content-type").unwrap().starts_with("text/event-stream"));
    assert_eq!(resp.header("x-modelux-model-used"), Some("gpt-4o-mini"));
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = resp.next_chunk().await.unwrap() {
        let s = String::from_utf8(chunk.to_vec()).unwrap();
        for token in ["tok0", "tok1", "tok2", "tok3"] {
            if s.contains(token) {
                arrivals.push((token, sent.elapsed()));
            }
        }
        text.push_str(&s);
    }
    assert_eq!(arrivals.len(), 4, "{text}");
    // tok1 is generated inter_token after tok0: tok0 must be at the client before that.
    assert!(arrivals[0].1 < inter_token, "first token arrived after {:?}", arrivals[0].1);
    for pair in arrivals.windows(2) {
        assert!(pair[1].1 - pair[0].1 > inter_token / 2, "chunks were batched: {arrivals:?}");
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(text.matches("data: ").count(), 7, "role + 4 tokens + finish + [DONE]: {text}");
}

/// SIGTERM to the real binary while a stream is running: the listener stops accepting at
/// once, the stream runs to its end, and the process exits as soon as it has (well inside
/// the 30 s default grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_stream_finish_then_exits() {
    let inter_token = Duration::from_millis(150);
    let upstream = mock(MockConfig { tokens: 12, inter_token, ..MockConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, manage) = (free_port(), free_port());
    let url = upstream.base_url();
    let config = dir.path().join("modelux.yaml");
    std::fs::write(&config, render(&Cfg::new(&url), proxy, manage)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_modelux"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let proxy = SocketAddr::from(([127, 0, 0, 1], proxy));
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(proxy).await.is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = serde_json::to_vec(
        &json!({"model": "@fast", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .unwrap();
    let auth = format!("Bearer {KEY}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let mut resp = httpc::request_streaming(proxy, "POST", CHAT, &headers, &body).await.unwrap();
    assert_eq!(resp.status, 200);
    let mut text = String::from_utf8(resp.next_chunk().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(!text.contains("tok11"), "the stream is still running: {text}");

    let signalled = Instant::now();
    let status =
        std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    // New connections are refused while the stream goes on.
    let refused_by = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(proxy).await.is_ok() {
        assert!(Instant::now() < refused_by, "the listener still accepts after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "exited with a stream in flight");
    while let Some(chunk) = resp.next_chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let ended = signalled.elapsed();
    assert!(text.contains("tok11") && text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(ended > inter_token * 4, "the stream ran on after SIGTERM ({ended:?})");
    let exit_by = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < exit_by, "did not exit after the last stream ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "waited out the grace period");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_body_reaches_the_upstream_intact() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    // not a repeating pattern: a shifted or truncated copy would not compare equal
    let content: String =
        (0..10 * 1024 * 1024 / 8).map(|i: u32| format!("{:07x} ", i.wrapping_mul(2654435761))).collect();
    let body =
        serde_json::to_vec(&json!({"model": "@fast", "messages": [{"role": "user", "content": content}]}))
            .unwrap();
    assert!(body.len() > 10 * 1024 * 1024);
    let resp = post(&gw, Some(KEY), &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = upstream.requests().pop().unwrap();
    let expected = String::from_utf8(body).unwrap().replacen("\"@fast\"", "\"gpt-4o-mini\"", 1);
    assert_eq!(seen.body.len(), expected.len());
    assert!(seen.body == expected.as_bytes(), "body changed on the way");
    assert_eq!(seen.header("content-length"), Some(expected.len().to_string().as_str()));
}

/// ARCHITECTURE.md §2: a multi-megabyte body through a translated route (OpenAI client,
/// Anthropic upstreams) and a fallback (the first upstream answers 503), arriving intact
/// at the second provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_mib_body_is_translated_and_falls_over_intact() {
    let first = mock(MockConfig::default()).await;
    let second = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let openai = mock(MockConfig::default()).await;
    let (a, b, o) = (first.anthropic_base_url(), second.anthropic_base_url(), openai.base_url());
    let mut cfg = Cfg { anthropic: Some(&a), ..Cfg::new(&o) };
    cfg.more_providers =
        format!("  - {{ id: anthropic2, kind: anthropic, base_url: \"{b}\", api_key: \"sk-ant-second\" }}\n");
    cfg.more_configs = "  big: { project: default, strategy: fallback, retry_on: [\"5xx\"], attempts: [\"anthropic/claude-sonnet-4-5\", \"anthropic2/claude-sonnet-4-5\"] }\n".into();
    let gw = start(cfg).await;
    // Not a repeating pattern, and with characters JSON escapes, so a cut, shifted or
    // re-escaped copy would not compare equal.
    let content: String = (0..6 * 1024 * 1024 / 16)
        .map(|i: u32| format!("{:07x} \"é\\\n\t✓ ", i.wrapping_mul(2654435761)))
        .collect();
    let system = "Be terse.";
    let body = serde_json::to_vec(&json!({"model": "@big", "max_tokens": 7, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": content}]}))
    .unwrap();
    assert!(body.len() > 6 * 1024 * 1024);
    first.push_script([Behavior::Status(503)]);
    let resp = post(&gw, Some(KEY), &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-modelux-provider-used"), Some("anthropic2"));
    assert_eq!(resp.header("x-modelux-attempts"), Some("2"));
    assert_eq!(resp.json().unwrap()["choices"][0]["message"]["content"], " tok0 tok1");
    for (upstream, key) in [(&first, "sk-ant-test"), (&second, "sk-ant-second")] {
        let seen = upstream.requests().pop().unwrap();
        assert_eq!(seen.path, "/v1/messages");
        assert_eq!(seen.header("x-api-key"), Some(key));
        assert_eq!(seen.header("content-length"), Some(seen.body.len().to_string().as_str()));
        let sent = seen.json().unwrap();
        assert_eq!(sent["model"], "claude-sonnet-4-5");
        assert_eq!(sent["max_tokens"], 7);
        assert_eq!(sent["system"][0]["text"], system);
        let got = match &sent["messages"][0]["content"] {
            Value::String(s) => s.clone(),
            parts => parts[0]["text"].as_str().unwrap().to_string(),
        };
        assert_eq!(got.len(), content.len());
        assert!(got == content, "the content changed on the way");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg { server_extra: "  max_body_bytes: 1048576", ..Cfg::new(&upstream.base_url()) }).await;
    let content = "a".repeat(2 * 1024 * 1024);
    let body =
        serde_json::to_vec(&json!({"model": "@fast", "messages": [{"role": "user", "content": content}]}))
            .unwrap();
    let resp = post(&gw, Some(KEY), &body).await;
    assert_eq!(resp.status, 413);
    request_id(&resp);
    let e = error_of(&resp);
    assert_eq!(e["code"], "request_too_large");
    assert!(e["message"].as_str().unwrap().contains("1048576"));
    // chunked bodies have no declared length: the limit applies while reading
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 256 * 1024];
    for _ in 0..6 {
        let framed =
            [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk.clone(), b"\r\n".to_vec()].concat();
        if s.write_all(&framed).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request_too_large"), "{text}");
    assert_eq!(upstream.request_count(), 0);
    assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_body_times_out_with_408() {
    let upstream = mock(MockConfig::default()).await;
    let gw =
        start(Cfg { server_extra: "  client_body_timeout_ms: 300", ..Cfg::new(&upstream.base_url()) }).await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("gateway hung")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert!(text.to_ascii_lowercase().contains("x-modelux-request-id"), "{text}");
    assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
    assert_metric(&gw, "modelux_errors_total", &[("code", "request_timeout")], 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_statuses_are_mapped() {
    let upstream = mock(MockConfig {
        script: vec![
            Behavior::Status(500),
            Behavior::Status(429),
            Behavior::Status(400),
            Behavior::Status(401),
        ],
        ..MockConfig::default()
    })
    .await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 502);
    request_id(&resp);
    let e = error_of(&resp);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("upstream_error"), Some("upstream_error")));
    assert!(e["message"].as_str().unwrap().contains("returned 500"), "{e}");
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 429, "upstream 429 passes through");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(error_of(&resp)["type"], "requests");
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 400, "upstream 400 passes through with its body");
    assert_eq!(error_of(&resp)["type"], "invalid_request_error");
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 502);
    assert_eq!(error_of(&resp)["code"], "provider_auth_failed");
    assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_hanging_and_resetting_upstreams() {
    let hanging = mock(MockConfig { script: vec![Behavior::Hang], ..MockConfig::default() }).await;
    let resetting =
        mock(MockConfig { script: vec![Behavior::ResetBeforeHeaders], ..MockConfig::default() }).await;
    let closed = format!("http://127.0.0.1:{}/v1", free_port());
    let gw = start(Cfg {
        local: Some(&resetting.base_url()),
        server_extra: "  upstream_timeout_ms: 400",
        ..Cfg::new(&hanging.base_url())
    })
    .await;
    let started = Instant::now();
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(error_of(&resp)["code"], "upstream_timeout");
    let resp = post(&gw, Some(KEY), &chat_body("local/m1")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(error_of(&resp)["code"], "upstream_unavailable");
    drop(gw);
    let gw = start(Cfg::new(&closed)).await;
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 502);
    assert_eq!(error_of(&resp)["code"], "upstream_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_stream_ends_the_stream_cleanly() {
    let upstream = mock(MockConfig {
        script: vec![Behavior::ResetMidStream { after_chunks: 3 }],
        ..MockConfig::default()
    })
    .await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let body = serde_json::to_vec(&json!({"model": "@fast", "stream": true, "messages": []})).unwrap();
    let mut conn = Conn::connect(gw.proxy).await.unwrap();
    let auth = format!("Bearer {KEY}");
    let mut resp = conn
        .request_streaming(
            "POST",
            CHAT,
            &[("authorization", &auth), ("content-type", "application/json")],
            &body,
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    // collect() fails on a broken chunked framing: a clean end is part of the contract
    let text = String::from_utf8(resp.collect().await.expect("stream must terminate cleanly")).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert_eq!(events.len(), 4, "{text}");
    let last: Value = serde_json::from_str(events[3].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error");
    // the same client connection stays usable
    let resp = conn
        .request(
            "POST",
            CHAT,
            &[("authorization", &auth), ("content-type", "application/json")],
            &chat_body("@fast"),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_metric(&gw, "modelux_errors_total", &[("code", "upstream_stream_error")], 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_metrics_health_and_management_auth() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let auth = format!("Bearer {KEY}");
    let resp =
        httpc::request(gw.proxy, "GET", "/openai/v1/models", &[("authorization", &auth)], b"").await.unwrap();
    assert_eq!(resp.status, 200);
    let ids: Vec<String> = resp.json().unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(ids, vec!["@fast", "local/m1"]);
    assert_eq!(httpc::request(gw.proxy, "GET", "/v1/models", &[], b"").await.unwrap().status, 401);

    for _ in 0..20 {
        assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
    }
    let m = metrics(&gw).await;
    for family in [
        "modelux_requests_total",
        "modelux_request_duration_seconds_bucket",
        "modelux_upstream_duration_seconds_bucket",
        "modelux_gateway_overhead_seconds_bucket",
        "modelux_upstream_ttfb_seconds_bucket",
        "modelux_requests_in_flight",
        "modelux_request_bytes_total",
        "modelux_response_bytes_total",
    ] {
        assert!(m.contains(family), "{family} missing from /metrics");
    }
    let ok = [("surface", "openai"), ("provider", "openai"), ("model", "gpt-4o-mini"), ("status", "200")];
    assert_metric(&gw, "modelux_requests_total", &ok, 20.0).await;
    assert_metric(&gw, "modelux_requests_in_flight", &[], 0.0).await;
    // upstream connections are pooled: 20 requests, (nearly) all on reused connections
    assert!(metric_value(&m, "modelux_upstream_connections_reused_total", &[]) >= 18.0, "{m}");

    assert_eq!(httpc::request(gw.manage, "GET", "/healthz", &[], b"").await.unwrap().status, 200);
    let ready = httpc::request(gw.manage, "GET", "/readyz", &[], b"").await.unwrap();
    assert_eq!(ready.json().unwrap()["config_generation"], 1);
    let admin = format!("Bearer {ADMIN_KEY}");
    for (key, status) in [(None, 401), (Some(auth.as_str()), 401), (Some(admin.as_str()), 404)] {
        let headers: Vec<(&str, &str)> = key.map(|k| vec![("authorization", k)]).unwrap_or_default();
        let resp = httpc::request(gw.manage, "GET", "/manage/v1/anything", &headers, b"").await.unwrap();
        assert_eq!(resp.status, status, "{key:?}");
        error_of(&resp);
    }
}

fn write_config_atomically(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for_generation(handles: &Handles, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while handles.store.load().generation < generation {
        assert!(Instant::now() < deadline, "reload to generation {generation} did not happen");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_reloads_under_load_fail_no_request() {
    let upstream = mock(MockConfig { record: false, ..MockConfig::default() }).await;
    let base = upstream.base_url();
    let gw = start(Cfg::new(&base)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, proxy) = (stop.clone(), ok.clone(), failed.clone(), gw.proxy);
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::connect(proxy).await.unwrap();
            let auth = format!("Bearer {KEY}");
            let body = chat_body("@fast");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = conn
                    .request(
                        "POST",
                        CHAT,
                        &[("authorization", &auth), ("content-type", "application/json")],
                        &body,
                    )
                    .await;
                match r {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let (proxy_port, manage_port) = (gw.proxy.port(), gw.manage.port());
    for i in 0..20u64 {
        let model = if i % 2 == 0 { "openai/gpt-4.1-mini" } else { "gpt-4o-mini" };
        let text = render(&Cfg { fast_model: model, ..Cfg::new(&base) }, proxy_port, manage_port);
        write_config_atomically(&gw.config_path, &text);
        wait_for_generation(&gw.handles, i + 2).await;
    }
    // an invalid file is rejected and the last good snapshot keeps serving
    write_config_atomically(&gw.config_path, "server:\n  bogus: true\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(&metrics(&gw).await, "modelux_config_reloads_total", &[("result", "error")]) < 1.0 {
        assert!(Instant::now() < deadline, "invalid config was never looked at");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.handles.store.load().generation, 21);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} requests failed across reloads ({ok} succeeded)");
    assert!(ok > 100, "too little load to prove anything: {ok}");
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 200);
    // 20 changes of the definition → version 21; the last good config routes to gpt-4o-mini
    assert_eq!(resp.header("x-modelux-config-version"), Some("v21"));
    assert_eq!(resp.header("x-modelux-model-used"), Some("gpt-4o-mini"));
    assert_metric(&gw, "modelux_config_reloads_total", &[("result", "ok")], 20.0).await;
}

/// A TLS front for a plain mock: terminates TLS with `leaf`, relays bytes to `backend`.
async fn tls_front(backend: SocketAddr, leaf: &rcgen::Certificate, leaf_key: &rcgen::KeyPair) -> SocketAddr {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key.into())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    if let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_verified_against_a_pinned_ca() {
    let upstream = mock(MockConfig::default()).await;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "modelux test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let front = tls_front(upstream.addr(), &leaf, &leaf_key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let base = format!("https://127.0.0.1:{}/v1", front.port());
    let extra = format!(", tls_ca_file: \"{}\"", ca_file.display());

    let gw = start(Cfg { openai_extra: &extra, ..Cfg::new(&base) }).await;
    for stream in [false, true] {
        let body = serde_json::to_vec(&json!({"model": "@fast", "stream": stream, "messages": []})).unwrap();
        let resp = post(&gw, Some(KEY), &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert!(resp.text().contains("tok15"), "{}", resp.text());
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("host"), Some(format!("127.0.0.1:{}", front.port()).as_str()));
    drop(gw);

    // Without the pinned CA the system roots apply and the private certificate is refused.
    let gw = start(Cfg::new(&base)).await;
    let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(error_of(&resp)["code"], "upstream_unavailable");
    assert_eq!(upstream.request_count(), 2, "nothing reached the upstream over an unverified connection");
}

#[test]
fn config_errors_name_their_paths() {
    let sample = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/modelux.yaml")).unwrap();
    let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-x".to_string());
    let snapshot = modelux::config::build_snapshot(&sample, &env, None).expect("the shipped config is valid");
    assert_eq!(snapshot.routing_configs["fast"].version, 1);

    let check = |text: &str| -> Vec<String> {
        modelux::config::build_snapshot(text, &env, None)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let edited = sample.replace("model: \"gpt-4o-mini\"", "model: \"antropic/claude-3\"");
    assert_eq!(
        check(&edited),
        vec!["routing_configs.fast.model: unknown provider 'antropic' in model 'antropic/claude-3'; configured providers: anthropic, local, openai"]
    );
    let edited = sample
        .replace("    kind: openai\n", "    kind: openai\n    tls_ca_file: \"/nonexistent/ca.pem\"\n")
        .replace("strategy: single\n    model: \"local/mock-model\"", "strategy: round_robin")
        .replace("  proxy_listen: \"127.0.0.1:8080\"", "  proxy_listen: \"127.0.0.1:8080\"\n  colour: blue");
    let errors = check(&edited);
    assert_eq!(errors.len(), 1, "structural errors are reported first: {errors:?}");
    assert!(errors[0].starts_with("server.colour: unknown field `colour`"), "{errors:?}");
    let edited = edited.replace("\n  colour: blue", "");
    assert_eq!(
        check(&edited),
        vec![
            "providers[0].tls_ca_file: cannot read \"/nonexistent/ca.pem\": No such file or directory (os error 2)",
            "routing_configs.local.strategy: unknown strategy \"round_robin\" (supported: single, fallback (fallback_chain), cost_optimized, latency_optimized, ensemble, ab_test, cascade, custom_rules)",
        ]
    );
    let errors =
        check("projects:\n  - id: p\n    keys:\n      - { name: k, key: \"${MODELUX_UNSET_FOR_TEST}\" }\n");
    assert_eq!(
        errors,
        vec!["projects[0].keys[0].key: environment variable MODELUX_UNSET_FOR_TEST is not set"]
    );
}

/// A management GET with the admin key.
async fn manage_get(gw: &Gateway, path: &str) -> Response {
    let auth = format!("Bearer {ADMIN_KEY}");
    httpc::request(gw.manage, "GET", path, &[("authorization", auth.as_str())], b"").await.unwrap()
}

/// Polls the logs API until `request_id` is stored (records are written asynchronously).
async fn wait_for_log(gw: &Gateway, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = manage_get(gw, &format!("/manage/v1/logs/{request_id}")).await;
        if resp.status == 200 {
            return resp.json().unwrap()["data"].clone();
        }
        assert_eq!(resp.status, 404, "{}", resp.text());
        assert!(Instant::now() < deadline, "request {request_id} never reached the trace store");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[path = "gateway/byok.rs"]
mod byok;
#[path = "gateway/cache.rs"]
mod cache;
#[path = "gateway/clickhouse.rs"]
mod clickhouse;
#[path = "gateway/fuzz.rs"]
mod fuzz;
#[path = "gateway/hostile.rs"]
mod hostile;
#[path = "gateway/manage.rs"]
mod manage;
#[path = "gateway/nodes.rs"]
mod nodes;
#[path = "gateway/pg.rs"]
mod pg;
#[path = "gateway/redis.rs"]
mod redis;
#[path = "gateway/replay.rs"]
mod replay;
#[path = "gateway/responses.rs"]
mod responses;
#[path = "gateway/routing.rs"]
mod routing;
#[path = "gateway/spend.rs"]
mod spend;
#[path = "gateway/traces.rs"]
mod traces;
#[path = "gateway/traces_clickhouse.rs"]
mod traces_clickhouse;
#[path = "gateway/webhooks.rs"]
mod webhooks;

// ------------------------------------------------------------------ translation

async fn post_to(gw: &Gateway, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    httpc::request(gw.proxy, "POST", path, &h, &serde_json::to_vec(body).unwrap()).await.unwrap()
}

fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d.to_string();
                }
            }
            (name, if data == "[DONE]" { Value::Null } else { serde_json::from_str(&data).unwrap() })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_reaches_an_anthropic_provider() {
    let anthropic = mock(MockConfig { tokens: 3, ..MockConfig::default() }).await;
    let openai = mock(MockConfig::default()).await;
    let base = anthropic.anthropic_base_url();
    let gw = start(Cfg { anthropic: Some(&base), ..Cfg::new(&openai.base_url()) }).await;
    let auth = format!("Bearer {KEY}");
    let body = json!({"model": "claude-sonnet-4-5", "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}], "mlx:end_user": "u1"});
    let resp = post_to(&gw, CHAT, &[("authorization", &auth)], &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-modelux-provider-used"), Some("anthropic"));
    let v = resp.json().unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], " tok0 tok1 tok2");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let seen = anthropic.requests().pop().unwrap();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-test"));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(seen.header("authorization"), None);
    let sent = seen.json().unwrap();
    assert_eq!(sent["model"], "claude-sonnet-4-5");
    assert_eq!(sent["system"][0]["text"], "Be terse.");
    assert_eq!(sent["max_tokens"], 4096);
    assert!(sent.get("mlx:end_user").is_none());

    // streamed, with and without the usage chunk
    for include_usage in [false, true] {
        let mut body = body.clone();
        body["stream"] = true.into();
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp = post_to(&gw, CHAT, &[("authorization", &auth)], &body).await;
        assert_eq!(resp.status, 200);
        assert!(resp.header("content-type").unwrap().starts_with("text/event-stream"));
        let events = sse_events(&resp.text());
        assert_eq!(events.last().unwrap().1, Value::Null, "ends with [DONE]");
        let chunks: Vec<&Value> = events.iter().map(|(_, v)| v).filter(|v| !v.is_null()).collect();
        let text: String =
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, " tok0 tok1 tok2");
        assert_eq!(chunks.iter().filter(|c| c["usage"].is_object()).count(), usize::from(include_usage));
    }

    // tools: the Anthropic tool_use comes back as an OpenAI tool call
    let body = json!({"model": "anthropic/claude-haiku-4-5", "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]});
    let v = post_to(&gw, CHAT, &[("authorization", &auth)], &body).await.json().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "lookup");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"query": "mock"})
    );

    // upstream errors arrive in the client's (OpenAI) envelope
    anthropic.push_script([Behavior::Status(429), Behavior::Status(529), Behavior::Status(400)]);
    let simple = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]});
    let r = post_to(&gw, CHAT, &[("authorization", &auth)], &simple).await;
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    assert_eq!(error_of(&r)["type"], "rate_limit_error");
    let r = post_to(&gw, CHAT, &[("authorization", &auth)], &simple).await;
    assert_eq!(r.status, 502);
    assert_eq!(error_of(&r)["code"], "upstream_error");
    let r = post_to(&gw, CHAT, &[("authorization", &auth)], &simple).await;
    assert_eq!(r.status, 400);
    assert!(error_of(&r)["message"].is_string());
}

/// A same-format hop keeps every field the client sent even where the answer goes through
/// the codecs: a stream that carries the decision trace, and a cascade step judged whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_format_hops_keep_every_field_on_the_translating_path() {
    let anthropic = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let openai = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let (base, openai_url) = (anthropic.anthropic_base_url(), openai.base_url());
    let mut cfg = Cfg { anthropic: Some(&base), ..Cfg::new(&openai_url) };
    cfg.more_configs = "  steps: { project: default, strategy: cascade, steps: [ { model: \"anthropic/claude-haiku-4-5\", accept: { min_output_tokens: 1 } }, { model: \"anthropic/claude-sonnet-4-5\" } ] }\n  \
                        osteps: { project: default, strategy: cascade, steps: [ { model: \"openai/gpt-4o-mini\", accept: { min_output_tokens: 1 } }, { model: \"openai/gpt-4o\" } ] }\n"
        .into();
    let gw = start(cfg).await;
    let msgs = "/anthropic/v1/messages";
    let key = [("x-api-key", KEY), ("anthropic-version", "2023-06-01")];

    // Anthropic client, Anthropic provider, streamed with the trace spliced in.
    let body = json!({"model": "anthropic/claude-haiku-4-5", "max_tokens": 50, "top_k": 7, "stream": true,
        "mlx:trace": true, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_to(&gw, msgs, &key, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("mlx:trace"), "{}", r.text());
    let sent = anthropic.requests().pop().unwrap().json().unwrap();
    assert_eq!(sent["top_k"], 7, "{sent}");
    assert_eq!(sent["stream"], true);
    assert!(sent.get("mlx:trace").is_none(), "{sent}");

    // A cascade step judged whole, for a client that asked for a stream.
    let mut body = body.clone();
    body["model"] = "@steps".into();
    body.as_object_mut().unwrap().remove("mlx:trace");
    let r = post_to(&gw, msgs, &key, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let names: Vec<String> = sse_events(&r.text()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"), "{names:?}");
    assert_eq!(names.last().map(String::as_str), Some("message_stop"), "{names:?}");
    let sent = anthropic.requests().pop().unwrap().json().unwrap();
    assert_eq!(sent["top_k"], 7, "{sent}");
    assert_eq!(sent["model"], "claude-haiku-4-5");
    assert!(sent.get("stream").is_none(), "asked for whole: {sent}");

    // The same on the OpenAI surface: `logit_bias` and `seed` arrive, `stream_options` goes.
    let auth = format!("Bearer {KEY}");
    let body = json!({"model": "@osteps", "stream": true, "stream_options": {"include_usage": true},
        "logit_bias": {"50256": -100}, "seed": 11, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_to(&gw, CHAT, &[("authorization", &auth)], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let chunks: Vec<Value> =
        sse_events(&r.text()).into_iter().map(|(_, v)| v).filter(|v| !v.is_null()).collect();
    assert_eq!(chunks.iter().filter(|c| c["usage"].is_object()).count(), 1, "the client asked for usage");
    let sent = openai.requests().pop().unwrap().json().unwrap();
    assert_eq!((sent["logit_bias"].clone(), sent["seed"].clone()), (json!({"50256": -100}), json!(11)));
    assert!(sent.get("stream").is_none() && sent.get("stream_options").is_none(), "{sent}");
    let mut body = body.clone();
    body["model"] = "gpt-4o-mini".into();
    body["mlx:trace"] = true.into();
    let r = post_to(&gw, CHAT, &[("authorization", &auth)], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = openai.requests().pop().unwrap().json().unwrap();
    assert_eq!(sent["logit_bias"], json!({"50256": -100}), "{sent}");
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_surface_to_openai_and_to_anthropic() {
    let anthropic = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let openai = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let base = anthropic.anthropic_base_url();
    let gw = start(Cfg { anthropic: Some(&base), ..Cfg::new(&openai.base_url()) }).await;
    let msgs = "/anthropic/v1/messages";
    let key = [("x-api-key", KEY), ("anthropic-version", "2023-06-01")];

    // no key: Anthropic-shaped 401
    let r = post_to(&gw, msgs, &[], &json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": []})).await;
    assert_eq!(r.status, 401);
    let v = r.json().unwrap();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("authentication_error"))
    );
    request_id(&r);

    // Anthropic client → OpenAI provider, plain and streamed
    let body = json!({"model": "@fast", "max_tokens": 50, "system": "Be terse.",
        "messages": [{"role": "user", "content": "hi"}]});
    let r = post_to(&gw, msgs, &key, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!((v["type"].as_str(), v["role"].as_str()), (Some("message"), Some("assistant")));
    assert_eq!(v["content"][0], json!({"type": "text", "text": " tok0 tok1"}));
    assert_eq!(v["stop_reason"], "end_turn");
    let seen = openai.requests().pop().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.header("anthropic-version"), None);
    let sent = seen.json().unwrap();
    assert_eq!(sent["messages"][0], json!({"role": "system", "content": "Be terse."}));
    assert_eq!(sent["max_tokens"], 50);

    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let r = post_to(&gw, msgs, &key, &streamed).await;
    assert_eq!(r.status, 200);
    let events = sse_events(&r.text());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(events[5].1["usage"]["input_tokens"].as_u64().unwrap() > 0, "input tokens in message_delta");
    assert_eq!(events[5].1["usage"]["output_tokens"], 2);
    // the gateway asked the OpenAI upstream for usage
    assert_eq!(
        openai.requests().pop().unwrap().json().unwrap()["stream_options"],
        json!({"include_usage": true})
    );

    // Anthropic client → Anthropic provider: bytes pass through, headers forwarded verbatim
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
        "mlx:tags": {"team": "ml"}, "metadata": {"user_id": "u-1"}});
    let beta =
        [("x-api-key", KEY), ("anthropic-version", "2023-06-01"), ("anthropic-beta", "files-api-2025-04-14")];
    let raw = r#"{"model":"claude-sonnet-4-5","max_tokens":50,"mlx:tags":{"team":"ml"},"messages":[{"role":"user","content":"hi"}],"metadata":{"user_id":"u-1"}}"#;
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(&beta);
    let r = httpc::request(gw.proxy, "POST", msgs, &h, raw.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap()["content"][0]["text"], " tok0 tok1");
    let seen = anthropic.requests().pop().unwrap();
    assert_eq!(seen.header("anthropic-beta"), Some("files-api-2025-04-14"));
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-test"));
    assert_eq!(
        String::from_utf8(seen.body).unwrap(),
        r#"{"model":"claude-sonnet-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}],"metadata":{"user_id":"u-1"}}"#
    );

    // /v1/messages alias and Bearer auth
    let bearer = format!("Bearer {KEY}");
    let r = post_to(&gw, "/v1/messages", &[("authorization", &bearer)], &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap()["type"], "message");

    // ANTHROPIC_BASE_URL=<host>/v1 makes the SDK call /v1/v1/messages
    let r = post_to(&gw, "/v1/v1/messages", &key, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["type"], "message");

    // upstream 400 from the OpenAI provider, rendered Anthropic-style
    openai.push_script([Behavior::Status(400)]);
    let r = post_to(
        &gw,
        msgs,
        &key,
        &json!({"model": "@fast", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json().unwrap()["error"]["type"], "invalid_request_error");

    // count_tokens: forwarded to Anthropic, estimated for others
    let count = "/anthropic/v1/messages/count_tokens";
    let r = post_to(
        &gw,
        count,
        &key,
        &json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hello there"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().unwrap()["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(anthropic.requests().pop().unwrap().path, "/v1/messages/count_tokens");
    let r = post_to(
        &gw,
        count,
        &key,
        &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "abcdefgh"}]}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-modelux-token-count"), Some("estimated"));
    assert_eq!(r.json().unwrap()["input_tokens"], 2);

    // models, Anthropic-shaped
    let r = httpc::request(gw.proxy, "GET", "/anthropic/v1/models", &key, b"").await.unwrap();
    let v = r.json().unwrap();
    assert_eq!(
        v["data"][0],
        json!({"type": "model", "id": "@fast", "display_name": "@fast", "created_at": "1970-01-01T00:00:00Z"})
    );
    assert_eq!(v["has_more"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_deployments_and_embeddings() {
    let upstream = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let origin = format!("http://{}", upstream.addr());
    let gw = start(Cfg {
        more_providers: format!(
            "  - {{ id: azure, kind: azure, base_url: \"{origin}\", api_key: \"az-key\", api_version: \"2024-06-01\" }}\n"
        ),
        anthropic: Some(&upstream.anthropic_base_url()),
        ..Cfg::new(&upstream.base_url())
    })
    .await;
    let auth = format!("Bearer {KEY}");
    let h = [("authorization", auth.as_str())];

    // Azure: the model names the deployment; api-version and api-key, never a Bearer token
    let r = post_to(
        &gw,
        CHAT,
        &h,
        &json!({"model": "azure/prod-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["choices"][0]["message"]["content"], " tok0 tok1");
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.path, "/openai/deployments/prod-4o/chat/completions?api-version=2024-06-01");
    assert_eq!((seen.header("api-key"), seen.header("authorization")), (Some("az-key"), None));

    // embeddings, same format: the client's bytes with the model rewritten, mlx:* stripped
    let emb = "/openai/v1/embeddings";
    let raw = r#"{"input":["a","b"],"model":"text-embedding-3-small","encoding_format":"base64","mlx:tags":{"t":"1"},"dimensions":8}"#;
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(&h);
    let r = httpc::request(gw.proxy, "POST", emb, &headers, raw.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-modelux-provider-used"), Some("openai"));
    let v = r.json().unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert!(v["data"][0]["embedding"].is_string(), "base64 passes through: {v}");
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.path, "/v1/embeddings");
    assert_eq!(
        String::from_utf8(seen.body).unwrap(),
        r#"{"input":["a","b"],"model":"text-embedding-3-small","encoding_format":"base64","dimensions":8}"#
    );
    let r = post_to(&gw, "/v1/embeddings", &h, &json!({"model": "azure/emb", "input": "x"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        upstream.requests().pop().unwrap().path,
        "/openai/deployments/emb/embeddings?api-version=2024-06-01"
    );

    // bad input and a target without embeddings, as OpenAI errors
    let r = post_to(&gw, emb, &h, &json!({"model": "text-embedding-3-small"})).await;
    assert_eq!((r.status, error_of(&r)["code"].as_str()), (400, Some("missing_field")));
    let r = post_to(&gw, emb, &h, &json!({"model": "claude-sonnet-4-5", "input": "x"})).await;
    assert_eq!((r.status, error_of(&r)["code"].as_str()), (400, Some("unsupported_endpoint")));
    let r = httpc::request(gw.proxy, "GET", emb, &h, b"").await.unwrap();
    assert_eq!(r.status, 405);
}

/// Text of a client response, by surface: OpenAI message content or Anthropic text blocks.
fn reply_text(surface: &str, v: &Value) -> String {
    if surface == "openai" {
        v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string()
    } else {
        v["content"].as_array().unwrap().iter().filter_map(|b| b["text"].as_str()).collect()
    }
}

/// Text of a client stream, by surface, after checking it ended properly.
fn streamed_text(surface: &str, body: &str) -> String {
    let events = sse_events(body);
    if surface == "openai" {
        assert_eq!(events.last().unwrap().1, Value::Null, "ends with [DONE]: {body}");
        events.iter().filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str()).collect()
    } else {
        assert_eq!(events.last().unwrap().0, "message_stop", "{body}");
        events.iter().filter_map(|(_, v)| v["delta"]["text"].as_str()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_surfaces_reach_gemini_cohere_and_bedrock() {
    let upstream = mock(MockConfig { tokens: 2, ..MockConfig::default() }).await;
    let root = upstream.root_url();
    let gw = start(Cfg {
        more_providers: format!(
            "  - {{ id: google, kind: google, base_url: \"{}\", api_key: \"g-key\" }}\n\
             \x20 - {{ id: cohere, kind: cohere, base_url: \"{root}\", api_key: \"co-key\" }}\n\
             \x20 - {{ id: bedrock, kind: bedrock, base_url: \"{root}\", api_key: \"AKIDEXAMPLE::wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY::us-east-1\" }}\n",
            upstream.gemini_base_url()
        ),
        ..Cfg::new(&upstream.base_url())
    })
    .await;
    let bearer = format!("Bearer {KEY}");
    let targets = [
        ("google/gemini-2.5-flash", "/v1beta/models/gemini-2.5-flash:generateContent"),
        ("cohere/command-a-03-2025", "/v2/chat"),
        (
            "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
        ),
    ];
    for (model, upstream_path) in targets {
        for (surface, path) in [("openai", CHAT), ("anthropic", "/anthropic/v1/messages")] {
            let what = format!("{surface} → {model}");
            let h = [("authorization", bearer.as_str())];
            let body =
                json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]});
            let r = post_to(&gw, path, &h, &body).await;
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            let v = r.json().unwrap();
            assert_eq!(reply_text(surface, &v), " tok0 tok1", "{what}: {v}");
            let seen = upstream.requests().pop().unwrap();
            assert_eq!(seen.path, upstream_path, "{what}");
            match model.split('/').next().unwrap() {
                "google" => assert_eq!(seen.header("x-goog-api-key"), Some("g-key")),
                "cohere" => assert_eq!(seen.header("authorization"), Some("Bearer co-key")),
                _ => {
                    let auth = seen.header("authorization").unwrap();
                    assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{auth}");
                    assert!(auth.contains("/us-east-1/bedrock/aws4_request"), "{auth}");
                    assert!(seen.header("x-amz-date").is_some());
                }
            }

            // streamed
            let mut streamed = body.clone();
            streamed["stream"] = true.into();
            let r = post_to(&gw, path, &h, &streamed).await;
            assert_eq!(r.status, 200, "{what} stream: {}", r.text());
            assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
            assert_eq!(streamed_text(surface, &r.text()), " tok0 tok1", "{what} stream");

            // tools: the mock calls the first tool when asked about the weather
            let (tools, call_name) = if surface == "openai" {
                (
                    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]),
                    "get_weather",
                )
            } else {
                (
                    json!([{"name": "get_weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}]),
                    "get_weather",
                )
            };
            let ask = json!({"model": model, "max_tokens": 64, "tools": tools,
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}]});
            let v = post_to(&gw, path, &h, &ask).await.json().unwrap();
            let (id, name, args) = if surface == "openai" {
                assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{what}: {v}");
                let c = &v["choices"][0]["message"]["tool_calls"][0];
                let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
                (c["id"].as_str().unwrap().to_string(), c["function"]["name"].clone(), args)
            } else {
                assert_eq!(v["stop_reason"], "tool_use", "{what}: {v}");
                let b = v["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap();
                (b["id"].as_str().unwrap().to_string(), b["name"].clone(), b["input"].clone())
            };
            assert_eq!((name.as_str(), &args), (Some(call_name), &json!({"location": "Paris"})), "{what}");
            assert!(!id.is_empty(), "{what}: a tool call id, generated where the provider has none");
            // …and the result goes back
            let messages = if surface == "openai" {
                json!([{"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": id, "content": "18C"}])
            } else {
                json!([{"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": "get_weather", "input": {"location": "Paris"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "18C"}]}])
            };
            let round =
                json!({"model": model, "max_tokens": 64, "tools": ask["tools"], "messages": messages});
            let r = post_to(&gw, path, &h, &round).await;
            assert_eq!(r.status, 200, "{what} tool result: {}", r.text());
            assert!(upstream.requests().pop().unwrap().json().unwrap().to_string().contains("18C"), "{what}");

            // an upstream 429 keeps its status, in the client's envelope
            upstream.push_script([Behavior::Status(429)]);
            let r = post_to(&gw, path, &h, &body).await;
            assert_eq!(r.status, 429, "{what}: {}", r.text());
            let v = r.json().unwrap();
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
            if surface == "anthropic" {
                assert_eq!(v["type"], "error");
            }

            // a reset mid-stream ends the client stream with an error event in its format
            upstream.push_script([Behavior::ResetMidStream { after_chunks: 2 }]);
            let r = post_to(&gw, path, &h, &streamed).await;
            assert_eq!(r.status, 200);
            let events = sse_events(&r.text());
            let last = events.last().unwrap();
            if surface == "openai" {
                assert!(last.1["error"]["message"].is_string(), "{what}: {:?}", events);
            } else {
                assert_eq!(last.0, "error", "{what}: {:?}", events);
            }
        }
    }

    // embeddings to Google and Cohere, translated, base64 by default as the SDK asks
    for (model, dims) in [("google/text-embedding-004", 768usize), ("cohere/embed-v4.0", 0)] {
        let h = [("authorization", bearer.as_str())];
        let body = json!({"model": model, "input": ["a", "b", "c"], "encoding_format": "base64"});
        let r = post_to(&gw, "/openai/v1/embeddings", &h, &body).await;
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        let v = r.json().unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], model.split('/').nth(1).unwrap());
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3, "{model}");
        assert_eq!(data[2]["index"], 2);
        use base64::Engine as _;
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(data[0]["embedding"].as_str().unwrap()).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        if dims > 0 {
            assert_eq!(bytes.len(), dims * 4, "{model}");
        }
        let mut float = body.clone();
        float["encoding_format"] = "float".into();
        float["dimensions"] = 16.into();
        let v = post_to(&gw, "/openai/v1/embeddings", &h, &float).await.json().unwrap();
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 16, "{model}: {v}");
    }
    let r = post_to(
        &gw,
        "/openai/v1/embeddings",
        &[("authorization", bearer.as_str())],
        &json!({"model": "cohere/embed-v4.0", "input": [[1, 2, 3]]}),
    )
    .await;
    assert_eq!((r.status, error_of(&r)["code"].as_str()), (400, Some("invalid_type")));
}
