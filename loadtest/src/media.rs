//! OpenAI audio and images for the mock upstream (also under Azure's deployment paths):
//! `/v1/audio/transcriptions` and `/v1/audio/translations` (multipart; JSON, `text` or
//! `verbose_json` answers), `/v1/audio/speech` (binary audio sent in chunks, paced like a
//! stream's tokens, or SSE with `stream_format: "sse"`) and `/v1/images/generations`, in
//! the shapes of OpenAI's API reference. Token-priced models (`gpt-4o-transcribe`,
//! `gpt-image-1`, `gpt-4o-mini-tts`) report token usage; the others as the API does.

use base64::Engine;
use serde_json::{json, Value};

use crate::answer::{self, Answer, Ctx, Event};
use crate::files::multipart;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Transcriptions,
    Translations,
    Speech,
    Images,
}

impl Op {
    /// `endpoint`: the path after `/v1/` (or after Azure's deployment).
    pub(crate) fn from_endpoint(endpoint: &str) -> Option<Op> {
        Some(match endpoint {
            "audio/transcriptions" => Op::Transcriptions,
            "audio/translations" => Op::Translations,
            "audio/speech" => Op::Speech,
            "images/generations" => Op::Images,
            _ => return None,
        })
    }
}

fn error(status: u16, message: &str, param: Option<&str>) -> Answer {
    let body =
        json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}});
    Answer::json(status, answer::pretty(&body))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Bytes of speech for `text`: an ID3 tag, then a pattern (4 KiB per input character,
/// at most 4 MiB).
fn speech_bytes(text: &str) -> Vec<u8> {
    let n = (text.chars().count() * 4096).clamp(4096, 4 << 20);
    let mut out = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    out.extend((0..n).map(|i| (i % 251) as u8));
    out
}

/// `deployment`: Azure's (the model when the body names none).
pub(crate) fn answer(
    ctx: &Ctx<'_>,
    op: Op,
    deployment: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Answer {
    match op {
        Op::Transcriptions | Op::Translations => {
            let Some(parts) = multipart(content_type, body) else {
                return error(400, "Expected multipart/form-data.", None);
            };
            let field = |name: &str| {
                parts.iter().find(|p| p.name == name).map(|p| String::from_utf8_lossy(p.data).to_string())
            };
            let Some(file) = parts.iter().find(|p| p.name == "file" && p.filename.is_some()) else {
                return error(400, "Missing required parameter: 'file'.", Some("file"));
            };
            let Some(model) = field("model").or(deployment.map(str::to_string)) else {
                return error(400, "Missing required parameter: 'model'.", Some("model"));
            };
            let verb = if op == Op::Translations { "translation" } else { "transcript" };
            let text = format!("mock {verb} of {} bytes", file.data.len());
            let format = field("response_format").unwrap_or_else(|| "json".into());
            if format == "text" {
                return Answer::Body {
                    status: 200,
                    content_type: "text/plain; charset=utf-8",
                    body: format!("{text}\n").into_bytes(),
                    headers: std::borrow::Cow::Borrowed(""),
                };
            }
            let seconds = (file.data.len() as f64 / 16_000.0).ceil().max(1.0);
            let usage = if model.contains("transcribe") {
                let audio = (seconds as u64) * 10;
                json!({"type": "tokens", "input_tokens": audio,
                       "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
                       "output_tokens": ctx.cfg.tokens, "total_tokens": audio + ctx.cfg.tokens as u64})
            } else {
                json!({"type": "duration", "seconds": seconds})
            };
            let mut out = if format == "verbose_json" {
                json!({"task": op_task(op), "language": "english", "duration": seconds, "text": text,
                       "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                                     "tokens": [50364], "temperature": 0.0, "avg_logprob": -0.2,
                                     "compression_ratio": 1.0, "no_speech_prob": 0.01}]})
            } else {
                json!({"text": text})
            };
            if op == Op::Transcriptions {
                out["usage"] = usage;
            }
            Answer::json(200, answer::pretty(&out))
        }
        Op::Speech => {
            let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(input) = req.get("input").and_then(Value::as_str) else {
                return error(400, "Missing required parameter: 'input'.", Some("input"));
            };
            if req.get("model").and_then(Value::as_str).is_none() && deployment.is_none() {
                return error(400, "Missing required parameter: 'model'.", Some("model"));
            }
            let audio = speech_bytes(input);
            let pieces = audio.chunks(16 * 1024);
            if req.get("stream_format").and_then(Value::as_str) == Some("sse") {
                let b64 = base64::engine::general_purpose::STANDARD;
                let mut events: Vec<Event> = pieces
                    .map(|p| {
                        let data = json!({"type": "speech.audio.delta", "audio": b64.encode(p)});
                        let bytes = format!("event: speech.audio.delta\ndata: {data}\n\n").into_bytes();
                        Event { bytes, delta: true }
                    })
                    .collect();
                let tokens = input.len().div_ceil(4) as u64;
                let done = json!({"type": "speech.audio.done", "usage": {
                    "input_tokens": tokens, "output_tokens": audio.len() as u64 / 1024,
                    "total_tokens": tokens + audio.len() as u64 / 1024}});
                events.push(Event {
                    bytes: format!("event: speech.audio.done\ndata: {done}\n\n").into_bytes(),
                    delta: false,
                });
                return Answer::Stream { content_type: "text/event-stream", events, trailer: b"" };
            }
            let events = pieces.map(|p| Event { bytes: p.to_vec(), delta: true }).collect();
            Answer::Stream { content_type: "audio/mpeg", events, trailer: b"" }
        }
        Op::Images => {
            let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(prompt) = req.get("prompt").and_then(Value::as_str) else {
                return error(400, "Missing required parameter: 'prompt'.", Some("prompt"));
            };
            let model = req.get("model").and_then(Value::as_str).or(deployment).unwrap_or("dall-e-2");
            let n = req.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 10);
            let b64 = base64::engine::general_purpose::STANDARD;
            let image = b64.encode(b"\x89PNG\r\n\x1a\nmock image");
            let as_b64 = model.starts_with("gpt-image")
                || req.get("response_format").and_then(Value::as_str) == Some("b64_json");
            let data: Vec<Value> = (0..n)
                .map(|i| {
                    if as_b64 {
                        json!({"b64_json": image})
                    } else {
                        json!({"url": format!("https://images.mock.invalid/{}-{i}.png", ctx.seq), "revised_prompt": prompt})
                    }
                })
                .collect();
            let mut out = json!({"created": now(), "data": data});
            if model.starts_with("gpt-image") {
                let input = prompt.len().div_ceil(4) as u64;
                out["usage"] = json!({"total_tokens": input + 1056 * n, "input_tokens": input,
                                      "output_tokens": 1056 * n,
                                      "input_tokens_details": {"text_tokens": input, "image_tokens": 0}});
            }
            Answer::json(200, answer::pretty(&out))
        }
    }
}

fn op_task(op: Op) -> &'static str {
    if op == Op::Translations {
        "translate"
    } else {
        "transcribe"
    }
}
