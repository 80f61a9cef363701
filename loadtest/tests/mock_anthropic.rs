//! The mock's Anthropic Messages API, exercised through the HTTP client.

use std::time::{Duration, Instant};

use modelux_loadtest::httpc::{self, Conn};
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::{json, Value};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");
const KEY: (&str, &str) = ("x-api-key", "sk-ant-mock");
const VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");

fn body(extra: Value) -> Vec<u8> {
    let mut v = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Say hello."}],
    });
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn tools() -> Value {
    json!([
        {"name": "search", "description": "Search", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}},
        {"name": "other", "input_schema": {"type": "object"}}
    ])
}

/// Splits an Anthropic SSE body into `(event name, data)`, checking that
/// every event is `event: NAME\ndata: JSON\n\n` and that `data.type` is NAME.
fn sse(text: &str) -> Result<Vec<(String, Value)>, Box<dyn std::error::Error>> {
    assert!(text.ends_with("\n\n"), "{text}");
    let mut out = Vec::new();
    for ev in text.strip_suffix("\n\n").unwrap_or(text).split("\n\n") {
        let (name, data) = ev.split_once('\n').ok_or_else(|| format!("bad event {ev:?}"))?;
        let name = name.strip_prefix("event: ").ok_or_else(|| format!("no event line in {ev:?}"))?;
        let data = data.strip_prefix("data: ").ok_or_else(|| format!("no data line in {ev:?}"))?;
        let v: Value = serde_json::from_str(data)?;
        assert_eq!(v["type"], name, "{ev}");
        out.push((name.to_owned(), v));
    }
    Ok(out)
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

/// Concatenation of one delta field over the events.
fn deltas(events: &[(String, Value)], delta_type: &str, field: &str) -> String {
    events
        .iter()
        .filter(|(_, v)| v["delta"]["type"] == delta_type)
        .filter_map(|(_, v)| v["delta"][field].as_str())
        .collect()
}

#[tokio::test]
async fn non_stream_text_message() -> R {
    let mock = MockServer::start(MockConfig { tokens: 3, ..Default::default() }).await?;
    let port = mock.addr().port();
    assert_eq!(mock.anthropic_base_url(), format!("http://127.0.0.1:{port}"));
    let req = body(json!({}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let beta = ("anthropic-beta", "prompt-caching-2024-07-31");
    let r = conn.request("POST", "/v1/messages", &[CT, KEY, VERSION, beta], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let rid = r.header("request-id").ok_or("no request-id")?;
    assert!(rid.starts_with("req_") && rid.len() == 28, "{rid}");
    assert!(r.header("anthropic-organization-id").is_some_and(|v| v.len() == 36));
    assert!(r.header("x-request-id").is_none());
    let v = r.json()?;
    let id = v["id"].as_str().ok_or("no id")?;
    assert!(id.starts_with("msg_01") && id.len() == 28, "{id}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-sonnet-4-5");
    assert_eq!(v["content"], json!([{"type": "text", "text": " tok0 tok1 tok2"}]));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    assert_eq!(
        v["usage"],
        json!({
            "input_tokens": req.len() / 4,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 3,
            "service_tier": "standard",
        })
    );
    // Key order as Anthropic sends it.
    let text = r.text();
    let pos = |k: &str| text.find(&format!("\"{k}\":"));
    assert!(pos("id") < pos("type") && pos("role") < pos("model") && pos("model") < pos("content"));
    assert!(pos("content") < pos("stop_reason") && pos("stop_reason") < pos("usage"));

    let recs = mock.requests();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].path, "/v1/messages");
    assert_eq!(recs[0].header("x-api-key"), Some("sk-ant-mock"));
    assert_eq!(recs[0].header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(recs[0].header("anthropic-beta"), Some("prompt-caching-2024-07-31"));
    assert_eq!(recs[0].body, req);

    // Keep-alive, and the OpenAI side is untouched on the same server.
    let r = conn.request("GET", "/v1/models", &[], b"").await?;
    assert_eq!(r.status, 200);
    assert!(r.header("x-request-id").is_some());
    Ok(())
}

#[tokio::test]
async fn stream_event_sequence_and_pacing() -> R {
    let (ttft, inter) = (Duration::from_millis(200), Duration::from_millis(100));
    let mock =
        MockServer::start(MockConfig { tokens: 3, ttft, inter_token: inter, ..Default::default() }).await?;
    let req = body(json!({"stream": true}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let t0 = Instant::now();
    let mut s = conn.request_streaming("POST", "/v1/messages", &[CT, KEY, VERSION], &req).await?;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert_eq!(s.header("transfer-encoding"), Some("chunked"));
    assert!(s.header("request-id").is_some());
    assert!(s.header("anthropic-organization-id").is_some());
    // message_start is its own chunk and arrives before the TTFT delay.
    let first = s.next_chunk().await?.ok_or("no first chunk")?;
    assert!(t0.elapsed() < ttft, "first event took {:?}", t0.elapsed());
    assert!(first.starts_with(b"event: message_start\ndata: {"));
    assert!(first.ends_with(b"}\n\n"));
    assert_eq!(first.iter().filter(|&&b| b == b'\n').count(), 3, "one event per chunk");
    let mut text = String::from_utf8_lossy(&first).into_owned();
    text.push_str(&String::from_utf8_lossy(&s.collect().await?));
    assert!(t0.elapsed() >= ttft + inter * 2, "ttft/inter-token not applied: {:?}", t0.elapsed());
    drop(s);

    let events = sse(&text)?;
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let start = &events[0].1["message"];
    assert!(start["id"].as_str().is_some_and(|id| id.starts_with("msg_01")));
    assert_eq!(start["type"], "message");
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["model"], "claude-sonnet-4-5");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["usage"]["input_tokens"], req.len() / 4);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        events[1].1,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    for (name, v) in &events[3..7] {
        assert_eq!(v["index"], 0, "{name}");
    }
    assert_eq!(deltas(&events, "text_delta", "text"), " tok0 tok1 tok2");
    assert_eq!(
        events[7].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}})
    );
    assert_eq!(events[8].1, json!({"type": "message_stop"}));

    // The connection is reusable after a complete stream.
    let r = conn.request("POST", "/v1/messages", &[CT], &body(json!({}))).await?;
    assert_eq!(r.status, 200);
    Ok(())
}

#[tokio::test]
async fn tool_use_non_stream() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let r =
        httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &body(json!({"tools": tools()}))).await?;
    assert_eq!(r.status, 200);
    let v = r.json()?;
    assert_eq!(v["stop_reason"], "tool_use");
    let content = v["content"].as_array().ok_or("no content")?;
    assert_eq!(content.len(), 2);
    assert_eq!(content[0], json!({"type": "text", "text": "Let me check."}));
    assert_eq!(content[1]["type"], "tool_use");
    assert!(content[1]["id"].as_str().is_some_and(|id| id.starts_with("toolu_mock_")));
    assert_eq!(content[1]["name"], "search");
    assert_eq!(content[1]["input"], json!({"query": "mock"}));
    // An empty tools array is a plain answer.
    let r = httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &body(json!({"tools": []}))).await?;
    assert_eq!(r.json()?["stop_reason"], "end_turn");
    Ok(())
}

#[tokio::test]
async fn tool_use_stream() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let req = body(json!({"stream": true, "tools": tools()}));
    let r = httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &req).await?;
    assert_eq!(r.status, 200);
    let events = sse(&r.text())?;
    let starts: Vec<&Value> =
        events.iter().filter(|(n, _)| n == "content_block_start").map(|(_, v)| v).collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0]["index"], 0);
    assert_eq!(starts[0]["content_block"], json!({"type": "text", "text": ""}));
    assert_eq!(starts[1]["index"], 1);
    let tool = &starts[1]["content_block"];
    assert_eq!(tool["type"], "tool_use");
    assert_eq!(tool["name"], "search");
    assert_eq!(tool["input"], json!({}));
    assert!(tool["id"].as_str().is_some_and(|id| id.starts_with("toolu_mock_")));
    assert_eq!(deltas(&events, "text_delta", "text"), "Let me check.");
    let pieces = events.iter().filter(|(_, v)| v["delta"]["type"] == "input_json_delta").count();
    assert!(pieces >= 2, "{pieces} input_json_delta events");
    for (_, v) in events.iter().filter(|(_, v)| v["delta"]["type"] == "input_json_delta") {
        assert_eq!(v["index"], 1);
    }
    let input: Value = serde_json::from_str(&deltas(&events, "input_json_delta", "partial_json"))?;
    assert_eq!(input, json!({"query": "mock"}));
    let stops: Vec<&Value> =
        events.iter().filter(|(n, _)| n == "content_block_stop").map(|(_, v)| &v["index"]).collect();
    assert_eq!(stops, [&json!(0), &json!(1)]);
    let delta = events.iter().find(|(n, _)| n == "message_delta").ok_or("no message_delta")?;
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    assert_eq!(names(&events).last(), Some(&"message_stop"));
    Ok(())
}

#[tokio::test]
async fn thinking_stream_and_message() -> R {
    let mock = MockServer::start(MockConfig { tokens: 2, ..Default::default() }).await?;
    let thinking = json!({"type": "enabled", "budget_tokens": 2048});
    let req = body(json!({"stream": true, "thinking": thinking}));
    let r = httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &req).await?;
    let events = sse(&r.text())?;
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(events[1].1["index"], 0);
    assert_eq!(events[1].1["content_block"]["type"], "thinking");
    let kinds: Vec<&Value> = events[3..6].iter().map(|(_, v)| &v["delta"]["type"]).collect();
    assert_eq!(kinds, ["thinking_delta", "thinking_delta", "signature_delta"]);
    assert!(events[3..7].iter().all(|(_, v)| v["index"] == 0));
    assert_eq!(deltas(&events, "thinking_delta", "thinking"), "Let me think.");
    let sig = deltas(&events, "signature_delta", "signature");
    assert!(sig.starts_with("sig_mock_"), "{sig}");
    assert_eq!(events[7].1["index"], 1);
    assert_eq!(events[7].1["content_block"], json!({"type": "text", "text": ""}));
    assert!(events[8..11].iter().all(|(_, v)| v["index"] == 1));
    assert_eq!(deltas(&events, "text_delta", "text"), " tok0 tok1");

    // Non-streamed: the same blocks.
    let req = body(json!({"thinking": thinking}));
    let v = httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &req).await?.json()?;
    assert_eq!(v["content"][0]["type"], "thinking");
    assert_eq!(v["content"][0]["thinking"], "Let me think.");
    assert!(v["content"][0]["signature"].as_str().is_some_and(|s| s.starts_with("sig_mock_")));
    assert_eq!(v["content"][1], json!({"type": "text", "text": " tok0 tok1"}));
    // Disabled thinking is a plain answer.
    let req = body(json!({"thinking": {"type": "disabled"}}));
    let v = httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &req).await?.json()?;
    assert_eq!(v["content"][0]["type"], "text");
    Ok(())
}

#[tokio::test]
async fn max_tokens_cuts_the_answer() -> R {
    let mock = MockServer::start(MockConfig { tokens: 5, ..Default::default() }).await?;
    let r =
        httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &body(json!({"max_tokens": 2}))).await?;
    let v = r.json()?;
    assert_eq!(v["content"][0]["text"], " tok0 tok1");
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 2);
    let req = body(json!({"max_tokens": 2, "stream": true}));
    let events = sse(&httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &req).await?.text())?;
    assert_eq!(deltas(&events, "text_delta", "text"), " tok0 tok1");
    let delta = events.iter().find(|(n, _)| n == "message_delta").ok_or("no message_delta")?;
    assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta.1["usage"]["output_tokens"], 2);
    // Exactly enough is end_turn.
    let v = httpc::request(mock.addr(), "POST", "/v1/messages", &[CT], &body(json!({"max_tokens": 5})))
        .await?
        .json()?;
    assert_eq!(v["stop_reason"], "end_turn");
    Ok(())
}

#[tokio::test]
async fn errors_use_anthropic_envelope() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![
            Behavior::Status(529),
            Behavior::Status(429),
            Behavior::Status(500),
            Behavior::Status(401),
        ],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body(json!({}));
    let r = conn.request("POST", "/v1/messages", &[CT], &req).await?;
    assert_eq!(r.status, 529);
    assert!(r.header("request-id").is_some());
    let v = r.json()?;
    let keys: Vec<&String> = v.as_object().ok_or("not an object")?.keys().collect();
    assert_eq!(keys.len(), 3, "{v}");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert_eq!(v["error"]["message"], "Overloaded");
    assert_eq!(v["error"].as_object().map(|o| o.len()), Some(2));
    assert_eq!(v["request_id"].as_str(), r.header("request-id"));

    let r = conn.request("POST", "/v1/messages", &[CT], &req).await?;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()?["error"]["type"], "rate_limit_error");
    let r = conn.request("POST", "/v1/messages/count_tokens", &[CT], &req).await?;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()?["error"]["type"], "api_error");
    let r = conn.request("POST", "/v1/messages", &[CT], &req).await?;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()?["error"]["type"], "authentication_error");

    // Validation: invalid JSON, missing max_tokens, missing messages.
    for bad in [
        b"{not json".to_vec(),
        serde_json::to_vec(&json!({"model": "m", "messages": []}))?,
        serde_json::to_vec(&json!({"model": "m", "max_tokens": 10}))?,
    ] {
        let r = conn.request("POST", "/v1/messages", &[CT], &bad).await?;
        assert_eq!(r.status, 400);
        let v = r.json()?;
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The OpenAI route keeps its own error shape.
    mock.push_script([Behavior::Status(529)]);
    let r = conn.request("POST", "/v1/chat/completions", &[CT], &req).await?;
    assert_eq!(r.status, 529);
    assert!(r.json()?["error"].get("code").is_some());
    Ok(())
}

#[tokio::test]
async fn count_tokens() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let req = serde_json::to_vec(&json!({
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "How many tokens is this?"}],
    }))?;
    let r =
        httpc::request(mock.addr(), "POST", "/v1/messages/count_tokens", &[CT, KEY, VERSION], &req).await?;
    assert_eq!(r.status, 200);
    assert!(r.header("request-id").is_some());
    assert_eq!(r.json()?, json!({"input_tokens": req.len() / 4}));
    let r =
        httpc::request(mock.addr(), "POST", "/v1/messages/count_tokens", &[CT], b"{\"model\":\"m\"}").await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["type"], "invalid_request_error");
    assert_eq!(mock.requests()[0].path, "/v1/messages/count_tokens");
    Ok(())
}

#[tokio::test]
async fn reset_mid_stream_cuts_the_events() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::ResetMidStream { after_chunks: 4 }],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body(json!({"stream": true}));
    let mut s = conn.request_streaming("POST", "/v1/messages", &[CT], &req).await?;
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
    let events = sse(&String::from_utf8_lossy(&got))?;
    assert_eq!(names(&events), ["message_start", "content_block_start", "ping", "content_block_delta"]);
    drop(s);
    let r = conn.request("POST", "/v1/messages", &[CT], &body(json!({}))).await?;
    assert_eq!(r.status, 200);
    Ok(())
}
