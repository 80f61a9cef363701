//! The mock's Bedrock Converse API over loopback sockets; stream frames are
//! decoded with the AWS SDK's own event-stream decoder.

use std::time::{Duration, Instant};

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::BytesMut;
use modelux_loadtest::httpc::{self, Conn};
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};
use serde_json::{json, Value};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");
const SIGV4: &str = "AWS4-HMAC-SHA256 Credential=AKIAMOCK/20250101/us-east-1/bedrock/aws4_request, \
                     SignedHeaders=content-type;host;x-amz-date, Signature=0123abcd";
const AUTH: (&str, &str) = ("authorization", SIGV4);
const DATE: (&str, &str) = ("x-amz-date", "20250101T000000Z");
const CONVERSE: &str = "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse";
const STREAM: &str = "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse-stream";

fn body(text: &str, extra: Value) -> Vec<u8> {
    let mut v = json!({"messages": [{"role": "user", "content": [{"text": text}]}]});
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn tool_config() -> Value {
    json!({"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}}]})
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.headers().iter().find(|h| h.name().as_str() == name).and_then(|h| match h.value() {
        HeaderValue::String(s) => Some(s.as_str()),
        _ => None,
    })
}

/// Decodes event-stream frames (CRCs checked) into `(event type, payload)`;
/// fails on trailing bytes.
fn frames(bytes: &[u8]) -> Result<Vec<(String, Value)>, Box<dyn std::error::Error>> {
    let mut buf = BytesMut::from(bytes);
    let mut dec = MessageFrameDecoder::new();
    let mut out = Vec::new();
    while !buf.is_empty() {
        match dec.decode_frame(&mut buf)? {
            DecodedFrame::Complete(m) => {
                assert_eq!(header(&m, ":message-type"), Some("event"));
                assert_eq!(header(&m, ":content-type"), Some("application/json"));
                let name = header(&m, ":event-type").ok_or("no :event-type")?.to_owned();
                let payload: Value = serde_json::from_slice(m.payload())?;
                out.push((name, payload));
            }
            DecodedFrame::Incomplete => return Err(format!("{} trailing bytes", buf.len()).into()),
        }
    }
    Ok(out)
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test]
async fn converse() -> R {
    let latency = Duration::from_millis(30);
    let mock = MockServer::start(MockConfig { tokens: 3, latency, ..Default::default() }).await?;
    let req = body("Say hello", json!({}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let r = conn.request("POST", CONVERSE, &[CT, AUTH, DATE], &req).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("x-amzn-requestid").is_some_and(|id| id.len() == 36));
    let v = r.json()?;
    assert_eq!(
        v["output"],
        json!({"message": {"content": [{"text": " tok0 tok1 tok2"}], "role": "assistant"}})
    );
    assert_eq!(v["stopReason"], "end_turn");
    let input = req.len() as u64 / 4;
    assert_eq!(v["usage"], json!({"inputTokens": input, "outputTokens": 3, "totalTokens": input + 3}));
    assert_eq!(v["metrics"]["latencyMs"], 30);
    // Signing headers are recorded as sent; the model id is matched encoded.
    let rec = &mock.requests()[0];
    assert_eq!(rec.path, CONVERSE);
    assert_eq!(rec.header("authorization"), Some(SIGV4));
    assert_eq!(rec.header("x-amz-date"), Some("20250101T000000Z"));
    // maxTokens cuts the answer; an unencoded ARN with '/' routes too.
    let req = body("hi", json!({"inferenceConfig": {"maxTokens": 1}}));
    let arn = "/model/arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude/converse";
    let v = conn.request("POST", arn, &[CT, AUTH], &req).await?.json()?;
    assert_eq!(v["stopReason"], "max_tokens");
    assert_eq!(v["output"]["message"]["content"][0]["text"], " tok0");
    Ok(())
}

#[tokio::test]
async fn converse_stream_frames() -> R {
    let (ttft, inter) = (Duration::from_millis(150), Duration::from_millis(50));
    let mock =
        MockServer::start(MockConfig { tokens: 3, ttft, inter_token: inter, ..Default::default() }).await?;
    let req = body("Say hello", json!({}));
    let mut conn = Conn::connect(mock.addr()).await?;
    let t0 = Instant::now();
    let mut s = conn.request_streaming("POST", STREAM, &[CT, AUTH, DATE], &req).await?;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("application/vnd.amazon.eventstream"));
    assert_eq!(s.header("transfer-encoding"), Some("chunked"));
    let first = s.next_chunk().await?.ok_or("no first frame")?;
    assert!(t0.elapsed() < ttft, "messageStart before ttft");
    assert_eq!(names(&frames(&first)?), ["messageStart"], "one frame per chunk");
    let mut all = first.to_vec();
    all.extend_from_slice(&s.collect().await?);
    assert!(t0.elapsed() >= ttft + inter * 2);
    drop(s);
    let events = frames(&all)?;
    assert_eq!(
        names(&events),
        [
            "messageStart",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata"
        ]
    );
    // Every payload is padded with `p`, as Bedrock does.
    assert!(events.iter().all(|(_, v)| v["p"].as_str().is_some_and(|p| !p.is_empty())));
    assert_eq!(events[0].1["role"], "assistant");
    let text: String = events.iter().filter_map(|(_, v)| v["delta"]["text"].as_str()).collect();
    assert_eq!(text, " tok0 tok1 tok2");
    assert!(events[1..5].iter().all(|(_, v)| v["contentBlockIndex"] == 0));
    assert_eq!(events[5].1["stopReason"], "end_turn");
    let input = req.len() as u64 / 4;
    assert_eq!(
        events[6].1["usage"],
        json!({"inputTokens": input, "outputTokens": 3, "totalTokens": input + 3})
    );
    assert_eq!(events[6].1["metrics"]["latencyMs"], 250);
    assert_eq!(mock.requests()[0].header("x-amz-date"), Some("20250101T000000Z"));
    assert_eq!(conn.request("POST", CONVERSE, &[CT, AUTH], &req).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn missing_or_foreign_signature_is_403() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body("hi", json!({}));
    for (path, headers, ty) in [
        (CONVERSE, vec![CT], "MissingAuthenticationTokenException"),
        (STREAM, vec![CT], "MissingAuthenticationTokenException"),
        (CONVERSE, vec![CT, ("authorization", "Bearer bedrock-api-key")], "IncompleteSignatureException"),
        (STREAM, vec![CT, ("Authorization", "AWS4-HMAC-SHA256 Signature=x")], "IncompleteSignatureException"),
    ] {
        let r = conn.request("POST", path, &headers, &req).await?;
        assert_eq!(r.status, 403, "{path} {headers:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let et = r.header("x-amzn-errortype").ok_or("no x-amzn-ErrorType")?;
        assert_eq!(et.split(':').next(), Some(ty));
        let v = r.json()?;
        assert_eq!(v.as_object().map(|o| o.len()), Some(1));
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(mock.requests().len(), 4, "rejected requests are recorded too");
    Ok(())
}

#[tokio::test]
async fn weather_tool_use() -> R {
    let mock = MockServer::start(MockConfig::default()).await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let ask = body("What's the weather in Paris?", json!({"toolConfig": tool_config()}));
    let v = conn.request("POST", CONVERSE, &[CT, AUTH], &ask).await?.json()?;
    assert_eq!(v["stopReason"], "tool_use");
    let tool_use = &v["output"]["message"]["content"][0]["toolUse"];
    assert_eq!(tool_use["name"], "get_weather");
    assert_eq!(tool_use["input"], json!({"location": "Paris"}));
    let id = tool_use["toolUseId"].as_str().ok_or("no toolUseId")?.to_owned();
    assert!(id.starts_with("tooluse_"));

    let r = conn.request("POST", STREAM, &[CT, AUTH], &ask).await?;
    let events = frames(&r.body)?;
    assert_eq!(
        names(&events),
        [
            "messageStart",
            "contentBlockStart",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata"
        ]
    );
    assert_eq!(events[1].1["start"]["toolUse"]["name"], "get_weather");
    let input: String = events.iter().filter_map(|(_, v)| v["delta"]["toolUse"]["input"].as_str()).collect();
    assert_eq!(serde_json::from_str::<Value>(&input)?, json!({"location": "Paris"}));
    assert_eq!(events[5].1["stopReason"], "tool_use");

    // The tool result (a user turn without text) ends the round trip.
    let round_trip = serde_json::to_vec(&json!({
        "messages": [
            {"role": "user", "content": [{"text": "What's the weather in Paris?"}]},
            {"role": "assistant", "content": [{"toolUse": tool_use}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": id, "content": [{"json": {"sky": "clear"}}]}}]},
        ],
        "toolConfig": tool_config(),
    }))?;
    let v = conn.request("POST", CONVERSE, &[CT, AUTH], &round_trip).await?.json()?;
    assert_eq!(v["stopReason"], "end_turn");
    Ok(())
}

#[tokio::test]
async fn errors_carry_the_exception_name() -> R {
    let mock = MockServer::start(MockConfig {
        script: vec![
            Behavior::Status(429),
            Behavior::Status(500),
            Behavior::Status(400),
            Behavior::Status(503),
        ],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body("hi", json!({}));
    for (status, path, ty) in [
        (429, CONVERSE, "ThrottlingException"),
        (500, STREAM, "InternalServerException"),
        (400, CONVERSE, "ValidationException"),
        (503, CONVERSE, "ServiceUnavailableException"),
    ] {
        let r = conn.request("POST", path, &[CT, AUTH], &req).await?;
        assert_eq!(r.status, status);
        assert_eq!(
            r.header("x-amzn-errortype"),
            Some(format!("{ty}:http://internal.amazon.com/coral/com.amazon.bedrock/").as_str())
        );
        let v = r.json()?;
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // Validation: no messages.
    let r = conn.request("POST", CONVERSE, &[CT, AUTH], b"{}").await?;
    assert_eq!(r.status, 400);
    assert!(r.header("x-amzn-errortype").is_some_and(|t| t.starts_with("ValidationException:")));
    Ok(())
}

#[tokio::test]
async fn reset_mid_stream_counts_frames() -> R {
    let mock = MockServer::start(MockConfig {
        tokens: 4,
        script: vec![
            Behavior::ResetMidStream { after_chunks: 2 },
            Behavior::ResetMidStream { after_chunks: 1 },
        ],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let req = body("hi", json!({}));
    let mut s = conn.request_streaming("POST", STREAM, &[CT, AUTH], &req).await?;
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
    assert_eq!(names(&frames(&got)?), ["messageStart", "contentBlockDelta"]);
    let err = httpc::request(mock.addr(), "POST", CONVERSE, &[CT, AUTH], &req).await.err();
    assert!(err.is_some(), "non-streamed answer is cut");
    Ok(())
}
