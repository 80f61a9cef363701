//! One codec per wire format behind one trait: what the gateway does with a format's
//! bytes. Every format is a provider format ([`Codec`]); the two client surfaces are also
//! [`SurfaceCodec`]s. Each format's implementation is in its own file; `registry` holds
//! the one table that finds it.

use super::canonical::{Delta, EmbeddingsRequest, EmbeddingsResponse, Request, Response, Usage};
use super::WireFormat;
use crate::error::{GatewayError, Surface};
use crate::sse::Event;

/// A provider-side wire format: request bodies out, answers (whole or streamed) back.
pub trait Codec: Sync {
    fn format(&self) -> WireFormat;

    /// Canonical request → upstream body; `Err` when the request uses something this
    /// format cannot express.
    fn encode_request(&self, req: &Request, model: &str) -> Result<Vec<u8>, String>;

    /// A whole upstream answer → canonical.
    fn decode_response(&self, body: &[u8]) -> Result<Response, String>;

    /// Upstream stream events → canonical deltas, one stream at a time.
    fn stream_decoder(&self) -> Box<dyn StreamDecoder>;

    /// The human-readable message of an upstream error body.
    fn error_message(&self, body: &[u8]) -> Option<String>;

    /// The usage a whole answer reports. The default decodes the answer; the client
    /// surfaces, whose answers pass through undecoded, read only the usage member.
    fn usage(&self, body: &[u8]) -> Option<Usage> {
        self.decode_response(body).ok().map(|r| r.usage)
    }

    /// Canonical embeddings request → upstream body; `None`: the format has no embeddings
    /// endpoint the gateway translates to.
    fn encode_embeddings(&self, _req: &EmbeddingsRequest, _model: &str) -> Option<Result<Vec<u8>, String>> {
        None
    }

    fn decode_embeddings(&self, _body: &[u8]) -> Option<Result<EmbeddingsResponse, String>> {
        None
    }
}

/// A client surface's wire format: requests in, answers and errors out.
pub trait SurfaceCodec: Codec {
    fn surface(&self) -> Surface;

    /// Client body → canonical request.
    fn decode_request(&self, body: &[u8]) -> Result<Request, GatewayError>;

    /// Canonical answer → client body.
    fn encode_response(&self, resp: &Response) -> Vec<u8>;

    /// Canonical deltas → client stream bytes. `send_usage`: the client asked for a usage
    /// chunk (OpenAI's `stream_options.include_usage`).
    fn stream_encoder(&self, model: &str, send_usage: bool) -> Box<dyn StreamEncoder>;

    /// A gateway error in this surface's envelope.
    fn error_body(&self, err: &GatewayError) -> Vec<u8> {
        err.render(self.surface())
    }
}

/// Upstream events → deltas. Stateful: one per stream.
pub trait StreamDecoder: Send {
    /// Decodes (and drains) `events`, appending deltas.
    fn decode(&mut self, events: &mut Vec<Event>, out: &mut Vec<Delta>) -> Result<(), String>;

    /// End of the upstream body: formats without a terminal event decide here.
    fn finish(&mut self, _out: &mut Vec<Delta>) -> Result<(), String> {
        Ok(())
    }
}

/// Deltas → client stream bytes. Stateful: one per stream.
pub trait StreamEncoder: Send {
    fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>);

    /// Usage as reported so far.
    fn usage(&self) -> Usage;

    /// The stream's end with the decision trace in it: a choice-less chunk before `[DONE]`
    /// (OpenAI) or an `mlx:trace` member on `message_stop` (Anthropic).
    fn done_with_trace(&mut self, trace: &serde_json::value::RawValue, out: &mut Vec<u8>);
}

/// Implements [`Codec`] (and the format's [`StreamDecoder`]) over a format module's own
/// functions: `encode_request`, `decode_response`, `error_message`, `StreamDecoder` with
/// `decode` and `finish`, and with `embeddings` also `encode_embeddings` and
/// `decode_embeddings`. Used inside the format's module.
macro_rules! provider_codec {
    ($codec:ident, $format:ident $(, $embeddings:ident)?) => {
        #[doc = concat!("The ", stringify!($format), " codec (`wire::codec::Codec`), found through `wire::registry`.")]
        pub struct $codec;

        impl $crate::wire::codec::Codec for $codec {
            fn format(&self) -> $crate::wire::WireFormat {
                $crate::wire::WireFormat::$format
            }

            fn encode_request(&self, req: &Request, model: &str) -> Result<Vec<u8>, String> {
                encode_request(req, model)
            }

            fn decode_response(&self, body: &[u8]) -> Result<Response, String> {
                decode_response(body)
            }

            fn stream_decoder(&self) -> Box<dyn $crate::wire::codec::StreamDecoder> {
                Box::new(StreamDecoder::default())
            }

            fn error_message(&self, body: &[u8]) -> Option<String> {
                error_message(body)
            }

            $($crate::wire::codec::provider_codec!(@$embeddings);)?
        }

        impl $crate::wire::codec::StreamDecoder for StreamDecoder {
            fn decode(
                &mut self,
                events: &mut Vec<$crate::sse::Event>,
                out: &mut Vec<Delta>,
            ) -> Result<(), String> {
                StreamDecoder::decode(self, events, out)
            }

            fn finish(&mut self, out: &mut Vec<Delta>) -> Result<(), String> {
                StreamDecoder::finish(self, out)
            }
        }
    };
    (@embeddings) => {
        fn encode_embeddings(&self, req: &EmbeddingsRequest, model: &str) -> Option<Result<Vec<u8>, String>> {
            Some(encode_embeddings(req, model))
        }

        fn decode_embeddings(&self, body: &[u8]) -> Option<Result<EmbeddingsResponse, String>> {
            Some(decode_embeddings(body))
        }
    };
}
pub(crate) use provider_codec;

/// Implements [`Codec`] (and the format's [`StreamDecoder`]) for a client surface's format:
/// its requests always encode, its errors nest their message under `error`, and its usage
/// is read without decoding the answer (the answer passes through undecoded).
macro_rules! surface_format_codec {
    ($codec:ident, $format:ident $(, $embeddings:ident)?) => {
        impl $crate::wire::codec::Codec for $codec {
            fn format(&self) -> $crate::wire::WireFormat {
                $crate::wire::WireFormat::$format
            }

            fn encode_request(&self, req: &Request, model: &str) -> Result<Vec<u8>, String> {
                Ok(encode_request(req, model))
            }

            fn decode_response(&self, body: &[u8]) -> Result<Response, String> {
                decode_response(body)
            }

            fn stream_decoder(&self) -> Box<dyn $crate::wire::codec::StreamDecoder> {
                Box::new(StreamDecoder::default())
            }

            fn error_message(&self, body: &[u8]) -> Option<String> {
                $crate::wire::nested_error_message(body)
            }

            fn usage(&self, body: &[u8]) -> Option<Usage> {
                $crate::wire::usage::from_body($crate::wire::WireFormat::$format, body)
            }

            $($crate::wire::codec::provider_codec!(@$embeddings);)?
        }

        impl $crate::wire::codec::StreamDecoder for StreamDecoder {
            fn decode(
                &mut self,
                events: &mut Vec<$crate::sse::Event>,
                out: &mut Vec<Delta>,
            ) -> Result<(), String> {
                StreamDecoder::decode(self, events, out)
            }
        }
    };
}
pub(crate) use surface_format_codec;
