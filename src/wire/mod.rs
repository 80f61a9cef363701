//! Wire formats. No I/O here: bytes in, bytes out.

pub mod anthropic;
pub mod canonical;
pub mod openai;

use crate::error::Surface;
use canonical::{Delta, Request, Response};

/// Client body → canonical request, by the client's wire format.
pub fn decode_request(format: Surface, body: &[u8]) -> Result<Request, crate::error::GatewayError> {
    match format {
        Surface::OpenAi => openai::codec::decode_request(body),
        Surface::Anthropic => anthropic::decode_request(body),
    }
}

/// Canonical request → upstream body, by the provider's wire format.
pub fn encode_request(format: Surface, req: &Request, model: &str) -> Vec<u8> {
    match format {
        Surface::OpenAi => openai::codec::encode_request(req, model),
        Surface::Anthropic => anthropic::encode_request(req, model),
    }
}

pub fn decode_response(format: Surface, body: &[u8]) -> Result<Response, String> {
    match format {
        Surface::OpenAi => openai::codec::decode_response(body),
        Surface::Anthropic => anthropic::decode_response(body),
    }
}

pub fn encode_response(format: Surface, resp: &Response) -> Vec<u8> {
    match format {
        Surface::OpenAi => openai::codec::encode_response(resp),
        Surface::Anthropic => anthropic::encode_response(resp),
    }
}

enum Decoder {
    OpenAi(openai::codec::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
}

enum Encoder {
    OpenAi(openai::codec::StreamEncoder),
    Anthropic(anthropic::StreamEncoder),
}

/// Upstream stream bytes → client stream bytes, one upstream read at a time: a synchronous
/// state machine, so nothing is buffered beyond an incomplete SSE line.
pub struct Transcoder {
    parser: crate::sse::Parser,
    events: Vec<crate::sse::Event>,
    decoder: Decoder,
    encoder: Encoder,
    deltas: Vec<Delta>,
    done: bool,
}

impl Transcoder {
    /// `model` is what the client sees in the stream; `client_wants_usage` keeps or drops
    /// the OpenAI usage chunk the gateway always asks an OpenAI-family upstream for.
    pub fn new(upstream: Surface, client: Surface, model: &str, client_wants_usage: bool) -> Transcoder {
        Transcoder {
            parser: crate::sse::Parser::new(),
            events: Vec::new(),
            decoder: match upstream {
                Surface::OpenAi => Decoder::OpenAi(Default::default()),
                Surface::Anthropic => Decoder::Anthropic(Default::default()),
            },
            encoder: match client {
                Surface::OpenAi => {
                    Encoder::OpenAi(openai::codec::StreamEncoder::new(model, client_wants_usage))
                }
                Surface::Anthropic => Encoder::Anthropic(anthropic::StreamEncoder::new(model)),
            },
            deltas: Vec::new(),
            done: false,
        }
    }

    /// Translates one upstream read; `Err` when the upstream sent something undecodable.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.parser.feed(bytes, &mut self.events)?;
        let res = self.decode();
        self.emit(out);
        res
    }

    fn decode(&mut self) -> Result<(), String> {
        match &mut self.decoder {
            Decoder::OpenAi(d) => d.decode(&mut self.events, &mut self.deltas),
            Decoder::Anthropic(d) => d.decode(&mut self.events, &mut self.deltas),
        }
    }

    /// The upstream body ended; `Err` when it ended without its terminal event.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        self.parser.finish(&mut self.events);
        let res = self.decode();
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

    pub fn usage(&self) -> canonical::Usage {
        match &self.encoder {
            Encoder::OpenAi(e) => e.usage(),
            Encoder::Anthropic(e) => e.usage(),
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>) {
        for d in self.deltas.drain(..) {
            if d == Delta::Done {
                self.done = true;
            }
            match &mut self.encoder {
                Encoder::OpenAi(e) => e.encode(&d, out),
                Encoder::Anthropic(e) => e.encode(&d, out),
            }
        }
    }
}

#[cfg(test)]
mod tests;
