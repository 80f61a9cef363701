//! Cohere API v2: the provider adapter (`kind: cohere`) for `POST /v2/chat` (plain and
//! streamed: `stream` is a body flag) and `POST /v2/embed`. Auth is `Authorization: Bearer`
//! (added by the gateway); the model goes in the body.
//!
//! Mappings that are not one-to-one:
//! - `tool_plan` (the model's plan before calling tools) is assistant text: decoded as
//!   `Part::Text` / `Delta::Text`, and the text of an assistant turn that carries tool calls
//!   is sent back as `tool_plan`, as Cohere's tool-use guide does.
//! - Cohere has no "call this tool" choice: `ToolChoice::Tool(name)` sends only that tool
//!   with `tool_choice: "REQUIRED"`.
//! - Usage is read from `billed_units` (what the account is charged; Cohere's `tokens` also
//!   counts the preamble Cohere injects itself), falling back to `tokens` field by field;
//!   `cache_read` is the billed share of `cached_tokens` (see `usage`). No reasoning count.
//! - `finish_reason` `ERROR` and `TIMEOUT` are failures: an `Err` for a plain response, a
//!   `Delta::Error` in a stream.

use serde_json::{json, Map, Value};

use crate::wire::canonical::*;

/// Cohere rejects more than five stop sequences.
const MAX_STOP_SEQUENCES: usize = 5;
/// Cohere embeds at most 96 texts per call.
const MAX_EMBED_TEXTS: usize = 96;
/// `input_type` is required by Embed v3 and later. OpenAI-style requests do not say whether a
/// text is a query or a document; `search_document` is the general-purpose choice (what gets
/// stored and compared against).
const EMBED_INPUT_TYPE: &str = "search_document";
/// Cohere's documented range for `p` (top_p); OpenAI clients commonly send 1.0.
const TOP_P_MIN: f64 = 0.01;
const TOP_P_MAX: f64 = 0.99;

fn image_url(source: &ImageSource) -> String {
    match source {
        ImageSource::Url(u) => u.clone(),
        ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
    }
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// Tool result content: text blocks only (images inside a tool result keep only their text).
fn tool_content(content: &[Part]) -> Value {
    let mut blocks: Vec<Value> = content
        .iter()
        .filter_map(|p| match p {
            Part::Text { text, .. } => Some(text_block(text)),
            _ => None,
        })
        .collect();
    if blocks.is_empty() {
        // `content` is required on a tool message; an empty result is an empty text.
        blocks.push(text_block(""));
    }
    Value::Array(blocks)
}

fn push_user(pending: &mut Vec<Value>, out: &mut Vec<Value>) {
    if pending.is_empty() {
        return;
    }
    let blocks = std::mem::take(pending);
    let content = match blocks.as_slice() {
        [one] if one.get("type").and_then(Value::as_str) == Some("text") => {
            one.get("text").cloned().unwrap_or_default()
        }
        _ => Value::Array(blocks),
    };
    out.push(json!({"role": "user", "content": content}));
}

/// A canonical user turn becomes `tool` messages (one per result) and `user` messages, in the
/// original order.
fn user_messages(m: &Message, path: &str, out: &mut Vec<Value>) -> Result<(), String> {
    let mut pending = Vec::new();
    for p in &m.content {
        match p {
            Part::Text { text, .. } => pending.push(text_block(text)),
            Part::Image { source, .. } => {
                pending.push(json!({"type": "image_url", "image_url": {"url": image_url(source)}}))
            }
            Part::ToolResult { call_id, content, .. } => {
                push_user(&mut pending, out);
                // Cohere has no error flag on tool results; `is_error` is not carried.
                out.push(json!({"role": "tool", "tool_call_id": call_id, "content": tool_content(content)}));
            }
            Part::ToolCall { .. } => {
                return Err(format!("{path}: a user message cannot contain a tool call"))
            }
            Part::Thinking { .. } | Part::RedactedThinking { .. } => {
                return Err(format!("{path}: a user message cannot contain thinking"))
            }
        }
    }
    push_user(&mut pending, out);
    Ok(())
}

/// A canonical assistant turn, or `None` when nothing in it can be sent.
fn assistant_message(m: &Message, path: &str) -> Result<Option<Value>, String> {
    // Text and thinking blocks in order; tool calls apart.
    let mut blocks: Vec<Value> = Vec::new();
    let mut calls: Vec<Value> = Vec::new();
    for p in &m.content {
        match p {
            Part::Text { text, .. } if !text.is_empty() => blocks.push(text_block(text)),
            // Cohere carries thinking in history but has no signature to keep.
            Part::Thinking { text, .. } if !text.is_empty() => {
                blocks.push(json!({"type": "thinking", "thinking": text}))
            }
            Part::Text { .. } | Part::Thinking { .. } => {}
            // Opaque Anthropic data: nothing Cohere can read.
            Part::RedactedThinking { .. } => {}
            Part::ToolCall { id, name, arguments } => calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": if arguments.is_empty() { "{}" } else { arguments.as_str() }},
            })),
            Part::Image { .. } => return Err(format!("{path}: Cohere does not accept images in assistant messages")),
            Part::ToolResult { .. } => {
                return Err(format!("{path}: an assistant message cannot contain a tool result"))
            }
        }
    }
    let mut msg = Map::new();
    msg.insert("role".into(), "assistant".into());
    if !calls.is_empty() {
        // With tool calls, the turn's text is its tool plan.
        let mut plan = String::new();
        blocks.retain(|b| match b.get("type").and_then(Value::as_str) {
            Some("text") => {
                plan.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default());
                false
            }
            _ => true,
        });
        if !plan.is_empty() {
            msg.insert("tool_plan".into(), plan.into());
        }
        msg.insert("tool_calls".into(), Value::Array(calls));
    }
    if !blocks.is_empty() {
        msg.insert("content".into(), Value::Array(blocks));
    }
    Ok((msg.len() > 1).then_some(Value::Object(msg)))
}

fn tool_json(t: &Tool) -> Value {
    let parameters = if t.parameters.is_object() {
        t.parameters.clone()
    } else {
        json!({"type": "object", "properties": {}})
    };
    let mut f = Map::new();
    f.insert("name".into(), t.name.clone().into());
    if let Some(d) = &t.description {
        f.insert("description".into(), d.clone().into());
    }
    f.insert("parameters".into(), parameters);
    json!({"type": "function", "function": f})
}

/// Canonical request → Cohere `/v2/chat` body. Never sent: `user` (no such field),
/// `cache_control` (no equivalent), `openai_only` fields, `parallel_tool_calls` (Cohere decides
/// on parallel calls itself and has no switch).
pub fn encode_request(req: &Request, model: &str) -> Result<Vec<u8>, String> {
    let mut messages = Vec::new();
    match req.system.as_slice() {
        [] => {}
        [one] => messages.push(json!({"role": "system", "content": one.text})),
        blocks => {
            let content: Vec<Value> = blocks.iter().map(|b| text_block(&b.text)).collect();
            messages.push(json!({"role": "system", "content": content}));
        }
    }
    for (i, m) in req.messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        match m.role {
            Role::User => user_messages(m, &path, &mut messages)?,
            Role::Assistant => messages.extend(assistant_message(m, &path)?),
        }
    }

    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), Value::Array(messages));
    body.insert("stream".into(), req.stream.into());
    if let Some(n) = req.max_tokens {
        body.insert("max_tokens".into(), n.into());
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), t.into());
    }
    if let Some(p) = req.top_p {
        body.insert("p".into(), p.clamp(TOP_P_MIN, TOP_P_MAX).into());
    }
    if !req.stop.is_empty() {
        if req.stop.len() > MAX_STOP_SEQUENCES {
            return Err(format!(
                "Cohere accepts at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                req.stop.len()
            ));
        }
        body.insert("stop_sequences".into(), req.stop.clone().into());
    }

    let (tools, choice): (Vec<&Tool>, Option<&str>) = match &req.tool_choice {
        None | Some(ToolChoice::Auto) => (req.tools.iter().collect(), None),
        Some(ToolChoice::None) => (req.tools.iter().collect(), Some("NONE")),
        Some(ToolChoice::Required) => {
            if req.tools.is_empty() {
                return Err("tool_choice requires a tool to be called, but no tools were given".into());
            }
            (req.tools.iter().collect(), Some("REQUIRED"))
        }
        Some(ToolChoice::Tool(name)) => {
            let only: Vec<&Tool> = req.tools.iter().filter(|t| &t.name == name).collect();
            if only.is_empty() {
                return Err(format!("tool_choice names the tool \"{name}\", which is not in tools"));
            }
            (only, Some("REQUIRED"))
        }
    };
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools.into_iter().map(tool_json).collect()));
        if let Some(c) = choice {
            body.insert("tool_choice".into(), c.into());
        }
    }
    match req.thinking_budget {
        None => {}
        // Cohere's budget must be positive; a zero budget means no thinking.
        Some(0) => {
            body.insert("thinking".into(), json!({"type": "disabled"}));
        }
        Some(n) => {
            body.insert("thinking".into(), json!({"type": "enabled", "token_budget": n}));
        }
    }
    serde_json::to_vec(&Value::Object(body)).map_err(|e| format!("cannot encode the Cohere request: {e}"))
}

/// Cohere counts are JSON numbers that may be written as floats (`"format: double"`).
fn count(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    v.as_u64().or_else(|| v.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.round() as u64))
}

/// Usage on the billed scale (see the module doc). `cached_tokens` is measured on the raw
/// prompt, which is the billed tokens plus Cohere's own unbilled ones (its preamble); those
/// lead the prompt, so they are the first part of a prefix-cache hit, and the billed part of
/// the hit is what is left after them.
fn usage(u: &Value) -> Usage {
    let billed = |field: &str| count(u.pointer(&format!("/billed_units/{field}")));
    let raw = |field: &str| count(u.pointer(&format!("/tokens/{field}")));
    let (billed_in, raw_in) = (billed("input_tokens"), raw("input_tokens"));
    let input = billed_in.or(raw_in).unwrap_or(0);
    let unbilled = match (raw_in, billed_in) {
        (Some(r), Some(b)) => r.saturating_sub(b),
        _ => 0,
    };
    Usage {
        input,
        output: billed("output_tokens").or_else(|| raw("output_tokens")).unwrap_or(0),
        cache_read: count(u.get("cached_tokens")).unwrap_or(0).saturating_sub(unbilled).min(input),
        cache_write: 0,
        // Cohere does not report reasoning tokens separately.
        reasoning: 0,
    }
}

enum Finish {
    Stop(StopReason),
    Failed { kind: &'static str, message: String },
    Unknown,
}

fn finish(reason: Option<&str>, error: Option<&str>) -> Finish {
    let error = error.filter(|e| !e.is_empty());
    match reason {
        Some("COMPLETE") => Finish::Stop(StopReason::EndTurn),
        Some("STOP_SEQUENCE") => Finish::Stop(StopReason::StopSequence),
        Some("MAX_TOKENS") => Finish::Stop(StopReason::MaxTokens),
        Some("TOOL_CALL") => Finish::Stop(StopReason::ToolUse),
        Some("TIMEOUT") => Finish::Failed {
            kind: "timeout_error",
            message: error
                .unwrap_or("Cohere stopped the generation because it exceeded the allowed time")
                .to_string(),
        },
        Some("ERROR") => Finish::Failed {
            kind: "api_error",
            message: error.unwrap_or("Cohere reported an internal error during generation").to_string(),
        },
        _ => match error {
            Some(e) => Finish::Failed { kind: "api_error", message: e.to_string() },
            None => Finish::Unknown,
        },
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

/// `function.arguments` is JSON text; tolerate an object.
fn arguments(call: &Value) -> String {
    match call.pointer("/function/arguments") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        _ => "{}".to_string(),
    }
}

/// Cohere `/v2/chat` response → canonical. `ERROR` and `TIMEOUT` finishes are errors.
pub fn decode_response(body: &[u8]) -> Result<Response, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON from upstream: {e}"))?;
    let stop = match finish(v.get("finish_reason").and_then(Value::as_str), None) {
        Finish::Stop(r) => Some(r),
        Finish::Failed { message, .. } => return Err(message),
        Finish::Unknown => None,
    };
    let msg = v.get("message").ok_or("Cohere response has no message")?;
    let mut content = Vec::new();
    match msg.get("content") {
        Some(Value::String(t)) if !t.is_empty() => {
            content.push(Part::Text { text: t.clone(), cache_control: None })
        }
        Some(Value::Array(items)) => {
            for item in items {
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => content
                        .push(Part::Text { text: str_at(item, "/text").to_string(), cache_control: None }),
                    Some("thinking") => content.push(Part::Thinking {
                        text: str_at(item, "/thinking").to_string(),
                        signature: None,
                    }),
                    _ => {} // content types added later
                }
            }
        }
        _ => {}
    }
    if let Some(plan) = msg.get("tool_plan").and_then(Value::as_str).filter(|p| !p.is_empty()) {
        content.push(Part::Text { text: plan.to_string(), cache_control: None });
    }
    for call in msg.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        content.push(Part::ToolCall {
            id: str_at(call, "/id").to_string(),
            name: str_at(call, "/function/name").to_string(),
            arguments: arguments(call),
        });
    }
    Ok(Response {
        id: str_at(&v, "/id").to_string(),
        // Cohere does not echo the model; the gateway knows which one it called.
        model: String::new(),
        created: now_secs(),
        content,
        stop,
        usage: v.get("usage").map(usage).unwrap_or_default(),
    })
}

/// The `message` of a Cohere error body (`{"id": …, "message": …}`).
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("message").and_then(Value::as_str).map(str::trim).filter(|m| !m.is_empty()).map(str::to_string)
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Open,
    /// `message-end` arrived and `Done` was sent.
    Done,
    /// An error was sent; nothing follows it.
    Failed,
}

/// Cohere chat SSE events → deltas. Every event is self-contained, so each yields its
/// deltas at once; `message-end` (terminal) yields `Stop`, `Usage`, `Done`.
#[derive(Default)]
pub struct StreamDecoder {
    started: bool,
    /// Cohere tool-call `index` → canonical call number.
    tool_indexes: Vec<(u64, usize)>,
    calls: usize,
    state: State,
}

impl StreamDecoder {
    fn start(&mut self, id: &str, out: &mut Vec<Delta>) {
        if !self.started {
            self.started = true;
            out.push(Delta::Start { id: id.to_string(), model: String::new() });
        }
    }

    fn call_for(&self, index: Option<u64>) -> Option<usize> {
        match index {
            // The latest call with that index, should Cohere ever reuse one.
            Some(i) => self.tool_indexes.iter().rev().find(|(idx, _)| *idx == i).map(|(_, c)| *c),
            None => self.tool_indexes.last().map(|(_, c)| *c),
        }
    }

    pub fn decode(
        &mut self,
        events: &mut Vec<crate::sse::Event>,
        out: &mut Vec<Delta>,
    ) -> Result<(), String> {
        for ev in events.drain(..) {
            if self.state != State::Open {
                continue;
            }
            let data = ev.data.trim();
            // Cohere ends its streams with an OpenAI-style `data: [DONE]` after `message-end`.
            if data.is_empty() || data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("invalid stream event: {e}"))?;
            let kind = v.get("type").and_then(Value::as_str).unwrap_or(ev.event.as_str());
            let index = v.get("index").and_then(Value::as_u64);
            match kind {
                "message-start" => self.start(str_at(&v, "/id"), out),
                "content-start" | "content-delta" => {
                    self.start("", out);
                    let c = v.pointer("/delta/message/content").unwrap_or(&Value::Null);
                    if let Some(t) = c.get("thinking").and_then(Value::as_str).filter(|t| !t.is_empty()) {
                        out.push(Delta::Thinking(t.to_string()));
                    }
                    if let Some(t) = c.get("text").and_then(Value::as_str).filter(|t| !t.is_empty()) {
                        out.push(Delta::Text(t.to_string()));
                    }
                }
                "tool-plan-delta" => {
                    self.start("", out);
                    let plan = str_at(&v, "/delta/message/tool_plan");
                    if !plan.is_empty() {
                        out.push(Delta::Text(plan.to_string()));
                    }
                }
                "tool-call-start" => {
                    self.start("", out);
                    let call = self.calls;
                    self.calls += 1;
                    self.tool_indexes.push((index.unwrap_or(call as u64), call));
                    let tc = v.pointer("/delta/message/tool_calls").unwrap_or(&Value::Null);
                    out.push(Delta::ToolCallStart {
                        call,
                        id: str_at(tc, "/id").to_string(),
                        name: str_at(tc, "/function/name").to_string(),
                    });
                    let args = str_at(tc, "/function/arguments");
                    if !args.is_empty() {
                        out.push(Delta::ToolArgs { call, json: args.to_string() });
                    }
                }
                "tool-call-delta" => {
                    let args = str_at(&v, "/delta/message/tool_calls/function/arguments");
                    if let Some(call) = self.call_for(index).filter(|_| !args.is_empty()) {
                        out.push(Delta::ToolArgs { call, json: args.to_string() });
                    }
                }
                "message-end" => {
                    self.start(str_at(&v, "/id"), out);
                    let d = v.get("delta").unwrap_or(&Value::Null);
                    let usage = d.get("usage").filter(|u| u.is_object()).map(usage);
                    match finish(
                        d.get("finish_reason").and_then(Value::as_str),
                        d.get("error").and_then(Value::as_str),
                    ) {
                        Finish::Failed { kind, message } => {
                            // Usage first: the tokens were spent even though the generation failed.
                            out.extend(usage.map(Delta::Usage));
                            out.push(Delta::Error { kind: kind.to_string(), message });
                            self.state = State::Failed;
                        }
                        f => {
                            if let Finish::Stop(r) = f {
                                out.push(Delta::Stop(r));
                            }
                            out.extend(usage.map(Delta::Usage));
                            out.push(Delta::Done);
                            self.state = State::Done;
                        }
                    }
                }
                // An untyped body with a message is an error reported mid-stream.
                "" | "error" => {
                    if let Some(message) = v.get("message").and_then(Value::as_str) {
                        out.push(Delta::Error {
                            kind: "api_error".to_string(),
                            message: message.to_string(),
                        });
                        self.state = State::Failed;
                    }
                }
                _ => {} // content-end, tool-call-end, citation-start/-end, debug, later additions
            }
        }
        Ok(())
    }

    /// The upstream body ended: fine after `message-end` (`Done` already sent) or an error;
    /// anything else is a truncated stream.
    pub fn finish(&mut self, _out: &mut Vec<Delta>) -> Result<(), String> {
        match self.state {
            State::Done | State::Failed => Ok(()),
            State::Open => Err("the Cohere stream ended before its message-end event".to_string()),
        }
    }
}

/// Canonical embeddings request → Cohere `/v2/embed` body (`user` has no Cohere field).
pub fn encode_embeddings(req: &EmbeddingsRequest, model: &str) -> Result<Vec<u8>, String> {
    if req.inputs.is_empty() {
        return Err("Cohere needs at least one input to embed".to_string());
    }
    if req.inputs.len() > MAX_EMBED_TEXTS {
        return Err(format!(
            "Cohere embeds at most {MAX_EMBED_TEXTS} inputs per request, got {}",
            req.inputs.len()
        ));
    }
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("texts".into(), req.inputs.clone().into());
    body.insert("input_type".into(), EMBED_INPUT_TYPE.into());
    body.insert("embedding_types".into(), json!(["float"]));
    if let Some(d) = req.dimensions {
        body.insert("output_dimension".into(), d.into());
    }
    serde_json::to_vec(&Value::Object(body)).map_err(|e| format!("cannot encode the Cohere request: {e}"))
}

/// Cohere `/v2/embed` response → canonical: `embeddings.float`, billed input tokens.
pub fn decode_embeddings(body: &[u8]) -> Result<EmbeddingsResponse, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON from upstream: {e}"))?;
    let rows = match v.get("embeddings") {
        Some(Value::Object(by_type)) => by_type.get("float").and_then(Value::as_array),
        // The pre-`embedding_types` shape: a bare array of float vectors.
        Some(Value::Array(rows)) => Some(rows),
        _ => None,
    }
    .ok_or("Cohere embeddings response has no float embeddings")?;
    let mut vectors = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let row = row.as_array().ok_or_else(|| format!("embeddings.float[{i}] is not an array"))?;
        let vector = row
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| format!("embeddings.float[{i}] holds a non-number"))?;
        vectors.push(vector);
    }
    Ok(EmbeddingsResponse {
        model: String::new(),
        vectors,
        input_tokens: count(v.pointer("/meta/billed_units/input_tokens"))
            .or_else(|| count(v.pointer("/meta/tokens/input_tokens")))
            .unwrap_or(0),
    })
}

crate::wire::codec::provider_codec!(CohereCodec, Cohere, embeddings);

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::sse::Parser;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/cohere/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn text(t: &str) -> Part {
        Part::Text { text: t.to_string(), cache_control: None }
    }

    fn request() -> Request {
        Request {
            model: "@cohere".into(),
            system: vec![TextBlock {
                text: "Be terse.".into(),
                cache_control: Some(json!({"type": "ephemeral"})),
            }],
            messages: vec![
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
                            source: ImageSource::Url("https://example.com/a.jpg".into()),
                            cache_control: None,
                        },
                    ],
                },
                Message {
                    role: Role::Assistant,
                    content: vec![
                        Part::Thinking {
                            text: "Both tools are needed.".into(),
                            signature: Some("EqQBCkYI".into()),
                        },
                        Part::RedactedThinking { data: "opaque".into() },
                        text("I will call both tools."),
                        Part::ToolCall {
                            id: "call_1".into(),
                            name: "get_weather".into(),
                            arguments: r#"{"location":"Paris"}"#.into(),
                        },
                        Part::ToolCall {
                            id: "call_2".into(),
                            name: "get_time".into(),
                            arguments: String::new(),
                        },
                    ],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        Part::ToolResult {
                            call_id: "call_1".into(),
                            content: vec![text("18C")],
                            is_error: false,
                        },
                        Part::ToolResult {
                            call_id: "call_2".into(),
                            content: vec![
                                text("10:00"),
                                Part::Image {
                                    source: ImageSource::Url("https://example.com/clock.png".into()),
                                    cache_control: None,
                                },
                            ],
                            is_error: true,
                        },
                        text("And tomorrow?"),
                    ],
                },
                Message { role: Role::Assistant, content: vec![text("Sunny, "), text("22C.")] },
                Message { role: Role::User, content: vec![text("Thanks.")] },
            ],
            max_tokens: Some(256),
            temperature: Some(0.7),
            top_p: Some(1.0),
            stop: vec!["END".into()],
            stream: true,
            stream_usage: true,
            tools: vec![
                Tool {
                    name: "get_weather".into(),
                    description: Some("Current weather".into()),
                    parameters: json!({"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}),
                    cache_control: Some(json!({"type": "ephemeral"})),
                },
                Tool {
                    name: "get_time".into(),
                    description: None,
                    parameters: Value::Null,
                    cache_control: None,
                },
            ],
            tool_choice: Some(ToolChoice::Required),
            parallel_tool_calls: Some(false),
            thinking_budget: Some(2048),
            user: Some("user-1".into()),
            openai_only: vec![("seed".into(), json!(7))],
        }
    }

    fn encode(req: &Request) -> Value {
        serde_json::from_slice(&encode_request(req, "command-a-03-2025").unwrap()).unwrap()
    }

    #[test]
    fn encodes_a_rich_request() {
        assert_eq!(
            encode(&request()),
            json!({
                "model": "command-a-03-2025",
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "Weather and time in Paris?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}
                    ]},
                    {"role": "assistant",
                     "content": [{"type": "thinking", "thinking": "Both tools are needed."}],
                     "tool_plan": "I will call both tools.",
                     "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
                     ]},
                    // parallel results become one tool message each; the image keeps only its text
                    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
                    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "10:00"}]},
                    {"role": "user", "content": "And tomorrow?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "Sunny, "}, {"type": "text", "text": "22C."}]},
                    {"role": "user", "content": "Thanks."}
                ],
                "stream": true,
                "max_tokens": 256,
                "temperature": 0.7,
                "p": 0.99,
                "stop_sequences": ["END"],
                "tools": [
                    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}},
                    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
                ],
                "tool_choice": "REQUIRED",
                "thinking": {"type": "enabled", "token_budget": 2048}
            }),
            "user, cache_control, seed and parallel_tool_calls never reach Cohere"
        );
    }

    #[test]
    fn encodes_a_minimal_request() {
        let req = Request {
            system: vec![
                TextBlock { text: "One.".into(), cache_control: None },
                TextBlock { text: "Two.".into(), cache_control: None },
            ],
            messages: vec![Message { role: Role::User, content: vec![text("Hi")] }],
            max_tokens: None,
            temperature: None,
            top_p: Some(0.0),
            stop: Vec::new(),
            stream: false,
            tools: Vec::new(),
            tool_choice: Some(ToolChoice::Auto),
            thinking_budget: Some(0),
            ..request()
        };
        assert_eq!(
            encode(&req),
            json!({
                "model": "command-a-03-2025",
                "messages": [
                    {"role": "system", "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]},
                    {"role": "user", "content": "Hi"}
                ],
                "stream": false,
                "p": 0.01,
                "thinking": {"type": "disabled"}
            })
        );
    }

    #[test]
    fn tool_choice_mapping() {
        let with = |choice: Option<ToolChoice>| encode(&Request { tool_choice: choice, ..request() });
        let auto = with(None);
        assert!(auto.get("tool_choice").is_none());
        assert_eq!(auto["tools"].as_array().map(Vec::len), Some(2));
        assert!(with(Some(ToolChoice::Auto)).get("tool_choice").is_none());
        assert_eq!(with(Some(ToolChoice::None))["tool_choice"], "NONE");
        assert_eq!(with(Some(ToolChoice::Required))["tool_choice"], "REQUIRED");
        // No "this tool" choice in Cohere: only that tool is offered, and some call is required.
        let one = with(Some(ToolChoice::Tool("get_time".into())));
        assert_eq!(one["tool_choice"], "REQUIRED");
        assert_eq!(
            one["tools"],
            json!([{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}])
        );
        // NONE without tools has nothing to forbid.
        let none = encode(&Request { tools: Vec::new(), tool_choice: Some(ToolChoice::None), ..request() });
        assert!(none.get("tool_choice").is_none() && none.get("tools").is_none());
    }

    #[test]
    fn request_errors() {
        let err = |req: Request| encode_request(&req, "command-a-03-2025").unwrap_err();
        assert!(
            err(Request { stop: (0..6).map(|i| i.to_string()).collect(), ..request() }).contains("at most 5")
        );
        assert!(err(Request { tool_choice: Some(ToolChoice::Tool("nope".into())), ..request() })
            .contains("\"nope\""));
        assert!(err(Request { tools: Vec::new(), ..request() }).contains("no tools"));
        let image =
            Part::Image { source: ImageSource::Url("https://example.com/a.png".into()), cache_control: None };
        let e = err(Request {
            messages: vec![Message { role: Role::Assistant, content: vec![image] }],
            ..request()
        });
        assert_eq!(e, "messages[0]: Cohere does not accept images in assistant messages");
        let call = Part::ToolCall { id: "c".into(), name: "f".into(), arguments: "{}".into() };
        let e =
            err(Request { messages: vec![Message { role: Role::User, content: vec![call] }], ..request() });
        assert_eq!(e, "messages[0]: a user message cannot contain a tool call");
        let result = Part::ToolResult { call_id: "c".into(), content: Vec::new(), is_error: false };
        let e = err(Request {
            messages: vec![Message { role: Role::Assistant, content: vec![result] }],
            ..request()
        });
        assert_eq!(e, "messages[0]: an assistant message cannot contain a tool result");
        let thinking = Part::Thinking { text: "t".into(), signature: None };
        let e = err(Request {
            messages: vec![Message { role: Role::User, content: vec![thinking] }],
            ..request()
        });
        assert_eq!(e, "messages[0]: a user message cannot contain thinking");
    }

    #[test]
    fn empty_turns_and_results() {
        let req = Request {
            messages: vec![
                Message { role: Role::User, content: Vec::new() },
                Message {
                    role: Role::Assistant,
                    content: vec![Part::RedactedThinking { data: "x".into() }, text("")],
                },
                Message {
                    role: Role::User,
                    content: vec![Part::ToolResult {
                        call_id: "c".into(),
                        content: Vec::new(),
                        is_error: false,
                    }],
                },
            ],
            ..request()
        };
        assert_eq!(
            encode(&req)["messages"],
            json!([
                {"role": "system", "content": "Be terse."},
                {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": ""}]}
            ])
        );
    }

    #[test]
    fn decodes_text_response() {
        let r = decode_response(&fixture("chat.json")).unwrap();
        assert_eq!(r.id, "c14c80c3-18eb-4519-9460-6c92edd8cfb4");
        assert_eq!(r.model, "");
        assert_eq!(
            r.content,
            vec![text("LLMs, or large language models, are neural networks trained on vast amounts of text to understand and generate human language.")]
        );
        assert_eq!(r.stop, Some(StopReason::EndTurn));
        // Billed counts; 1152 raw cached tokens less Cohere's 66 unbilled ones.
        assert_eq!(
            r.usage,
            Usage { input: 1200, output: 24, cache_read: 1086, cache_write: 0, reasoning: 0 }
        );
    }

    #[test]
    fn decodes_parallel_tool_calls() {
        let r = decode_response(&fixture("chat_tool_calls.json")).unwrap();
        assert_eq!(
            r.content,
            vec![
                text("I will look up the weather in Madrid and Brasilia."),
                Part::ToolCall {
                    id: "get_weather_dkf0akqdazjb".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"location":"Madrid"}"#.into()
                },
                Part::ToolCall {
                    id: "get_weather_gh65bt2tcdy1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"location":"Brasilia"}"#.into()
                },
            ]
        );
        assert_eq!(r.stop, Some(StopReason::ToolUse));
        assert_eq!(r.usage, Usage { input: 37, output: 47, ..Usage::default() });
    }

    #[test]
    fn decodes_thinking() {
        let r = decode_response(&fixture("chat_thinking.json")).unwrap();
        assert_eq!(
            r.content,
            vec![
                Part::Thinking {
                    text: "Alice has 2 sisters, so including Alice there are 3 girls. Each brother therefore has 3 sisters."
                        .into(),
                    signature: None
                },
                text("Each of Alice's brothers has 3 sisters."),
            ]
        );
        assert_eq!(r.usage, Usage { input: 29, output: 112, ..Usage::default() });
    }

    fn with_finish(reason: &str) -> Result<Response, String> {
        let mut v: Value = serde_json::from_slice(&fixture("chat.json")).unwrap();
        v["finish_reason"] = reason.into();
        decode_response(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn finish_reasons() {
        for (reason, stop) in [
            ("COMPLETE", Some(StopReason::EndTurn)),
            ("STOP_SEQUENCE", Some(StopReason::StopSequence)),
            ("MAX_TOKENS", Some(StopReason::MaxTokens)),
            ("TOOL_CALL", Some(StopReason::ToolUse)),
            ("SOMETHING_NEW", None),
        ] {
            assert_eq!(with_finish(reason).unwrap().stop, stop, "{reason}");
        }
        assert!(with_finish("ERROR").unwrap_err().contains("internal error"));
        assert!(with_finish("TIMEOUT").unwrap_err().contains("allowed time"));
    }

    #[test]
    fn usage_variants() {
        // Counts written as floats; raw counts when nothing is billed; no raw count to subtract.
        let u =
            usage(&json!({"tokens": {"input_tokens": 71.0, "output_tokens": 26.0}, "cached_tokens": 64.0}));
        assert_eq!(u, Usage { input: 71, output: 26, cache_read: 64, ..Usage::default() });
        let u =
            usage(&json!({"billed_units": {"input_tokens": 10, "output_tokens": 3}, "cached_tokens": 64}));
        assert_eq!(u, Usage { input: 10, output: 3, cache_read: 10, ..Usage::default() });
        assert_eq!(usage(&json!({})), Usage::default());
        assert!(decode_response(b"not json").unwrap_err().starts_with("invalid JSON"));
        assert!(decode_response(br#"{"id":"x","finish_reason":"COMPLETE"}"#).is_err());
    }

    /// Feeds `bytes` split once at `split` through the SSE parser and the decoder.
    fn run(bytes: &[u8], split: usize) -> (Vec<Delta>, Result<(), String>) {
        let (mut parser, mut decoder) = (Parser::new(), StreamDecoder::default());
        let (mut events, mut out) = (Vec::new(), Vec::new());
        for part in [&bytes[..split], &bytes[split..]] {
            parser.feed(part, &mut events).unwrap();
            decoder.decode(&mut events, &mut out).unwrap();
        }
        parser.finish(&mut events);
        decoder.decode(&mut events, &mut out).unwrap();
        let end = decoder.finish(&mut out);
        (out, end)
    }

    /// Whole-body deltas, checked identical for every two-read split.
    fn stream(name: &str) -> (Vec<Delta>, Result<(), String>) {
        stream_bytes(&fixture(name))
    }

    fn stream_bytes(bytes: &[u8]) -> (Vec<Delta>, Result<(), String>) {
        let whole = run(bytes, bytes.len());
        for split in 0..=bytes.len() {
            assert_eq!(run(bytes, split), whole, "split at {split}");
        }
        whole
    }

    fn t(s: &str) -> Delta {
        Delta::Text(s.to_string())
    }

    #[test]
    fn text_stream() {
        let (deltas, end) = stream("chat_stream.txt");
        assert_eq!(end, Ok(()));
        assert_eq!(
            deltas,
            vec![
                Delta::Start { id: "29f14a5a-11de-4cae-9800-25e4747408ea".into(), model: String::new() },
                t("The"),
                t(" office"),
                t(" offers"),
                t(" gym memberships"),
                t(" and café vouchers ☕."),
                Delta::Stop(StopReason::EndTurn),
                Delta::Usage(Usage { input: 342, output: 9, cache_read: 311, ..Usage::default() }),
                Delta::Done,
            ]
        );
    }

    #[test]
    fn tool_stream() {
        let (deltas, end) = stream("chat_tool_stream.txt");
        assert_eq!(end, Ok(()));
        let args = |call: usize, json: &str| Delta::ToolArgs { call, json: json.to_string() };
        assert_eq!(
            deltas,
            vec![
                Delta::Start { id: "4c2e7f0b-9b1a-4a3e-b7d5-8e6f1c2d3a4b".into(), model: String::new() },
                t("I will"),
                t(" check the weather in Madrid and Brasilia."),
                Delta::ToolCallStart {
                    call: 0,
                    id: "get_weather_nsz5zm3w56q3".into(),
                    name: "get_weather".into()
                },
                args(0, "{\n    \""),
                args(0, "location"),
                args(0, "\": \"Madrid\"\n}"),
                Delta::ToolCallStart {
                    call: 1,
                    id: "get_weather_h5wy4v9e9p1z".into(),
                    name: "get_weather".into()
                },
                args(1, "{\n    \"location\": \"Brasilia\"\n}"),
                Delta::Stop(StopReason::ToolUse),
                Delta::Usage(Usage { input: 37, output: 40, ..Usage::default() }),
                Delta::Done,
            ]
        );
    }

    #[test]
    fn thinking_stream() {
        let (deltas, end) = stream("chat_thinking_stream.txt");
        assert_eq!(end, Ok(()));
        assert_eq!(
            deltas,
            vec![
                Delta::Start { id: "b7a2c9e4-1f3d-4e8a-9c6b-2d5f7e0a1b3c".into(), model: String::new() },
                Delta::Thinking("Alice has 2 sisters,".into()),
                Delta::Thinking(" so each brother has 3.".into()),
                t("Each brother has 3 sisters."),
                Delta::Stop(StopReason::MaxTokens),
                Delta::Usage(Usage { input: 29, output: 64, ..Usage::default() }),
                Delta::Done,
            ]
        );
    }

    #[test]
    fn in_stream_error() {
        let (deltas, end) = stream("chat_error_stream.txt");
        assert_eq!(end, Ok(()), "an error ends the stream properly; no Done follows it");
        assert_eq!(
            deltas,
            vec![
                Delta::Start { id: "e3d1c0b9-a8f7-4e6d-5c4b-3a2918f7e6d5".into(), model: String::new() },
                t("Partial"),
                Delta::Usage(Usage { input: 12, output: 1, ..Usage::default() }),
                Delta::Error {
                    kind: "api_error".into(),
                    message: "internal server error, this has been reported to our developers".into()
                },
            ]
        );
        let timeout = b"event: message-end\ndata: {\"type\":\"message-end\",\"delta\":{\"finish_reason\":\"TIMEOUT\"}}\n\n";
        let (deltas, end) = stream_bytes(timeout);
        assert_eq!(end, Ok(()));
        assert!(
            matches!(deltas.as_slice(), [Delta::Start { .. }, Delta::Error { kind, .. }] if kind == "timeout_error")
        );
        // An untyped error body mid-stream.
        let (deltas, end) = stream_bytes(b"data: {\"id\":\"x\",\"message\":\"model overloaded\"}\n\n");
        assert_eq!(end, Ok(()));
        assert_eq!(
            deltas,
            vec![Delta::Error { kind: "api_error".into(), message: "model overloaded".into() }]
        );
    }

    #[test]
    fn truncated_stream() {
        let full = fixture("chat_stream.txt");
        let text = String::from_utf8(full).unwrap();
        let cut = text.find("event: message-end").unwrap();
        let (deltas, end) = stream_bytes(&text.as_bytes()[..cut]);
        assert_eq!(end, Err("the Cohere stream ended before its message-end event".to_string()));
        assert!(!deltas.contains(&Delta::Done));
        assert_eq!(deltas.last(), Some(&t(" and café vouchers ☕.")));
        // Cut inside the terminal event's data line: the parser flushes the half event at the
        // end of the body, and it does not parse.
        let (mut parser, mut decoder) = (Parser::new(), StreamDecoder::default());
        let (mut events, mut out) = (Vec::new(), Vec::new());
        parser.feed(&text.as_bytes()[..cut + 40], &mut events).unwrap();
        decoder.decode(&mut events, &mut out).unwrap();
        parser.finish(&mut events);
        assert!(decoder.decode(&mut events, &mut out).unwrap_err().starts_with("invalid stream event"));
        assert!(decoder.finish(&mut out).is_err() && !out.contains(&Delta::Done));
    }

    #[test]
    fn nothing_after_terminal_and_bad_events() {
        let mut d = StreamDecoder::default();
        let mut out = Vec::new();
        let ev = |event: &str, data: &str| crate::sse::Event { event: event.into(), data: data.into() };
        // No `type` in the JSON: the SSE event name is used; no message-start: Start comes first.
        let mut events = vec![
            ev("content-delta", r#"{"index":0,"delta":{"message":{"content":{"text":"a"}}}}"#),
            ev("message-end", r#"{"delta":{"finish_reason":"STOP_SEQUENCE"}}"#),
            ev(
                "content-delta",
                r#"{"type":"content-delta","index":0,"delta":{"message":{"content":{"text":"late"}}}}"#,
            ),
        ];
        d.decode(&mut events, &mut out).unwrap();
        assert!(events.is_empty());
        let mut more =
            vec![ev("message-end", r#"{"type":"message-end","delta":{"finish_reason":"COMPLETE"}}"#)];
        d.decode(&mut more, &mut out).unwrap();
        assert_eq!(d.finish(&mut out), Ok(()));
        assert_eq!(
            out,
            vec![
                Delta::Start { id: String::new(), model: String::new() },
                t("a"),
                Delta::Stop(StopReason::StopSequence),
                Delta::Done
            ]
        );
        let mut d = StreamDecoder::default();
        let mut bad = vec![ev("", "{not json")];
        assert!(d.decode(&mut bad, &mut out).unwrap_err().starts_with("invalid stream event"));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(&fixture("error_400.json")).as_deref(),
            Some("invalid request: message must be at least 1 token long or tool results must be specified.")
        );
        assert_eq!(error_message(&fixture("error_401.json")).as_deref(), Some("invalid api token"));
        assert!(error_message(&fixture("error_429.json"))
            .is_some_and(|m| m.starts_with("You are using a Trial key")));
        assert!(
            error_message(&fixture("error_500.json")).is_some_and(|m| m.starts_with("internal server error"))
        );
        assert_eq!(error_message(br#"{"message":""}"#), None);
        assert_eq!(error_message(br#"{"id":"x"}"#), None);
        assert_eq!(error_message(b"<html>502</html>"), None);
    }

    #[test]
    fn embeddings() {
        let req = EmbeddingsRequest {
            model: "@embed".into(),
            inputs: vec!["hello".into(), "goodbye".into()],
            dimensions: Some(256),
            user: Some("user-1".into()),
        };
        let body: Value = serde_json::from_slice(&encode_embeddings(&req, "embed-v4.0").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "embed-v4.0",
                "texts": ["hello", "goodbye"],
                "input_type": "search_document",
                "embedding_types": ["float"],
                "output_dimension": 256
            })
        );
        let plain: Value = serde_json::from_slice(
            &encode_embeddings(&EmbeddingsRequest { dimensions: None, ..req.clone() }, "embed-english-v3.0")
                .unwrap(),
        )
        .unwrap();
        assert!(plain.get("output_dimension").is_none());
        assert!(encode_embeddings(&EmbeddingsRequest { inputs: Vec::new(), ..req.clone() }, "m").is_err());
        let many = EmbeddingsRequest { inputs: vec!["x".into(); 97], ..req };
        assert!(encode_embeddings(&many, "m").unwrap_err().contains("at most 96"));

        let r = decode_embeddings(&fixture("embed.json")).unwrap();
        assert_eq!(
            r,
            EmbeddingsResponse {
                model: String::new(),
                vectors: vec![
                    vec![0.016296387, -0.008354187, -0.04699707, 0.10797119],
                    vec![-0.0284729, 0.04190063, 0.0035953522, -0.052337646],
                ],
                input_tokens: 2,
            }
        );
        let legacy =
            decode_embeddings(br#"{"embeddings":[[1,2.5]],"meta":{"billed_units":{"input_tokens":1}}}"#);
        assert_eq!(legacy.map(|r| r.vectors), Ok(vec![vec![1.0, 2.5]]));
        assert!(decode_embeddings(br#"{"embeddings":{"int8":[[1]]}}"#).is_err());
        assert!(decode_embeddings(br#"{"embeddings":{"float":[[1,"x"]]}}"#).is_err());
    }
}
