//! Anthropic Messages API for the mock upstream.
//!
//! Like the OpenAI side, every response is cut out of recorded-format
//! fixtures (`tests/fixtures/anthropic/`): each message envelope, content
//! block, SSE event and error is a [`Template`] whose literal bytes come from
//! a fixture and whose slots (ids, model, text, indexes, usage) are filled per
//! response. A fixture edit that drops a field fails server start.

use std::io::{self, Write};

use crate::answer::Event;
use crate::template::{array_elements, raw_value, Template};
use crate::wire::invalid;

pub(crate) const MESSAGE: &str = include_str!("../../tests/fixtures/anthropic/message.json");
pub(crate) const MESSAGE_STREAM: &str = include_str!("../../tests/fixtures/anthropic/message_stream.txt");
pub(crate) const MESSAGE_TOOL_USE: &str =
    include_str!("../../tests/fixtures/anthropic/message_tool_use.json");
pub(crate) const MESSAGE_TOOL_USE_STREAM: &str =
    include_str!("../../tests/fixtures/anthropic/message_tool_use_stream.txt");
pub(crate) const MESSAGE_THINKING: &str =
    include_str!("../../tests/fixtures/anthropic/message_thinking.json");
pub(crate) const MESSAGE_THINKING_STREAM: &str =
    include_str!("../../tests/fixtures/anthropic/message_thinking_stream.txt");
pub(crate) const ERROR_400: &str = include_str!("../../tests/fixtures/anthropic/error_400.json");
pub(crate) const ERROR_401: &str = include_str!("../../tests/fixtures/anthropic/error_401.json");
pub(crate) const ERROR_429: &str = include_str!("../../tests/fixtures/anthropic/error_429.json");
pub(crate) const ERROR_529: &str = include_str!("../../tests/fixtures/anthropic/error_529.json");

/// `anthropic-organization-id` of every mock response.
pub(crate) const ORGANIZATION_ID: &str = "3f6c1a52-8e0b-4d7a-9c21-5b4e8f0d2a67";

/// Text block of a tool-use answer (JSON).
const TOOL_TEXT: &[u8] = b"\"Let me check.\"";
/// Input of the mock tool call (JSON).
const TOOL_INPUT: &[u8] = br#"{"query":"mock"}"#;
/// The same input streamed as `partial_json` pieces (JSON strings); joined
/// they read `{"query": "mock"}`.
const TOOL_INPUT_PIECES: [&[u8]; 3] = [br#""""#, br#""{\"query\": ""#, br#""\"mock\"}""#];
/// Thinking text as streamed `thinking_delta`s (JSON strings): "Let me think.".
const THINKING_PIECES: [&[u8]; 2] = [b"\"Let me\"", b"\" think.\""];

/// A value filled in per response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ASlot {
    MsgId,
    Model,
    /// The whole `content` array of a message.
    Content,
    StopReason,
    InputTokens,
    OutputTokens,
    /// Content block index of a stream event.
    Index,
    /// A JSON string: block text, delta text, thinking or partial JSON.
    Text,
    ToolId,
    ToolName,
    ToolInput,
    Signature,
    RequestId,
    /// Error message (a JSON string).
    Message,
}

/// Why the message ended (`stop_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    EndTurn,
    MaxTokens,
    ToolUse,
}

impl StopReason {
    fn json(self) -> &'static [u8] {
        match self {
            StopReason::EndTurn => b"\"end_turn\"",
            StopReason::MaxTokens => b"\"max_tokens\"",
            StopReason::ToolUse => b"\"tool_use\"",
        }
    }
}

/// What one response says.
pub(crate) struct Reply<'a> {
    pub seq: u64,
    /// The request's model, JSON-encoded.
    pub model_json: &'a [u8],
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// A thinking block comes first.
    pub thinking: bool,
    /// JSON-encoded tool name: the text is followed by a call to it.
    pub tool_json: Option<&'a [u8]>,
    /// The text block's streamed pieces, each a JSON string.
    pub text_pieces: &'a [&'a [u8]],
    pub stop: StopReason,
}

impl Reply<'_> {
    /// The text pieces for a tool-use answer.
    pub(crate) const TOOL_TEXT_PIECES: &'static [&'static [u8]] = &[TOOL_TEXT];
}

/// Slot values for one rendering.
#[derive(Clone, Copy)]
struct Fill<'a> {
    seq: u64,
    model: &'a [u8],
    content: &'a [u8],
    stop: &'a [u8],
    input_tokens: u64,
    output_tokens: u64,
    index: usize,
    text: &'a [u8],
    tool_name: &'a [u8],
}

impl Fill<'_> {
    fn put(&self, slot: ASlot, out: &mut Vec<u8>) {
        // Writes into a Vec cannot fail.
        let _ = match slot {
            // Same length as real ids (msg_01 + 22).
            ASlot::MsgId => write!(out, "\"msg_01mock{:018}\"", self.seq),
            ASlot::Model => out.write_all(self.model),
            ASlot::Content => out.write_all(self.content),
            ASlot::StopReason => out.write_all(self.stop),
            ASlot::InputTokens => write!(out, "{}", self.input_tokens),
            ASlot::OutputTokens => write!(out, "{}", self.output_tokens),
            ASlot::Index => write!(out, "{}", self.index),
            ASlot::Text | ASlot::Message => out.write_all(self.text),
            ASlot::ToolId => write!(out, "\"toolu_mock_{}\"", self.seq),
            ASlot::ToolName => out.write_all(self.tool_name),
            ASlot::ToolInput => out.write_all(TOOL_INPUT),
            ASlot::Signature => write!(out, "\"sig_mock_{}\"", self.seq),
            ASlot::RequestId => {
                out.push(b'"');
                push_request_id(out, self.seq);
                out.push(b'"');
                Ok(())
            }
        };
    }
}

/// The `request-id` value (and error `request_id`) of request `seq`; the
/// same length as real ones (req_ + 24).
pub(crate) fn push_request_id(out: &mut Vec<u8>, seq: u64) {
    let _ = write!(out, "req_011mock{seq:017}");
}

/// `error.type` for an HTTP status, as Anthropic documents them.
pub(crate) fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Concatenates JSON string literals into one JSON string literal.
fn join_json_strings(pieces: &[&[u8]], out: &mut Vec<u8>) {
    out.push(b'"');
    for p in pieces {
        if let Some(inner) = p.strip_prefix(b"\"").and_then(|p| p.strip_suffix(b"\"")) {
            out.extend_from_slice(inner);
        }
    }
    out.push(b'"');
}

struct ErrorTemplate {
    status: u16,
    tpl: Template<ASlot>,
    /// The fixture's own message (JSON string), used when none is given.
    message: Box<[u8]>,
}

pub(crate) struct Templates {
    message: Template<ASlot>,
    text_block: Template<ASlot>,
    tool_block: Template<ASlot>,
    thinking_block: Template<ASlot>,
    message_start: Template<ASlot>,
    start_text: Template<ASlot>,
    start_tool: Template<ASlot>,
    start_thinking: Template<ASlot>,
    ping: Template<ASlot>,
    text_delta: Template<ASlot>,
    json_delta: Template<ASlot>,
    thinking_delta: Template<ASlot>,
    signature_delta: Template<ASlot>,
    block_stop: Template<ASlot>,
    message_delta: Template<ASlot>,
    message_stop: Template<ASlot>,
    errors: Vec<ErrorTemplate>,
}

/// `(event name, data)` of each event of an SSE fixture.
fn sse_events(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = Some(n);
        } else if let Some(d) = line.strip_prefix("data: ") {
            if let Some(n) = name.take() {
                out.push((n, d));
            }
        }
    }
    out
}

/// The first `name` event of a stream fixture whose data contains `needle`.
fn event_data<'a>(text: &'a str, name: &str, needle: &str) -> io::Result<&'a str> {
    sse_events(text)
        .into_iter()
        .find(|(n, d)| *n == name && d.contains(needle))
        .map(|(_, d)| d)
        .ok_or_else(|| invalid(&format!("anthropic stream fixture lacks a {name} event with {needle}")))
}

/// The first content block of a message fixture with `"type":"<ty>"`.
fn content_block<'a>(message: &'a str, ty: &str) -> io::Result<&'a str> {
    let needle = format!("\"type\":\"{ty}\"");
    raw_value(message, "content")
        .and_then(array_elements)
        .and_then(|blocks| blocks.into_iter().find(|b| b.contains(&needle)))
        .ok_or_else(|| invalid(&format!("anthropic message fixture lacks a {ty} content block")))
}

impl Templates {
    pub(crate) fn load() -> io::Result<Templates> {
        use ASlot::*;
        let t = Template::build;
        let index = [("index", Index)];
        let mut errors = Vec::new();
        for (status, fixture) in [(400, ERROR_400), (401, ERROR_401), (429, ERROR_429), (529, ERROR_529)] {
            let fixture = fixture.trim_end();
            let message = raw_value(fixture, "message")
                .ok_or_else(|| invalid("anthropic error fixture has no message"))?;
            errors.push(ErrorTemplate {
                status,
                tpl: t(fixture, &[("message", Message), ("request_id", RequestId)])?,
                message: message.as_bytes().into(),
            });
        }
        let s = MESSAGE_STREAM;
        Ok(Templates {
            message: t(
                MESSAGE.trim_end(),
                &[
                    ("id", MsgId),
                    ("model", Model),
                    ("content", Content),
                    ("stop_reason", StopReason),
                    ("input_tokens", InputTokens),
                    ("output_tokens", OutputTokens),
                ],
            )?,
            text_block: t(content_block(MESSAGE, "text")?, &[("text", Text)])?,
            tool_block: t(
                content_block(MESSAGE_TOOL_USE, "tool_use")?,
                &[("id", ToolId), ("name", ToolName), ("input", ToolInput)],
            )?,
            thinking_block: t(
                content_block(MESSAGE_THINKING, "thinking")?,
                &[("thinking", Text), ("signature", Signature)],
            )?,
            message_start: t(
                event_data(s, "message_start", "")?,
                &[("id", MsgId), ("model", Model), ("input_tokens", InputTokens)],
            )?,
            start_text: t(event_data(s, "content_block_start", "{\"type\":\"text\"")?, &index)?,
            start_tool: t(
                event_data(MESSAGE_TOOL_USE_STREAM, "content_block_start", "{\"type\":\"tool_use\"")?,
                &[("index", Index), ("id", ToolId), ("name", ToolName)],
            )?,
            start_thinking: t(
                event_data(MESSAGE_THINKING_STREAM, "content_block_start", "{\"type\":\"thinking\"")?,
                &index,
            )?,
            ping: t(event_data(s, "ping", "")?, &[])?,
            text_delta: t(
                event_data(s, "content_block_delta", "\"text_delta\"")?,
                &[("index", Index), ("text", Text)],
            )?,
            json_delta: t(
                event_data(MESSAGE_TOOL_USE_STREAM, "content_block_delta", "\"input_json_delta\"")?,
                &[("index", Index), ("partial_json", Text)],
            )?,
            thinking_delta: t(
                event_data(MESSAGE_THINKING_STREAM, "content_block_delta", "\"thinking_delta\"")?,
                &[("index", Index), ("thinking", Text)],
            )?,
            signature_delta: t(
                event_data(MESSAGE_THINKING_STREAM, "content_block_delta", "\"signature_delta\"")?,
                &[("index", Index), ("signature", Signature)],
            )?,
            block_stop: t(event_data(s, "content_block_stop", "")?, &index)?,
            message_delta: t(
                event_data(s, "message_delta", "")?,
                &[("stop_reason", StopReason), ("output_tokens", OutputTokens)],
            )?,
            message_stop: t(event_data(s, "message_stop", "")?, &[])?,
            errors,
        })
    }

    fn base<'a>(r: &Reply<'a>) -> Fill<'a> {
        Fill {
            seq: r.seq,
            model: r.model_json,
            content: b"[]",
            stop: r.stop.json(),
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            index: 0,
            text: b"\"\"",
            tool_name: r.tool_json.unwrap_or(b"\"\""),
        }
    }

    /// The non-streamed message body.
    pub(crate) fn render_message(&self, r: &Reply<'_>, out: &mut Vec<u8>) {
        let base = Self::base(r);
        let mut content = Vec::with_capacity(256);
        let mut text = Vec::with_capacity(128);
        content.push(b'[');
        if r.thinking {
            join_json_strings(&THINKING_PIECES, &mut text);
            let f = Fill { text: &text, ..base };
            self.thinking_block.render_with(&mut content, |s, o| f.put(s, o));
            content.push(b',');
            text.clear();
        }
        join_json_strings(r.text_pieces, &mut text);
        let f = Fill { text: &text, ..base };
        self.text_block.render_with(&mut content, |s, o| f.put(s, o));
        if r.tool_json.is_some() {
            content.push(b',');
            self.tool_block.render_with(&mut content, |s, o| base.put(s, o));
        }
        content.push(b']');
        let f = Fill { content: &content, ..base };
        self.message.render_with(out, |s, o| f.put(s, o));
    }

    /// The streamed message, one entry per SSE event, in order.
    pub(crate) fn stream_events(&self, r: &Reply<'_>) -> Vec<Event> {
        let base = Self::base(r);
        let mut ev = Events { out: Vec::with_capacity(r.text_pieces.len() + 12), ping: Some(&self.ping) };
        ev.push("message_start", &self.message_start, base, false);
        let mut index = 0;
        if r.thinking {
            let f = Fill { index, ..base };
            ev.start(&self.start_thinking, f);
            for p in THINKING_PIECES {
                ev.push("content_block_delta", &self.thinking_delta, Fill { text: p, ..f }, true);
            }
            ev.push("content_block_delta", &self.signature_delta, f, true);
            ev.push("content_block_stop", &self.block_stop, f, false);
            index += 1;
        }
        let f = Fill { index, ..base };
        ev.start(&self.start_text, f);
        for p in r.text_pieces {
            ev.push("content_block_delta", &self.text_delta, Fill { text: p, ..f }, true);
        }
        ev.push("content_block_stop", &self.block_stop, f, false);
        index += 1;
        if r.tool_json.is_some() {
            let f = Fill { index, ..base };
            ev.start(&self.start_tool, f);
            for p in TOOL_INPUT_PIECES {
                ev.push("content_block_delta", &self.json_delta, Fill { text: p, ..f }, true);
            }
            ev.push("content_block_stop", &self.block_stop, f, false);
        }
        ev.push("message_delta", &self.message_delta, base, false);
        ev.push("message_stop", &self.message_stop, base, false);
        ev.out
    }

    /// An error body for `status`; `message` overrides the fixture's message
    /// when non-empty. Statuses without a fixture get the same shape.
    pub(crate) fn render_error(&self, status: u16, message: &str, seq: u64, out: &mut Vec<u8>) {
        let given = (!message.is_empty()).then(|| serde_json::to_vec(message).unwrap_or_default());
        let mut fill = Fill {
            seq,
            model: b"",
            content: b"",
            stop: b"",
            input_tokens: 0,
            output_tokens: 0,
            index: 0,
            text: b"",
            tool_name: b"",
        };
        if let Some(e) = self.errors.iter().find(|e| e.status == status) {
            fill.text = given.as_deref().unwrap_or(&e.message);
            e.tpl.render_with(out, |s, o| fill.put(s, o));
            return;
        }
        let default = match status {
            500 => "Internal server error".to_owned(),
            s => format!("mock upstream error {s}"),
        };
        let message = given.unwrap_or_else(|| serde_json::to_vec(&default).unwrap_or_default());
        let _ =
            write!(out, "{{\"type\":\"error\",\"error\":{{\"type\":\"{}\",\"message\":", error_type(status));
        out.extend_from_slice(&message);
        out.extend_from_slice(b"},\"request_id\":");
        fill.put(ASlot::RequestId, out);
        out.push(b'}');
    }
}

struct Events<'t> {
    out: Vec<Event>,
    /// Sent after the first `content_block_start`, as Anthropic does.
    ping: Option<&'t Template<ASlot>>,
}

impl Events<'_> {
    fn push(&mut self, name: &str, tpl: &Template<ASlot>, f: Fill<'_>, delta: bool) {
        let mut bytes = Vec::with_capacity(160);
        bytes.extend_from_slice(b"event: ");
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(b"\ndata: ");
        tpl.render_with(&mut bytes, |s, o| f.put(s, o));
        bytes.extend_from_slice(b"\n\n");
        self.out.push(Event { bytes, delta });
    }

    /// `content_block_start` (the first one followed by the `ping`).
    fn start(&mut self, tpl: &Template<ASlot>, f: Fill<'_>) {
        self.push("content_block_start", tpl, f, false);
        if let Some(ping) = self.ping.take() {
            self.push("ping", ping, f, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    type R = Result<(), Box<dyn std::error::Error>>;

    const TOKENS: [&[u8]; 2] = [b"\" tok0\"", b"\" tok1\""];

    fn reply(thinking: bool, tool: Option<&'static [u8]>) -> Reply<'static> {
        Reply {
            seq: 7,
            model_json: b"\"claude-x\"",
            input_tokens: 11,
            output_tokens: 2,
            thinking,
            tool_json: tool,
            text_pieces: if tool.is_some() { Reply::TOOL_TEXT_PIECES } else { &TOKENS },
            stop: if tool.is_some() { StopReason::ToolUse } else { StopReason::EndTurn },
        }
    }

    /// Keys of every object, recursively, with their paths (array elements
    /// collapsed), so two documents can be compared for shape.
    fn shape(v: &Value, path: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = format!("{path}.{k}");
                    out.push(p.clone());
                    shape(v, &p, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| shape(v, &format!("{path}[]"), out)),
            _ => {}
        }
        out.sort();
        out.dedup();
    }

    /// The shape, minus the keys of a tool's own input.
    fn shape_of(v: &Value) -> Vec<String> {
        let mut out = Vec::new();
        shape(v, "", &mut out);
        out.retain(|p| !p.contains(".input."));
        out
    }

    #[test]
    fn fixtures_are_valid() -> R {
        for f in [MESSAGE, MESSAGE_TOOL_USE, MESSAGE_THINKING, ERROR_400, ERROR_401, ERROR_429, ERROR_529] {
            serde_json::from_str::<Value>(f)?;
        }
        for f in [MESSAGE_STREAM, MESSAGE_TOOL_USE_STREAM, MESSAGE_THINKING_STREAM] {
            assert!(f.ends_with("\n\n"));
            let events = sse_events(f);
            assert_eq!(events.len(), f.matches("event: ").count());
            for (name, data) in events {
                let v: Value = serde_json::from_str(data)?;
                assert_eq!(v["type"], name);
            }
        }
        Templates::load()?;
        Ok(())
    }

    #[test]
    fn messages_have_the_fixture_shape() -> R {
        let t = Templates::load()?;
        for (r, fixture) in [
            (reply(false, None), MESSAGE),
            (reply(false, Some(b"\"lookup\"")), MESSAGE_TOOL_USE),
            (reply(true, None), MESSAGE_THINKING),
        ] {
            let mut out = Vec::new();
            t.render_message(&r, &mut out);
            let v: Value = serde_json::from_slice(&out)?;
            let f: Value = serde_json::from_str(fixture)?;
            assert_eq!(shape_of(&v), shape_of(&f), "{}", String::from_utf8_lossy(&out));
            assert_eq!(v["id"].as_str().map(str::len), f["id"].as_str().map(str::len));
            assert_eq!(v["model"], "claude-x");
            assert_eq!(v["usage"]["input_tokens"], 11);
            assert_eq!(v["usage"]["output_tokens"], 2);
            assert_eq!(v["stop_reason"], f["stop_reason"]);
        }
        let mut out = Vec::new();
        t.render_message(&reply(true, Some(b"\"lookup\"")), &mut out);
        let v: Value = serde_json::from_slice(&out)?;
        let types: Vec<&str> =
            v["content"].as_array().into_iter().flatten().filter_map(|b| b["type"].as_str()).collect();
        assert_eq!(types, ["thinking", "text", "tool_use"]);
        assert_eq!(v["content"][0]["thinking"], "Let me think.");
        assert_eq!(v["content"][0]["signature"], "sig_mock_7");
        assert_eq!(v["content"][1]["text"], "Let me check.");
        assert_eq!(
            v["content"][2],
            json!({"type": "tool_use", "id": "toolu_mock_7", "name": "lookup", "input": {"query": "mock"}})
        );
        Ok(())
    }

    #[test]
    fn stream_events_parse_and_pair_up() -> R {
        let t = Templates::load()?;
        let events = t.stream_events(&reply(true, Some(b"\"lookup\"")));
        let mut names = Vec::new();
        let mut partial = String::new();
        for e in &events {
            let text = std::str::from_utf8(&e.bytes)?;
            let (head, data) = text.strip_suffix("\n\n").and_then(|t| t.split_once('\n')).ok_or("framing")?;
            let name = head.strip_prefix("event: ").ok_or("event line")?;
            let v: Value = serde_json::from_str(data.strip_prefix("data: ").ok_or("data line")?)?;
            assert_eq!(v["type"], name);
            assert_eq!(e.delta, name == "content_block_delta");
            if let Some(p) = v["delta"]["partial_json"].as_str() {
                partial.push_str(p);
            }
            names.push(name.to_owned());
        }
        assert_eq!(names.first().map(String::as_str), Some("message_start"));
        assert_eq!(names.get(2).map(String::as_str), Some("ping"));
        assert_eq!(names.iter().filter(|n| *n == "ping").count(), 1);
        assert_eq!(names.iter().filter(|n| *n == "content_block_start").count(), 3);
        assert_eq!(names.iter().filter(|n| *n == "content_block_stop").count(), 3);
        assert_eq!(serde_json::from_str::<Value>(&partial)?, json!({"query": "mock"}));
        Ok(())
    }

    #[test]
    fn errors_have_the_fixture_shape() -> R {
        let t = Templates::load()?;
        let fixture: Value = serde_json::from_str(ERROR_529)?;
        for (status, ty) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (503, "api_error"),
            (529, "overloaded_error"),
        ] {
            for msg in ["", "custom \"quoted\""] {
                let mut out = Vec::new();
                t.render_error(status, msg, 3, &mut out);
                let v: Value = serde_json::from_slice(&out)?;
                assert_eq!(shape_of(&v), shape_of(&fixture));
                assert_eq!(v["type"], "error");
                assert_eq!(v["error"]["type"], ty);
                assert_eq!(v["request_id"], "req_011mock00000000000000003");
                if !msg.is_empty() {
                    assert_eq!(v["error"]["message"], msg);
                }
            }
        }
        let mut out = Vec::new();
        t.render_error(529, "", 3, &mut out);
        assert_eq!(serde_json::from_slice::<Value>(&out)?["error"]["message"], "Overloaded");
        Ok(())
    }
}
