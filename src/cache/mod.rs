//! The response cache (PRODUCT.md §7): settings, the key, and the embedded store.
//!
//! * **Key, scheme `v1`**: SHA-256 of a JSON document built from the *decoded* request
//!   (`wire::canonical::Request`), never its raw bytes, so formatting, key order and the
//!   surface it came in on do not matter: `{"v":1, project, model, config, route, extras,
//!   system, messages, max_tokens, temperature, top_p, stop, tools, tool_choice,
//!   parallel_tool_calls, thinking_budget, options}` with object keys sorted (serde_json's
//!   map) and numbers as serde_json prints them (`Scope` says what the first ones are).
//!   Left out, as they do not change the answer: `stream`, stream usage, `user`/end user,
//!   tags, metadata, `cache_control` marks. A change to this document is a new scheme
//!   (`v2`), never an edit of `v1`: keys are compared across processes and versions of the
//!   binary. A semantic partition is the same document without the last message and with
//!   `"semantic": {"embedding_model": …}` added (`partition`).
//! * **Store**: in process, bounded by bytes (moka: TinyLFU admission, LRU eviction), each
//!   entry living its config's `ttl_seconds`; or Redis (`redis.rs`), shared by every node.
//!   `mode: semantic` also indexes the embedding of each answer's last user message
//!   (`semantic.rs`), per partition.

pub mod redis;
pub mod semantic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::wire::canonical::{EmbeddingsRequest, EmbeddingsResponse, Part, Request, Response, Role};

/// The key scheme (see the module docs); part of every key.
pub const KEY_SCHEME: u32 = 1;
/// `cache.max_entry_bytes` when a config names none.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1 << 20;
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_THRESHOLD: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exact,
    Semantic,
}

/// A routing config's (or a project's default) `cache:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub mode: Mode,
    pub ttl: Duration,
    pub threshold: f64,
    pub allow_nonzero_temperature: bool,
    pub allow_tools: bool,
    pub max_entry_bytes: usize,
    /// `mode: semantic`: the model that embeds the last user message (`provider/model` or
    /// a bare name), its own or `cache.embedding_model`.
    pub embedding_model: Option<String>,
}

/// Why a request is not looked up (`X-Modelux-Cache: BYPASS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// `Cache-Control: no-cache`: not read; the answer is stored.
    NoCache,
    /// `Cache-Control: no-store`: neither read nor written.
    NoStore,
    /// `"mlx:cache": {"skip": true}`.
    Skip,
    /// `temperature` above 0 without `allow_nonzero_temperature`.
    Temperature,
    /// Tools offered without `allow_tools`.
    Tools,
    /// The answer would have parts an entry does not keep (`n` above 1, `logprobs`).
    Unkept,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::NoCache => "no_cache",
            Bypass::NoStore => "no_store",
            Bypass::Skip => "skip",
            Bypass::Temperature => "temperature",
            Bypass::Tools => "tools",
            Bypass::Unkept => "unkept",
        }
    }

    /// The answer may still be written.
    pub fn stores(self) -> bool {
        self == Bypass::NoCache
    }
}

/// Whether `settings` let this request use the cache.
pub fn admits(settings: &CacheSettings, req: &Request) -> Result<(), Bypass> {
    if req.temperature.is_some_and(|t| t > 0.0) && !settings.allow_nonzero_temperature {
        return Err(Bypass::Temperature);
    }
    if !req.tools.is_empty() && !settings.allow_tools {
        return Err(Bypass::Tools);
    }
    // An entry holds one choice's content and usage: more choices or token log
    // probabilities would come back without them.
    let unkept = req.openai_only.iter().any(|(k, v)| match k.as_str() {
        "n" => v.as_u64().is_some_and(|n| n > 1),
        "logprobs" => v.as_bool() == Some(true),
        "top_logprobs" => !v.is_null(),
        _ => false,
    });
    if unkept {
        return Err(Bypass::Unkept);
    }
    Ok(())
}

/// What, besides the decoded request, decides an answer.
pub struct Scope<'a> {
    pub project: &'a str,
    /// As the client named it (`@slug`, `provider/model`).
    pub model: &'a str,
    /// The named config's definition (its canonical text, not its version number: versions
    /// are counted per process and would collide across restarts and nodes).
    pub config: Option<&'a str>,
    /// Where the decision sends the request first (`provider/model`) and its A/B variant:
    /// requests of one config that rules or a split send elsewhere never share answers.
    pub route: &'a str,
    /// Request fields the canonical request does not model (vendor parameters, beta
    /// headers), as sent.
    pub extras: &'a serde_json::Map<String, Value>,
}

/// The cache key of a decoded request (scheme `v1`, see the module docs). The document is
/// written straight into the hash (`doc::Document`), byte for byte the text of the JSON
/// value the module docs describe (a test holds it to that value).
pub fn key(scope: &Scope<'_>, req: &Request) -> [u8; 32] {
    hash(&doc::Document { scope, req, messages: &req.messages, semantic: None })
}

fn hash(document: &doc::Document<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    // Writing into a hash cannot fail, nor can serializing these types.
    let _ = serde_json::to_writer(&mut hasher, document);
    hasher.finalize().into()
}

/// The semantic partition of a request (`semantic.rs`) and the text to embed: the key's
/// document with every message but the last, which must be the user's and only text, and
/// the embedding model. `None`: the request cannot be looked up semantically.
pub fn partition(scope: &Scope<'_>, req: &Request, embedding_model: &str) -> Option<([u8; 32], String)> {
    let (last, earlier) = req.messages.split_last()?;
    if !matches!(last.role, Role::User) {
        return None;
    }
    let mut text = String::new();
    for p in &last.content {
        let Part::Text { text: t, .. } = p else { return None };
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(t);
    }
    if text.trim().is_empty() {
        return None;
    }
    Some((hash(&doc::Document { scope, req, messages: earlier, semantic: Some(embedding_model) }), text))
}

/// The key of an embeddings request (scheme `v1`, its own kind of document): project,
/// model named, config definition, route, the inputs, `dimensions`, and every other field
/// as sent; not `encoding_format` (a hit is encoded as its caller asks) or `user`.
pub fn embeddings_key(scope: &Scope<'_>, req: &EmbeddingsRequest) -> [u8; 32] {
    let doc = json!({
        "v": KEY_SCHEME,
        "kind": "embeddings",
        "project": scope.project,
        "config": scope.config,
        "route": scope.route,
        "extras": scope.extras,
        "model": scope.model,
        "input": req.inputs,
        "dimensions": req.dimensions,
    });
    Sha256::digest(doc.to_string().as_bytes()).into()
}

/// What an entry answers with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Answer {
    Chat(Response),
    Embeddings(EmbeddingsResponse),
}

/// The key document, serialized in place: maps in sorted key order and values printed as
/// `serde_json::Value` prints them, so the text is the one the module docs describe.
mod doc {
    use std::collections::BTreeMap;

    use serde::ser::{SerializeMap, SerializeSeq};
    use serde::{Serialize, Serializer};
    use serde_json::Value;

    use super::{Scope, KEY_SCHEME};
    use crate::wire::canonical::{ImageSource, Message, Part, Request, Role, ToolChoice};

    pub struct Document<'a> {
        pub scope: &'a Scope<'a>,
        pub req: &'a Request,
        pub messages: &'a [Message],
        /// A semantic partition's embedding model.
        pub semantic: Option<&'a str>,
    }

    struct Seq<'a, T>(&'a [T]);

    impl<T> Serialize for Seq<'_, T>
    where
        for<'x> Item<'x, T>: Serialize,
    {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for item in self.0 {
                seq.serialize_element(&Item(item))?;
            }
            seq.end()
        }
    }

    struct Item<'a, T>(&'a T);

    impl Serialize for Item<'_, Message> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry("content", &Seq(&self.0.content))?;
            m.serialize_entry(
                "role",
                match self.0.role {
                    Role::User => "user",
                    Role::Assistant => "assistant",
                },
            )?;
            m.end()
        }
    }

    /// `{"<name>": {fields…}}` with the fields in sorted order.
    struct One<'a, V: Serialize>(&'static str, V, std::marker::PhantomData<&'a ()>);

    fn one<'a, V: Serialize>(name: &'static str, v: V) -> One<'a, V> {
        One(name, v, std::marker::PhantomData)
    }

    impl<V: Serialize> Serialize for One<'_, V> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(1))?;
            m.serialize_entry(self.0, &self.1)?;
            m.end()
        }
    }

    // Nested objects: fields in sorted order, as `serde_json::Map` prints them.
    #[derive(Serialize)]
    struct Image<'a> {
        data: &'a str,
        media_type: &'a str,
    }

    #[derive(Serialize)]
    struct ToolCall<'a> {
        arguments: &'a str,
        id: &'a str,
        name: &'a str,
    }

    #[derive(Serialize)]
    struct ToolResult<'a> {
        call_id: &'a str,
        content: Seq<'a, Part>,
        is_error: bool,
    }

    impl Serialize for Item<'_, Part> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self.0 {
                Part::Text { text, .. } => one("text", text).serialize(s),
                Part::Image { source: ImageSource::Url(url), .. } => one("image_url", url).serialize(s),
                Part::Image { source: ImageSource::Base64 { media_type, data }, .. } => {
                    one("image", Image { data, media_type }).serialize(s)
                }
                Part::ToolCall { id, name, arguments } => {
                    one("tool_call", ToolCall { arguments, id, name }).serialize(s)
                }
                Part::ToolResult { call_id, content, is_error } => {
                    one("tool_result", ToolResult { call_id, content: Seq(content), is_error: *is_error })
                        .serialize(s)
                }
                Part::Thinking { text, .. } => one("thinking", text).serialize(s),
                Part::RedactedThinking { data } => one("redacted_thinking", data).serialize(s),
            }
        }
    }

    impl Serialize for Item<'_, crate::wire::canonical::Tool> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let t = self.0;
            let mut m = s.serialize_map(Some(3))?;
            m.serialize_entry("description", &t.description)?;
            m.serialize_entry("name", &t.name)?;
            m.serialize_entry("parameters", &t.parameters)?;
            m.end()
        }
    }

    impl Serialize for Document<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let (scope, req) = (self.scope, self.req);
            let tool_choice = req.tool_choice.as_ref().map(|c| match c {
                ToolChoice::Auto => "auto".to_string(),
                ToolChoice::None => "none".to_string(),
                ToolChoice::Required => "required".to_string(),
                ToolChoice::Tool(name) => format!("tool:{name}"),
            });
            let options: BTreeMap<&str, &Value> = req
                .openai_only
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "user" | "store" | "stream_options"))
                .map(|(k, v)| (k.as_str(), v))
                .collect();
            let system: Vec<&str> = req.system.iter().map(|b| b.text.as_str()).collect();
            // Keys in sorted order (how `serde_json::Map` prints them).
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("config", &scope.config)?;
            m.serialize_entry("extras", scope.extras)?;
            m.serialize_entry("max_tokens", &req.max_tokens)?;
            m.serialize_entry("messages", &Seq(self.messages))?;
            m.serialize_entry("model", scope.model)?;
            m.serialize_entry("options", &options)?;
            m.serialize_entry("parallel_tool_calls", &req.parallel_tool_calls)?;
            m.serialize_entry("project", scope.project)?;
            m.serialize_entry("route", scope.route)?;
            if let Some(model) = self.semantic {
                m.serialize_entry("semantic", &one("embedding_model", model))?;
            }
            m.serialize_entry("stop", &req.stop)?;
            m.serialize_entry("system", &system)?;
            m.serialize_entry("temperature", &req.temperature)?;
            m.serialize_entry("thinking_budget", &req.thinking_budget)?;
            m.serialize_entry("tool_choice", &tool_choice)?;
            m.serialize_entry("tools", &Seq(&req.tools))?;
            m.serialize_entry("top_p", &req.top_p)?;
            m.serialize_entry("v", &KEY_SCHEME)?;
            m.end()
        }
    }
}

/// One stored answer.
#[derive(Debug)]
pub struct Entry {
    pub answer: Answer,
    /// Who answered it first (the route headers of a hit name them).
    pub provider: String,
    pub model: String,
    /// What the answer cost when it was bought: what each hit saves.
    pub cost_usd: f64,
    /// Its weight in the store.
    pub bytes: usize,
    pub ttl: Duration,
    pub stored: Instant,
}

impl Entry {
    pub fn new(answer: Answer, provider: String, model: String, cost_usd: f64, ttl: Duration) -> Entry {
        let held = match &answer {
            Answer::Chat(response) => {
                let text: usize = response
                    .content
                    .iter()
                    .map(|p| match p {
                        Part::Text { text, .. } | Part::Thinking { text, .. } => text.len(),
                        Part::ToolCall { id, name, arguments } => id.len() + name.len() + arguments.len(),
                        _ => 64,
                    })
                    .sum();
                text + response.id.len() + response.model.len()
            }
            Answer::Embeddings(e) => {
                e.vectors.iter().map(|v| v.len() * 4 + 24).sum::<usize>() + e.model.len()
            }
        };
        let bytes = 256 + held + provider.len() + model.len();
        Entry { answer, provider, model, cost_usd, bytes, ttl, stored: Instant::now() }
    }
}

struct PerEntryTtl;

impl moka::Expiry<[u8; 32], Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The in-process store: bounded by bytes (`cache.max_bytes`), entries expire by TTL.
pub struct EmbeddedCache {
    inner: moka::sync::Cache<[u8; 32], Arc<Entry>>,
}

impl EmbeddedCache {
    /// `evicted` counts entries pushed out for room (not expiries or replacements).
    pub fn new(max_bytes: u64, evicted: prometheus::IntCounter) -> EmbeddedCache {
        let inner = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &[u8; 32], v: &Arc<Entry>| u32::try_from(v.bytes).unwrap_or(u32::MAX))
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evicted.inc();
                }
            })
            .build();
        EmbeddedCache { inner }
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<Entry>> {
        self.inner.get(key)
    }

    pub fn insert(&self, key: [u8; 32], entry: Entry) {
        self.inner.insert(key, Arc::new(entry));
    }

    /// Bytes and entries held, once the writes moka applies lazily are applied (its
    /// figures lag them otherwise: a cache of one entry read 0).
    pub fn size(&self) -> (u64, u64) {
        self.inner.run_pending_tasks();
        (self.inner.weighted_size(), self.inner.entry_count())
    }
}

/// Where entries live: this process, or Redis.
pub enum Store {
    Embedded(EmbeddedCache),
    Redis(redis::RedisCache),
}

impl Store {
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Redis(_) => "redis",
        }
    }

    /// `Err`: the store could not answer (Redis down or slow): serve uncached.
    pub async fn get(&self, key: &[u8; 32], ttl: Duration) -> Result<Option<Arc<Entry>>, String> {
        match self {
            Store::Embedded(c) => Ok(c.get(key)),
            Store::Redis(r) => Ok(r.get(key, ttl).await?.map(Arc::new)),
        }
    }

    pub async fn put(&self, key: [u8; 32], entry: Entry) -> Result<(), String> {
        match self {
            Store::Embedded(c) => {
                c.insert(key, entry);
                Ok(())
            }
            Store::Redis(r) => r.put(&key, &entry).await,
        }
    }

    /// Shares a vector this node indexed with the other nodes (Redis only, in the
    /// background; `failed` counts what could not be sent).
    pub fn publish(&self, item: &semantic::Indexed, max_len: usize, failed: prometheus::IntCounter) {
        if let Store::Redis(r) = self {
            r.publish(item, max_len, failed);
        }
    }

    /// Bytes and entries held, for the in-process store (read when metrics are scraped).
    pub fn size(&self) -> Option<(u64, u64)> {
        match self {
            Store::Embedded(c) => Some(c.size()),
            Store::Redis(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Surface;
    use crate::wire::canonical::{ImageSource, Message, ToolChoice};

    fn decode(surface: Surface, body: &str) -> Request {
        crate::wire::decode_request(surface, body.as_bytes()).unwrap()
    }

    #[test]
    fn keys_ignore_formatting_and_surface_and_are_stable() {
        let a = decode(
            Surface::OpenAi,
            r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}],"max_tokens":20}"#,
        );
        let b = decode(
            Surface::OpenAi,
            r#"{ "max_tokens": 20, "messages": [ {"content": "Be brief.", "role": "system"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]} ], "model": "gpt-4o-mini", "stream": true, "user": "u1" }"#,
        );
        let c = decode(
            Surface::Anthropic,
            r#"{"model":"gpt-4o-mini","system":"Be brief.","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#,
        );
        let extras = serde_json::Map::new();
        let scope = |project, config| Scope {
            project,
            model: "@prod",
            config,
            route: "openai/gpt-4o-mini",
            extras: &extras,
        };
        let k = |r: &Request| key(&scope("p", Some("{strategy:single}")), r);
        assert_eq!(k(&a), k(&b));
        assert_eq!(k(&a), k(&c));
        // Deterministic across processes and builds: a golden value of scheme v1.
        assert_eq!(hex::encode(k(&a)), GOLDEN_V1);
        assert_ne!(k(&a), key(&scope("p", Some("{strategy:fallback}")), &a), "another definition");
        assert_ne!(k(&a), key(&scope("q", Some("{strategy:single}")), &a), "another project");
        let routed = Scope { route: "anthropic/claude", ..scope("p", Some("{strategy:single}")) };
        assert_ne!(k(&a), key(&routed, &a), "another route");
        let mut top_k = serde_json::Map::new();
        top_k.insert("top_k".into(), json!(5));
        let vendor = Scope { extras: &top_k, ..scope("p", Some("{strategy:single}")) };
        assert_ne!(k(&a), key(&vendor, &a), "a field the canonical request does not model");
        let mut other = a.clone();
        other.temperature = Some(0.0);
        assert_ne!(k(&a), k(&other), "a sampling field");
    }

    // The key document as a `serde_json::Value`: what `doc::Document` must print.
    fn part(p: &Part) -> Value {
        match p {
            Part::Text { text, .. } => json!({"text": text}),
            Part::Image { source: ImageSource::Url(url), .. } => json!({"image_url": url}),
            Part::Image { source: ImageSource::Base64 { media_type, data }, .. } => {
                json!({"image": {"media_type": media_type, "data": data}})
            }
            Part::ToolCall { id, name, arguments } => {
                json!({"tool_call": {"id": id, "name": name, "arguments": arguments}})
            }
            Part::ToolResult { call_id, content, is_error } => {
                json!({"tool_result": {"call_id": call_id, "is_error": is_error, "content": content.iter().map(part).collect::<Vec<_>>()}})
            }
            Part::Thinking { text, .. } => json!({"thinking": text}),
            Part::RedactedThinking { data } => json!({"redacted_thinking": data}),
        }
    }

    /// The JSON document a key hashes (see the module docs), with `messages` in place of the
    /// request's own.
    fn reference_document(scope: &Scope<'_>, req: &Request, messages: &[Message]) -> Value {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                json!({"role": role, "content": m.content.iter().map(part).collect::<Vec<_>>()})
            })
            .collect();
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        let tool_choice = req.tool_choice.as_ref().map(|c| match c {
            ToolChoice::Auto => "auto".to_string(),
            ToolChoice::None => "none".to_string(),
            ToolChoice::Required => "required".to_string(),
            ToolChoice::Tool(name) => format!("tool:{name}"),
        });
        let options: serde_json::Map<String, Value> = req
            .openai_only
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "user" | "store" | "stream_options"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        json!({
            "v": KEY_SCHEME,
            "project": scope.project,
            "config": scope.config,
            "route": scope.route,
            "extras": scope.extras,
            "model": scope.model,
            "system": req.system.iter().map(|b| b.text.as_str()).collect::<Vec<_>>(),
            "messages": messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": req.stop,
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": req.parallel_tool_calls,
            "thinking_budget": req.thinking_budget,
            "options": options,
        })
    }

    #[test]
    fn the_streamed_document_is_the_documented_json_value() {
        let rich = decode(
            Surface::OpenAi,
            r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be \"brief\".\n"},
              {"role":"user","content":[{"type":"text","text":"what is in é?"},{"type":"image_url","image_url":{"url":"https://x/y.png"}},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
              {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
              {"role":"tool","tool_call_id":"c1","content":"42"},
              {"role":"user","content":"and then?"}],
              "max_tokens":7,"temperature":0.3,"top_p":0.95,"stop":["x","y"],"seed":3,"response_format":{"type":"json_object"},
              "tools":[{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object","properties":{"a":{"type":"number"}}}}}],
              "tool_choice":{"type":"function","function":{"name":"f"}},"parallel_tool_calls":false,"user":"u","metadata":{"k":"v"}}"#,
        );
        let mut extras = serde_json::Map::new();
        extras.insert("top_k".into(), json!(5));
        extras.insert("a_vendor".into(), json!({"z": [1.5, null], "b": "c"}));
        let scope = Scope {
            project: "p",
            model: "@m",
            config: Some("{def}"),
            route: "openai/gpt-4o#b",
            extras: &extras,
        };
        let want = reference_document(&scope, &rich, &rich.messages).to_string();
        let got = serde_json::to_string(&doc::Document {
            scope: &scope,
            req: &rich,
            messages: &rich.messages,
            semantic: None,
        })
        .unwrap();
        assert_eq!(got, want);
        let mut with_semantic = reference_document(&scope, &rich, &rich.messages[..1]);
        with_semantic["semantic"] = json!({"embedding_model": "e"});
        let got = serde_json::to_string(&doc::Document {
            scope: &scope,
            req: &rich,
            messages: &rich.messages[..1],
            semantic: Some("e"),
        })
        .unwrap();
        assert_eq!(got, with_semantic.to_string());
    }

    const GOLDEN_V1: &str = "2ed559519c648c04632aba89b1d37e0468ae5975b1fba834499579d36c2085af";

    #[test]
    fn bypass_rules() {
        let s = CacheSettings {
            mode: Mode::Exact,
            ttl: Duration::from_secs(60),
            threshold: DEFAULT_THRESHOLD,
            allow_nonzero_temperature: false,
            allow_tools: false,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            embedding_model: None,
        };
        let hot = decode(
            Surface::OpenAi,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#,
        );
        assert_eq!(admits(&s, &hot), Err(Bypass::Temperature));
        let cold = decode(
            Surface::OpenAi,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        );
        assert_eq!(admits(&s, &cold), Ok(()));
    }
}
