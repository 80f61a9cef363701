//! Hostile clients over raw sockets: header-unsafe values, pipelining, slow and idle
//! clients, and the connection cap.

use super::*;

/// Reads HTTP/1.1 responses (Content-Length framed) off `s` until `n` are complete or the
/// peer closes; each as (head, body).
async fn read_responses(s: &mut tokio::net::TcpStream, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() < end + 4 + len {
                break;
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            out.push((head, body));
        }
        if out.len() >= n {
            return out;
        }
        let mut chunk = [0u8; 8192];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

/// Whether the peer closes `s` within `within` (reading and discarding what arrives).
async fn closes_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn raw_post(path: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_unsafe_models_get_400_invalid_model_on_both_surfaces() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let long = "a".repeat(300);
    let models =
        ["local/mock\r\nX-Evil: 1", "gpt-4o-mini\u{1}", "local/m1\u{7f}", "local/m1\u{85}", long.as_str()];
    for model in models {
        let openai = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let anthropic =
            json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        for (path, body) in [(CHAT, openai), ("/anthropic/v1/messages", anthropic)] {
            let started = Instant::now();
            let resp = tokio::time::timeout(
                Duration::from_secs(3),
                httpc::request(
                    gw.proxy,
                    "POST",
                    path,
                    &[("content-type", "application/json"), ("authorization", &format!("Bearer {KEY}"))],
                    &serde_json::to_vec(&body).unwrap(),
                ),
            )
            .await
            .expect("the client got an answer")
            .unwrap();
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!(resp.status, 400, "{path} {model:?}: {}", resp.text());
            assert!(resp.header("x-evil").is_none());
            let v = resp.json().unwrap();
            if path == CHAT {
                assert_eq!(v["error"]["code"], "invalid_model", "{v}");
                assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            } else {
                assert_eq!(v["type"], "error", "{v}");
                assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            }
        }
    }
    // The connection is still good for the next request.
    assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
    // Printable non-ASCII is a name like any other: carried in the header as UTF-8.
    let resp = post(&gw, Some(KEY), &chat_body("local/modèle-ünïcode")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = post(&gw, Some(KEY), &chat_body("modèle-ünïcode")).await;
    assert_eq!(error_of(&resp)["code"], "invalid_request", "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg::new(&upstream.base_url())).await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    // Three requests in one write: a chat, a models list, a chat on another model.
    let body = |m: &str| {
        serde_json::to_string(&json!({"model": m, "messages": [{"role": "user", "content": "hi"}]})).unwrap()
    };
    let wire = format!(
        "{}GET /openai/v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\r\n{}",
        raw_post(CHAT, "", &body("@fast")),
        raw_post(CHAT, "", &body("local/m1"))
    );
    s.write_all(wire.as_bytes()).await.unwrap();
    let answers = read_responses(&mut s, 3).await;
    assert_eq!(answers.len(), 3, "{answers:?}");
    for (head, _) in &answers {
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let first: Value = serde_json::from_slice(&answers[0].1).unwrap();
    let second: Value = serde_json::from_slice(&answers[1].1).unwrap();
    let third: Value = serde_json::from_slice(&answers[2].1).unwrap();
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(second["object"], "list");
    assert!(answers[2].0.to_ascii_lowercase().contains("x-modelux-model-used: m1"), "{}", answers[2].0);
    assert_eq!(third["object"], "chat.completion");
    // The connection stays usable after the pipelined burst.
    s.write_all(raw_post(CHAT, "", &body("@fast")).as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut s, 1).await.len(), 1);

    // The management listener too.
    let mut m = tokio::net::TcpStream::connect(gw.manage).await.unwrap();
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nhost: x\r\n\r\n");
    m.write_all(format!("{}{}{}", get("/healthz"), get("/readyz"), get("/healthz")).as_bytes())
        .await
        .unwrap();
    let answers = read_responses(&mut m, 3).await;
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(String::from_utf8_lossy(&answers[1].1).contains("ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_idle_connections_and_trickled_bodies_are_cut_off() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg {
        server_extra:
            "  client_header_timeout_ms: 600\n  keepalive_timeout_seconds: 1\n  client_body_timeout_ms: 1500",
        ..Cfg::new(&upstream.base_url())
    })
    .await;

    // A head trickled a byte every 100 ms (each read well inside any per-read timeout).
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let started = Instant::now();
    let head = raw_post(CHAT, "", "{}");
    let mut closed = false;
    for b in head.as_bytes() {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        closed || closes_within(&mut s, Duration::from_millis(100)).await,
        "trickled head was not cut off"
    );
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    assert_metric(&gw, "modelux_client_timeouts_total", &[("listener", "proxy"), ("phase", "header")], 1.0)
        .await;

    // A connection that never sends anything is closed at the header deadline too.
    let mut quiet = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    assert!(closes_within(&mut quiet, Duration::from_millis(1500)).await);

    // An idle keep-alive connection is closed after keepalive_timeout_seconds.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(raw_post(CHAT, "", &String::from_utf8(chat_body("@fast")).unwrap()).as_bytes())
        .await
        .unwrap();
    let answers = read_responses(&mut s, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    assert!(closes_within(&mut s, Duration::from_secs(3)).await, "idle keep-alive connection kept open");
    assert!(idle.elapsed() >= Duration::from_millis(900), "{:?}", idle.elapsed());

    // A client asking for its own keep-alive time does not get it.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let body = String::from_utf8(chat_body("@fast")).unwrap();
    s.write_all(raw_post(CHAT, "connection: keep-alive\r\nkeep-alive: timeout=3600\r\n", &body).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_responses(&mut s, 1).await.len(), 1);
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);

    // A body trickled a byte a second is cut at the body deadline with 408.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let trickle = async {
        for b in b"{\"model\":\"x\"" {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1700), trickle).await;
    let answers = read_responses(&mut s, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 408"), "{answers:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_metric(&gw, "modelux_client_timeouts_total", &[("listener", "proxy"), ("phase", "body")], 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_in_the_callers_format() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg { server_extra: "  max_connections: 2", ..Cfg::new(&upstream.base_url()) }).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(raw_post(CHAT, "", &String::from_utf8(chat_body("@fast")).unwrap()).as_bytes())
            .await
            .unwrap();
        assert_eq!(read_responses(&mut s, 1).await.len(), 1);
        held.push(s);
    }
    assert_metric(&gw, "modelux_client_connections", &[("listener", "proxy")], 2.0).await;
    for (path, anthropic) in [(CHAT, false), ("/anthropic/v1/messages", true)] {
        let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(raw_post(path, "", "{}").as_bytes()).await.unwrap();
        let answers = read_responses(&mut s, 1).await;
        assert_eq!(answers.len(), 1);
        let (head, body) = &answers[0];
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
        let v: Value = serde_json::from_slice(body).unwrap();
        if anthropic {
            assert_eq!(v["type"], "error", "{v}");
        } else {
            assert_eq!(v["error"]["code"], "too_many_connections", "{v}");
        }
        assert!(closes_within(&mut s, Duration::from_secs(2)).await);
    }
    assert_metric(&gw, "modelux_client_connections_refused_total", &[("listener", "proxy")], 2.0).await;
    // A slot freed is a slot usable.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let resp = post(&gw, Some(KEY), &chat_body("@fast")).await;
        if resp.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {}", resp.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_listener_answers_bad_heads_and_slow_bodies() {
    let upstream = mock(MockConfig::default()).await;
    let gw =
        start(Cfg { server_extra: "  client_body_timeout_ms: 500", ..Cfg::new(&upstream.base_url()) }).await;
    let mut s = tokio::net::TcpStream::connect(gw.manage).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n").await.unwrap();
    let answers = read_responses(&mut s, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 400"), "{answers:?}");
    let v: Value = serde_json::from_slice(&answers[0].1).unwrap();
    assert_eq!(v["error"]["code"], "invalid_http_request", "{v}");

    let mut s = tokio::net::TcpStream::connect(gw.manage).await.unwrap();
    s.write_all(
        format!("POST /manage/v1/projects HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\ncontent-length: 50\r\n\r\n{{")
            .as_bytes(),
    )
    .await
    .unwrap();
    let answers = read_responses(&mut s, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 408"), "{answers:?}");
    assert_metric(&gw, "modelux_client_timeouts_total", &[("listener", "manage"), ("phase", "body")], 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_off_closes_after_each_answer_and_odd_transfer_codings_are_refused() {
    let upstream = mock(MockConfig::default()).await;
    let gw =
        start(Cfg { server_extra: "  keepalive_timeout_seconds: 0", ..Cfg::new(&upstream.base_url()) }).await;
    let body = String::from_utf8(chat_body("@fast")).unwrap();
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(raw_post(CHAT, "", &body).as_bytes()).await.unwrap();
    let answers = read_responses(&mut s, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 200"), "{answers:?}");
    assert!(answers[0].0.to_ascii_lowercase().contains("connection: close"), "{}", answers[0].0);
    assert!(closes_within(&mut s, Duration::from_millis(500)).await);
    // The management listener too.
    let mut m = tokio::net::TcpStream::connect(gw.manage).await.unwrap();
    m.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let answers = read_responses(&mut m, 1).await;
    assert!(answers[0].0.to_ascii_lowercase().contains("connection: close"), "{}", answers[0].0);
    assert!(closes_within(&mut m, Duration::from_millis(500)).await);

    // `chunked, chunked` and an unknown coding: 400 in the caller's format, then a close.
    for (te, path) in [("chunked, chunked", CHAT), ("gzip, chunked", "/anthropic/v1/messages")] {
        let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        let wire = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: {te}\r\n\r\n{chunked}"
        );
        s.write_all(wire.as_bytes()).await.unwrap();
        let answers = read_responses(&mut s, 1).await;
        assert!(answers[0].0.starts_with("HTTP/1.1 400"), "{te}: {answers:?}");
        let v: Value = serde_json::from_slice(&answers[0].1).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("Transfer-Encoding"), "{v}");
        if path == CHAT {
            assert_eq!(v["error"]["code"], "invalid_request");
        } else {
            assert_eq!(v["type"], "error");
        }
        assert!(closes_within(&mut s, Duration::from_millis(500)).await);
    }
}

/// A client that stops reading its answer is cut off at the write timeout, and the request
/// ends instead of waiting on the client for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_at_the_write_timeout() {
    // A 600,000-token stream: tens of MB, far more than the socket buffers hold.
    let upstream = mock(MockConfig { tokens: 600_000, ..MockConfig::default() }).await;
    let gw =
        start(Cfg { server_extra: "  client_write_timeout_ms: 500", ..Cfg::new(&upstream.base_url()) }).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.proxy).await.unwrap();
    let body = serde_json::to_string(
        &json!({"model": "@fast", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .unwrap();
    s.write_all(raw_post(CHAT, "", &body).as_bytes()).await.unwrap();
    // Read the head, then stop reading: once the socket buffers are full (megabytes on
    // loopback, at the debug build's pace), a write waits, and is cut at 500 ms.
    let mut first = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut first)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    loop {
        let text = metrics(&gw).await;
        let cut = metric_value(
            &text,
            "modelux_client_timeouts_total",
            &[("listener", "proxy"), ("phase", "write")],
        );
        if cut == 1.0 {
            assert_eq!(metric_value(&text, "modelux_errors_total", &[("code", "client_write_timeout")]), 1.0);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "never cut off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s);
    // The gateway is fine for everyone else.
    assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
}
