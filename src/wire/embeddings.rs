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

/// Canonical response → the OpenAI embeddings list the client expects. `model` is the
/// name the client sees.
pub fn encode_response(resp: &EmbeddingsResponse, model: &str, encoding: Encoding) -> Vec<u8> {
    let data: Vec<Value> = resp
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = match encoding {
                Encoding::Float => json!(vector),
                // What OpenAI sends for base64: the little-endian f32 bytes.
                Encoding::Base64 => {
                    let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": resp.input_tokens, "total_tokens": resp.input_tokens},
    });
    serde_json::to_vec(&body).unwrap_or_default()
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
