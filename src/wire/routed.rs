//! A routed request body, OpenAI- or Anthropic-shaped, parsed just enough to route it: the
//! body is kept as a list of top-level `(key, raw JSON)` pairs, so a same-format hop forwards
//! every value byte for byte (no float re-formatting, no key reordering) and rewrites only
//! `model` and the `mlx:*` extension keys. Both surfaces' chat bodies and OpenAI embeddings
//! bodies go through it.

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

/// A routed request (chat on either surface, or embeddings), parsed just enough to route it.
#[derive(Debug)]
pub struct RoutedRequest<'a> {
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
    /// Responses API: `previous_response_id`, the response this one continues.
    pub previous_response_id: Option<String>,
}

/// The longest `model` accepted. Real model ids (fine-tunes, Bedrock ARNs, Azure
/// deployments) stay well under it; the name is echoed in a response header, and a client's
/// HTTP parser may refuse a long one.
pub const MAX_MODEL_BYTES: usize = 256;

/// Why a `model` cannot be served, if it cannot. The served model is echoed in
/// `X-Modelux-Model-Used`, so anything a header value cannot carry (control characters,
/// CR/LF) is refused where the request is read, rather than failing to build the answer.
pub fn model_problem(model: &str) -> Option<String> {
    if model.len() > MAX_MODEL_BYTES {
        return Some(format!("\"model\" is {} bytes long; the limit is {MAX_MODEL_BYTES}", model.len()));
    }
    model.chars().find(|c| c.is_control()).map(|c| {
        format!("\"model\" contains the control character U+{:04X}; model names are printable text", c as u32)
    })
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
    /// OpenAI Responses API: `input` (a string or an array) is optional, as a stored
    /// `prompt` or `previous_response_id` may stand in for it.
    Responses,
    /// Audio and images: only `model` is read.
    Free,
}

impl<'a> RoutedRequest<'a> {
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

    pub fn parse(body: &'a [u8]) -> Result<RoutedRequest<'a>, GatewayError> {
        Self::parse_routed(body, Payload::Messages)
    }

    /// Parses any routed OpenAI/Anthropic-shaped body: `model` plus its payload field.
    pub fn parse_routed(body: &'a [u8], payload: Payload) -> Result<RoutedRequest<'a>, GatewayError> {
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
        let mut previous_response_id = None;
        let mut seen_interpreted: Vec<&str> = Vec::new();
        for (key, raw) in &top.0 {
            let interpreted = matches!(
                key.as_str(),
                "model"
                    | "stream"
                    | "mlx:tags"
                    | "mlx:end_user"
                    | "mlx:trace"
                    | "mlx:cache"
                    | "previous_response_id"
            );
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
                    if let Some(problem) = model_problem(&m) {
                        return Err(field_error("invalid_model", problem));
                    }
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
                "previous_response_id" if payload == Payload::Responses => {
                    previous_response_id =
                        serde_json::from_str::<Option<String>>(raw.get()).map_err(|_| {
                            field_error("invalid_type", "\"previous_response_id\" must be a string")
                        })?;
                }
                "input" if payload == Payload::Responses && !raw.get().starts_with(['[', '"']) => {
                    return Err(field_error("invalid_type", "\"input\" must be a string or an array"));
                }
                "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
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
                "mlx:cache" => {
                    // Read by the cache (`{"skip": true}`); a malformed one is refused here,
                    // not taken as "no directive".
                    let ok = match serde_json::from_str::<serde_json::Value>(raw.get()) {
                        Ok(serde_json::Value::Null) => true,
                        Ok(serde_json::Value::Object(o)) => {
                            o.get("skip").is_none_or(|v| v.is_boolean() || v.is_null())
                        }
                        _ => false,
                    };
                    if !ok {
                        return Err(field_error(
                            "invalid_type",
                            "\"mlx:cache\" must be an object such as {\"skip\": true}",
                        ));
                    }
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
        if !has_messages && !matches!(payload, Payload::Responses | Payload::Free) {
            let name = match payload {
                Payload::Messages => "messages",
                _ => "input",
            };
            return Err(field_error("missing_field", format!("Missing required field: {name}")));
        }
        Ok(RoutedRequest {
            fields: top.0,
            model,
            stream,
            tags,
            end_user,
            max_tokens,
            trace,
            choices,
            previous_response_id,
        })
    }

    /// Whether the body as sent is what `model`'s upstream gets: the model is unchanged and
    /// there is no `mlx:*` key to take out.
    pub fn forwards_verbatim(&self, model: &str) -> bool {
        model == self.model && !self.fields.iter().any(|(k, _)| k.starts_with(EXTENSION_PREFIX))
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
    fn responses_bodies_need_no_input_and_forward_verbatim_when_nothing_changes() {
        let body = br#"{"model":"gpt-4o", "previous_response_id":"resp_1","max_output_tokens":9}"#;
        let req = RoutedRequest::parse_routed(body, Payload::Responses).unwrap();
        assert_eq!(req.previous_response_id.as_deref(), Some("resp_1"));
        assert_eq!(req.max_tokens, Some(9));
        assert!(req.forwards_verbatim("gpt-4o"));
        assert!(!req.forwards_verbatim("gpt-4o-mini"));
        let tagged = br#"{"model":"gpt-4o","input":"x","mlx:tags":{"a":"b"}}"#;
        assert!(!RoutedRequest::parse_routed(tagged, Payload::Responses)
            .unwrap()
            .forwards_verbatim("gpt-4o"));
        for bad in [&br#"{"model":"m","input":3}"#[..], br#"{"model":"m","previous_response_id":1}"#] {
            assert!(RoutedRequest::parse_routed(bad, Payload::Responses).is_err());
        }
        // Chat still requires its messages.
        assert!(RoutedRequest::parse(br#"{"model":"m"}"#).is_err());
    }

    #[test]
    fn rewrites_model_and_strips_extensions_keeping_bytes() {
        let body = br#"{"model":"@fast","messages":[{"role":"user","content":"hi \u00e9"}],"temperature":0.70000000000000001,"mlx:tags":{"team":"ml"},"mlx:end_user":"u1","mlx:trace":true,"n":1}"#;
        let req = RoutedRequest::parse(body).unwrap();
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
            let e = RoutedRequest::parse(body).unwrap_err();
            assert_eq!(e.code(), *code, "{}", String::from_utf8_lossy(body));
            assert!(e.message().contains(msg), "{} -> {}", String::from_utf8_lossy(body), e.message());
        }
    }

    #[test]
    fn stream_flag_and_escaping() {
        let req = RoutedRequest::parse(br#"{"model":"m","messages":[],"stream":true,"we\"ird":1}"#).unwrap();
        assert!(req.stream);
        let out = req.encode_for_upstream("a\"b");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "a\"b");
        assert_eq!(v["we\"ird"], 1);
    }

    fn with_usage(body: &[u8]) -> (String, bool, String) {
        let req = RoutedRequest::parse(body).unwrap();
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
