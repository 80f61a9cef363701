//! Anthropic Messages: the client surface (`/anthropic/v1/messages`) and the provider
//! adapter (`kind: anthropic`) share this codec.

use serde_json::{json, Map, Value};

use crate::error::GatewayError;
use crate::wire::canonical::*;

/// Anthropic requires `max_tokens`; OpenAI clients often omit it.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
pub const API_VERSION: &str = "2023-06-01";

fn bad(message: impl Into<String>) -> GatewayError {
    GatewayError::invalid("invalid_request", message)
}

fn source(v: &Value, path: &str) -> Result<ImageSource, GatewayError> {
    match v.get("type").and_then(Value::as_str) {
        Some("base64") => Ok(ImageSource::Base64 {
            media_type: v.get("media_type").and_then(Value::as_str).unwrap_or("image/png").to_string(),
            data: v.get("data").and_then(Value::as_str).unwrap_or_default().to_string(),
        }),
        Some("url") => Ok(ImageSource::Url(
            v.get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{path}.url is required")))?
                .to_string(),
        )),
        _ => Err(bad(format!("{path}.type must be base64 or url"))),
    }
}

fn blocks(content: &Value, path: &str) -> Result<Vec<Part>, GatewayError> {
    let items = match content {
        Value::String(s) => return Ok(vec![Part::Text { text: s.clone(), cache_control: None }]),
        Value::Array(items) => items,
        _ => return Err(bad(format!("{path} must be a string or an array of content blocks"))),
    };
    let mut parts = Vec::with_capacity(items.len());
    for (i, b) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let cache_control = b.get("cache_control").cloned();
        match b.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(Part::Text {
                text: b.get("text").and_then(Value::as_str).unwrap_or_default().to_string(),
                cache_control,
            }),
            Some("image") => parts.push(Part::Image {
                source: source(b.get("source").unwrap_or(&Value::Null), &format!("{p}.source"))?,
                cache_control,
            }),
            Some("tool_use") => parts.push(Part::ToolCall {
                id: b.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                name: b.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                arguments: serde_json::to_string(b.get("input").unwrap_or(&json!({}))).unwrap_or_default(),
            }),
            Some("tool_result") => {
                let content = match b.get("content") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(c) => blocks(c, &format!("{p}.content"))?,
                };
                parts.push(Part::ToolResult {
                    call_id: b.get("tool_use_id").and_then(Value::as_str).unwrap_or_default().to_string(),
                    content,
                    is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
                });
            }
            Some("thinking") => parts.push(Part::Thinking {
                text: b.get("thinking").and_then(Value::as_str).unwrap_or_default().to_string(),
                signature: b
                    .get("signature")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            }),
            Some("redacted_thinking") => parts.push(Part::RedactedThinking {
                data: b.get("data").and_then(Value::as_str).unwrap_or_default().to_string(),
            }),
            other => {
                return Err(bad(format!(
                    "{p}: unsupported content block type {}",
                    other.map_or("(none)".to_string(), |t| format!("\"{t}\""))
                )))
            }
        }
    }
    Ok(parts)
}

/// Client Anthropic body → canonical request.
pub fn decode_request(body: &[u8]) -> Result<Request, GatewayError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::invalid("invalid_json", format!("request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(GatewayError::invalid("invalid_json", "request body must be a JSON object"));
    };
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| GatewayError::invalid("missing_field", "Missing required field: messages"))?;
    let system = match obj.get("system") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![TextBlock { text: s.clone(), cache_control: None }],
        Some(Value::Array(items)) => items
            .iter()
            .map(|b| TextBlock {
                text: b.get("text").and_then(Value::as_str).unwrap_or_default().to_string(),
                cache_control: b.get("cache_control").cloned(),
            })
            .collect(),
        Some(_) => return Err(bad("system must be a string or an array of text blocks")),
    };
    let mut req = Request {
        model: obj.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
        system,
        messages: Vec::with_capacity(messages.len()),
        max_tokens: obj.get("max_tokens").and_then(Value::as_u64),
        temperature: obj.get("temperature").and_then(Value::as_f64),
        top_p: obj.get("top_p").and_then(Value::as_f64),
        stop: obj
            .get("stop_sequences")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        stream_usage: true,
        tools: Vec::new(),
        tool_choice: None,
        parallel_tool_calls: None,
        thinking_budget: obj
            .get("thinking")
            .filter(|t| t.get("type").and_then(Value::as_str) == Some("enabled"))
            .and_then(|t| t.get("budget_tokens").and_then(Value::as_u64)),
        user: obj.get("metadata").and_then(|m| m.get("user_id")).and_then(Value::as_str).map(str::to_string),
        openai_only: Vec::new(),
    };
    for (i, m) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => return Err(bad(format!("{path}.role: unsupported role {other:?}"))),
        };
        let content = blocks(m.get("content").unwrap_or(&Value::Null), &format!("{path}.content"))?;
        req.messages.push(Message { role, content });
    }
    for (i, t) in obj.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        req.tools.push(Tool {
            name: t
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("tools[{i}].name is required")))?
                .to_string(),
            description: t.get("description").and_then(Value::as_str).map(str::to_string),
            parameters: t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            cache_control: t.get("cache_control").cloned(),
        });
    }
    if let Some(tc) = obj.get("tool_choice") {
        req.tool_choice = match tc.get("type").and_then(Value::as_str) {
            Some("auto") => Some(ToolChoice::Auto),
            Some("any") => Some(ToolChoice::Required),
            Some("none") => Some(ToolChoice::None),
            Some("tool") => Some(ToolChoice::Tool(
                tc.get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("tool_choice.name is required"))?
                    .to_string(),
            )),
            _ => return Err(bad("tool_choice.type must be auto, any, tool or none")),
        };
        if tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            req.parallel_tool_calls = Some(false);
        }
    }
    Ok(req)
}

fn with_cache(mut v: Value, cache_control: &Option<Value>) -> Value {
    if let Some(cc) = cache_control {
        v["cache_control"] = cc.clone();
    }
    v
}

fn source_json(s: &ImageSource) -> Value {
    match s {
        ImageSource::Base64 { media_type, data } => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        ImageSource::Url(u) => json!({"type": "url", "url": u}),
    }
}

fn block_json(p: &Part, keep_thinking: bool) -> Option<Value> {
    Some(match p {
        Part::Text { text, cache_control } => {
            with_cache(json!({"type": "text", "text": text}), cache_control)
        }
        Part::Image { source, cache_control } => {
            with_cache(json!({"type": "image", "source": source_json(source)}), cache_control)
        }
        Part::ToolCall { id, name, arguments } => {
            let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
            json!({"type": "tool_use", "id": id, "name": name, "input": input})
        }
        Part::ToolResult { call_id, content, is_error } => {
            // Tool results keep their text (and images, which Anthropic accepts here).
            let inner: Vec<Value> = content.iter().filter_map(|c| block_json(c, false)).collect();
            let mut v = json!({"type": "tool_result", "tool_use_id": call_id, "content": inner});
            if *is_error {
                v["is_error"] = true.into();
            }
            v
        }
        // Thinking only round-trips with Claude's own signature; the target rejects others.
        Part::Thinking { .. } if keep_thinking => {
            let (text, sig) = p.claude_signature()?;
            json!({"type": "thinking", "thinking": text, "signature": sig})
        }
        Part::RedactedThinking { data } if keep_thinking => {
            json!({"type": "redacted_thinking", "data": data})
        }
        Part::Thinking { .. } | Part::RedactedThinking { .. } => return None,
    })
}

/// Canonical request → Anthropic upstream body. Consecutive turns of one role are merged
/// (Anthropic requires alternation; several OpenAI `tool` messages become one user turn).
pub fn encode_request(req: &Request, model: &str) -> Vec<u8> {
    let mut messages: Vec<(Role, Vec<Value>)> = Vec::new();
    for m in &req.messages {
        let content: Vec<Value> = m.content.iter().filter_map(|p| block_json(p, true)).collect();
        if content.is_empty() {
            continue;
        }
        match messages.last_mut() {
            Some((role, blocks)) if *role == m.role => blocks.extend(content),
            _ => messages.push((m.role, content)),
        }
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| {
            json!({"role": if role == Role::User { "user" } else { "assistant" }, "content": content})
        })
        .collect();
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("max_tokens".into(), req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).into());
    if !req.system.is_empty() {
        let system: Vec<Value> = req
            .system
            .iter()
            .map(|b| with_cache(json!({"type": "text", "text": b.text}), &b.cache_control))
            .collect();
        body.insert("system".into(), Value::Array(system));
    }
    body.insert("messages".into(), Value::Array(messages));
    if let Some(t) = req.temperature {
        // Anthropic's range is 0..1; OpenAI's 0..2.
        body.insert("temperature".into(), t.min(1.0).into());
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), p.into());
    }
    if !req.stop.is_empty() {
        body.insert("stop_sequences".into(), req.stop.clone().into());
    }
    if req.stream {
        body.insert("stream".into(), true.into());
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut v = json!({"name": t.name, "input_schema": t.parameters});
                if let Some(d) = &t.description {
                    v["description"] = d.clone().into();
                }
                with_cache(v, &t.cache_control)
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
        let mut choice = match &req.tool_choice {
            None | Some(ToolChoice::Auto) => json!({"type": "auto"}),
            Some(ToolChoice::None) => json!({"type": "none"}),
            Some(ToolChoice::Required) => json!({"type": "any"}),
            Some(ToolChoice::Tool(name)) => json!({"type": "tool", "name": name}),
        };
        if req.parallel_tool_calls == Some(false) && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = true.into();
        }
        if req.tool_choice.is_some() || req.parallel_tool_calls == Some(false) {
            body.insert("tool_choice".into(), choice);
        }
    }
    if let Some(budget) = req.thinking_budget {
        body.insert("thinking".into(), json!({"type": "enabled", "budget_tokens": budget}));
    }
    if let Some(u) = &req.user {
        body.insert("metadata".into(), json!({"user_id": u}));
    }
    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
}

pub fn stop_reason(s: &str) -> Option<StopReason> {
    Some(match s {
        "end_turn" | "pause_turn" => StopReason::EndTurn,
        "max_tokens" => StopReason::MaxTokens,
        "tool_use" => StopReason::ToolUse,
        "stop_sequence" => StopReason::StopSequence,
        "refusal" => StopReason::ContentFilter,
        _ => return None,
    })
}

pub fn stop_reason_str(s: StopReason) -> &'static str {
    match s {
        StopReason::EndTurn => "end_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ToolUse => "tool_use",
        StopReason::StopSequence => "stop_sequence",
        StopReason::ContentFilter => "refusal",
    }
}

/// Anthropic's usage fields as last reported: a stream reports them across several events
/// (`message_start`, then `message_delta`), a whole message at once. The one reader of
/// Anthropic usage: the codec, the stream decoder and the passthrough tap all use it.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
pub struct UsageCounts {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl UsageCounts {
    /// Takes the fields a usage object reports; the others keep their last value.
    pub fn update(&mut self, u: &Value) {
        let n = |k: &str| u.get(k).and_then(Value::as_u64);
        for (mine, key) in [
            (&mut self.input_tokens, "input_tokens"),
            (&mut self.output_tokens, "output_tokens"),
            (&mut self.cache_read_input_tokens, "cache_read_input_tokens"),
            (&mut self.cache_creation_input_tokens, "cache_creation_input_tokens"),
        ] {
            if let Some(v) = n(key) {
                *mine = Some(v);
            }
        }
    }

    /// Anthropic's `input_tokens` excludes cache reads and writes; canonical input includes
    /// them (saturating: the counts come from the upstream).
    pub fn usage(&self) -> Usage {
        let cache_read = self.cache_read_input_tokens.unwrap_or(0);
        let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            input: self.input_tokens.unwrap_or(0).saturating_add(cache_read).saturating_add(cache_write),
            output: self.output_tokens.unwrap_or(0),
            cache_read,
            cache_write,
            reasoning: 0,
        }
    }
}

/// One usage object, read on its own.
pub fn usage(u: &Value) -> Usage {
    let mut counts = UsageCounts::default();
    counts.update(u);
    counts.usage()
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input.saturating_sub(u.cache_read + u.cache_write),
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cache_read,
        "output_tokens": u.output,
    })
}

/// Anthropic upstream response → canonical. The envelope is deserialised into typed fields
/// (a `Value` tree for the whole body cost more than the rest of the translation); content
/// blocks go through the same reader as requests.
pub fn decode_response(body: &[u8]) -> Result<Response, String> {
    #[derive(serde::Deserialize)]
    struct MessageIn<'a> {
        #[serde(default, borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        content: Option<Value>,
        #[serde(default, borrow)]
        stop_reason: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        usage: Option<UsageCounts>,
    }
    let m: MessageIn =
        serde_json::from_slice(body).map_err(|e| format!("invalid message from upstream: {e}"))?;
    let content = match &m.content {
        Some(c) => blocks(c, "content").map_err(|e| e.message())?,
        None => Vec::new(),
    };
    Ok(Response {
        id: m.id.map(|s| s.into_owned()).unwrap_or_default(),
        model: m.model.map(|s| s.into_owned()).unwrap_or_default(),
        created: now_secs(),
        content,
        stop: m.stop_reason.as_deref().and_then(stop_reason),
        usage: m.usage.unwrap_or_default().usage(),
    })
}

fn message_id(id: &str) -> String {
    // Bedrock answers carry no id; clients expect a unique one.
    if id.is_empty() {
        format!("msg_{}", uuid::Uuid::new_v4().simple())
    } else if id.starts_with("msg_") {
        id.to_string()
    } else {
        format!("msg_{}", id.trim_start_matches("chatcmpl-"))
    }
}

/// Canonical → Anthropic message (client surface).
pub fn encode_response(resp: &Response) -> Vec<u8> {
    // All thinking is shown to the client with whatever signature it came with: empty from
    // providers that do not sign (Cohere, Gemini summaries), tagged from Gemini. Sent back,
    // only Claude's own signatures reach Anthropic-family targets (`claude_signature`).
    let content: Vec<Value> = resp
        .content
        .iter()
        .filter_map(|p| match p {
            Part::Thinking { text, signature } => Some(
                json!({"type": "thinking", "thinking": text, "signature": signature.as_deref().unwrap_or("")}),
            ),
            p => block_json(p, true),
        })
        .collect();
    let body = json!({
        "id": message_id(&resp.id),
        "type": "message",
        "role": "assistant",
        "model": resp.model,
        "content": content,
        "stop_reason": resp.stop.map(stop_reason_str).unwrap_or("end_turn"),
        "stop_sequence": null,
        "usage": usage_json(&resp.usage),
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Anthropic SSE events → deltas (the SSE framing is parsed by the caller).
#[derive(Default)]
pub struct StreamDecoder {
    /// Content block index → tool call number, for routing `input_json_delta`s.
    tool_blocks: Vec<(u64, usize)>,
    calls: usize,
}

impl StreamDecoder {
    pub fn decode(
        &mut self,
        events: &mut Vec<crate::sse::Event>,
        out: &mut Vec<Delta>,
    ) -> Result<(), String> {
        for ev in events.drain(..) {
            let v: Value =
                serde_json::from_str(&ev.data).map_err(|e| format!("invalid stream event: {e}"))?;
            let kind = v.get("type").and_then(Value::as_str).unwrap_or(ev.event.as_str()).to_string();
            match kind.as_str() {
                "message_start" => {
                    let m = v.get("message").unwrap_or(&Value::Null);
                    out.push(Delta::Start {
                        id: m.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                        model: m.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
                    });
                    if let Some(u) = m.get("usage") {
                        out.push(Delta::Usage(usage(u)));
                    }
                }
                "content_block_start" => {
                    let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let b = v.get("content_block").unwrap_or(&Value::Null);
                    match b.get("type").and_then(Value::as_str) {
                        Some("tool_use") => {
                            let call = self.calls;
                            self.calls += 1;
                            self.tool_blocks.push((index, call));
                            out.push(Delta::ToolCallStart {
                                call,
                                id: b.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                                name: b.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                            });
                        }
                        Some("text") => {
                            if let Some(t) = b.get("text").and_then(Value::as_str).filter(|t| !t.is_empty()) {
                                out.push(Delta::Text(t.to_string()));
                            }
                        }
                        _ => {}
                    }
                }
                "content_block_delta" => {
                    let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let d = v.get("delta").unwrap_or(&Value::Null);
                    let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                    match d.get("type").and_then(Value::as_str) {
                        Some("text_delta") => out.push(Delta::Text(s("text"))),
                        Some("input_json_delta") if !s("partial_json").is_empty() => {
                            if let Some((_, call)) = self.tool_blocks.iter().find(|(i, _)| *i == index) {
                                out.push(Delta::ToolArgs { call: *call, json: s("partial_json") });
                            }
                        }
                        Some("thinking_delta") => out.push(Delta::Thinking(s("thinking"))),
                        Some("signature_delta") => out.push(Delta::Signature(s("signature"))),
                        _ => {}
                    }
                }
                "message_delta" => {
                    if let Some(r) =
                        v.pointer("/delta/stop_reason").and_then(Value::as_str).and_then(stop_reason)
                    {
                        out.push(Delta::Stop(r));
                    }
                    if let Some(u) = v.get("usage") {
                        out.push(Delta::Usage(usage(u)));
                    }
                }
                "message_stop" => out.push(Delta::Done),
                "error" => out.push(Delta::Error {
                    kind: v.pointer("/error/type").and_then(Value::as_str).unwrap_or("api_error").to_string(),
                    message: v
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("upstream error")
                        .to_string(),
                }),
                _ => {} // ping, content_block_stop, and event types added later
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    Tool(usize),
}

/// Deltas → Anthropic SSE (client surface): `message_start`, content blocks numbered
/// 0, 1, 2… each started before its deltas and stopped before the next, `message_delta`
/// with the stop reason and usage (input tokens included), `message_stop`.
pub struct StreamEncoder {
    model: String,
    started: bool,
    open: Option<(u64, Block)>,
    next_index: u64,
    usage: Usage,
    stop: Option<StopReason>,
    finished: bool,
}

impl StreamEncoder {
    pub fn new(model: &str) -> StreamEncoder {
        StreamEncoder {
            model: model.to_string(),
            started: false,
            open: None,
            next_index: 0,
            usage: Usage::default(),
            stop: None,
            finished: false,
        }
    }

    fn event(out: &mut Vec<u8>, name: &str, v: &Value) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        let _ = serde_json::to_writer(&mut *out, v);
        out.extend_from_slice(b"\n\n");
    }

    fn start(&mut self, id: &str, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let id =
            if id.is_empty() { format!("msg_{}", uuid::Uuid::new_v4().simple()) } else { message_id(id) };
        let message = json!({
            "id": id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": usage_json(&self.usage),
        });
        Self::event(out, "message_start", &json!({"type": "message_start", "message": message}));
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            Self::event(out, "content_block_stop", &json!({"type": "content_block_stop", "index": index}));
        }
    }

    fn open(&mut self, kind: Block, block: Value, out: &mut Vec<u8>) -> u64 {
        if let Some((index, open)) = self.open {
            if open == kind {
                return index;
            }
        }
        self.start("", out);
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((index, kind));
        Self::event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    fn delta(out: &mut Vec<u8>, index: u64, delta: Value) {
        Self::event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    pub fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        match delta {
            Delta::Start { id, .. } => self.start(id, out),
            Delta::Text(t) => {
                let i = self.open(Block::Text, json!({"type": "text", "text": ""}), out);
                Self::delta(out, i, json!({"type": "text_delta", "text": t}));
            }
            Delta::Thinking(t) => {
                let i = self.open(Block::Thinking, json!({"type": "thinking", "thinking": ""}), out);
                Self::delta(out, i, json!({"type": "thinking_delta", "thinking": t}));
            }
            Delta::Signature(s) => {
                let i = self.open(Block::Thinking, json!({"type": "thinking", "thinking": ""}), out);
                Self::delta(out, i, json!({"type": "signature_delta", "signature": s}));
            }
            Delta::ToolCallStart { call, id, name } => {
                // A new call always opens a new block, even right after another call.
                if matches!(self.open, Some((_, Block::Tool(c))) if c != *call) {
                    self.close(out);
                }
                self.open(
                    Block::Tool(*call),
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    out,
                );
            }
            Delta::ToolArgs { call, json: args } => {
                if let Some((index, Block::Tool(c))) = self.open {
                    if c == *call {
                        Self::delta(out, index, json!({"type": "input_json_delta", "partial_json": args}));
                    }
                }
            }
            Delta::Stop(r) => self.stop = Some(*r),
            Delta::Usage(u) => self.usage.merge(*u),
            Delta::Error { kind, message } => {
                Self::event(
                    out,
                    "error",
                    &json!({"type": "error", "error": {"type": kind, "message": message}}),
                );
                self.finished = true;
            }
            Delta::Done => {
                self.start("", out);
                self.close(out);
                let stop = self.stop.unwrap_or(StopReason::EndTurn);
                Self::event(
                    out,
                    "message_delta",
                    &json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason_str(stop), "stop_sequence": null},
                        "usage": usage_json(&self.usage),
                    }),
                );
                Self::event(out, "message_stop", &json!({"type": "message_stop"}));
                self.finished = true;
            }
        }
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }
}

/// The Anthropic Messages codec, both as a provider format and as a client surface.
pub struct AnthropicCodec;

crate::wire::codec::surface_format_codec!(AnthropicCodec, Anthropic);

impl crate::wire::codec::SurfaceCodec for AnthropicCodec {
    fn surface(&self) -> crate::error::Surface {
        crate::error::Surface::Anthropic
    }

    fn decode_request(&self, body: &[u8]) -> Result<Request, GatewayError> {
        decode_request(body)
    }

    fn encode_response(&self, resp: &Response) -> Vec<u8> {
        encode_response(resp)
    }

    fn stream_encoder(&self, model: &str, _send_usage: bool) -> Box<dyn crate::wire::codec::StreamEncoder> {
        Box::new(StreamEncoder::new(model))
    }
}

impl crate::wire::codec::StreamEncoder for StreamEncoder {
    fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
        StreamEncoder::encode(self, delta, out)
    }

    fn usage(&self) -> Usage {
        StreamEncoder::usage(self)
    }

    fn done_with_trace(&mut self, trace: &serde_json::value::RawValue, out: &mut Vec<u8>) {
        let mut tail = Vec::new();
        StreamEncoder::encode(self, &Delta::Done, &mut tail);
        let stop = br#"{"type":"message_stop"}"#;
        match tail.windows(stop.len()).rposition(|w| w == stop) {
            Some(at) => {
                out.extend_from_slice(&tail[..at]);
                #[derive(serde::Serialize)]
                struct Stop<'a> {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    #[serde(rename = "mlx:trace")]
                    trace: &'a serde_json::value::RawValue,
                }
                let _ = serde_json::to_writer(&mut *out, &Stop { kind: "message_stop", trace });
                out.extend_from_slice(&tail[at + stop.len()..]);
            }
            None => out.extend_from_slice(&tail),
        }
    }
}
