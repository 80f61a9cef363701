//! OpenAI embeddings (the client surface) ↔ canonical embeddings. OpenAI-family targets get
//! the client's bytes (see `RoutedRequest::parse_routed`); these are for translated targets.

use base64::Engine as _;
use serde_json::{json, Value};

use super::canonical::{EmbeddingsRequest, EmbeddingsResponse};
use crate::error::GatewayError;

/// How the client wants vectors back. The OpenAI SDK asks for `base64` unless told otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

fn bad(code: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(code, message)
}

/// Client body → canonical request and the encoding to answer in. Token-array inputs only
/// mean something to OpenAI's tokenizers, so a translated target cannot take them.
pub fn decode_request(body: &[u8]) -> Result<(EmbeddingsRequest, Encoding), GatewayError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad("invalid_json", format!("request body is not valid JSON: {e}")))?;
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
    let inputs = match v.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => out.push(s.clone()),
                    _ => {
                        return Err(bad(
                            "invalid_type",
                            format!(
                                "input[{i}]: only text inputs can be sent to this provider (token arrays are OpenAI-only)"
                            ),
                        ))
                    }
                }
            }
            out
        }
        _ => return Err(bad("missing_field", "Missing required field: input")),
    };
    if inputs.is_empty() {
        return Err(bad("invalid_request", "input must not be empty"));
    }
    let encoding = match v.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(other) => {
            return Err(bad(
                "invalid_value",
                format!("encoding_format must be \"float\" or \"base64\", not {other}"),
            ))
        }
    };
    let dimensions = match v.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => Some(
            d.as_u64()
                .filter(|d| *d > 0)
                .ok_or_else(|| bad("invalid_type", "dimensions must be a positive integer"))?,
        ),
    };
    let user = v.get("user").and_then(Value::as_str).map(str::to_string);
    Ok((EmbeddingsRequest { model, inputs, dimensions, user }, encoding))
}

/// One vector of an answer, as OpenAI writes it.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    /// Serialized as f32s, so each prints as its shortest f32 text (what OpenAI sends), not
    /// the f64 widening of it.
    Float(&'a [f32]),
    Base64(String),
}

#[derive(serde::Serialize)]
struct Item<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(serde::Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(serde::Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Item<'a>>,
    model: &'a str,
    usage: Usage,
}

/// Canonical response → the OpenAI embeddings list the client expects. `model` is the
/// name the client sees.
pub fn encode_response(resp: &EmbeddingsResponse, model: &str, encoding: Encoding) -> Vec<u8> {
    let data = resp
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = match encoding {
                Encoding::Float => Vector::Float(vector),
                // What OpenAI sends for base64: the little-endian f32 bytes.
                Encoding::Base64 => {
                    let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                    Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            Item { object: "embedding", index, embedding }
        })
        .collect();
    let body = List {
        object: "list",
        data,
        model,
        usage: Usage { prompt_tokens: resp.input_tokens, total_tokens: resp.input_tokens },
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Canonical request → an OpenAI embeddings body (float vectors), for a caller of its own
/// (the semantic cache); client requests to OpenAI-family targets pass as sent.
pub fn encode_request(req: &EmbeddingsRequest, model: &str) -> Result<Vec<u8>, String> {
    let mut body = json!({"model": model, "input": req.inputs, "encoding_format": "float"});
    if let Some(d) = req.dimensions {
        body["dimensions"] = json!(d);
    }
    serde_json::to_vec(&body).map_err(|e| e.to_string())
}

/// An OpenAI embeddings list (float or base64 vectors) → canonical response.
pub fn decode_response(body: &[u8]) -> Result<EmbeddingsResponse, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("embeddings answer: {e}"))?;
    let data = v.get("data").and_then(Value::as_array).ok_or("embeddings answer without data")?;
    let mut vectors = vec![Vec::new(); data.len()];
    for (i, item) in data.iter().enumerate() {
        let index = item.get("index").and_then(Value::as_u64).map_or(i, |n| n as usize);
        let vector: Vec<f32> = match item.get("embedding") {
            Some(Value::Array(xs)) => xs.iter().filter_map(Value::as_f64).map(|x| x as f32).collect(),
            Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("embedding {index}: {e}"))?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            _ => return Err(format!("embedding {index} has no vector")),
        };
        let slot = vectors.get_mut(index).ok_or_else(|| format!("embedding index {index} out of range"))?;
        *slot = vector;
    }
    if vectors.iter().any(Vec::is_empty) {
        return Err("embeddings answer is missing vectors".into());
    }
    let input_tokens = v.pointer("/usage/prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
    Ok(EmbeddingsResponse { model, vectors, input_tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_openai_bodies() {
        let (req, enc) = decode_request(
            br#"{"model":"@e","input":["a","b"],"encoding_format":"base64","dimensions":256,"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(enc, Encoding::Base64);
        assert_eq!(req.inputs, vec!["a", "b"]);
        assert_eq!((req.dimensions, req.user.as_deref()), (Some(256), Some("u")));
        let (req, enc) = decode_request(br#"{"model":"m","input":"one"}"#).unwrap();
        assert_eq!((req.inputs.len(), enc), (1, Encoding::Float));
        for (body, code) in [
            (&br#"{"model":"m","input":[[1,2]]}"#[..], "invalid_type"),
            (br#"{"model":"m","input":[]}"#, "invalid_request"),
            (br#"{"model":"m"}"#, "missing_field"),
            (br#"{"model":"m","input":"x","encoding_format":"hex"}"#, "invalid_value"),
            (br#"{"model":"m","input":"x","dimensions":0}"#, "invalid_type"),
        ] {
            assert_eq!(decode_request(body).unwrap_err().code(), code, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let resp = EmbeddingsResponse { model: "x".into(), vectors: vec![vec![1.0, -0.5]], input_tokens: 3 };
        let v: Value = serde_json::from_slice(&encode_response(&resp, "m", Encoding::Base64)).unwrap();
        let b64 = v["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat());
        assert_eq!(v["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
        let v: Value = serde_json::from_slice(&encode_response(&resp, "m", Encoding::Float)).unwrap();
        assert_eq!(v["data"][0], json!({"object": "embedding", "index": 0, "embedding": [1.0, -0.5]}));
        assert_eq!(v["model"], "m");
    }
}
