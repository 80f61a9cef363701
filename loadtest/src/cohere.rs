//! Cohere API v2 for the mock upstream: `POST /v2/chat` (JSON, or with
//! `"stream": true` SSE events `message-start`, `content-start`,
//! `content-delta`…, `content-end`, `message-end`, then `data: [DONE]`) and
//! `POST /v2/embed`. Errors are `{"message": "..."}`.

use serde::Deserialize;
use serde_json::Value;

use crate::answer::{self, compact, obj, Answer, Ctx, Event, Obj, J};

/// Vector length when a request names no `output_dimension`.
pub(crate) const DEFAULT_DIMENSIONS: usize = 1024;
const MAX_DIMENSIONS: i64 = 4096;
/// Tokens Cohere counts for its own preamble: `usage.tokens.input_tokens`
/// exceeds `usage.billed_units.input_tokens` by this much.
pub(crate) const PREAMBLE_TOKENS: u64 = 64;
const TOOL_PLAN: &str = "I will look up the weather in Paris.";

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    max_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct Tool {
    #[serde(default)]
    function: Option<Function>,
}

#[derive(Deserialize)]
struct Function {
    name: String,
}

fn usage(input: u64, output: u64) -> Obj {
    obj! {
        "billed_units": obj! {"input_tokens": input, "output_tokens": output},
        "tokens": obj! {"input_tokens": input + PREAMBLE_TOKENS, "output_tokens": output},
    }
}

fn tool_call(id: &str, name: &str, arguments: &str) -> Obj {
    obj! {"id": id, "type": "function", "function": obj! {"name": name, "arguments": arguments}}
}

/// `POST /v2/chat`.
pub(crate) fn chat(ctx: &Ctx<'_>, body: &[u8]) -> Answer {
    let req: ChatRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(400, &format!("invalid request: could not parse request body: {e}")),
    };
    if req.model.as_deref().is_none_or(str::is_empty) {
        return error(400, "invalid request: model must be specified");
    }
    let Some(messages) = req.messages else {
        return error(400, "invalid request: messages must be specified");
    };
    let function = req.tools.iter().flatten().find_map(|t| t.function.as_ref());
    // A tool result as the last turn is answered with text, so a round trip ends.
    let call = function.filter(|_| {
        messages
            .last()
            .is_some_and(|m| m.role == "user" && answer::mentions_weather(&answer::content_text(&m.content)))
    });
    let n = ctx.token_count(req.max_tokens);
    let id = answer::uuid(ctx.seq);
    let input = answer::input_tokens(body);
    let call = call.map(|f| (f.name.as_str(), format!("{}_mock{:08x}", f.name, ctx.seq)));
    let (finish, output) = match call {
        Some(_) => ("TOOL_CALL", answer::TOOL_CALL_TOKENS),
        None if n < ctx.cfg.tokens => ("MAX_TOKENS", n as u64),
        None => ("COMPLETE", n as u64),
    };
    if req.stream != Some(true) {
        let message = match &call {
            Some((name, call_id)) => obj! {
                "role": "assistant",
                "tool_plan": TOOL_PLAN,
                "tool_calls": vec![tool_call(call_id, name, answer::WEATHER_ARGS)],
            },
            None => obj! {
                "role": "assistant",
                "content": vec![obj! {"type": "text", "text": answer::text(n)}],
            },
        };
        let out =
            obj! {"id": &id, "message": message, "finish_reason": finish, "usage": usage(input, output)};
        return Answer::json(200, compact(&out));
    }
    let mut events = Vec::with_capacity(n + 6);
    let mut push = |name: &str, data: Obj, delta: bool| {
        let mut bytes = Vec::with_capacity(160);
        bytes.extend_from_slice(b"event: ");
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(b"\ndata: ");
        bytes.extend_from_slice(&compact(&data));
        bytes.extend_from_slice(b"\n\n");
        events.push(Event { bytes, delta });
    };
    let empty = || J::A(Vec::new());
    push(
        "message-start",
        obj! {
            "id": &id,
            "type": "message-start",
            "delta": obj! {"message": obj! {
                "role": "assistant", "content": empty(), "tool_plan": "", "tool_calls": empty(), "citations": empty(),
            }},
        },
        false,
    );
    match &call {
        Some((name, call_id)) => {
            push(
                "tool-plan-delta",
                obj! {"type": "tool-plan-delta", "delta": obj! {"message": obj! {"tool_plan": TOOL_PLAN}}},
                true,
            );
            push(
                "tool-call-start",
                obj! {
                    "type": "tool-call-start",
                    "index": 0u64,
                    "delta": obj! {"message": obj! {"tool_calls": tool_call(call_id, name, "")}},
                },
                false,
            );
            for piece in answer::WEATHER_ARG_PIECES {
                push(
                    "tool-call-delta",
                    obj! {
                        "type": "tool-call-delta",
                        "index": 0u64,
                        "delta": obj! {"message": obj! {"tool_calls": obj! {"function": obj! {"arguments": piece}}}},
                    },
                    true,
                );
            }
            push("tool-call-end", obj! {"type": "tool-call-end", "index": 0u64}, false);
        }
        None => {
            push(
                "content-start",
                obj! {
                    "type": "content-start",
                    "index": 0u64,
                    "delta": obj! {"message": obj! {"content": obj! {"type": "text", "text": ""}}},
                },
                false,
            );
            for i in 0..n {
                push(
                    "content-delta",
                    obj! {
                        "type": "content-delta",
                        "index": 0u64,
                        "delta": obj! {"message": obj! {"content": obj! {"text": answer::token(i)}}},
                    },
                    true,
                );
            }
            push("content-end", obj! {"type": "content-end", "index": 0u64}, false);
        }
    }
    push(
        "message-end",
        obj! {"type": "message-end", "delta": obj! {"finish_reason": finish, "usage": usage(input, output)}},
        false,
    );
    Answer::Stream { content_type: "text/event-stream", events, trailer: b"data: [DONE]\n\n" }
}

#[derive(Deserialize)]
struct EmbedRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    texts: Option<Vec<String>>,
    /// `[{"content": [{"type": "text", "text": ...}]}]`.
    #[serde(default)]
    inputs: Option<Vec<Value>>,
    #[serde(default)]
    output_dimension: Option<i64>,
}

/// `POST /v2/embed`: float embeddings, whatever `embedding_types` asks for.
pub(crate) fn embed(ctx: &Ctx<'_>, body: &[u8]) -> Answer {
    let req: EmbedRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(400, &format!("invalid request: could not parse request body: {e}")),
    };
    if req.model.as_deref().is_none_or(str::is_empty) {
        return error(400, "invalid request: model must be specified");
    }
    let texts: Vec<String> = match (req.texts, req.inputs) {
        (Some(t), _) => t,
        (None, Some(inputs)) => {
            inputs.iter().map(|i| i.get("content").map(answer::content_text).unwrap_or_default()).collect()
        }
        (None, None) => {
            return error(400, "invalid request: one of texts, images or inputs must be specified")
        }
    };
    let dims = match req.output_dimension {
        None => DEFAULT_DIMENSIONS,
        Some(d) if (1..=MAX_DIMENSIONS).contains(&d) => usize::try_from(d).unwrap_or(DEFAULT_DIMENSIONS),
        Some(d) => return error(400, &format!("invalid request: output_dimension {d} is not supported")),
    };
    let vectors: Vec<Vec<f32>> = texts.iter().map(|t| answer::embedding(t.as_bytes(), dims)).collect();
    let input_tokens: u64 = texts.iter().map(|t| answer::input_tokens(t.as_bytes())).sum();
    let out = obj! {
        "id": answer::uuid(ctx.seq),
        "embeddings": obj! {"float": vectors},
        "texts": texts,
        "meta": obj! {"api_version": obj! {"version": "2"}, "billed_units": obj! {"input_tokens": input_tokens}},
        "response_type": "embeddings_by_type",
    };
    Answer::json(200, compact(&out))
}

/// The error body for `status`; an empty `message` gets a typical one.
pub(crate) fn error_body(status: u16, message: &str) -> Vec<u8> {
    let message = if message.is_empty() {
        match status {
            400 => "invalid request: the request is malformed",
            401 => "invalid api token",
            403 => "Forbidden",
            404 => "model not found, make sure the correct model ID was used and that you have access to the model.",
            429 => "You are past the per minute request limit, please wait and try again later.",
            499 => "request cancelled",
            503 => "service unavailable",
            s if s >= 500 => "internal server error, this has been reported to our developers.",
            _ => "invalid request",
        }
    } else {
        message
    };
    compact(&obj! {"message": message})
}

pub(crate) fn error(status: u16, message: &str) -> Answer {
    Answer::json(status, error_body(status, message))
}
