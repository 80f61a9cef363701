//! `Behavior::Replay`: recorded bytes answered verbatim, in chosen pieces.

use modelux_loadtest::httpc::Conn;
use modelux_loadtest::mock::{Behavior, MockConfig, MockServer};

type R = Result<(), Box<dyn std::error::Error>>;

const CT: (&str, &str) = ("content-type", "application/json");

fn replay(status: u16, content_type: &str, body: &[u8], chunk: usize) -> Behavior {
    Behavior::Replay { status, content_type: content_type.to_owned(), body: body.to_vec(), chunk }
}

#[tokio::test]
async fn replay_in_one_byte_chunks() -> R {
    let fixture = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n\xF0\x9F\x98\x80 not even utf-8: \xFF\n";
    let mock = MockServer::start(MockConfig {
        script: vec![replay(200, "text/event-stream; charset=utf-8", fixture, 1)],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let mut s = conn.request_streaming("POST", "/v1/messages", &[CT], b"{}").await?;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert_eq!(s.header("transfer-encoding"), Some("chunked"));
    // The route's own headers stay (Anthropic's here).
    assert!(s.header("request-id").is_some());
    let mut got = Vec::new();
    let mut pieces = 0;
    while let Some(c) = s.next_chunk().await? {
        assert_eq!(c.len(), 1, "one byte per HTTP chunk");
        got.extend_from_slice(&c);
        pieces += 1;
    }
    drop(s);
    assert_eq!(got, fixture);
    assert_eq!(pieces, fixture.len());
    // Defaults apply again on the same connection.
    let r = conn.request("POST", "/v1/chat/completions", &[CT], b"{\"model\":\"m\"}").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["object"], "chat.completion");
    Ok(())
}

#[tokio::test]
async fn replay_any_status_route_and_piece_size() -> R {
    let error = br#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}"#;
    let mock = MockServer::start(MockConfig {
        script: vec![
            replay(429, "application/json; charset=UTF-8", error, 0),
            replay(200, "application/json", b"0123456789", 4),
            replay(503, "text/plain", b"", 0),
            replay(200, "application/json", b"{}", 0),
        ],
        ..Default::default()
    })
    .await?;
    let mut conn = Conn::connect(mock.addr()).await?;
    let path = "/v1beta/models/gemini-2.0-flash:generateContent";
    let mut s = conn.request_streaming("POST", path, &[CT], b"{}").await?;
    assert_eq!(s.status, 429);
    assert_eq!(s.header("content-type"), Some("application/json; charset=UTF-8"));
    let whole = s.next_chunk().await?.ok_or("no body")?;
    assert_eq!(&whole[..], error, "chunk 0: the body in one piece");
    assert!(s.next_chunk().await?.is_none());
    drop(s);

    let mut s = conn.request_streaming("POST", "/v2/chat", &[CT], b"{}").await?;
    let mut sizes = Vec::new();
    while let Some(c) = s.next_chunk().await? {
        sizes.push(c.len());
    }
    drop(s);
    assert_eq!(sizes, [4, 4, 2]);

    let r = conn.request("POST", "/model/m/converse", &[CT], b"{}").await?;
    assert_eq!(r.status, 503);
    assert!(r.body.is_empty());
    // Replay answers even where the mock has no route.
    let r = conn.request("GET", "/nowhere", &[], b"").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"{}");
    assert_eq!(mock.request_count(), 4);
    Ok(())
}
