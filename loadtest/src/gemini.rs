//! Google Gemini API (`generativelanguage`, REST) for the mock upstream.
//!
//! `POST /v1beta/models/{model}:generateContent` (a `GenerateContentResponse`,
//! pretty-printed as Google sends it), `:streamGenerateContent?alt=sse` (one
//! `data: {chunk}\r\n\r\n` per token, no terminal marker; without `alt=sse` the
//! same chunks as one streamed JSON array), `:batchEmbedContents` and
//! `:embedContent`. Errors are `{"error":{"code","message","status"}}`.

use std::borrow::Cow;
use std::io;

use serde::{Deserialize, Serialize};

use crate::answer::{self, obj, pretty, Answer, Ctx, Event, Obj};

/// Vector length when a request names no `outputDimensionality`.
pub(crate) const DEFAULT_DIMENSIONS: usize = 768;
/// Largest `outputDimensionality` accepted (gemini-embedding-001's).
const MAX_DIMENSIONS: i64 = 3072;
const JSON: &str = "application/json; charset=UTF-8";

/// Which method of the model resource was called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Generate,
    /// `streamGenerateContent`; `sse` when the query says `alt=sse`.
    Stream {
        sse: bool,
    },
    BatchEmbed,
    Embed,
}

impl Op {
    pub(crate) fn from_method(method: &str, query: &str) -> Option<Op> {
        Some(match method {
            "generateContent" => Op::Generate,
            "streamGenerateContent" => Op::Stream { sse: answer::query_param(query, "alt") == Some("sse") },
            "batchEmbedContents" => Op::BatchEmbed,
            "embedContent" => Op::Embed,
            _ => return None,
        })
    }
}

#[derive(Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    contents: Option<Vec<Content>>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default, rename = "generationConfig", alias = "generation_config")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    parts: Vec<Part>,
}

impl Content {
    fn text(&self) -> String {
        self.parts.iter().filter_map(|p| p.text.as_deref()).collect()
    }
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Tool {
    #[serde(default, rename = "functionDeclarations", alias = "function_declarations")]
    function_declarations: Vec<FunctionDeclaration>,
}

#[derive(Deserialize)]
struct FunctionDeclaration {
    name: String,
}

#[derive(Deserialize)]
struct GenerationConfig {
    #[serde(default, rename = "maxOutputTokens", alias = "max_output_tokens")]
    max_output_tokens: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Response<'a> {
    candidates: [Candidate<'a>; 1],
    usage_metadata: Usage,
    model_version: &'a str,
    response_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    content: ContentOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'static str>,
    index: u32,
}

#[derive(Serialize)]
struct ContentOut<'a> {
    parts: [PartOut<'a>; 1],
    role: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum PartOut<'a> {
    Text {
        text: Cow<'a, str>,
    },
    Call {
        #[serde(rename = "functionCall")]
        function_call: FunctionCall<'a>,
    },
}

#[derive(Serialize)]
struct FunctionCall<'a> {
    name: &'a str,
    args: serde_json::Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Usage {
    prompt_token_count: u64,
    /// Only in a complete answer or the last chunk of a stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    candidates_token_count: Option<u64>,
    total_token_count: u64,
    prompt_tokens_details: [ModalityCount; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModalityCount {
    modality: &'static str,
    token_count: u64,
}

impl Usage {
    fn new(prompt: u64, candidates: Option<u64>) -> Usage {
        Usage {
            prompt_token_count: prompt,
            candidates_token_count: candidates,
            total_token_count: prompt + candidates.unwrap_or(0),
            prompt_tokens_details: [ModalityCount { modality: "TEXT", token_count: prompt }],
        }
    }
}

/// Google's stream chunks are compact but for a space after each colon
/// (`{"candidates": [{"content": {"parts": ...`).
struct SpacedColon;

impl serde_json::ser::Formatter for SpacedColon {
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

fn spaced<T: Serialize>(v: &T, out: &mut Vec<u8>) {
    let mut ser = serde_json::Serializer::with_formatter(out, SpacedColon);
    // Serializing plain structs into a Vec cannot fail.
    let _ = v.serialize(&mut ser);
}

fn response<'a>(
    part: PartOut<'a>,
    finish: Option<&'static str>,
    usage: Usage,
    model: &'a str,
    id: &'a str,
) -> Response<'a> {
    Response {
        candidates: [Candidate {
            content: ContentOut { parts: [part], role: "model" },
            finish_reason: finish,
            index: 0,
        }],
        usage_metadata: usage,
        model_version: model,
        response_id: id,
    }
}

fn call_part(f: &FunctionDeclaration) -> PartOut<'_> {
    PartOut::Call {
        function_call: FunctionCall { name: &f.name, args: serde_json::json!({"location": "Paris"}) },
    }
}

/// Answers one request to a model method.
pub(crate) fn answer(ctx: &Ctx<'_>, op: Op, body: &[u8]) -> Answer {
    match op {
        Op::Generate => generate(ctx, body, None),
        Op::Stream { sse } => generate(ctx, body, Some(sse)),
        Op::BatchEmbed => batch_embed(body),
        Op::Embed => embed(body),
    }
}

/// `generateContent` (`stream` None) or `streamGenerateContent`.
fn generate(ctx: &Ctx<'_>, body: &[u8], stream: Option<bool>) -> Answer {
    let req: GenerateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(400, &format!("Invalid JSON payload received. {e}")),
    };
    let contents = match req.contents.as_deref() {
        Some(c) if !c.is_empty() => c,
        _ => return error(400, "* GenerateContentRequest.contents: contents is not specified\n"),
    };
    let function = req.tools.iter().flatten().flat_map(|t| &t.function_declarations).next();
    // Only a conversation that ends in a user turn asking for the weather
    // gets the call; a function response (no text) ends the round trip.
    let call = function.filter(|_| {
        contents.last().is_some_and(|c| {
            c.role.as_deref().unwrap_or("user") == "user" && answer::mentions_weather(&c.text())
        })
    });
    let max = req.generation_config.and_then(|g| g.max_output_tokens);
    let n = ctx.token_count(max);
    let finish = if n < ctx.cfg.tokens { "MAX_TOKENS" } else { "STOP" };
    let prompt = answer::input_tokens(body);
    let response_id = format!("mockResp{:015}", ctx.seq);
    let make = |part, finish, usage| response(part, finish, usage, ctx.param, &response_id);
    let Some(sse) = stream else {
        let r = match call {
            Some(f) => make(call_part(f), Some("STOP"), Usage::new(prompt, Some(answer::TOOL_CALL_TOKENS))),
            None => make(
                PartOut::Text { text: Cow::Owned(answer::text(n)) },
                Some(finish),
                Usage::new(prompt, Some(n as u64)),
            ),
        };
        return Answer::Body {
            status: 200,
            content_type: JSON,
            body: pretty(&r),
            headers: Cow::Borrowed(""),
        };
    };
    // Each chunk is a whole GenerateContentResponse; a function call comes
    // whole in one chunk, text one token per chunk.
    let chunks: Vec<Response<'_>> = match call {
        Some(f) => vec![make(call_part(f), Some("STOP"), Usage::new(prompt, Some(answer::TOOL_CALL_TOKENS)))],
        None => (0..n.max(1))
            .map(|i| {
                let last = i + 1 >= n;
                let text = if n == 0 { Cow::Borrowed("") } else { Cow::Owned(answer::token(i)) };
                let usage = Usage::new(prompt, last.then_some(n as u64));
                make(PartOut::Text { text }, last.then_some(finish), usage)
            })
            .collect(),
    };
    let events = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut bytes = Vec::with_capacity(512);
            if sse {
                bytes.extend_from_slice(b"data: ");
                spaced(c, &mut bytes);
                // Google ends each event with CRLF CRLF.
                bytes.extend_from_slice(b"\r\n\r\n");
            } else {
                bytes.extend_from_slice(if i == 0 { b"[" } else { b",\r\n" });
                bytes.extend_from_slice(&pretty(c));
            }
            Event { bytes, delta: true }
        })
        .collect();
    if sse {
        Answer::Stream { content_type: "text/event-stream", events, trailer: b"" }
    } else {
        Answer::Stream { content_type: JSON, events, trailer: b"]" }
    }
}

#[derive(Deserialize)]
struct BatchEmbedRequest {
    #[serde(default)]
    requests: Option<Vec<EmbedRequest>>,
}

#[derive(Deserialize)]
struct EmbedRequest {
    #[serde(default)]
    content: Option<Content>,
    #[serde(default, rename = "outputDimensionality", alias = "output_dimensionality")]
    output_dimensionality: Option<i64>,
}

#[derive(Serialize)]
struct Values {
    values: Vec<f32>,
}

impl EmbedRequest {
    fn values(&self, at: &str) -> Result<Values, Answer> {
        let dims = match self.output_dimensionality {
            None => DEFAULT_DIMENSIONS,
            Some(d) if (1..=MAX_DIMENSIONS).contains(&d) => usize::try_from(d).unwrap_or(DEFAULT_DIMENSIONS),
            Some(d) => {
                return Err(error(
                    400,
                    &format!(
                        "* {at}.output_dimensionality: must be between 1 and {MAX_DIMENSIONS}, got {d}\n"
                    ),
                ))
            }
        };
        let Some(content) = &self.content else {
            return Err(error(400, &format!("* {at}.content: content is not specified\n")));
        };
        Ok(Values { values: answer::embedding(content.text().as_bytes(), dims) })
    }
}

fn batch_embed(body: &[u8]) -> Answer {
    let req: BatchEmbedRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(400, &format!("Invalid JSON payload received. {e}")),
    };
    let requests = match req.requests {
        Some(r) if !r.is_empty() => r,
        _ => return error(400, "* BatchEmbedContentsRequest.requests: requests is not specified\n"),
    };
    let mut embeddings = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        match r.values(&format!("BatchEmbedContentsRequest.requests[{i}]")) {
            Ok(v) => embeddings.push(v),
            Err(e) => return e,
        }
    }
    #[derive(Serialize)]
    struct Out {
        embeddings: Vec<Values>,
    }
    let body = pretty(&Out { embeddings });
    Answer::Body { status: 200, content_type: JSON, body, headers: Cow::Borrowed("") }
}

fn embed(body: &[u8]) -> Answer {
    let req: EmbedRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(400, &format!("Invalid JSON payload received. {e}")),
    };
    match req.values("EmbedContentRequest") {
        Ok(embedding) => {
            #[derive(Serialize)]
            struct Out {
                embedding: Values,
            }
            let body = pretty(&Out { embedding });
            Answer::Body { status: 200, content_type: JSON, body, headers: Cow::Borrowed("") }
        }
        Err(e) => e,
    }
}

/// The `google.rpc.Code` name Google pairs with an HTTP status.
pub(crate) fn status_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        s if s >= 500 => "INTERNAL",
        _ => "FAILED_PRECONDITION",
    }
}

/// The error envelope for `status`; an empty `message` gets Google's usual
/// text for that status. A 429 carries a `RetryInfo` detail as Google's do.
pub(crate) fn error_body(status: u16, message: &str) -> Vec<u8> {
    let message = if message.is_empty() {
        match status {
            400 => "Request contains an invalid argument.",
            401 => "Request had invalid authentication credentials.",
            403 => "The caller does not have permission",
            404 => "Requested entity was not found.",
            429 => "Resource has been exhausted (e.g. check quota).",
            503 => "The model is overloaded. Please try again later.",
            504 => "Deadline expired before operation could complete.",
            s if s >= 500 => "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            _ => "Precondition check failed.",
        }
    } else {
        message
    };
    let mut error = obj! {"code": u64::from(status), "message": message, "status": status_name(status)};
    if status == 429 {
        let retry: Obj = obj! {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"};
        error.0.push(("details", answer::IntoJ::into_j(vec![retry])));
    }
    pretty(&obj! {"error": error})
}

pub(crate) fn error(status: u16, message: &str) -> Answer {
    Answer::Body { status, content_type: JSON, body: error_body(status, message), headers: Cow::Borrowed("") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockConfig;
    use serde_json::{json, Value};

    type R = Result<(), Box<dyn std::error::Error>>;

    fn ctx(cfg: &MockConfig) -> Ctx<'_> {
        Ctx { seq: 3, cfg, param: "gemini-2.0-flash" }
    }

    fn body(answer: &Answer) -> &[u8] {
        match answer {
            Answer::Body { body, .. } => body,
            Answer::Stream { .. } => b"",
        }
    }

    #[test]
    fn generate_shape() -> R {
        let cfg = MockConfig { tokens: 2, ..Default::default() };
        let req = serde_json::to_vec(&json!({"contents": [{"parts": [{"text": "hi"}]}]}))?;
        let a = answer(&ctx(&cfg), Op::Generate, &req);
        let v: Value = serde_json::from_slice(body(&a))?;
        assert_eq!(
            v["candidates"][0]["content"],
            json!({"parts": [{"text": " tok0 tok1"}], "role": "model"})
        );
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 2);
        assert_eq!(v["modelVersion"], "gemini-2.0-flash");
        assert_eq!(v["responseId"].as_str().map(str::len), Some(23));
        // Pretty-printed, two-space indented, keys in Google's order.
        let text = String::from_utf8_lossy(body(&a)).into_owned();
        assert!(text.starts_with("{\n  \"candidates\": [\n"), "{text}");
        let pos = |k: &str| text.find(&format!("\"{k}\""));
        assert!(pos("parts") < pos("role") && pos("usageMetadata") < pos("modelVersion"));
        Ok(())
    }

    #[test]
    fn stream_chunks_are_spaced_json() -> R {
        let cfg = MockConfig { tokens: 2, ..Default::default() };
        let req = serde_json::to_vec(&json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))?;
        let Answer::Stream { events, trailer, .. } = answer(&ctx(&cfg), Op::Stream { sse: true }, &req)
        else {
            return Err("not a stream".into());
        };
        assert!(trailer.is_empty());
        assert_eq!(events.len(), 2);
        let first = std::str::from_utf8(&events[0].bytes)?;
        assert!(first.starts_with("data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" tok0\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {"), "{first}");
        assert!(first.ends_with("}\r\n\r\n"));
        Ok(())
    }

    #[test]
    fn errors() -> R {
        for (status, name) in [(400, "INVALID_ARGUMENT"), (429, "RESOURCE_EXHAUSTED"), (503, "UNAVAILABLE")] {
            let v: Value = serde_json::from_slice(&error_body(status, ""))?;
            assert_eq!(v["error"]["code"], status);
            assert_eq!(v["error"]["status"], name);
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        Ok(())
    }
}
