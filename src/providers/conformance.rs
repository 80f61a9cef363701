//! Conformance: one set of cases run for every client surface × provider pair.
//!
//! Responses: every provider fixture (recorded in the provider's published wire format) is
//! decoded and re-encoded for both client surfaces; the client's bytes are read back by a
//! small reader written from the client's own format (not by our decoders), and must carry
//! the same text, tool calls, stop reason and usage as the provider sent. Stream fixtures
//! are re-run with the upstream bytes split at every offset, and the client stream must be
//! well-formed (Anthropic: `event:` lines, blocks 0,1,2… started before their deltas,
//! input tokens in `message_delta`; OpenAI: one finish chunk, a usage chunk only when asked
//! for, `[DONE]`). Upstream in-stream errors must end the client stream with its own error
//! event. Requests: the same conversation sent from either surface must reach each
//! provider as the same body, carrying what the case is about.

use serde_json::{json, Value};

use super::registry::framer_for as framer;
use crate::error::Surface;
use crate::wire::canonical::*;
use crate::wire::*;

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What a response says, independent of wire format.
#[derive(Debug, Default, PartialEq, Clone)]
struct Summary {
    text: String,
    thinking: String,
    /// (name, parsed arguments), in order.
    calls: Vec<(String, Value)>,
    /// The stop reason as the client's format spells it.
    stop: String,
    usage: Usage,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    Text,
    Tools,
    Thinking,
    Error,
}

/// Provider fixtures: (format, case, plain response file, stream file).
const RESPONSES: &[(WireFormat, Case, Option<&str>, Option<&str>)] = &[
    (
        WireFormat::OpenAi,
        Case::Text,
        Some("openai/chat_completion.json"),
        Some("openai/chat_completion_stream.txt"),
    ),
    (WireFormat::OpenAi, Case::Tools, None, Some("openai/chat_completion_tool_stream.txt")),
    (WireFormat::Anthropic, Case::Text, Some("anthropic/message.json"), Some("anthropic/message_stream.txt")),
    (
        WireFormat::Anthropic,
        Case::Tools,
        Some("anthropic/message_tool_use.json"),
        Some("anthropic/message_tool_use_stream.txt"),
    ),
    (
        WireFormat::Anthropic,
        Case::Thinking,
        Some("anthropic/message_thinking.json"),
        Some("anthropic/message_thinking_stream.txt"),
    ),
    (WireFormat::Gemini, Case::Text, Some("gemini/generate_content.json"), Some("gemini/stream_text.txt")),
    (
        WireFormat::Gemini,
        Case::Tools,
        Some("gemini/generate_content_tool_calls.json"),
        Some("gemini/stream_tool_calls.txt"),
    ),
    (
        WireFormat::Gemini,
        Case::Thinking,
        Some("gemini/generate_content_thinking.json"),
        Some("gemini/stream_thinking.txt"),
    ),
    (WireFormat::Gemini, Case::Error, None, Some("gemini/stream_error.txt")),
    (WireFormat::Cohere, Case::Text, Some("cohere/chat.json"), Some("cohere/chat_stream.txt")),
    (
        WireFormat::Cohere,
        Case::Tools,
        Some("cohere/chat_tool_calls.json"),
        Some("cohere/chat_tool_stream.txt"),
    ),
    (
        WireFormat::Cohere,
        Case::Thinking,
        Some("cohere/chat_thinking.json"),
        Some("cohere/chat_thinking_stream.txt"),
    ),
    (WireFormat::Cohere, Case::Error, None, Some("cohere/chat_error_stream.txt")),
    (WireFormat::Bedrock, Case::Text, Some("bedrock/converse_text.json"), Some("bedrock/stream_text.bin")),
    (
        WireFormat::Bedrock,
        Case::Tools,
        Some("bedrock/converse_tool_use.json"),
        Some("bedrock/stream_tool_use.bin"),
    ),
    (
        WireFormat::Bedrock,
        Case::Thinking,
        Some("bedrock/converse_thinking.json"),
        Some("bedrock/stream_thinking.bin"),
    ),
    (WireFormat::Bedrock, Case::Error, None, Some("bedrock/stream_error.bin")),
];

/// Provider error bodies: every one must yield a human message.
const ERRORS: &[&str] = &[
    "openai/error_400.json",
    "openai/error_429.json",
    "openai/error_500.json",
    "anthropic/error_400.json",
    "anthropic/error_529.json",
    "gemini/error_400.json",
    "gemini/error_429.json",
    "gemini/error_503.json",
    "cohere/error_400.json",
    "cohere/error_429.json",
    "cohere/error_500.json",
    "bedrock/error_400.json",
    "bedrock/error_403.json",
    "bedrock/error_429.json",
];

const SURFACES: [Surface; 2] = [Surface::OpenAi, Surface::Anthropic];

fn stop_str(client: Surface, stop: Option<StopReason>) -> String {
    let stop = stop.unwrap_or(StopReason::EndTurn);
    match client {
        Surface::OpenAi => openai::codec::finish_reason(stop).to_string(),
        Surface::Anthropic => anthropic::stop_reason_str(stop).to_string(),
    }
}

fn args(text: &str) -> Value {
    if text.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("tool arguments are not JSON ({e}): {text}"))
    }
}

/// The usage a client of this surface can see: Anthropic has no reasoning-token field, and
/// an OpenAI stream carries usage only when the client asked for it.
fn visible_usage(client: Surface, usage: Usage, usage_reported: bool) -> Usage {
    match client {
        _ if !usage_reported => Usage::default(),
        Surface::Anthropic => Usage { reasoning: 0, ..usage },
        Surface::OpenAi => Usage { cache_write: 0, ..usage },
    }
}

/// What the provider said, from the canonical response. Thinking is only visible on the
/// Anthropic surface (OpenAI chat completions has no field for it).
fn expected_plain(resp: &Response, client: Surface) -> Summary {
    let mut s = Summary {
        stop: stop_str(client, resp.stop),
        usage: visible_usage(client, resp.usage, true),
        ..Summary::default()
    };
    for p in &resp.content {
        match p {
            Part::Text { text, .. } => s.text.push_str(text),
            Part::Thinking { text, .. } if client == Surface::Anthropic => s.thinking.push_str(text),
            Part::ToolCall { name, arguments, .. } => s.calls.push((name.clone(), args(arguments))),
            _ => {}
        }
    }
    s
}

/// The same from a delta sequence. Returns the summary and whether it ended in an error.
fn expected_stream(deltas: &[Delta], client: Surface, usage_reported: bool) -> (Summary, bool) {
    let mut s = Summary::default();
    let mut stop = None;
    let mut raw_args: Vec<String> = Vec::new();
    let mut errored = false;
    for d in deltas {
        match d {
            Delta::Text(t) => s.text.push_str(t),
            Delta::Thinking(t) if client == Surface::Anthropic => s.thinking.push_str(t),
            Delta::ToolCallStart { name, .. } => {
                s.calls.push((name.clone(), Value::Null));
                raw_args.push(String::new());
            }
            Delta::ToolArgs { call, json } => raw_args[*call].push_str(json),
            Delta::Stop(r) => stop = Some(*r),
            Delta::Usage(u) => s.usage.merge(*u),
            Delta::Error { .. } => errored = true,
            _ => {}
        }
    }
    for (call, a) in s.calls.iter_mut().zip(&raw_args) {
        call.1 = args(a);
    }
    s.stop = stop_str(client, stop);
    s.usage = visible_usage(client, s.usage, usage_reported);
    (s, errored)
}

/// Reads an OpenAI chat completion as a client would.
fn read_openai_plain(v: &Value) -> Summary {
    let choice = &v["choices"][0];
    let msg = &choice["message"];
    let u = &v["usage"];
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    Summary {
        text: msg["content"].as_str().unwrap_or_default().to_string(),
        thinking: String::new(),
        calls: msg["tool_calls"]
            .as_array()
            .map(|calls| {
                calls
                    .iter()
                    .map(|c| {
                        assert_eq!(c["type"], "function");
                        assert!(c["id"].as_str().is_some_and(|id| !id.is_empty()), "tool call id: {c}");
                        (
                            c["function"]["name"].as_str().unwrap().to_string(),
                            args(c["function"]["arguments"].as_str().unwrap()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        stop: choice["finish_reason"].as_str().unwrap().to_string(),
        usage: Usage {
            input: n("/prompt_tokens"),
            output: n("/completion_tokens"),
            cache_read: n("/prompt_tokens_details/cached_tokens"),
            cache_write: 0,
            reasoning: n("/completion_tokens_details/reasoning_tokens"),
        },
    }
}

fn anthropic_usage(u: &Value) -> Usage {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let (cache_read, cache_write) = (n("cache_read_input_tokens"), n("cache_creation_input_tokens"));
    Usage {
        input: n("input_tokens") + cache_read + cache_write,
        output: n("output_tokens"),
        cache_read,
        cache_write,
        reasoning: 0,
    }
}

/// Reads an Anthropic message as a client would.
fn read_anthropic_plain(v: &Value) -> Summary {
    assert_eq!((v["type"].as_str(), v["role"].as_str()), (Some("message"), Some("assistant")), "{v}");
    let mut s = Summary {
        stop: v["stop_reason"].as_str().unwrap().to_string(),
        usage: anthropic_usage(&v["usage"]),
        ..Summary::default()
    };
    for b in v["content"].as_array().unwrap() {
        match b["type"].as_str().unwrap() {
            "text" => s.text.push_str(b["text"].as_str().unwrap()),
            "thinking" => s.thinking.push_str(b["thinking"].as_str().unwrap()),
            "tool_use" => {
                assert!(b["id"].as_str().is_some_and(|id| !id.is_empty()), "tool_use id: {b}");
                s.calls.push((b["name"].as_str().unwrap().to_string(), b["input"].clone()));
            }
            "redacted_thinking" => {}
            other => panic!("unexpected block type {other}"),
        }
    }
    s
}

/// Splits SSE text into (event name, data) without our parser.
fn sse(bytes: &[u8]) -> Vec<(String, String)> {
    let text = std::str::from_utf8(bytes).expect("client stream is UTF-8");
    assert!(text.is_empty() || text.ends_with("\n\n"), "stream ends on an event boundary");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.split('\n') {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d.to_string();
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (name, data)
        })
        .collect()
}

/// Reads an OpenAI chat.completion.chunk stream as a client would, checking its shape.
/// Returns the summary and whether it carried an error event.
fn read_openai_stream(bytes: &[u8], wants_usage: bool) -> (Summary, bool) {
    let events = sse(bytes);
    let mut s = Summary::default();
    let mut raw_args: Vec<String> = Vec::new();
    let mut finish_chunks = 0;
    let mut usage_chunks = 0;
    for (i, (name, data)) in events.iter().enumerate() {
        assert!(name.is_empty(), "OpenAI streams have no event names");
        if data == "[DONE]" {
            assert_eq!(i, events.len() - 1, "[DONE] is last");
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v.get("error").is_some() {
            assert_eq!(i, events.len() - 1, "the error event ends the stream");
            assert!(v["error"]["message"].is_string());
            return (s, true);
        }
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            usage_chunks += 1;
            assert_eq!(v["choices"], json!([]), "the usage chunk has no choices");
            s.usage =
                read_openai_plain(&json!({"choices": [{"message": {}, "finish_reason": ""}], "usage": u}))
                    .usage;
            continue;
        }
        let choice = &v["choices"][0];
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str() {
            s.text.push_str(t);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap() as usize;
            if let Some(name) = call["function"]["name"].as_str() {
                assert_eq!(index, s.calls.len(), "tool calls are numbered 0, 1, 2…");
                assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()));
                s.calls.push((name.to_string(), Value::Null));
                raw_args.push(String::new());
            }
            if let Some(a) = call["function"]["arguments"].as_str() {
                raw_args[index].push_str(a);
            }
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            finish_chunks += 1;
            s.stop = r.to_string();
        }
    }
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
    assert_eq!(finish_chunks, 1, "exactly one finish_reason");
    assert_eq!(usage_chunks, usize::from(wants_usage), "usage chunk only when asked for");
    for (call, a) in s.calls.iter_mut().zip(&raw_args) {
        call.1 = args(a);
    }
    (s, false)
}

/// Reads an Anthropic message stream as a client would, checking its event grammar.
fn read_anthropic_stream(bytes: &[u8]) -> (Summary, bool) {
    let events = sse(bytes);
    let mut s = Summary::default();
    let mut open: Option<(u64, String)> = None;
    let mut next_index = 0u64;
    let mut tool_json: Vec<String> = Vec::new();
    let mut stage = 0; // 0 before message_start, 1 in content, 2 after message_delta
    for (i, (name, data)) in events.iter().enumerate() {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"].as_str(), Some(name.as_str()), "event: line matches the data type");
        match name.as_str() {
            "message_start" => {
                assert_eq!(stage, 0);
                stage = 1;
                s.usage = anthropic_usage(&v["message"]["usage"]);
            }
            "content_block_start" => {
                assert_eq!(stage, 1);
                assert!(open.is_none(), "previous block stopped first");
                let index = v["index"].as_u64().unwrap();
                assert_eq!(index, next_index, "blocks are numbered 0, 1, 2…");
                next_index += 1;
                let b = &v["content_block"];
                let kind = b["type"].as_str().unwrap().to_string();
                match kind.as_str() {
                    "text" => s.text.push_str(b["text"].as_str().unwrap()),
                    "thinking" => s.thinking.push_str(b["thinking"].as_str().unwrap()),
                    "tool_use" => {
                        assert!(b["id"].as_str().is_some_and(|id| !id.is_empty()));
                        s.calls.push((b["name"].as_str().unwrap().to_string(), Value::Null));
                        tool_json.push(String::new());
                    }
                    _ => {}
                }
                open = Some((index, kind));
            }
            "content_block_delta" => {
                let (index, kind) = open.clone().expect("delta inside a started block");
                assert_eq!(v["index"].as_u64(), Some(index));
                let d = &v["delta"];
                match (kind.as_str(), d["type"].as_str().unwrap()) {
                    ("text", "text_delta") => s.text.push_str(d["text"].as_str().unwrap()),
                    ("thinking", "thinking_delta") => s.thinking.push_str(d["thinking"].as_str().unwrap()),
                    ("thinking", "signature_delta") => {}
                    ("tool_use", "input_json_delta") => {
                        tool_json.last_mut().unwrap().push_str(d["partial_json"].as_str().unwrap())
                    }
                    (k, t) => panic!("delta {t} inside a {k} block"),
                }
            }
            "content_block_stop" => {
                let (index, _) = open.take().expect("stop of a started block");
                assert_eq!(v["index"].as_u64(), Some(index));
            }
            "message_delta" => {
                assert!(open.is_none(), "blocks closed before message_delta");
                assert_eq!(stage, 1);
                stage = 2;
                s.stop = v["delta"]["stop_reason"].as_str().unwrap().to_string();
                let u = anthropic_usage(&v["usage"]);
                assert!(v["usage"]["input_tokens"].is_u64(), "input tokens reported in message_delta");
                s.usage.merge(u);
            }
            "message_stop" => {
                assert_eq!(stage, 2);
                assert_eq!(i, events.len() - 1, "message_stop is last");
            }
            "ping" => {}
            "error" => {
                assert_eq!(i, events.len() - 1, "the error event ends the stream");
                assert!(v["error"]["message"].is_string());
                return (s, true);
            }
            other => panic!("unknown event {other}"),
        }
    }
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("message_stop"));
    for (call, a) in s.calls.iter_mut().zip(&tool_json) {
        call.1 = args(a);
    }
    (s, false)
}

/// Provider deltas of a whole stream fixture, read in one piece.
fn provider_deltas(format: WireFormat, bytes: &[u8]) -> Vec<Delta> {
    let mut events = Vec::new();
    let mut f = framer(format);
    f.feed(bytes, &mut events).unwrap();
    f.finish(&mut events).unwrap();
    let mut out = Vec::new();
    let res = match format {
        WireFormat::OpenAi => openai::codec::StreamDecoder::default().decode(&mut events, &mut out),
        WireFormat::Anthropic => anthropic::StreamDecoder::default().decode(&mut events, &mut out),
        WireFormat::Gemini => {
            let mut d = gemini::StreamDecoder::default();
            d.decode(&mut events, &mut out).and_then(|()| d.finish(&mut out))
        }
        WireFormat::Cohere => {
            let mut d = cohere::StreamDecoder::default();
            d.decode(&mut events, &mut out).and_then(|()| d.finish(&mut out))
        }
        WireFormat::Bedrock => {
            let mut d = bedrock::StreamDecoder::default();
            d.decode(&mut events, &mut out).and_then(|()| d.finish(&mut out))
        }
    };
    res.unwrap();
    out
}

/// What each case must at least contain, so a decoder that drops everything cannot pass.
fn check_case(case: Case, s: &Summary, errored: bool, client: Surface, usage_reported: bool, what: &str) {
    match case {
        Case::Text => assert!(!s.text.is_empty() && !errored, "{what}: text"),
        Case::Tools => {
            assert!(!s.calls.is_empty() && !errored, "{what}: tool calls");
            assert!(s.calls.iter().all(|(n, a)| !n.is_empty() && a.is_object()), "{what}: {:?}", s.calls);
        }
        Case::Thinking if client == Surface::Anthropic => assert!(!s.thinking.is_empty(), "{what}: thinking"),
        Case::Thinking => {}
        Case::Error => assert!(errored, "{what}: in-stream error reaches the client"),
    }
    if case != Case::Error && usage_reported {
        assert!(s.usage.input > 0 && s.usage.output > 0, "{what}: usage {:?}", s.usage);
    }
}

#[test]
fn every_provider_response_reaches_every_client_surface() {
    let mut checked = 0;
    for &(format, case, plain, _) in RESPONSES {
        let Some(file) = plain else { continue };
        let resp = decode_response(format, &fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for client in SURFACES {
            let what = format!("{file} → {client:?}");
            let body: Value = serde_json::from_slice(&encode_response(client, &resp)).unwrap();
            let got = match client {
                Surface::OpenAi => read_openai_plain(&body),
                Surface::Anthropic => read_anthropic_plain(&body),
            };
            assert_eq!(got, expected_plain(&resp, client), "{what}");
            check_case(case, &got, false, client, true, &what);
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * RESPONSES.iter().filter(|r| r.2.is_some()).count());
}

#[test]
fn every_provider_stream_reaches_every_client_surface_at_every_split() {
    for &(format, case, _, stream) in RESPONSES {
        let Some(file) = stream else { continue };
        let bytes = fixture(file);
        let deltas = provider_deltas(format, &bytes);
        for client in SURFACES {
            for wants_usage in [false, true] {
                if client == Surface::Anthropic && wants_usage {
                    continue; // the flag only exists on the OpenAI surface
                }
                let what = format!("{file} → {client:?} (usage chunk: {wants_usage})");
                let (expected, expected_error) =
                    expected_stream(&deltas, client, client == Surface::Anthropic || wants_usage);
                let mut reference: Option<Vec<u8>> = None;
                for split in 0..=bytes.len() {
                    let mut t = Transcoder::new(framer(format), format, client, "m", wants_usage);
                    let mut out = Vec::new();
                    t.feed(&bytes[..split], &mut out).unwrap();
                    t.feed(&bytes[split..], &mut out).unwrap();
                    t.finish(&mut out).unwrap_or_else(|e| panic!("{what} split {split}: {e}"));
                    let out = strip_created(&out);
                    match &reference {
                        None => {
                            let (got, errored) = match client {
                                Surface::OpenAi => read_openai_stream(&out, wants_usage),
                                Surface::Anthropic => read_anthropic_stream(&out),
                            };
                            assert_eq!(errored, expected_error, "{what}");
                            if !errored {
                                assert_eq!(got, expected, "{what}");
                            }
                            check_case(
                                case,
                                &got,
                                errored,
                                client,
                                client == Surface::Anthropic || wants_usage,
                                &what,
                            );
                            reference = Some(out);
                        }
                        Some(r) => assert!(*r == out, "{what}: output differs when split at {split}"),
                    }
                }
            }
        }
    }
}

/// Wall-clock `created` stamps and message ids the gateway generates (for providers that
/// send none) differ between runs; blank them before comparing bytes.
fn strip_created(out: &[u8]) -> Vec<u8> {
    let mut text = String::from_utf8(out.to_vec()).unwrap();
    let digits: fn(char) -> bool = |c| c.is_ascii_digit();
    let alnum: fn(char) -> bool = |c| c.is_ascii_alphanumeric();
    for (key, keep) in [("\"created\":", digits), ("\"id\":\"msg_", alnum), ("\"id\":\"chatcmpl-", alnum)] {
        let mut result = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(i) = rest.find(key) {
            result.push_str(&rest[..i + key.len()]);
            rest = rest[i + key.len()..].trim_start_matches(keep);
            result.push('0');
        }
        result.push_str(rest);
        text = result;
    }
    text.into_bytes()
}

#[test]
fn every_provider_error_body_yields_a_message() {
    for file in ERRORS {
        let body = fixture(file);
        let format = match file.split('/').next().unwrap() {
            "openai" => WireFormat::OpenAi,
            "anthropic" => WireFormat::Anthropic,
            "gemini" => WireFormat::Gemini,
            "cohere" => WireFormat::Cohere,
            _ => WireFormat::Bedrock,
        };
        let message = error_message(format, &body);
        assert!(message.is_some_and(|m| !m.is_empty()), "{file}");
    }
}

/// A tiny PNG, sent as base64 from both surfaces.
const PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// One conversation per case, as each client surface would send it. Both must decode to
/// requests every provider receives identically.
fn request_cases() -> Vec<(&'static str, Value, Value, &'static [&'static str])> {
    let png = PNG;
    let tools_openai = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    ]);
    let tools_anthropic = json!([
        {"name": "get_weather", "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        {"name": "get_time", "description": "Local time",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    ]);
    vec![
        (
            "text",
            json!({"model": "x", "max_tokens": 100, "messages": [{"role": "user", "content": "Say hello to Paris"}]}),
            json!({"model": "x", "max_tokens": 100, "messages": [{"role": "user", "content": "Say hello to Paris"}]}),
            &["Say hello to Paris"],
        ),
        (
            "system",
            json!({"model": "x", "max_tokens": 100, "messages": [
                {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]}),
            json!({"model": "x", "max_tokens": 100, "system": "You are terse.", "messages": [{"role": "user", "content": "Hi"}]}),
            &["You are terse.", "Hi"],
        ),
        (
            "multi-turn",
            json!({"model": "x", "max_tokens": 100, "temperature": 0.5, "stop": ["END"], "messages": [
                {"role": "user", "content": "Pick a number"}, {"role": "assistant", "content": "Seven"},
                {"role": "user", "content": "Double it"}]}),
            json!({"model": "x", "max_tokens": 100, "temperature": 0.5, "stop_sequences": ["END"], "messages": [
                {"role": "user", "content": "Pick a number"}, {"role": "assistant", "content": "Seven"},
                {"role": "user", "content": "Double it"}]}),
            &["Pick a number", "Seven", "Double it", "END"],
        ),
        (
            "image",
            json!({"model": "x", "max_tokens": 100, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}]}]}),
            json!({"model": "x", "max_tokens": 100, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]}]}),
            &["What is this?", PNG],
        ),
        (
            "parallel tools",
            json!({"model": "x", "max_tokens": 100, "tools": tools_openai, "tool_choice": "auto", "messages": [
                {"role": "user", "content": "Weather and time in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_a", "content": "18C and sunny"},
                {"role": "tool", "tool_call_id": "call_b", "content": "10:00"}]}),
            json!({"model": "x", "max_tokens": 100, "tools": tools_anthropic, "tool_choice": {"type": "auto"}, "messages": [
                {"role": "user", "content": "Weather and time in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_a", "content": "18C and sunny"},
                    {"type": "tool_result", "tool_use_id": "call_b", "content": "10:00"}]}]}),
            &["get_weather", "get_time", "Weather for a city", "18C and sunny", "10:00"],
        ),
    ]
}

#[test]
fn the_same_conversation_from_either_surface_reaches_every_provider_identically() {
    for (name, openai_body, anthropic_body, must_contain) in request_cases() {
        let from_openai =
            decode_request(Surface::OpenAi, &serde_json::to_vec(&openai_body).unwrap()).unwrap();
        let from_anthropic =
            decode_request(Surface::Anthropic, &serde_json::to_vec(&anthropic_body).unwrap()).unwrap();
        for format in WireFormat::ALL {
            let what = format!("{name} → {format:?}");
            let a = encode_request(format, &from_openai, "target-model")
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            let b = encode_request(format, &from_anthropic, "target-model").unwrap();
            let (a, b): (Value, Value) =
                (serde_json::from_slice(&a).unwrap(), serde_json::from_slice(&b).unwrap());
            assert_eq!(a, b, "{what}: both surfaces give the provider the same body");
            let text = a.to_string();
            for needle in must_contain {
                assert!(text.contains(needle), "{what}: {needle:?} missing from {text}");
            }
        }
    }
}

#[test]
fn thinking_requests_reach_providers_that_support_it() {
    let body = json!({"model": "x", "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Think first"}]});
    let req = decode_request(Surface::Anthropic, &serde_json::to_vec(&body).unwrap()).unwrap();
    assert_eq!(req.thinking_budget, Some(1024));
    for (format, pointer) in [
        (WireFormat::Anthropic, "/thinking/budget_tokens"),
        (WireFormat::Gemini, "/generationConfig/thinkingConfig/thinkingBudget"),
        (WireFormat::Cohere, "/thinking/token_budget"),
        (WireFormat::Bedrock, "/additionalModelRequestFields/thinking/budget_tokens"),
    ] {
        let v: Value = serde_json::from_slice(&encode_request(format, &req, "m").unwrap()).unwrap();
        assert_eq!(v.pointer(pointer), Some(&json!(1024)), "{format:?}: {v}");
    }
}

#[test]
fn openai_only_fields_reach_only_openai_family_targets() {
    let body = json!({"model": "x", "max_tokens": 10, "seed": 7, "logprobs": true, "top_logprobs": 2,
        "response_format": {"type": "json_object"}, "parallel_tool_calls": false,
        "messages": [{"role": "user", "content": "hi"}]});
    let req = decode_request(Surface::OpenAi, &serde_json::to_vec(&body).unwrap()).unwrap();
    for format in WireFormat::ALL {
        let text = String::from_utf8(encode_request(format, &req, "m").unwrap()).unwrap();
        let present = ["\"seed\"", "\"logprobs\"", "\"top_logprobs\"", "\"response_format\""]
            .iter()
            .filter(|k| text.contains(*k))
            .count();
        let expected = if format == WireFormat::OpenAi { 4 } else { 0 };
        assert_eq!(present, expected, "{format:?}: {text}");
    }
}

#[test]
fn signatures_only_go_back_to_the_provider_that_issued_them() {
    let turn = |signature: &str| Message {
        role: Role::Assistant,
        content: vec![
            Part::Thinking { text: "plan".into(), signature: Some(signature.into()) },
            Part::Text { text: "answer".into(), cache_control: None },
        ],
    };
    let user =
        Message { role: Role::User, content: vec![Part::Text { text: "go on".into(), cache_control: None }] };
    let mut req = decode_request(
        Surface::OpenAi,
        br#"{"model":"x","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    req.messages.push(turn("gemini:R0VNSU5J"));
    req.messages.push(user.clone());
    req.messages.push(turn("Q0xBVURF"));
    req.messages.push(user);
    for format in [WireFormat::Anthropic, WireFormat::Bedrock] {
        let body = String::from_utf8(encode_request(format, &req, "m").unwrap()).unwrap();
        assert!(!body.contains("gemini:") && !body.contains("R0VNSU5J"), "{format:?}: {body}");
        assert!(body.contains("Q0xBVURF"), "{format:?} keeps Claude's own signature: {body}");
    }
    let body = String::from_utf8(encode_request(WireFormat::Gemini, &req, "m").unwrap()).unwrap();
    assert!(body.contains("R0VNSU5J") && !body.contains("Q0xBVURF"), "Gemini: {body}");
}
