//! OpenAI (`kind: openai`) and every server that speaks its API (`kind: openai_compatible`:
//! vLLM, Ollama, Groq, Together, …; well-known vendors need no `base_url`).

use super::adapter::Adapter;
use super::Provider;
use crate::wire::WireFormat;

pub struct OpenAi;

impl Adapter for OpenAi {
    fn kind(&self) -> &'static str {
        "openai"
    }

    fn format(&self) -> WireFormat {
        WireFormat::OpenAi
    }

    fn default_base_url(&self, _id: &str, _api_key: Option<&str>) -> Option<String> {
        Some("https://api.openai.com/v1".into())
    }

    fn chat_path(&self, provider: &Provider, _model: &str, _stream: bool) -> String {
        provider.upstream_path("/chat/completions")
    }

    fn openai_resource_path(&self, provider: &Provider, endpoint: &str) -> Option<String> {
        Some(provider.upstream_path(endpoint))
    }

    fn openai_model_path(&self, provider: &Provider, _model: &str, endpoint: &str) -> Option<String> {
        Some(provider.upstream_path(endpoint))
    }
}

/// OpenAI-compatible vendors known by provider id: `{ id: groq, kind: openai_compatible }`
/// needs no `base_url`.
pub const VENDOR_BASE_URLS: &[(&str, &str)] = &[
    ("groq", "https://api.groq.com/openai/v1"),
    ("fireworks", "https://api.fireworks.ai/inference/v1"),
    ("deepseek", "https://api.deepseek.com/v1"),
    ("xai", "https://api.x.ai/v1"),
    ("mistral", "https://api.mistral.ai/v1"),
    ("cerebras", "https://api.cerebras.ai/v1"),
    ("together", "https://api.together.xyz/v1"),
    ("perplexity", "https://api.perplexity.ai"),
];

pub struct OpenAiCompatible;

impl Adapter for OpenAiCompatible {
    fn kind(&self) -> &'static str {
        "openai_compatible"
    }

    fn format(&self) -> WireFormat {
        WireFormat::OpenAi
    }

    fn default_base_url(&self, id: &str, _api_key: Option<&str>) -> Option<String> {
        VENDOR_BASE_URLS.iter().find(|(v, _)| *v == id).map(|(_, url)| url.to_string())
    }

    fn chat_path(&self, provider: &Provider, _model: &str, _stream: bool) -> String {
        provider.upstream_path("/chat/completions")
    }

    fn openai_resource_path(&self, provider: &Provider, endpoint: &str) -> Option<String> {
        Some(provider.upstream_path(endpoint))
    }
}
