//! One adapter per provider kind, registered in one table. An adapter knows what is
//! particular to a kind's API besides its wire format (which its codec handles): the
//! default endpoint, the request paths, how a request authenticates, what a streamed
//! answer is framed as.
//!
//! Adding a kind: write `providers/<kind>.rs` with a unit struct implementing [`Adapter`]
//! (and a codec under `wire/` if it speaks a new wire format), declare the module in
//! `providers/mod.rs`, and add one line to `registry::KINDS`.

use super::Provider;
use crate::sse::Framer;
use crate::wire::WireFormat;

/// How requests to a provider authenticate, made from its configured key.
pub enum Credential {
    /// The same header on every request (`authorization: Bearer …`, `x-api-key: …`).
    Header(&'static str, String),
    /// A signature over each request's exact path and body (SigV4).
    Signer(Box<dyn Signer>),
}

/// Signs one request: the headers to add, given the Host header, the request target and the
/// body exactly as they will be sent.
pub trait Signer: Send + Sync {
    fn sign(&self, host: &str, path_and_query: &str, body: &[u8]) -> Result<Vec<(String, String)>, String>;
}

pub trait Adapter: Sync {
    /// The `kind:` value that selects this adapter.
    fn kind(&self) -> &'static str;

    /// The wire format its bodies are in (the codec they go through).
    fn format(&self) -> WireFormat;

    /// The base URL when the config names none. `id` is the provider's id (OpenAI-compatible
    /// vendors are known by it); `api_key` its key (Bedrock's names the region).
    fn default_base_url(&self, id: &str, api_key: Option<&str>) -> Option<String>;

    /// What a config without `base_url` is told when `default_base_url` has none.
    fn base_url_required(&self) -> String {
        format!("is required for kind {}", self.kind())
    }

    /// How requests authenticate with `api_key` (`Err`: malformed; never quotes the key).
    fn credential(&self, api_key: &str) -> Result<Credential, String> {
        Ok(Credential::Header("authorization", format!("Bearer {api_key}")))
    }

    /// Path (and query) of the chat endpoint for `model`.
    fn chat_path(&self, provider: &Provider, model: &str, stream: bool) -> String;

    /// Path (and query) of the embeddings endpoint for `model`.
    fn embeddings_path(&self, provider: &Provider, _model: &str) -> String {
        provider.upstream_path("/embeddings")
    }

    /// Path (and query) of an OpenAI REST resource (`/responses`, `/responses/{id}`,
    /// `/files`, `/batches`, …: `endpoint` starts with `/` and may carry a query) on a kind
    /// that serves the OpenAI API beyond chat; `None` where the kind does not.
    fn openai_resource_path(&self, _provider: &Provider, _endpoint: &str) -> Option<String> {
        None
    }

    /// Path (and query) of an OpenAI endpoint addressed by model (`/audio/speech`,
    /// `/images/generations`, …) on a kind that serves OpenAI's audio and images; `None`
    /// where the kind does not.
    fn openai_model_path(&self, _provider: &Provider, _model: &str, _endpoint: &str) -> Option<String> {
        None
    }

    /// Path (and query) of an Anthropic REST resource (`/messages/batches`, `/files`, …:
    /// `endpoint` starts with `/`, after `/v1`) on a kind that serves Anthropic's API
    /// beyond messages; `None` where the kind does not.
    fn anthropic_resource_path(&self, _provider: &Provider, _endpoint: &str) -> Option<String> {
        None
    }

    /// `Accept` of a streamed call.
    fn stream_accept(&self) -> &'static str {
        "text/event-stream"
    }

    /// What cuts a streamed answer into events.
    fn stream_framer(&self) -> Box<dyn Framer> {
        Box::new(crate::sse::Parser::new())
    }

    /// Path (and query) of a cheap authenticated read that proves a key works (listing
    /// models); `None` where the kind has none on the endpoint it is called at.
    fn verify_path(&self, provider: &Provider) -> Option<String> {
        Some(provider.upstream_path("/models"))
    }

    /// Whether `api_version` applies (Azure OpenAI).
    fn takes_api_version(&self) -> bool {
        false
    }
}
