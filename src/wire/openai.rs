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
}

fn field_error(code: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(code, message)
}

impl<'a> ChatRequest<'a> {
    pub fn parse(body: &'a [u8]) -> Result<ChatRequest<'a>, GatewayError> {
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
                "messages" => {
                    if !raw.get().starts_with('[') {
                        return Err(field_error("invalid_type", "\"messages\" must be an array"));
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
            return Err(field_error("missing_field", "Missing required field: messages"));
        }
        Ok(ChatRequest { fields: top.0, model, stream, tags, end_user })
    }

    /// The body to send upstream: `model` replaced, `mlx:*` keys removed, everything else
    /// byte-identical.
    pub fn encode_for_upstream(&self, model: &str) -> Vec<u8> {
        let size: usize = self.fields.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum();
        let mut out = String::with_capacity(size + model.len() + 16);
        out.push('{');
        let mut first = true;
        for (key, raw) in &self.fields {
            if key.starts_with(EXTENSION_PREFIX) {
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
}
