//! Amazon Bedrock Runtime Converse API for the mock upstream.
//!
//! `POST /model/{modelId}/converse` answers JSON; `.../converse-stream`
//! answers `application/vnd.amazon.eventstream`: real binary event-stream
//! frames (prelude, headers `:event-type` / `:content-type` /
//! `:message-type`, JSON payload, CRCs) written by the AWS SDK's own encoder,
//! one frame per HTTP chunk. Errors are `{"message": "..."}` with the
//! exception name in `x-amzn-ErrorType`. SigV4 signatures are not verified,
//! but a request without an `AWS4-HMAC-SHA256 Credential=` authorization is
//! rejected with 403, so a gateway that forgets to sign is caught.

use std::borrow::Cow;

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use aws_smithy_types::str_bytes::StrBytes;
use serde::Deserialize;

use crate::answer::{self, compact, obj, Answer, Ctx, Event, Obj};

pub(crate) const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";
const SIGV4_PREFIX: &str = "AWS4-HMAC-SHA256 Credential=";
/// Namespace suffix of `x-amzn-ErrorType` for Bedrock's own exceptions.
const BEDROCK_NS: &str = "http://internal.amazon.com/coral/com.amazon.bedrock/";
/// ... and for the front door's authentication exceptions.
const CORAL_NS: &str = "http://internal.amazon.com/coral/com.amazon.coral.service/";
/// Bedrock pads every stream event with a `p` member of varying length so
/// event sizes do not reveal token lengths.
const PADDING: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// What the request's `authorization` header looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Auth {
    SigV4,
    Missing,
    /// Present but not SigV4 (e.g. a bearer token).
    Other,
}

impl Auth {
    pub(crate) fn of(value: Option<&[u8]>) -> Auth {
        match value {
            None => Auth::Missing,
            Some(v) if v.starts_with(SIGV4_PREFIX.as_bytes()) => Auth::SigV4,
            Some(_) => Auth::Other,
        }
    }
}

#[derive(Deserialize)]
struct ConverseRequest {
    #[serde(default)]
    messages: Option<Vec<Turn>>,
    #[serde(default, rename = "toolConfig")]
    tool_config: Option<ToolConfig>,
    #[serde(default, rename = "inferenceConfig")]
    inference_config: Option<InferenceConfig>,
}

#[derive(Deserialize)]
struct Turn {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Vec<ContentBlock>,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ToolConfig {
    #[serde(default)]
    tools: Vec<Tool>,
}

#[derive(Deserialize)]
struct Tool {
    #[serde(default, rename = "toolSpec")]
    tool_spec: Option<ToolSpec>,
}

#[derive(Deserialize)]
struct ToolSpec {
    name: String,
}

#[derive(Deserialize)]
struct InferenceConfig {
    #[serde(default, rename = "maxTokens")]
    max_tokens: Option<u64>,
}

fn usage(input: u64, output: u64) -> Obj {
    obj! {"inputTokens": input, "outputTokens": output, "totalTokens": input + output}
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `converse` (`stream` false) or `converse-stream`.
pub(crate) fn converse(ctx: &Ctx<'_>, stream: bool, auth: Auth, body: &[u8]) -> Answer {
    match auth {
        Auth::SigV4 => {}
        Auth::Missing => {
            return error_with(
                403,
                "Missing Authentication Token",
                "MissingAuthenticationTokenException",
                CORAL_NS,
            )
        }
        Auth::Other => {
            return error_with(
                403,
                "Authorization header requires 'Credential' parameter. Authorization header requires \
                 'Signature' parameter. Authorization header requires 'SignedHeaders' parameter.",
                "IncompleteSignatureException",
                CORAL_NS,
            )
        }
    }
    let req: ConverseRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                400,
                &format!("Malformed input request: {e}, please reformat your input and try again."),
            )
        }
    };
    let Some(messages) = req.messages else {
        return error(
            400,
            "1 validation error detected: Value null at 'messages' failed to satisfy constraint: \
             Member must not be null",
        );
    };
    let tool = req.tool_config.iter().flat_map(|c| &c.tools).find_map(|t| t.tool_spec.as_ref());
    // Tool results come back as a user turn without text, which ends the
    // round trip with a text answer.
    let call = tool.filter(|_| {
        messages.last().is_some_and(|m| {
            let text: String = m.content.iter().filter_map(|b| b.text.as_deref()).collect();
            m.role == "user" && answer::mentions_weather(&text)
        })
    });
    let n = ctx.token_count(req.inference_config.and_then(|c| c.max_tokens));
    let input = answer::input_tokens(body);
    let tool_use_id = format!("tooluse_mock{:018}", ctx.seq);
    let (stop, output) = match call {
        Some(_) => ("tool_use", answer::TOOL_CALL_TOKENS),
        None if n < ctx.cfg.tokens => ("max_tokens", n as u64),
        None => ("end_turn", n as u64),
    };
    let cfg = ctx.cfg;
    if !stream {
        let content = match call {
            Some(t) => obj! {"toolUse": obj! {
                "toolUseId": &tool_use_id,
                "name": &t.name,
                "input": obj! {"location": "Paris"},
            }},
            None => obj! {"text": answer::text(n)},
        };
        let out = obj! {
            "metrics": obj! {"latencyMs": ms(cfg.latency)},
            "output": obj! {"message": obj! {"content": vec![content], "role": "assistant"}},
            "stopReason": stop,
            "usage": usage(input, output),
        };
        return Answer::json(200, sorted(&out));
    }
    let deltas = if call.is_some() { answer::WEATHER_ARG_PIECES.len() } else { n };
    let latency =
        cfg.latency + cfg.ttft + cfg.inter_token * u32::try_from(deltas.saturating_sub(1)).unwrap_or(0);
    let mut events = Vec::with_capacity(n + 6);
    let mut push = |name: &'static str, payload: Obj, delta: bool| -> Result<(), Answer> {
        let bytes = frame(name, payload, ctx.seq as usize + events.len())
            .map_err(|e| error(500, &format!("mock could not encode an event-stream frame: {e}")))?;
        events.push(Event { bytes, delta });
        Ok(())
    };
    let r = (|| {
        push("messageStart", obj! {"role": "assistant"}, false)?;
        match call {
            Some(t) => {
                push(
                    "contentBlockStart",
                    obj! {
                        "contentBlockIndex": 0u64,
                        "start": obj! {"toolUse": obj! {"toolUseId": &tool_use_id, "name": &t.name}},
                    },
                    false,
                )?;
                for piece in answer::WEATHER_ARG_PIECES {
                    push(
                        "contentBlockDelta",
                        obj! {"contentBlockIndex": 0u64, "delta": obj! {"toolUse": obj! {"input": piece}}},
                        true,
                    )?;
                }
            }
            // A text block has no contentBlockStart: its first delta opens it.
            None => {
                for i in 0..n {
                    push(
                        "contentBlockDelta",
                        obj! {"contentBlockIndex": 0u64, "delta": obj! {"text": answer::token(i)}},
                        true,
                    )?;
                }
            }
        }
        push("contentBlockStop", obj! {"contentBlockIndex": 0u64}, false)?;
        push("messageStop", obj! {"stopReason": stop}, false)?;
        push(
            "metadata",
            obj! {"usage": usage(input, output), "metrics": obj! {"latencyMs": ms(latency)}},
            false,
        )
    })();
    match r {
        Ok(()) => Answer::Stream { content_type: EVENT_STREAM, events, trailer: b"" },
        Err(e) => e,
    }
}

/// Compact JSON with members in alphabetical order, as Bedrock writes them
/// (`Value`'s map is sorted).
fn sorted(o: &Obj) -> Vec<u8> {
    serde_json::to_value(o).map(|v| compact(&v)).unwrap_or_default()
}

/// One event-stream frame: `:event-type` NAME, JSON payload padded with `p`.
/// Bedrock writes members in alphabetical order, which is what `Value`'s
/// sorted map gives.
pub(crate) fn frame(name: &'static str, payload: Obj, pad: usize) -> Result<Vec<u8>, String> {
    let mut payload = serde_json::to_value(&payload).map_err(|e| e.to_string())?;
    if let Some(members) = payload.as_object_mut() {
        members.insert("p".to_owned(), PADDING[..1 + pad % (PADDING.len() - 1)].into());
    }
    let header = |k: &'static str, v: &'static str| Header::new(k, HeaderValue::String(StrBytes::from(v)));
    let message = Message::new(compact(&payload))
        .add_header(header(":event-type", name))
        .add_header(header(":content-type", "application/json"))
        .add_header(header(":message-type", "event"));
    let mut out = Vec::with_capacity(128 + message.payload().len());
    write_message_to(&message, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The exception Bedrock names for an HTTP status.
pub(crate) fn error_type(status: u16) -> &'static str {
    match status {
        403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        408 => "ModelTimeoutException",
        424 => "ModelErrorException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        s if s >= 500 => "InternalServerException",
        _ => "ValidationException",
    }
}

fn default_message(status: u16) -> &'static str {
    match status {
        403 => "You don't have access to the model with the specified model ID.",
        404 => "The provided model identifier is invalid.",
        408 => "Model has timed out in processing the request. Try your request again.",
        424 => "Received error from the model. Try your request again.",
        429 => "Too many requests, please wait before trying again.",
        503 => "Bedrock is unable to process your request.",
        s if s >= 500 => {
            "The system encountered an unexpected error during processing. Try your request again."
        }
        _ => "Malformed input request, please reformat your input and try again.",
    }
}

/// The error answer for `status` (an empty `message` gets Bedrock's usual one).
pub(crate) fn error(status: u16, message: &str) -> Answer {
    let message = if message.is_empty() { default_message(status) } else { message };
    error_with(status, message, error_type(status), BEDROCK_NS)
}

fn error_with(status: u16, message: &str, ty: &str, ns: &str) -> Answer {
    Answer::Body {
        status,
        content_type: "application/json",
        body: compact(&obj! {"message": message}),
        headers: Cow::Owned(format!("x-amzn-ErrorType: {ty}:{ns}\r\n")),
    }
}
