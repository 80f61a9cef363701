//! Mock LLM upstream: OpenAI, Anthropic, Google Gemini, Cohere, Amazon
//! Bedrock and Azure OpenAI on one port.
//!
//! Speaks each provider's published wire format (the OpenAI and Anthropic
//! shapes are cut from the fixtures in `tests/fixtures/openai/` and
//! `tests/fixtures/anthropic/`), over a small hand-written HTTP/1.1 server so
//! it is fast enough to be the baseline in load tests and fully controllable
//! (latency, streaming pace, scripted failures) in gateway tests.
//!
//! The API is chosen by the full request path (the query is ignored unless
//! said), so a client's base URL plus its endpoint must add up to the
//! provider's documented path:
//!
//! | route | API |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI chat completions (JSON or SSE) |
//! | `GET /v1/models` | OpenAI model list |
//! | `POST /v1/embeddings` | OpenAI embeddings (`float` / `base64`) |
//! | `POST /v1/messages`, `POST /v1/messages/count_tokens` | Anthropic Messages |
//! | `POST /v1beta/models/{model}:generateContent` (also `/v1/models/…`) | Gemini |
//! | `POST /v1beta/models/{model}:streamGenerateContent[?alt=sse]` | Gemini stream (SSE, or a JSON array without `alt=sse`) |
//! | `POST /v1beta/models/{model}:batchEmbedContents`, `…:embedContent` | Gemini embeddings |
//! | `POST /v2/chat` (JSON or `"stream": true` SSE), `POST /v2/embed` | Cohere v2 |
//! | `POST /model/{modelId}/converse`, `…/converse-stream` | Bedrock Converse (event-stream frames) |
//! | `POST /openai/deployments/{deployment}/chat/completions?api-version=…` | Azure OpenAI chat |
//! | `POST /openai/deployments/{deployment}/embeddings?api-version=…` | Azure OpenAI embeddings |
//! | `POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`, `POST …/{id}/cancel`, `GET …/{id}/input_items` | OpenAI Responses API (also under Azure's `/openai/v1/responses`) |
//! | `/v1/files…`, `/v1/batches…` | OpenAI files (multipart upload, list, metadata, `content`, delete) and batches (create, list, retrieve, cancel) |
//! | `/v1/messages/batches…`, `/v1/files…` with `anthropic-version` | Anthropic message batches (create, list, retrieve, `results` JSONL, cancel, delete) and files |
//! | `POST /v1/audio/transcriptions`, `…/translations` (multipart), `/v1/audio/speech` (binary or SSE), `/v1/images/generations` | OpenAI audio and images (also under Azure's deployments) |
//! | `GET /mock/requests` | the requests recorded so far (`--record`), as JSON: method, path, headers |
//!
//! Anything else is a 404 in OpenAI's error shape (under
//! `/openai/deployments/`, or without `api-version`, in Azure's).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::answer::{self, Answer, Ctx, Event};
use crate::anthropic::{self, Reply, StopReason};
use crate::bedrock::{self, Auth};
use crate::template::{self, StreamTemplates, Template, Templates, Vals};
use crate::wire::{self, ChunkedDecoder, Decoded};
use crate::{azure, cohere, files, gemini, media, openai, responses};

/// Largest request head (request line + headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted (the contract is "at least 64 MiB").
const MAX_BODY: u64 = 256 * 1024 * 1024;
const MAX_HEADERS: usize = 128;

/// How the mock answers; see [`Behavior`] for per-request overrides.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Delay before response headers (every answered request).
    pub latency: Duration,
    /// Streaming: delay before the first content chunk (OpenAI: after the
    /// role chunk; Anthropic: before the first `content_block_delta`; Gemini:
    /// before the first chunk; Cohere: before the first `content-delta` or
    /// `tool-plan-delta`; Bedrock: before the first `contentBlockDelta`).
    pub ttft: Duration,
    /// Streaming: delay between consecutive content chunks (the same events
    /// as for `ttft`).
    pub inter_token: Duration,
    /// Content tokens per response (`" tok0"`, `" tok1"`, ...).
    pub tokens: usize,
    /// Fraction (0..=1) of requests answered with `error_status`. Applied
    /// deterministically (every 1/rate-th request), so tests are repeatable.
    pub error_rate: f64,
    pub error_status: u16,
    /// Consumed one per request (any route), in order; defaults apply once
    /// it is empty.
    pub script: Vec<Behavior>,
    /// Keep every request for [`MockServer::requests`]. Off for load runs.
    pub record: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency: Duration::ZERO,
            ttft: Duration::ZERO,
            inter_token: Duration::ZERO,
            tokens: 16,
            error_rate: 0.0,
            error_status: 500,
            script: Vec::new(),
            record: true,
        }
    }
}

/// Per-request behavior override (see [`MockConfig::script`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behavior {
    Normal,
    /// Answer with this status and an error body in the route's API shape
    /// (OpenAI; Anthropic on `/v1/messages*`; Gemini `{"error":{code,message,
    /// status}}`; Cohere `{"message"}`; Bedrock `{"message"}` plus
    /// `x-amzn-ErrorType`; Azure `{"error":{"code":"<status>",message}}`).
    /// 429 also sets `retry-after: 1` for OpenAI, Anthropic and Azure (plus
    /// `retry-after-ms`), and a `RetryInfo` detail for Gemini. Statuses below
    /// 400 answer normally.
    Status(u16),
    /// Read the request, then reset the connection without any response.
    ResetBeforeHeaders,
    /// Send headers and this many stream events (the first event counts: the
    /// OpenAI role chunk, Anthropic's `message_start`, Gemini's first chunk,
    /// Cohere's `message-start`, Bedrock's `messageStart` frame), then reset
    /// the connection: no finish event, no terminal marker, no chunked
    /// terminator. For a non-streamed request half of the body is sent.
    ResetMidStream {
        after_chunks: usize,
    },
    /// Read the request and never answer (until the client hangs up).
    Hang,
    /// Wait this long (on top of `latency`), then answer normally.
    Delay(Duration),
    /// Answer (after `latency`, on any route) with exactly these body bytes:
    /// this status and `content-type`, chunked transfer encoding, the body
    /// written `chunk` bytes per HTTP chunk with a flush after each (0: the
    /// whole body in one chunk). For replaying recorded fixtures.
    Replay {
        status: u16,
        content_type: String,
        body: Vec<u8>,
        chunk: usize,
    },
}

/// One request as received (when [`MockConfig::record`] is on).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// First header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }
}

struct Shared {
    cfg: MockConfig,
    script: Mutex<VecDeque<Behavior>>,
    /// Length of `script`, so the load path never takes the lock.
    script_len: AtomicUsize,
    recorded: Mutex<Vec<RecordedRequest>>,
    count: AtomicUsize,
    /// Sequence for response ids and the deterministic error rate.
    seq: AtomicU64,
    tpl: Templates,
    atpl: anthropic::Templates,
    /// JSON string of the whole non-streamed content.
    content_json: Vec<u8>,
    /// JSON string of each streamed content token.
    token_json: Vec<Vec<u8>>,
    /// Responses API objects this mock created.
    responses: responses::Responses,
    /// Files and batches this mock holds.
    files: files::Store,
}

/// A running mock upstream. Dropping it shuts it down.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl MockServer {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start(cfg: MockConfig) -> io::Result<MockServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, cfg).await
    }

    /// Serves on an already bound listener.
    pub async fn start_on(listener: TcpListener, cfg: MockConfig) -> io::Result<MockServer> {
        let addr = listener.local_addr()?;
        let tpl = Templates::load()?;
        let atpl = anthropic::Templates::load()?;
        let tokens: Vec<String> = (0..cfg.tokens).map(|i| format!(" tok{i}")).collect();
        let content_json = serde_json::to_vec(&tokens.concat()).map_err(io::Error::other)?;
        let token_json =
            tokens.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>().map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            script: Mutex::new(cfg.script.iter().cloned().collect()),
            script_len: AtomicUsize::new(cfg.script.len()),
            cfg,
            recorded: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            tpl,
            atpl,
            content_json,
            token_json,
            responses: responses::Responses::new(addr.port()),
            files: files::Store::new(addr.port()),
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        Ok(MockServer { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, the OpenAI-style base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://127.0.0.1:PORT`, the Anthropic-style base URL (clients append
    /// `/v1/messages`).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1beta`, Gemini's versioned base URL (clients
    /// append `/models/{model}:generateContent`).
    pub fn gemini_base_url(&self) -> String {
        format!("http://{}/v1beta", self.addr)
    }

    /// `http://127.0.0.1:PORT`, the base URL that stands in for a provider's
    /// host: Gemini's `generativelanguage.googleapis.com` (clients append
    /// `/v1beta/models/…`), Cohere's `api.cohere.com` (`/v2/chat`), Bedrock's
    /// `bedrock-runtime.REGION.amazonaws.com` (`/model/…/converse`) and an
    /// Azure resource's `RESOURCE.openai.azure.com` (`/openai/deployments/…`).
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (empty when `record` is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorded).clone()
    }

    /// Requests received so far (counted even when `record` is off).
    pub fn request_count(&self) -> usize {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// Script entries not consumed yet.
    pub fn script_pending(&self) -> usize {
        lock(&self.shared.script).len()
    }

    /// Appends behaviors to the script at runtime.
    pub fn push_script(&self, behaviors: impl IntoIterator<Item = Behavior>) {
        let mut script = lock(&self.shared.script);
        script.extend(behaviors);
        self.shared.script_len.store(script.len(), Ordering::Release);
    }

    /// Stops accepting and closes every open connection.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A poisoned lock only means a test thread panicked; the data is still fine.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(listener: TcpListener, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok((sock, _)) => {
                    // Latency matters more than packet count here: SSE chunks
                    // must leave immediately.
                    let _ = sock.set_nodelay(true);
                    let sh = sh.clone();
                    let mut stop = stop.clone();
                    tokio::spawn(async move {
                        if *stop.borrow_and_update() {
                            return;
                        }
                        tokio::select! {
                            _ = stop.changed() => {}
                            _ = serve_conn(sock, &sh) => {}
                        }
                    });
                }
                // Out of fds and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    ChatCompletions,
    Models,
    Messages,
    CountTokens,
    Embeddings,
    /// The model is in [`Head::param`].
    Gemini(gemini::Op),
    CohereChat,
    CohereEmbed,
    /// The model id is in [`Head::param`].
    Converse {
        stream: bool,
    },
    /// The deployment is in [`Head::param`].
    Azure(azure::Op),
    /// The response id (if any) is in [`Head::param`], the query in [`Head::query`].
    Responses {
        op: responses::Op,
        azure: bool,
    },
    /// The id (if any) is in [`Head::param`].
    Files(files::Op),
    Media(media::Op),
    /// `GET /mock/requests`.
    Recorded,
    NotFound,
}

/// Which provider's headers and error shape a response uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
    Gemini,
    Cohere,
    Bedrock,
    Azure,
}

impl Route {
    fn api(self) -> Api {
        match self {
            Route::Messages | Route::CountTokens => Api::Anthropic,
            Route::Gemini(_) => Api::Gemini,
            Route::CohereChat | Route::CohereEmbed => Api::Cohere,
            Route::Converse { .. } => Api::Bedrock,
            Route::Azure(_) | Route::Responses { azure: true, .. } => Api::Azure,
            Route::Responses { azure: false, .. } | Route::Recorded => Api::OpenAi,
            Route::Files(op) if op.anthropic() => Api::Anthropic,
            Route::Files(_) | Route::Media(_) => Api::OpenAi,
            Route::ChatCompletions | Route::Models | Route::Embeddings | Route::NotFound => Api::OpenAi,
        }
    }
}

/// Routes beyond the fixed OpenAI/Anthropic paths, with their path
/// parameter. Only reached when no fixed path matched, so the load path
/// never pays for it.
fn route_param(method: &str, path: &str, query: &str) -> (Route, Option<String>) {
    for (prefix, azure) in [("/v1/responses", false), ("/openai/v1/responses", true)] {
        if let Some(rest) = path.strip_prefix(prefix).filter(|r| r.is_empty() || r.starts_with('/')) {
            let (op, id) = responses::Op::from_path(method, rest);
            return (Route::Responses { op, azure }, id);
        }
    }
    if (method, path) == ("GET", "/mock/requests") {
        return (Route::Recorded, None);
    }
    if method != "POST" {
        return (Route::NotFound, None);
    }
    if let Some(op) = path.strip_prefix("/v1/").and_then(media::Op::from_endpoint) {
        return (Route::Media(op), None);
    }
    match path {
        "/v1/embeddings" => return (Route::Embeddings, None),
        "/v2/chat" => return (Route::CohereChat, None),
        "/v2/embed" => return (Route::CohereEmbed, None),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1beta/models/").or_else(|| path.strip_prefix("/v1/models/")) {
        if let Some((model, method)) = rest.rsplit_once(':') {
            if let Some(op) = gemini::Op::from_method(method, query) {
                if !model.is_empty() && !model.contains('/') {
                    return (Route::Gemini(op), Some(answer::percent_decode(model)));
                }
            }
        }
    }
    if let Some(rest) = path.strip_prefix("/model/") {
        // The id may hold '/' (an ARN), encoded or not: match the suffix.
        for (suffix, stream) in [("/converse-stream", true), ("/converse", false)] {
            if let Some(id) = rest.strip_suffix(suffix).filter(|id| !id.is_empty()) {
                return (Route::Converse { stream }, Some(answer::percent_decode(id)));
            }
        }
    }
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let (deployment, endpoint) = rest.split_once('/').unwrap_or((rest, ""));
        return (
            Route::Azure(azure::Op::from_path(endpoint, query)),
            Some(answer::percent_decode(deployment)),
        );
    }
    (Route::NotFound, None)
}

enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
}

struct Head {
    len: usize,
    route: Route,
    body: BodyKind,
    close: bool,
    expect_continue: bool,
    /// `METHOD path`, kept only for the 404 message.
    not_found: Option<String>,
    /// The model / model id / deployment of a path that carries one.
    param: Option<String>,
    /// The query string, kept only for the routes that read it after routing.
    query: String,
    /// The request's `content-type`, kept only for uploads.
    content_type: String,
    /// Bedrock routes only: what the `authorization` header looks like.
    auth: Auth,
    recorded: Option<RecordedRequest>,
}

/// Parses a request head from the front of `buf`; `None` when incomplete.
fn parse_head(buf: &[u8], record: bool) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(wire::invalid(&format!("bad request head: {e}"))),
    };
    let method = req.method.unwrap_or("");
    let full_path = req.path.unwrap_or("");
    let path = full_path.split('?').next().unwrap_or("");
    let (mut route, mut param) = match (method, path) {
        ("POST", "/v1/chat/completions") => (Route::ChatCompletions, None),
        ("GET", "/v1/models") => (Route::Models, None),
        ("POST", "/v1/messages") => (Route::Messages, None),
        ("POST", "/v1/messages/count_tokens") => (Route::CountTokens, None),
        _ => route_param(method, path, full_path.split_once('?').map_or("", |(_, q)| q)),
    };
    let header = |n: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(n)).map(|h| h.value);
    if route == Route::NotFound {
        if let Some((op, id)) = files::Op::from_path(method, path, header("anthropic-version").is_some()) {
            (route, param) = (Route::Files(op), id);
        }
    }
    let auth = if matches!(route, Route::Converse { .. }) {
        let value =
            req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("authorization")).map(|h| h.value);
        Auth::of(value)
    } else {
        Auth::Missing
    };
    let mut body = BodyKind::Empty;
    let mut close = req.version == Some(0);
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if !matches!(body, BodyKind::Chunked) {
                body = BodyKind::Length(wire::parse_len(h.value)?);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if wire::has_token(h.value, "chunked") {
                body = BodyKind::Chunked;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if wire::has_token(h.value, "close") {
                close = true;
            } else if wire::has_token(h.value, "keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = wire::has_token(h.value, "100-continue");
        }
    }
    if matches!(body, BodyKind::Length(0)) {
        body = BodyKind::Empty;
    }
    let not_found = (route == Route::NotFound).then(|| format!("{method} {path}"));
    let query = match route {
        Route::Responses { .. } | Route::Files(_) => {
            full_path.split_once('?').map_or("", |(_, q)| q).to_owned()
        }
        _ => String::new(),
    };
    let content_type = match route {
        Route::Files(_) | Route::Media(_) | Route::Azure(azure::Op::Media(_)) => {
            header("content-type").map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
        }
        _ => String::new(),
    };
    let recorded = record.then(|| RecordedRequest {
        method: method.to_owned(),
        path: full_path.to_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
        body: Vec::new(),
    });
    Ok(Some(Head {
        len,
        route,
        body,
        close,
        expect_continue,
        not_found,
        param,
        query,
        content_type,
        auth,
        recorded,
    }))
}

/// Per-connection reusable buffers, so steady-state requests do not allocate.
struct ConnBufs {
    /// Sequence number of the request being answered (for x-request-id).
    seq: u64,
    out: Vec<u8>,
    body: Vec<u8>,
    model: Vec<u8>,
}

async fn serve_conn(mut sock: TcpStream, sh: &Shared) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut bufs = ConnBufs {
        seq: 0,
        out: Vec::with_capacity(4096),
        body: Vec::with_capacity(2048),
        model: Vec::with_capacity(64),
    };
    loop {
        let head = loop {
            if !buf.is_empty() {
                match parse_head(&buf, sh.cfg.record) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(_) => {
                        write_error(&mut sock, &mut bufs, 400, &[], true).await?;
                        return Ok(());
                    }
                }
                if buf.len() > MAX_HEAD {
                    write_error(&mut sock, &mut bufs, 431, &[], true).await?;
                    return Ok(());
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            if sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        buf.advance(head.len);
        if let BodyKind::Length(n) = head.body {
            if n > MAX_BODY {
                write_error(&mut sock, &mut bufs, 413, &[], true).await?;
                return Ok(());
            }
        }
        if head.expect_continue && !matches!(head.body, BodyKind::Empty) {
            sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body = read_body(&mut sock, &mut buf, &head.body).await?;
        let keep = handle(&mut sock, sh, head, body, &mut bufs).await?;
        if !keep {
            return Ok(());
        }
    }
}

async fn read_body(sock: &mut TcpStream, buf: &mut BytesMut, kind: &BodyKind) -> io::Result<Bytes> {
    match *kind {
        BodyKind::Empty => Ok(Bytes::new()),
        BodyKind::Length(n) => {
            let n = usize::try_from(n).map_err(|_| wire::invalid("body too large"))?;
            if buf.len() < n {
                buf.reserve(n - buf.len());
            }
            while buf.len() < n {
                if sock.read_buf(buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok(buf.split_to(n).freeze())
        }
        BodyKind::Chunked => {
            let mut dec = ChunkedDecoder::new();
            let mut out = BytesMut::new();
            loop {
                match dec.next(buf)? {
                    Decoded::Data(d) => {
                        if (out.len() + d.len()) as u64 > MAX_BODY {
                            return Err(wire::invalid("body too large"));
                        }
                        out.extend_from_slice(&d);
                    }
                    Decoded::Done => return Ok(out.freeze()),
                    Decoded::NeedMore => {
                        if buf.capacity() - buf.len() < 4096 {
                            buf.reserve(64 * 1024);
                        }
                        if sock.read_buf(buf).await? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                }
            }
        }
    }
}

impl Shared {
    fn next_behavior(&self) -> Behavior {
        if self.script_len.load(Ordering::Acquire) > 0 {
            let mut script = lock(&self.script);
            if let Some(b) = script.pop_front() {
                self.script_len.store(script.len(), Ordering::Release);
                return b;
            }
        }
        let rate = self.cfg.error_rate;
        if rate > 0.0 {
            // Deterministic spread: request n errors when floor(n*rate) steps.
            let n = self.seq.load(Ordering::Relaxed) as f64;
            if ((n + 1.0) * rate).floor() > (n * rate).floor() {
                return Behavior::Status(self.cfg.error_status);
            }
        }
        Behavior::Normal
    }
}

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Only whether tools are declared: the tool-call check parses the body
    /// again, so requests without tools (load runs) pay nothing for it.
    #[serde(default)]
    tools: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Answers one request; returns whether the connection stays open.
async fn handle(
    sock: &mut TcpStream,
    sh: &Shared,
    mut head: Head,
    body: Bytes,
    bufs: &mut ConnBufs,
) -> io::Result<bool> {
    sh.count.fetch_add(1, Ordering::Relaxed);
    if let Some(mut rec) = head.recorded.take() {
        rec.body = body.to_vec();
        lock(&sh.recorded).push(rec);
    }
    let behavior = sh.next_behavior();
    let seq = sh.seq.fetch_add(1, Ordering::Relaxed);
    bufs.seq = seq;
    let mut cut = None;
    match &behavior {
        Behavior::ResetBeforeHeaders => {
            reset(sock);
            return Ok(false);
        }
        Behavior::Hang => {
            let mut scratch = [0u8; 4096];
            while let Ok(n) = sock.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
            return Ok(false);
        }
        Behavior::Delay(d) => sleep(*d).await,
        Behavior::ResetMidStream { after_chunks } => cut = Some(*after_chunks),
        Behavior::Normal | Behavior::Status(_) | Behavior::Replay { .. } => {}
    }
    sleep(sh.cfg.latency).await;
    let api = head.route.api();
    match behavior {
        Behavior::Status(s) if s >= 400 => {
            match api {
                Api::OpenAi => write_error(sock, bufs, s, &[], head.close).await?,
                Api::Anthropic => write_anthropic_error(sock, sh, bufs, s, "", head.close).await?,
                _ => return send_answer(sock, sh, bufs, api, api_error(api, s), None, head.close).await,
            }
            return Ok(!head.close);
        }
        Behavior::Replay { status, content_type, body, chunk } => {
            return replay(sock, bufs, api, status, &content_type, &body, chunk, head.close).await;
        }
        _ => {}
    }
    let ctx = Ctx { seq, cfg: &sh.cfg, param: head.param.as_deref().unwrap_or("") };
    let answer = match head.route {
        Route::Messages => return messages(sock, sh, &body, bufs, cut, head.close).await,
        Route::CountTokens => return count_tokens(sock, sh, &body, bufs, head.close).await,
        Route::NotFound => {
            let msg = format!("Invalid URL ({})", head.not_found.as_deref().unwrap_or(""));
            write_error(sock, bufs, 404, msg.as_bytes(), head.close).await?;
            return Ok(!head.close);
        }
        Route::Models => {
            write_response(sock, bufs, 200, "application/json", MODELS.as_bytes(), head.close).await?;
            return Ok(!head.close);
        }
        Route::ChatCompletions => {
            return chat_completions(sock, sh, &body, bufs, Api::OpenAi, None, cut, head.close).await;
        }
        Route::Azure(azure::Op::Chat) => {
            let deployment = Some(ctx.param);
            return chat_completions(sock, sh, &body, bufs, Api::Azure, deployment, cut, head.close).await;
        }
        Route::Embeddings => openai::embeddings(&body, None),
        Route::Azure(azure::Op::Embeddings) => openai::embeddings(&body, Some(ctx.param)),
        Route::Azure(azure::Op::NotFound) => azure::error(404, ""),
        Route::Azure(azure::Op::Media(op)) => {
            media::answer(&ctx, op, Some(ctx.param), &head.content_type, &body)
        }
        Route::Media(op) => media::answer(&ctx, op, None, &head.content_type, &body),
        Route::Responses { op, .. } => {
            responses::answer(&sh.responses, &ctx, op, head.param.as_deref(), &head.query, &body)
        }
        Route::Files(op) => {
            sh.files.answer(&ctx, op, head.param.as_deref(), &head.query, &head.content_type, &body)
        }
        Route::Recorded => {
            let recorded: Vec<serde_json::Value> = lock(&sh.recorded)
                .iter()
                .map(|r| {
                    let headers: serde_json::Map<String, serde_json::Value> =
                        r.headers.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
                    serde_json::json!({"method": r.method, "path": r.path, "headers": headers})
                })
                .collect();
            Answer::json(200, answer::compact(&recorded))
        }
        Route::Gemini(op) => gemini::answer(&ctx, op, &body),
        Route::CohereChat => cohere::chat(&ctx, &body),
        Route::CohereEmbed => cohere::embed(&ctx, &body),
        Route::Converse { stream } => bedrock::converse(&ctx, stream, head.auth, &body),
    };
    send_answer(sock, sh, bufs, api, answer, cut, head.close).await
}

/// `POST /v1/chat/completions`, or Azure's deployment route (`deployment`
/// set: it is the model, and the body need not name one). Returns whether
/// the connection stays open.
#[allow(clippy::too_many_arguments)]
async fn chat_completions(
    sock: &mut TcpStream,
    sh: &Shared,
    body: &[u8],
    bufs: &mut ConnBufs,
    api: Api,
    deployment: Option<&str>,
    cut: Option<usize>,
    close: bool,
) -> io::Result<bool> {
    let req: ChatRequest<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(_) => {
            write_error_as(sock, bufs, api, 400, &[], close).await?;
            return Ok(!close);
        }
    };
    let model = match (deployment, req.model) {
        (Some(d), _) => Cow::Borrowed(d),
        (None, Some(m)) => m,
        (None, None) => {
            write_error_as(sock, bufs, api, 400, b"you must provide a model parameter", close).await?;
            return Ok(!close);
        }
    };
    bufs.model.clear();
    serde_json::to_writer(&mut bufs.model, &*model).map_err(io::Error::other)?;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut vals = Vals {
        seq: bufs.seq,
        created,
        model_json: &[],
        content_json: &sh.content_json,
        prompt_tokens: answer::input_tokens(body),
        completion_tokens: sh.cfg.tokens as u64,
    };
    let model_json = std::mem::take(&mut bufs.model);
    vals.model_json = &model_json;
    let stream = req.stream == Some(true);
    let usage = req.stream_options.and_then(|o| o.include_usage) == Some(true);
    let tool = if req.tools.is_some() { openai::weather_tool(body) } else { None };
    let r = if let Some(name) = tool {
        vals.completion_tokens = answer::TOOL_CALL_TOKENS;
        let a = openai::tool_answer(&sh.tpl, &mut vals, stream.then_some(usage), &name);
        send_answer(sock, sh, bufs, api, a, cut, close).await
    } else if stream {
        stream_completion(sock, sh, bufs, &mut vals, usage, cut, close, api).await
    } else {
        bufs.body.clear();
        sh.tpl.completion.render(&vals, &mut bufs.body);
        if cut.is_some() {
            write_truncated(sock, bufs).await
        } else {
            let body = std::mem::take(&mut bufs.body);
            let r = write_api_response(sock, bufs, api, 200, "application/json", &body, close, "").await;
            bufs.body = body;
            r.map(|()| true)
        }
    };
    bufs.model = model_json;
    Ok(r? && !close)
}

/// Sends a rendered answer (see [`Answer`]); `cut` applies
/// `ResetMidStream`. Returns whether the connection stays open.
#[allow(clippy::too_many_arguments)]
async fn send_answer(
    sock: &mut TcpStream,
    sh: &Shared,
    bufs: &mut ConnBufs,
    api: Api,
    answer: Answer,
    cut: Option<usize>,
    close: bool,
) -> io::Result<bool> {
    match answer {
        Answer::Body { status, content_type, body, headers } => {
            if cut.is_some() && (200..300).contains(&status) {
                return write_cut_body(sock, bufs, api, content_type, &body).await;
            }
            write_api_response(sock, bufs, api, status, content_type, &body, close, &headers).await?;
            Ok(!close)
        }
        Answer::Stream { content_type, events, trailer } => {
            let done = stream_events(sock, sh, bufs, api, content_type, &events, trailer, cut, close).await?;
            Ok(done && !close)
        }
    }
}

/// The scripted-status error of the APIs whose modules render their own.
fn api_error(api: Api, status: u16) -> Answer {
    match api {
        Api::Gemini => gemini::error(status, ""),
        Api::Cohere => cohere::error(status, ""),
        Api::Bedrock => bedrock::error(status, ""),
        Api::Azure => azure::error(status, ""),
        Api::OpenAi | Api::Anthropic => Answer::json(status, error_body(status, "").into_owned()),
    }
}

/// [`Behavior::Replay`]: the given bytes, `chunk` bytes per HTTP chunk.
#[allow(clippy::too_many_arguments)]
async fn replay(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    api: Api,
    status: u16,
    content_type: &str,
    body: &[u8],
    chunk: usize,
    close: bool,
) -> io::Result<bool> {
    bufs.out.clear();
    let _ = write!(
        bufs.out,
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n",
        reason(status)
    );
    push_api_headers(&mut bufs.out, api, bufs.seq, close);
    bufs.out.extend_from_slice(b"\r\n");
    sock.write_all(&bufs.out).await?;
    let size = if chunk == 0 { body.len().max(1) } else { chunk };
    for piece in body.chunks(size) {
        bufs.out.clear();
        wire::push_chunk(&mut bufs.out, piece);
        sock.write_all(&bufs.out).await?;
        sock.flush().await?;
    }
    sock.write_all(b"0\r\n\r\n").await?;
    Ok(!close)
}

/// Streams the SSE response. Returns false when the connection was cut.
#[allow(clippy::too_many_arguments)]
async fn stream_completion<'a>(
    sock: &mut TcpStream,
    sh: &'a Shared,
    bufs: &mut ConnBufs,
    vals: &mut Vals<'a>,
    usage: bool,
    cut: Option<usize>,
    close: bool,
    api: Api,
) -> io::Result<bool> {
    let t: &StreamTemplates = &sh.tpl.stream;
    let (role, content, finish) =
        if usage { (&t.role, &t.content, &t.finish) } else { (&t.role_nu, &t.content_nu, &t.finish_nu) };
    bufs.out.clear();
    bufs.out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
          cache-control: no-cache\r\ntransfer-encoding: chunked\r\n",
    );
    push_api_headers(&mut bufs.out, api, vals.seq, close);
    bufs.out.extend_from_slice(b"\r\n");
    // Headers go out on their own so a client sees the status before TTFT.
    sock.write_all(&bufs.out).await?;

    let mut sent = 0usize;
    // One event per chunk, one write per chunk: nothing is held back.
    macro_rules! event {
        ($tpl:expr) => {{
            if cut == Some(sent) {
                reset(sock);
                return Ok(false);
            }
            write_event(sock, bufs, $tpl, vals).await?;
            sent += 1;
        }};
    }
    vals.content_json = b"\"\"";
    event!(role);
    sleep(sh.cfg.ttft).await;
    for (i, tok) in sh.token_json.iter().enumerate() {
        if i > 0 {
            sleep(sh.cfg.inter_token).await;
        }
        vals.content_json = tok;
        event!(content);
    }
    event!(finish);
    if usage {
        event!(&t.usage);
    }
    if cut.is_some_and(|c| c >= sent) {
        reset(sock);
        return Ok(false);
    }
    bufs.out.clear();
    wire::push_chunk(&mut bufs.out, b"data: [DONE]\n\n");
    bufs.out.extend_from_slice(b"0\r\n\r\n");
    sock.write_all(&bufs.out).await?;
    Ok(true)
}

#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    messages: Option<IgnoredAny>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    tools: Option<Vec<ToolDef<'a>>>,
    #[serde(borrow, default)]
    thinking: Option<ThinkingParam<'a>>,
}

#[derive(Deserialize)]
struct ToolDef<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ThinkingParam<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct CountTokensRequest {
    #[serde(default)]
    model: Option<IgnoredAny>,
    #[serde(default)]
    messages: Option<IgnoredAny>,
}

/// `POST /v1/messages`. Returns whether the connection stays open.
async fn messages(
    sock: &mut TcpStream,
    sh: &Shared,
    body: &[u8],
    bufs: &mut ConnBufs,
    cut: Option<usize>,
    close: bool,
) -> io::Result<bool> {
    let req: MessagesRequest<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return anthropic_400(sock, sh, bufs, &format!("invalid request body: {e}"), close).await,
    };
    let Some(model) = req.model else {
        return anthropic_400(sock, sh, bufs, "model: Field required", close).await;
    };
    let Some(max_tokens) = req.max_tokens else {
        return anthropic_400(sock, sh, bufs, "max_tokens: Field required", close).await;
    };
    if max_tokens == 0 {
        return anthropic_400(
            sock,
            sh,
            bufs,
            "max_tokens: Input should be greater than or equal to 1",
            close,
        )
        .await;
    }
    if req.messages.is_none() {
        return anthropic_400(sock, sh, bufs, "messages: Field required", close).await;
    }
    let tool_json = match req.tools.as_deref().and_then(<[_]>::first) {
        Some(t) => Some(serde_json::to_vec(&*t.name).map_err(io::Error::other)?),
        None => None,
    };
    let thinking = req.thinking.is_some_and(|t| t.kind == "enabled" || t.kind == "adaptive");
    let n = sh.cfg.tokens.min(usize::try_from(max_tokens).unwrap_or(usize::MAX));
    let token_pieces: Vec<&[u8]>;
    let text_pieces: &[&[u8]] = if tool_json.is_some() {
        Reply::TOOL_TEXT_PIECES
    } else {
        token_pieces = sh.token_json[..n].iter().map(Vec::as_slice).collect();
        &token_pieces
    };
    let stop = if tool_json.is_some() {
        StopReason::ToolUse
    } else if n < sh.cfg.tokens {
        StopReason::MaxTokens
    } else {
        StopReason::EndTurn
    };
    bufs.model.clear();
    serde_json::to_writer(&mut bufs.model, &*model).map_err(io::Error::other)?;
    let model_json = std::mem::take(&mut bufs.model);
    let reply = Reply {
        seq: bufs.seq,
        model_json: &model_json,
        input_tokens: answer::input_tokens(body),
        output_tokens: n as u64,
        thinking,
        tool_json: tool_json.as_deref(),
        text_pieces,
        stop,
    };
    let r = if req.stream == Some(true) {
        stream_messages(sock, sh, bufs, &reply, cut, close).await
    } else {
        bufs.body.clear();
        sh.atpl.render_message(&reply, &mut bufs.body);
        if cut.is_some() {
            write_truncated(sock, bufs).await
        } else {
            let body = std::mem::take(&mut bufs.body);
            let r = write_api_response(sock, bufs, Api::Anthropic, 200, "application/json", &body, close, "")
                .await;
            bufs.body = body;
            r.map(|()| true)
        }
    };
    bufs.model = model_json;
    Ok(r? && !close)
}

/// Streams an Anthropic message as SSE. Returns false when the connection
/// was cut.
async fn stream_messages(
    sock: &mut TcpStream,
    sh: &Shared,
    bufs: &mut ConnBufs,
    reply: &Reply<'_>,
    cut: Option<usize>,
    close: bool,
) -> io::Result<bool> {
    let events = sh.atpl.stream_events(reply);
    let ct = "text/event-stream; charset=utf-8";
    stream_events(sock, sh, bufs, Api::Anthropic, ct, &events, b"", cut, close).await
}

/// Streams pre-rendered events over chunked encoding, one event per HTTP
/// chunk and one write per event, `ttft` / `inter_token` before delta
/// events, then `trailer` (if any) and the terminator. Returns false when
/// the connection was cut (`cut`: after that many events).
#[allow(clippy::too_many_arguments)]
async fn stream_events(
    sock: &mut TcpStream,
    sh: &Shared,
    bufs: &mut ConnBufs,
    api: Api,
    content_type: &str,
    events: &[Event],
    trailer: &[u8],
    cut: Option<usize>,
    close: bool,
) -> io::Result<bool> {
    bufs.out.clear();
    let _ = write!(bufs.out, "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n");
    if content_type.starts_with("text/event-stream") {
        bufs.out.extend_from_slice(b"cache-control: no-cache\r\n");
    }
    bufs.out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    push_api_headers(&mut bufs.out, api, bufs.seq, close);
    bufs.out.extend_from_slice(b"\r\n");
    // Headers go out on their own so a client sees the status before TTFT.
    sock.write_all(&bufs.out).await?;
    let mut deltas = 0usize;
    for (sent, ev) in events.iter().enumerate() {
        if cut == Some(sent) {
            reset(sock);
            return Ok(false);
        }
        if ev.delta {
            sleep(if deltas == 0 { sh.cfg.ttft } else { sh.cfg.inter_token }).await;
            deltas += 1;
        }
        bufs.out.clear();
        wire::push_chunk(&mut bufs.out, &ev.bytes);
        sock.write_all(&bufs.out).await?;
    }
    if cut.is_some_and(|c| c >= events.len()) {
        reset(sock);
        return Ok(false);
    }
    bufs.out.clear();
    if !trailer.is_empty() {
        wire::push_chunk(&mut bufs.out, trailer);
    }
    bufs.out.extend_from_slice(b"0\r\n\r\n");
    sock.write_all(&bufs.out).await?;
    Ok(true)
}

/// `POST /v1/messages/count_tokens`.
async fn count_tokens(
    sock: &mut TcpStream,
    sh: &Shared,
    body: &[u8],
    bufs: &mut ConnBufs,
    close: bool,
) -> io::Result<bool> {
    match serde_json::from_slice::<CountTokensRequest>(body) {
        Err(e) => anthropic_400(sock, sh, bufs, &format!("invalid request body: {e}"), close).await,
        Ok(r) if r.model.is_none() => anthropic_400(sock, sh, bufs, "model: Field required", close).await,
        Ok(r) if r.messages.is_none() => {
            anthropic_400(sock, sh, bufs, "messages: Field required", close).await
        }
        Ok(_) => {
            let out = format!("{{\"input_tokens\":{}}}", answer::input_tokens(body));
            write_api_response(
                sock,
                bufs,
                Api::Anthropic,
                200,
                "application/json",
                out.as_bytes(),
                close,
                "",
            )
            .await?;
            Ok(!close)
        }
    }
}

async fn anthropic_400(
    sock: &mut TcpStream,
    sh: &Shared,
    bufs: &mut ConnBufs,
    message: &str,
    close: bool,
) -> io::Result<bool> {
    write_anthropic_error(sock, sh, bufs, 400, message, close).await?;
    Ok(!close)
}

/// An Anthropic error envelope for `status` (429 adds `retry-after: 1`).
/// `message` overrides the fixture's message when non-empty.
async fn write_anthropic_error(
    sock: &mut TcpStream,
    sh: &Shared,
    bufs: &mut ConnBufs,
    status: u16,
    message: &str,
    close: bool,
) -> io::Result<()> {
    let mut body = std::mem::take(&mut bufs.body);
    body.clear();
    sh.atpl.render_error(status, message, bufs.seq, &mut body);
    let extra = if status == 429 { "retry-after: 1\r\n" } else { "" };
    let r =
        write_api_response(sock, bufs, Api::Anthropic, status, "application/json", &body, close, extra).await;
    bufs.body = body;
    r
}

async fn write_event(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    tpl: &Template,
    vals: &Vals<'_>,
) -> io::Result<()> {
    bufs.body.clear();
    bufs.body.extend_from_slice(b"data: ");
    tpl.render(vals, &mut bufs.body);
    bufs.body.extend_from_slice(b"\n\n");
    bufs.out.clear();
    wire::push_chunk(&mut bufs.out, &bufs.body);
    sock.write_all(&bufs.out).await
}

/// Non-streamed ResetMidStream: headers promise the full body, half is sent.
async fn write_truncated(sock: &mut TcpStream, bufs: &mut ConnBufs) -> io::Result<bool> {
    bufs.out.clear();
    let _ = write!(
        bufs.out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        bufs.body.len()
    );
    bufs.out.extend_from_slice(&bufs.body[..bufs.body.len() / 2]);
    sock.write_all(&bufs.out).await?;
    reset(sock);
    Ok(false)
}

/// [`write_truncated`] for a rendered answer: its content type and the
/// API's headers, half of `body`, then a reset.
async fn write_cut_body(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    api: Api,
    content_type: &str,
    body: &[u8],
) -> io::Result<bool> {
    bufs.out.clear();
    let _ = write!(
        bufs.out,
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        body.len()
    );
    push_api_headers(&mut bufs.out, api, bufs.seq, false);
    bufs.out.extend_from_slice(b"\r\n");
    bufs.out.extend_from_slice(&body[..body.len() / 2]);
    sock.write_all(&bufs.out).await?;
    reset(sock);
    Ok(false)
}

fn push_api_headers(out: &mut Vec<u8>, api: Api, seq: u64, close: bool) {
    match api {
        Api::OpenAi => {
            let _ = write!(out, "x-request-id: req_mock{seq:024}\r\nopenai-processing-ms: 0\r\n");
        }
        Api::Anthropic => {
            out.extend_from_slice(b"request-id: ");
            anthropic::push_request_id(out, seq);
            out.extend_from_slice(b"\r\nanthropic-organization-id: ");
            out.extend_from_slice(anthropic::ORGANIZATION_ID.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Api::Gemini => out
            .extend_from_slice(b"vary: Origin, X-Origin, Referer\r\nserver: scaffolding on HTTPServer2\r\n"),
        Api::Cohere => {
            let _ = write!(out, "x-debug-trace-id: {:032x}\r\n", u128::from(seq) | (0x6d6f636b << 96));
        }
        Api::Bedrock => {
            out.extend_from_slice(b"x-amzn-requestid: ");
            answer::push_uuid(out, seq);
            out.extend_from_slice(b"\r\n");
        }
        Api::Azure => azure::push_headers(out, seq),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
}

/// Headers and body in one buffer and one write.
async fn write_response(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    write_response_with(sock, bufs, status, content_type, body, close, "").await
}

async fn write_response_with(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    extra_headers: &str,
) -> io::Result<()> {
    write_api_response(sock, bufs, Api::OpenAi, status, content_type, body, close, extra_headers).await
}

#[allow(clippy::too_many_arguments)]
async fn write_api_response(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    api: Api,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    extra_headers: &str,
) -> io::Result<()> {
    let out = &mut bufs.out;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{extra_headers}",
        reason(status),
        body.len()
    );
    push_api_headers(out, api, bufs.seq, close);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    sock.write_all(out).await
}

/// An OpenAI error envelope for `status`. `message` overrides the fixture's
/// message when non-empty.
async fn write_error(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    status: u16,
    message: &[u8],
    close: bool,
) -> io::Result<()> {
    write_error_as(sock, bufs, Api::OpenAi, status, message, close).await
}

/// [`write_error`] with `api`'s headers (Azure passes OpenAI's validation
/// errors through).
async fn write_error_as(
    sock: &mut TcpStream,
    bufs: &mut ConnBufs,
    api: Api,
    status: u16,
    message: &[u8],
    close: bool,
) -> io::Result<()> {
    let body = error_body(status, &String::from_utf8_lossy(message));
    let extra = if status == 429 { "retry-after: 1\r\n" } else { "" };
    write_api_response(sock, bufs, api, status, "application/json", &body, close, extra).await
}

/// OpenAI's error body for `status` (the fixture's when `message` is empty
/// and there is one).
pub(crate) fn error_body(status: u16, message: &str) -> Cow<'static, [u8]> {
    let fixture = match status {
        429 => template::ERROR_429,
        400 => template::ERROR_400,
        s if s >= 500 => template::ERROR_500,
        _ => "",
    };
    if message.is_empty() && !fixture.is_empty() {
        return Cow::Borrowed(fixture.as_bytes());
    }
    let (ty, code) = match status {
        401 => ("invalid_request_error", serde_json::json!("invalid_api_key")),
        429 => ("requests", serde_json::json!("rate_limit_exceeded")),
        s if s >= 500 => ("server_error", serde_json::Value::Null),
        _ => ("invalid_request_error", serde_json::Value::Null),
    };
    let message =
        if message.is_empty() { format!("mock upstream error {status}") } else { message.to_owned() };
    let v = serde_json::json!({
        "error": { "message": message, "type": ty, "param": null, "code": code }
    });
    Cow::Owned(serde_json::to_vec_pretty(&v).unwrap_or_default())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Drops the connection with an RST (SO_LINGER 0) so the peer sees an abrupt
/// reset, not a graceful close. The socket is dropped by the caller.
fn reset(sock: &TcpStream) {
    // Deprecated because a non-zero linger blocks on drop; zero never does.
    #[allow(deprecated)]
    let _ = sock.set_linger(Some(Duration::ZERO));
}

async fn sleep(d: Duration) {
    // Skip the timer entirely at zero so the baseline stays cheap.
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// `GET /v1/models` body, in OpenAI's list shape.
const MODELS: &str = r#"{
  "object": "list",
  "data": [
    {
      "id": "gpt-4o-mini",
      "object": "model",
      "created": 1721172741,
      "owned_by": "system"
    },
    {
      "id": "gpt-4o",
      "object": "model",
      "created": 1715367049,
      "owned_by": "system"
    },
    {
      "id": "mock-model",
      "object": "model",
      "created": 1700000000,
      "owned_by": "modelux-mock"
    }
  ]
}"#;
