//! The mock's Cohere v2 API over loopback sockets.

use std::time::{Duration, Instant};

use modelux_loadtest::httpc::{self, Conn};
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::{json, Value};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");
const AUTH: (&str, &str) = ("authorization", "Bearer co-mock");

fn body(text: &str, extra: Value) -> Vec<u8> {
    let mut v = json!({"model": "command-a-03-2025", "messages": [{"role": "user", "content": text}]});
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
}

/// Splits a Cohere SSE body into `(event, data)`; the stream must end with
/// `data: [DONE]`. Checks `data.type` is the event name.
fn sse(text: &str) -> Result<Vec<(String, Value)>, Box<dyn std::error::Error>> {
    let body = text.strip_suffix("data: [DONE]\n\n").ok_or_else(|| format!("no [DONE]: {text:?}"))?;
    let mut out = Vec::new();
    for ev in body.strip_suffix("\n\n").unwrap_or(body).split("\n\n") {
        let (name, data) = ev.split_once('\n').ok_or_else(|| format!("bad event {ev:?}"))?;
        let name = name.strip_prefix("event: ").ok_or_else(|| format!("no event line: {ev:?}"))?;
        let v: Value = serde_json::from_str(data.strip_prefix("data: ").ok_or("no data line")?)?;
        assert_eq!(v["type"], name, "{ev}");
        out.push((name.to_owned(), v));
    }
    Ok(out)
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test]
async fn chat() -> R {
    let mock = MockServer::start(MockConfig { tokens: 3, ..Default::default() }).await?;
    let req = body("Say hello", json!({}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let r = conn.request("POST", "/v2/chat", &[CT, AUTH], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("x-debug-trace-id").is_some());
    let v = r.json()?;
    assert_eq!(v["id"].as_str().map(str::len), Some(36));
    assert_eq!(
        v["message"],
        json!({"role": "assistant", "content": [{"type": "text", "text": " tok0 tok1 tok2"}]})
    );
    assert_eq!(v["finish_reason"], "COMPLETE");
    let input = req.len() as u64 / 4;
    assert_eq!(
        v["usage"],
        json!({"billed_units": {"input_tokens": input, "output_tokens": 3}, "tokens": {"input_tokens": input + 64, "output_tokens": 3}})
    );
    let text = r.text();
    assert!(
        text.find("\"id\"") < text.find("\"message\"")
            && text.find("\"finish_reason\"") < text.find("\"usage\"")
    );
    assert_eq!(mock.requests()[0].header("authorization"), Some("Bearer co-mock"));
    // max_tokens cuts the answer.
    let v = conn.request("POST", "/v2/chat", &[CT], &body("hi", json!({"max_tokens": 1}))).await?.json()?;
    assert_eq!(v["finish_reason"], "MAX_TOKENS");
    assert_eq!(v["message"]["content"][0]["text"], " tok0");
    Ok(())
}

#[tokio::test]
async fn chat_stream() -> R {
    let (ttft, inter) = (Duration::from_millis(150), Duration::from_millis(50));
    let mock =
        MockServer::start(MockConfig { tokens: 3, ttft, inter_token: inter, ..Default::default() }).await?;
    let req = body("Say hello", json!({"stream": true}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let t0 = Instant::now();
    let mut s = conn.request_streaming("POST", "/v2/chat", &[CT], &req).await?;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    let first = s.next_chunk().await?.ok_or("no first chunk")?;
    assert!(t0.elapsed() < ttft, "message-start before ttft");
    assert!(first.starts_with(b"event: message-start\ndata: {\"id\":"));
    let mut text = String::from_utf8_lossy(&first).into_owned();
    text.push_str(&String::from_utf8_lossy(&s.collect().await?));
    assert!(t0.elapsed() >= ttft + inter * 2);
    drop(s);
    let events = sse(&text)?;
    assert_eq!(
        names(&events),
        [
            "message-start",
            "content-start",
            "content-delta",
            "content-delta",
            "content-delta",
            "content-end",
            "message-end"
        ]
    );
    assert_eq!(
        events[0].1["delta"]["message"],
        json!({"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []})
    );
    assert_eq!(events[1].1["delta"]["message"]["content"], json!({"type": "text", "text": ""}));
    let deltas: String =
        events.iter().filter_map(|(_, v)| v["delta"]["message"]["content"]["text"].as_str()).collect();
    assert_eq!(deltas, " tok0 tok1 tok2");
    assert!(events[2..6].iter().all(|(_, v)| v["index"] == 0));
    let end = &events[6].1["delta"];
    assert_eq!(end["finish_reason"], "COMPLETE");
    assert_eq!(end["usage"]["billed_units"]["output_tokens"], 3);
    assert_eq!(end["usage"]["tokens"]["input_tokens"], req.len() as u64 / 4 + 64);
    assert_eq!(conn.request("POST", "/v2/chat", &[CT], &body("hi", json!({}))).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn weather_tool_call() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let ask = body("What is the weather in Paris?", json!({"tools": tools()}));
    let v = conn.request("POST", "/v2/chat", &[CT], &ask).await?.json()?;
    assert_eq!(v["finish_reason"], "TOOL_CALL");
    assert!(v["message"]["tool_plan"].as_str().is_some_and(|p| !p.is_empty()));
    let call = &v["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().ok_or("no arguments")?)?;
    assert_eq!(args, json!({"location": "Paris"}));

    let ask = body("What is the weather in Paris?", json!({"tools": tools(), "stream": true}));
    let events = sse(&conn.request("POST", "/v2/chat", &[CT], &ask).await?.text())?;
    assert_eq!(
        names(&events),
        [
            "message-start",
            "tool-plan-delta",
            "tool-call-start",
            "tool-call-delta",
            "tool-call-delta",
            "tool-call-end",
            "message-end"
        ]
    );
    let start = &events[2].1["delta"]["message"]["tool_calls"];
    assert_eq!(start["function"], json!({"name": "get_weather", "arguments": ""}));
    assert!(start["id"].as_str().is_some_and(|id| id.starts_with("get_weather_")), "{start}");
    let args: String = events
        .iter()
        .filter_map(|(_, v)| v["delta"]["message"]["tool_calls"]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&args)?, json!({"location": "Paris"}));
    assert_eq!(events[6].1["delta"]["finish_reason"], "TOOL_CALL");

    // The tool result ends the round trip.
    let round_trip = serde_json::to_vec(&json!({
        "model": "command-a-03-2025",
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "tool_plan": "x", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": [{"type": "document", "document": {"data": "sunny"}}]},
        ],
        "tools": tools(),
    }))?;
    let v = conn.request("POST", "/v2/chat", &[CT], &round_trip).await?.json()?;
    assert_eq!(v["finish_reason"], "COMPLETE");
    Ok(())
}

#[tokio::test]
async fn embed() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let req = serde_json::to_vec(&json!({
        "model": "embed-v4.0",
        "texts": ["hello", "world"],
        "input_type": "search_document",
        "embedding_types": ["float"],
    }))?;
    let r = httpc::request(mock.addr(), "POST", "/v2/embed", &[CT, AUTH], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()?;
    let vectors = v["embeddings"]["float"].as_array().ok_or("no embeddings.float")?;
    assert_eq!(vectors.len(), 2);
    assert!(vectors.iter().all(|e| e.as_array().map(Vec::len) == Some(1024)));
    assert_eq!(v["texts"], json!(["hello", "world"]));
    assert_eq!(v["meta"]["billed_units"]["input_tokens"], 2);
    assert_eq!(v["meta"]["api_version"]["version"], "2");
    assert_eq!(v["response_type"], "embeddings_by_type");
    // `inputs` and `output_dimension`.
    let req = serde_json::to_vec(&json!({
        "model": "embed-v4.0",
        "inputs": [{"content": [{"type": "text", "text": "hello"}]}],
        "input_type": "search_query",
        "output_dimension": 256,
    }))?;
    let v = httpc::request(mock.addr(), "POST", "/v2/embed", &[CT], &req).await?.json()?;
    assert_eq!(v["embeddings"]["float"][0].as_array().map(Vec::len), Some(256));
    Ok(())
}

#[tokio::test]
async fn errors_are_message_objects() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::Status(429), Behavior::Status(500), Behavior::Status(401)],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body("hi", json!({}));
    for (status, path) in [(429, "/v2/chat"), (500, "/v2/chat"), (401, "/v2/embed")] {
        let r = conn.request("POST", path, &[CT], &req).await?;
        assert_eq!(r.status, status);
        let v = r.json()?;
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    for bad in [b"{oops".to_vec(), serde_json::to_vec(&json!({"messages": []}))?] {
        let r = conn.request("POST", "/v2/chat", &[CT], &bad).await?;
        assert_eq!(r.status, 400);
        assert!(r.json()?["message"].as_str().is_some_and(|m| m.starts_with("invalid request")));
    }
    Ok(())
}

#[tokio::test]
async fn reset_mid_stream_counts_events() -> R {
    let mock = MockServer::start(MockConfig {
        tokens: 4,
        script: vec![Behavior::ResetMidStream { after_chunks: 3 }],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let mut s =
        conn.request_streaming("POST", "/v2/chat", &[CT], &body("hi", json!({"stream": true}))).await?;
    let mut got = Vec::new();
    let err = loop {
        match s.next_chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => return Err("stream ended cleanly after a reset".into()),
            Err(e) => break e,
        }
    };
    assert!(matches!(err.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset));
    drop(s);
    let text = String::from_utf8_lossy(&got);
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(events, ["message-start", "content-start", "content-delta"]);
    assert!(!text.contains("[DONE]"));
    assert_eq!(conn.request("POST", "/v2/chat", &[CT], &body("hi", json!({}))).await?.status, 200);
    Ok(())
}
