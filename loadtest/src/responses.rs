//! The OpenAI Responses API for the mock upstream, at `/v1/responses` (OpenAI) and
//! `/openai/v1/responses` (Azure's v1 API): create (JSON, or SSE with `stream: true`),
//! retrieve (`?stream=true` replays the events), delete, cancel (background responses)
//! and `input_items`, in the shapes of OpenAI's API reference. Responses live in the mock
//! that created them: `previous_response_id` or a retrieve naming one created elsewhere is
//! answered as OpenAI does (400 `previous_response_not_found`, 404), which is what tests of
//! a gateway's provider affinity need.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use crate::answer::{self, compact, obj, Answer, Ctx, Event, Obj, J};

/// Responses kept per mock; older ones are forgotten (as OpenAI's expire).
const MAX_STORED: usize = 10_000;

/// What a path under `…/responses` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    Get,
    Delete,
    Cancel,
    InputItems,
    NotFound,
}

impl Op {
    /// `rest`: the path after `…/responses`. Returns the op and the response id.
    pub(crate) fn from_path(method: &str, rest: &str) -> (Op, Option<String>) {
        if rest.is_empty() {
            return (if method == "POST" { Op::Create } else { Op::NotFound }, None);
        }
        let Some(rest) = rest.strip_prefix('/') else { return (Op::NotFound, None) };
        let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let op = match (method, tail) {
            ("GET", "") => Op::Get,
            ("DELETE", "") => Op::Delete,
            ("POST", "cancel") => Op::Cancel,
            ("GET", "input_items") => Op::InputItems,
            _ => Op::NotFound,
        };
        (op, Some(answer::percent_decode(id)))
    }
}

/// One stored response.
struct Stored {
    id: String,
    msg_id: String,
    created_at: u64,
    model: String,
    status: &'static str,
    background: bool,
    instructions: Value,
    max_output_tokens: Value,
    previous_response_id: Value,
    metadata: Value,
    text: String,
    input_tokens: u64,
    output_tokens: u64,
    input_items: Vec<Value>,
}

/// The responses one mock created.
pub(crate) struct Responses {
    /// Makes ids unique across mock processes (a gateway's fallback spans several).
    nonce: u64,
    /// By id, which sorts by creation (the sequence is its hex tail).
    stored: Mutex<BTreeMap<String, Stored>>,
}

impl Responses {
    pub(crate) fn new(port: u16) -> Responses {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        Responses { nonce: nanos ^ (u64::from(port) << 48), stored: Mutex::new(BTreeMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Stored>> {
        self.stored.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Deserialize)]
struct CreateRequest {
    model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    instructions: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
}

fn error(status: u16, message: &str, param: Option<&str>, code: Option<&str>) -> Answer {
    let body = obj! {
        "error": obj! {
            "message": message,
            "type": "invalid_request_error",
            "param": param.map_or(Value::Null, Value::from),
            "code": code.map_or(Value::Null, Value::from),
        },
    };
    Answer::json(status, answer::pretty(&body))
}

fn not_found(id: &str) -> Answer {
    error(404, &format!("Response with id '{id}' not found."), None, None)
}

/// Input items as the API lists them: each with an id; plain text becomes a user message.
fn input_items(input: Option<&Value>, nonce: u64, seq: u64) -> Vec<Value> {
    let message = |i: usize, role: &str, text: &str| {
        serde_json::json!({
            "id": format!("msg_{nonce:016x}{seq:024x}{i:08x}"),
            "type": "message",
            "status": "completed",
            "role": role,
            "content": [{"type": "input_text", "text": text}],
        })
    };
    match input {
        Some(Value::String(text)) => vec![message(0, "user", text)],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match (item.get("role").and_then(Value::as_str), item.get("content")) {
                (Some(role), Some(Value::String(text))) => message(i, role, text),
                _ => {
                    let mut item = item.clone();
                    if let Some(o) = item.as_object_mut() {
                        o.entry("id").or_insert_with(|| format!("msg_{nonce:016x}{seq:024x}{i:08x}").into());
                    }
                    item
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn message_item(s: &Stored, status: &str, text: Option<&str>) -> Obj {
    let content = match text {
        Some(text) => vec![obj! {
            "type": "output_text", "annotations": J::A(vec![]), "logprobs": J::A(vec![]), "text": text,
        }],
        None => Vec::new(),
    };
    obj! { "id": &s.msg_id, "type": "message", "status": status, "content": content, "role": "assistant" }
}

fn usage(s: &Stored) -> Obj {
    obj! {
        "input_tokens": s.input_tokens,
        "input_tokens_details": obj! { "cached_tokens": 0u64 },
        "output_tokens": s.output_tokens,
        "output_tokens_details": obj! { "reasoning_tokens": 0u64 },
        "total_tokens": s.input_tokens + s.output_tokens,
    }
}

/// The response object; `done`: with its output and usage (else as it starts).
fn render(s: &Stored, status: &str, done: bool) -> Obj {
    let output = if done { vec![message_item(s, "completed", Some(&s.text))] } else { Vec::new() };
    obj! {
        "id": &s.id,
        "object": "response",
        "created_at": s.created_at,
        "status": status,
        "background": s.background,
        "error": Value::Null,
        "incomplete_details": Value::Null,
        "instructions": s.instructions.clone(),
        "max_output_tokens": s.max_output_tokens.clone(),
        "max_tool_calls": Value::Null,
        "model": &s.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": s.previous_response_id.clone(),
        "reasoning": obj! { "effort": Value::Null, "summary": Value::Null },
        "service_tier": "default",
        "store": true,
        "temperature": Value::from(1.0),
        "text": obj! { "format": obj! { "type": "text" }, "verbosity": "medium" },
        "tool_choice": "auto",
        "tools": J::A(vec![]),
        "top_logprobs": 0u64,
        "top_p": Value::from(1.0),
        "truncation": "disabled",
        "usage": if done { J::O(usage(s)) } else { J::V(Value::Null) },
        "user": Value::Null,
        "metadata": s.metadata.clone(),
    }
}

fn event(seq: &mut u64, kind: &str, mut data: Obj, delta: bool) -> Event {
    data.0.insert(0, ("type", J::V(Value::from(kind))));
    data.0.insert(1, ("sequence_number", J::V(Value::from(*seq))));
    *seq += 1;
    let mut bytes = format!("event: {kind}\ndata: ").into_bytes();
    bytes.extend_from_slice(&compact(&data));
    bytes.extend_from_slice(b"\n\n");
    Event { bytes, delta }
}

/// The stream of a completed response, as the API sends it.
fn events(s: &Stored, tokens: &[String]) -> Vec<Event> {
    let mut n = 0;
    let mut out = vec![
        event(&mut n, "response.created", obj! { "response": render(s, "in_progress", false) }, false),
        event(&mut n, "response.in_progress", obj! { "response": render(s, "in_progress", false) }, false),
        event(
            &mut n,
            "response.output_item.added",
            obj! { "output_index": 0u64, "item": message_item(s, "in_progress", None) },
            false,
        ),
        event(
            &mut n,
            "response.content_part.added",
            obj! {
                "item_id": &s.msg_id, "output_index": 0u64, "content_index": 0u64,
                "part": obj! { "type": "output_text", "annotations": J::A(vec![]), "logprobs": J::A(vec![]), "text": "" },
            },
            false,
        ),
    ];
    for token in tokens {
        out.push(event(
            &mut n,
            "response.output_text.delta",
            obj! {
                "item_id": &s.msg_id, "output_index": 0u64, "content_index": 0u64,
                "delta": token.as_str(), "logprobs": J::A(vec![]),
            },
            true,
        ));
    }
    out.push(event(
        &mut n,
        "response.output_text.done",
        obj! {
            "item_id": &s.msg_id, "output_index": 0u64, "content_index": 0u64,
            "text": &s.text, "logprobs": J::A(vec![]),
        },
        false,
    ));
    out.push(event(
        &mut n,
        "response.content_part.done",
        obj! {
            "item_id": &s.msg_id, "output_index": 0u64, "content_index": 0u64,
            "part": obj! { "type": "output_text", "annotations": J::A(vec![]), "logprobs": J::A(vec![]), "text": &s.text },
        },
        false,
    ));
    out.push(event(
        &mut n,
        "response.output_item.done",
        obj! { "output_index": 0u64, "item": message_item(s, "completed", Some(&s.text)) },
        false,
    ));
    out.push(event(&mut n, "response.completed", obj! { "response": render(s, "completed", true) }, false));
    out
}

fn stream(events: Vec<Event>) -> Answer {
    Answer::Stream { content_type: "text/event-stream; charset=utf-8", events, trailer: b"" }
}

/// Answers one Responses API call. `deployment`: Azure's (the model of a v1 call is
/// the deployment name, as sent).
pub(crate) fn answer(
    store: &Responses,
    ctx: &Ctx<'_>,
    op: Op,
    id: Option<&str>,
    query: &str,
    body: &[u8],
) -> Answer {
    let id = id.unwrap_or("");
    match op {
        Op::Create => create(store, ctx, body),
        Op::NotFound => error(404, "Invalid URL", None, None),
        Op::Get => {
            let stored = store.lock();
            let Some(s) = stored.get(id) else { return not_found(id) };
            if answer::query_param(query, "stream") == Some("true") {
                let tokens: Vec<String> = (0..s.output_tokens as usize).map(answer::token).collect();
                return stream(events(s, &tokens));
            }
            Answer::json(200, answer::pretty(&render(s, s.status, s.status == "completed")))
        }
        Op::Delete => match store.lock().remove(id) {
            Some(_) => {
                Answer::json(200, answer::pretty(&obj! { "id": id, "object": "response", "deleted": true }))
            }
            None => not_found(id),
        },
        Op::Cancel => {
            let mut stored = store.lock();
            let Some(s) = stored.get_mut(id) else { return not_found(id) };
            if !s.background {
                return error(
                    400,
                    "Only responses created with background=true can be cancelled.",
                    None,
                    None,
                );
            }
            if matches!(s.status, "queued" | "in_progress") {
                s.status = "cancelled";
            }
            Answer::json(200, answer::pretty(&render(s, s.status, s.status == "completed")))
        }
        Op::InputItems => {
            let stored = store.lock();
            let Some(s) = stored.get(id) else { return not_found(id) };
            let mut items: Vec<&Value> = s.input_items.iter().collect();
            if answer::query_param(query, "order") != Some("asc") {
                items.reverse();
            }
            if let Some(after) = answer::query_param(query, "after") {
                if let Some(at) =
                    items.iter().position(|i| i.get("id").and_then(Value::as_str) == Some(after))
                {
                    items.drain(..=at);
                }
            }
            let limit =
                answer::query_param(query, "limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(20);
            let has_more = items.len() > limit;
            items.truncate(limit);
            let first = items.first().and_then(|i| i.get("id")).cloned().unwrap_or(Value::Null);
            let last = items.last().and_then(|i| i.get("id")).cloned().unwrap_or(Value::Null);
            let data: Vec<J> = items.into_iter().map(|i| J::V(i.clone())).collect();
            Answer::json(
                200,
                answer::pretty(&obj! {
                    "object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more,
                }),
            )
        }
    }
}

fn create(store: &Responses, ctx: &Ctx<'_>, body: &[u8]) -> Answer {
    let req: CreateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                400,
                &format!("We could not parse the JSON body of your request. ({e})"),
                None,
                None,
            )
        }
    };
    let Some(model) = req.model.filter(|m| !m.is_empty()) else {
        return error(
            400,
            "Missing required parameter: 'model'.",
            Some("model"),
            Some("missing_required_parameter"),
        );
    };
    let mut stored = store.lock();
    let mut previous_items = Vec::new();
    if let Some(prev) = &req.previous_response_id {
        match stored.get(prev) {
            Some(p) => previous_items = p.input_items.clone(),
            None => {
                return error(
                    400,
                    &format!("Previous response with id '{prev}' not found."),
                    Some("previous_response_id"),
                    Some("previous_response_not_found"),
                )
            }
        }
    }
    let n = ctx.token_count(req.max_output_tokens);
    let tokens: Vec<String> = (0..n).map(answer::token).collect();
    let background = req.background == Some(true);
    let seq = ctx.seq;
    let nonce = store.nonce;
    let mut items = previous_items;
    items.extend(input_items(req.input.as_ref(), nonce, seq));
    let s = Stored {
        id: format!("resp_{nonce:016x}{seq:032x}"),
        msg_id: format!("msg_{nonce:016x}{seq:032x}"),
        created_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        model,
        status: if background && req.stream != Some(true) { "queued" } else { "completed" },
        background,
        instructions: req.instructions.unwrap_or(Value::Null),
        max_output_tokens: req.max_output_tokens.map_or(Value::Null, Value::from),
        previous_response_id: req.previous_response_id.map_or(Value::Null, Value::from),
        metadata: req.metadata.filter(Value::is_object).unwrap_or_else(|| serde_json::json!({})),
        text: tokens.concat(),
        input_tokens: answer::input_tokens(body),
        output_tokens: n as u64,
        input_items: items,
    };
    let answer = if req.stream == Some(true) {
        stream(events(&s, &tokens))
    } else {
        Answer::json(200, answer::pretty(&render(&s, s.status, s.status == "completed")))
    };
    stored.insert(s.id.clone(), s);
    // Bounded under load: the oldest go first.
    while stored.len() > MAX_STORED {
        stored.pop_first();
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(Op::from_path("POST", ""), (Op::Create, None));
        assert_eq!(Op::from_path("GET", ""), (Op::NotFound, None));
        assert_eq!(Op::from_path("GET", "/resp_1"), (Op::Get, Some("resp_1".into())));
        assert_eq!(Op::from_path("DELETE", "/resp_1"), (Op::Delete, Some("resp_1".into())));
        assert_eq!(Op::from_path("POST", "/resp_1/cancel"), (Op::Cancel, Some("resp_1".into())));
        assert_eq!(Op::from_path("GET", "/resp_1/input_items"), (Op::InputItems, Some("resp_1".into())));
        assert_eq!(Op::from_path("GET", "/resp_1/other").0, Op::NotFound);
    }
}
