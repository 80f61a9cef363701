//! AWS Bedrock Runtime Converse / ConverseStream: the codec. Requests and plain responses
//! are JSON. Streamed responses arrive as binary `application/vnd.amazon.eventstream` frames,
//! which the Bedrock provider adapter (`providers::bedrock`, with SigV4 signing) cuts into
//! `crate::sse::Event`s (event name + JSON payload), so [`StreamDecoder`] has the same shape
//! as the SSE codecs.
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

use serde_json::{json, Map, Value};

use crate::wire::canonical::*;

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

crate::wire::codec::provider_codec!(BedrockCodec, Bedrock);

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bedrock");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
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
}
