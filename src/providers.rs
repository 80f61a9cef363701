//! Provider registry: where a provider lives (scheme, host, port, base path), how to
//! authenticate to it, and which provider a model name belongs to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::config::raw::ProviderKind;
use crate::config::Settings;
use crate::error::GatewayError;
use crate::wire::WireFormat;

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
    pub kind: ProviderKind,
    pub base_url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix from `base_url`, without a trailing slash (e.g. `/v1`).
    pub base_path: String,
    /// Value for the upstream `Host` header.
    pub host_header: String,
    /// Precomputed credential header (`authorization: Bearer …` or `x-api-key: …`);
    /// `None` when no key is configured.
    pub auth_header: Option<(&'static str, String)>,
    pub models: Vec<String>,
    /// Trust anchors replacing the system roots for this provider, when configured.
    pub tls_ca: Option<Arc<[WrappedX509]>>,
    /// Azure OpenAI `api-version` query parameter.
    pub api_version: String,
    /// Bedrock: IAM credentials every request is signed with (SigV4).
    pub aws: Option<crate::wire::bedrock::Credentials>,
    resolved: ArcSwapOption<(SocketAddr, Instant)>,
}

impl std::fmt::Debug for Provider {
    // Hand-written so the credential can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Provider {
    pub fn new(
        id: String,
        kind: ProviderKind,
        base_url: &str,
        api_key: Option<String>,
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
        Ok(Provider {
            id,
            kind,
            base_url: base_url.to_string(),
            tls,
            host,
            port,
            base_path,
            host_header,
            // Bedrock signs each request instead (see `signed_headers`).
            auth_header: api_key.filter(|k| !k.is_empty() && kind != ProviderKind::Bedrock).map(
                |k| match kind {
                    ProviderKind::Anthropic => ("x-api-key", k),
                    ProviderKind::Azure => ("api-key", k),
                    ProviderKind::Google => ("x-goog-api-key", k),
                    _ => ("authorization", format!("Bearer {k}")),
                },
            ),
            models,
            tls_ca: None,
            api_version: AZURE_API_VERSION.to_string(),
            aws: None,
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

    pub fn upstream_path(&self, endpoint: &str) -> String {
        format!("{}{}", self.base_path, endpoint)
    }

    /// Bedrock: the credentials requests are signed with.
    pub fn with_aws_credentials(mut self, creds: crate::wire::bedrock::Credentials) -> Provider {
        self.aws = Some(creds);
        self
    }

    /// Per-request authentication headers: a SigV4 signature over the exact path and body
    /// for Bedrock, nothing for providers with a static key header.
    pub fn signed_headers(&self, path: &str, body: &[u8]) -> Result<Vec<(String, String)>, GatewayError> {
        match &self.aws {
            None => Ok(Vec::new()),
            Some(creds) => {
                crate::wire::bedrock::sign(creds, &self.host_header, path, body, std::time::SystemTime::now())
                    .map_err(|e| {
                        GatewayError::internal(format!("signing the {} request failed: {e}", self.id))
                    })
            }
        }
    }

    /// Sets the Azure OpenAI `api-version` (query parameter on every call).
    pub fn with_api_version(mut self, version: &str) -> Result<Provider, String> {
        if self.kind != ProviderKind::Azure {
            return Err("api_version applies to kind azure only".into());
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
        match self.kind {
            ProviderKind::Anthropic => WireFormat::Anthropic,
            ProviderKind::Cohere => WireFormat::Cohere,
            ProviderKind::Google => WireFormat::Gemini,
            ProviderKind::Bedrock => WireFormat::Bedrock,
            ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::Azure => WireFormat::OpenAi,
        }
    }

    /// Path (and query) of the chat endpoint for `model`. Azure addresses a deployment
    /// (the model name is the deployment name) and needs `api-version`.
    pub fn chat_path(&self, model: &str, stream: bool) -> String {
        match self.kind {
            ProviderKind::Anthropic => self.upstream_path("/v1/messages"),
            ProviderKind::Cohere => self.upstream_path(&crate::wire::cohere::chat_path(model, stream)),
            ProviderKind::Google => self.upstream_path(&crate::wire::gemini::chat_path(model, stream)),
            ProviderKind::Bedrock => self.upstream_path(&crate::wire::bedrock::chat_path(model, stream)),
            ProviderKind::Azure => self.azure_path(model, "chat/completions"),
            _ => self.upstream_path("/chat/completions"),
        }
    }

    /// Path (and query) of the embeddings endpoint for `model`.
    pub fn embeddings_path(&self, model: &str) -> String {
        match self.kind {
            ProviderKind::Azure => self.azure_path(model, "embeddings"),
            ProviderKind::Cohere => self.upstream_path(&crate::wire::cohere::embeddings_path(model)),
            ProviderKind::Google => self.upstream_path(&crate::wire::gemini::embeddings_path(model)),
            _ => self.upstream_path("/embeddings"),
        }
    }

    fn azure_path(&self, deployment: &str, operation: &str) -> String {
        format!(
            "{}/openai/deployments/{}/{operation}?api-version={}",
            self.base_path,
            path_segment(deployment),
            self.api_version
        )
    }

    /// The peer for one attempt. IP literals need no lookup; names are resolved with the
    /// async resolver and cached for `DNS_TTL` so the hot path rarely touches DNS.
    pub async fn peer(&self, settings: &Settings) -> Result<HttpPeer, GatewayError> {
        let addr = self.address(settings.upstream_connect_timeout).await?;
        let mut peer = HttpPeer::new(addr, self.tls, self.host.clone());
        let opts = &mut peer.options;
        opts.connection_timeout = Some(settings.upstream_connect_timeout);
        opts.total_connection_timeout = Some(settings.upstream_connect_timeout);
        opts.read_timeout = Some(settings.upstream_timeout);
        opts.write_timeout = Some(settings.upstream_timeout);
        opts.idle_timeout = Some(settings.upstream_idle_timeout);
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

/// Default base URL per kind, where the kind has a single public endpoint.
pub fn default_base_url(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Openai => Some("https://api.openai.com/v1"),
        ProviderKind::Anthropic => Some("https://api.anthropic.com"),
        ProviderKind::Cohere => Some(crate::wire::cohere::DEFAULT_BASE_URL),
        ProviderKind::Google => Some("https://generativelanguage.googleapis.com/v1beta"),
        _ => None,
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

/// The base URL a provider gets when its config names none.
pub fn default_base_url_for(id: &str, kind: ProviderKind) -> Option<&'static str> {
    default_base_url(kind).or_else(|| match kind {
        ProviderKind::OpenaiCompatible => {
            VENDOR_BASE_URLS.iter().find(|(v, _)| *v == id).map(|(_, url)| *url)
        }
        _ => None,
    })
}

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
        providers.values().filter(|p| p.kind.as_str() == family).collect();
    same_kind.sort_by(|a, b| a.id.cmp(&b.id));
    same_kind.first().map(|p| (*p).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> HashMap<String, Arc<Provider>> {
        let mut m = HashMap::new();
        for (id, kind, url) in [
            ("openai", ProviderKind::Openai, "https://api.openai.com/v1"),
            ("local", ProviderKind::OpenaiCompatible, "http://127.0.0.1:9000/v1/"),
        ] {
            let p = Provider::new(id.into(), kind, url, Some("k".into()), vec![]).unwrap();
            m.insert(id.to_string(), Arc::new(p));
        }
        m
    }

    #[test]
    fn vendor_defaults() {
        assert_eq!(
            default_base_url_for("groq", ProviderKind::OpenaiCompatible),
            Some("https://api.groq.com/openai/v1")
        );
        assert_eq!(default_base_url_for("groq", ProviderKind::Openai), Some("https://api.openai.com/v1"));
        assert_eq!(default_base_url_for("my-vllm", ProviderKind::OpenaiCompatible), None);
        assert_eq!(
            default_base_url_for("anthropic", ProviderKind::Anthropic),
            Some("https://api.anthropic.com")
        );
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
        assert!(Provider::new("x".into(), ProviderKind::Openai, "ftp://h", None, vec![]).is_err());
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
