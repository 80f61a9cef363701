//! The mock's OpenAI embeddings route and the weather tool call of chat
//! completions, over loopback sockets.

use base64::Engine;
use modelux_loadtest::httpc::{self, Conn};
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::{json, Value};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).map(|f| f as f32).collect()).unwrap_or_default()
}

#[tokio::test]
async fn embeddings_float_and_base64() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req =
        serde_json::to_vec(&json!({"model": "text-embedding-3-small", "input": "The food was delicious"}))?;
    let r = conn.request("POST", "/v1/embeddings", &[CT], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-request-id").is_some());
    let v = r.json()?;
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    let plain = floats(&v["data"][0]["embedding"]);
    assert_eq!(plain.len(), 1536);
    let tokens = "The food was delicious".len() / 4;
    assert_eq!(v["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}));

    // base64: little-endian f32 bytes of the same vector.
    let req = serde_json::to_vec(&json!({
        "model": "text-embedding-3-small", "input": "The food was delicious", "encoding_format": "base64",
    }))?;
    let v = conn.request("POST", "/v1/embeddings", &[CT], &req).await?.json()?;
    let b64 = v["data"][0]["embedding"].as_str().ok_or("not a base64 string")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
    assert_eq!(bytes.len(), 1536 * 4);
    let decoded: Vec<f32> =
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(decoded, plain, "base64 decodes to the float answer");

    // Arrays of strings and token arrays; dimensions; 3-large's native size.
    let req = serde_json::to_vec(&json!({
        "model": "text-embedding-3-large", "input": ["a", "bb", [1, 2, 3]], "dimensions": 64,
    }))?;
    let v = conn.request("POST", "/v1/embeddings", &[CT], &req).await?.json()?;
    let data = v["data"].as_array().ok_or("no data")?;
    assert_eq!(data.len(), 3);
    assert!(data.iter().all(|d| d["embedding"].as_array().map(Vec::len) == Some(64)));
    assert_eq!(data.iter().map(|d| d["index"].clone()).collect::<Vec<_>>(), [json!(0), json!(1), json!(2)]);
    assert_eq!(v["usage"]["prompt_tokens"], 1 + 1 + 3);
    let req = serde_json::to_vec(&json!({"model": "text-embedding-3-large", "input": [[5, 6], [7]]}))?;
    let v = conn.request("POST", "/v1/embeddings", &[CT], &req).await?.json()?;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(3072));
    assert_eq!(v["usage"]["total_tokens"], 3);

    // Validation in OpenAI's shape.
    for bad in [
        json!({"input": "x"}),
        json!({"model": "text-embedding-3-small"}),
        json!({"model": "text-embedding-3-small", "input": ""}),
        json!({"model": "text-embedding-3-small", "input": "x", "dimensions": 4096}),
        json!({"model": "text-embedding-3-small", "input": "x", "encoding_format": "int8"}),
        json!({"model": "text-embedding-ada-002", "input": "x", "dimensions": 8}),
    ] {
        let r = conn.request("POST", "/v1/embeddings", &[CT], &serde_json::to_vec(&bad)?).await?;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()?["error"]["type"], "invalid_request_error", "{bad}");
    }
    Ok(())
}

#[tokio::test]
async fn embeddings_scripted_error_and_reset() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::Status(429), Behavior::ResetMidStream { after_chunks: 0 }],
        ..Default::default()
    })
    .await?;
    let req = serde_json::to_vec(&json!({"model": "text-embedding-3-small", "input": "x"}))?;
    let r = httpc::request(mock.addr(), "POST", "/v1/embeddings", &[CT], &req).await?;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()?["error"]["code"], "rate_limit_exceeded");
    let err = httpc::request(mock.addr(), "POST", "/v1/embeddings", &[CT], &req).await.err();
    assert!(err.is_some(), "half a body, then a reset");
    Ok(())
}

fn chat(messages: Value, extra: Value) -> Vec<u8> {
    let mut v = json!({
        "model": "gpt-4o-mini",
        "messages": messages,
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "get_time"}},
        ],
    });
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

#[tokio::test]
async fn weather_gets_a_tool_call() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let ask = json!([{"role": "user", "content": "What's the weather like in Paris today?"}]);
    let v =
        conn.request("POST", "/v1/chat/completions", &[CT], &chat(ask.clone(), json!({}))).await?.json()?;
    assert_eq!(v["object"], "chat.completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    let id = call["id"].as_str().ok_or("no id")?;
    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().ok_or("no arguments")?)?;
    assert_eq!(args, json!({"location": "Paris"}));
    assert_eq!(v["usage"]["completion_tokens"], 12);

    let req = chat(ask.clone(), json!({"stream": true, "stream_options": {"include_usage": true}}));
    let r = conn.request("POST", "/v1/chat/completions", &[CT], &req).await?;
    let text = r.text();
    let body = text.strip_suffix("data: [DONE]\n\n").ok_or("no [DONE]")?;
    let chunks: Vec<Value> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.trim_start_matches("data: ")))
        .collect::<Result<_, _>>()?;
    assert_eq!(chunks.len(), 5, "role+call, 2 argument pieces, finish, usage");
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert_eq!(first["tool_calls"][0]["function"], json!({"name": "get_weather", "arguments": ""}));
    assert_eq!(first["tool_calls"][0]["index"], 0);
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&args)?, json!({"location": "Paris"}));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert!(chunks[..4].iter().all(|c| c["usage"].is_null()));

    // Without include_usage: no usage chunk and no usage key.
    let r = conn
        .request("POST", "/v1/chat/completions", &[CT], &chat(ask.clone(), json!({"stream": true})))
        .await?;
    let text = r.text();
    assert_eq!(text.matches("data: ").count(), 5, "4 chunks + [DONE]");
    assert!(!text.contains("\"usage\""));

    // The tool result ends the round trip; other questions get text.
    let round_trip = json!([
        {"role": "user", "content": "What's the weather like in Paris today?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": id, "content": "sunny"},
    ]);
    for messages in [round_trip, json!([{"role": "user", "content": "Say hello"}])] {
        let v =
            conn.request("POST", "/v1/chat/completions", &[CT], &chat(messages, json!({}))).await?.json()?;
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["choices"][0]["message"]["content"].is_string());
    }
    Ok(())
}
