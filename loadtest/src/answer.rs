//! What the newer provider modules (Gemini, Cohere, Bedrock, Azure, OpenAI
//! embeddings) hand back to the server: a complete body or a list of stream
//! events. The modules only render bytes; `mock.rs` owns the socket and
//! applies pacing and scripted failures the same way for every API.

use std::borrow::Cow;
use std::io::Write;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use crate::mock::MockConfig;

/// Arguments of every mock tool call, as JSON.
pub(crate) const WEATHER_ARGS: &str = r#"{"location":"Paris"}"#;
/// The same arguments as streamed pieces (joined they are `WEATHER_ARGS`).
pub(crate) const WEATHER_ARG_PIECES: [&str; 2] = [r#"{"location":"#, r#""Paris"}"#];
/// Output tokens a tool-call answer reports.
pub(crate) const TOOL_CALL_TOKENS: u64 = 12;

/// Per-request values a module renders with.
pub(crate) struct Ctx<'a> {
    pub seq: u64,
    pub cfg: &'a MockConfig,
    /// The path parameter: Gemini model, Bedrock model id, Azure deployment.
    pub param: &'a str,
}

impl Ctx<'_> {
    /// Content tokens for an answer capped at `max` (a request's max tokens).
    pub(crate) fn token_count(&self, max: Option<u64>) -> usize {
        let cap = max.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        self.cfg.tokens.min(cap)
    }
}

/// One event of a streamed answer, already framed for one HTTP chunk.
pub(crate) struct Event {
    pub bytes: Vec<u8>,
    /// A content delta: `ttft` is waited before the first, `inter_token`
    /// before each later one.
    pub delta: bool,
}

/// A rendered answer.
pub(crate) enum Answer {
    Body {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
        /// Extra header lines, each ending in `\r\n`.
        headers: Cow<'static, str>,
    },
    Stream {
        content_type: &'static str,
        events: Vec<Event>,
        /// Sent after the last event (`data: [DONE]`, a closing `]`); not an
        /// event for `ResetMidStream`.
        trailer: &'static [u8],
    },
}

impl Answer {
    pub(crate) fn json(status: u16, body: Vec<u8>) -> Answer {
        Answer::Body { status, content_type: "application/json", body, headers: Cow::Borrowed("") }
    }
}

/// A JSON object that keeps its members in the order written: serde_json's
/// `Value` sorts keys, and a provider's key order is part of its wire look.
pub(crate) struct Obj(pub Vec<(&'static str, J)>);

/// A JSON value of an [`Obj`].
pub(crate) enum J {
    V(Value),
    O(Obj),
    A(Vec<J>),
    /// Kept as f32 so it prints as f32 (`Value` would widen it to f64 digits).
    F32(Vec<f32>),
}

impl Serialize for Obj {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Serialize for J {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            J::V(v) => v.serialize(s),
            J::O(o) => o.serialize(s),
            J::A(a) => a.serialize(s),
            J::F32(f) => f.serialize(s),
        }
    }
}

/// Conversion for the values of [`obj!`].
pub(crate) trait IntoJ {
    fn into_j(self) -> J;
}

impl IntoJ for J {
    fn into_j(self) -> J {
        self
    }
}

impl IntoJ for Obj {
    fn into_j(self) -> J {
        J::O(self)
    }
}

impl IntoJ for Vec<J> {
    fn into_j(self) -> J {
        J::A(self)
    }
}

impl IntoJ for Vec<Obj> {
    fn into_j(self) -> J {
        J::A(self.into_iter().map(J::O).collect())
    }
}

macro_rules! into_j_via_value {
    ($($t:ty),*) => {$(
        impl IntoJ for $t {
            fn into_j(self) -> J {
                J::V(Value::from(self))
            }
        }
    )*};
}
into_j_via_value!(Value, &str, String, u64, i64, u32, bool, Vec<String>);

impl IntoJ for Vec<f32> {
    fn into_j(self) -> J {
        J::F32(self)
    }
}

impl IntoJ for Vec<Vec<f32>> {
    fn into_j(self) -> J {
        J::A(self.into_iter().map(J::F32).collect())
    }
}

impl IntoJ for &String {
    fn into_j(self) -> J {
        J::V(Value::from(self.as_str()))
    }
}

/// `obj! { "key": value, ... }`: an [`Obj`] with members in this order.
macro_rules! obj {
    ($($k:literal : $v:expr),* $(,)?) => {
        $crate::answer::Obj(vec![$(($k, $crate::answer::IntoJ::into_j($v))),*])
    };
}
pub(crate) use obj;

/// Compact JSON of `v`.
pub(crate) fn compact<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these in-memory shapes into a Vec cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Two-space indented JSON of `v` (Google's and OpenAI's embeddings look).
pub(crate) fn pretty<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

/// The `i`-th content token.
pub(crate) fn token(i: usize) -> String {
    format!(" tok{i}")
}

/// The whole text of an answer of `n` tokens.
pub(crate) fn text(n: usize) -> String {
    (0..n).map(token).collect()
}

/// Rough tokenizer stand-in: ~4 bytes per token, at least 1.
pub(crate) fn input_tokens(body: &[u8]) -> u64 {
    (body.len() as u64 / 4).max(1)
}

/// Whether a user turn asks for the mock tool call.
pub(crate) fn mentions_weather(text: &str) -> bool {
    text.to_ascii_lowercase().contains("weather")
}

/// A UUID-shaped id (`6d6f636b` is "mock"), unique per request.
pub(crate) fn uuid(seq: u64) -> String {
    format!("6d6f636b-0000-4000-8000-{:012x}", seq & 0xffff_ffff_ffff)
}

/// Appends [`uuid`] without allocating.
pub(crate) fn push_uuid(out: &mut Vec<u8>, seq: u64) {
    let _ = write!(out, "6d6f636b-0000-4000-8000-{:012x}", seq & 0xffff_ffff_ffff);
}

/// A deterministic unit vector for `input`: the same text always embeds the
/// same, different texts (almost surely) differently.
pub(crate) fn embedding(input: &[u8], dims: usize) -> Vec<f32> {
    // FNV-1a seeds an xorshift generator.
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in input {
        x ^= u64::from(b);
        x = x.wrapping_mul(0x0100_0000_01b3);
    }
    x |= 1;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|a| *a /= norm);
    }
    v
}

/// The vector a test chose for a text: `[[vec:x,y,…]]` anywhere in it embeds to exactly
/// that (so a test controls how similar two prompts are).
pub(crate) fn chosen_vector(input: &[u8]) -> Option<Vec<f32>> {
    let text = std::str::from_utf8(input).ok()?;
    let start = text.find("[[vec:")? + "[[vec:".len();
    let end = start + text[start..].find("]]")?;
    text[start..end].split(',').map(|x| x.trim().parse::<f32>().ok()).collect()
}

/// The raw query parameter `name` of a request target's query string.
pub(crate) fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// Decodes `%XX` escapes (Bedrock model ids carry `:` and `/` encoded).
/// Invalid escapes are kept as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Text of an OpenAI/Cohere-style message `content`: a string, or an array
/// of parts whose `text` members are joined.
pub(crate) fn content_text(content: &serde_json::Value) -> String {
    match content {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts.iter().filter_map(|p| p.get("text")?.as_str()).collect(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding(b"hello", 64);
        assert_eq!(a, embedding(b"hello", 64));
        assert_ne!(a, embedding(b"hellp", 64));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert!(embedding(b"", 0).is_empty());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("anthropic.claude-v2%3A1"), "anthropic.claude-v2:1");
        assert_eq!(percent_decode("arn%3Aaws%2Fx"), "arn:aws/x");
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("alt=sse&key=k", "alt"), Some("sse"));
        assert_eq!(query_param("key=k&api-version=2024-10-21", "api-version"), Some("2024-10-21"));
        assert_eq!(query_param("flag", "flag"), Some(""));
        assert_eq!(query_param("", "alt"), None);
    }

    #[test]
    fn obj_keeps_member_order() {
        let o = obj! {"z": 1u64, "a": obj! {"y": "s", "b": J::A(vec![])}, "m": true, "f": vec![0.1f32]};
        assert_eq!(compact(&o), br#"{"z":1,"a":{"y":"s","b":[]},"m":true,"f":[0.1]}"#);
    }

    #[test]
    fn weather() {
        assert!(mentions_weather("What's the Weather in Paris?"));
        assert!(!mentions_weather("Say hello"));
    }
}
