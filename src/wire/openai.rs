//! OpenAI Chat Completions requests on the OpenAI→OpenAI-family path. The body is kept as
//! a list of top-level `(key, raw JSON)` pairs: values we do not interpret are forwarded
//! byte-for-byte (no float re-formatting, no key reordering), and only `model` and the
//! `mlx:*` extension keys are rewritten.

use std::fmt::Write as _;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// Body extension keys are recognised by this prefix and never forwarded upstream.
pub const EXTENSION_PREFIX: &str = "mlx:";

struct TopLevel<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<String>()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(TopLevel(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// A chat request, parsed just enough to route it.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    fields: Vec<(String, &'a RawValue)>,
    pub model: String,
    pub stream: bool,
    /// `mlx:tags`, in body order.
    pub tags: Vec<(String, String)>,
    /// `mlx:end_user`.
    pub end_user: Option<String>,
    /// `max_tokens` / `max_completion_tokens`, for cost estimates.
    pub max_tokens: Option<u64>,
    /// `"mlx:trace": true`: return the decision trace in the body.
    pub trace: bool,
    /// `n`: how many choices the upstream generates (each billed).
    pub choices: u64,
}

fn field_error(code: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(code, message)
}

/// The array (or string) a routed body must carry besides `model`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Chat: `messages`, an array.
    Messages,
    /// Embeddings: `input`, a string or an array.
    Input,
}

impl<'a> ChatRequest<'a> {
    /// The string members of a `metadata` object (trace and conversation ids, user id),
    /// when the body has one.
    pub fn metadata(&self) -> Option<std::collections::HashMap<String, String>> {
        let (_, raw) = self.fields.iter().rev().find(|(k, _)| k == "metadata")?;
        let map: std::collections::HashMap<String, serde_json::Value> =
            serde_json::from_str(raw.get()).ok()?;
        Some(
            map.into_iter()
                .filter_map(|(k, v)| match v {
                    serde_json::Value::String(s) if !s.is_empty() => Some((k, s)),
                    _ => None,
                })
                .collect(),
        )
    }

    pub fn parse(body: &'a [u8]) -> Result<ChatRequest<'a>, GatewayError> {
        Self::parse_routed(body, Payload::Messages)
    }

    /// Parses any routed OpenAI/Anthropic-shaped body: `model` plus its payload field.
    pub fn parse_routed(body: &'a [u8], payload: Payload) -> Result<ChatRequest<'a>, GatewayError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(field_error("invalid_json", "request body is empty; send a JSON object"));
        }
        let top: TopLevel<'a> = serde_json::from_slice(body).map_err(|e| {
            if e.classify() == serde_json::error::Category::Data {
                field_error("invalid_json", "request body must be a JSON object")
            } else {
                field_error("invalid_json", format!("request body is not valid JSON: {e}"))
            }
        })?;
        let mut model = None;
        let mut stream = false;
        let mut has_messages = false;
        let mut tags = Vec::new();
        let mut end_user = None;
        let mut max_tokens = None;
        let mut trace = false;
        let mut choices = 1;
        let mut seen_interpreted: Vec<&str> = Vec::new();
        for (key, raw) in &top.0 {
            let interpreted = matches!(key.as_str(), "model" | "stream" | "mlx:tags" | "mlx:end_user");
            if interpreted {
                if seen_interpreted.contains(&key.as_str()) {
                    return Err(field_error("invalid_request", format!("duplicate key \"{key}\"")));
                }
                seen_interpreted.push(key.as_str());
            }
            match key.as_str() {
                "model" => {
                    let m: String = serde_json::from_str(raw.get())
                        .map_err(|_| field_error("invalid_type", "\"model\" must be a string"))?;
                    model = Some(m);
                }
                "stream" => {
                    let s: Option<bool> = serde_json::from_str(raw.get())
                        .map_err(|_| field_error("invalid_type", "\"stream\" must be a boolean"))?;
                    stream = s.unwrap_or(false);
                }
                "messages" if payload == Payload::Messages => {
                    if !raw.get().starts_with('[') {
                        return Err(field_error("invalid_type", "\"messages\" must be an array"));
                    }
                    has_messages = true;
                }
                "input" if payload == Payload::Input => {
                    if !raw.get().starts_with(['[', '"']) {
                        return Err(field_error(
                            "invalid_type",
                            "\"input\" must be a string or an array of strings or token arrays",
                        ));
                    }
                    has_messages = true;
                }
                "mlx:tags" => {
                    let t: Option<serde_json::Map<String, serde_json::Value>> =
                        serde_json::from_str(raw.get()).map_err(|_| {
                            field_error("invalid_type", "\"mlx:tags\" must be an object of string values")
                        })?;
                    for (k, v) in t.unwrap_or_default() {
                        match v {
                            serde_json::Value::String(s) => tags.push((k, s)),
                            _ => {
                                return Err(field_error(
                                    "invalid_type",
                                    format!("\"mlx:tags\".{k} must be a string"),
                                ))
                            }
                        }
                    }
                }
                "max_tokens" | "max_completion_tokens" => {
                    // A malformed value is the upstream's to reject; routing only estimates.
                    max_tokens = serde_json::from_str::<u64>(raw.get()).ok().or(max_tokens);
                }
                "n" => {
                    // As with max_tokens: malformed is the upstream's to reject.
                    choices = serde_json::from_str::<u64>(raw.get()).unwrap_or(1).max(1);
                }
                "mlx:trace" => {
                    trace = serde_json::from_str::<Option<bool>>(raw.get())
                        .map_err(|_| field_error("invalid_type", "\"mlx:trace\" must be a boolean"))?
                        .unwrap_or(false);
                }
                "mlx:end_user" => {
                    let u: Option<String> = serde_json::from_str(raw.get())
                        .map_err(|_| field_error("invalid_type", "\"mlx:end_user\" must be a string"))?;
                    end_user = u;
                }
                _ => {}
            }
        }
        let model = model.ok_or_else(|| field_error("missing_field", "Missing required field: model"))?;
        if !has_messages {
            let name = match payload {
                Payload::Messages => "messages",
                Payload::Input => "input",
            };
            return Err(field_error("missing_field", format!("Missing required field: {name}")));
        }
        Ok(ChatRequest { fields: top.0, model, stream, tags, end_user, max_tokens, trace, choices })
    }

    /// The body to send upstream: `model` replaced, `mlx:*` keys removed, everything else
    /// byte-identical.
    pub fn encode_for_upstream(&self, model: &str) -> Vec<u8> {
        self.encode_without(model, |_| false)
    }

    /// `encode_for_upstream` for a whole (non-streamed) answer to a request the client sent
    /// as a stream (a cascade step judged whole): `stream` and `stream_options` are left
    /// out, every other field is kept as sent.
    pub fn encode_for_upstream_whole(&self, model: &str) -> Vec<u8> {
        self.encode_without(model, |key| key == "stream" || key == "stream_options")
    }

    /// `stream_options.include_usage` is `true` (the last of duplicate keys counts).
    pub fn stream_usage_asked(&self) -> bool {
        let Some((_, raw)) = self.fields.iter().rev().find(|(k, _)| k == "stream_options") else {
            return false;
        };
        serde_json::from_str::<Option<TopLevel>>(raw.get()).ok().flatten().is_some_and(|o| {
            o.0.iter()
                .rev()
                .find(|(k, _)| k == "include_usage")
                .is_some_and(|(_, v)| serde_json::from_str::<bool>(v.get()).ok() == Some(true))
        })
    }

    fn encode_without(&self, model: &str, skip: impl Fn(&str) -> bool) -> Vec<u8> {
        let size: usize = self.fields.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum();
        let mut out = String::with_capacity(size + model.len() + 16);
        out.push('{');
        let mut first = true;
        for (key, raw) in &self.fields {
            if key.starts_with(EXTENSION_PREFIX) || skip(key) {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            push_json_string(&mut out, key);
            out.push(':');
            if key == "model" {
                push_json_string(&mut out, model);
            } else {
                out.push_str(raw.get());
            }
        }
        out.push('}');
        out.into_bytes()
    }

    /// `encode_for_upstream`, but a streamed request also asks the upstream for its usage
    /// chunk (`stream_options.include_usage`), which prices a passthrough stream. The flag
    /// is true when the body asks nothing the client did not (the client set it itself, the
    /// request does not stream, or `stream_options` is malformed and left to the upstream);
    /// false means the stream carries usage the client must not see.
    pub fn encode_for_upstream_with_usage(&self, model: &str) -> (Vec<u8>, bool) {
        let as_is = || (self.encode_for_upstream(model), true);
        if !self.stream {
            return as_is();
        }
        // With duplicate keys the last one counts, as in serde_json.
        let options = match self.fields.iter().rev().find(|(k, _)| k == "stream_options") {
            None => None,
            Some((_, raw)) => match serde_json::from_str::<Option<TopLevel>>(raw.get()) {
                Ok(o) => Some(o.map(|t| t.0).unwrap_or_default()),
                Err(_) => return as_is(),
            },
        };
        let asked = |members: &[(String, &RawValue)]| {
            members
                .iter()
                .rev()
                .find(|(k, _)| k == "include_usage")
                .is_some_and(|(_, v)| serde_json::from_str::<bool>(v.get()).ok() == Some(true))
        };
        let Some(options) = options else {
            let mut out = self.encode_for_upstream(model);
            out.pop(); // the closing brace
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(br#""stream_options":{"include_usage":true}}"#);
            return (out, false);
        };
        if asked(&options) {
            return as_is();
        }
        // The client's other options are kept as sent; `include_usage` is set in place.
        let mut value = String::from("{");
        let mut set = false;
        for (key, raw) in &options {
            if value.len() > 1 {
                value.push(',');
            }
            push_json_string(&mut value, key);
            value.push(':');
            if key == "include_usage" {
                value.push_str("true");
                set = true;
            } else {
                value.push_str(raw.get());
            }
        }
        if !set {
            if value.len() > 1 {
                value.push(',');
            }
            value.push_str(r#""include_usage":true"#);
        }
        value.push('}');
        let mut out =
            String::with_capacity(self.fields.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum());
        out.push('{');
        for (key, raw) in &self.fields {
            if key.starts_with(EXTENSION_PREFIX) {
                continue;
            }
            if out.len() > 1 {
                out.push(',');
            }
            push_json_string(&mut out, key);
            out.push(':');
            match key.as_str() {
                "model" => push_json_string(&mut out, model),
                "stream_options" => out.push_str(&value),
                _ => out.push_str(raw.get()),
            }
        }
        out.push('}');
        (out.into_bytes(), false)
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_model_and_strips_extensions_keeping_bytes() {
        let body = br#"{"model":"@fast","messages":[{"role":"user","content":"hi \u00e9"}],"temperature":0.70000000000000001,"mlx:tags":{"team":"ml"},"mlx:end_user":"u1","mlx:trace":true,"n":1}"#;
        let req = ChatRequest::parse(body).unwrap();
        assert_eq!(req.model, "@fast");
        assert!(!req.stream);
        assert_eq!(req.tags, vec![("team".to_string(), "ml".to_string())]);
        assert_eq!(req.end_user.as_deref(), Some("u1"));
        let out = String::from_utf8(req.encode_for_upstream("gpt-4o-mini")).unwrap();
        assert_eq!(
            out,
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \u00e9"}],"temperature":0.70000000000000001,"n":1}"#
        );
    }

    #[test]
    fn rejects_bad_input_with_codes() {
        let cases: &[(&[u8], &str, &str)] = &[
            (b"", "invalid_json", "empty"),
            (b"{not json", "invalid_json", "not valid JSON"),
            (b"[1,2]", "invalid_json", "must be a JSON object"),
            (br#"{"messages":[]}"#, "missing_field", "Missing required field: model"),
            (br#"{"model":"gpt-4o"}"#, "missing_field", "Missing required field: messages"),
            (br#"{"model":3,"messages":[]}"#, "invalid_type", "\"model\" must be a string"),
            (br#"{"model":"a","model":"b","messages":[]}"#, "invalid_request", "duplicate"),
            (br#"{"model":"a","messages":[],"mlx:tags":{"a":1}}"#, "invalid_type", "mlx:tags"),
            (br#"{"model":"a","messages":{}}"#, "invalid_type", "must be an array"),
        ];
        for (body, code, msg) in cases {
            let e = ChatRequest::parse(body).unwrap_err();
            assert_eq!(e.code(), *code, "{}", String::from_utf8_lossy(body));
            assert!(e.message().contains(msg), "{} -> {}", String::from_utf8_lossy(body), e.message());
        }
    }

    #[test]
    fn stream_flag_and_escaping() {
        let req = ChatRequest::parse(br#"{"model":"m","messages":[],"stream":true,"we\"ird":1}"#).unwrap();
        assert!(req.stream);
        let out = req.encode_for_upstream("a\"b");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "a\"b");
        assert_eq!(v["we\"ird"], 1);
    }

    fn with_usage(body: &[u8]) -> (String, bool, String) {
        let req = ChatRequest::parse(body).unwrap();
        let (out, asked) = req.encode_for_upstream_with_usage("gpt-4o");
        (
            String::from_utf8(out).unwrap(),
            asked,
            String::from_utf8(req.encode_for_upstream("gpt-4o")).unwrap(),
        )
    }

    #[test]
    fn stream_asks_upstream_for_usage() {
        // No stream_options: appended.
        let (out, asked, _) = with_usage(
            br#"{"model":"@fast","messages":[],"stream":true,"temperature":0.50,"mlx:trace":true}"#,
        );
        assert!(!asked);
        assert_eq!(
            out,
            r#"{"model":"gpt-4o","messages":[],"stream":true,"temperature":0.50,"stream_options":{"include_usage":true}}"#
        );
        // Other options kept as sent, include_usage added after them.
        let (out, asked, _) = with_usage(
            br#"{"model":"m","stream_options":{"continuous_usage_stats":false, "x":1.0},"messages":[],"stream":true}"#,
        );
        assert!(!asked);
        assert_eq!(
            out,
            r#"{"model":"gpt-4o","stream_options":{"continuous_usage_stats":false,"x":1.0,"include_usage":true},"messages":[],"stream":true}"#
        );
        // include_usage false (or null) is set in place; a null stream_options is replaced.
        let (out, asked, _) = with_usage(
            br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":false,"y":[1]}}"#,
        );
        assert!(!asked);
        assert_eq!(
            out,
            r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true,"y":[1]}}"#
        );
        let (out, asked, _) =
            with_usage(br#"{"model":"m","messages":[],"stream":true,"stream_options":null}"#);
        assert!(!asked);
        assert_eq!(
            out,
            r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#
        );
        let (out, _, _) = with_usage(
            br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":null}}"#,
        );
        assert!(out.ends_with(r#""stream_options":{"include_usage":true}}"#), "{out}");
        for body in [
            &br#"{"model":"m","messages":[],"stream":true}"#[..],
            br#"{"model":"m","messages":[],"stream":true,"stream_options":{}}"#,
        ] {
            let (out, _, _) = with_usage(body);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["stream_options"], serde_json::json!({"include_usage": true}), "{out}");
        }
    }

    #[test]
    fn usage_already_asked_or_not_streamed_is_untouched() {
        for body in [
            &br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"model":"m","messages":[],"stream":true,"stream_options": { "x":2, "include_usage" : true }}"#,
            br#"{"model":"m","messages":[],"stream":false}"#,
            br#"{"model":"m","messages":[],"stream_options":{"include_usage":false}}"#,
            // Malformed options are the upstream's to reject; nothing is added to them.
            br#"{"model":"m","messages":[],"stream":true,"stream_options":"yes"}"#,
        ] {
            let (out, asked, plain) = with_usage(body);
            assert!(asked, "{}", String::from_utf8_lossy(body));
            assert_eq!(out, plain);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Canonical codec: used when the other side of the hop speaks another wire format.

pub mod codec {
    use serde_json::value::RawValue;
    use serde_json::{json, Map, Value};

    use crate::error::GatewayError;
    use crate::wire::canonical::*;

    /// Fields only OpenAI-family targets understand; passed through for them, dropped for others.
    const OPENAI_ONLY: &[&str] = &[
        "response_format",
        "seed",
        "logprobs",
        "top_logprobs",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "n",
        "service_tier",
        "store",
        "reasoning_effort",
        "prediction",
        "modalities",
        "audio",
        "web_search_options",
        "verbosity",
    ];

    fn bad(message: impl Into<String>) -> GatewayError {
        GatewayError::invalid("invalid_request", message)
    }

    fn text_of(content: &Value, path: &str) -> Result<String, GatewayError> {
        match content {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Array(parts) => {
                let mut out = String::new();
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
                Ok(out)
            }
            _ => Err(bad(format!("{path} must be a string or an array of parts"))),
        }
    }

    fn image_source(url: &str) -> ImageSource {
        // data:[<media type>];base64,<data>
        if let Some(rest) = url.strip_prefix("data:") {
            if let Some((meta, data)) = rest.split_once(',') {
                if let Some(media_type) = meta.strip_suffix(";base64") {
                    return ImageSource::Base64 {
                        media_type: media_type.to_string(),
                        data: data.to_string(),
                    };
                }
            }
        }
        ImageSource::Url(url.to_string())
    }

    fn user_parts(content: &Value, path: &str) -> Result<Vec<Part>, GatewayError> {
        match content {
            Value::String(s) => Ok(vec![Part::Text { text: s.clone(), cache_control: None }]),
            Value::Array(items) => {
                let mut parts = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item.get("type").and_then(Value::as_str) {
                        Some("text") => parts.push(Part::Text {
                            text: item.get("text").and_then(Value::as_str).unwrap_or("").to_string(),
                            cache_control: item.get("cache_control").cloned(),
                        }),
                        Some("image_url") => {
                            let url = item
                                .pointer("/image_url/url")
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("{path}[{i}].image_url.url is required")))?;
                            parts.push(Part::Image { source: image_source(url), cache_control: None });
                        }
                        other => {
                            return Err(bad(format!(
                                "{path}[{i}]: unsupported content part type {}",
                                other.map_or("(none)".to_string(), |t| format!("\"{t}\""))
                            )))
                        }
                    }
                }
                Ok(parts)
            }
            Value::Null => Ok(Vec::new()),
            _ => Err(bad(format!("{path} must be a string or an array of parts"))),
        }
    }

    /// Client OpenAI body → canonical request.
    pub fn decode_request(body: &[u8]) -> Result<Request, GatewayError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            GatewayError::invalid("invalid_json", format!("request body is not valid JSON: {e}"))
        })?;
        let Value::Object(obj) = v else {
            return Err(GatewayError::invalid("invalid_json", "request body must be a JSON object"));
        };
        let model = obj.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| GatewayError::invalid("missing_field", "Missing required field: messages"))?;
        let mut req = Request {
            model,
            system: Vec::new(),
            messages: Vec::new(),
            max_tokens: obj
                .get("max_completion_tokens")
                .or_else(|| obj.get("max_tokens"))
                .and_then(Value::as_u64),
            temperature: obj.get("temperature").and_then(Value::as_f64),
            top_p: obj.get("top_p").and_then(Value::as_f64),
            stop: match obj.get("stop") {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(a)) => a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect(),
                _ => Vec::new(),
            },
            stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
            stream_usage: obj
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: obj.get("parallel_tool_calls").and_then(Value::as_bool),
            thinking_budget: None,
            user: obj.get("user").and_then(Value::as_str).map(str::to_string),
            openai_only: OPENAI_ONLY
                .iter()
                .filter_map(|k| obj.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect(),
        };
        for (i, m) in messages.iter().enumerate() {
            let path = format!("messages[{i}]");
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            let content = m.get("content").unwrap_or(&Value::Null);
            match role {
                "system" | "developer" => {
                    req.system.push(TextBlock { text: text_of(content, &path)?, cache_control: None })
                }
                "user" => req.messages.push(Message {
                    role: Role::User,
                    content: user_parts(content, &format!("{path}.content"))?,
                }),
                "assistant" => {
                    let mut parts = Vec::new();
                    let text = text_of(content, &path)?;
                    if !text.is_empty() {
                        parts.push(Part::Text { text, cache_control: None });
                    }
                    for (j, call) in
                        m.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate()
                    {
                        parts.push(Part::ToolCall {
                            id: call.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                            name: call
                                .pointer("/function/name")
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    bad(format!("{path}.tool_calls[{j}].function.name is required"))
                                })?
                                .to_string(),
                            arguments: call
                                .pointer("/function/arguments")
                                .and_then(Value::as_str)
                                .unwrap_or("{}")
                                .to_string(),
                        });
                    }
                    req.messages.push(Message { role: Role::Assistant, content: parts });
                }
                "tool" => {
                    let call_id = m
                        .get("tool_call_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("{path}.tool_call_id is required")))?
                        .to_string();
                    // Tool results keep only their text (PRODUCT.md): images inside are dropped.
                    let text = text_of(content, &path)?;
                    let part = Part::ToolResult {
                        call_id,
                        content: vec![Part::Text { text, cache_control: None }],
                        is_error: false,
                    };
                    req.messages.push(Message { role: Role::User, content: vec![part] });
                }
                other => return Err(bad(format!("{path}.role: unsupported role \"{other}\""))),
            }
        }
        for (i, t) in obj.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let f = t.get("function").ok_or_else(|| bad(format!("tools[{i}].function is required")))?;
            req.tools.push(Tool {
                name: f
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("tools[{i}].function.name is required")))?
                    .to_string(),
                description: f.get("description").and_then(Value::as_str).map(str::to_string),
                parameters: f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
                cache_control: None,
            });
        }
        req.tool_choice = match obj.get("tool_choice") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Some(ToolChoice::Auto),
                "none" => Some(ToolChoice::None),
                "required" => Some(ToolChoice::Required),
                other => return Err(bad(format!("tool_choice: unknown value \"{other}\""))),
            },
            Some(v) => Some(ToolChoice::Tool(
                v.pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("tool_choice.function.name is required"))?
                    .to_string(),
            )),
        };
        Ok(req)
    }

    fn image_url(source: &ImageSource) -> String {
        match source {
            ImageSource::Url(u) => u.clone(),
            ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        }
    }

    fn text_only(parts: &[Part]) -> String {
        parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// Canonical request → OpenAI-family upstream body.
    pub fn encode_request(req: &Request, model: &str) -> Vec<u8> {
        let mut messages = Vec::new();
        if !req.system.is_empty() {
            let text = req.system.iter().map(|b| b.text.as_str()).collect::<Vec<_>>().join("\n\n");
            messages.push(json!({"role": "system", "content": text}));
        }
        for m in &req.messages {
            match m.role {
                Role::User => {
                    let mut parts = Vec::new();
                    for p in &m.content {
                        match p {
                            Part::ToolResult { call_id, content, .. } => {
                                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": text_only(content)}));
                            }
                            Part::Text { text, .. } => parts.push(json!({"type": "text", "text": text})),
                            Part::Image { source, .. } => parts
                                .push(json!({"type": "image_url", "image_url": {"url": image_url(source)}})),
                            _ => {}
                        }
                    }
                    if !parts.is_empty() {
                        let content = match parts.as_slice() {
                            [one] if one["type"] == "text" => one["text"].clone(),
                            _ => Value::Array(parts),
                        };
                        messages.push(json!({"role": "user", "content": content}));
                    }
                }
                Role::Assistant => {
                    let text = text_only(&m.content);
                    let calls: Vec<Value> = m
                        .content
                        .iter()
                        .filter_map(|p| match p {
                            Part::ToolCall { id, name, arguments } => Some(json!({
                                "id": id, "type": "function", "function": {"name": name, "arguments": arguments}
                            })),
                            _ => None,
                        })
                        .collect();
                    let mut msg = Map::new();
                    msg.insert("role".into(), "assistant".into());
                    msg.insert(
                        "content".into(),
                        if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() },
                    );
                    if !calls.is_empty() {
                        msg.insert("tool_calls".into(), Value::Array(calls));
                    }
                    messages.push(Value::Object(msg));
                }
            }
        }
        let mut body = Map::new();
        body.insert("model".into(), model.into());
        body.insert("messages".into(), Value::Array(messages));
        if let Some(n) = req.max_tokens {
            body.insert("max_tokens".into(), n.into());
        }
        if let Some(t) = req.temperature {
            body.insert("temperature".into(), t.into());
        }
        if let Some(p) = req.top_p {
            body.insert("top_p".into(), p.into());
        }
        if !req.stop.is_empty() {
            body.insert("stop".into(), req.stop.clone().into());
        }
        if req.stream {
            body.insert("stream".into(), true.into());
            // Always ask for usage: the gateway needs it; the encoder drops the extra
            // chunk when the client did not ask for it.
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if !req.tools.is_empty() {
            let tools: Vec<Value> = req
                .tools
                .iter()
                .map(|t| {
                    let mut f = json!({"name": t.name, "parameters": t.parameters});
                    if let Some(d) = &t.description {
                        f["description"] = d.clone().into();
                    }
                    json!({"type": "function", "function": f})
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
        }
        if let Some(choice) = &req.tool_choice {
            let v = match choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
            };
            body.insert("tool_choice".into(), v);
        }
        if let Some(p) = req.parallel_tool_calls {
            if !req.tools.is_empty() {
                body.insert("parallel_tool_calls".into(), p.into());
            }
        }
        if let Some(u) = &req.user {
            body.insert("user".into(), u.clone().into());
        }
        for (k, v) in &req.openai_only {
            body.insert(k.clone(), v.clone());
        }
        serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
    }

    fn stop_reason(s: &str) -> Option<StopReason> {
        Some(match s {
            "stop" => StopReason::EndTurn,
            "length" => StopReason::MaxTokens,
            "tool_calls" | "function_call" => StopReason::ToolUse,
            "content_filter" => StopReason::ContentFilter,
            _ => return None,
        })
    }

    pub fn finish_reason(s: StopReason) -> &'static str {
        match s {
            StopReason::EndTurn | StopReason::StopSequence => "stop",
            StopReason::MaxTokens => "length",
            StopReason::ToolUse => "tool_calls",
            StopReason::ContentFilter => "content_filter",
        }
    }

    /// An OpenAI usage object (chat completion, stream chunk, embeddings): the one reader
    /// of OpenAI usage, for the codec and the passthrough tap alike.
    pub fn usage(u: &Value) -> Usage {
        let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        Usage {
            input: n("/prompt_tokens"),
            output: n("/completion_tokens"),
            cache_read: n("/prompt_tokens_details/cached_tokens"),
            cache_write: 0,
            reasoning: n("/completion_tokens_details/reasoning_tokens"),
        }
    }

    pub fn usage_json(u: &Usage) -> Value {
        json!({
            "prompt_tokens": u.input,
            "completion_tokens": u.output,
            "total_tokens": u.input + u.output,
            "prompt_tokens_details": {"cached_tokens": u.cache_read},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning},
        })
    }

    /// OpenAI-family upstream response → canonical.
    pub fn decode_response(body: &[u8]) -> Result<Response, String> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON from upstream: {e}"))?;
        let choice = v.pointer("/choices/0").ok_or("upstream response has no choices")?;
        let msg = choice.get("message").ok_or("upstream choice has no message")?;
        let mut content = Vec::new();
        if let Some(r) = msg.get("reasoning_content").and_then(Value::as_str) {
            if !r.is_empty() {
                content.push(Part::Thinking { text: r.to_string(), signature: None });
            }
        }
        if let Some(t) = msg.get("content").and_then(Value::as_str) {
            if !t.is_empty() {
                content.push(Part::Text { text: t.to_string(), cache_control: None });
            }
        }
        for call in msg.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            content.push(Part::ToolCall {
                id: call.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                name: call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default().to_string(),
                arguments: call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("{}")
                    .to_string(),
            });
        }
        Ok(Response {
            id: v.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
            model: v.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
            created: v.get("created").and_then(Value::as_u64).unwrap_or_else(now_secs),
            content,
            stop: choice.get("finish_reason").and_then(Value::as_str).and_then(stop_reason),
            usage: v.get("usage").map(usage).unwrap_or_default(),
        })
    }

    /// Canonical → OpenAI chat.completion (client surface).
    /// Canonical → OpenAI chat completion (client surface). Serialised from borrowed typed
    /// structs: building a `Value` tree cost more than the rest of the translation.
    pub fn encode_response(resp: &Response) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Function<'a> {
            name: &'a str,
            arguments: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Call<'a> {
            id: &'a str,
            #[serde(rename = "type")]
            kind: &'static str,
            function: Function<'a>,
        }
        #[derive(serde::Serialize)]
        struct Message<'a> {
            role: &'static str,
            content: Option<&'a str>,
            refusal: Option<()>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            tool_calls: Vec<Call<'a>>,
        }
        #[derive(serde::Serialize)]
        struct Choice<'a> {
            index: u32,
            message: Message<'a>,
            logprobs: Option<()>,
            finish_reason: &'static str,
        }
        #[derive(serde::Serialize)]
        struct PromptDetails {
            cached_tokens: u64,
        }
        #[derive(serde::Serialize)]
        struct CompletionDetails {
            reasoning_tokens: u64,
        }
        #[derive(serde::Serialize)]
        struct UsageOut {
            prompt_tokens: u64,
            completion_tokens: u64,
            total_tokens: u64,
            prompt_tokens_details: PromptDetails,
            completion_tokens_details: CompletionDetails,
        }
        #[derive(serde::Serialize)]
        struct Completion<'a> {
            id: &'a str,
            object: &'static str,
            created: u64,
            model: &'a str,
            choices: [Choice<'a>; 1],
            usage: UsageOut,
        }

        let mut text = std::borrow::Cow::Borrowed("");
        let mut tool_calls = Vec::new();
        for p in &resp.content {
            match p {
                Part::Text { text: t, .. } if text.is_empty() => {
                    text = std::borrow::Cow::Borrowed(t.as_str())
                }
                Part::Text { text: t, .. } => text.to_mut().push_str(t),
                Part::ToolCall { id, name, arguments } => {
                    tool_calls.push(Call { id, kind: "function", function: Function { name, arguments } })
                }
                _ => {}
            }
        }
        let id = chat_id(&resp.id);
        let u = &resp.usage;
        let body = Completion {
            id: &id,
            object: "chat.completion",
            created: resp.created,
            model: &resp.model,
            choices: [Choice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: if text.is_empty() && !tool_calls.is_empty() { None } else { Some(&text) },
                    refusal: None,
                    tool_calls,
                },
                logprobs: None,
                finish_reason: resp.stop.map(finish_reason).unwrap_or("stop"),
            }],
            usage: UsageOut {
                prompt_tokens: u.input,
                completion_tokens: u.output,
                total_tokens: u.input + u.output,
                prompt_tokens_details: PromptDetails { cached_tokens: u.cache_read },
                completion_tokens_details: CompletionDetails { reasoning_tokens: u.reasoning },
            },
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    fn chat_id(id: &str) -> String {
        // Bedrock answers carry no id; clients expect a unique one.
        if id.is_empty() {
            format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
        } else if id.starts_with("chatcmpl-") {
            id.to_string()
        } else {
            format!("chatcmpl-{id}")
        }
    }

    /// OpenAI-family SSE events → deltas (the SSE framing is parsed by the caller).
    #[derive(Default)]
    pub struct StreamDecoder {
        started: bool,
    }

    impl StreamDecoder {
        pub fn decode(
            &mut self,
            events: &mut Vec<crate::sse::Event>,
            out: &mut Vec<Delta>,
        ) -> Result<(), String> {
            for ev in events.drain(..) {
                let data = ev.data.trim();
                if data == "[DONE]" {
                    out.push(Delta::Done);
                    continue;
                }
                let v: Value =
                    serde_json::from_str(data).map_err(|e| format!("invalid stream chunk: {e}"))?;
                if let Some(err) = v.get("error") {
                    out.push(Delta::Error {
                        kind: err.get("type").and_then(Value::as_str).unwrap_or("api_error").to_string(),
                        message: err
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("upstream error")
                            .to_string(),
                    });
                    continue;
                }
                if !self.started {
                    self.started = true;
                    out.push(Delta::Start {
                        id: v.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                        model: v.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
                    });
                }
                if let Some(choice) = v.pointer("/choices/0") {
                    let delta = choice.get("delta").unwrap_or(&Value::Null);
                    if let Some(r) = delta.get("reasoning_content").and_then(Value::as_str) {
                        if !r.is_empty() {
                            out.push(Delta::Thinking(r.to_string()));
                        }
                    }
                    if let Some(t) = delta.get("content").and_then(Value::as_str) {
                        if !t.is_empty() {
                            out.push(Delta::Text(t.to_string()));
                        }
                    }
                    for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                        if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                            out.push(Delta::ToolCallStart {
                                call: index,
                                id: call.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                                name: name.to_string(),
                            });
                        }
                        if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                            if !args.is_empty() {
                                out.push(Delta::ToolArgs { call: index, json: args.to_string() });
                            }
                        }
                    }
                    if let Some(reason) =
                        choice.get("finish_reason").and_then(Value::as_str).and_then(stop_reason)
                    {
                        out.push(Delta::Stop(reason));
                    }
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    out.push(Delta::Usage(usage(u)));
                }
            }
            Ok(())
        }
    }

    /// Deltas → OpenAI chat.completion.chunk SSE (client surface).
    pub struct StreamEncoder {
        id: String,
        model: String,
        created: u64,
        /// Send the usage chunk (the client asked with `stream_options.include_usage`).
        send_usage: bool,
        usage: Usage,
        stop: Option<StopReason>,
        role_sent: bool,
        finished: bool,
    }

    impl StreamEncoder {
        pub fn new(model: &str, send_usage: bool) -> StreamEncoder {
            StreamEncoder {
                id: String::new(),
                model: model.to_string(),
                created: now_secs(),
                send_usage,
                usage: Usage::default(),
                stop: None,
                role_sent: false,
                finished: false,
            }
        }

        fn chunk(&self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
            let chunk = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            push_data(out, &chunk);
        }

        fn ensure_role(&mut self, out: &mut Vec<u8>) {
            if !self.role_sent {
                self.role_sent = true;
                if self.id.is_empty() {
                    self.id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
                }
                self.chunk(json!({"role": "assistant", "content": ""}), None, out);
            }
        }

        pub fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
            if self.finished {
                return;
            }
            match delta {
                Delta::Start { id, .. } => {
                    self.id = chat_id(id);
                    self.ensure_role(out);
                }
                Delta::Text(t) => {
                    self.ensure_role(out);
                    self.chunk(json!({"content": t}), None, out);
                }
                Delta::Thinking(_) | Delta::Signature(_) => {}
                Delta::ToolCallStart { call, id, name } => {
                    self.ensure_role(out);
                    self.chunk(
                        json!({"tool_calls": [{"index": call, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                        None,
                        out,
                    );
                }
                Delta::ToolArgs { call, json: args } => {
                    self.ensure_role(out);
                    self.chunk(
                        json!({"tool_calls": [{"index": call, "function": {"arguments": args}}]}),
                        None,
                        out,
                    );
                }
                Delta::Stop(reason) => self.stop = Some(*reason),
                Delta::Usage(u) => self.usage.merge(*u),
                Delta::Error { kind, message } => {
                    push_data(
                        out,
                        &json!({"error": {"type": kind, "message": message, "code": null, "param": null}}),
                    );
                    self.finished = true;
                }
                Delta::Done => {
                    self.ensure_role(out);
                    self.chunk(json!({}), Some(finish_reason(self.stop.unwrap_or(StopReason::EndTurn))), out);
                    if self.send_usage {
                        let chunk = json!({
                            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": usage_json(&self.usage),
                        });
                        push_data(out, &chunk);
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    self.finished = true;
                }
            }
        }

        pub fn usage(&self) -> Usage {
            self.usage
        }

        /// A choice-less chunk carrying the decision trace (`"mlx:trace": true`), shaped
        /// like the usage chunk so SDKs parse it as an ordinary chunk.
        pub fn trace_chunk(&self, trace: &RawValue, out: &mut Vec<u8>) {
            // The trace goes in as serialized once; a derived struct writes it raw.
            #[derive(serde::Serialize)]
            struct TraceChunk<'a> {
                id: &'a str,
                object: &'static str,
                created: u64,
                model: &'a str,
                choices: [(); 0],
                #[serde(rename = "mlx:trace")]
                trace: &'a RawValue,
            }
            let chunk = TraceChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: [],
                trace,
            };
            out.extend_from_slice(b"data: ");
            let _ = serde_json::to_writer(&mut *out, &chunk);
            out.extend_from_slice(b"\n\n");
        }
    }

    fn push_data(out: &mut Vec<u8>, v: &Value) {
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(&mut *out, v);
        out.extend_from_slice(b"\n\n");
    }

    /// The OpenAI Chat Completions codec, both as a provider format and as a client surface.
    pub struct OpenAiCodec;

    impl crate::wire::codec::Codec for OpenAiCodec {
        fn format(&self) -> crate::wire::WireFormat {
            crate::wire::WireFormat::OpenAi
        }

        fn encode_request(&self, req: &Request, model: &str) -> Result<Vec<u8>, String> {
            Ok(encode_request(req, model))
        }

        fn decode_response(&self, body: &[u8]) -> Result<Response, String> {
            decode_response(body)
        }

        fn stream_decoder(&self) -> Box<dyn crate::wire::codec::StreamDecoder> {
            Box::new(StreamDecoder::default())
        }

        fn error_message(&self, body: &[u8]) -> Option<String> {
            crate::wire::nested_error_message(body)
        }

        fn usage(&self, body: &[u8]) -> Option<Usage> {
            crate::wire::usage::from_body(crate::wire::WireFormat::OpenAi, body)
        }
    }

    impl crate::wire::codec::SurfaceCodec for OpenAiCodec {
        fn surface(&self) -> crate::error::Surface {
            crate::error::Surface::OpenAi
        }

        fn decode_request(&self, body: &[u8]) -> Result<Request, GatewayError> {
            decode_request(body)
        }

        fn encode_response(&self, resp: &Response) -> Vec<u8> {
            encode_response(resp)
        }

        fn stream_encoder(
            &self,
            model: &str,
            send_usage: bool,
        ) -> Box<dyn crate::wire::codec::StreamEncoder> {
            Box::new(StreamEncoder::new(model, send_usage))
        }
    }

    impl crate::wire::codec::StreamDecoder for StreamDecoder {
        fn decode(
            &mut self,
            events: &mut Vec<crate::sse::Event>,
            out: &mut Vec<Delta>,
        ) -> Result<(), String> {
            StreamDecoder::decode(self, events, out)
        }
    }

    impl crate::wire::codec::StreamEncoder for StreamEncoder {
        fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
            StreamEncoder::encode(self, delta, out)
        }

        fn usage(&self) -> Usage {
            StreamEncoder::usage(self)
        }

        fn done_with_trace(&mut self, trace: &RawValue, out: &mut Vec<u8>) {
            let mut tail = Vec::new();
            StreamEncoder::encode(self, &Delta::Done, &mut tail);
            let cut = tail.len().saturating_sub(b"data: [DONE]\n\n".len());
            out.extend_from_slice(&tail[..cut]);
            self.trace_chunk(trace, out);
            out.extend_from_slice(&tail[cut..]);
        }
    }
}
