//! Response templates cut out of the recorded OpenAI fixtures.
//!
//! The fixtures are the source of truth for the wire shape (key order,
//! whitespace, which fields exist). At server start each fixture is split into
//! literal byte runs and value slots once, so answering a request is a few
//! `extend_from_slice` calls instead of building and serializing a JSON tree.

use std::io::{self, Write};

use crate::wire::invalid;

pub(crate) const CHAT_COMPLETION: &str = include_str!("../../tests/fixtures/openai/chat_completion.json");
pub(crate) const CHAT_COMPLETION_STREAM: &str =
    include_str!("../../tests/fixtures/openai/chat_completion_stream.txt");
pub(crate) const ERROR_429: &str = include_str!("../../tests/fixtures/openai/error_429.json");
pub(crate) const ERROR_500: &str = include_str!("../../tests/fixtures/openai/error_500.json");
pub(crate) const ERROR_400: &str = include_str!("../../tests/fixtures/openai/error_400.json");

/// A value filled in per response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Id,
    Created,
    Model,
    Content,
    PromptTokens,
    CompletionTokens,
    TotalTokens,
}

/// Per-response values. Strings are already JSON-encoded (with quotes).
pub(crate) struct Vals<'a> {
    pub seq: u64,
    pub created: u64,
    pub model_json: &'a [u8],
    pub content_json: &'a [u8],
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug)]
enum Piece<S> {
    Lit(Box<[u8]>),
    Slot(S),
}

/// A fixture cut into literal runs and slots of type `S` (OpenAI's [`Slot`]
/// by default; the Anthropic templates bring their own slot type).
#[derive(Debug)]
pub(crate) struct Template<S = Slot> {
    pieces: Vec<Piece<S>>,
}

impl<S: Copy> Template<S> {
    /// Replaces the value of each `"key": <value>` (first occurrence) in
    /// `json` with a slot. Fails if a key is missing, so a fixture edit that
    /// drops a field is caught at server start rather than silently served.
    pub(crate) fn build(json: &str, slots: &[(&str, S)]) -> io::Result<Template<S>> {
        let mut ranges = Vec::with_capacity(slots.len());
        for &(key, slot) in slots {
            let (start, end) =
                value_range(json, key).ok_or_else(|| invalid(&format!("fixture has no \"{key}\" value")))?;
            ranges.push((start, end, slot));
        }
        ranges.sort_by_key(|r| r.0);
        let mut pieces = Vec::with_capacity(ranges.len() * 2 + 1);
        let mut at = 0;
        for (start, end, slot) in ranges {
            if start < at {
                return Err(invalid("overlapping template slots"));
            }
            pieces.push(Piece::Lit(json.as_bytes()[at..start].into()));
            pieces.push(Piece::Slot(slot));
            at = end;
        }
        pieces.push(Piece::Lit(json.as_bytes()[at..].into()));
        Ok(Template { pieces })
    }

    /// Appends the literals to `out` and lets `fill` write each slot value.
    pub(crate) fn render_with(&self, out: &mut Vec<u8>, mut fill: impl FnMut(S, &mut Vec<u8>)) {
        for p in &self.pieces {
            match p {
                Piece::Lit(b) => out.extend_from_slice(b),
                Piece::Slot(s) => fill(*s, out),
            }
        }
    }
}

impl Template<Slot> {
    pub(crate) fn render(&self, v: &Vals<'_>, out: &mut Vec<u8>) {
        self.render_with(out, |s, out| {
            // Writes into a Vec cannot fail.
            let _ = match s {
                // Same length and alphabet as real ids (chatcmpl- + 29).
                Slot::Id => write!(out, "\"chatcmpl-mock{:025}\"", v.seq),
                Slot::Created => write!(out, "{}", v.created),
                Slot::Model => out.write_all(v.model_json),
                Slot::Content => out.write_all(v.content_json),
                Slot::PromptTokens => write!(out, "{}", v.prompt_tokens),
                Slot::CompletionTokens => write!(out, "{}", v.completion_tokens),
                Slot::TotalTokens => write!(out, "{}", v.prompt_tokens + v.completion_tokens),
            };
        });
    }
}

/// Byte range of the JSON value following the first `"key"` + `:`.
/// Objects and arrays span to their matching close bracket.
pub(crate) fn value_range(json: &str, key: &str) -> Option<(usize, usize)> {
    let needle = format!("\"{key}\"");
    let bytes = json.as_bytes();
    let mut search = 0;
    while let Some(rel) = json[search..].find(&needle) {
        let mut i = search + rel + needle.len();
        search = i;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        // A match that is not followed by ':' is a string value, not a key.
        if bytes.get(i) != Some(&b':') {
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        if bytes.get(i) == Some(&b'"') {
            i += 1;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'"' => return Some((start, i + 1)),
                    _ => i += 1,
                }
            }
            return None;
        }
        if matches!(bytes.get(i), Some(b'{' | b'[')) {
            return container_end(bytes, i).map(|end| (start, end));
        }
        while i < bytes.len() && !matches!(bytes[i], b',' | b'}' | b']') {
            i += 1;
        }
        // Trailing whitespace before the delimiter belongs to the literal.
        let mut end = i;
        while end > start && bytes[end - 1].is_ascii_whitespace() {
            end -= 1;
        }
        return Some((start, end));
    }
    None
}

/// End (exclusive) of the object or array opening at `bytes[at]`.
fn container_end(bytes: &[u8], at: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = at;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The raw text of the JSON value of the first `"key"`.
pub(crate) fn raw_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    value_range(json, key).map(|(s, e)| &json[s..e])
}

/// The raw text of each element of a JSON array (`[a, b]` -> `["a", "b"]`).
pub(crate) fn array_elements(array: &str) -> Option<Vec<&str>> {
    let inner = array.trim().strip_prefix('[')?.strip_suffix(']')?;
    let bytes = inner.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() {
            return Some(out);
        }
        // Only objects are expected here (content blocks).
        if bytes[i] != b'{' {
            return None;
        }
        let end = container_end(bytes, i)?;
        out.push(&inner[i..end]);
        i = end;
    }
}

/// The SSE events of the streamed fixture, classified by role.
pub(crate) struct StreamTemplates {
    pub role: Template,
    pub content: Template,
    pub finish: Template,
    pub usage: Template,
    /// The same chunks without the `"usage":null` member, for requests that
    /// did not ask for `stream_options.include_usage`.
    pub role_nu: Template,
    pub content_nu: Template,
    pub finish_nu: Template,
}

pub(crate) struct Templates {
    pub completion: Template,
    pub stream: StreamTemplates,
}

const COMMON: [(&str, Slot); 3] = [("id", Slot::Id), ("created", Slot::Created), ("model", Slot::Model)];

impl Templates {
    pub(crate) fn load() -> io::Result<Templates> {
        let mut slots = COMMON.to_vec();
        slots.extend([
            ("content", Slot::Content),
            ("prompt_tokens", Slot::PromptTokens),
            ("completion_tokens", Slot::CompletionTokens),
            ("total_tokens", Slot::TotalTokens),
        ]);
        // Strip only the trailing newline of the file; the body is sent as
        // OpenAI sends it (pretty-printed).
        let completion = Template::build(CHAT_COMPLETION.trim_end(), &slots)?;

        let (mut role, mut content, mut finish, mut usage) = (None, None, None, None);
        for line in CHAT_COMPLETION_STREAM.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            if data.contains("\"choices\":[]") {
                usage.get_or_insert(data);
            } else if data.contains("\"role\":\"assistant\"") {
                role.get_or_insert(data);
            } else if data.contains("\"finish_reason\":\"stop\"") {
                finish.get_or_insert(data);
            } else if data.contains("\"delta\":{\"content\":") {
                content.get_or_insert(data);
            }
        }
        let missing = || invalid("stream fixture lacks a role/content/finish/usage chunk");
        let (role, content, finish, usage) = (
            role.ok_or_else(missing)?,
            content.ok_or_else(missing)?,
            finish.ok_or_else(missing)?,
            usage.ok_or_else(missing)?,
        );
        let no_usage = |s: &str| -> io::Result<String> {
            if s.contains(",\"usage\":null") {
                Ok(s.replacen(",\"usage\":null", "", 1))
            } else {
                Err(invalid("stream fixture chunk lacks \"usage\":null"))
            }
        };
        let mut content_slots = COMMON.to_vec();
        content_slots.push(("content", Slot::Content));
        let mut usage_slots = COMMON.to_vec();
        usage_slots.extend([
            ("prompt_tokens", Slot::PromptTokens),
            ("completion_tokens", Slot::CompletionTokens),
            ("total_tokens", Slot::TotalTokens),
        ]);
        let stream = StreamTemplates {
            role: Template::build(role, &COMMON)?,
            content: Template::build(content, &content_slots)?,
            finish: Template::build(finish, &COMMON)?,
            usage: Template::build(usage, &usage_slots)?,
            role_nu: Template::build(&no_usage(role)?, &COMMON)?,
            content_nu: Template::build(&no_usage(content)?, &content_slots)?,
            finish_nu: Template::build(&no_usage(finish)?, &COMMON)?,
        };
        Ok(Templates { completion, stream })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals() -> Vals<'static> {
        Vals {
            seq: 7,
            created: 123,
            model_json: b"\"m\\\"x\"",
            content_json: b"\" tok0\"",
            prompt_tokens: 5,
            completion_tokens: 1,
        }
    }

    #[test]
    fn value_range_spans_objects_and_arrays() {
        let j = r#"{"a":{"b":"}]","c":[1,{"d":2}]},"e":[{"x":"y\"}"},{}],"f":3}"#;
        assert_eq!(raw_value(j, "a"), Some(r#"{"b":"}]","c":[1,{"d":2}]}"#));
        assert_eq!(raw_value(j, "c"), Some(r#"[1,{"d":2}]"#));
        assert_eq!(raw_value(j, "f"), Some("3"));
        let e = raw_value(j, "e").unwrap_or_default();
        assert_eq!(array_elements(e), Some(vec![r#"{"x":"y\"}"}"#, "{}"]));
        assert_eq!(array_elements("[]"), Some(vec![]));
        assert_eq!(array_elements("[1]"), None);
        assert_eq!(raw_value(r#"{"a":{"#, "a"), None);
    }

    #[test]
    fn fixtures_are_valid_json() -> Result<(), serde_json::Error> {
        for f in [CHAT_COMPLETION, ERROR_400, ERROR_429, ERROR_500] {
            serde_json::from_str::<serde_json::Value>(f)?;
        }
        Ok(())
    }

    #[test]
    fn completion_renders_with_values() -> Result<(), Box<dyn std::error::Error>> {
        let t = Templates::load()?;
        let mut out = Vec::new();
        t.completion.render(&vals(), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        assert_eq!(v["model"], "m\"x");
        assert_eq!(v["created"], 123);
        assert_eq!(v["choices"][0]["message"]["content"], " tok0");
        assert_eq!(v["usage"]["total_tokens"], 6);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(v["id"].as_str().map(str::len), Some(38));
        Ok(())
    }

    #[test]
    fn stream_templates_render_valid_chunks() -> Result<(), Box<dyn std::error::Error>> {
        let t = Templates::load()?;
        let s = &t.stream;
        for (tpl, has_usage_key) in [
            (&s.role, true),
            (&s.content, true),
            (&s.finish, true),
            (&s.usage, true),
            (&s.role_nu, false),
            (&s.content_nu, false),
            (&s.finish_nu, false),
        ] {
            let mut out = Vec::new();
            tpl.render(&vals(), &mut out);
            let v: serde_json::Value = serde_json::from_slice(&out)?;
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v.get("usage").is_some(), has_usage_key);
        }
        Ok(())
    }
}
