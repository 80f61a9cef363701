//! AWS Bedrock Runtime Converse / ConverseStream: the provider adapter (`kind: bedrock`).
//!
//! Requests and plain responses are JSON. Streamed responses are binary
//! `application/vnd.amazon.eventstream` frames: [`FrameDecoder`] turns them into
//! `crate::sse::Event`s (event name + JSON payload) so [`StreamDecoder`] has the same shape as
//! the SSE codecs. Every request is signed with SigV4 ([`sign`]); credentials travel in the
//! provider's api_key as `ACCESS_KEY_ID::SECRET_ACCESS_KEY::REGION[::SESSION_TOKEN]`.
//!
//! Mappings that are not one-to-one:
//! - Images must be inline: Bedrock cannot fetch URLs, so an image URL in a message is an
//!   error; inside a tool result it is dropped (tool results keep their text).
//! - Blank text blocks are dropped: Bedrock rejects them in messages and system prompts.
//! - Thinking parts go back as `reasoningContent` only with their signature (Claude rejects
//!   unsigned ones; other models need none). `thinking_budget` becomes the Claude-specific
//!   `additionalModelRequestFields.thinking`.
//! - Anthropic `cache_control` becomes a `cachePoint` block right after the marked block
//!   (system, message content, tools); after a tool result whose content carried one.
//! - `ToolChoice::None` withholds the tools, unless the history holds tool blocks: Bedrock then
//!   requires a `toolConfig`, so the tools are sent (the model may still call one).
//! - No Bedrock field for `user` or `parallel_tool_calls`; they are not sent.
//! - Responses carry no id and no model name: both are left empty for the gateway to fill.

use std::time::SystemTime;

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message as FrameMessage;
use serde_json::{json, Map, Value};

use crate::wire::canonical::*;

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
// Request

fn cache_point(cache_control: &Option<Value>) -> Option<Value> {
    let cc = cache_control.as_ref()?;
    let mut point = json!({"type": "default"});
    // Anthropic's 5m/1h TTLs have a Bedrock equivalent; other values fall back to the default.
    if let Some(ttl) = cc.get("ttl").and_then(Value::as_str).filter(|t| matches!(*t, "5m" | "1h")) {
        point["ttl"] = ttl.into();
    }
    Some(json!({"cachePoint": point}))
}

fn image_json(source: &ImageSource, path: &str) -> Result<Value, String> {
    match source {
        ImageSource::Base64 { media_type, data } => {
            let format = match media_type.to_ascii_lowercase().as_str() {
                "image/png" => "png",
                "image/jpeg" | "image/jpg" => "jpeg",
                "image/gif" => "gif",
                "image/webp" => "webp",
                other => {
                    return Err(format!(
                        "{path}: Bedrock accepts png, jpeg, gif and webp images, not \"{other}\""
                    ))
                }
            };
            // A JSON blob is base64 text, so the client's base64 goes through unchanged.
            Ok(json!({"image": {"format": format, "source": {"bytes": data}}}))
        }
        ImageSource::Url(_) => Err(format!(
            "{path}: Bedrock does not fetch image URLs; send the image inline as base64 (a data: URL)"
        )),
    }
}

fn tool_result_json(call_id: &str, content: &[Part], is_error: bool, path: &str) -> Result<Value, String> {
    let mut inner = Vec::new();
    for (k, c) in content.iter().enumerate() {
        match c {
            Part::Text { text, .. } => inner.push(json!({"text": text})),
            Part::Image { source: source @ ImageSource::Base64 { .. }, .. } => {
                inner.push(image_json(source, &format!("{path}.content[{k}]"))?)
            }
            // Tool results keep only their text (and inline images, which Bedrock accepts).
            _ => {}
        }
    }
    if inner.is_empty() {
        // An empty array is refused by some Bedrock models; an empty text is accepted.
        inner.push(json!({"text": ""}));
    }
    let mut v = json!({"toolUseId": call_id, "content": inner});
    if is_error {
        // Only sent for errors: `status` is a Claude/Nova-only field other models reject.
        v["status"] = "error".into();
    }
    Ok(json!({"toolResult": v}))
}

/// Appends the Converse blocks of one canonical part; records tool names seen in history.
fn push_part(
    p: &Part,
    path: &str,
    out: &mut Vec<Value>,
    history_tools: &mut Vec<String>,
) -> Result<(), String> {
    match p {
        Part::Text { text, cache_control } => {
            // Bedrock rejects blank text blocks ("The text field ... is blank").
            if !text.trim().is_empty() {
                out.push(json!({"text": text}));
                out.extend(cache_point(cache_control));
            }
        }
        Part::Image { source, cache_control } => {
            out.push(image_json(source, path)?);
            out.extend(cache_point(cache_control));
        }
        Part::ToolCall { id, name, arguments } => {
            let input: Value = if arguments.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(arguments)
                    .map_err(|e| format!("{path}: tool call arguments are not valid JSON: {e}"))?
            };
            if !history_tools.contains(name) {
                history_tools.push(name.clone());
            }
            out.push(json!({"toolUse": {"toolUseId": id, "name": name, "input": input}}));
        }
        Part::ToolResult { call_id, content, is_error } => {
            out.push(tool_result_json(call_id, content, *is_error, path)?);
            // Tool result content cannot hold a cache point; it goes after the whole result.
            let marked = content.iter().find_map(|c| match c {
                Part::Text { cache_control: cc @ Some(_), .. }
                | Part::Image { cache_control: cc @ Some(_), .. } => Some(cc),
                _ => None,
            });
            if let Some(cc) = marked {
                out.extend(cache_point(cc));
            }
        }
        // Only Claude's own signed reasoning can be replayed (unsigned or Gemini-signed
        // thinking is rejected); other models do not need it.
        Part::Thinking { .. } => {
            if let Some((text, signature)) = p.claude_signature() {
                out.push(
                    json!({"reasoningContent": {"reasoningText": {"text": text, "signature": signature}}}),
                )
            }
        }
        Part::RedactedThinking { data } => out.push(json!({"reasoningContent": {"redactedContent": data}})),
    }
    Ok(())
}

fn tool_spec(t: &Tool) -> Value {
    let mut spec = Map::new();
    spec.insert("name".into(), t.name.clone().into());
    // Bedrock rejects an empty description (minimum length 1).
    if let Some(d) = t.description.as_deref().filter(|d| !d.trim().is_empty()) {
        spec.insert("description".into(), d.into());
    }
    spec.insert("inputSchema".into(), json!({"json": t.parameters}));
    json!({"toolSpec": Value::Object(spec)})
}

/// Canonical request → Converse body. `model` goes in the path ([`chat_path`]), not the body.
/// Consecutive turns of one role are merged: Converse requires alternation, and several OpenAI
/// `tool` messages become one user turn.
pub fn encode_request(req: &Request, model: &str) -> Result<Vec<u8>, String> {
    if model.is_empty() {
        return Err("a Bedrock model id is required".into());
    }
    let mut history_tools: Vec<String> = Vec::new();
    let mut has_tool_blocks = false;
    let mut turns: Vec<(Role, Vec<Value>)> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let mut content = Vec::new();
        for (j, p) in m.content.iter().enumerate() {
            has_tool_blocks |= matches!(p, Part::ToolCall { .. } | Part::ToolResult { .. });
            push_part(p, &format!("messages[{i}].content[{j}]"), &mut content, &mut history_tools)?;
        }
        if content.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((role, blocks)) if *role == m.role => blocks.extend(content),
            _ => turns.push((m.role, content)),
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| {
            json!({"role": if role == Role::User { "user" } else { "assistant" }, "content": content})
        })
        .collect();

    let mut body = Map::new();
    body.insert("messages".into(), Value::Array(messages));
    let mut system = Vec::new();
    for b in req.system.iter().filter(|b| !b.text.trim().is_empty()) {
        system.push(json!({"text": b.text}));
        system.extend(cache_point(&b.cache_control));
    }
    if !system.is_empty() {
        body.insert("system".into(), Value::Array(system));
    }

    let mut inference = Map::new();
    if let Some(n) = req.max_tokens {
        inference.insert("maxTokens".into(), n.into());
    }
    // Converse takes temperature and topP in 0..1 (OpenAI's temperature goes to 2).
    if let Some(t) = req.temperature {
        inference.insert("temperature".into(), t.clamp(0.0, 1.0).into());
    }
    if let Some(p) = req.top_p {
        inference.insert("topP".into(), p.clamp(0.0, 1.0).into());
    }
    // Each stop sequence must be at least one character long.
    let stop: Vec<&str> = req.stop.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
    if !stop.is_empty() {
        inference.insert("stopSequences".into(), stop.into());
    }
    if !inference.is_empty() {
        body.insert("inferenceConfig".into(), Value::Object(inference));
    }

    let wants_tools = !req.tools.is_empty() && req.tool_choice != Some(ToolChoice::None);
    let mut tools: Vec<Value> = Vec::new();
    if wants_tools || (has_tool_blocks && !req.tools.is_empty()) {
        for t in &req.tools {
            tools.push(tool_spec(t));
            tools.extend(cache_point(&t.cache_control));
        }
    } else if has_tool_blocks {
        // Bedrock refuses toolUse/toolResult blocks without a toolConfig; declare the tools
        // the history used, with an open schema.
        tools = history_tools
            .iter()
            .map(|name| json!({"toolSpec": {"name": name, "inputSchema": {"json": {"type": "object"}}}}))
            .collect();
    }
    if !tools.is_empty() {
        let mut config = Map::new();
        config.insert("tools".into(), Value::Array(tools));
        // Auto is Bedrock's default; `any` and `tool` are honoured by Claude, Mistral Large, Nova.
        let choice = match &req.tool_choice {
            Some(ToolChoice::Required) if wants_tools => Some(json!({"any": {}})),
            Some(ToolChoice::Tool(name)) if wants_tools => Some(json!({"tool": {"name": name}})),
            _ => None,
        };
        if let Some(c) = choice {
            config.insert("toolChoice".into(), c);
        }
        body.insert("toolConfig".into(), Value::Object(config));
    }

    if let Some(budget) = req.thinking_budget {
        // Claude-specific pass-through field: other models answer 400, which beats silence.
        body.insert(
            "additionalModelRequestFields".into(),
            json!({"thinking": {"type": "enabled", "budget_tokens": budget}}),
        );
    }
    serde_json::to_vec(&Value::Object(body)).map_err(|e| format!("cannot encode the Bedrock request: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Response

fn stop_reason(s: &str) -> Option<StopReason> {
    Some(match s {
        "end_turn" => StopReason::EndTurn,
        "tool_use" => StopReason::ToolUse,
        // The answer was cut by a length limit either way.
        "max_tokens" | "model_context_window_exceeded" => StopReason::MaxTokens,
        "stop_sequence" => StopReason::StopSequence,
        "guardrail_intervened" | "content_filtered" => StopReason::ContentFilter,
        _ => return None,
    })
}

/// Bedrock's `inputTokens` excludes cache reads and writes; canonical input includes them.
/// Bedrock reports no reasoning count (reasoning is inside `outputTokens`).
fn usage(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (cache_read, cache_write) = (n("cacheReadInputTokens"), n("cacheWriteInputTokens"));
    Usage {
        input: n("inputTokens").saturating_add(cache_read).saturating_add(cache_write),
        output: n("outputTokens"),
        cache_read,
        cache_write,
        reasoning: 0,
    }
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

/// Converse response → canonical. Bedrock's body has no id or model: both are left empty
/// (the gateway knows the model; `x-amzn-requestid` can serve as id).
pub fn decode_response(body: &[u8]) -> Result<Response, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON from upstream: {e}"))?;
    let blocks = v
        .pointer("/output/message/content")
        .and_then(Value::as_array)
        .ok_or("upstream response has no output.message.content")?;
    let mut content = Vec::new();
    for b in blocks {
        if let Some(t) = b.get("text").and_then(Value::as_str) {
            if !t.is_empty() {
                content.push(Part::Text { text: t.to_string(), cache_control: None });
            }
        } else if let Some(u) = b.get("toolUse") {
            content.push(Part::ToolCall {
                id: str_of(u, "/toolUseId").to_string(),
                name: str_of(u, "/name").to_string(),
                arguments: serde_json::to_string(u.get("input").unwrap_or(&json!({})))
                    .map_err(|e| format!("invalid tool input from upstream: {e}"))?,
            });
        } else if let Some(r) = b.get("reasoningContent") {
            if let Some(t) = r.get("reasoningText") {
                content.push(Part::Thinking {
                    text: str_of(t, "/text").to_string(),
                    signature: t.get("signature").and_then(Value::as_str).map(str::to_string),
                });
            } else if let Some(d) = r.get("redactedContent").and_then(Value::as_str) {
                content.push(Part::RedactedThinking { data: d.to_string() });
            }
        } else if let Some(parts) = b.pointer("/citationsContent/content").and_then(Value::as_array) {
            // Cited text keeps its text; the citations themselves have no canonical form.
            for t in parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)) {
                content.push(Part::Text { text: t.to_string(), cache_control: None });
            }
        }
    }
    Ok(Response {
        id: String::new(),
        model: String::new(),
        created: now_secs(),
        content,
        stop: v.get("stopReason").and_then(Value::as_str).and_then(stop_reason),
        usage: v.get("usage").map(usage).unwrap_or_default(),
    })
}

/// The message of a Bedrock error body: `{"message": ...}` (`Message` from some front ends).
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    ["message", "Message"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .filter(|m| !m.is_empty())
        .map(str::to_string)
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

// ---------------------------------------------------------------------------------------------
// Stream: events → deltas

/// Canonical error kind of a Bedrock stream exception (or error code).
fn error_kind(name: &str) -> &'static str {
    match name.to_ascii_lowercase().as_str() {
        "throttlingexception" | "toomanyrequestsexception" => "rate_limit_error",
        "serviceunavailableexception" => "overloaded_error",
        "validationexception" => "invalid_request_error",
        "modeltimeoutexception" => "timeout_error",
        "accessdeniedexception" => "permission_error",
        "resourcenotfoundexception" => "not_found_error",
        // internalServerException, modelStreamErrorException and anything new.
        _ => "api_error",
    }
}

/// ConverseStream events (from [`FrameDecoder`]) → deltas.
#[derive(Default)]
pub struct StreamDecoder {
    started: bool,
    /// Content block index → tool call number, for routing `toolUse` input deltas.
    tool_blocks: Vec<(u64, usize)>,
    calls: usize,
    /// `messageStop` seen: the answer is complete even if `metadata` never comes.
    stopped: bool,
    /// `Done` or `Error` emitted: nothing more is.
    finished: bool,
}

impl StreamDecoder {
    /// Drains `events` and appends deltas for each, immediately. `metadata` (which follows
    /// `messageStop`) ends the stream: Usage then Done.
    pub fn decode(
        &mut self,
        events: &mut Vec<crate::sse::Event>,
        out: &mut Vec<Delta>,
    ) -> Result<(), String> {
        for ev in events.drain(..) {
            if self.finished {
                continue;
            }
            let failure = ev.event.strip_prefix("exception:").or_else(|| ev.event.strip_prefix("error:"));
            if let Some(name) = failure {
                let message = serde_json::from_str::<Value>(&ev.data)
                    .ok()
                    .and_then(|v| {
                        ["message", "Message"]
                            .iter()
                            .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
                    })
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| format!("Bedrock stream error: {name}"));
                out.push(Delta::Error { kind: error_kind(name).to_string(), message });
                self.finished = true;
                continue;
            }
            let v: Value = serde_json::from_str(&ev.data)
                .map_err(|e| format!("invalid stream event {}: {e}", ev.event))?;
            if !self.started {
                // messageStart carries only the role; Bedrock streams have no id or model.
                self.started = true;
                out.push(Delta::Start { id: String::new(), model: String::new() });
            }
            let index = v.get("contentBlockIndex").and_then(Value::as_u64).unwrap_or(0);
            match ev.event.as_str() {
                "contentBlockStart" => {
                    if let Some(u) = v.pointer("/start/toolUse") {
                        let call = self.calls;
                        self.calls += 1;
                        self.tool_blocks.push((index, call));
                        out.push(Delta::ToolCallStart {
                            call,
                            id: str_of(u, "/toolUseId").to_string(),
                            name: str_of(u, "/name").to_string(),
                        });
                    }
                }
                "contentBlockDelta" => {
                    let d = v.get("delta").unwrap_or(&Value::Null);
                    let text = |p: &str| Some(str_of(d, p)).filter(|s| !s.is_empty()).map(str::to_string);
                    if let Some(t) = text("/text") {
                        out.push(Delta::Text(t));
                    } else if let Some(json) = text("/toolUse/input") {
                        if let Some((_, call)) = self.tool_blocks.iter().find(|(i, _)| *i == index) {
                            out.push(Delta::ToolArgs { call: *call, json });
                        }
                    } else if let Some(t) = text("/reasoningContent/text") {
                        out.push(Delta::Thinking(t));
                    } else if let Some(s) = text("/reasoningContent/signature") {
                        out.push(Delta::Signature(s));
                    }
                    // reasoningContent.redactedContent has no canonical delta; citations neither.
                }
                "messageStop" => {
                    self.stopped = true;
                    if let Some(r) = v.get("stopReason").and_then(Value::as_str).and_then(stop_reason) {
                        out.push(Delta::Stop(r));
                    }
                }
                "metadata" => {
                    if let Some(u) = v.get("usage") {
                        out.push(Delta::Usage(usage(u)));
                    }
                    out.push(Delta::Done);
                    self.finished = true;
                }
                _ => {} // messageStart (handled above), contentBlockStop, event types added later
            }
        }
        Ok(())
    }

    /// The body ended: Done if `messageStop` came without `metadata`; Err if the answer was
    /// cut short. After an in-stream error nothing more is pushed.
    pub fn finish(&mut self, out: &mut Vec<Delta>) -> Result<(), String> {
        if self.finished {
            return Ok(());
        }
        if self.stopped {
            self.finished = true;
            out.push(Delta::Done);
            return Ok(());
        }
        Err("the Bedrock stream ended before messageStop".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::Event;
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

    fn text(t: &str) -> Part {
        Part::Text { text: t.into(), cache_control: None }
    }

    fn request() -> Request {
        Request {
            model: "claude".into(),
            system: Vec::new(),
            messages: Vec::new(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            stream: false,
            stream_usage: false,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            thinking_budget: None,
            user: None,
            openai_only: Vec::new(),
        }
    }

    fn encode(req: &Request) -> Value {
        json_of(&encode_request(req, "anthropic.claude-3-5-sonnet-20240620-v1:0").unwrap())
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

    // ---- request ----

    #[test]
    fn rich_request_encodes_to_converse() {
        let ephemeral = Some(json!({"type": "ephemeral"}));
        let weather_schema = json!({"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]});
        let mut req = request();
        req.system = vec![
            TextBlock { text: "Be terse.".into(), cache_control: ephemeral.clone() },
            TextBlock { text: "  ".into(), cache_control: None },
        ];
        req.messages = vec![
            Message {
                role: Role::User,
                content: vec![
                    text("Weather and time in Paris?"),
                    Part::Image {
                        source: ImageSource::Base64 {
                            media_type: "image/png".into(),
                            data: "iVBORw0KGgo=".into(),
                        },
                        cache_control: None,
                    },
                    Part::Image {
                        source: ImageSource::Base64 {
                            media_type: "image/jpeg".into(),
                            data: "/9j/4AAQ".into(),
                        },
                        cache_control: None,
                    },
                ],
            },
            Message {
                role: Role::Assistant,
                content: vec![
                    Part::Thinking { text: "Need both tools.".into(), signature: Some("sig-1".into()) },
                    Part::Thinking { text: "unsigned, from another provider".into(), signature: None },
                    Part::RedactedThinking { data: "cmVkYWN0ZWQ=".into() },
                    text("Let me check."),
                    Part::ToolCall {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: "{\"location\":\"Paris\"}".into(),
                    },
                    Part::ToolCall { id: "call_2".into(), name: "get_time".into(), arguments: String::new() },
                ],
            },
            Message {
                role: Role::User,
                content: vec![Part::ToolResult {
                    call_id: "call_1".into(),
                    content: vec![text("18C")],
                    is_error: false,
                }],
            },
            Message {
                role: Role::User,
                content: vec![Part::ToolResult {
                    call_id: "call_2".into(),
                    content: vec![
                        Part::Text { text: "clock unavailable".into(), cache_control: ephemeral.clone() },
                        Part::Image {
                            source: ImageSource::Url("https://example.com/x.png".into()),
                            cache_control: None,
                        },
                    ],
                    is_error: true,
                }],
            },
            Message { role: Role::Assistant, content: vec![text("It is 18C; the time is unknown.")] },
            Message {
                role: Role::User,
                content: vec![
                    text(""),
                    Part::Text {
                        text: "Thanks".into(),
                        cache_control: Some(json!({"type": "ephemeral", "ttl": "1h"})),
                    },
                ],
            },
        ];
        req.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: Some("Current weather".into()),
                parameters: weather_schema.clone(),
                cache_control: None,
            },
            Tool {
                name: "get_time".into(),
                description: Some("".into()),
                parameters: json!({"type": "object", "properties": {}}),
                cache_control: ephemeral.clone(),
            },
        ];
        req.tool_choice = Some(ToolChoice::Tool("get_weather".into()));
        req.parallel_tool_calls = Some(false);
        req.thinking_budget = Some(2048);
        req.max_tokens = Some(4096);
        req.temperature = Some(1.5);
        req.top_p = Some(0.9);
        req.stop = vec!["END".into(), String::new()];
        req.stream = true;
        req.user = Some("user-1".into());
        req.openai_only = vec![("seed".into(), json!(7))];
        assert_eq!(
            encode(&req),
            json!({
                "messages": [
                    {"role": "user", "content": [
                        {"text": "Weather and time in Paris?"},
                        {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}},
                        {"image": {"format": "jpeg", "source": {"bytes": "/9j/4AAQ"}}}
                    ]},
                    {"role": "assistant", "content": [
                        {"reasoningContent": {"reasoningText": {"text": "Need both tools.", "signature": "sig-1"}}},
                        {"reasoningContent": {"redactedContent": "cmVkYWN0ZWQ="}},
                        {"text": "Let me check."},
                        {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"location": "Paris"}}},
                        {"toolUse": {"toolUseId": "call_2", "name": "get_time", "input": {}}}
                    ]},
                    // consecutive tool results merge into one user turn
                    {"role": "user", "content": [
                        {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C"}]}},
                        {"toolResult": {"toolUseId": "call_2", "content": [{"text": "clock unavailable"}], "status": "error"}},
                        {"cachePoint": {"type": "default"}}
                    ]},
                    {"role": "assistant", "content": [{"text": "It is 18C; the time is unknown."}]},
                    {"role": "user", "content": [{"text": "Thanks"}, {"cachePoint": {"type": "default", "ttl": "1h"}}]}
                ],
                "system": [{"text": "Be terse."}, {"cachePoint": {"type": "default"}}],
                "inferenceConfig": {"maxTokens": 4096, "temperature": 1.0, "topP": 0.9, "stopSequences": ["END"]},
                "toolConfig": {
                    "tools": [
                        {"toolSpec": {"name": "get_weather", "description": "Current weather", "inputSchema": {"json": weather_schema}}},
                        {"toolSpec": {"name": "get_time", "inputSchema": {"json": {"type": "object", "properties": {}}}}},
                        {"cachePoint": {"type": "default"}}
                    ],
                    "toolChoice": {"tool": {"name": "get_weather"}}
                },
                "additionalModelRequestFields": {"thinking": {"type": "enabled", "budget_tokens": 2048}}
            }),
            "user, parallel_tool_calls and OpenAI-only fields have no Bedrock field and are not sent"
        );
    }

    #[test]
    fn minimal_request_sends_only_messages() {
        let mut req = request();
        req.messages = vec![Message { role: Role::User, content: vec![text("Hi")] }];
        assert_eq!(encode(&req), json!({"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}));
    }

    #[test]
    fn tool_choice_mapping() {
        let tool = Tool {
            name: "get_weather".into(),
            description: None,
            parameters: json!({"type": "object"}),
            cache_control: None,
        };
        let spec = json!({"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}});
        let mut req = request();
        req.messages = vec![Message { role: Role::User, content: vec![text("Hi")] }];
        req.tools = vec![tool];
        for (choice, expected) in [
            (None, json!({"tools": [spec]})),
            (Some(ToolChoice::Auto), json!({"tools": [spec]})),
            (Some(ToolChoice::Required), json!({"tools": [spec], "toolChoice": {"any": {}}})),
            (
                Some(ToolChoice::Tool("get_weather".into())),
                json!({"tools": [spec], "toolChoice": {"tool": {"name": "get_weather"}}}),
            ),
        ] {
            req.tool_choice = choice.clone();
            assert_eq!(encode(&req)["toolConfig"], expected, "{choice:?}");
        }
        // None withholds the tools…
        req.tool_choice = Some(ToolChoice::None);
        assert!(encode(&req).get("toolConfig").is_none());
        // …unless the history holds tool blocks, which Bedrock refuses without a toolConfig.
        req.messages = vec![
            Message { role: Role::User, content: vec![text("Weather?")] },
            Message {
                role: Role::Assistant,
                content: vec![Part::ToolCall {
                    id: "c1".into(),
                    name: "get_weather".into(),
                    arguments: "{}".into(),
                }],
            },
            Message {
                role: Role::User,
                content: vec![Part::ToolResult { call_id: "c1".into(), content: vec![], is_error: false }],
            },
        ];
        let out = encode(&req);
        assert_eq!(out["toolConfig"], json!({"tools": [spec]}));
        // An empty tool result still carries a (empty) text block.
        assert_eq!(
            out["messages"][2]["content"][0],
            json!({"toolResult": {"toolUseId": "c1", "content": [{"text": ""}]}})
        );
        // No tools at all but a tool history: the used tools are declared with an open schema.
        req.tools.clear();
        req.tool_choice = None;
        assert_eq!(encode(&req)["toolConfig"], json!({"tools": [spec]}));
    }

    #[test]
    fn request_errors() {
        let mut req = request();
        req.messages = vec![Message {
            role: Role::User,
            content: vec![
                text("What is this?"),
                Part::Image {
                    source: ImageSource::Url("https://example.com/a.jpg".into()),
                    cache_control: None,
                },
            ],
        }];
        let err = encode_request(&req, "m").unwrap_err();
        assert!(err.contains("messages[0].content[1]") && err.contains("image URLs"), "{err}");

        req.messages[0].content[1] = Part::Image {
            source: ImageSource::Base64 { media_type: "image/tiff".into(), data: "AAAA".into() },
            cache_control: None,
        };
        let err = encode_request(&req, "m").unwrap_err();
        assert!(err.contains("image/tiff"), "{err}");

        req.messages[0].content[1] =
            Part::ToolCall { id: "c".into(), name: "f".into(), arguments: "{\"a\":".into() };
        let err = encode_request(&req, "m").unwrap_err();
        assert!(err.contains("messages[0].content[1]") && err.contains("not valid JSON"), "{err}");

        req.messages[0].content.truncate(1);
        assert!(encode_request(&req, "").unwrap_err().contains("model id"));
    }

    // ---- response ----

    #[test]
    fn decodes_text_response_with_cached_usage() {
        let r = decode_response(&fixture("converse_text.json")).unwrap();
        assert_eq!(r.id, "");
        assert_eq!(r.model, "");
        assert!(r.created > 0);
        assert_eq!(r.content, vec![text("Paris is the capital of France.")]);
        assert_eq!(r.stop, Some(StopReason::EndTurn));
        // inputTokens excludes cached tokens; canonical input includes them.
        assert_eq!(r.usage, Usage { input: 2060, output: 9, cache_read: 2048, cache_write: 0, reasoning: 0 });
    }

    #[test]
    fn decodes_parallel_tool_calls() {
        let r = decode_response(&fixture("converse_tool_use.json")).unwrap();
        assert_eq!(
            r.content,
            vec![
                text("I'll look up the weather and the time in Paris."),
                Part::ToolCall {
                    id: "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q".into(),
                    name: "get_weather".into(),
                    arguments: "{\"location\":\"Paris\",\"unit\":\"celsius\"}".into(),
                },
                Part::ToolCall {
                    id: "tooluse_Qm8HvQ1rS7mXb3o1yq2T0A".into(),
                    name: "get_time".into(),
                    arguments: "{}".into(),
                },
            ]
        );
        assert_eq!(r.stop, Some(StopReason::ToolUse));
        assert_eq!(
            r.usage,
            Usage { input: 1910, output: 96, cache_read: 0, cache_write: 1500, reasoning: 0 }
        );
    }

    #[test]
    fn decodes_thinking_with_signature_and_redacted_thinking() {
        let r = decode_response(&fixture("converse_thinking.json")).unwrap();
        assert_eq!(
            r.content,
            vec![
                Part::Thinking {
                    text: "The user asks for 27 * 453. 27 * 453 = 12231.".into(),
                    signature: Some("EqQBCkYIARgCIkDdPAkX9zZzVyv3C2W1SOXSbYc3Mt1pG0oF0cH3gHFhf3jJtKzPZ4V5yB0Dq8lmTQLoYk7bd4o4fS7tJx5YEgy0f0kq".into()),
                },
                Part::RedactedThinking {
                    data: "RXJiMEVzTlVMbFZiU0hWUjhoaVp5d3JhUVBCZEN1T0NEV3hqWExUaGVZNmFYaDFtSzdrcXZBPT0=".into(),
                },
                text("27 * 453 = 12,231."),
            ]
        );
        // Reasoning tokens are inside outputTokens; Bedrock does not split them out.
        assert_eq!(r.usage, Usage { input: 58, output: 164, cache_read: 0, cache_write: 0, reasoning: 0 });
    }

    #[test]
    fn decodes_guardrail_stop() {
        let r = decode_response(&fixture("converse_guardrail.json")).unwrap();
        assert_eq!(r.stop, Some(StopReason::ContentFilter));
        assert_eq!(r.content, vec![text("Sorry, the model cannot answer this question.")]);
    }

    #[test]
    fn maps_every_stop_reason() {
        for (wire, expected) in [
            ("end_turn", Some(StopReason::EndTurn)),
            ("tool_use", Some(StopReason::ToolUse)),
            ("max_tokens", Some(StopReason::MaxTokens)),
            ("model_context_window_exceeded", Some(StopReason::MaxTokens)),
            ("stop_sequence", Some(StopReason::StopSequence)),
            ("guardrail_intervened", Some(StopReason::ContentFilter)),
            ("content_filtered", Some(StopReason::ContentFilter)),
            ("malformed_tool_use", None),
        ] {
            let body =
                json!({"output": {"message": {"role": "assistant", "content": []}}, "stopReason": wire});
            assert_eq!(decode_response(body.to_string().as_bytes()).unwrap().stop, expected, "{wire}");
        }
        assert!(decode_response(b"{}").is_err());
        assert!(decode_response(b"not json").is_err());
    }

    #[test]
    fn decodes_cited_text() {
        let body = json!({
            "output": {"message": {"role": "assistant", "content": [
                {"citationsContent": {"content": [{"text": "The grass is green."}], "citations": [{"title": "Doc"}]}}
            ]}},
            "stopReason": "end_turn"
        });
        let r = decode_response(body.to_string().as_bytes()).unwrap();
        assert_eq!(r.content, vec![text("The grass is green.")]);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(&fixture("error_400.json")).unwrap(),
            "The text field in the ContentBlock object at messages.0.content.0 is blank. Add text to the text field, and try again."
        );
        assert!(error_message(&fixture("error_403.json"))
            .unwrap()
            .starts_with("User: arn:aws:iam::123456789012:user/gateway"));
        assert!(error_message(&fixture("error_403_signature.json"))
            .unwrap()
            .starts_with("The request signature"));
        assert_eq!(
            error_message(&fixture("error_429.json")).unwrap(),
            "Too many requests, please wait before trying again."
        );
        assert_eq!(error_message(b"{}"), None);
        assert_eq!(error_message(b"<html>"), None);
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
