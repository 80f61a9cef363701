//! AWS Bedrock Runtime (`kind: bedrock`): the provider adapter. Every request is signed with
//! SigV4 ([`sign`]); credentials travel in the provider's api_key as
//! `ACCESS_KEY_ID::SECRET_ACCESS_KEY::REGION[::SESSION_TOKEN]`, and the region gives the
//! default endpoint. Streamed answers are `application/vnd.amazon.eventstream` frames, cut
//! into events by [`FrameDecoder`] for the Bedrock codec (`wire::bedrock`).

use std::time::SystemTime;

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message as FrameMessage;
use serde_json::json;

use super::adapter::{Adapter, Credential, Signer};
use super::Provider;
use crate::sse::Framer;
use crate::wire::WireFormat;

pub struct Bedrock;

impl Adapter for Bedrock {
    fn kind(&self) -> &'static str {
        "bedrock"
    }

    fn format(&self) -> WireFormat {
        WireFormat::Bedrock
    }

    /// The runtime endpoint of the region the credentials name.
    fn default_base_url(&self, _id: &str, api_key: Option<&str>) -> Option<String> {
        let creds = Credentials::parse(api_key?).ok()?;
        Some(base_url(&creds.region))
    }

    fn base_url_required(&self) -> String {
        "is required for kind bedrock when api_key (which names the region) is not set".into()
    }

    fn credential(&self, api_key: &str) -> Result<Credential, String> {
        Ok(Credential::Signer(Box::new(Credentials::parse(api_key)?)))
    }

    fn chat_path(&self, provider: &Provider, model: &str, stream: bool) -> String {
        provider.upstream_path(&chat_path(model, stream))
    }

    fn stream_accept(&self) -> &'static str {
        "application/vnd.amazon.eventstream"
    }

    fn stream_framer(&self) -> Box<dyn Framer> {
        Box::new(FrameDecoder::new())
    }

    /// Listing models is on the `bedrock` control-plane host, not `bedrock-runtime`, which
    /// this provider is addressed at: keys are not checked up front.
    fn verify_path(&self, _provider: &Provider) -> Option<String> {
        None
    }
}

impl Signer for Credentials {
    fn sign(&self, host: &str, path_and_query: &str, body: &[u8]) -> Result<Vec<(String, String)>, String> {
        sign(self, host, path_and_query, body, SystemTime::now())
    }
}

impl Framer for FrameDecoder {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<crate::sse::Event>) -> Result<(), String> {
        FrameDecoder::feed(self, bytes, out)
    }

    fn finish(&mut self, _out: &mut Vec<crate::sse::Event>) -> Result<(), String> {
        FrameDecoder::finish(self)
    }
}

/// SigV4 signing name of the Bedrock Runtime API.
pub const SIGNING_NAME: &str = "bedrock";

/// Default base URL of the runtime API in `region`.
pub fn base_url(region: &str) -> String {
    format!("https://bedrock-runtime.{region}.amazonaws.com")
}

/// Path under the base URL for a chat call. The model id (which may be an ARN with `:` and
/// `/`) is one percent-encoded path segment, as the AWS SDKs send it.
pub fn chat_path(model: &str, stream: bool) -> String {
    let op = if stream { "converse-stream" } else { "converse" };
    format!("/model/{}/{op}", encode_segment(model))
}

/// RFC 3986: everything but unreserved characters is escaped (uppercase hex).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
// ---------------------------------------------------------------------------------------------
// Credentials and SigV4

/// AWS credentials parsed from the provider's api_key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
    pub session_token: Option<String>,
}

impl Credentials {
    /// Parses `ACCESS_KEY_ID::SECRET_ACCESS_KEY::REGION[::SESSION_TOKEN]`. Errors never quote
    /// the input: it holds secrets.
    pub fn parse(s: &str) -> Result<Credentials, String> {
        const FORMAT: &str = "ACCESS_KEY_ID::SECRET_ACCESS_KEY::REGION[::SESSION_TOKEN]";
        let parts: Vec<&str> = s.trim().split("::").map(str::trim).collect();
        let (id, secret, region, token) = match parts.as_slice() {
            [id, secret, region] => (*id, *secret, *region, None),
            // An empty token (a template with an unset variable) means none.
            [id, secret, region, token] => (*id, *secret, *region, Some(*token).filter(|t| !t.is_empty())),
            _ => {
                return Err(format!(
                    "Bedrock api_key must be {FORMAT}: found {} `::`-separated parts",
                    parts.len()
                ))
            }
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "Bedrock api_key ({FORMAT}): the access key id must be non-empty and alphanumeric"
            ));
        }
        // Secrets and tokens become header bytes (the token) or HMAC keys: printable ASCII only.
        let printable = |v: &str| v.bytes().all(|b| b.is_ascii_graphic());
        if secret.is_empty() || !printable(secret) {
            return Err(format!(
                "Bedrock api_key ({FORMAT}): the secret access key must be non-empty printable ASCII"
            ));
        }
        if region.is_empty()
            || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "Bedrock api_key ({FORMAT}): the region must look like us-east-1 (lowercase letters, digits, '-')"
            ));
        }
        if token.is_some_and(|t| !printable(t)) {
            return Err(format!("Bedrock api_key ({FORMAT}): the session token must be printable ASCII"));
        }
        Ok(Credentials {
            access_key_id: id.to_string(),
            secret_access_key: secret.to_string(),
            region: region.to_string(),
            session_token: token.map(str::to_string),
        })
    }
}

impl std::fmt::Debug for Credentials {
    // The access key id identifies a key but grants nothing (AWS's own types print it too).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field("region", &self.region)
            .field("session_token", &self.session_token.as_ref().map(|_| "** redacted **"))
            .finish()
    }
}

/// SigV4 headers (name, value) to add to a POST with `Content-Type: application/json`:
/// `x-amz-date`, `authorization`, and `x-amz-security-token` when a session token is set.
/// `host` is the Host header as it will be sent (with its port if not the default);
/// `path_and_query` is the request target exactly as sent (model id already percent-encoded,
/// as [`chat_path`] does). Signed headers: host, x-amz-date (and the token). Content-Type is
/// deliberately not signed, so the transport may add parameters to it.
pub fn sign(
    creds: &Credentials,
    host: &str,
    path_and_query: &str,
    body: &[u8],
    now: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    sign_v4(
        creds,
        SIGNING_NAME,
        "POST",
        host,
        path_and_query,
        &[],
        body,
        now,
        aws_sigv4::http_request::PercentEncodingMode::Double,
    )
}

/// The general signer, so tests can replay AWS's published SigV4 suite (other services,
/// extra headers). `encoding` is `Double` for every service but S3: AWS re-encodes the
/// already-encoded path (`%3A` is signed as `%253A`).
#[allow(clippy::too_many_arguments)]
fn sign_v4(
    creds: &Credentials,
    service: &str,
    method: &str,
    host: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    now: SystemTime,
    encoding: aws_sigv4::http_request::PercentEncodingMode,
) -> Result<Vec<(String, String)>, String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningParams, SigningSettings};
    if host.is_empty() || host.contains(|c: char| matches!(c, '/' | '?' | '#' | '@') || c.is_whitespace()) {
        return Err("SigV4: host must be a bare host[:port]".into());
    }
    if !path_and_query.starts_with('/') {
        return Err("SigV4: the request path must start with '/'".into());
    }
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.as_str(),
        creds.secret_access_key.as_str(),
        creds.session_token.clone(),
        None,
        "modelux",
    )
    .into();
    // Defaults are what AWS expects of non-S3 services: path normalised, session token
    // signed, no x-amz-content-sha256.
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = encoding;
    let params: SigningParams = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&creds.region)
        .name(service)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| format!("SigV4: {e}"))?
        .into();
    let uri = format!("https://{host}{path_and_query}");
    // Host is passed explicitly so it is signed exactly as it will be sent.
    let all = std::iter::once(("host", host)).chain(headers.iter().copied());
    let request = SignableRequest::new(method, uri, all, SignableBody::Bytes(body))
        .map_err(|e| format!("SigV4: cannot sign this request: {e}"))?;
    let (instructions, _signature) =
        aws_sigv4::http_request::sign(request, &params).map_err(|e| format!("SigV4: {e}"))?.into_parts();
    Ok(instructions.headers().map(|(name, value)| (name.to_string(), value.to_string())).collect())
}

// ---------------------------------------------------------------------------------------------
// Stream: eventstream framing

/// Bedrock caps an eventstream message well below this; beyond it the upstream is not
/// speaking eventstream (a corrupt length would otherwise make us buffer without end).
const MAX_FRAME: usize = 24 * 1024 * 1024;
/// Prelude (12 bytes) and message CRC (4).
const MIN_FRAME: usize = 16;

/// `application/vnd.amazon.eventstream` bytes → events, one per complete message.
#[derive(Default)]
pub struct FrameDecoder {
    decoder: MessageFrameDecoder,
    /// Bytes not yet consumed by `decoder`.
    buf: Vec<u8>,
    /// `decoder` holds the prelude of a message whose rest has not arrived.
    in_frame: bool,
}

fn header<'a>(m: &'a FrameMessage, name: &str) -> Option<&'a str> {
    m.headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| h.value().as_string().ok())
        .map(|s| s.as_str())
}

fn event_of(m: &FrameMessage) -> Result<crate::sse::Event, String> {
    let payload =
        std::str::from_utf8(m.payload()).map_err(|_| "eventstream payload is not UTF-8".to_string())?;
    let (event, data) = match header(m, ":message-type") {
        Some("event") => (
            header(m, ":event-type").ok_or("eventstream event without :event-type")?.to_string(),
            payload.to_string(),
        ),
        Some("exception") => {
            (format!("exception:{}", header(m, ":exception-type").unwrap_or("unknown")), payload.to_string())
        }
        Some("error") => {
            // Error messages carry their text in headers, usually with an empty payload.
            let data = if payload.trim().is_empty() {
                json!({"message": header(m, ":error-message").unwrap_or_default()}).to_string()
            } else {
                payload.to_string()
            };
            (format!("error:{}", header(m, ":error-code").unwrap_or("unknown")), data)
        }
        other => return Err(format!("eventstream message with unknown :message-type {other:?}")),
    };
    Ok(crate::sse::Event { event, data })
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Feeds raw bytes (any split); appends one `crate::sse::Event` per complete message:
    /// `event` = the `:event-type` header for `:message-type` `event`,
    /// `exception:<:exception-type>` for exceptions, `error:<:error-code>` for errors;
    /// `data` = the payload as UTF-8 JSON (for errors with no payload,
    /// `{"message": <:error-message>}`). Bad CRCs, lengths or headers → Err.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<crate::sse::Event>) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        let mut consumed = 0;
        let result = loop {
            let mut rest: &[u8] = self.buf.get(consumed..).unwrap_or_default();
            // The decoder checks the prelude CRC only once the whole message is in; an absurd
            // length (a body that is not eventstream at all) is refused at once instead.
            if !self.in_frame {
                if let Some(len) = rest.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                    let len = u32::from_be_bytes(len) as usize;
                    if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
                        break Err(format!("invalid eventstream frame: message length {len}"));
                    }
                }
            }
            let before = rest.len();
            let frame = self.decoder.decode_frame(&mut rest);
            let used = before - rest.len();
            consumed += used;
            match frame {
                Ok(DecodedFrame::Complete(m)) => {
                    self.in_frame = false;
                    match event_of(&m) {
                        Ok(ev) => out.push(ev),
                        Err(e) => break Err(e),
                    }
                }
                Ok(DecodedFrame::Incomplete) => {
                    // The decoder keeps a prelude it has read until the rest arrives.
                    self.in_frame |= used > 0;
                    break Ok(());
                }
                Err(e) => break Err(format!("invalid eventstream frame: {e}")),
            }
        };
        self.buf.drain(..consumed.min(self.buf.len()));
        result?;
        if self.buf.len() > MAX_FRAME {
            return Err("eventstream message too large".into());
        }
        Ok(())
    }

    /// End of body: Err if a partial frame remains.
    pub fn finish(&mut self) -> Result<(), String> {
        if self.in_frame || !self.buf.is_empty() {
            return Err("the upstream eventstream ended inside a message".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::Event;
    use crate::wire::bedrock::StreamDecoder;
    use crate::wire::canonical::*;
    use serde_json::Value;
    use std::time::{Duration, UNIX_EPOCH};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bedrock");
    const STREAMS: &[&str] = &["stream_text", "stream_tool_use", "stream_thinking", "stream_error"];

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    // ---- eventstream helpers (test-only encoder: AWS's own frame writer) ----

    fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
        use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
        let mut m = Message::new(payload.to_vec());
        for (name, value) in headers {
            m = m.add_header(Header::new(name.to_string(), HeaderValue::String(value.to_string().into())));
        }
        let mut out = Vec::new();
        aws_smithy_eventstream::frame::write_message_to(&m, &mut out).unwrap();
        out
    }

    /// A `.json` listing (`[{"headers": [[name, value]…], "payload": {…}}…]`) → eventstream bytes.
    fn encode_listing(listing: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        for item in listing.as_array().unwrap() {
            let headers: Vec<(&str, &str)> = item["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (h[0].as_str().unwrap(), h[1].as_str().unwrap()))
                .collect();
            out.extend(frame(&headers, &serde_json::to_vec(&item["payload"]).unwrap()));
        }
        out
    }

    fn stream_bytes(name: &str) -> Vec<u8> {
        fixture(&format!("{name}.bin"))
    }

    /// Frames → events → deltas, the body delivered in two reads split at `split`.
    fn run(bytes: &[u8], split: usize) -> Result<Vec<Delta>, String> {
        let (mut frames, mut dec) = (FrameDecoder::new(), StreamDecoder::default());
        let (mut events, mut out) = (Vec::new(), Vec::new());
        for chunk in [&bytes[..split], &bytes[split..]] {
            frames.feed(chunk, &mut events)?;
            dec.decode(&mut events, &mut out)?;
        }
        frames.finish()?;
        dec.finish(&mut out)?;
        Ok(out)
    }

    fn start() -> Delta {
        Delta::Start { id: String::new(), model: String::new() }
    }

    // ---- paths ----

    #[test]
    fn chat_path_encodes_the_model_id_as_one_segment() {
        assert_eq!(
            chat_path("anthropic.claude-3-5-sonnet-20240620-v1:0", false),
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
        );
        assert_eq!(
            chat_path("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet-20250219-v1:0", true),
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse-stream"
        );
        assert_eq!(chat_path("a b~é", false), "/model/a%20b~%C3%A9/converse");
        assert_eq!(base_url("eu-west-3"), "https://bedrock-runtime.eu-west-3.amazonaws.com");
    }

    // ---- eventstream framing ----

    /// Run once to (re)write the binary stream fixtures from their readable listings.
    #[test]
    #[ignore = "writes tests/fixtures/bedrock/*.bin"]
    fn regenerate_stream_fixtures() {
        for name in STREAMS {
            let bytes = encode_listing(&json_of(&fixture(&format!("{name}.json"))));
            std::fs::write(format!("{FIXTURES}/{name}.bin"), bytes).unwrap();
        }
    }

    #[test]
    fn stream_fixtures_match_their_listings() {
        for name in STREAMS {
            let listing = json_of(&fixture(&format!("{name}.json")));
            assert_eq!(stream_bytes(name), encode_listing(&listing), "{name}.bin is stale");
            // And they decode back to the listed events.
            let mut events = Vec::new();
            let mut frames = FrameDecoder::new();
            frames.feed(&stream_bytes(name), &mut events).unwrap();
            frames.finish().unwrap();
            let listed: Vec<(String, Value)> = listing
                .as_array()
                .unwrap()
                .iter()
                .map(|item| {
                    let h = |n: &str| {
                        item["headers"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .find(|h| h[0] == n)
                            .map(|h| h[1].as_str().unwrap())
                    };
                    let event = match h(":message-type") {
                        Some("exception") => format!("exception:{}", h(":exception-type").unwrap()),
                        _ => h(":event-type").unwrap().to_string(),
                    };
                    (event, item["payload"].clone())
                })
                .collect();
            let decoded: Vec<(String, Value)> =
                events.into_iter().map(|e| (e.event, serde_json::from_str(&e.data).unwrap())).collect();
            assert_eq!(decoded, listed, "{name}");
        }
    }

    #[test]
    fn frame_writer_matches_published_eventstream_vectors() {
        // From the AWS event stream test suite (encoded/positive/payload_no_headers and
        // payload_one_str_header), as used by aws-c-event-stream and botocore.
        assert_eq!(
            frame(&[], b"{'foo':'bar'}"),
            b"\x00\x00\x00\x1d\x00\x00\x00\x00\xfd\x52\x8c\x5a{'foo':'bar'}\xc3\x65\x39\x36".to_vec()
        );
        assert_eq!(
            frame(&[("content-type", "application/json")], b"{'foo':'bar'}"),
            b"\x00\x00\x00\x3d\x00\x00\x00\x20\x07\xfd\x83\x96\x0ccontent-type\x07\x00\x10application/json{'foo':'bar'}\x8d\x9c\x08\xb1".to_vec()
        );
    }

    #[test]
    fn frame_decoder_rejects_bad_crcs_and_unknown_message_types() {
        let good = frame(
            &[(":event-type", "messageStart"), (":message-type", "event")],
            b"{\"role\":\"assistant\"}",
        );
        let mut events = Vec::new();
        FrameDecoder::new().feed(&good, &mut events).unwrap();
        assert_eq!(
            events,
            vec![Event { event: "messageStart".into(), data: "{\"role\":\"assistant\"}".into() }]
        );

        // A flipped payload byte breaks the message CRC, a flipped header-length byte the
        // prelude CRC; an absurd total length is refused before any buffering.
        for (at, flip) in [(good.len() - 6, 0x01), (6, 0x01), (0, 0x80)] {
            let mut bad = good.clone();
            bad[at] ^= flip;
            let err = FrameDecoder::new().feed(&bad, &mut Vec::new());
            assert!(
                err.unwrap_err().contains("invalid eventstream frame"),
                "corruption at {at} went unnoticed"
            );
        }
        // A body that is not eventstream at all.
        assert!(FrameDecoder::new().feed(b"{\"message\":\"x\"}", &mut Vec::new()).is_err());
        // A plausible but wrong length only shows when the body ends short of it.
        let mut bad = good.clone();
        bad[2] ^= 0x01;
        let mut d = FrameDecoder::new();
        d.feed(&bad, &mut Vec::new()).unwrap();
        assert!(d.finish().is_err());
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        assert!(FrameDecoder::new()
            .feed(&bad, &mut Vec::new())
            .unwrap_err()
            .contains("invalid eventstream frame"));

        // The published vector frames fine but is not a Bedrock message.
        let err = FrameDecoder::new().feed(&frame(&[], b"{'foo':'bar'}"), &mut Vec::new()).unwrap_err();
        assert!(err.contains(":message-type"), "{err}");
    }

    #[test]
    fn frame_decoder_maps_exceptions_and_errors() {
        let mut events = Vec::new();
        let mut d = FrameDecoder::new();
        let mut bytes = frame(
            &[
                (":exception-type", "modelStreamErrorException"),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            b"{\"message\":\"boom\",\"originalStatusCode\":500}",
        );
        bytes.extend(frame(
            &[
                (":error-code", "InternalFailure"),
                (":error-message", "stream failed"),
                (":message-type", "error"),
            ],
            b"",
        ));
        d.feed(&bytes, &mut events).unwrap();
        d.finish().unwrap();
        assert_eq!(
            events,
            vec![
                Event {
                    event: "exception:modelStreamErrorException".into(),
                    data: "{\"message\":\"boom\",\"originalStatusCode\":500}".into()
                },
                Event {
                    event: "error:InternalFailure".into(),
                    data: "{\"message\":\"stream failed\"}".into()
                },
            ]
        );
    }

    #[test]
    fn frame_decoder_finish_detects_partial_frames() {
        let bytes = stream_bytes("stream_text");
        for cut in [1, 11, 12, 13, bytes.len() - 1] {
            let mut d = FrameDecoder::new();
            d.feed(&bytes[..cut], &mut Vec::new()).unwrap();
            assert!(d.finish().is_err(), "cut at {cut}");
        }
    }

    // ---- stream decoding ----

    fn expected_stream(name: &str) -> Vec<Delta> {
        match name {
            "stream_text" => vec![
                start(),
                Delta::Text("Paris is".into()),
                Delta::Text(" the capital of France.".into()),
                Delta::Stop(StopReason::EndTurn),
                Delta::Usage(Usage { input: 2060, output: 9, cache_read: 2048, cache_write: 0, reasoning: 0 }),
                Delta::Done,
            ],
            "stream_tool_use" => vec![
                start(),
                Delta::Text("I'll look up both.".into()),
                Delta::ToolCallStart { call: 0, id: "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q".into(), name: "get_weather".into() },
                Delta::ToolArgs { call: 0, json: "{\"location\": \"Pa".into() },
                Delta::ToolArgs { call: 0, json: "ris\"}".into() },
                Delta::ToolCallStart { call: 1, id: "tooluse_Qm8HvQ1rS7mXb3o1yq2T0A".into(), name: "get_time".into() },
                Delta::ToolArgs { call: 1, json: "{\"timezone\": \"Europe/Paris\"}".into() },
                Delta::Stop(StopReason::ToolUse),
                Delta::Usage(Usage { input: 1910, output: 96, cache_read: 0, cache_write: 1500, reasoning: 0 }),
                Delta::Done,
            ],
            "stream_thinking" => vec![
                start(),
                Delta::Thinking("The user asks for 27 * 453.".into()),
                Delta::Thinking(" 27 * 453 = 12231.".into()),
                Delta::Signature("EqQBCkYIARgCIkDdPAkX9zZzVyv3C2W1SOXSbYc3Mt1pG0oF0cH3gHFhf3jJtKzPZ4V5yB0Dq8lmTQLoYk7bd4o4fS7tJx5YEgy0f0kq".into()),
                // the redacted block has no canonical delta
                Delta::Text("27 * 453 = 12,231.".into()),
                Delta::Stop(StopReason::EndTurn),
                Delta::Usage(Usage { input: 58, output: 164, cache_read: 0, cache_write: 0, reasoning: 0 }),
                Delta::Done,
            ],
            "stream_error" => vec![
                start(),
                Delta::Text("Paris is".into()),
                Delta::Error {
                    kind: "rate_limit_error".into(),
                    message: "Too many tokens, please wait before trying again.".into(),
                },
            ],
            _ => unreachable!(),
        }
    }

    #[test]
    fn stream_fixtures_decode_identically_at_every_split() {
        for name in STREAMS {
            let bytes = stream_bytes(name);
            let expected = expected_stream(name);
            for split in 0..=bytes.len() {
                assert_eq!(run(&bytes, split).unwrap(), expected, "{name} split at {split}");
            }
        }
    }

    #[test]
    fn stream_deltas_come_out_as_each_event_arrives() {
        let listing = json_of(&fixture("stream_text.json"));
        let items = listing.as_array().unwrap();
        let (mut frames, mut dec) = (FrameDecoder::new(), StreamDecoder::default());
        let (mut events, mut out) = (Vec::new(), Vec::new());
        let mut counts = Vec::new();
        for item in items {
            frames.feed(&encode_listing(&json!([item])), &mut events).unwrap();
            dec.decode(&mut events, &mut out).unwrap();
            counts.push(out.len());
        }
        // messageStart → Start; two text deltas; contentBlockStop → nothing; messageStop → Stop;
        // metadata → Usage + Done.
        assert_eq!(counts, vec![1, 2, 3, 3, 4, 6]);
    }

    #[test]
    fn stream_without_metadata_still_completes() {
        let mut listing = json_of(&fixture("stream_text.json"));
        listing.as_array_mut().unwrap().pop();
        let bytes = encode_listing(&listing);
        let mut expected = expected_stream("stream_text");
        expected.retain(|d| !matches!(d, Delta::Usage(_)));
        assert_eq!(run(&bytes, 0).unwrap(), expected);
    }

    #[test]
    fn truncated_streams_fail() {
        // Cut inside a frame: the framing notices.
        let bytes = stream_bytes("stream_text");
        assert!(run(&bytes[..bytes.len() - 10], 7).unwrap_err().contains("inside a message"));
        // Cut on a frame boundary before messageStop: the decoder notices.
        let mut listing = json_of(&fixture("stream_tool_use.json"));
        listing.as_array_mut().unwrap().truncate(7);
        let err = run(&encode_listing(&listing), 3).unwrap_err();
        assert!(err.contains("before messageStop"), "{err}");
    }

    #[test]
    fn nothing_after_a_terminal_event() {
        let mut dec = StreamDecoder::default();
        let mut out = Vec::new();
        let ev = |event: &str, data: Value| Event { event: event.into(), data: data.to_string() };
        let mut events = vec![
            ev("messageStart", json!({"role": "assistant"})),
            ev("messageStop", json!({"stopReason": "end_turn"})),
            ev("metadata", json!({"usage": {"inputTokens": 1, "outputTokens": 2, "totalTokens": 3}})),
            ev("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": "late"}})),
        ];
        dec.decode(&mut events, &mut out).unwrap();
        dec.decode(&mut vec![ev("metadata", json!({}))], &mut out).unwrap();
        dec.finish(&mut out).unwrap();
        assert_eq!(
            out,
            vec![
                start(),
                Delta::Stop(StopReason::EndTurn),
                Delta::Usage(Usage { input: 1, output: 2, ..Usage::default() }),
                Delta::Done
            ]
        );
        // After an error, finish adds nothing (no Done).
        let mut dec = StreamDecoder::default();
        let mut out = Vec::new();
        dec.decode(&mut vec![ev("exception:internalServerException", json!({}))], &mut out).unwrap();
        dec.finish(&mut out).unwrap();
        assert_eq!(
            out,
            vec![Delta::Error {
                kind: "api_error".into(),
                message: "Bedrock stream error: internalServerException".into()
            }]
        );
    }

    #[test]
    fn exception_kinds() {
        for (name, kind) in [
            ("throttlingException", "rate_limit_error"),
            ("serviceUnavailableException", "overloaded_error"),
            ("validationException", "invalid_request_error"),
            ("internalServerException", "api_error"),
            ("modelStreamErrorException", "api_error"),
            ("ModelTimeoutException", "timeout_error"),
        ] {
            let mut out = Vec::new();
            let mut events =
                vec![Event { event: format!("exception:{name}"), data: "{\"message\":\"m\"}".into() }];
            StreamDecoder::default().decode(&mut events, &mut out).unwrap();
            assert_eq!(out, vec![Delta::Error { kind: kind.into(), message: "m".into() }], "{name}");
        }
        // `:message-type` error frames arrive as `error:<code>`.
        let mut out = Vec::new();
        let mut events = vec![Event {
            event: "error:InternalFailure".into(),
            data: "{\"message\":\"stream failed\"}".into(),
        }];
        StreamDecoder::default().decode(&mut events, &mut out).unwrap();
        assert_eq!(out, vec![Delta::Error { kind: "api_error".into(), message: "stream failed".into() }]);
    }

    // ---- credentials and SigV4 ----

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    // From the AWS SigV4 test suite (post-sts-token).
    const STS_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    fn suite_time() -> SystemTime {
        // 20150830T123600Z, the time of every case in the AWS SigV4 test suite.
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn creds(token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: AKID.into(),
            secret_access_key: SECRET.into(),
            region: "us-east-1".into(),
            session_token: token.map(str::to_string),
        }
    }

    fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn suite_sign(token: Option<&str>, headers: &[(&str, &str)], body: &[u8]) -> Vec<(String, String)> {
        use aws_sigv4::http_request::PercentEncodingMode;
        sign_v4(
            &creds(token),
            "service",
            "POST",
            "example.amazonaws.com",
            "/",
            headers,
            body,
            suite_time(),
            PercentEncodingMode::Double,
        )
        .unwrap()
    }

    #[test]
    fn sigv4_matches_aws_test_suite() {
        let scope = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";
        // post-vanilla
        let h = suite_sign(None, &[], b"");
        assert_eq!(header_of(&h, "x-amz-date"), "20150830T123600Z");
        assert_eq!(
            header_of(&h, "authorization"),
            format!("{scope}, SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b")
        );
        // post-x-www-form-urlencoded: a signed content type and a body
        let h = suite_sign(None, &[("Content-Type", "application/x-www-form-urlencoded")], b"Param1=value1");
        assert_eq!(
            header_of(&h, "authorization"),
            format!("{scope}, SignedHeaders=content-type;host;x-amz-date, Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a")
        );
        // post-sts-header-before: the session token is sent and signed
        let h = suite_sign(Some(STS_TOKEN), &[], b"");
        assert_eq!(
            header_of(&h, "authorization"),
            format!("{scope}, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead")
        );
        assert_eq!(header_of(&h, "x-amz-security-token"), STS_TOKEN);
    }

    #[test]
    fn sigv4_double_encodes_the_model_path() {
        use aws_sigv4::http_request::PercentEncodingMode::{Double, Single};
        // AWS signs the already-encoded path encoded once more: `%3A` as `%253A`.
        let path = chat_path("anthropic.claude-3-5-sonnet-20240620-v1:0", false);
        let twice = path.replace('%', "%25");
        let host = "bedrock-runtime.us-east-1.amazonaws.com";
        let (c, t) = (creds(None), suite_time());
        let a = sign_v4(&c, "bedrock", "POST", host, &path, &[], b"{}", t, Double).unwrap();
        let b = sign_v4(&c, "bedrock", "POST", host, &twice, &[], b"{}", t, Single).unwrap();
        let naive = sign_v4(&c, "bedrock", "POST", host, &path, &[], b"{}", t, Single).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, naive);
        assert_eq!(sign(&c, host, &path, b"{}", t).unwrap(), a);
    }

    #[test]
    fn bedrock_signing_headers() {
        let host = "bedrock-runtime.us-east-1.amazonaws.com";
        let path = chat_path("anthropic.claude-3-5-sonnet-20240620-v1:0", true);
        let h = sign(&creds(None), host, &path, b"{\"messages\":[]}", suite_time()).unwrap();
        let names: Vec<&str> = h.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["x-amz-date", "authorization"]);
        let auth = header_of(&h, "authorization");
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature="), "{auth}");

        let h = sign(&creds(Some("session-token/+=")), host, &path, b"{}", suite_time()).unwrap();
        assert_eq!(header_of(&h, "x-amz-security-token"), "session-token/+=");
        assert!(
            header_of(&h, "authorization").contains("SignedHeaders=host;x-amz-date;x-amz-security-token,")
        );

        // A custom endpoint with a port signs the port too, and the signature depends on it.
        let other = sign(&creds(None), "localhost:8443", &path, b"{}", suite_time()).unwrap();
        assert_ne!(header_of(&other, "authorization"), header_of(&h, "authorization"));

        assert!(sign(&creds(None), "", &path, b"{}", suite_time()).is_err());
        assert!(sign(&creds(None), "a/b", &path, b"{}", suite_time()).is_err());
        assert!(sign(&creds(None), host, "model/x", b"{}", suite_time()).is_err());
    }

    #[test]
    fn credentials_parse() {
        let c = Credentials::parse(&format!("{AKID}::{SECRET}::us-east-1")).unwrap();
        assert_eq!(c, creds(None));
        let c = Credentials::parse(&format!(" {AKID}::{SECRET}::us-east-1::{STS_TOKEN}\n")).unwrap();
        assert_eq!(c, creds(Some(STS_TOKEN)));
        let c = Credentials::parse(&format!("{AKID}::{SECRET}::us-east-1::")).unwrap();
        assert_eq!(c.session_token, None);

        for bad in [
            format!("{AKID}::{SECRET}"),
            format!("{AKID}::{SECRET}::us-east-1::{STS_TOKEN}::x"),
            format!("::{SECRET}::us-east-1"),
            format!("AKID-1::{SECRET}::us-east-1"),
            format!("{AKID}::::us-east-1"),
            format!("{AKID}::{SECRET} x::us-east-1"),
            format!("{AKID}::{SECRET}::US-EAST-1"),
            format!("{AKID}::{SECRET}::"),
            format!("{AKID}::{SECRET}::us-east-1::tok en"),
        ] {
            let err = Credentials::parse(&bad).unwrap_err();
            assert!(err.contains("ACCESS_KEY_ID::SECRET_ACCESS_KEY::REGION"), "{err}");
            assert!(
                !err.contains(SECRET) && !err.contains("EXAMPLEKEY") && !err.contains(STS_TOKEN),
                "{err}"
            );
        }
    }

    #[test]
    fn credentials_debug_redacts_secrets() {
        let shown = format!("{:?}", creds(Some(STS_TOKEN)));
        assert!(!shown.contains(SECRET) && !shown.contains(STS_TOKEN), "{shown}");
        assert!(shown.contains(AKID) && shown.contains("us-east-1") && shown.contains("redacted"), "{shown}");
        assert!(format!("{:?}", creds(None)).contains("session_token: None"));
    }
}
