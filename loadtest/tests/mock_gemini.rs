//! The mock's Gemini API over loopback sockets.

use std::time::{Duration, Instant};

use modelux_loadtest::httpc::{self, Conn};
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::{json, Value};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");
const KEY: (&str, &str) = ("x-goog-api-key", "AIza-mock");
const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
const STREAM: &str = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";

fn body(text: &str, extra: Value) -> Vec<u8> {
    let mut v = json!({"contents": [{"role": "user", "parts": [{"text": text}]}]});
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn weather_tools() -> Value {
    json!([{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}},
        {"name": "get_time"}
    ]}])
}

/// Splits a Gemini SSE body: every event is `data: JSON\r\n\r\n`.
fn sse(text: &str) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    assert!(text.ends_with("\r\n\r\n"), "{text:?}");
    let mut out = Vec::new();
    for ev in text.strip_suffix("\r\n\r\n").unwrap_or(text).split("\r\n\r\n") {
        let data = ev.strip_prefix("data: ").ok_or_else(|| format!("not a data line: {ev:?}"))?;
        assert!(!data.contains('\n'), "one line per event: {ev:?}");
        out.push(serde_json::from_str(data)?);
    }
    Ok(out)
}

fn text_of(chunks: &[Value]) -> String {
    chunks.iter().filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str()).collect()
}

#[tokio::test]
async fn generate_content() -> R {
    let mock = MockServer::start(MockConfig { tokens: 3, ..Default::default() }).await?;
    // A gateway configured with the versioned base URL appends `/models/…`.
    let base = mock.gemini_base_url();
    assert_eq!(base, format!("http://{}/v1beta", mock.addr()));
    assert_eq!(format!("{}/models/gemini-2.0-flash:generateContent", &base[base.len() - 7..]), GENERATE);
    let req = body("Say hello", json!({}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let r = conn.request("POST", GENERATE, &[CT, KEY], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json; charset=UTF-8"));
    assert!(r.text().starts_with("{\n  \"candidates\": ["), "pretty-printed like Google: {}", r.text());
    let v = r.json()?;
    assert_eq!(
        v["candidates"],
        json!([{"content": {"parts": [{"text": " tok0 tok1 tok2"}], "role": "model"}, "finishReason": "STOP", "index": 0}])
    );
    let prompt = req.len() as u64 / 4;
    assert_eq!(v["usageMetadata"]["promptTokenCount"], prompt);
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 3);
    assert_eq!(v["usageMetadata"]["totalTokenCount"], prompt + 3);
    assert_eq!(v["modelVersion"], "gemini-2.0-flash");
    assert!(v["responseId"].as_str().is_some_and(|id| !id.is_empty()));
    let rec = &mock.requests()[0];
    assert_eq!(rec.path, GENERATE);
    assert_eq!(rec.header("x-goog-api-key"), Some("AIza-mock"));

    // The stable v1 path and a `?key=` query work too; keep-alive holds.
    let r = conn.request("POST", "/v1/models/gemini-1.5-pro:generateContent?key=k", &[CT], &req).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["modelVersion"], "gemini-1.5-pro");
    // maxOutputTokens cuts the answer.
    let req = body("Say hello", json!({"generationConfig": {"maxOutputTokens": 2}}));
    let v = conn.request("POST", GENERATE, &[CT], &req).await?.json()?;
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], " tok0 tok1");
    assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
    Ok(())
}

#[tokio::test]
async fn stream_generate_content_sse() -> R {
    let (ttft, inter) = (Duration::from_millis(150), Duration::from_millis(50));
    let mock =
        MockServer::start(MockConfig { tokens: 3, ttft, inter_token: inter, ..Default::default() }).await?;
    let req = body("Say hello", json!({}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let t0 = Instant::now();
    let mut s = conn.request_streaming("POST", STREAM, &[CT, KEY], &req).await?;
    assert_eq!(s.status, 200);
    assert!(t0.elapsed() < ttft, "headers before ttft");
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    assert_eq!(s.header("transfer-encoding"), Some("chunked"));
    let first = s.next_chunk().await?.ok_or("no first chunk")?;
    assert!(t0.elapsed() >= ttft);
    assert!(first.starts_with(b"data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" tok0\"}]"));
    assert!(first.ends_with(b"\r\n\r\n"), "one event per chunk");
    let mut text = String::from_utf8_lossy(&first).into_owned();
    text.push_str(&String::from_utf8_lossy(&s.collect().await?));
    assert!(t0.elapsed() >= ttft + inter * 2);
    drop(s);
    assert!(!text.contains("[DONE]"), "no terminal marker");
    let chunks = sse(&text)?;
    assert_eq!(chunks.len(), 3, "one chunk per token");
    assert_eq!(text_of(&chunks), " tok0 tok1 tok2");
    let prompt = req.len() as u64 / 4;
    for c in &chunks[..2] {
        assert!(c["candidates"][0].get("finishReason").is_none());
        assert!(c["usageMetadata"].get("candidatesTokenCount").is_none());
        assert_eq!(c["usageMetadata"]["promptTokenCount"], prompt);
        assert_eq!(c["modelVersion"], "gemini-2.0-flash");
    }
    let last = &chunks[2];
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 3);
    assert_eq!(last["usageMetadata"]["totalTokenCount"], prompt + 3);
    assert_eq!(chunks[0]["responseId"], last["responseId"]);
    // The connection is reusable after the stream.
    assert_eq!(conn.request("POST", GENERATE, &[CT], &req).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn stream_without_alt_sse_is_a_json_array() -> R {
    let mock = MockServer::start(MockConfig { tokens: 2, ..Default::default() }).await?;
    let path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent";
    let r = httpc::request(mock.addr(), "POST", path, &[CT], &body("hi", json!({}))).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json; charset=UTF-8"));
    let v = r.json()?;
    let chunks = v.as_array().ok_or("not an array")?;
    assert_eq!(chunks.len(), 2);
    assert_eq!(text_of(chunks), " tok0 tok1");
    assert_eq!(chunks[1]["candidates"][0]["finishReason"], "STOP");
    Ok(())
}

#[tokio::test]
async fn weather_gets_a_function_call_and_the_round_trip_ends() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let ask = body("What's the weather in Paris?", json!({"tools": weather_tools()}));
    let v = conn.request("POST", GENERATE, &[CT], &ask).await?.json()?;
    let candidate = &v["candidates"][0];
    assert_eq!(
        candidate["content"],
        json!({"parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}], "role": "model"})
    );
    assert_eq!(candidate["finishReason"], "STOP");

    let r = conn.request("POST", STREAM, &[CT], &ask).await?;
    let chunks = sse(&r.text())?;
    assert_eq!(chunks.len(), 1, "a function call comes whole");
    assert_eq!(chunks[0]["candidates"][0]["content"]["parts"][0]["functionCall"]["name"], "get_weather");
    assert_eq!(chunks[0]["candidates"][0]["finishReason"], "STOP");
    assert!(chunks[0]["usageMetadata"]["candidatesTokenCount"].is_u64());

    // The function response ends the round trip with text.
    let round_trip = serde_json::to_vec(&json!({
        "contents": [
            {"role": "user", "parts": [{"text": "What's the weather in Paris?"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}}]},
        ],
        "tools": weather_tools(),
    }))?;
    let v = conn.request("POST", GENERATE, &[CT], &round_trip).await?.json()?;
    assert!(v["candidates"][0]["content"]["parts"][0]["text"].is_string(), "{v}");
    // Tools without a weather question, and a weather question without tools, are text.
    for req in [body("Say hello", json!({"tools": weather_tools()})), body("weather?", json!({}))] {
        let v = conn.request("POST", GENERATE, &[CT], &req).await?.json()?;
        assert!(v["candidates"][0]["content"]["parts"][0]["text"].is_string(), "{v}");
    }
    Ok(())
}

#[tokio::test]
async fn batch_embed_contents() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let path = "/v1beta/models/text-embedding-004:batchEmbedContents";
    let req = serde_json::to_vec(&json!({"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "first"}]}},
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "second"}]}, "outputDimensionality": 16},
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "first"}]}},
    ]}))?;
    let r = httpc::request(mock.addr(), "POST", path, &[CT, KEY], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()?;
    let obj = v.as_object().ok_or("not an object")?;
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["embeddings"]);
    let e = v["embeddings"].as_array().ok_or("no embeddings")?;
    assert_eq!(e.len(), 3, "one per request");
    let values = |i: usize| -> Vec<f64> {
        e[i]["values"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
    };
    assert_eq!(values(0).len(), 768);
    assert_eq!(values(1).len(), 16);
    assert_eq!(values(0), values(2), "same text, same vector");
    assert_ne!(values(0)[..16], values(1)[..]);
    let norm: f64 = values(0).iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-3, "{norm}");

    let single = "/v1beta/models/text-embedding-004:embedContent";
    let req =
        serde_json::to_vec(&json!({"content": {"parts": [{"text": "first"}]}, "outputDimensionality": 8}))?;
    let v = httpc::request(mock.addr(), "POST", single, &[CT], &req).await?.json()?;
    assert_eq!(v["embedding"]["values"].as_array().map(Vec::len), Some(8));
    // Out-of-range dimensionality is INVALID_ARGUMENT.
    let req = serde_json::to_vec(
        &json!({"requests": [{"content": {"parts": [{"text": "x"}]}, "outputDimensionality": 0}]}),
    )?;
    let r = httpc::request(mock.addr(), "POST", path, &[CT], &req).await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["status"], "INVALID_ARGUMENT");
    Ok(())
}

#[tokio::test]
async fn errors_use_google_envelope() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![Behavior::Status(429), Behavior::Status(503), Behavior::Status(400)],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body("hi", json!({}));
    let r = conn.request("POST", GENERATE, &[CT], &req).await?;
    assert_eq!(r.status, 429);
    let v = r.json()?;
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(v["error"]["details"][0]["@type"], "type.googleapis.com/google.rpc.RetryInfo");
    let r = conn.request("POST", STREAM, &[CT], &req).await?;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()?["error"]["status"], "UNAVAILABLE");
    let r = conn.request("POST", "/v1beta/models/e:batchEmbedContents", &[CT], b"{}").await?;
    assert_eq!(r.status, 400);
    let v = r.json()?;
    assert_eq!(
        v,
        json!({"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}})
    );
    // Validation: no contents, invalid JSON.
    for bad in [b"{}".to_vec(), b"{nope".to_vec()] {
        let r = conn.request("POST", GENERATE, &[CT], &bad).await?;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()?["error"]["status"], "INVALID_ARGUMENT");
    }
    // An unknown method is the generic 404.
    let r = conn.request("POST", "/v1beta/models/g:countSheep", &[CT], &req).await?;
    assert_eq!(r.status, 404);
    Ok(())
}

#[tokio::test]
async fn reset_mid_stream_counts_chunks() -> R {
    let mock = MockServer::start(MockConfig {
        tokens: 5,
        script: vec![
            Behavior::ResetMidStream { after_chunks: 2 },
            Behavior::ResetMidStream { after_chunks: 0 },
        ],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body("hi", json!({}));
    let mut s = conn.request_streaming("POST", STREAM, &[CT], &req).await?;
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
    drop(s);
    let chunks = sse(&String::from_utf8_lossy(&got))?;
    assert_eq!(text_of(&chunks), " tok0 tok1");
    // Non-streamed: half a body, then a reset.
    let err = conn.request("POST", GENERATE, &[CT], &req).await.err().ok_or("expected an error")?;
    assert!(matches!(err.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset));
    assert_eq!(conn.request("POST", GENERATE, &[CT], &req).await?.status, 200);
    Ok(())
}
