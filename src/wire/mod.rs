//! Wire formats. No I/O here: bytes in, bytes out.

pub mod anthropic;
pub mod bedrock;
pub mod canonical;
pub mod codec;
pub mod cohere;
pub mod embeddings;
pub mod gemini;
pub mod multipart;
pub mod openai;
pub mod registry;
pub mod routed;
pub mod usage;

use crate::error::{GatewayError, Surface};
use crate::sse::{Framer, Parser};
use canonical::{Delta, Request, Response};
use codec::{Codec, StreamDecoder, StreamEncoder, SurfaceCodec};

/// What a provider speaks. Client surfaces are the first two; the others exist only
/// upstream. Azure OpenAI and the OpenAI-compatible vendors speak `OpenAi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireFormat {
    OpenAi,
    Anthropic,
    Cohere,
    Gemini,
    Bedrock,
}

impl WireFormat {
    pub const ALL: [WireFormat; 5] = [
        WireFormat::OpenAi,
        WireFormat::Anthropic,
        WireFormat::Cohere,
        WireFormat::Gemini,
        WireFormat::Bedrock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WireFormat::OpenAi => "openai",
            WireFormat::Anthropic => "anthropic",
            WireFormat::Cohere => "cohere",
            WireFormat::Gemini => "gemini",
            WireFormat::Bedrock => "bedrock",
        }
    }
}

impl From<Surface> for WireFormat {
    fn from(s: Surface) -> WireFormat {
        match s {
            Surface::OpenAi => WireFormat::OpenAi,
            Surface::Anthropic => WireFormat::Anthropic,
        }
    }
}

impl WireFormat {
    /// This format's codec.
    pub fn codec(self) -> &'static dyn Codec {
        registry::codec(self)
    }
}

impl Surface {
    /// This client surface's codec.
    pub fn codec(self) -> &'static dyn SurfaceCodec {
        registry::surface_codec(self)
    }
}

/// Client body → canonical request, by the client's wire format.
pub fn decode_request(format: Surface, body: &[u8]) -> Result<Request, GatewayError> {
    format.codec().decode_request(body)
}

/// Canonical request → upstream body, by the provider's wire format. `Err` (400) when the
/// request uses something the provider cannot express.
pub fn encode_request(format: WireFormat, req: &Request, model: &str) -> Result<Vec<u8>, GatewayError> {
    format
        .codec()
        .encode_request(req, model)
        .map_err(|message| GatewayError::invalid("unsupported_for_provider", message))
}

pub fn decode_response(format: WireFormat, body: &[u8]) -> Result<Response, String> {
    format.codec().decode_response(body)
}

/// Canonical embeddings request → upstream body, for translated (non-OpenAI) targets.
pub fn encode_embeddings(
    format: WireFormat,
    req: &canonical::EmbeddingsRequest,
    model: &str,
) -> Result<Vec<u8>, GatewayError> {
    match format.codec().encode_embeddings(req, model) {
        Some(encoded) => {
            encoded.map_err(|message| GatewayError::invalid("unsupported_for_provider", message))
        }
        None => Err(GatewayError::invalid(
            "unsupported_endpoint",
            format!(
                "{} providers have no embeddings endpoint; use an OpenAI-family, Google or Cohere model",
                format.as_str()
            ),
        )),
    }
}

/// Upstream embeddings body → canonical, for the formats `encode_embeddings` accepts.
pub fn decode_embeddings(format: WireFormat, body: &[u8]) -> Result<canonical::EmbeddingsResponse, String> {
    format
        .codec()
        .decode_embeddings(body)
        .unwrap_or_else(|| Err(format!("{} embeddings are not translated", format.as_str())))
}

/// The human-readable message of an upstream error body, read the provider's way.
pub fn error_message(format: WireFormat, body: &[u8]) -> Option<String> {
    format.codec().error_message(body)
}

/// `error.message` of an OpenAI or Anthropic error body (both nest it under `error`).
pub fn nested_error_message(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_string))
}

pub fn encode_response(format: Surface, resp: &Response) -> Vec<u8> {
    format.codec().encode_response(resp)
}

/// A whole response as the client's stream: for answers that had to be complete before
/// the gateway could choose them (ensembles, cascades).
pub fn stream_response(
    client: Surface,
    resp: &Response,
    send_usage: bool,
    trace: Option<&serde_json::value::RawValue>,
) -> Vec<u8> {
    use canonical::Part;
    let mut deltas = vec![Delta::Start { id: resp.id.clone(), model: resp.model.clone() }];
    let mut call = 0;
    for part in &resp.content {
        match part {
            Part::Text { text, .. } => deltas.push(Delta::Text(text.clone())),
            Part::Thinking { text, signature } => {
                deltas.push(Delta::Thinking(text.clone()));
                if let Some(sig) = signature {
                    deltas.push(Delta::Signature(sig.clone()));
                }
            }
            Part::ToolCall { id, name, arguments } => {
                deltas.push(Delta::ToolCallStart { call, id: id.clone(), name: name.clone() });
                deltas.push(Delta::ToolArgs { call, json: arguments.clone() });
                call += 1;
            }
            Part::Image { .. } | Part::ToolResult { .. } | Part::RedactedThinking { .. } => {}
        }
    }
    if let Some(stop) = resp.stop {
        deltas.push(Delta::Stop(stop));
    }
    deltas.push(Delta::Usage(resp.usage));
    deltas.push(Delta::Done);
    let mut t = Transcoder::new(Box::new(Parser::new()), WireFormat::OpenAi, client, &resp.model, send_usage);
    if trace.is_some() {
        t.hold_done();
    }
    let mut out = Vec::new();
    t.deltas = deltas;
    t.emit(&mut out);
    if let Some(trace) = trace {
        t.release_done(trace, &mut out);
    }
    out
}

/// The answer's text (text parts joined), for acceptance checks and votes.
pub fn response_text(resp: &Response) -> String {
    let mut out = String::new();
    for part in &resp.content {
        match part {
            canonical::Part::Text { text, .. } => out.push_str(text),
            canonical::Part::ToolCall { name, arguments, .. } => {
                out.push_str(name);
                out.push_str(arguments);
            }
            _ => {}
        }
    }
    out
}

/// The deltas of a stream as a client of `surface` got it (SSE bytes); `None` when the
/// bytes hold no event. What decoded before an undecodable event is kept.
fn client_stream_deltas(surface: Surface, body: &[u8]) -> Option<Vec<Delta>> {
    let mut framer = Parser::new();
    let mut events = Vec::new();
    framer.feed(body, &mut events).ok()?;
    framer.finish(&mut events);
    if events.is_empty() {
        return None;
    }
    let mut decoder = surface.codec().stream_decoder();
    let mut deltas = Vec::new();
    let _ = decoder.decode(&mut events, &mut deltas);
    let _ = decoder.finish(&mut deltas);
    Some(deltas)
}

/// The text of an answer as a client of `surface` got it, a whole JSON body or the bytes
/// of its stream, joined as `response_text` joins it; `None` when it is neither. A stream
/// cut short (a capped copy) gives the text decoded up to the cut.
pub fn answer_text(surface: Surface, body: &[u8]) -> Option<String> {
    if body.trim_ascii_start().starts_with(b"{") {
        return surface.codec().decode_response(body).ok().map(|r| response_text(&r));
    }
    let mut out = String::new();
    for d in client_stream_deltas(surface, body)? {
        match d {
            Delta::Text(t) => out.push_str(&t),
            Delta::ToolCallStart { name, .. } => out.push_str(&name),
            Delta::ToolArgs { json, .. } => out.push_str(&json),
            _ => {}
        }
    }
    Some(out)
}

/// A whole answer from the stream a client of `surface` got: `None` unless the stream
/// is complete (its final event) and carried no error. The response cache stores streamed
/// answers this way, to replay them in either surface, whole or streamed.
pub fn assemble_stream(surface: Surface, body: &[u8]) -> Option<Response> {
    use canonical::Part;
    let mut resp = Response {
        id: String::new(),
        model: String::new(),
        created: 0,
        content: Vec::new(),
        stop: None,
        usage: canonical::Usage::default(),
    };
    let mut done = false;
    // Content index of each tool call, by its number in the stream.
    let mut calls: Vec<usize> = Vec::new();
    for d in client_stream_deltas(surface, body)? {
        match d {
            Delta::Start { id, model } => {
                resp.id = id;
                resp.model = model;
            }
            Delta::Text(t) => match resp.content.last_mut() {
                Some(Part::Text { text, .. }) => text.push_str(&t),
                _ => resp.content.push(Part::Text { text: t, cache_control: None }),
            },
            Delta::Thinking(t) => match resp.content.last_mut() {
                Some(Part::Thinking { text, .. }) => text.push_str(&t),
                _ => resp.content.push(Part::Thinking { text: t, signature: None }),
            },
            Delta::Signature(sig) => {
                if let Some(Part::Thinking { signature, .. }) = resp.content.last_mut() {
                    signature.get_or_insert_with(String::new).push_str(&sig);
                }
            }
            Delta::ToolCallStart { call, id, name } => {
                if calls.len() <= call {
                    calls.resize(call + 1, usize::MAX);
                }
                calls[call] = resp.content.len();
                resp.content.push(Part::ToolCall { id, name, arguments: String::new() });
            }
            Delta::ToolArgs { call, json } => {
                let at = calls.get(call).copied().unwrap_or(usize::MAX);
                if let Some(Part::ToolCall { arguments, .. }) = resp.content.get_mut(at) {
                    arguments.push_str(&json);
                }
            }
            Delta::Stop(r) => resp.stop = Some(r),
            Delta::Usage(u) => resp.usage.merge(u),
            Delta::Error { .. } => return None,
            Delta::Done => done = true,
        }
    }
    done.then_some(resp)
}

/// Upstream stream bytes → client stream bytes, one upstream read at a time: a synchronous
/// state machine, so nothing is buffered beyond an incomplete SSE line.
pub struct Transcoder {
    framer: Box<dyn Framer>,
    events: Vec<crate::sse::Event>,
    decoder: Box<dyn StreamDecoder>,
    encoder: Box<dyn StreamEncoder>,
    deltas: Vec<Delta>,
    done: bool,
    /// Keep the final event back until `release_done` (to put the decision trace before it).
    hold_done: bool,
    held_done: bool,
    /// Upstream events decoded: about one per generated token.
    events_seen: u64,
}

impl Transcoder {
    /// `framer` cuts the upstream's bytes into events (its provider adapter's); `model` is
    /// what the client sees in the stream; `client_wants_usage` keeps or drops the OpenAI
    /// usage chunk the gateway always asks an OpenAI-family upstream for.
    pub fn new(
        framer: Box<dyn Framer>,
        upstream: WireFormat,
        client: Surface,
        model: &str,
        client_wants_usage: bool,
    ) -> Transcoder {
        Transcoder {
            framer,
            events: Vec::new(),
            decoder: upstream.codec().stream_decoder(),
            encoder: client.codec().stream_encoder(model, client_wants_usage),
            deltas: Vec::new(),
            done: false,
            hold_done: false,
            held_done: false,
            events_seen: 0,
        }
    }

    /// Holds the stream's final event back until `release_done`.
    pub fn hold_done(&mut self) {
        self.hold_done = true;
    }

    /// Writes the held final event, with the decision trace: a choice-less chunk before
    /// `[DONE]` (OpenAI) or an `mlx:trace` field on `message_stop` (Anthropic).
    pub fn release_done(&mut self, trace: &serde_json::value::RawValue, out: &mut Vec<u8>) {
        if !self.held_done {
            return;
        }
        self.held_done = false;
        self.encoder.done_with_trace(trace, out);
    }

    /// Translates one upstream read; `Err` when the upstream sent something undecodable.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.framer.feed(bytes, &mut self.events)?;
        self.events_seen += self.events.len() as u64;
        let res = self.decode();
        self.emit(out);
        res
    }

    fn decode(&mut self) -> Result<(), String> {
        self.decoder.decode(&mut self.events, &mut self.deltas)
    }

    /// The upstream body ended; `Err` when it ended without its terminal event.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let framed = self.framer.finish(&mut self.events);
        let res = self.decode().and(framed).and_then(|()| self.decoder.finish(&mut self.deltas));
        self.emit(out);
        res?;
        if self.done {
            Ok(())
        } else {
            Err("the upstream stream ended before its final event".into())
        }
    }

    /// Ends the client stream with an error event in its format.
    pub fn fail(&mut self, kind: &str, message: &str, out: &mut Vec<u8>) {
        self.deltas.push(Delta::Error { kind: kind.to_string(), message: message.to_string() });
        self.emit(out);
    }

    /// Upstream events decoded so far.
    pub fn events(&self) -> u64 {
        self.events_seen
    }

    pub fn usage(&self) -> canonical::Usage {
        self.encoder.usage()
    }

    fn emit(&mut self, out: &mut Vec<u8>) {
        for d in self.deltas.drain(..) {
            if self.done {
                // After the end or an in-stream error the client stream is closed.
                continue;
            }
            if matches!(d, Delta::Done | Delta::Error { .. }) {
                self.done = true;
            }
            if self.hold_done && d == Delta::Done {
                self.held_done = true;
                continue;
            }
            self.encoder.encode(&d, out);
        }
    }
}

#[cfg(test)]
mod tests;
