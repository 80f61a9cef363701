//! Providers: where each configured provider lives (scheme, host, port, base path), how
//! it authenticates, and which provider a model name belongs to. What differs between
//! kinds of provider is in one adapter per kind (`adapter::KINDS`).

pub mod adapter;
mod anthropic;
mod azure;
pub mod bedrock;
mod cohere;
#[cfg(test)]
mod conformance;
mod google;
mod openai;
pub mod registry;
pub mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::error::GatewayError;
use crate::sse::Framer;
use crate::wire::WireFormat;
use adapter::{Adapter, Credential, Signer};

pub use registry::{adapter, kind_names};

/// Bare model names are sent to the provider family their prefix names (PRODUCT.md §2.2).
pub const BARE_PREFIXES: &[(&str, &str)] = &[
    ("gpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("text-embedding-", "openai"),
    ("claude-", "anthropic"),
    ("gemini-", "google"),
];

pub const RECOGNIZED_PREFIXES: &str = "gpt-*, o1*, o3*, o4*, text-embedding-*, claude-*, gemini-*";

/// How long a resolved upstream address is reused before DNS is asked again.
const DNS_TTL: Duration = Duration::from_secs(60);

pub struct Provider {
    pub id: String,
    /// What is particular to its kind: paths, authentication, stream framing.
    pub adapter: &'static dyn Adapter,
    pub base_url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix from `base_url`, without a trailing slash (e.g. `/v1`).
    pub base_path: String,
    /// Value for the upstream `Host` header.
    pub host_header: String,
    /// Precomputed credential header (`authorization: Bearer …` or `x-api-key: …`);
    /// `None` when no key is configured or requests are signed instead.
    pub auth_header: Option<(&'static str, String)>,
    /// Signs each request (Bedrock's SigV4), when the kind authenticates that way.
    signer: Option<Box<dyn Signer>>,
    pub models: Vec<String>,
    /// Trust anchors replacing the system roots for this provider, when configured.
    pub tls_ca: Option<Arc<[WrappedX509]>>,
    /// Azure OpenAI `api-version` query parameter.
    pub api_version: String,
    resolved: ArcSwapOption<(SocketAddr, Instant)>,
}

impl std::fmt::Debug for Provider {
    // Hand-written so the credential can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("kind", &self.adapter.kind())
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Provider {
    pub fn new(
        id: String,
        adapter: &'static dyn Adapter,
        base_url: &str,
        credential: Option<Credential>,
        models: Vec<String>,
    ) -> Result<Provider, String> {
        let url = url::Url::parse(base_url).map_err(|e| format!("invalid URL \"{base_url}\": {e}"))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(format!("unsupported scheme \"{other}\" (use http or https)")),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(format!("URL \"{base_url}\" has no host")),
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("URL \"{base_url}\" must not have a query or fragment"));
        }
        let default_port = if tls { 443 } else { 80 };
        let port = url.port().unwrap_or(default_port);
        let host_header = match (url.port(), url.host()) {
            (Some(p), Some(url::Host::Ipv6(ip))) => format!("[{ip}]:{p}"),
            (Some(p), _) => format!("{host}:{p}"),
            (None, Some(url::Host::Ipv6(ip))) => format!("[{ip}]"),
            (None, _) => host.clone(),
        };
        let base_path = url.path().trim_end_matches('/').to_string();
        let (auth_header, signer) = match credential {
            None => (None, None),
            Some(Credential::Header(name, value)) => (Some((name, value)), None),
            Some(Credential::Signer(signer)) => (None, Some(signer)),
        };
        Ok(Provider {
            id,
            adapter,
            base_url: base_url.to_string(),
            tls,
            host,
            port,
            base_path,
            host_header,
            auth_header,
            signer,
            models,
            tls_ca: None,
            api_version: AZURE_API_VERSION.to_string(),
            resolved: ArcSwapOption::empty(),
        })
    }

    /// Pins the CA certificates (PEM) this provider's TLS certificate must chain to.
    pub fn with_ca_file(mut self, path: &str) -> Result<Provider, String> {
        if !self.tls {
            return Err("tls_ca_file needs an https base_url".into());
        }
        let pem = std::fs::read(path).map_err(|e| format!("cannot read \"{path}\": {e}"))?;
        let mut certs = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(&pem) {
            let block = block.map_err(|e| format!("\"{path}\" is not valid PEM: {e}"))?;
            if block.label != "CERTIFICATE" {
                continue;
            }
            // Validate here: pingora's parser panics on a malformed certificate.
            block.parse_x509().map_err(|e| format!("\"{path}\" holds an invalid certificate: {e}"))?;
            certs.push(WrappedX509::new(block.contents, parse_x509));
        }
        if certs.is_empty() {
            return Err(format!("\"{path}\" contains no CERTIFICATE block"));
        }
        self.tls_ca = Some(Arc::from(certs));
        Ok(self)
    }

    /// The credential header for a caller's own key (BYOK), when the key's format fits this
    /// provider's kind (PRODUCT.md §2.3): `sk-ant-…` is Anthropic's, `AIza…` Google's, any
    /// other `sk-…` OpenAI's or an OpenAI-compatible vendor's; a key of no known format fits
    /// the kinds whose keys have none (Azure, Cohere, OpenAI-compatible). Signing kinds
    /// (Bedrock) never take one.
    pub fn byok_credential(&self, key: &str) -> Option<(&'static str, String)> {
        let kind = self.adapter.kind();
        let fits = if key.starts_with("sk-ant-") {
            kind == "anthropic"
        } else if key.starts_with("AIza") {
            kind == "google"
        } else if key.starts_with("sk-") {
            matches!(kind, "openai" | "openai_compatible")
        } else {
            matches!(kind, "azure" | "cohere" | "openai_compatible")
        };
        if !fits || self.signer.is_some() {
            return None;
        }
        match self.adapter.credential(key) {
            Ok(Credential::Header(name, value)) => Some((name, value)),
            _ => None,
        }
    }

    /// Whether requests carry a key (a header or a signature).
    pub fn has_credential(&self) -> bool {
        self.auth_header.is_some() || self.signer.is_some()
    }

    pub fn upstream_path(&self, endpoint: &str) -> String {
        format!("{}{}", self.base_path, endpoint)
    }

    /// Per-request authentication headers: a signature over the exact path and body where
    /// the kind signs (Bedrock's SigV4), nothing for providers with a static key header.
    pub fn signed_headers(&self, path: &str, body: &[u8]) -> Result<Vec<(String, String)>, GatewayError> {
        match &self.signer {
            None => Ok(Vec::new()),
            Some(signer) => signer
                .sign(&self.host_header, path, body)
                .map_err(|e| GatewayError::internal(format!("signing the {} request failed: {e}", self.id))),
        }
    }

    /// Sets the Azure OpenAI `api-version` (query parameter on every call).
    pub fn with_api_version(mut self, version: &str) -> Result<Provider, String> {
        if !self.adapter.takes_api_version() {
            return Err(format!("api_version does not apply to kind {}", self.adapter.kind()));
        }
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(format!("invalid api_version \"{version}\" (expected e.g. {AZURE_API_VERSION})"));
        }
        self.api_version = version.to_string();
        Ok(self)
    }

    /// The wire format this provider speaks.
    pub fn format(&self) -> WireFormat {
        self.adapter.format()
    }

    /// Path (and query) of the chat endpoint for `model`.
    pub fn chat_path(&self, model: &str, stream: bool) -> String {
        self.adapter.chat_path(self, model, stream)
    }

    /// Path (and query) of the embeddings endpoint for `model`.
    pub fn embeddings_path(&self, model: &str) -> String {
        self.adapter.embeddings_path(self, model)
    }

    /// Path (and query) of an OpenAI REST resource (`/responses/{id}`, `/files`, …), when
    /// this provider's kind serves the OpenAI API beyond chat (OpenAI, Azure OpenAI,
    /// OpenAI-compatible servers).
    pub fn openai_resource_path(&self, endpoint: &str) -> Option<String> {
        self.adapter.openai_resource_path(self, endpoint)
    }

    /// Path (and query) of an OpenAI endpoint addressed by model (audio, images), when this
    /// provider's kind serves it (OpenAI, Azure OpenAI).
    pub fn openai_model_path(&self, model: &str, endpoint: &str) -> Option<String> {
        self.adapter.openai_model_path(self, model, endpoint)
    }

    /// Path (and query) of an Anthropic REST resource (`/messages/batches/{id}`, `/files`,
    /// …), when this provider's kind serves Anthropic's API beyond messages.
    pub fn anthropic_resource_path(&self, endpoint: &str) -> Option<String> {
        self.adapter.anthropic_resource_path(self, endpoint)
    }

    /// `Accept` of a call: a stream in the kind's framing, or JSON.
    pub fn accept(&self, stream: bool) -> &'static str {
        if stream {
            self.adapter.stream_accept()
        } else {
            "application/json"
        }
    }

    /// What cuts this provider's streamed answers into events.
    pub fn stream_framer(&self) -> Box<dyn Framer> {
        self.adapter.stream_framer()
    }

    /// The peer for one attempt. IP literals need no lookup; names are resolved with the
    /// async resolver and cached for `DNS_TTL` so the hot path rarely touches DNS.
    pub async fn peer(&self, timeouts: &Timeouts) -> Result<HttpPeer, GatewayError> {
        let addr = self.address(timeouts.connect).await?;
        let mut peer = HttpPeer::new(addr, self.tls, self.host.clone());
        let opts = &mut peer.options;
        opts.connection_timeout = Some(timeouts.connect);
        opts.total_connection_timeout = Some(timeouts.connect);
        opts.read_timeout = Some(timeouts.read_write);
        opts.write_timeout = Some(timeouts.read_write);
        opts.idle_timeout = Some(timeouts.idle);
        if let Some(ca) = &self.tls_ca {
            opts.ca = Some(ca.clone());
        }
        Ok(peer)
    }

    /// Drops the cached address so the next attempt resolves again (after a connect error).
    pub fn forget_address(&self) {
        self.resolved.store(None);
    }

    async fn address(&self, timeout: Duration) -> Result<SocketAddr, GatewayError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        if let Some(cached) = self.resolved.load().as_ref() {
            if cached.1.elapsed() < DNS_TTL {
                return Ok(cached.0);
            }
        }
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        let mut addrs = match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => {
                return Err(GatewayError::UpstreamConnect {
                    provider: self.id.clone(),
                    message: format!("cannot resolve {}: {e}", self.host),
                })
            }
            Err(_) => {
                return Err(GatewayError::UpstreamConnect {
                    provider: self.id.clone(),
                    message: format!("resolving {} timed out", self.host),
                })
            }
        };
        let addr = addrs.next().ok_or_else(|| GatewayError::UpstreamConnect {
            provider: self.id.clone(),
            message: format!("{} resolved to no address", self.host),
        })?;
        self.resolved.store(Some(Arc::new((addr, Instant::now()))));
        Ok(addr)
    }
}

/// How long an upstream connection may take to open, to read or write, and to sit idle in
/// the pool (`server.upstream_*` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read_write: Duration,
    pub idle: Duration,
}

/// Azure OpenAI `api-version` used when the provider config names none: the latest GA
/// version with `stream_options` (streamed usage) and parallel tool calls.
pub const AZURE_API_VERSION: &str = "2024-10-21";

/// Percent-encodes one path segment (model and deployment names may hold `:` or `/`).
pub fn path_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Everything but RFC 3986 unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// How a model string was resolved (recorded in traces).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// `@slug`: a routing config ran.
    Config,
    /// `provider/model`.
    Direct,
    /// Bare name, provider inferred from its prefix.
    Auto,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Config => "config",
            Resolution::Direct => "direct",
            Resolution::Auto => "auto",
        }
    }
}

/// A concrete destination: which provider, and the model name it knows.
#[derive(Clone, Debug)]
pub struct Target {
    pub provider: Arc<Provider>,
    pub model: String,
}

/// Resolves `provider/model` or a bare name (not `@slug`) against the configured providers.
pub fn resolve_model(
    providers: &HashMap<String, Arc<Provider>>,
    model: &str,
) -> Result<(Target, Resolution), GatewayError> {
    if model.is_empty() {
        return Err(GatewayError::invalid("invalid_request", "model must not be empty"));
    }
    if let Some((provider_id, name)) = model.split_once('/') {
        let provider = providers.get(provider_id).ok_or_else(|| {
            let mut known: Vec<&str> = providers.keys().map(String::as_str).collect();
            known.sort_unstable();
            GatewayError::invalid(
                "invalid_request",
                format!(
                    "unknown provider '{provider_id}' in model '{model}'; configured providers: {}",
                    known.join(", ")
                ),
            )
        })?;
        if name.is_empty() {
            return Err(GatewayError::invalid(
                "invalid_request",
                format!("model '{model}' names no model after the provider"),
            ));
        }
        return Ok((Target { provider: provider.clone(), model: name.to_string() }, Resolution::Direct));
    }
    let family = BARE_PREFIXES
        .iter()
        .find(|(prefix, _)| model.starts_with(prefix))
        .map(|(_, family)| *family)
        .ok_or_else(|| {
            GatewayError::invalid(
                "invalid_request",
                format!(
                    "unknown model '{model}'; use @config or provider/model. Recognized prefixes: {RECOGNIZED_PREFIXES}"
                ),
            )
        })?;
    let provider = family_provider(providers, family).ok_or_else(|| {
        GatewayError::invalid(
            "invalid_request",
            format!("model '{model}' belongs to provider '{family}', which is not configured"),
        )
    })?;
    Ok((Target { provider, model: model.to_string() }, Resolution::Auto))
}

/// The provider id a model string refers to, without checking it exists: the part before
/// `/`, or the family of a bare name's prefix.
pub fn provider_hint(model: &str) -> Option<&str> {
    if let Some((provider, _)) = model.split_once('/') {
        return Some(provider);
    }
    BARE_PREFIXES.iter().find(|(prefix, _)| model.starts_with(prefix)).map(|(_, family)| *family)
}

/// The provider serving a bare-name family: the one with that id, else the first of that kind.
fn family_provider(providers: &HashMap<String, Arc<Provider>>, family: &str) -> Option<Arc<Provider>> {
    if let Some(p) = providers.get(family) {
        return Some(p.clone());
    }
    let mut same_kind: Vec<&Arc<Provider>> =
        providers.values().filter(|p| p.adapter.kind() == family).collect();
    same_kind.sort_by(|a, b| a.id.cmp(&b.id));
    same_kind.first().map(|p| (*p).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider of `kind` at `url`, keyed "k".
    pub fn provider(kind: &str, url: &str) -> Provider {
        let adapter = adapter(kind).unwrap();
        let credential = adapter.credential("k").ok();
        Provider::new(kind.into(), adapter, url, credential, vec![]).unwrap()
    }

    fn registry() -> HashMap<String, Arc<Provider>> {
        let mut m = HashMap::new();
        for (id, kind, url) in [
            ("openai", "openai", "https://api.openai.com/v1"),
            ("local", "openai_compatible", "http://127.0.0.1:9000/v1/"),
        ] {
            let p = Provider { id: id.into(), ..provider(kind, url) };
            m.insert(id.to_string(), Arc::new(p));
        }
        m
    }

    #[test]
    fn every_kind_is_registered_once() {
        let names: Vec<&str> = registry::KINDS.iter().map(|a| a.kind()).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(kind_names(), "openai, openai_compatible, azure, anthropic, google, cohere, bedrock");
    }

    #[test]
    fn vendor_defaults() {
        let base = |kind: &str, id: &str| adapter(kind).unwrap().default_base_url(id, None);
        assert_eq!(base("openai_compatible", "groq").as_deref(), Some("https://api.groq.com/openai/v1"));
        assert_eq!(base("openai", "groq").as_deref(), Some("https://api.openai.com/v1"));
        assert_eq!(base("openai_compatible", "my-vllm"), None);
        assert_eq!(base("anthropic", "anthropic").as_deref(), Some("https://api.anthropic.com"));
        assert_eq!(base("azure", "azure"), None);
        let bedrock = adapter("bedrock").unwrap();
        assert_eq!(
            bedrock.default_base_url("b", Some("AKID::secret::eu-west-1")).as_deref(),
            Some("https://bedrock-runtime.eu-west-1.amazonaws.com")
        );
    }

    #[test]
    fn each_kind_authenticates_its_own_way() {
        let header = |kind: &str| provider(kind, "https://h/v1").auth_header.map(|(n, _)| n);
        assert_eq!(header("openai"), Some("authorization"));
        assert_eq!(header("anthropic"), Some("x-api-key"));
        assert_eq!(header("azure"), Some("api-key"));
        assert_eq!(header("google"), Some("x-goog-api-key"));
        let adapter = adapter("bedrock").unwrap();
        let signed = Provider::new(
            "b".into(),
            adapter,
            "https://bedrock-runtime.us-east-1.amazonaws.com",
            adapter.credential("AKIDEXAMPLE::secret::us-east-1").ok(),
            vec![],
        )
        .unwrap();
        assert!(signed.auth_header.is_none());
        let headers = signed.signed_headers("/model/m/converse", b"{}").unwrap();
        assert!(headers.iter().any(|(n, v)| n == "authorization" && v.starts_with("AWS4-HMAC-SHA256")));
        assert!(matches!(adapter.credential("not-a-key"), Err(e) if !e.contains("not-a-key")));
    }

    #[test]
    fn parses_base_urls() {
        let r = registry();
        let local = &r["local"];
        assert_eq!((local.tls, local.port, local.base_path.as_str()), (false, 9000, "/v1"));
        assert_eq!(local.host_header, "127.0.0.1:9000");
        assert_eq!(local.upstream_path("/chat/completions"), "/v1/chat/completions");
        let openai = &r["openai"];
        assert_eq!((openai.tls, openai.port, openai.host_header.as_str()), (true, 443, "api.openai.com"));
        assert!(Provider::new("x".into(), adapter("openai").unwrap(), "ftp://h", None, vec![]).is_err());
    }

    #[test]
    fn resolves_model_forms() {
        let r = registry();
        let (t, how) = resolve_model(&r, "local/meta/llama-3").unwrap();
        assert_eq!(
            (t.provider.id.as_str(), t.model.as_str(), how),
            ("local", "meta/llama-3", Resolution::Direct)
        );
        for bare in ["gpt-4o-mini", "o1-mini", "o3", "o4-mini", "text-embedding-3-small"] {
            let (t, how) = resolve_model(&r, bare).unwrap();
            assert_eq!((t.provider.id.as_str(), how), ("openai", Resolution::Auto));
        }
        let e = resolve_model(&r, "llama-3").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e
            .message()
            .contains("Recognized prefixes: gpt-*, o1*, o3*, o4*, text-embedding-*, claude-*, gemini-*"));
        let e = resolve_model(&r, "claude-sonnet-4-5").unwrap_err();
        assert!(e.message().contains("'anthropic', which is not configured"), "{}", e.message());
        let e = resolve_model(&r, "nope/x").unwrap_err();
        assert!(e.message().contains("configured providers: local, openai"));
    }
}
