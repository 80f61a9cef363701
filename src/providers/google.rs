//! Google Gemini API (`kind: google`): the model and method are in the path, the key in
//! `x-goog-api-key`; streams are SSE with `alt=sse`.

use super::adapter::{Adapter, Credential};
use super::Provider;
use crate::wire::gemini::model_id;
use crate::wire::WireFormat;

pub struct Google;

impl Adapter for Google {
    fn kind(&self) -> &'static str {
        "google"
    }

    fn format(&self) -> WireFormat {
        WireFormat::Gemini
    }

    fn default_base_url(&self, _id: &str, _api_key: Option<&str>) -> Option<String> {
        Some("https://generativelanguage.googleapis.com/v1beta".into())
    }

    fn credential(&self, api_key: &str) -> Result<Credential, String> {
        Ok(Credential::Header("x-goog-api-key", api_key.to_string()))
    }

    fn chat_path(&self, provider: &Provider, model: &str, stream: bool) -> String {
        let model = model_id(model);
        provider.upstream_path(&if stream {
            format!("/models/{model}:streamGenerateContent?alt=sse")
        } else {
            format!("/models/{model}:generateContent")
        })
    }

    fn embeddings_path(&self, provider: &Provider, model: &str) -> String {
        provider.upstream_path(&format!("/models/{}:batchEmbedContents", model_id(model)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_carry_the_model_and_method() {
        let p = super::super::tests::provider("google", "https://generativelanguage.googleapis.com/v1beta");
        assert_eq!(
            Google.chat_path(&p, "gemini-2.5-flash", false),
            "/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert_eq!(
            Google.chat_path(&p, "models/gemini-2.5-flash", true),
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            Google.embeddings_path(&p, "gemini-embedding-001"),
            "/v1beta/models/gemini-embedding-001:batchEmbedContents"
        );
    }
}
