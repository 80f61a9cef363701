//! OpenAI additions for the mock upstream: `POST /v1/embeddings` and the
//! weather tool call of chat completions. Both are also what Azure OpenAI's
//! deployment routes answer.
//!
//! A tool call is cut from the same fixture templates as a text answer, with
//! the `message` (or stream `delta`) and `finish_reason` values swapped, so
//! everything around them stays in the recorded shape.

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use crate::answer::{self, compact, obj, pretty, Answer, Event, IntoJ, Obj, J};
use crate::template::{value_range, Templates, Vals};

#[derive(Deserialize)]
struct ToolRequest {
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Vec<ChatTool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct ChatTool {
    #[serde(default)]
    function: Option<Function>,
}

#[derive(Deserialize)]
struct Function {
    name: String,
}

/// The function to call when the body declares tools and its last message is
/// a user turn mentioning the weather (a tool result as the last message
/// gets a text answer, so a round trip ends).
pub(crate) fn weather_tool(body: &[u8]) -> Option<String> {
    let req: ToolRequest = serde_json::from_slice(body).ok()?;
    let name = req.tools.into_iter().find_map(|t| t.function)?.name;
    let last = req.messages.last()?;
    (last.role == "user" && answer::mentions_weather(&answer::content_text(&last.content))).then_some(name)
}

/// Replaces the value of the first `"key":` in `json`.
fn splice(json: &[u8], key: &str, value: &[u8]) -> Vec<u8> {
    let range = std::str::from_utf8(json).ok().and_then(|s| value_range(s, key));
    match range {
        Some((a, b)) => [&json[..a], value, &json[b..]].concat(),
        None => json.to_vec(),
    }
}

fn call_id(seq: u64) -> String {
    // Same length as real ids (call_ + 24).
    format!("call_mock{seq:020}")
}

/// A tool-call answer to a chat completion: `usage` None for a plain
/// response, else a stream with or without the usage chunk. `vals` must
/// already hold the request's id, model and token counts.
pub(crate) fn tool_answer(tpl: &Templates, vals: &mut Vals<'_>, usage: Option<bool>, name: &str) -> Answer {
    let id = call_id(vals.seq);
    let null = || J::V(Value::Null);
    let Some(usage) = usage else {
        let message = obj! {
            "role": "assistant",
            "content": null(),
            "tool_calls": vec![obj! {
                "id": &id,
                "type": "function",
                "function": obj! {"name": name, "arguments": answer::WEATHER_ARGS},
            }],
            "refusal": null(),
            "annotations": J::A(Vec::new()),
        };
        let mut body = Vec::with_capacity(1024);
        tpl.completion.render(vals, &mut body);
        let body = splice(&body, "message", &compact(&message));
        return Answer::json(200, splice(&body, "finish_reason", b"\"tool_calls\""));
    };
    let s = &tpl.stream;
    let (role, content, finish) =
        if usage { (&s.role, &s.content, &s.finish) } else { (&s.role_nu, &s.content_nu, &s.finish_nu) };
    let event = |chunk: Vec<u8>, delta: bool| {
        let mut bytes = Vec::with_capacity(chunk.len() + 8);
        bytes.extend_from_slice(b"data: ");
        bytes.extend_from_slice(&chunk);
        bytes.extend_from_slice(b"\n\n");
        Event { bytes, delta }
    };
    let mut events = Vec::with_capacity(5);
    let mut chunk = Vec::with_capacity(512);
    vals.content_json = b"\"\"";
    role.render(vals, &mut chunk);
    let start = obj! {
        "role": "assistant",
        "content": null(),
        "tool_calls": vec![obj! {
            "index": 0u64,
            "id": &id,
            "type": "function",
            "function": obj! {"name": name, "arguments": ""},
        }],
        "refusal": null(),
    };
    events.push(event(splice(&chunk, "delta", &compact(&start)), false));
    for piece in answer::WEATHER_ARG_PIECES {
        chunk.clear();
        content.render(vals, &mut chunk);
        let delta = obj! {"tool_calls": vec![obj! {"index": 0u64, "function": obj! {"arguments": piece}}]};
        events.push(event(splice(&chunk, "delta", &compact(&delta)), true));
    }
    chunk.clear();
    finish.render(vals, &mut chunk);
    events.push(event(splice(&chunk, "finish_reason", b"\"tool_calls\""), false));
    if usage {
        chunk.clear();
        s.usage.render(vals, &mut chunk);
        events.push(event(std::mem::take(&mut chunk), false));
    }
    Answer::Stream { content_type: "text/event-stream; charset=utf-8", events, trailer: b"data: [DONE]\n\n" }
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<i64>,
}

/// One input: its embedding seed and its token count.
struct Input {
    seed: Vec<u8>,
    tokens: u64,
}

fn inputs(input: &Value) -> Option<Vec<Input>> {
    let text = |s: &str| Input { seed: s.as_bytes().to_vec(), tokens: answer::input_tokens(s.as_bytes()) };
    let token_array = |a: &[Value]| {
        a.iter().all(Value::is_u64).then(|| Input { seed: compact(&a), tokens: a.len() as u64 })
    };
    match input {
        Value::String(s) if !s.is_empty() => Some(vec![text(s)]),
        Value::Array(items) if !items.is_empty() => {
            if items.iter().all(Value::is_u64) {
                return token_array(items).map(|i| vec![i]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) if !s.is_empty() => Some(text(s)),
                    Value::Array(a) if !a.is_empty() => token_array(a),
                    _ => None,
                })
                .collect()
        }
        _ => None,
    }
}

/// `POST /v1/embeddings`; `deployment` names the model on Azure's route.
pub(crate) fn embeddings(body: &[u8], deployment: Option<&str>) -> Answer {
    let bad = |msg: &str| Answer::json(400, crate::mock::error_body(400, msg).into_owned());
    let req: EmbeddingsRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(_) => return Answer::json(400, crate::mock::error_body(400, "").into_owned()),
    };
    let Some(model) = deployment.map(str::to_owned).or(req.model) else {
        return bad("you must provide a model parameter");
    };
    let Some(input) = req.input else {
        return bad("'input' is a required property");
    };
    let Some(inputs) = inputs(&input) else {
        return bad("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.");
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return bad(&format!(
                "Invalid value for 'encoding_format': '{other}'. Supported values are: 'float' and 'base64'."
            ))
        }
    };
    let native = if model.contains("3-large") { 3072 } else { 1536 };
    let dims = match req.dimensions {
        None => native,
        Some(_) if model.contains("ada-002") => {
            return bad("This model does not support specifying dimensions.")
        }
        Some(d) if (1..=native as i64).contains(&d) => usize::try_from(d).unwrap_or(native),
        Some(d) => {
            return bad(&format!("Invalid value for 'dimensions' = {d}. Must be between 1 and {native}."))
        }
    };
    let data: Vec<Obj> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let v =
                answer::chosen_vector(&input.seed).unwrap_or_else(|| answer::embedding(&input.seed, dims));
            let embedding = if base64 {
                // Little-endian f32s, as OpenAI encodes them.
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                base64::engine::general_purpose::STANDARD.encode(bytes).into_j()
            } else {
                v.into_j()
            };
            obj! {"object": "embedding", "index": i as u64, "embedding": embedding}
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|i| i.tokens).sum();
    let out = obj! {
        "object": "list",
        "data": data,
        "model": model,
        "usage": obj! {"prompt_tokens": tokens, "total_tokens": tokens},
    };
    Answer::json(200, pretty(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weather_tool_needs_tools_and_a_weather_user_turn() {
        let body = |messages: Value, tools: Value| {
            serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages, "tools": tools}))
                .unwrap_or_default()
        };
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let ask = serde_json::json!([{"role": "user", "content": "What is the weather?"}]);
        assert_eq!(weather_tool(&body(ask.clone(), tools.clone())).as_deref(), Some("get_weather"));
        assert_eq!(weather_tool(&body(ask.clone(), serde_json::json!([]))), None);
        let parts =
            serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "Weather in Paris"}]}]);
        assert!(weather_tool(&body(parts, tools.clone())).is_some());
        let answered = serde_json::json!([
            {"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "tool_calls": []},
            {"role": "tool", "tool_call_id": "c", "content": "sunny"},
        ]);
        assert_eq!(weather_tool(&body(answered, tools.clone())), None);
        let hello = serde_json::json!([{"role": "user", "content": "Say hello"}]);
        assert_eq!(weather_tool(&body(hello, tools)), None);
    }

    #[test]
    fn splice_replaces_the_first_value() {
        assert_eq!(splice(br#"{"a":{"b":1},"c":"x"}"#, "a", b"2"), br#"{"a":2,"c":"x"}"#);
        assert_eq!(splice(br#"{"a":1}"#, "z", b"2"), br#"{"a":1}"#);
    }
}
