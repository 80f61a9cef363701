//! The mock's Azure OpenAI deployment routes over loopback sockets.

use modelux_loadtest::httpc::Conn;
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::{json, Value};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");
const KEY: (&str, &str) = ("api-key", "azure-mock-key");
const CHAT: &str = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21";
const EMBED: &str = "/openai/deployments/embed-large/embeddings?api-version=2024-10-21";

fn chat_body(extra: Value) -> Vec<u8> {
    let mut v = json!({"messages": [{"role": "user", "content": "Say hello"}]});
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The JSON of every `data:` line but `[DONE]`, which must come last.
fn sse(text: &str) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let body = text.strip_suffix("data: [DONE]\n\n").ok_or("no [DONE]")?;
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| Ok(serde_json::from_str(e.strip_prefix("data: ").ok_or("no data line")?)?))
        .collect()
}

#[tokio::test]
async fn chat_answers_like_openai_with_the_deployment_as_model() -> R {
    let mock = MockServer::start(MockConfig { tokens: 2, ..Default::default() }).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let r = conn.request("POST", CHAT, &[CT, KEY], &chat_body(json!({}))).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("apim-request-id").is_some_and(|id| id.len() == 36));
    assert!(r.header("x-ms-region").is_some());
    let v = r.json()?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt4o-prod");
    assert_eq!(v["choices"][0]["message"]["content"], " tok0 tok1");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let rec = &mock.requests()[0];
    assert_eq!(rec.path, CHAT);
    assert_eq!(rec.header("api-key"), Some("azure-mock-key"));
    // A model in the body does not override the deployment.
    let v = conn.request("POST", CHAT, &[CT], &chat_body(json!({"model": "other"}))).await?.json()?;
    assert_eq!(v["model"], "gpt4o-prod");

    let req = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let r = conn.request("POST", CHAT, &[CT], &req).await?;
    assert_eq!(r.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert!(r.header("apim-request-id").is_some());
    let chunks = sse(&r.text())?;
    assert_eq!(chunks.len(), 5, "role, 2 tokens, finish, usage");
    assert!(chunks.iter().all(|c| c["model"] == "gpt4o-prod"));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, " tok0 tok1");
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 2);

    // The weather rule holds here too.
    let req = json!({
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
    });
    let v = conn.request("POST", CHAT, &[CT], &serde_json::to_vec(&req)?).await?.json()?;
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["model"], "gpt4o-prod");
    Ok(())
}

#[tokio::test]
async fn embeddings() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let req = serde_json::to_vec(&json!({"input": ["a", "b"]}))?;
    let r = Conn::connect(mock.addr()).await?.request("POST", EMBED, &[CT, KEY], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()?;
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "embed-large");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(1536));
    Ok(())
}

#[tokio::test]
async fn missing_api_version_or_unknown_path_is_azures_404() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    for path in [
        "/openai/deployments/gpt4o-prod/chat/completions",
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=",
        "/openai/deployments/gpt4o-prod/embeddings?foo=1",
        "/openai/deployments/gpt4o-prod/completions?api-version=2024-10-21",
    ] {
        let r = conn.request("POST", path, &[CT], &chat_body(json!({}))).await?;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()?, json!({"error": {"code": "404", "message": "Resource not found"}}), "{path}");
        assert!(r.header("apim-request-id").is_some());
    }
    Ok(())
}

#[tokio::test]
async fn scripted_errors_and_resets() -> R {
    let mock = MockServer::start(MockConfig {
        tokens: 3,
        script: vec![
            Behavior::Status(429),
            Behavior::Status(500),
            Behavior::ResetMidStream { after_chunks: 2 },
        ],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let r = conn.request("POST", CHAT, &[CT], &chat_body(json!({}))).await?;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("retry-after-ms"), Some("1000"));
    let v = r.json()?;
    assert_eq!(v["error"]["code"], "429");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    let r = conn.request("POST", EMBED, &[CT], b"{\"input\":\"x\"}").await?;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()?["error"]["code"], "500");

    let mut s = conn.request_streaming("POST", CHAT, &[CT], &chat_body(json!({"stream": true}))).await?;
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
    assert_eq!(text.matches("data: ").count(), 2, "{text}");
    assert!(!text.contains("[DONE]"));
    // Validation errors pass through in OpenAI's shape.
    let r = conn.request("POST", CHAT, &[CT], b"{bad").await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["type"], "invalid_request_error");
    Ok(())
}
