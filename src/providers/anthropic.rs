//! Anthropic (`kind: anthropic`): the Messages API, keyed by `x-api-key`.

use super::adapter::{Adapter, Credential};
use super::Provider;
use crate::wire::WireFormat;

pub struct Anthropic;

impl Adapter for Anthropic {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    fn format(&self) -> WireFormat {
        WireFormat::Anthropic
    }

    fn default_base_url(&self, _id: &str, _api_key: Option<&str>) -> Option<String> {
        Some("https://api.anthropic.com".into())
    }

    fn credential(&self, api_key: &str) -> Result<Credential, String> {
        Ok(Credential::Header("x-api-key", api_key.to_string()))
    }

    fn chat_path(&self, provider: &Provider, _model: &str, _stream: bool) -> String {
        provider.upstream_path("/v1/messages")
    }

    fn anthropic_resource_path(&self, provider: &Provider, endpoint: &str) -> Option<String> {
        Some(provider.upstream_path(&format!("/v1{endpoint}")))
    }

    fn verify_path(&self, provider: &Provider) -> Option<String> {
        Some(provider.upstream_path("/v1/models"))
    }
}
