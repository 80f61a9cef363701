//! Google Gemini (Generative Language API): the provider adapter (`kind: gemini`) for
//! `models/{model}:generateContent`, `:streamGenerateContent?alt=sse` and
//! `:batchEmbedContents`. The base URL carries the API version
//! (`https://generativelanguage.googleapis.com/v1beta`); the gateway authenticates with the
//! `x-goog-api-key` header. The model goes in the URL, never in the body.

use serde_json::{json, Map, Value};

use crate::wire::canonical::*;

/// Gemini thought signatures are model-bound and opaque; canonical signatures also carry
/// other providers' (Anthropic) signatures. The tag marks the ones Gemini issued so that a
/// foreign signature is never replayed to Gemini (it answers 400 "corrupted signature").
const SIGNATURE_TAG: &str = GEMINI_SIGNATURE_TAG;

/// Documented placeholder for history Gemini did not produce itself (other providers'
/// turns, or a client that dropped signatures): Gemini 3 rejects the first `functionCall`
/// of a model turn without a signature.
const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// Prefix of the call ids this codec makes up for `functionCall`s that came without an id;
/// such ids are never sent back to Gemini (it never saw them).
const SYNTHETIC_CALL_ID: &str = "call_gemini_";

/// `generationConfig.stopSequences` accepts at most 5 entries.
const MAX_STOP_SEQUENCES: usize = 5;

/// Image MIME types Gemini accepts (image understanding guide): no GIF, BMP, SVG, ….
const IMAGE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"];

/// `models/gemini-x` and `gemini-x` name the same model; the path adds the prefix itself.
pub fn model_id(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

fn tag_signature(sig: &str) -> String {
    format!("{SIGNATURE_TAG}{sig}")
}

/// The raw Gemini signature of a canonical one, if Gemini issued it.
fn gemini_signature(sig: &Option<String>) -> Option<&str> {
    sig.as_deref().and_then(|s| s.strip_prefix(SIGNATURE_TAG)).filter(|s| !s.is_empty())
}

fn int32(n: u64, what: &str) -> Result<i64, String> {
    i32::try_from(n).map(i64::from).map_err(|_| format!("{what} is too large for Gemini ({n})"))
}

fn normalize_image_type(media_type: &str) -> String {
    let t = media_type.trim().to_ascii_lowercase();
    if t == "image/jpg" {
        "image/jpeg".to_string()
    } else {
        t
    }
}

/// Gemini's `fileData` needs a MIME type and fetches the URL itself: guess the type from the
/// extension (JPEG when there is none), refuse formats Gemini does not read.
fn url_image_type(url: &str) -> Result<&'static str, String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let file = path.rsplit('/').next().unwrap_or(path);
    let ext = file.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    Ok(match ext.as_str() {
        "png" => "image/png",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "gif" | "bmp" | "svg" | "tif" | "tiff" | "avif" | "ico" | "jxl" => {
            return Err(format!(
                "Gemini does not accept .{ext} images (png, jpeg, webp, heic and heif only): {url}"
            ))
        }
        _ => "image/jpeg",
    })
}

fn image_json(source: &ImageSource, path: &str) -> Result<Value, String> {
    let (media_type, data) = match source {
        ImageSource::Base64 { media_type, data } => (media_type.as_str(), data.as_str()),
        ImageSource::Url(url) => match url.strip_prefix("data:").and_then(|r| r.split_once(',')) {
            Some((meta, data)) if meta.ends_with(";base64") => (meta.trim_end_matches(";base64"), data),
            _ => {
                let mime = url_image_type(url).map_err(|e| format!("{path}: {e}"))?;
                return Ok(json!({"fileData": {"mimeType": mime, "fileUri": url}}));
            }
        },
    };
    let mime = normalize_image_type(media_type);
    if !IMAGE_TYPES.contains(&mime.as_str()) {
        return Err(format!(
            "{path}: Gemini does not accept {media_type} images (png, jpeg, webp, heic and heif only)"
        ));
    }
    Ok(json!({"inlineData": {"mimeType": mime, "data": data}}))
}

/// A tool result as a `functionResponse.response` value: Gemini wants a JSON object and
/// suggests `result` / `error` keys. Structured (object or array) results are passed as JSON
/// so the model sees fields, not an escaped string; anything else stays text.
fn result_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => v,
        _ => Value::String(text.to_string()),
    }
}

/// Sends an id to Gemini only when it is not one this codec invented.
fn wire_call_id(id: &str) -> Option<&str> {
    Some(id).filter(|id| !id.is_empty() && !id.starts_with(SYNTHETIC_CALL_ID))
}

fn user_parts(content: &[Part], calls: &[(&str, &str)], path: &str) -> Result<Vec<Value>, String> {
    let mut parts = Vec::with_capacity(content.len());
    for (j, p) in content.iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        match p {
            Part::Text { text, .. } if text.is_empty() => {} // Gemini rejects empty text parts
            Part::Text { text, .. } => parts.push(json!({"text": text})),
            Part::Image { source, .. } => parts.push(image_json(source, &path)?),
            Part::ToolResult { call_id, content, is_error } => {
                // Older Gemini models have no call ids: a response is matched by function name.
                let name =
                    calls.iter().rev().find(|(id, _)| id == call_id).map(|(_, name)| *name).ok_or_else(
                        || format!("{path}: tool result \"{call_id}\" answers no earlier tool call"),
                    )?;
                // Only the text of a tool result survives (images inside it are dropped).
                let text = content
                    .iter()
                    .filter_map(|c| match c {
                        Part::Text { text, .. } => Some(text.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let key = if *is_error { "error" } else { "result" };
                let mut response = Map::new();
                response.insert(key.into(), result_value(&text));
                let mut fr = Map::new();
                if let Some(id) = wire_call_id(call_id) {
                    fr.insert("id".into(), id.into());
                }
                fr.insert("name".into(), name.into());
                fr.insert("response".into(), Value::Object(response));
                parts.push(json!({"functionResponse": fr}));
            }
            Part::ToolCall { .. } => return Err(format!("{path}: tool calls belong in assistant messages")),
            // Reasoning is the model's own; a user turn has none to replay.
            Part::Thinking { .. } | Part::RedactedThinking { .. } => {}
        }
    }
    Ok(parts)
}

fn set_signature(part: &mut Value, sig: &str) {
    if let Value::Object(o) = part {
        o.insert("thoughtSignature".into(), sig.into());
    }
}

/// A Gemini signature waiting for the part it belongs to, and the thought part (by index in
/// the output) it came with, if any.
type Pending = Option<(String, Option<usize>)>;

/// Puts a pending signature back where it came from: on its thought part, or on an empty
/// text part (how Gemini itself delivers a trailing signature).
fn flush_signature(pending: &mut Pending, parts: &mut Vec<Value>) {
    match pending.take() {
        Some((sig, Some(i))) => {
            if let Some(p) = parts.get_mut(i) {
                set_signature(p, &sig);
            }
        }
        Some((sig, None)) => parts.push(json!({"text": "", "thoughtSignature": sig})),
        None => {}
    }
}

/// One assistant message as Gemini `model` parts. Decoding puts a signature that Gemini sent
/// on a text or `functionCall` part into an empty `Thinking` just before that part; this
/// undoes it. A signature followed by a function call always goes on the call (Gemini 3
/// validates exactly that one), which also repairs clients that folded it into the preceding
/// thought block.
fn model_parts(content: &[Part], path: &str) -> Result<Vec<Value>, String> {
    let mut parts: Vec<Value> = Vec::with_capacity(content.len());
    let mut pending: Pending = None;
    let mut called = false;
    for (j, p) in content.iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        match p {
            Part::Thinking { text, signature } => {
                // Unsigned or foreign reasoning cannot be validated by Gemini and only costs
                // tokens: it is dropped.
                let Some(sig) = gemini_signature(signature) else { continue };
                flush_signature(&mut pending, &mut parts);
                let origin = if text.is_empty() {
                    None
                } else {
                    parts.push(json!({"text": text, "thought": true}));
                    Some(parts.len() - 1)
                };
                pending = Some((sig.to_string(), origin));
            }
            Part::RedactedThinking { .. } => {}
            Part::Text { text, .. } => {
                let mut part = json!({"text": text});
                match pending.take() {
                    // A signature that came on this very part goes back on it.
                    Some((sig, None)) => set_signature(&mut part, &sig),
                    other => {
                        pending = other;
                        flush_signature(&mut pending, &mut parts);
                        if text.is_empty() {
                            continue; // Gemini rejects empty text parts
                        }
                    }
                }
                parts.push(part);
            }
            Part::Image { source, .. } => {
                let mut part = image_json(source, &path)?;
                match pending.take() {
                    Some((sig, None)) => set_signature(&mut part, &sig),
                    other => {
                        pending = other;
                        flush_signature(&mut pending, &mut parts);
                    }
                }
                parts.push(part);
            }
            Part::ToolCall { id, name, arguments } => {
                let args: Value = if arguments.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(arguments)
                        .map_err(|e| format!("{path}: tool call arguments are not valid JSON: {e}"))?
                };
                if !args.is_object() {
                    return Err(format!("{path}: tool call arguments must be a JSON object"));
                }
                let mut call = Map::new();
                if let Some(id) = wire_call_id(id) {
                    call.insert("id".into(), id.into());
                }
                call.insert("name".into(), name.as_str().into());
                call.insert("args".into(), args);
                let mut part = json!({"functionCall": call});
                match pending.take() {
                    Some((sig, _)) => set_signature(&mut part, &sig),
                    None if !called => set_signature(&mut part, SKIP_SIGNATURE),
                    None => {}
                }
                called = true;
                parts.push(part);
            }
            Part::ToolResult { .. } => return Err(format!("{path}: tool results belong in user messages")),
        }
    }
    flush_signature(&mut pending, &mut parts);
    Ok(parts)
}

fn declaration(t: &Tool, path: &str) -> Result<Value, String> {
    let mut d = Map::new();
    d.insert("name".into(), t.name.as_str().into());
    if let Some(desc) = &t.description {
        d.insert("description".into(), desc.as_str().into());
    }
    match &t.parameters {
        // `parametersJsonSchema` takes JSON Schema as it is (additionalProperties, anyOf,
        // $ref, type arrays), where `parameters` is a strict OpenAPI subset that rejects
        // unknown keys. `$schema` is only a dialect marker: dropped to be safe.
        Value::Object(schema) => {
            let mut schema = schema.clone();
            schema.remove("$schema");
            d.insert("parametersJsonSchema".into(), Value::Object(schema));
        }
        Value::Null => {}
        _ => return Err(format!("{path}.parameters must be a JSON schema object")),
    }
    Ok(Value::Object(d))
}

/// Canonical request → Gemini `GenerateContentRequest` body. Consecutive turns of one role are
/// merged: the function responses answering one model turn must share one user turn.
pub fn encode_request(req: &Request, _model: &str) -> Result<Vec<u8>, String> {
    let mut contents: Vec<(Role, Vec<Value>)> = Vec::new();
    // Every tool call so far, for naming the function of a later result.
    let mut calls: Vec<(&str, &str)> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let parts = match m.role {
            Role::User => user_parts(&m.content, &calls, &path)?,
            Role::Assistant => model_parts(&m.content, &path)?,
        };
        for p in &m.content {
            if let Part::ToolCall { id, name, .. } = p {
                calls.push((id.as_str(), name.as_str()));
            }
        }
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some((role, existing)) if *role == m.role => existing.extend(parts),
            _ => contents.push((m.role, parts)),
        }
    }
    if contents.is_empty() {
        return Err("Gemini needs at least one message with content".into());
    }
    let contents: Vec<Value> = contents
        .into_iter()
        .map(|(role, parts)| json!({"role": if role == Role::User { "user" } else { "model" }, "parts": parts}))
        .collect();

    let mut body = Map::new();
    let system: Vec<Value> =
        req.system.iter().filter(|b| !b.text.is_empty()).map(|b| json!({"text": b.text})).collect();
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({"parts": system}));
    }
    body.insert("contents".into(), Value::Array(contents));
    if !req.tools.is_empty() {
        let decls = req
            .tools
            .iter()
            .enumerate()
            .map(|(i, t)| declaration(t, &format!("tools[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        body.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        if let Some(choice) = &req.tool_choice {
            let config = match choice {
                ToolChoice::Auto => json!({"mode": "AUTO"}),
                ToolChoice::None => json!({"mode": "NONE"}),
                ToolChoice::Required => json!({"mode": "ANY"}),
                ToolChoice::Tool(name) => {
                    if !req.tools.iter().any(|t| &t.name == name) {
                        return Err(format!("tool_choice names \"{name}\", which is not among the tools"));
                    }
                    json!({"mode": "ANY", "allowedFunctionNames": [name]})
                }
            };
            body.insert("toolConfig".into(), json!({"functionCallingConfig": config}));
        }
    }
    let mut config = Map::new();
    if let Some(n) = req.max_tokens {
        config.insert("maxOutputTokens".into(), int32(n, "max_tokens")?.into());
    }
    if let Some(t) = req.temperature {
        config.insert("temperature".into(), t.into());
    }
    if let Some(p) = req.top_p {
        config.insert("topP".into(), p.into());
    }
    if !req.stop.is_empty() {
        if req.stop.len() > MAX_STOP_SEQUENCES {
            return Err(format!(
                "Gemini accepts at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                req.stop.len()
            ));
        }
        config.insert("stopSequences".into(), req.stop.clone().into());
    }
    if let Some(budget) = req.thinking_budget {
        config.insert(
            "thinkingConfig".into(),
            json!({"thinkingBudget": int32(budget, "thinking budget")?, "includeThoughts": true}),
        );
    }
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    serde_json::to_vec(&Value::Object(body)).map_err(|e| format!("cannot serialize the Gemini request: {e}"))
}

/// Gemini's finish reason → canonical. Gemini reports a stop sequence as `STOP` too, and
/// says nothing specific when it stops to call tools.
fn stop_reason(reason: &str, has_calls: bool) -> StopReason {
    match reason {
        "MAX_TOKENS" => StopReason::MaxTokens,
        "SAFETY"
        | "RECITATION"
        | "LANGUAGE"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION"
        | "MODEL_ARMOR" => StopReason::ContentFilter,
        // STOP, OTHER, MALFORMED_FUNCTION_CALL, UNEXPECTED_TOOL_CALL, TOO_MANY_TOOL_CALLS,
        // NO_IMAGE, IMAGE_OTHER and reasons added later end the turn normally.
        _ if has_calls => StopReason::ToolUse,
        _ => StopReason::EndTurn,
    }
}

/// `promptTokenCount` already includes cached tokens; tool-use prompt tokens (built-in
/// tools) are prompt tokens too. Thoughts are generated tokens reported apart.
fn usage(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let thoughts = n("thoughtsTokenCount");
    Usage {
        input: n("promptTokenCount") + n("toolUsePromptTokenCount"),
        output: n("candidatesTokenCount") + thoughts,
        cache_read: n("cachedContentTokenCount"),
        cache_write: 0,
        reasoning: thoughts,
    }
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// A call id for a `functionCall` without one: deterministic, unique within the response.
fn call_id(call: &Value, response_id: &str, index: usize) -> String {
    match call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()) {
        Some(id) => id.to_string(),
        None if response_id.is_empty() => format!("{SYNTHETIC_CALL_ID}{index}"),
        None => format!("{SYNTHETIC_CALL_ID}{response_id}_{index}"),
    }
}

fn call_args(call: &Value) -> String {
    match call.get("args") {
        Some(args @ Value::Object(_)) => serde_json::to_string(args).unwrap_or_else(|_| "{}".into()),
        _ => "{}".into(),
    }
}

fn part_signature(part: &Value) -> Option<String> {
    part.get("thoughtSignature").and_then(Value::as_str).filter(|s| !s.is_empty()).map(tag_signature)
}

fn is_thought(part: &Value) -> bool {
    part.get("thought").and_then(Value::as_bool).unwrap_or(false)
}

/// Gemini response body (2xx, non-streamed) → canonical response. The envelope is read
/// into typed fields and only parts stay `Value`s: a `Value` tree for the whole body was
/// the largest cost of a translated request.
pub fn decode_response(body: &[u8]) -> Result<Response, String> {
    #[derive(serde::Deserialize)]
    struct ContentIn {
        #[serde(default)]
        parts: Vec<Value>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct CandidateIn<'a> {
        #[serde(default)]
        content: Option<ContentIn>,
        #[serde(default, borrow)]
        finish_reason: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ResponseIn<'a> {
        #[serde(default, borrow)]
        candidates: Vec<CandidateIn<'a>>,
        #[serde(default)]
        usage_metadata: Option<Value>,
        #[serde(default)]
        prompt_feedback: Option<Value>,
        #[serde(default, borrow)]
        model_version: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        response_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        error: Option<Value>,
    }
    let v: ResponseIn =
        serde_json::from_slice(body).map_err(|e| format!("invalid response from upstream: {e}"))?;
    if let Some(err) = &v.error {
        return Err(format!(
            "upstream error: {}",
            err.get("message").and_then(Value::as_str).unwrap_or("unknown error")
        ));
    }
    let id = v.response_id.as_deref().unwrap_or_default().to_string();
    let mut resp = Response {
        model: v.model_version.as_deref().unwrap_or_default().to_string(),
        created: now_secs(),
        content: Vec::new(),
        stop: None,
        usage: v.usage_metadata.as_ref().map(usage).unwrap_or_default(),
        id: String::new(),
    };
    let Some(candidate) = v.candidates.first() else {
        // A blocked prompt is an answer (with no content), not an upstream failure.
        if v.prompt_feedback.as_ref().and_then(|f| f.get("blockReason")).is_some() {
            resp.id = id;
            resp.stop = Some(StopReason::ContentFilter);
            return Ok(resp);
        }
        return Err("upstream response has no candidates".into());
    };
    let mut calls = 0;
    for part in candidate.content.iter().flat_map(|c| c.parts.iter()) {
        let sig = part_signature(part);
        let text = part.get("text").and_then(Value::as_str).unwrap_or_default();
        if is_thought(part) {
            if !text.is_empty() || sig.is_some() {
                resp.content.push(Part::Thinking { text: text.to_string(), signature: sig });
            }
            continue;
        }
        // The canonical model has no signature on text or calls: an empty Thinking right
        // before the part carries it (encode_request puts it back).
        if let Some(sig) = sig {
            resp.content.push(Part::Thinking { text: String::new(), signature: Some(sig) });
        }
        if let Some(call) = part.get("functionCall") {
            resp.content.push(Part::ToolCall {
                id: call_id(call, &id, calls),
                name: str_field(call, "name"),
                arguments: call_args(call),
            });
            calls += 1;
        } else if let Some(blob) = part.get("inlineData") {
            resp.content.push(Part::Image {
                source: ImageSource::Base64 {
                    media_type: str_field(blob, "mimeType"),
                    data: str_field(blob, "data"),
                },
                cache_control: None,
            });
        } else if let Some(file) = part.get("fileData") {
            resp.content.push(Part::Image {
                source: ImageSource::Url(str_field(file, "fileUri")),
                cache_control: None,
            });
        } else if !text.is_empty() {
            resp.content.push(Part::Text { text: text.to_string(), cache_control: None });
        }
    }
    resp.stop = candidate.finish_reason.as_deref().map(|r| stop_reason(r, calls > 0));
    resp.id = id;
    Ok(resp)
}

/// Canonical error kind for a Google error object (`status`, falling back on `code`).
fn error_kind(err: &Value) -> &'static str {
    match err.get("status").and_then(Value::as_str).unwrap_or_default() {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => "invalid_request_error",
        "UNAUTHENTICATED" => "authentication_error",
        "PERMISSION_DENIED" => "permission_error",
        "NOT_FOUND" => "not_found_error",
        "RESOURCE_EXHAUSTED" => "rate_limit_error",
        "UNAVAILABLE" => "overloaded_error",
        "DEADLINE_EXCEEDED" => "timeout_error",
        _ => match err.get("code").and_then(Value::as_u64) {
            Some(400) => "invalid_request_error",
            Some(401) => "authentication_error",
            Some(403) => "permission_error",
            Some(404) => "not_found_error",
            Some(429) => "rate_limit_error",
            Some(503) => "overloaded_error",
            Some(504) => "timeout_error",
            _ => "api_error",
        },
    }
}

/// The human-readable message of a Google error body (`{"error": {"message": …}}`; a
/// non-SSE stream wraps it in an array).
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let v = match &v {
        Value::Array(items) => items.first()?,
        other => other,
    };
    v.pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
}

/// Gemini `alt=sse` events → deltas. Every event is a whole `GenerateContentResponse` chunk
/// with new parts only; there is no end marker, the last chunk carries the finish reason.
#[derive(Default)]
pub struct StreamDecoder {
    started: bool,
    /// `responseId` of the first chunk, for synthesized call ids.
    id: String,
    calls: usize,
    stopped: bool,
    /// Done or an error was emitted: nothing more may follow.
    terminal: bool,
}

impl StreamDecoder {
    /// Drains `events` (complete upstream events, in order) and appends canonical deltas.
    pub fn decode(
        &mut self,
        events: &mut Vec<crate::sse::Event>,
        out: &mut Vec<Delta>,
    ) -> Result<(), String> {
        for ev in events.drain(..) {
            let data = ev.data.trim();
            if self.terminal || data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("invalid stream chunk: {e}"))?;
            if let Some(err) = v.get("error") {
                out.push(Delta::Error {
                    kind: error_kind(err).to_string(),
                    message: err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("upstream error")
                        .to_string(),
                });
                self.terminal = true;
                continue;
            }
            if !self.started {
                self.started = true;
                self.id = str_field(&v, "responseId");
                out.push(Delta::Start { id: self.id.clone(), model: str_field(&v, "modelVersion") });
            }
            if !self.stopped {
                self.chunk(&v, out);
            }
            if let Some(u) = v.get("usageMetadata") {
                out.push(Delta::Usage(usage(u)));
            }
        }
        Ok(())
    }

    fn chunk(&mut self, v: &Value, out: &mut Vec<Delta>) {
        let Some(candidate) = v.pointer("/candidates/0") else {
            if v.pointer("/promptFeedback/blockReason").is_some() {
                out.push(Delta::Stop(StopReason::ContentFilter));
                self.stopped = true;
            }
            return;
        };
        for part in candidate.pointer("/content/parts").and_then(Value::as_array).into_iter().flatten() {
            let sig = part_signature(part);
            let text = part.get("text").and_then(Value::as_str).unwrap_or_default();
            if is_thought(part) {
                if !text.is_empty() {
                    out.push(Delta::Thinking(text.to_string()));
                }
                if let Some(sig) = sig {
                    out.push(Delta::Signature(sig));
                }
                continue;
            }
            // Same convention as decode_response: the signature precedes its part.
            if let Some(sig) = sig {
                out.push(Delta::Signature(sig));
            }
            if let Some(call) = part.get("functionCall") {
                let n = self.calls;
                self.calls += 1;
                out.push(Delta::ToolCallStart {
                    call: n,
                    id: call_id(call, &self.id, n),
                    name: str_field(call, "name"),
                });
                out.push(Delta::ToolArgs { call: n, json: call_args(call) });
            } else if !text.is_empty() {
                out.push(Delta::Text(text.to_string()));
            }
            // Generated images have no delta form: dropped from streams.
        }
        if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
            out.push(Delta::Stop(stop_reason(reason, self.calls > 0)));
            self.stopped = true;
        }
    }

    /// The upstream body ended: `Done` if a finish reason came, else the stream was cut.
    pub fn finish(&mut self, out: &mut Vec<Delta>) -> Result<(), String> {
        if self.terminal {
            return Ok(());
        }
        self.terminal = true;
        if self.stopped {
            out.push(Delta::Done);
            Ok(())
        } else {
            Err("the Gemini stream ended before its finish reason".into())
        }
    }
}

/// Canonical embeddings request → `batchEmbedContents` body (one request per input).
pub fn encode_embeddings(req: &EmbeddingsRequest, model: &str) -> Result<Vec<u8>, String> {
    if req.inputs.is_empty() {
        return Err("embeddings input must not be empty".into());
    }
    let name = format!("models/{}", model_id(model));
    let dimensions = req.dimensions.map(|d| int32(d, "dimensions")).transpose()?;
    let requests: Vec<Value> = req
        .inputs
        .iter()
        .map(|text| {
            let mut r = Map::new();
            r.insert("model".into(), name.as_str().into());
            r.insert("content".into(), json!({"parts": [{"text": text}]}));
            if let Some(d) = dimensions {
                r.insert("outputDimensionality".into(), d.into());
            }
            Value::Object(r)
        })
        .collect();
    serde_json::to_vec(&json!({"requests": requests}))
        .map_err(|e| format!("cannot serialize the Gemini request: {e}"))
}

/// `batchEmbedContents` response → canonical (Gemini reports no token usage here).
pub fn decode_embeddings(body: &[u8]) -> Result<EmbeddingsResponse, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON from upstream: {e}"))?;
    let embeddings =
        v.get("embeddings").and_then(Value::as_array).ok_or("upstream response has no embeddings")?;
    let vectors = embeddings
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("embeddings[{i}] has no values"))?
                .iter()
                .map(|x| {
                    x.as_f64().map(|f| f as f32).ok_or_else(|| format!("embeddings[{i}] has a non-number"))
                })
                .collect::<Result<Vec<f32>, String>>()
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(EmbeddingsResponse { model: String::new(), vectors, input_tokens: 0 })
}

crate::wire::codec::provider_codec!(GeminiCodec, Gemini, embeddings);

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gemini/");
        std::fs::read(format!("{dir}{name}")).unwrap()
    }

    fn text(t: &str) -> Part {
        Part::Text { text: t.into(), cache_control: None }
    }

    fn user(content: Vec<Part>) -> Message {
        Message { role: Role::User, content }
    }

    fn assistant(content: Vec<Part>) -> Message {
        Message { role: Role::Assistant, content }
    }

    fn call(id: &str, name: &str, args: &str) -> Part {
        Part::ToolCall { id: id.into(), name: name.into(), arguments: args.into() }
    }

    fn result(id: &str, t: &str, is_error: bool) -> Part {
        Part::ToolResult { call_id: id.into(), content: vec![text(t)], is_error }
    }

    fn thinking(t: &str, sig: Option<&str>) -> Part {
        Part::Thinking { text: t.into(), signature: sig.map(str::to_string) }
    }

    fn request(messages: Vec<Message>) -> Request {
        Request {
            model: "gem".into(),
            system: Vec::new(),
            messages,
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

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            description: None,
            parameters: json!({"type": "object"}),
            cache_control: None,
        }
    }

    fn encode(req: &Request) -> Value {
        serde_json::from_slice(&encode_request(req, "gemini-2.5-flash").unwrap()).unwrap()
    }

    fn encode_err(req: &Request) -> String {
        encode_request(req, "gemini-2.5-flash").unwrap_err()
    }

    #[test]
    fn rich_request_encodes_to_gemini() {
        let mut req = request(vec![
            user(vec![
                text("Weather and time in Paris? Compare with these:"),
                Part::Image {
                    source: ImageSource::Base64 {
                        media_type: "image/png".into(),
                        data: "iVBORw0KGgo=".into(),
                    },
                    cache_control: Some(json!({"type": "ephemeral"})),
                },
                Part::Image {
                    source: ImageSource::Url("https://example.com/sky.webp?x=1".into()),
                    cache_control: None,
                },
                Part::Image {
                    source: ImageSource::Url("https://example.com/photo".into()),
                    cache_control: None,
                },
            ]),
            assistant(vec![
                thinking("The user wants two facts.", Some("gemini:c2lnLXRob3VnaHQ=")),
                text("Checking both."),
                thinking("", Some("gemini:c2lnLWNhbGw=")),
                call("call_1", "get_weather", r#"{"location":"Paris"}"#),
                call("call_2", "get_time", ""),
            ]),
            // OpenAI clients send one tool message per result: they merge into one user turn.
            user(vec![result("call_1", r#"{"temp_c":18,"sky":"clear"}"#, false)]),
            user(vec![result("call_2", "clock unavailable", true), text("Thanks!")]),
            assistant(vec![text("18°C and clear; the time is unknown.")]),
            user(vec![text("And tomorrow?")]),
        ]);
        req.system = vec![
            TextBlock { text: "Be terse.".into(), cache_control: Some(json!({"type": "ephemeral"})) },
            TextBlock { text: "Answer in English.".into(), cache_control: None },
        ];
        req.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: Some("Current weather".into()),
                parameters: json!({
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {"location": {"type": "string"}, "unit": {"type": ["string", "null"]}},
                    "required": ["location"],
                    "additionalProperties": false
                }),
                cache_control: Some(json!({"type": "ephemeral"})),
            },
            tool("get_time"),
        ];
        req.tool_choice = Some(ToolChoice::Tool("get_weather".into()));
        req.parallel_tool_calls = Some(false);
        req.max_tokens = Some(1024);
        req.temperature = Some(1.5);
        req.top_p = Some(0.9);
        req.stop = vec!["END".into(), "STOP".into()];
        req.thinking_budget = Some(2048);
        req.stream = true;
        req.user = Some("u-1".into());
        req.openai_only = vec![("seed".into(), json!(7))];
        assert_eq!(
            encode(&req),
            json!({
                "systemInstruction": {"parts": [{"text": "Be terse."}, {"text": "Answer in English."}]},
                "contents": [
                    {"role": "user", "parts": [
                        {"text": "Weather and time in Paris? Compare with these:"},
                        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/sky.webp?x=1"}},
                        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photo"}}
                    ]},
                    {"role": "model", "parts": [
                        {"text": "The user wants two facts.", "thought": true, "thoughtSignature": "c2lnLXRob3VnaHQ="},
                        {"text": "Checking both."},
                        {"functionCall": {"id": "call_1", "name": "get_weather", "args": {"location": "Paris"}},
                            "thoughtSignature": "c2lnLWNhbGw="},
                        {"functionCall": {"id": "call_2", "name": "get_time", "args": {}}}
                    ]},
                    {"role": "user", "parts": [
                        {"functionResponse": {"id": "call_1", "name": "get_weather",
                            "response": {"result": {"temp_c": 18, "sky": "clear"}}}},
                        {"functionResponse": {"id": "call_2", "name": "get_time",
                            "response": {"error": "clock unavailable"}}},
                        {"text": "Thanks!"}
                    ]},
                    {"role": "model", "parts": [{"text": "18°C and clear; the time is unknown."}]},
                    {"role": "user", "parts": [{"text": "And tomorrow?"}]}
                ],
                "tools": [{"functionDeclarations": [
                    {"name": "get_weather", "description": "Current weather", "parametersJsonSchema": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}, "unit": {"type": ["string", "null"]}},
                        "required": ["location"],
                        "additionalProperties": false
                    }},
                    {"name": "get_time", "parametersJsonSchema": {"type": "object"}}
                ]}],
                "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
                "generationConfig": {
                    "maxOutputTokens": 1024,
                    "temperature": 1.5,
                    "topP": 0.9,
                    "stopSequences": ["END", "STOP"],
                    "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": true}
                }
            }),
            "no model, stream, user, seed, cache_control or parallel_tool_calls in the body"
        );
    }

    #[test]
    fn tool_choice_modes() {
        for (choice, config) in [
            (Some(ToolChoice::Auto), Some(json!({"functionCallingConfig": {"mode": "AUTO"}}))),
            (Some(ToolChoice::None), Some(json!({"functionCallingConfig": {"mode": "NONE"}}))),
            (Some(ToolChoice::Required), Some(json!({"functionCallingConfig": {"mode": "ANY"}}))),
            (None, None),
        ] {
            let mut req = request(vec![user(vec![text("hi")])]);
            req.tools = vec![tool("t")];
            req.tool_choice = choice;
            assert_eq!(encode(&req).get("toolConfig").cloned(), config);
        }
        // Without tools a tool choice means nothing and is not sent.
        let mut req = request(vec![user(vec![text("hi")])]);
        req.tool_choice = Some(ToolChoice::Required);
        assert_eq!(encode(&req), json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}));
    }

    #[test]
    fn signatures_only_gemini_ones_go_back_where_they_came_from() {
        let req = request(vec![
            user(vec![text("q")]),
            assistant(vec![
                // Anthropic reasoning (foreign signature) and unsigned reasoning are dropped.
                thinking("claude thoughts", Some("EqQBCkYIBRgCKkD")),
                thinking("unsigned", None),
                Part::RedactedThinking { data: "opaque".into() },
                // A client folded the call's signature into the thought block: it moves to
                // the call, which Gemini 3 validates.
                thinking("plan", Some("gemini:U0lHMQ==")),
                call("call_gemini_r1_0", "a", "{}"),
                call("call_gemini_r1_1", "b", "{}"),
            ]),
            user(vec![result("call_gemini_r1_0", "1", false), result("call_gemini_r1_1", "2", false)]),
            // History Gemini never signed: the first call of the turn gets the placeholder.
            assistant(vec![call("toolu_9", "a", r#"{"x":[1,2]}"#), call("toolu_10", "b", "{}")]),
            user(vec![result("toolu_9", "[1,2]", false), result("toolu_10", "", false)]),
            // A trailing signature (Gemini sends it on an empty text part) stays one.
            assistant(vec![text("done"), thinking("", Some("gemini:U0lHMg=="))]),
            // A signature that came on a text part goes back on it.
            user(vec![text("more")]),
            assistant(vec![
                thinking("t", Some("gemini:U0lHMw==")),
                thinking("", Some("gemini:U0lHNA==")),
                text("x"),
            ]),
        ]);
        let contents = encode(&req)["contents"].clone();
        assert_eq!(
            contents[1]["parts"],
            json!([
                {"text": "plan", "thought": true},
                {"functionCall": {"name": "a", "args": {}}, "thoughtSignature": "U0lHMQ=="},
                {"functionCall": {"name": "b", "args": {}}}
            ]),
            "synthesized call ids are never sent to Gemini"
        );
        assert_eq!(
            contents[2]["parts"],
            json!([
                {"functionResponse": {"name": "a", "response": {"result": "1"}}},
                {"functionResponse": {"name": "b", "response": {"result": "2"}}}
            ])
        );
        assert_eq!(
            contents[3]["parts"],
            json!([
                {"functionCall": {"id": "toolu_9", "name": "a", "args": {"x": [1, 2]}},
                    "thoughtSignature": "skip_thought_signature_validator"},
                {"functionCall": {"id": "toolu_10", "name": "b", "args": {}}}
            ])
        );
        assert_eq!(
            contents[4]["parts"],
            json!([
                {"functionResponse": {"id": "toolu_9", "name": "a", "response": {"result": [1, 2]}}},
                {"functionResponse": {"id": "toolu_10", "name": "b", "response": {"result": ""}}}
            ])
        );
        assert_eq!(
            contents[5]["parts"],
            json!([{"text": "done"}, {"text": "", "thoughtSignature": "U0lHMg=="}])
        );
        assert_eq!(
            contents[7]["parts"],
            json!([
                {"text": "t", "thought": true, "thoughtSignature": "U0lHMw=="},
                {"text": "x", "thoughtSignature": "U0lHNA=="}
            ])
        );
    }

    #[test]
    fn decoded_tool_calls_replay_exactly() {
        let resp = decode_response(&fixture("generate_content_tool_calls.json")).unwrap();
        let req = request(vec![user(vec![text("Weather and time in Paris?")]), assistant(resp.content)]);
        let src: Value = serde_json::from_slice(&fixture("generate_content_tool_calls.json")).unwrap();
        assert_eq!(encode(&req)["contents"][1]["parts"], src["candidates"][0]["content"]["parts"]);

        // An unsigned thought summary is not replayed (Gemini keeps its state in signatures).
        let resp = decode_response(&fixture("generate_content_thinking.json")).unwrap();
        let req = request(vec![user(vec![text("17 + 25?")]), assistant(resp.content)]);
        let src: Value = serde_json::from_slice(&fixture("generate_content_thinking.json")).unwrap();
        assert_eq!(
            encode(&req)["contents"][1]["parts"],
            json!([src["candidates"][0]["content"]["parts"][1]])
        );

        let resp = decode_response(&fixture("generate_content_tool_calls_with_ids.json")).unwrap();
        let req = request(vec![
            user(vec![text("Paris and Lyon?")]),
            assistant(resp.content),
            user(vec![result("n2c9k0qa", "9C", false), result("4q1x7mzb", "18C", false)]),
        ]);
        let out = encode(&req);
        let src: Value =
            serde_json::from_slice(&fixture("generate_content_tool_calls_with_ids.json")).unwrap();
        assert_eq!(out["contents"][1]["parts"], src["candidates"][0]["content"]["parts"]);
        assert_eq!(
            out["contents"][2]["parts"],
            json!([
                {"functionResponse": {"id": "n2c9k0qa", "name": "get_weather", "response": {"result": "9C"}}},
                {"functionResponse": {"id": "4q1x7mzb", "name": "get_weather", "response": {"result": "18C"}}}
            ])
        );
    }

    #[test]
    fn tool_results_are_named_by_the_latest_matching_call() {
        // Synthesized ids repeat across responses without a responseId.
        let req = request(vec![
            user(vec![text("q")]),
            assistant(vec![call("call_gemini_0", "first", "{}")]),
            user(vec![result("call_gemini_0", "a", false)]),
            assistant(vec![call("call_gemini_0", "second", "{}")]),
            user(vec![result("call_gemini_0", "b", false)]),
        ]);
        let out = encode(&req);
        assert_eq!(out["contents"][2]["parts"][0]["functionResponse"]["name"], "first");
        assert_eq!(out["contents"][4]["parts"][0]["functionResponse"]["name"], "second");
    }

    #[test]
    fn requests_gemini_cannot_take_are_errors() {
        let base = || request(vec![user(vec![text("q")])]);

        let req = request(vec![user(vec![result("nope", "x", false)])]);
        assert!(encode_err(&req).contains("answers no earlier tool call"));

        let req = request(vec![user(vec![text("q")]), assistant(vec![call("c", "t", "{not json")])]);
        assert!(encode_err(&req).contains("not valid JSON"), "{}", encode_err(&req));

        let req = request(vec![user(vec![text("q")]), assistant(vec![call("c", "t", "[1]")])]);
        assert!(encode_err(&req).contains("must be a JSON object"));

        let gif = ImageSource::Base64 { media_type: "image/gif".into(), data: "R0lGOD".into() };
        let req = request(vec![user(vec![Part::Image { source: gif, cache_control: None }])]);
        assert!(encode_err(&req).contains("image/gif"));

        let gif = ImageSource::Url("https://example.com/anim.GIF".into());
        let req = request(vec![user(vec![Part::Image { source: gif, cache_control: None }])]);
        assert!(encode_err(&req).contains(".gif"));

        let mut req = base();
        req.stop = (0..6).map(|i| i.to_string()).collect();
        assert!(encode_err(&req).contains("at most 5 stop sequences"));

        let mut req = base();
        req.tools = vec![tool("a")];
        req.tool_choice = Some(ToolChoice::Tool("b".into()));
        assert!(encode_err(&req).contains("not among the tools"));

        let mut req = base();
        req.tools = vec![Tool { parameters: json!("string"), ..tool("a") }];
        assert!(encode_err(&req).contains("tools[0].parameters"));

        let mut req = base();
        req.max_tokens = Some(u64::MAX);
        assert!(encode_err(&req).contains("max_tokens"));

        let req = request(vec![user(vec![text(""), thinking("x", None)])]);
        assert!(encode_err(&req).contains("at least one message"));

        let req = request(vec![assistant(vec![result("c", "x", false)])]);
        assert!(encode_err(&req).contains("belong in user messages"));

        let req = request(vec![user(vec![call("c", "t", "{}")])]);
        assert!(encode_err(&req).contains("belong in assistant messages"));
    }

    #[test]
    fn data_urls_and_jpg_aliases_become_inline_data() {
        let req = request(vec![user(vec![
            Part::Image {
                source: ImageSource::Url("data:image/jpg;base64,/9j/4AAQ".into()),
                cache_control: None,
            },
            Part::Image { source: ImageSource::Url("gs://bucket/pic.HEIC".into()), cache_control: None },
        ])]);
        assert_eq!(
            encode(&req)["contents"][0]["parts"],
            json!([
                {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                {"fileData": {"mimeType": "image/heic", "fileUri": "gs://bucket/pic.HEIC"}}
            ])
        );
    }

    #[test]
    fn text_response_with_cached_and_reasoning_usage() {
        let resp = decode_response(&fixture("generate_content.json")).unwrap();
        assert_eq!(resp.id, "8pYaaf7kGJSPmtkPzOyW8Ak");
        assert_eq!(resp.model, "gemini-2.5-flash");
        assert!(resp.created > 0);
        assert_eq!(
            resp.content,
            vec![text("The capital of France is Paris. It has been the country's capital since 987 AD.")]
        );
        assert_eq!(resp.stop, Some(StopReason::EndTurn));
        assert_eq!(
            resp.usage,
            Usage { input: 2152, output: 19 + 231, cache_read: 2048, cache_write: 0, reasoning: 231 }
        );
    }

    #[test]
    fn parallel_tool_call_response() {
        let resp = decode_response(&fixture("generate_content_tool_calls.json")).unwrap();
        assert_eq!(
            resp.content,
            vec![
                thinking("", Some("gemini:EtMDCtADAdHtim9xvQ2mK3yV8q0pNf4Lw7bZc1sRj6uYe2TgHa5oXk0PdM9nBq3Wv7CzFs8Ei1Ju4Ly6Rt2Ao5Gp9Hm0Dc3Ux8Kb1Nw4Vz7Ye2Sf6Ti9Qj")),
                call(
                    "call_gemini_Xk8XaZ6dC7OPmtkP2YqV4Qs_0",
                    "get_weather",
                    r#"{"location":"Paris","unit":"celsius"}"#
                ),
                call("call_gemini_Xk8XaZ6dC7OPmtkP2YqV4Qs_1", "get_time", r#"{"timezone":"Europe/Paris"}"#),
            ]
        );
        assert_eq!(resp.stop, Some(StopReason::ToolUse));
        assert_eq!(
            resp.usage,
            Usage { input: 118, output: 41 + 87, cache_read: 0, cache_write: 0, reasoning: 87 }
        );

        let resp = decode_response(&fixture("generate_content_tool_calls_with_ids.json")).unwrap();
        let ids: Vec<&str> = resp
            .content
            .iter()
            .filter_map(|p| match p {
                Part::ToolCall { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, ["4q1x7mzb", "n2c9k0qa"], "Gemini's own call ids are kept");
    }

    #[test]
    fn thinking_response() {
        let resp = decode_response(&fixture("generate_content_thinking.json")).unwrap();
        assert_eq!(
            resp.content,
            vec![
                thinking(
                    "**Adding the numbers**\n\nThe user wants 17 + 25. Seven plus five is twelve, carry the one: 42.\n",
                    None
                ),
                thinking("", Some("gemini:Cs4EAdHtim8pP0Qa1Rb2Sc3Td4Ue5Vf6Wg7Xh8Yi9Zj0ak1bl2cm3dn4eo5fp6gq7hr8is9jt0ku1lv2mw3nx4oy5pz6")),
                text("17 + 25 = 42."),
            ]
        );
        assert_eq!(resp.usage.output, 9 + 316);
        assert_eq!(resp.usage.reasoning, 316);
    }

    #[test]
    fn finish_reasons_and_blocked_prompts() {
        let resp = decode_response(&fixture("generate_content_max_tokens.json")).unwrap();
        assert_eq!(resp.stop, Some(StopReason::MaxTokens));
        assert_eq!(resp.content, vec![text("Once upon a time, in a valley surrounded by")]);

        let resp = decode_response(&fixture("generate_content_safety.json")).unwrap();
        assert_eq!(resp.stop, Some(StopReason::ContentFilter));
        assert!(resp.content.is_empty());
        assert_eq!(resp.usage.input, 14);

        let resp = decode_response(&fixture("generate_content_prompt_blocked.json")).unwrap();
        assert_eq!(resp.stop, Some(StopReason::ContentFilter));
        assert!(resp.content.is_empty());
        assert_eq!(resp.id, "0WQaacn3Fv6EmtkPwIOlmAg");
        assert_eq!(resp.usage, Usage { input: 27, ..Usage::default() });

        let src = String::from_utf8(fixture("generate_content.json")).unwrap();
        for (reason, stop) in [
            ("STOP", StopReason::EndTurn),
            ("MAX_TOKENS", StopReason::MaxTokens),
            ("SAFETY", StopReason::ContentFilter),
            ("RECITATION", StopReason::ContentFilter),
            ("LANGUAGE", StopReason::ContentFilter),
            ("BLOCKLIST", StopReason::ContentFilter),
            ("PROHIBITED_CONTENT", StopReason::ContentFilter),
            ("SPII", StopReason::ContentFilter),
            ("IMAGE_SAFETY", StopReason::ContentFilter),
            ("IMAGE_PROHIBITED_CONTENT", StopReason::ContentFilter),
            ("IMAGE_RECITATION", StopReason::ContentFilter),
            ("OTHER", StopReason::EndTurn),
            ("MALFORMED_FUNCTION_CALL", StopReason::EndTurn),
            ("UNEXPECTED_TOOL_CALL", StopReason::EndTurn),
            ("TOO_MANY_TOOL_CALLS", StopReason::EndTurn),
            ("SOMETHING_NEW", StopReason::EndTurn),
        ] {
            let body = src.replace("\"finishReason\": \"STOP\"", &format!("\"finishReason\": \"{reason}\""));
            assert_eq!(decode_response(body.as_bytes()).unwrap().stop, Some(stop), "{reason}");
        }
        assert_eq!(stop_reason("MAX_TOKENS", true), StopReason::MaxTokens);
        assert_eq!(stop_reason("SAFETY", true), StopReason::ContentFilter);

        assert!(decode_response(b"{\"usageMetadata\": {}}").unwrap_err().contains("no candidates"));
        assert!(decode_response(b"not json").is_err());
        assert!(decode_response(&fixture("error_503.json")).unwrap_err().contains("overloaded"));
    }

    /// Feeds `input` split into two reads at `split` through the SSE parser and the decoder.
    /// The result is the first error of `decode` or `finish`.
    fn run_stream(input: &[u8], split: usize) -> (Vec<Delta>, Result<(), String>) {
        let mut parser = crate::sse::Parser::new();
        let mut dec = StreamDecoder::default();
        let mut events = Vec::new();
        let mut out = Vec::new();
        let mut end = Ok(());
        for chunk in [&input[..split], &input[split..]] {
            parser.feed(chunk, &mut events).unwrap();
            end = end.and(dec.decode(&mut events, &mut out));
        }
        parser.finish(&mut events);
        end = end.and(dec.decode(&mut events, &mut out));
        let end = end.and(dec.finish(&mut out));
        (out, end)
    }

    fn stream(name: &str) -> Vec<Delta> {
        let input = fixture(name);
        let (reference, end) = run_stream(&input, 0);
        assert_eq!(end, Ok(()), "{name}");
        for split in 1..=input.len() {
            let (out, end) = run_stream(&input, split);
            assert_eq!(out, reference, "{name} split at {split}");
            assert_eq!(end, Ok(()), "{name} split at {split}");
        }
        reference
    }

    #[test]
    fn text_stream() {
        let start = Delta::Start { id: "4mUaaZbuBdqQmtkPlOHo-Qc".into(), model: "gemini-2.5-flash".into() };
        let early = Delta::Usage(Usage { input: 9, ..Usage::default() });
        assert_eq!(
            stream("stream_text.txt"),
            vec![
                start,
                Delta::Text("Bonjour ! Le café".into()),
                early.clone(),
                Delta::Text(" est prêt — naïve question? 🦊".into()),
                early,
                Delta::Text(" Non, pas du tout.".into()),
                Delta::Stop(StopReason::EndTurn),
                Delta::Usage(Usage {
                    input: 2061,
                    output: 21 + 43,
                    cache_read: 1024,
                    cache_write: 0,
                    reasoning: 43
                }),
                Delta::Done,
            ]
        );
    }

    #[test]
    fn tool_call_stream() {
        let id = "Xk8XaZ6dC7OPmtkP2YqV4Qs";
        assert_eq!(
            stream("stream_tool_calls.txt"),
            vec![
                Delta::Start { id: id.into(), model: "gemini-3-flash-preview".into() },
                Delta::Signature(
                    "gemini:EtMDCtADAdHtim9xvQ2mK3yV8q0pNf4Lw7bZc1sRj6uYe2TgHa5oXk0PdM9n".into()
                ),
                Delta::Text("Let me look that up.".into()),
                Delta::Usage(Usage { input: 118, ..Usage::default() }),
                Delta::Signature("gemini:CiQBcsjafP3kQm7nJ0zV2hW8rT5yU1iO9pA4sD6fG3hJ2kL5zX0cV8bN".into()),
                Delta::ToolCallStart {
                    call: 0,
                    id: format!("call_gemini_{id}_0"),
                    name: "get_weather".into()
                },
                Delta::ToolArgs { call: 0, json: r#"{"location":"Paris","unit":"celsius"}"#.into() },
                Delta::ToolCallStart { call: 1, id: format!("call_gemini_{id}_1"), name: "get_time".into() },
                Delta::ToolArgs { call: 1, json: r#"{"timezone":"Europe/Paris"}"#.into() },
                Delta::Stop(StopReason::ToolUse),
                Delta::Usage(Usage {
                    input: 118,
                    output: 47 + 87,
                    cache_read: 0,
                    cache_write: 0,
                    reasoning: 87
                }),
                Delta::Done,
            ]
        );
    }

    #[test]
    fn thinking_stream() {
        let early = Delta::Usage(Usage { input: 12, ..Usage::default() });
        let full =
            Delta::Usage(Usage { input: 12, output: 9 + 316, cache_read: 0, cache_write: 0, reasoning: 316 });
        assert_eq!(
            stream("stream_thinking.txt"),
            vec![
                Delta::Start { id: "bGQaadazKrGDmtkP3q7luQU".into(), model: "gemini-2.5-pro".into() },
                Delta::Thinking("**Adding the numbers**\n\nThe user wants 17 + 25.".into()),
                early.clone(),
                Delta::Thinking(" Seven plus five is twelve, carry the one: 42.\n".into()),
                early,
                Delta::Text("17 + 25 = 42.".into()),
                full.clone(),
                Delta::Signature("gemini:Cs4EAdHtim8pP0Qa1Rb2Sc3Td4Ue5Vf6Wg7Xh8Yi9Zj0ak1bl2cm3dn4eo5".into()),
                Delta::Stop(StopReason::EndTurn),
                full,
                Delta::Done,
            ]
        );
    }

    #[test]
    fn blocked_prompt_stream() {
        assert_eq!(
            stream("stream_prompt_blocked.txt"),
            vec![
                Delta::Start { id: "0WQaacn3Fv6EmtkPwIOlmAg".into(), model: "gemini-2.5-flash".into() },
                Delta::Stop(StopReason::ContentFilter),
                Delta::Usage(Usage { input: 27, ..Usage::default() }),
                Delta::Done,
            ]
        );
    }

    #[test]
    fn in_stream_error() {
        let input = fixture("stream_error.txt");
        let (reference, end) = run_stream(&input, 0);
        assert_eq!(
            reference,
            vec![
                Delta::Start { id: "NWYaabOmA8mImtkPqf6V6Qw".into(), model: "gemini-2.5-flash".into() },
                Delta::Text("The first part of a long".into()),
                Delta::Usage(Usage { input: 31, ..Usage::default() }),
                Delta::Error {
                    kind: "overloaded_error".into(),
                    message: "The model is overloaded. Please try again later.".into()
                },
            ]
        );
        assert_eq!(end, Ok(()), "no Done after an error, and no error either");
        for split in 1..=input.len() {
            assert_eq!(run_stream(&input, split).0, reference, "split at {split}");
        }
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let input = fixture("stream_text.txt");
        let text = String::from_utf8(input.clone()).unwrap();
        let last = text.rfind("data: ").unwrap();
        // Before the finishing chunk, inside it (an undecodable partial event), at its end.
        for cut in [last, last + 40, input.len() - 10] {
            let (out, end) = run_stream(&input[..cut], cut / 2);
            assert!(end.is_err(), "cut at {cut}");
            assert!(!out.contains(&Delta::Done));
        }
        // Only the final blank line missing: the last chunk is whole, the stream complete.
        let (out, end) = run_stream(&input[..input.len() - 2], 0);
        assert_eq!(end, Ok(()));
        assert_eq!(out.last(), Some(&Delta::Done));
    }

    #[test]
    fn nothing_follows_a_terminal_event() {
        let input = fixture("stream_text.txt");
        let mut parser = crate::sse::Parser::new();
        let mut dec = StreamDecoder::default();
        let (mut events, mut out) = (Vec::new(), Vec::new());
        parser.feed(&input, &mut events).unwrap();
        dec.decode(&mut events, &mut out).unwrap();
        dec.finish(&mut out).unwrap();
        let n = out.len();
        parser.feed(&input, &mut events).unwrap();
        dec.decode(&mut events, &mut out).unwrap();
        dec.finish(&mut out).unwrap();
        assert_eq!(out.len(), n);
        assert!(events.is_empty(), "events are drained even when ignored");

        let mut dec = StreamDecoder::default();
        let mut out = Vec::new();
        let mut events = vec![crate::sse::Event { event: String::new(), data: "{not json".into() }];
        assert!(dec.decode(&mut events, &mut out).is_err());
    }

    #[test]
    fn embeddings_round_trip() {
        let req = EmbeddingsRequest {
            model: "embed".into(),
            inputs: vec!["hello".into(), "world".into()],
            dimensions: Some(768),
            user: Some("u".into()),
        };
        let body: Value =
            serde_json::from_slice(&encode_embeddings(&req, "gemini-embedding-001").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 768},
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "world"}]}, "outputDimensionality": 768}
            ]})
        );
        let req = EmbeddingsRequest { dimensions: None, inputs: vec!["x".into()], ..req };
        let body: Value =
            serde_json::from_slice(&encode_embeddings(&req, "models/text-embedding-004").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"requests": [{"model": "models/text-embedding-004", "content": {"parts": [{"text": "x"}]}}]})
        );
        assert!(encode_embeddings(&EmbeddingsRequest { inputs: vec![], ..req }, "m").is_err());

        let resp = decode_embeddings(&fixture("batch_embed_contents.json")).unwrap();
        assert_eq!(
            resp,
            EmbeddingsResponse {
                model: String::new(),
                vectors: vec![
                    vec![-0.0221232, 0.0041734, 0.0157892, -0.0703487],
                    vec![0.0113511, -0.0298471, 0.0032285, 0.0514126],
                ],
                input_tokens: 0,
            }
        );
        assert!(decode_embeddings(b"{}").is_err());
        assert!(decode_embeddings(br#"{"embeddings": [{"values": ["x"]}]}"#).is_err());
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(&fixture("error_400.json")).as_deref(),
            Some("* GenerateContentRequest.contents: contents is not specified")
        );
        assert_eq!(
            error_message(&fixture("error_403.json")).as_deref(),
            Some("Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.")
        );
        assert!(error_message(&fixture("error_429.json"))
            .unwrap()
            .starts_with("You exceeded your current quota"));
        assert_eq!(
            error_message(&fixture("error_503.json")).as_deref(),
            Some("The model is overloaded. Please try again later.")
        );
        let wrapped = format!("[{}]", String::from_utf8(fixture("error_503.json")).unwrap());
        assert_eq!(
            error_message(wrapped.as_bytes()).as_deref(),
            Some("The model is overloaded. Please try again later.")
        );
        assert_eq!(error_message(b"<html>502</html>"), None);
        assert_eq!(error_message(br#"{"error": {"code": 500}}"#), None);
    }

    #[test]
    fn error_kinds() {
        for (file, kind) in [
            ("error_400.json", "invalid_request_error"),
            ("error_403.json", "permission_error"),
            ("error_429.json", "rate_limit_error"),
            ("error_503.json", "overloaded_error"),
        ] {
            let v: Value = serde_json::from_slice(&fixture(file)).unwrap();
            assert_eq!(error_kind(&v["error"]), kind, "{file}");
        }
        assert_eq!(error_kind(&json!({"code": 500, "status": "INTERNAL"})), "api_error");
        assert_eq!(error_kind(&json!({"code": 429})), "rate_limit_error");
    }
}
