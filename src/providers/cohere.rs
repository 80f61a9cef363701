//! Cohere (`kind: cohere`): the v2 Chat and Embed APIs, one path each whether streamed or
//! not, keyed by `Authorization: Bearer`.

use super::adapter::Adapter;
use super::Provider;
use crate::wire::WireFormat;

pub struct Cohere;

impl Adapter for Cohere {
    fn kind(&self) -> &'static str {
        "cohere"
    }

    fn format(&self) -> WireFormat {
        WireFormat::Cohere
    }

    fn default_base_url(&self, _id: &str, _api_key: Option<&str>) -> Option<String> {
        Some("https://api.cohere.com".into())
    }

    fn chat_path(&self, provider: &Provider, _model: &str, _stream: bool) -> String {
        provider.upstream_path("/v2/chat")
    }

    fn embeddings_path(&self, provider: &Provider, _model: &str) -> String {
        provider.upstream_path("/v2/embed")
    }

    fn verify_path(&self, provider: &Provider) -> Option<String> {
        Some(provider.upstream_path("/v1/models"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = super::super::tests::provider("cohere", "https://api.cohere.com");
        assert_eq!(Cohere.chat_path(&p, "command-a-03-2025", false), "/v2/chat");
        assert_eq!(Cohere.chat_path(&p, "command-a-03-2025", true), "/v2/chat");
        assert_eq!(Cohere.embeddings_path(&p, "embed-v4.0"), "/v2/embed");
        assert_eq!(Cohere.default_base_url("cohere", None).as_deref(), Some("https://api.cohere.com"));
    }
}
