//! Azure OpenAI (`kind: azure`): the OpenAI wire format, addressed by deployment (the model
//! name is the deployment name), with `api-version` on every call and an `api-key` header.

use super::adapter::{Adapter, Credential};
use super::{path_segment, Provider};
use crate::wire::WireFormat;

pub struct Azure;

impl Azure {
    fn path(provider: &Provider, deployment: &str, operation: &str) -> String {
        format!(
            "{}/openai/deployments/{}/{operation}?api-version={}",
            provider.base_path,
            path_segment(deployment),
            provider.api_version
        )
    }
}

impl Adapter for Azure {
    fn kind(&self) -> &'static str {
        "azure"
    }

    fn format(&self) -> WireFormat {
        WireFormat::OpenAi
    }

    fn default_base_url(&self, _id: &str, _api_key: Option<&str>) -> Option<String> {
        None
    }

    fn credential(&self, api_key: &str) -> Result<Credential, String> {
        Ok(Credential::Header("api-key", api_key.to_string()))
    }

    fn chat_path(&self, provider: &Provider, model: &str, _stream: bool) -> String {
        Azure::path(provider, model, "chat/completions")
    }

    fn embeddings_path(&self, provider: &Provider, model: &str) -> String {
        Azure::path(provider, model, "embeddings")
    }

    /// Azure serves the Responses API, files and batches on its v1 API
    /// (`/openai/v1/responses`), which takes no `api-version`.
    fn openai_resource_path(&self, provider: &Provider, endpoint: &str) -> Option<String> {
        Some(format!("{}/openai/v1{endpoint}", provider.base_path))
    }

    fn openai_model_path(&self, provider: &Provider, model: &str, endpoint: &str) -> Option<String> {
        Some(Azure::path(provider, model, endpoint.trim_start_matches('/')))
    }

    fn takes_api_version(&self) -> bool {
        true
    }

    fn verify_path(&self, provider: &Provider) -> Option<String> {
        Some(format!("{}/openai/models?api-version={}", provider.base_path, provider.api_version))
    }
}
