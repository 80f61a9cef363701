//! The one estimator of tokens that no upstream counted: routing facts and cost estimates,
//! reservations, local `count_tokens`, and answers that reported no usage. Every rule is
//! here, so an estimate means the same thing wherever it is read.

use crate::wire::canonical::{Part, Request};

/// Bytes of JSON (or characters of text) per token: close to English, enough to rank
/// candidates and price an answer whose usage is missing.
pub const BYTES_PER_TOKEN: u64 = 4;

/// Bytes per token a reservation assumes: a deliberate overcount (CJK text runs about
/// three UTF-8 bytes a token), so a budget's cap holds for any language.
pub const RESERVED_BYTES_PER_TOKEN: u64 = 3;

/// An image as the model reads it: about 1,500 tokens, whatever its size.
const IMAGE_TOKENS: u64 = 1_500;

/// Tokens in `bytes` of JSON or text.
pub fn json_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BYTES_PER_TOKEN)
}

/// The most tokens `bytes` of request body can hold, for reservations.
pub fn reserved_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(RESERVED_BYTES_PER_TOKEN)
}

/// Everything a model would read of a decoded request (system, messages, tools), for a
/// local `count_tokens`. At least one.
pub fn request_tokens(req: &Request) -> u64 {
    fn part_tokens(p: &Part) -> (usize, u64) {
        match p {
            Part::Text { text, .. } | Part::Thinking { text, .. } => (text.len(), 0),
            Part::ToolCall { name, arguments, .. } => (name.len() + arguments.len(), 0),
            Part::ToolResult { content, .. } => content
                .iter()
                .map(part_tokens)
                .fold((0, 0), |(c, t), (pc, pt)| (c + pc, t.saturating_add(pt))),
            Part::Image { .. } => (0, IMAGE_TOKENS),
            Part::RedactedThinking { data } => (data.len(), 0),
        }
    }
    let mut chars: usize = req.system.iter().map(|b| b.text.len()).sum();
    let mut fixed = 0u64;
    for (c, t) in req.messages.iter().flat_map(|m| m.content.iter()).map(part_tokens) {
        chars += c;
        fixed = fixed.saturating_add(t);
    }
    chars += req.tools.iter().map(|t| t.name.len() + t.parameters.to_string().len()).sum::<usize>();
    json_tokens(chars).saturating_add(fixed).max(1)
}

/// Output tokens of a stream that reported no usage: the upstream billed what it
/// generated, about one token per event.
pub fn stream_output_tokens(events: u64) -> u64 {
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_per_purpose() {
        assert_eq!(json_tokens(0), 0);
        assert_eq!(json_tokens(1), 1);
        assert_eq!(json_tokens(4000), 1000);
        assert_eq!(reserved_tokens(3000), 1000);
        assert!(reserved_tokens(10_000) > json_tokens(10_000), "a reservation overcounts");
    }

    #[test]
    fn a_request_counts_its_text_and_a_fixed_share_per_image() {
        let body = br#"{"model":"m","max_tokens":5,"system":"abcd","messages":[{"role":"user","content":[
            {"type":"text","text":"12345678"},
            {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]}]}"#;
        let req = crate::wire::decode_request(crate::error::Surface::Anthropic, body).unwrap();
        assert_eq!(request_tokens(&req), 3 + IMAGE_TOKENS);
    }
}
