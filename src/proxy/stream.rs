//! Streaming an upstream's answer to the client chunk by chunk as it arrives, through the
//! tap (same format) or the transcoder (different formats, or a trace to splice in).

use bytes::Bytes;

use super::billing;
use super::headers::Headers;
use super::respond;
use super::{GatewayState, Req, RequestCtx};
use crate::error::{GatewayError, Surface};
use crate::providers::upstream::{self, Exchange};
use crate::providers::Provider;
use crate::wire::{self, Transcoder};

/// What a stream's bytes go through on their way to the client.
// The tap, the common case, is kept inline: boxing it would allocate for every stream.
#[allow(clippy::large_enum_variant)]
pub enum StreamCodec {
    /// Same format: passed through, usage read on the way (and the usage the gateway asked
    /// for on the client's behalf taken out again).
    Tap(wire::usage::UsageTap),
    /// Different formats (or a trace to splice in): decoded and re-encoded.
    Transcode(Box<Transcoder>),
    /// A binary answer (speech audio): passed through, not read.
    Raw,
}

impl StreamCodec {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            StreamCodec::Tap(t) => {
                t.feed(chunk, out);
                Ok(())
            }
            StreamCodec::Transcode(t) => t.feed(chunk, out),
            StreamCodec::Raw => {
                out.extend_from_slice(chunk);
                Ok(())
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            StreamCodec::Tap(t) => {
                t.finish(out);
                Ok(())
            }
            StreamCodec::Transcode(t) => t.finish(out),
            StreamCodec::Raw => Ok(()),
        }
    }

    fn events(&self) -> u64 {
        match self {
            StreamCodec::Tap(t) => t.events(),
            StreamCodec::Transcode(t) => t.events(),
            StreamCodec::Raw => 0,
        }
    }

    fn usage(&self) -> Option<wire::canonical::Usage> {
        match self {
            StreamCodec::Tap(t) => t.usage(),
            StreamCodec::Transcode(t) => {
                let u = t.usage();
                (u.input > 0 || u.output > 0).then_some(u)
            }
            StreamCodec::Raw => None,
        }
    }

    /// The in-stream error event that ends a stream the upstream broke off (none for a
    /// binary answer, which is cut off instead).
    fn failure_event(&mut self, client: Surface, e: &GatewayError) -> Vec<u8> {
        match (self, client) {
            (StreamCodec::Raw, _) => Vec::new(),
            (StreamCodec::Transcode(t), _) => {
                let mut buf = Vec::new();
                t.fail(e.kind(), &e.message(), &mut buf);
                buf
            }
            // The Responses API's own error event.
            (StreamCodec::Tap(t), Surface::OpenAi) if t.is_responses() => {
                let event = serde_json::json!({
                    "type": "error", "code": e.code(), "message": e.message(), "param": null,
                });
                [b"event: error\ndata: ".as_slice(), event.to_string().as_bytes(), b"\n\n"].concat()
            }
            (StreamCodec::Tap(_), Surface::OpenAi) => {
                [b"data: ".as_slice(), &e.to_openai_body(), b"\n\n"].concat()
            }
            (StreamCodec::Tap(_), Surface::Anthropic) => {
                [b"event: error\ndata: ".as_slice(), &e.render(Surface::Anthropic), b"\n\n"].concat()
            }
        }
    }
}

/// Prices a stream from the usage it reported. A stream that did not complete reported at
/// most part of it (Anthropic's input and first output token): the upstream still billed
/// what it generated.
fn bill_stream(state: &GatewayState, ctx: &mut RequestCtx, codec: &StreamCodec, completed: bool) {
    let output = crate::estimate::stream_output_tokens(codec.events());
    billing::bill_answer(state, ctx, codec.usage(), completed, output);
}

/// Streams an SSE body to the client chunk by chunk as it arrives, through `codec`. An
/// upstream failure after the first byte is reported in-stream (an error event in the
/// client's format), then the stream is closed cleanly.
pub async fn stream(
    req: &mut Req<'_>,
    provider: &Provider,
    mut ex: Exchange,
    mut first: Option<Bytes>,
    mut headers: Headers,
    mut codec: StreamCodec,
) {
    let (state, settings) = (req.state, &req.snapshot.settings);
    let (session, ctx) = (&mut *req.session, &mut *req.ctx);
    headers.push((http::header::TRANSFER_ENCODING, "chunked".into()));
    ctx.streamed = true;
    // The upstream's own 2xx (a binary answer's may not be 200); streams are 200.
    let status = if matches!(codec, StreamCodec::Raw) { ex.header.status.as_u16() } else { 200 };
    if !respond::stream_header(session, ctx, status, headers).await {
        ex.session.shutdown().await;
        return;
    }
    let mut out = Vec::new();
    let failure: Option<GatewayError> = loop {
        let next = match first.take() {
            Some(chunk) => Ok(Some(chunk)),
            None => upstream::next_chunk(&mut ex, provider, &settings.upstream_timeouts()).await,
        };
        match next {
            Ok(Some(chunk)) => {
                // A binary answer goes as it came; the others through their codec.
                let piece = if matches!(codec, StreamCodec::Raw) {
                    chunk
                } else {
                    out.clear();
                    if let Err(message) = codec.feed(&chunk, &mut out) {
                        break Some(GatewayError::UpstreamStatus {
                            provider: provider.id.clone(),
                            status: 200,
                            message,
                        });
                    }
                    if let (StreamCodec::Tap(tap), true) = (&codec, ctx.owned_ids.is_empty()) {
                        // Known before the client sees the event naming it, so a follow-up
                        // can never arrive before the gateway knows where the response lives.
                        if let Some(id) = tap.response_id() {
                            super::passthrough::remember_owned(state, ctx, id.to_string());
                        }
                    }
                    if out.is_empty() {
                        continue;
                    }
                    // A tap that changed nothing hands back the chunk as it came: send that.
                    if out.len() == chunk.len() && out == chunk {
                        chunk
                    } else {
                        Bytes::copy_from_slice(&out)
                    }
                };
                if !respond::piece(session, ctx, piece).await {
                    ctx.upstream_time += ex.started.elapsed();
                    ex.session.shutdown().await;
                    bill_stream(state, ctx, &codec, false);
                    return;
                }
            }
            Ok(None) => {
                out.clear();
                let finished = codec.finish(&mut out);
                // Priced before the trace goes out, so the trace carries the cost.
                bill_stream(state, ctx, &codec, finished.is_ok());
                if let StreamCodec::Transcode(t) = &mut codec {
                    if let Some(trace) = ctx.trace.as_deref_mut() {
                        // The winning attempt lasted until its stream ended.
                        if let Some(last) = trace.attempts.last_mut() {
                            last.duration_ms = (ex.started.elapsed().as_secs_f64() * 1e6).round() / 1000.0;
                        }
                        if let Ok(json) = serde_json::value::to_raw_value(&*trace) {
                            t.release_done(&json, &mut out);
                        }
                    }
                }
                let tail = (!out.is_empty()).then(|| Bytes::copy_from_slice(&out));
                if let Some(tail) = &tail {
                    ctx.capture_response(tail);
                }
                // Stored before the stream's closing bytes go out (see `cache::finish`).
                if finished.is_ok() && ctx.cache_pending.is_some() {
                    super::cache_fill::finish(ctx).await;
                }
                if let Some(tail) = tail {
                    ctx.bytes_out += tail.len() as u64;
                    let _ = session.write_response_body(Some(tail), false).await;
                }
                break finished
                    .err()
                    .map(|message| GatewayError::UpstreamConnect { provider: provider.id.clone(), message });
            }
            Err(e) => break Some(e),
        }
    };
    ctx.upstream_time += ex.started.elapsed();
    if let Some(e) = failure {
        ex.session.shutdown().await;
        ctx.error_code = Some("upstream_stream_error");
        if ctx.bill.usage.is_none() {
            bill_stream(state, ctx, &codec, false);
        }
        if matches!(codec, StreamCodec::Raw) {
            // Closed, not finished: a cut binary body must not look whole.
            session.downstream_session.shutdown().await;
            return;
        }
        let event = Bytes::from(codec.failure_event(ctx.surface, &e));
        ctx.bytes_out += event.len() as u64;
        ctx.capture_response(&event);
        let _ = session.write_response_body(Some(event), true).await;
        return;
    }
    if let Err(e) = session.write_response_body(None, true).await {
        respond::client_gone(ctx, &e);
    }
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
}
