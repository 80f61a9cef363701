//! `with_responses` (PRODUCT.md §8.6): a sample of the window's stored requests sent
//! through the candidate for real, and each answer compared with the one production gave.
//!
//! * **The same path as any traffic.** Each request goes to this gateway's own proxy
//!   listener over loopback, so it is authenticated, rate-limited, budgeted, reserved,
//!   routed (fallbacks, health, probes), priced and traced by exactly the code that serves
//!   clients. It carries a grant: a random token (`mlx_xp_…`) that lives only while its
//!   experiment runs and only in this process, which makes the request run on the
//!   candidate's snapshot, as the project and key its stored request came with (that key's
//!   limits as they are now; the project alone if the key is gone), tagged
//!   `experiment=<id>` (so replay never reads it back), with its routing draws seeded by
//!   the stored request's id as production's were.
//! * **What is measured**: the candidate's provider, model, cost, latency and status come
//!   from its own trace record (the gateway's numbers, as production's are); the answer is
//!   the bytes the gateway sent back, in the stored request's surface and stream mode.
//! * **Similarity**: both answers' text (`wire::answer_text`) embedded by
//!   `experiments.embedding_model` through the same grant, cosine similarity per pair.
//!   Pairs where either side failed or has no text, or production's answer is not kept,
//!   are `not_compared`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::{json, Map, Value};

use super::simulate::{baseline, Outcome, Side};
use crate::auth::{KeyLimits, Principal};
use crate::cache::semantic::MAX_EMBED_CHARS;
use crate::config::Snapshot;
use crate::error::Surface;
use crate::trace::replay::{decompress, ReplayRow};

/// Grant tokens start with this (never a project or management key's prefix).
pub const TOKEN_PREFIX: &str = "mlx_xp_";
/// The stored request an experiment request re-sends (seeds its routing draws).
pub const REPLAY_OF: &str = "x-modelux-replay-of";
/// The key name the stored request came with.
pub const REPLAY_KEY: &str = "x-modelux-replay-key";
/// `sample_size` when a `with_responses` experiment names none: real calls cost money.
pub const DEFAULT_SAMPLE: usize = 100;
/// Requests in flight at once when the experiment names no `concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 4;
pub const MAX_CONCURRENCY: usize = 32;
/// A stored body or answer is never inflated beyond this.
const MAX_STORED: usize = 64 << 20;
/// An answer read back is cut here (the text compared is the start of it).
const MAX_ANSWER: u64 = 16 << 20;
/// Answer pairs per embeddings call.
const PAIRS_PER_CALL: usize = 16;
/// How long the runner waits for the candidate's trace records to be written.
pub const TRACE_WAIT: Duration = Duration::from_secs(30);
/// One call (the gateway's own timeouts end it sooner).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// The default similarity threshold (`similarity_threshold`).
pub const DEFAULT_THRESHOLD: f64 = 0.9;

/// What a grant lets a request do.
pub struct Grant {
    pub experiment: String,
    pub project: String,
    /// The candidate's snapshot: the request is served by it instead of the live one.
    pub snapshot: Arc<Snapshot>,
}

/// The grants of experiments running in this process.
#[derive(Default)]
pub struct Grants {
    by_token: DashMap<String, Arc<Grant>>,
    live: AtomicUsize,
}

impl Grants {
    /// No experiment is sending: the proxy skips the lookup.
    pub fn is_empty(&self) -> bool {
        self.live.load(Ordering::Relaxed) == 0
    }

    /// The grant a request presents as `Authorization: Bearer mlx_xp_…`, if it is live.
    pub fn presented(&self, headers: &http::HeaderMap) -> Option<Arc<Grant>> {
        let token =
            crate::auth::bearer_token(headers.get(http::header::AUTHORIZATION).map(|h| h.as_bytes()))?;
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        self.by_token.get(token).map(|g| g.clone())
    }

    /// A new grant, valid until the returned value is dropped.
    pub fn issue(self: &Arc<Self>, grant: Grant) -> Issued {
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        self.by_token.insert(token.clone(), Arc::new(grant));
        self.live.fetch_add(1, Ordering::Relaxed);
        Issued { grants: self.clone(), token }
    }
}

/// A live grant; revoked on drop.
pub struct Issued {
    grants: Arc<Grants>,
    pub token: String,
}

impl Drop for Issued {
    fn drop(&mut self) {
        if self.grants.by_token.remove(&self.token).is_some() {
            self.grants.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Who an experiment request runs as: the project, under the key name its stored request
/// came with (`experiment` for the experiment's own embeddings calls). Its pace is the
/// experiment's `concurrency`: it is not held to that key's rate limits and does not use
/// them up (its rate counters are the experiment's own), so it never turns a client away.
pub fn principal(grant: &Grant, headers: &http::HeaderMap) -> Arc<Principal> {
    let key = headers.get(REPLAY_KEY).and_then(|v| v.to_str().ok()).filter(|k| !k.is_empty());
    Arc::new(Principal {
        project: grant.project.as_str().into(),
        key_name: key.unwrap_or("experiment").into(),
        limits: KeyLimits {
            requests_per_minute: 0,
            tokens_per_minute: 0,
            rate_key: format!("experiment/{}", grant.experiment).into(),
        },
    })
}

/// The stored request an experiment request re-sends.
pub fn replay_of(headers: &http::HeaderMap) -> Option<String> {
    headers.get(REPLAY_OF).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// How one stored request is re-sent.
pub struct Plan {
    pub experiment: String,
    /// `@slug`: what every re-sent request names (the candidate stands in for it).
    pub model: String,
    pub token: String,
    /// The proxy listener, as this process reaches it.
    pub proxy: SocketAddr,
    pub concurrency: usize,
}

/// What came back for one re-sent request.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// The candidate request's id (`x-modelux-request-id`).
    pub request_id: Option<String>,
    pub status: u16,
    pub answer: Vec<u8>,
    /// Measured by the runner (used when the trace record never shows up).
    pub latency_ms: f64,
    pub provider: String,
    pub model: String,
    /// A request that could not be sent at all.
    pub error: Option<String>,
    /// An error answer's message.
    pub error_message: Option<String>,
}

/// The address to reach a listener at: its own, or loopback for a wildcard one.
pub fn reachable(listen: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut addr = listen.to_socket_addrs().ok()?.next()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Some(addr)
}

/// A header value from stored request data, when a header can carry it.
fn header_safe(v: &str) -> bool {
    !v.is_empty() && v.len() <= 1024 && v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The stored body with `model` set to the candidate's `@slug`; `Err` when it cannot be
/// re-sent.
pub fn rewritten_body(row: &ReplayRow, model: &str) -> Result<Vec<u8>, String> {
    if row.replay_body.is_empty() {
        return Err("the request's body is not kept (traces.replay_hours)".into());
    }
    if row.replay_body_truncated {
        return Err("the request's body was cut at traces.replay_max_body_bytes".into());
    }
    let body = decompress(&row.replay_body, MAX_STORED)?;
    let mut map: Map<String, Value> =
        serde_json::from_slice(&body).map_err(|e| format!("the stored body is not a JSON object: {e}"))?;
    map.insert("model".into(), Value::String(model.to_string()));
    serde_json::to_vec(&map).map_err(|e| e.to_string())
}

/// A client for this gateway's own listener: never through an HTTP proxy of the
/// environment (it would receive the grant and the prompts), never redirected.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .timeout_global(Some(CALL_TIMEOUT))
        .build()
        .into()
}

/// The stored endpoint, when it is one of the chat paths the gateway serves (a stored
/// value is data: it never picks where the grant goes).
fn chat_path(endpoint: &str) -> Option<&str> {
    let ok = endpoint.starts_with('/')
        && !endpoint.starts_with("//")
        && crate::trace::replay::is_chat_endpoint(endpoint)
        && endpoint.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
        && !endpoint.contains("..");
    ok.then_some(endpoint)
}

/// Re-sends one stored request through the gateway.
fn send_one(agent: &ureq::Agent, plan: &Plan, row: &ReplayRow) -> Sent {
    let body = match rewritten_body(row, &plan.model) {
        Ok(b) => b,
        Err(e) => return Sent { error: Some(e), ..Sent::default() },
    };
    let Some(path) = chat_path(&row.endpoint) else {
        return Sent { error: Some(format!("not a chat endpoint: {:?}", row.endpoint)), ..Sent::default() };
    };
    let url = format!("http://{}{path}", plan.proxy);
    let mut tags: Vec<String> = row
        .tags()
        .into_iter()
        .filter(|(k, v)| {
            k != "experiment"
                && header_safe(k)
                && header_safe(v)
                && !k.contains([',', '='])
                && !v.contains([',', '='])
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tags.push(format!("experiment={}", plan.experiment));
    let mut req = agent
        .post(&url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", plan.token))
        .header(REPLAY_OF, row.request_id.as_str())
        .header("x-modelux-user-tags", tags.join(","));
    if header_safe(&row.key_name) {
        req = req.header(REPLAY_KEY, row.key_name.as_str());
    }
    if header_safe(&row.end_user) {
        req = req.header("x-modelux-user-id", row.end_user.as_str());
    }
    if header_safe(&row.trace_id) {
        req = req.header("x-modelux-trace-id", row.trace_id.as_str());
    }
    let started = Instant::now();
    let mut resp = match req.send(&body[..]) {
        Ok(r) => r,
        Err(e) => return Sent { error: Some(format!("cannot reach the gateway: {e}")), ..Sent::default() },
    };
    let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (request_id, provider, model) =
        (header("x-modelux-request-id"), header("x-modelux-provider-used"), header("x-modelux-model-used"));
    let status = resp.status().as_u16();
    let answer = resp.body_mut().with_config().limit(MAX_ANSWER).read_to_vec();
    let error_message = match &answer {
        Ok(bytes) if status >= 400 => crate::wire::nested_error_message(bytes),
        _ => None,
    };
    Sent {
        error_message,
        request_id: (!request_id.is_empty()).then_some(request_id),
        status,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        provider,
        model,
        error: answer.as_ref().err().map(|e| format!("reading the answer: {e}")),
        answer: answer.unwrap_or_default(),
    }
}

/// Sends every row, `plan.concurrency` at a time, until done or `cancel`; `done` counts
/// finished requests. Blocking: run it off the async runtime.
pub fn send_all(
    plan: &Plan,
    rows: &[ReplayRow],
    cancel: &AtomicBool,
    done: &AtomicUsize,
) -> Vec<Option<Sent>> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Sent>>> = rows.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..plan.concurrency.clamp(1, MAX_CONCURRENCY).min(rows.len().max(1)) {
            s.spawn(|| {
                let agent = agent();
                loop {
                    if cancel.load(Ordering::SeqCst) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(row) = rows.get(i) else { return };
                    let sent = send_one(&agent, plan, row);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(sent);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    results.into_iter().map(|m| m.into_inner().unwrap_or_default()).collect()
}

fn surface_of(row: &ReplayRow) -> Surface {
    if row.surface == "anthropic" {
        Surface::Anthropic
    } else {
        Surface::OpenAi
    }
}

/// The candidate's side of one request: its trace record when written, else what the
/// answer's headers and the runner's clock said.
pub fn candidate_side(sent: &Sent, record: Option<&ReplayRow>) -> Side {
    if let Some(error) = &sent.error {
        if sent.status == 0 {
            return Side {
                provider: String::new(),
                model: String::new(),
                cost_usd: None,
                latency_ms: None,
                error: Some(error.clone()),
            };
        }
    }
    match record {
        Some(r) => {
            let failed = r.status >= 400 || r.status == 0;
            Side {
                provider: r.provider.clone(),
                model: r.model.clone(),
                cost_usd: Some(r.cost_total),
                latency_ms: Some(r.latency_ms),
                error: failed.then(|| {
                    if r.error_code.is_empty() {
                        format!("http_{}", r.status)
                    } else {
                        r.error_code.clone()
                    }
                }),
            }
        }
        None => Side {
            provider: sent.provider.clone(),
            model: sent.model.clone(),
            cost_usd: None,
            latency_ms: Some(sent.latency_ms),
            error: (sent.status >= 400).then(|| format!("http_{}", sent.status)),
        },
    }
}

/// Why the candidate's request ended as it did, for the decisions list.
pub fn reason(sent: &Sent, record: Option<&ReplayRow>) -> String {
    if let Some(e) = &sent.error {
        if sent.status == 0 {
            return e.clone();
        }
    }
    match record {
        Some(r) if r.status < 400 && r.status != 0 => {
            let attempts = r.attempt_providers.len().max(1);
            let config = if r.routing_config.is_empty() {
                String::new()
            } else {
                format!("@{} v{}: ", r.routing_config, r.config_version)
            };
            format!(
                "{config}sent for real; {}/{} answered after {attempts} attempt{}",
                r.provider,
                r.model,
                if attempts == 1 { "" } else { "s" }
            )
        }
        Some(r) => {
            let why = sent.error_message.clone().unwrap_or_default();
            format!("sent for real; failed with {} {}: {why}", r.status, r.error_code)
                .trim_end_matches(": ")
                .to_string()
        }
        None => format!("sent for real; answered {} (its trace record was not written in time)", sent.status),
    }
}

/// The text of a stored answer or of the candidate's (the first `MAX_EMBED_CHARS`
/// characters), in the stored request's surface; `None` when there is none.
pub fn answer_text(row: &ReplayRow, answer: &[u8]) -> Option<String> {
    let text = crate::wire::answer_text(surface_of(row), answer)?;
    let text: String = text.chars().take(MAX_EMBED_CHARS).collect();
    (!text.trim().is_empty()).then_some(text)
}

/// The text of the answer production gave, when it is kept.
pub fn production_text(row: &ReplayRow) -> Option<String> {
    if row.replay_answer.is_empty() {
        return None;
    }
    answer_text(row, &decompress(&row.replay_answer, MAX_STORED).ok()?)
}

pub fn cosine(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return None;
    }
    Some((dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0))
}

/// Embeds `texts` through the gateway under the grant; `Err` names what went wrong. Also
/// returns the call's cost when the gateway reported one.
fn embed(
    agent: &ureq::Agent,
    plan: &Plan,
    model: &str,
    texts: &[&str],
) -> Result<(Vec<Vec<f64>>, f64), String> {
    let url = format!("http://{}/openai/v1/embeddings", plan.proxy);
    let body = json!({ "model": model, "input": texts, "encoding_format": "float" });
    let mut resp = agent
        .post(&url)
        .header("authorization", format!("Bearer {}", plan.token))
        .header("x-modelux-user-tags", format!("experiment={},experiment_role=similarity", plan.experiment))
        .send_json(body)
        .map_err(|e| format!("cannot reach the gateway: {e}"))?;
    let status = resp.status().as_u16();
    let cost = resp
        .headers()
        .get("x-modelux-cost-usd")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let bytes = resp.body_mut().with_config().limit(MAX_ANSWER).read_to_vec().map_err(|e| e.to_string())?;
    if status >= 400 {
        let why = crate::wire::nested_error_message(&bytes).unwrap_or_default();
        return Err(format!("the embeddings call for {model} answered {status}: {why}"));
    }
    let resp = crate::wire::embeddings::decode_response(&bytes)?;
    if resp.vectors.len() != texts.len() {
        return Err(format!("the embeddings answer for {model} is missing vectors"));
    }
    let out = resp.vectors.into_iter().map(|v| v.into_iter().map(f64::from).collect()).collect();
    Ok((out, cost))
}

/// What comparing the answers gave.
#[derive(Debug, Default)]
pub struct Compared {
    /// Per pair (`None`: absent or not compared).
    pub values: Vec<Option<f64>>,
    pub cost_usd: f64,
    /// The first embeddings call that failed; the pairs compared before it stand.
    pub error: Option<String>,
}

/// The similarity of each pair, `PAIRS_PER_CALL` pairs per embeddings call, until done,
/// an error, or `cancel`. Blocking.
pub fn similarities(
    plan: &Plan,
    model: &str,
    pairs: &[Option<(String, String)>],
    cancel: &AtomicBool,
) -> Compared {
    let agent = agent();
    let mut out = Compared { values: vec![None; pairs.len()], ..Compared::default() };
    let present: Vec<(usize, &(String, String))> =
        pairs.iter().enumerate().filter_map(|(i, p)| p.as_ref().map(|p| (i, p))).collect();
    for chunk in present.chunks(PAIRS_PER_CALL) {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        let texts: Vec<&str> = chunk.iter().flat_map(|(_, (a, b))| [a.as_str(), b.as_str()]).collect();
        match embed(&agent, plan, model, &texts) {
            Ok((vectors, cost)) => {
                out.cost_usd += cost;
                for (k, (i, _)) in chunk.iter().enumerate() {
                    if let (Some(a), Some(b), Some(slot)) =
                        (vectors.get(2 * k), vectors.get(2 * k + 1), out.values.get_mut(*i))
                    {
                        *slot = cosine(a, b);
                    }
                }
            }
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    out
}

/// One request's comparison, from what was sent and recorded.
pub fn outcome(row: &ReplayRow, sent: Option<&Sent>, record: Option<&ReplayRow>) -> Outcome {
    let base = baseline(row);
    let (candidate, why) = match sent {
        Some(s) => (candidate_side(s, record), reason(s, record)),
        None => (
            Side {
                provider: String::new(),
                model: String::new(),
                cost_usd: None,
                latency_ms: None,
                error: Some("not_sent".into()),
            },
            "not sent: the experiment was cancelled first".into(),
        ),
    };
    Outcome::new(row.request_id.clone(), row.ts_ms, base, candidate, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_distribution() {
        use crate::replay::simulate::Similarity;
        assert_eq!(cosine(&[1.0, 0.0], &[1.0, 0.0]), Some(1.0));
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), Some(0.0));
        assert_eq!(cosine(&[1.0, 0.0], &[-3.0, 0.0]), Some(-1.0));
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), None);
        let s =
            Similarity { threshold: 0.9, values: vec![-0.2, 0.5, 0.9, 0.95, 1.0], ..Similarity::default() };
        assert_eq!(s.pct_above(0.9), Some(60.0));
        assert_eq!(s.pct_above(0.99), Some(20.0));
        let v = s.view();
        assert_eq!(v["compared"], 5);
        assert_eq!(v["histogram"][0]["count"], 1);
        assert_eq!(v["histogram"][9]["count"], 3);
        assert_eq!(Similarity::default().pct_above(0.5), None);
    }

    #[test]
    fn listeners_are_reached_on_loopback() {
        assert_eq!(reachable("0.0.0.0:8080"), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(reachable("[::]:81"), Some("[::1]:81".parse().unwrap()));
        assert_eq!(reachable("127.0.0.1:5000"), Some("127.0.0.1:5000".parse().unwrap()));
    }

    #[test]
    fn grants_live_only_while_held() {
        let grants = Arc::new(Grants::default());
        assert!(grants.is_empty());
        let yaml = r#"
providers:
  - { id: p1, kind: openai_compatible, base_url: "http://127.0.0.1:9/v1", models: ["m"] }
projects:
  - { id: p, keys: [ { name: dev, key: "mlx_sk_live_0123456789abcdef", requests_per_minute: 7 } ] }
"#;
        let snapshot = Arc::new(crate::config::build_snapshot(yaml, &|_| None, None).unwrap());
        let issued = grants.issue(Grant { experiment: "exp_1".into(), project: "p".into(), snapshot });
        assert!(issued.token.starts_with(TOKEN_PREFIX) && issued.token.len() == TOKEN_PREFIX.len() + 64);
        let mut h = http::HeaderMap::new();
        h.insert("authorization", format!("Bearer {}", issued.token).parse().unwrap());
        assert_eq!(grants.presented(&h).map(|g| g.experiment.clone()), Some("exp_1".into()));
        let p = principal(&grants.presented(&h).unwrap(), &h);
        assert_eq!((&*p.project, &*p.key_name), ("p", "experiment"));
        // Under the stored request's key name, on the experiment's own rate counters: the
        // key's clients are never rate-limited by experiment traffic.
        h.insert(REPLAY_KEY, "dev".parse().unwrap());
        let p = principal(&grants.presented(&h).unwrap(), &h);
        assert_eq!(
            (&*p.key_name, p.limits.requests_per_minute, &*p.limits.rate_key),
            ("dev", 0, "experiment/exp_1")
        );
        h.remove(REPLAY_KEY);
        let token = issued.token.clone();
        drop(issued);
        assert!(grants.is_empty());
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert!(grants.presented(&h).is_none());
    }

    #[test]
    fn only_chat_paths_are_sent_to() {
        assert_eq!(chat_path("/openai/v1/chat/completions"), Some("/openai/v1/chat/completions"));
        assert_eq!(chat_path("/v1/messages"), Some("/v1/messages"));
        for bad in [
            "@evil.example/chat/completions",
            "//evil/chat/completions",
            "/a/../v1/messages",
            "/v1/models",
            "/x?y/messages",
        ] {
            assert_eq!(chat_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn bodies_are_re_sent_with_the_candidate_model() {
        let mut row = ReplayRow::default();
        assert!(rewritten_body(&row, "@p").is_err());
        row.replay_body = crate::trace::replay::compress(br#"{"model":"gpt-4o","messages":[]}"#);
        let body: Value = serde_json::from_slice(&rewritten_body(&row, "@p").unwrap()).unwrap();
        assert_eq!(body, json!({"model": "@p", "messages": []}));
        row.replay_body_truncated = true;
        assert!(rewritten_body(&row, "@p").unwrap_err().contains("cut"));
    }
}
