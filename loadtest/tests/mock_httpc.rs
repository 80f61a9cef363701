//! The mock upstream and the HTTP client exercised against each other.

use std::time::{Duration, Instant};

use modelux_loadtest::httpc::{self, Conn};
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");

fn body(stream: bool, include_usage: bool) -> Vec<u8> {
    let mut v = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
    });
    if stream {
        v["stream"] = true.into();
    }
    if include_usage {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|ev| ev.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn non_stream_completion_has_openai_shape() -> R {
    let mock = MockServer::start(MockConfig { tokens: 3, ..Default::default() }).await?;
    assert!(mock.base_url().starts_with("http://127.0.0.1:"));
    assert!(mock.base_url().ends_with("/v1"));
    let req = body(false, false);
    let mut conn = Conn::connect(mock.addr()).await?;
    let resp =
        conn.request("POST", "/v1/chat/completions", &[CT, ("Authorization", "Bearer sk-x")], &req).await?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some("application/json"));
    let v = resp.json()?;
    assert!(v["id"].as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert!(v["created"].is_u64());
    assert!(v["system_fingerprint"].is_string());
    assert_eq!(v["service_tier"], "default");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["message"]["content"], " tok0 tok1 tok2");
    assert_eq!(c["message"]["refusal"], Value::Null);
    assert_eq!(c["message"]["annotations"], serde_json::json!([]));
    assert_eq!(c["logprobs"], Value::Null);
    assert_eq!(c["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], req.len() as u64 / 4);
    assert_eq!(u["completion_tokens"], 3);
    assert_eq!(u["total_tokens"], req.len() as u64 / 4 + 3);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 0);

    // Keep-alive: a second request on the same connection.
    let again = conn.request("GET", "/v1/models", &[], b"").await?;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()?["object"], "list");

    let recs = mock.requests();
    assert_eq!(recs.len(), 2);
    assert_eq!(mock.request_count(), 2);
    assert_eq!(recs[0].method, "POST");
    assert_eq!(recs[0].path, "/v1/chat/completions");
    assert_eq!(recs[0].header("authorization"), Some("Bearer sk-x"));
    assert!(recs[0].headers.iter().any(|(k, _)| k == "authorization"));
    assert_eq!(recs[0].body, req);
    Ok(())
}

#[tokio::test]
async fn stream_chunks_arrive_before_the_next_exists() -> R {
    let inter = Duration::from_millis(300);
    let mock = MockServer::start(MockConfig { tokens: 3, inter_token: inter, ..Default::default() }).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let t0 = Instant::now();
    let mut s = conn.request_streaming("POST", "/v1/chat/completions", &[CT], &body(true, false)).await?;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert_eq!(s.header("transfer-encoding"), Some("chunked"));
    let first = s.next_chunk().await?.ok_or("no first chunk")?;
    assert!(t0.elapsed() < inter, "first chunk took {:?}", t0.elapsed());
    assert!(first.starts_with(b"data: "));
    // The role chunk and the first content chunk are both due before the
    // first inter-token gap.
    let second = s.next_chunk().await?.ok_or("no second chunk")?;
    assert!(t0.elapsed() < inter);
    assert!(String::from_utf8_lossy(&second).contains("\" tok0\""));
    let mut text = String::from_utf8_lossy(&first).into_owned();
    text.push_str(&String::from_utf8_lossy(&second));
    text.push_str(&String::from_utf8_lossy(&s.collect().await?));
    assert!(t0.elapsed() >= inter * 2, "inter-token delay not applied");

    let events = sse_data(&text);
    // role, 3 content, finish, [DONE]
    assert_eq!(events.len(), 6, "{text}");
    assert_eq!(events[5], "[DONE]");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let chunks: Vec<Value> = events[..5].iter().map(|e| serde_json::from_str(e)).collect::<Result<_, _>>()?;
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-4o-mini");
        assert_eq!(c["id"], id);
        assert!(c.get("usage").is_none(), "usage key without include_usage");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        serde_json::json!({"role": "assistant", "content": "", "refusal": null})
    );
    let content: String =
        chunks[1..4].iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, " tok0 tok1 tok2");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"][0]["delta"], serde_json::json!({}));
    drop(s);

    // The connection is reusable after a complete stream.
    let r = conn.request("GET", "/v1/models", &[], b"").await?;
    assert_eq!(r.status, 200);
    Ok(())
}

#[tokio::test]
async fn stream_include_usage_adds_usage_chunk() -> R {
    let mock = MockServer::start(MockConfig { tokens: 2, ..Default::default() }).await?;
    let req = body(true, true);
    let resp = httpc::request(mock.addr(), "POST", "/v1/chat/completions", &[CT], &req).await?;
    let events = sse_data(&resp.text());
    assert_eq!(events.len(), 6); // role, 2 content, finish, usage, [DONE]
    assert_eq!(events[5], "[DONE]");
    let chunks: Vec<Value> = events[..5].iter().map(|e| serde_json::from_str(e)).collect::<Result<_, _>>()?;
    for c in &chunks[..4] {
        assert_eq!(c["usage"], Value::Null);
        assert!(c.get("usage").is_some());
    }
    assert_eq!(chunks[4]["choices"], serde_json::json!([]));
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 2);
    assert_eq!(chunks[4]["usage"]["prompt_tokens"], req.len() as u64 / 4);
    Ok(())
}

#[tokio::test]
async fn scripted_429_then_200() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::Status(429), Behavior::Normal],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body(false, false);
    let r1 = conn.request("POST", "/v1/chat/completions", &[CT], &req).await?;
    assert_eq!(r1.status, 429);
    assert_eq!(r1.header("retry-after"), Some("1"));
    let e = r1.json()?;
    assert_eq!(e["error"]["type"], "requests");
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert!(e["error"]["message"].is_string());
    assert!(e["error"].get("param").is_some());
    let r2 = conn.request("POST", "/v1/chat/completions", &[CT], &req).await?;
    assert_eq!(r2.status, 200);
    assert_eq!(mock.request_count(), 2);
    // Scripts can also be extended at runtime.
    mock.push_script([Behavior::Status(401)]);
    let r3 = conn.request("POST", "/v1/chat/completions", &[CT], &req).await?;
    assert_eq!(r3.status, 401);
    assert_eq!(r3.json()?["error"]["code"], "invalid_api_key");
    let r4 = conn.request("POST", "/v1/chat/completions", &[CT], &req).await?;
    assert_eq!(r4.status, 200);
    Ok(())
}

#[tokio::test]
async fn errors_use_openai_envelope() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::Status(500), Behavior::Status(503)],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let r = conn.request("GET", "/v1/models", &[], b"").await?;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()?["error"]["type"], "server_error");
    let r = conn.request("GET", "/v1/models", &[], b"").await?;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()?["error"]["type"], "server_error");
    let r = conn.request("POST", "/v1/chat/completions", &[CT], b"{not json").await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["type"], "invalid_request_error");
    let r = conn.request("POST", "/v1/chat/completions", &[CT], b"{\"messages\":[]}").await?;
    assert_eq!(r.status, 400);
    let r = conn.request("POST", "/v1/moderations/x", &[CT], b"{}").await?;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()?["error"]["message"], "Invalid URL (POST /v1/moderations/x)");
    // The speech route's own validation, in the same envelope.
    let r = conn.request("POST", "/v1/audio/speech", &[CT], b"{}").await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["param"], "input");
    Ok(())
}

#[tokio::test]
async fn error_rate_is_deterministic() -> R {
    let mock = MockServer::start(MockConfig {
        error_rate: 0.25,
        error_status: 502,
        record: false,
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let mut errors = 0;
    for _ in 0..100 {
        let r = conn.request("POST", "/v1/chat/completions", &[CT], &body(false, false)).await?;
        if r.status == 502 {
            errors += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    assert_eq!(errors, 25);
    assert!(mock.requests().is_empty());
    assert_eq!(mock.request_count(), 100);
    Ok(())
}

#[tokio::test]
async fn reset_mid_stream_is_an_error() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::ResetMidStream { after_chunks: 2 }],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let mut s = conn.request_streaming("POST", "/v1/chat/completions", &[CT], &body(true, false)).await?;
    assert_eq!(s.status, 200);
    let mut got = Vec::new();
    let err = loop {
        match s.next_chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => return Err("stream ended cleanly after a reset".into()),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
        "{err:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert_eq!(sse_data(&text).len(), 2, "{text}");
    assert!(!text.contains("[DONE]"));
    drop(s);
    // The client reconnects transparently afterwards.
    let r = conn.request("GET", "/v1/models", &[], b"").await?;
    assert_eq!(r.status, 200);
    Ok(())
}

#[tokio::test]
async fn reset_before_headers_and_truncated_body_are_errors() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::ResetBeforeHeaders, Behavior::ResetMidStream { after_chunks: 0 }],
        ..Default::default()
    })
    .await?;
    let req = body(false, false);
    let r = httpc::request(mock.addr(), "POST", "/v1/chat/completions", &[CT], &req).await;
    assert!(r.is_err());
    let r = httpc::request(mock.addr(), "POST", "/v1/chat/completions", &[CT], &req).await;
    assert!(r.is_err(), "truncated non-stream body must not read as complete");
    assert_eq!(mock.request_count(), 2);
    Ok(())
}

#[tokio::test]
async fn hang_and_delay_and_shutdown() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::Delay(Duration::from_millis(150)), Behavior::Hang],
        ..Default::default()
    })
    .await?;
    let t0 = Instant::now();
    let r = httpc::request(mock.addr(), "GET", "/v1/models", &[], b"").await?;
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() >= Duration::from_millis(150));

    let addr = mock.addr();
    let hung = tokio::spawn(async move { httpc::request(addr, "GET", "/v1/models", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!hung.is_finished());
    assert_eq!(mock.request_count(), 2);
    // Shutdown closes open connections, so the hung request ends (in error).
    mock.shutdown();
    let res = tokio::time::timeout(Duration::from_secs(5), hung).await??;
    assert!(res.is_err());
    // And stops accepting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(httpc::request(addr, "GET", "/v1/models", &[], b"").await.is_err());
    Ok(())
}

#[tokio::test]
async fn large_body_is_recorded_intact() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    // 10 MiB of valid JSON: one long message.
    let filler: String = (0..10 * 1024 * 1024).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let req = serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": filler}],
    }))?;
    let r = httpc::request(mock.addr(), "POST", "/v1/chat/completions", &[CT], &req).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["usage"]["prompt_tokens"], req.len() as u64 / 4);
    let recs = mock.requests();
    assert_eq!(recs.len(), 1);
    assert!(recs[0].body == req, "recorded body differs");
    Ok(())
}

#[tokio::test]
async fn chunked_request_body_and_pipelining() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let req = body(false, false);
    let (a, b) = req.split_at(10);
    let mut raw = Vec::new();
    raw.extend_from_slice(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    raw.extend_from_slice(format!("{:x}\r\n", a.len()).as_bytes());
    raw.extend_from_slice(a);
    raw.extend_from_slice(format!("\r\n{:x}\r\n", b.len()).as_bytes());
    raw.extend_from_slice(b);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    // Pipelined second request with connection: close.
    raw.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(mock.addr()).await?;
    s.write_all(&raw).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains("connection: close"));
    assert_eq!(mock.requests()[0].body, req);
    Ok(())
}
