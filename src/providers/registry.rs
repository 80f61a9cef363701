//! The one table of provider kinds.

use super::adapter::Adapter;

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
