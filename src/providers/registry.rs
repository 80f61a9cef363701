//! The one table of provider kinds.

use super::adapter::Adapter;
use crate::sse::Framer;
use crate::wire::WireFormat;

/// Every provider kind: the config's `kind:` names one of these.
pub static KINDS: &[&dyn Adapter] = &[
    &super::openai::OpenAi,
    &super::openai::OpenAiCompatible,
    &super::azure::Azure,
    &super::anthropic::Anthropic,
    &super::google::Google,
    &super::cohere::Cohere,
    &super::bedrock::Bedrock,
];

/// The adapter of `kind`, if there is one.
pub fn adapter(kind: &str) -> Option<&'static dyn Adapter> {
    KINDS.iter().copied().find(|a| a.kind() == kind)
}

/// The kinds, for error messages: `openai, openai_compatible, …`.
pub fn kind_names() -> String {
    KINDS.iter().map(|a| a.kind()).collect::<Vec<_>>().join(", ")
}

/// The stream framing of the kinds speaking `format` (they share it), for tools that see a
/// format without a provider (the conformance suite, the stream fuzzer). SSE when no kind
/// speaks it.
pub fn framer_for(format: WireFormat) -> Box<dyn Framer> {
    match KINDS.iter().find(|a| a.format() == format) {
        Some(a) => a.stream_framer(),
        None => Box::new(crate::sse::Parser::new()),
    }
}
