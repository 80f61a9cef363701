//! Running a routing decision for a chat request (or an OpenAI Responses API create, which
//! falls back the same way but only passes bytes through): attempts one after another (fallback,
//! cost/latency order, cascade) or all at once (ensemble), each bounded by its timeout and
//! the request's total budget. Nothing reaches the client until an attempt has produced a
//! usable answer (for streams: its first body bytes), so a failed attempt is invisible.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};

use super::answer::{self, is_event_stream, MAX_UPSTREAM_BODY};
use super::billing;
use super::headers::{answer_headers, Served};
use super::respond;
use super::stream::{self, StreamCodec};
use super::{GatewayState, Req, RequestCtx};
use crate::admission::RouteInfo;
use crate::config::Settings;
use crate::error::{GatewayError, Surface};
use crate::providers::upstream::{self, Exchange};
use crate::providers::Target;
use crate::routing::health::{now_ms, HealthSettings, Sample};
use crate::routing::{Accept, Aggregation, Failure, Member, RetryOn};
use crate::wire::canonical::{Request, Response, Usage};
use crate::wire::routed::RoutedRequest;
use crate::wire::{self, Transcoder, WireFormat};
use serde_json::value::RawValue;

/// One upstream request, built for one target.
pub(super) struct Prepared {
    path: String,
    body: Bytes,
    accept: &'static str,
    extra: Vec<(String, String)>,
    format: WireFormat,
    /// The answer goes through the codecs (different formats, a buffered answer the client
    /// wants streamed, or a stream that carries the decision trace).
    translated: bool,
    client_wants_usage: bool,
    /// A passthrough OpenAI stream for which the gateway asked for usage the client did not:
    /// the usage chunk and `"usage":null` members are taken out again on the way back.
    strip_usage: bool,
    /// The caller's own key (BYOK), when it fits this attempt's provider.
    credential: Option<(&'static str, String)>,
    /// Any 2xx answer streams through unparsed (binary audio).
    raw: bool,
}

/// Which API the routed request calls.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    /// Chat completions / messages: any provider, translated where formats differ.
    Chat,
    /// `POST /responses`: OpenAI-family providers only, bytes passed through.
    Responses,
    /// Audio and images (`Media`): OpenAI and Azure only, bytes passed through.
    Media,
}

/// An audio or image request: the endpoint it calls and how its body carries `model`.
pub(super) struct Media {
    /// `/audio/transcriptions`, `/audio/speech`, `/images/generations`, ...
    pub endpoint: &'static str,
    /// A `multipart/form-data` body (audio input); `None`: JSON.
    pub form: Option<Form>,
    /// The answer is binary (speech): streamed through as it comes, unparsed.
    pub raw_answer: bool,
}

/// Where a multipart body's `model` field is.
pub(super) struct Form {
    pub content_type: String,
    pub boundary: String,
    /// The `model` value's bytes; `None`: the field is absent (the default model is added).
    pub model: Option<std::ops::Range<usize>>,
    /// Where the closing delimiter starts (an added field goes there).
    pub closing: usize,
}

/// The request being routed, shared by all its attempts.
pub(super) struct Exec<'e, 'r> {
    req: &'e mut Req<'r>,
    api: Api,
    media: Option<&'e Media>,
    client: Surface,
    request: &'e RoutedRequest<'e>,
    body: &'e Bytes,
    /// Decoded once, on the first attempt that needs it.
    canonical: Option<Request>,
    anthropic_headers: Vec<(String, String)>,
    want_trace: bool,
    info: &'e RouteInfo,
}

/// How a sequence of attempts moves on (fallback, cost/latency order, cascade).
pub(super) struct Sequence {
    pub retry_on: RetryOn,
    /// Bounds all attempts together.
    pub total_budget: Option<Duration>,
    /// 2xx answers must also pass the step's acceptance check.
    pub cascade: bool,
}

/// How one attempt ended, for health, metrics and the trace.
struct Outcome {
    result: Result<(), Failure>,
    http_status: Option<u16>,
    error: Option<String>,
    started: Instant,
    ttfb: Option<Duration>,
}

impl Outcome {
    fn success(http_status: u16, started: Instant, ttfb: Option<Duration>) -> Outcome {
        Outcome { result: Ok(()), http_status: Some(http_status), error: None, started, ttfb }
    }

    fn failure(
        failure: Failure,
        http_status: Option<u16>,
        error: Option<String>,
        started: Instant,
        ttfb: Option<Duration>,
    ) -> Outcome {
        Outcome { result: Err(failure), http_status, error, started, ttfb }
    }
}

/// How much of a 2xx answer an attempt waits for before it counts as a success.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Response header and the first body chunk.
    FirstChunk,
    /// The whole body.
    Whole,
}

enum Attempted {
    /// 2xx and (for streams) the first chunk.
    Streaming { ex: Exchange, first: Option<Bytes> },
    /// 2xx, whole body read.
    Whole { ex: Exchange, body: Bytes },
    /// Upstream error status; the exchange is kept to answer with (or drain).
    Status { ex: Exchange, failure: Failure },
    /// No usable exchange.
    Failed { failure: Failure, error: GatewayError },
}

fn classify_status(status: u16) -> Failure {
    match status {
        429 => Failure::RateLimited,
        401 | 403 => Failure::ServerError,
        s if s >= 500 => Failure::ServerError,
        _ => Failure::ClientError,
    }
}

fn classify_error(e: &GatewayError) -> Failure {
    match e {
        GatewayError::UpstreamTimeout { .. } => Failure::Timeout,
        GatewayError::InvalidRequest { .. } => Failure::Rejected,
        _ => Failure::Connect,
    }
}

fn min_limit(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<'e, 'r> Exec<'e, 'r> {
    pub fn new(
        req: &'e mut Req<'r>,
        request: &'e RoutedRequest<'e>,
        body: &'e Bytes,
        anthropic_headers: Vec<(String, String)>,
        info: &'e RouteInfo,
    ) -> Exec<'e, 'r> {
        let client = req.ctx.surface;
        Exec {
            req,
            api: Api::Chat,
            media: None,
            client,
            request,
            body,
            canonical: None,
            anthropic_headers,
            want_trace: request.trace,
            info,
        }
    }

    /// An OpenAI Responses API create: no decision trace in the answer (a chat feature).
    pub fn responses(
        req: &'e mut Req<'r>,
        request: &'e RoutedRequest<'e>,
        body: &'e Bytes,
        info: &'e RouteInfo,
    ) -> Exec<'e, 'r> {
        Exec { api: Api::Responses, want_trace: false, ..Exec::new(req, request, body, Vec::new(), info) }
    }

    /// An audio or image request.
    pub fn media(
        req: &'e mut Req<'r>,
        request: &'e RoutedRequest<'e>,
        body: &'e Bytes,
        info: &'e RouteInfo,
        media: &'e Media,
    ) -> Exec<'e, 'r> {
        Exec {
            api: Api::Media,
            media: Some(media),
            want_trace: false,
            ..Exec::new(req, request, body, Vec::new(), info)
        }
    }

    /// Whether every 2xx answer streams through unparsed.
    fn raw_answer(&self) -> bool {
        self.media.is_some_and(|m| m.raw_answer)
    }

    /// An audio or image request for `target`: the client's bytes, `model` rewritten.
    fn prepare_media(
        &self,
        media: &Media,
        target: &Target,
        upstream_stream: bool,
    ) -> Result<Prepared, GatewayError> {
        let provider = &target.provider;
        let Some(path) = provider.openai_model_path(&target.model, media.endpoint) else {
            return Err(GatewayError::invalid(
                "unsupported_provider",
                format!(
                    "provider {} (kind {}) does not serve {}; only openai and azure providers do",
                    provider.id,
                    provider.adapter.kind(),
                    media.endpoint
                ),
            ));
        };
        let model = target.model.as_bytes();
        let mut extra = Vec::new();
        let body = match &media.form {
            Some(form) => {
                extra.push(("content-type".to_string(), form.content_type.clone()));
                match &form.model {
                    Some(r) if self.body.get(r.clone()) == Some(model) => self.body.clone(),
                    Some(r) => Bytes::from(wire::multipart::replace(self.body, r.clone(), model)),
                    None => Bytes::from(
                        wire::multipart::insert(&form.boundary, self.body, form.closing, "model", model)
                            .ok_or_else(|| {
                                GatewayError::invalid(
                                    "invalid_multipart",
                                    "the multipart body has no closing boundary",
                                )
                            })?,
                    ),
                }
            }
            None if self.request.forwards_verbatim(&target.model) => self.body.clone(),
            None => Bytes::from(self.request.encode_for_upstream(&target.model)),
        };
        Ok(Prepared {
            credential: self.req.ctx.provider_key.as_ref().and_then(|k| provider.byok_credential(k.secret())),
            path,
            body,
            accept: if media.raw_answer { "*/*" } else { provider.accept(upstream_stream) },
            extra,
            format: WireFormat::OpenAi,
            translated: false,
            client_wants_usage: true,
            strip_usage: false,
            raw: media.raw_answer,
        })
    }

    /// A Responses API create for `target`: the client's bytes (the model rewritten only
    /// when routing changed it), to a provider that serves the API.
    fn prepare_responses(&self, target: &Target, upstream_stream: bool) -> Result<Prepared, GatewayError> {
        let provider = &target.provider;
        let Some(path) = provider.openai_resource_path("/responses") else {
            return Err(GatewayError::invalid(
                "unsupported_provider",
                format!(
                    "provider {} (kind {}) does not serve the Responses API; only openai, azure and \
                     openai_compatible providers do",
                    provider.id,
                    provider.adapter.kind()
                ),
            ));
        };
        let body = if self.request.forwards_verbatim(&target.model) {
            self.body.clone()
        } else {
            Bytes::from(self.request.encode_for_upstream(&target.model))
        };
        Ok(Prepared {
            credential: self.req.ctx.provider_key.as_ref().and_then(|k| provider.byok_credential(k.secret())),
            path,
            body,
            accept: provider.accept(upstream_stream),
            extra: Vec::new(),
            format: WireFormat::OpenAi,
            translated: false,
            client_wants_usage: true,
            strip_usage: false,
            raw: false,
        })
    }

    fn state(&self) -> &'r GatewayState {
        self.req.state
    }

    fn settings(&self) -> &'r Settings {
        &self.req.snapshot.settings
    }

    /// The upstream request for `target`. `upstream_stream`: ask the upstream for a stream.
    fn prepare(&mut self, target: &Target, upstream_stream: bool) -> Result<Prepared, GatewayError> {
        if self.api == Api::Responses {
            return self.prepare_responses(target, upstream_stream);
        }
        if let Some(media) = self.media {
            return self.prepare_media(media, target, upstream_stream);
        }
        let provider = &target.provider;
        let format = provider.format();
        let same = format == WireFormat::from(self.client);
        let stream_as_asked = upstream_stream == self.request.stream;
        // Same format, same streaming, no trace to splice into a stream: the answer's bytes
        // come back untouched. Otherwise the answer goes through the codecs.
        let passthrough = same && stream_as_asked && !(self.want_trace && upstream_stream);
        let mut strip_usage = false;
        // A same-format request is always sent as the client's bytes (model rewritten), even
        // when its answer is translated: every field the client sent arrives, including the
        // ones the canonical model has no place for (Anthropic `top_k`, OpenAI `logit_bias`).
        let (body, client_wants_usage) = if same && upstream_stream && format == WireFormat::OpenAi {
            // Streams report usage only when asked: ask, so the answer can be priced.
            let (body, client_asked) = self.request.encode_for_upstream_with_usage(&target.model);
            strip_usage = passthrough && !client_asked;
            (Bytes::from(body), client_asked)
        } else if same && stream_as_asked {
            (Bytes::from(self.request.encode_for_upstream(&target.model)), false)
        } else if same {
            // Asked for as a stream, needed whole (a cascade step): the stream keys go.
            // As the canonical request reads it: Anthropic streams always carry usage.
            let wants_usage = match self.client {
                Surface::Anthropic => true,
                Surface::OpenAi => self.request.stream_usage_asked(),
            };
            (Bytes::from(self.request.encode_for_upstream_whole(&target.model)), wants_usage)
        } else {
            if self.canonical.is_none() {
                self.canonical = Some(wire::decode_request(self.client, self.body)?);
            }
            let Some(canonical) = self.canonical.as_mut() else {
                return Err(GatewayError::internal("request was not decoded"));
            };
            let wants_usage = canonical.stream_usage;
            let was = canonical.stream;
            canonical.stream = upstream_stream;
            let encoded = wire::encode_request(format, canonical, &target.model);
            canonical.stream = was;
            (Bytes::from(encoded?), wants_usage)
        };
        let accept = provider.accept(upstream_stream);
        let path = provider.chat_path(&target.model, upstream_stream);
        let mut extra = match format {
            WireFormat::Anthropic => self.anthropic_headers.clone(),
            _ => Vec::new(),
        };
        extra.extend(provider.signed_headers(&path, &body)?);
        let credential =
            self.req.ctx.provider_key.as_ref().and_then(|k| provider.byok_credential(k.secret()));
        Ok(Prepared {
            credential,
            path,
            body,
            accept,
            extra,
            format,
            translated: !passthrough || (!upstream_stream && self.request.stream),
            client_wants_usage,
            strip_usage,
            raw: false,
        })
    }
}

/// The fallback sequence of a decision for a passthrough API (Responses, audio, images),
/// which neither fans out nor judges answers: an ensemble or a cascade is a 400
/// `unsupported_policy` naming `what` (the decision's probe leases go back).
pub(super) fn passthrough_sequence(
    routed: &crate::admission::Routed<'_>,
    health: &HealthSettings,
    model: &str,
    what: &str,
) -> Result<Sequence, GatewayError> {
    match routed.plan() {
        crate::routing::Plan::Sequential { retry_on, total_budget, cascade: false } => {
            Ok(Sequence { retry_on, total_budget, cascade: false })
        }
        _ => {
            routed.return_probes(now_ms(), health);
            Err(GatewayError::invalid(
                "unsupported_policy",
                format!(
                    "{model} routes with a cascade or an ensemble, which {what} does not support; use single, \
                     fallback, cost or latency routing"
                ),
            ))
        }
    }
}

/// The attempts of a decision that `skip` finds no reason to leave out. The others are
/// never made: they go into the trace as rejected with the reason, and any half-open probe
/// lease they took goes back.
pub(super) fn eligible_attempts<'s>(
    ctx: &mut RequestCtx,
    routed: &'s crate::admission::Routed<'s>,
    health: &HealthSettings,
    skip: impl Fn(&Member) -> Option<String>,
) -> Vec<&'s Member> {
    let (attempts, skipped): (Vec<&Member>, Vec<&Member>) =
        routed.attempts().into_iter().partition(|m| skip(m).is_none());
    if skipped.is_empty() {
        return attempts;
    }
    routed.return_probes_of(|m| skipped.iter().any(|s| std::ptr::eq(*s, m)), now_ms(), health);
    let elapsed = ctx.started.elapsed();
    if let Some(trace) = ctx.trace.as_deref_mut() {
        for m in &skipped {
            trace.push_attempt(
                &m.target.provider.id,
                &m.target.model,
                "rejected",
                None,
                skip(m),
                elapsed,
                None,
                Duration::ZERO,
            );
        }
    }
    attempts
}

/// The 400 for a decision none of whose targets serves `what`: it names them and their kinds.
pub(super) fn no_provider_serves(all: &[&Member], model: &str, what: &str, kinds: &str) -> GatewayError {
    let targets: Vec<String> = all
        .iter()
        .map(|m| format!("{} ({})", m.target.provider.id, m.target.provider.adapter.kind()))
        .collect();
    GatewayError::invalid(
        "unsupported_provider",
        format!("{what} is served only by {kinds} providers; {model} routes to {}", targets.join(", ")),
    )
}

/// Sends one attempt and waits for as much of the answer as `mode` needs, within `limit`.
async fn run(
    state: &GatewayState,
    settings: &Settings,
    member: &Member,
    prepared: &Prepared,
    limit: Option<Duration>,
    mode: Mode,
) -> Attempted {
    let provider = &member.target.provider;
    let work = async {
        let extra: Vec<(&str, &str)> = prepared.extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let call = upstream::Call {
            method: "POST",
            path: &prepared.path,
            body: prepared.body.clone(),
            accept: prepared.accept,
            extra_headers: &extra,
            credential: prepared.credential.as_ref(),
        };
        let mut ex = match upstream::exchange(
            &state.connector,
            &state.metrics,
            &settings.upstream_timeouts(),
            provider,
            call,
        )
        .await
        {
            Ok(ex) => ex,
            Err(error) => return Attempted::Failed { failure: classify_error(&error), error },
        };
        let status = ex.header.status.as_u16();
        if !(200..300).contains(&status) {
            return Attempted::Status { ex, failure: classify_status(status) };
        }
        match mode {
            Mode::FirstChunk if prepared.raw || is_event_stream(&ex.header, provider) => {
                match upstream::next_chunk(&mut ex, provider, &settings.upstream_timeouts()).await {
                    Ok(Some(first)) => Attempted::Streaming { ex, first: Some(first) },
                    Ok(None) => Attempted::Failed {
                        failure: Failure::Connect,
                        error: GatewayError::UpstreamConnect {
                            provider: provider.id.clone(),
                            message: "the upstream stream ended before its first byte".into(),
                        },
                    },
                    Err(error) => Attempted::Failed { failure: classify_error(&error), error },
                }
            }
            // A 2xx that is not a stream (some servers ignore `stream`): read it whole.
            _ => {
                match upstream::read_all(&mut ex, MAX_UPSTREAM_BODY, provider, &settings.upstream_timeouts())
                    .await
                {
                    Ok(body) => Attempted::Whole { ex, body },
                    Err(error) => Attempted::Failed { failure: classify_error(&error), error },
                }
            }
        }
    };
    match limit {
        None => work.await,
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(a) => a,
            Err(_) => Attempted::Failed {
                failure: Failure::Timeout,
                error: GatewayError::UpstreamTimeout {
                    provider: provider.id.clone(),
                    after_ms: limit.as_millis() as u64,
                },
            },
        },
    }
}

/// Health, metrics and trace bookkeeping for one finished attempt.
fn record(state: &GatewayState, ctx: &mut RequestCtx, health: &HealthSettings, member: &Member, o: Outcome) {
    let now = now_ms();
    let elapsed = o.started.elapsed();
    let latency = o.ttfb.unwrap_or(elapsed);
    let sample = match o.result {
        Ok(()) => Some(Sample::Success),
        // A 2xx that failed an acceptance check: the provider itself answered fine.
        Err(Failure::Rejected) if o.http_status.is_some_and(|s| (200..300).contains(&s)) => {
            Some(Sample::Success)
        }
        Err(f) if f.counts_against_health() => Some(Sample::Failure),
        Err(_) => None,
    };
    if let Some(sample) = sample {
        member.health.record(sample, latency, now, health);
        member.provider_health.record(sample, latency, now, health);
    }
    let status = match o.result {
        Ok(()) => "success",
        Err(f) => f.as_str(),
    };
    let provider = member.target.provider.id.as_str();
    state.metrics.routing_attempts.with_label_values(&[provider, status]).inc();
    ctx.attempts += 1;
    if let Some(trace) = ctx.trace.as_mut() {
        trace.push_attempt(
            provider,
            &member.target.model,
            status,
            o.http_status,
            o.error,
            o.started.duration_since(ctx.started),
            o.ttfb,
            elapsed,
        );
    }
}

impl Exec<'_, '_> {
    fn record(&mut self, member: &Member, o: Outcome) {
        let (state, health) = (self.req.state, &self.req.snapshot.health_settings);
        record(state, self.req.ctx, health, member, o);
    }
}

/// Why an answer fails an acceptance check, if it does.
pub fn check_accept(accept: &Accept, resp: &Response) -> Result<(), String> {
    if !accept.finish_reason.is_empty() {
        let reason = resp.stop.map(wire::openai::codec::finish_reason).unwrap_or("none");
        if !accept.finish_reason.iter().any(|r| r == reason) {
            return Err(format!("finish reason {reason} not in {:?}", accept.finish_reason));
        }
    }
    if let Some(min) = accept.min_output_tokens {
        if resp.usage.output < min {
            return Err(format!("{} output tokens, fewer than {min}", resp.usage.output));
        }
    }
    let text = wire::response_text(resp);
    if let Some(min) = accept.min_length {
        let n = text.chars().count();
        if n < min {
            return Err(format!("{n} characters, fewer than {min}"));
        }
    }
    if accept.valid_json && serde_json::from_str::<serde::de::IgnoredAny>(text.trim()).is_err() {
        return Err("the answer is not valid JSON".into());
    }
    Ok(())
}

/// Splices `"mlx:trace": {...}` into a JSON object body.
pub(super) fn inject_trace(body: &[u8], trace: &RawValue) -> Option<Vec<u8>> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' || body[end] != b'}' {
        return None;
    }
    let inner_empty = body[start + 1..end].iter().all(u8::is_ascii_whitespace);
    let mut out = Vec::with_capacity(body.len() + 512);
    out.extend_from_slice(&body[..end]);
    if !inner_empty {
        out.push(b',');
    }
    out.extend_from_slice(b"\"mlx:trace\":");
    out.extend_from_slice(trace.get().as_bytes());
    out.extend_from_slice(&body[end..]);
    Some(out)
}

/// The decision trace, serialized once for the client's answer.
pub(super) fn trace_json(ctx: &RequestCtx) -> Option<Box<RawValue>> {
    ctx.trace.as_ref().and_then(|t| serde_json::value::to_raw_value(t).ok())
}

impl Exec<'_, '_> {
    /// Answers with a complete 2xx upstream body, converted as `prepared` says.
    async fn answer_body(
        &mut self,
        served: &Served<'_>,
        ex: &Exchange,
        prepared: &Prepared,
        body: Bytes,
        decoded: Option<Response>,
    ) -> Result<(), GatewayError> {
        let status = ex.header.status.as_u16();
        let decoded = match decoded {
            Some(r) => Some(r),
            None if prepared.translated => {
                Some(decode(prepared.format, &body, &served.target.model).map_err(|message| {
                    GatewayError::UpstreamStatus {
                        provider: served.target.provider.id.clone(),
                        status,
                        message,
                    }
                })?)
            }
            None => None,
        };
        // A Responses answer is read once, for its id and its usage.
        let created = (self.api == Api::Responses).then(|| wire::usage::read_response(&body));
        let usage = match (&decoded, &created) {
            (Some(resp), _) => Some(resp.usage),
            (None, Some(created)) => created.usage,
            (None, None) => prepared.format.codec().usage(&body),
        };
        // A background response reports no usage when it starts, and its later usage is
        // read by no one here: it is billed what was reserved for it, never less.
        let usage = match usage {
            None if created.as_ref().is_some_and(|c| c.background_started) => Some(Usage {
                input: self.req.ctx.bill.est_input_tokens,
                output: billing::reserved_output_tokens(
                    self.req.snapshot,
                    &served.target.model,
                    self.request.max_tokens,
                ),
                ..Usage::default()
            }),
            usage => usage,
        };
        // Images and audio are not text: their size says nothing about tokens. Without a
        // usage object they are billed on the request's estimate alone.
        let (usage, output_estimate) = match (self.api, usage) {
            (Api::Media, Some(u)) if u.input == 0 && u.output == 0 => (None, 0),
            (Api::Media, u) => (u, 0),
            (_, u) => (u, crate::estimate::json_tokens(body.len())),
        };
        let (state, session, ctx) = (self.req.state, &mut *self.req.session, &mut *self.req.ctx);
        // Settled before the headers go: they carry the cost and what the budget has left.
        billing::bill_answer(state, ctx, usage, true, output_estimate);
        ctx.bill.cost_header = true;
        let mut headers = answer_headers(&ex.header, prepared.translated, served);
        let trace = if self.want_trace { trace_json(ctx) } else { None };
        if let Some(id) = created.and_then(|c| c.id) {
            super::passthrough::remember_owned(state, ctx, id);
        }
        if !prepared.translated {
            let body = match trace.as_ref().and_then(|t| inject_trace(&body, t)) {
                Some(with) => Bytes::from(with),
                None => body,
            };
            respond::whole(session, ctx, status, headers, body).await;
            return Ok(());
        }
        let Some(resp) = decoded else {
            return Err(GatewayError::internal("a translated answer was not decoded"));
        };
        if self.request.stream {
            // Chosen whole (ensemble, cascade) but asked for as a stream: replay it as one.
            let out =
                wire::stream_response(self.client, &resp, prepared.client_wants_usage, trace.as_deref());
            headers.push((http::header::CONTENT_TYPE, "text/event-stream".into()));
            headers.push((http::header::CACHE_CONTROL, "no-cache".into()));
            respond::whole(session, ctx, 200, headers, Bytes::from(out)).await;
            return Ok(());
        }
        let mut out = wire::encode_response(self.client, &resp);
        if let Some(with) = trace.as_ref().and_then(|t| inject_trace(&out, t)) {
            out = with;
        }
        headers.push((http::header::CONTENT_TYPE, "application/json".into()));
        respond::whole(session, ctx, status, headers, Bytes::from(out)).await;
        Ok(())
    }
}

fn decode(format: WireFormat, body: &[u8], model: &str) -> Result<Response, String> {
    wire::decode_response(format, body).map(|mut resp| {
        // Cohere and Bedrock do not name the model in their answers.
        if resp.model.is_empty() {
            resp.model = model.to_string();
        }
        resp
    })
}

/// Reads an error body for its message (bounded), then releases the connection.
async fn drain_error(state: &GatewayState, settings: &Settings, member: &Member, mut ex: Exchange) -> String {
    let provider = &member.target.provider;
    let timeouts = settings.upstream_timeouts();
    let read = upstream::read_all(&mut ex, 64 * 1024, provider, &timeouts);
    let message = match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(body)) => answer::error_message(provider.format(), &body),
        _ => String::new(),
    };
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    message
}

/// Attempts in order until one answers. `cascade`: 2xx answers must also pass the step's
/// acceptance check (the last step's answer is returned even if it fails it).
pub(super) async fn sequential(
    exec: &mut Exec<'_, '_>,
    attempts: &[&Member],
    seq: Sequence,
) -> Result<(), GatewayError> {
    let (state, settings, info) = (exec.state(), exec.settings(), exec.info);
    let idle = settings.upstream_idle_timeout;
    let deadline = seq.total_budget.map(|b| Instant::now() + b);
    let mut last_error: Option<GatewayError> = None;
    for (i, member) in attempts.iter().enumerate() {
        let is_last = i + 1 == attempts.len();
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining.is_some_and(|r| r.is_zero()) {
            break;
        }
        let limit = min_limit(member.timeout, remaining);
        let buffered = seq.cascade && member.accept.is_some();
        let upstream_stream = (exec.request.stream || exec.raw_answer()) && !buffered;
        let started = Instant::now();
        let prepared = match exec.prepare(&member.target, upstream_stream) {
            Ok(p) => p,
            Err(e) => {
                exec.record(
                    member,
                    Outcome::failure(Failure::Rejected, None, Some(e.message()), started, None),
                );
                last_error = Some(e);
                continue;
            }
        };
        let mode = if upstream_stream { Mode::FirstChunk } else { Mode::Whole };
        let attempted = run(state, settings, member, &prepared, limit, mode).await;
        let served_now = Served::new(info, member, exec.req.ctx.attempts + 1);
        match attempted {
            Attempted::Streaming { ex, first } => {
                let ttfb = ex.ttfb;
                exec.record(member, Outcome::success(200, started, Some(ttfb)));
                let ctx = &mut *exec.req.ctx;
                ctx.ttfb = Some(ttfb);
                ctx.set_served(member);
                conclude(ctx, None);
                let mut headers = answer_headers(&ex.header, prepared.translated, &served_now);
                let codec = if prepared.translated {
                    headers.push((http::header::CONTENT_TYPE, "text/event-stream".into()));
                    headers.push((http::header::CACHE_CONTROL, "no-cache".into()));
                    let mut t = Transcoder::new(
                        member.target.provider.stream_framer(),
                        prepared.format,
                        exec.client,
                        &member.target.model,
                        prepared.client_wants_usage,
                    );
                    if exec.want_trace {
                        t.hold_done();
                    }
                    StreamCodec::Transcode(Box::new(t))
                } else if exec.api == Api::Responses {
                    StreamCodec::Tap(wire::usage::UsageTap::responses())
                } else if prepared.raw && !is_event_stream(&ex.header, &member.target.provider) {
                    StreamCodec::Raw
                } else {
                    StreamCodec::Tap(wire::usage::UsageTap::new(prepared.format, prepared.strip_usage))
                };
                let provider = member.target.provider.clone();
                stream::stream(exec.req, &provider, ex, first, headers, codec).await;
                return Ok(());
            }
            Attempted::Whole { ex, body } => {
                let ttfb = ex.ttfb;
                let status = ex.header.status.as_u16();
                exec.req.ctx.upstream_time += ex.started.elapsed();
                let mut decoded = None;
                if buffered {
                    match decode(prepared.format, &body, &member.target.model) {
                        Ok(resp) => {
                            let verdict = member.accept.as_ref().map_or(Ok(()), |a| check_accept(a, &resp));
                            if let (Err(why), false) = (&verdict, is_last) {
                                // Rejected, but the provider billed it.
                                billing::add_usage(exec.req.ctx, member.rates, &resp.usage);
                                let o = Outcome::failure(
                                    Failure::Rejected,
                                    Some(status),
                                    Some(why.clone()),
                                    started,
                                    Some(ttfb),
                                );
                                exec.record(member, o);
                                upstream::release(&state.connector, ex, idle).await;
                                continue;
                            }
                            decoded = Some(resp);
                        }
                        Err(message) if !is_last => {
                            let o = Outcome::failure(
                                Failure::ServerError,
                                Some(status),
                                Some(message),
                                started,
                                Some(ttfb),
                            );
                            exec.record(member, o);
                            upstream::release(&state.connector, ex, idle).await;
                            continue;
                        }
                        Err(_) => {}
                    }
                }
                exec.record(member, Outcome::success(status, started, Some(ttfb)));
                let ctx = &mut *exec.req.ctx;
                ctx.ttfb = Some(ttfb);
                ctx.set_served(member);
                conclude(ctx, None);
                let result = exec.answer_body(&served_now, &ex, &prepared, body, decoded).await;
                upstream::release(&state.connector, ex, idle).await;
                return result;
            }
            Attempted::Status { ex, failure } => {
                let status = ex.header.status.as_u16();
                let ttfb = ex.ttfb;
                if !is_last && seq.retry_on.allows(failure) {
                    exec.req.ctx.upstream_time += ex.started.elapsed();
                    let message = drain_error(state, settings, member, ex).await;
                    exec.record(
                        member,
                        Outcome::failure(failure, Some(status), Some(message), started, Some(ttfb)),
                    );
                    continue;
                }
                exec.record(member, Outcome::failure(failure, Some(status), None, started, Some(ttfb)));
                let ctx = &mut *exec.req.ctx;
                ctx.ttfb = Some(ttfb);
                ctx.set_served(member);
                let why = format!("{}/{} answered {status}", member.target.provider.id, member.target.model);
                conclude(ctx, Some(why));
                let headers = answer_headers(&ex.header, prepared.translated, &served_now);
                let provider = member.target.provider.clone();
                answer::upstream_error_status(exec.req, &provider, ex, headers, prepared.translated).await;
                return Ok(());
            }
            Attempted::Failed { failure, error } => {
                exec.record(member, Outcome::failure(failure, None, Some(error.message()), started, None));
                exec.req.ctx.upstream_time += started.elapsed();
                let retry = !is_last && seq.retry_on.allows(failure);
                last_error = Some(error);
                if retry {
                    continue;
                }
                break;
            }
        }
    }
    conclude(exec.req.ctx, None);
    let budget_spent = deadline.is_some_and(|d| Instant::now() >= d);
    Err(match (budget_spent, last_error) {
        (true, _) => GatewayError::UpstreamTimeout {
            provider: attempts.last().map(|m| m.target.provider.id.clone()).unwrap_or_default(),
            after_ms: seq.total_budget.map_or(0, |b| b.as_millis() as u64),
        },
        (false, Some(e)) => e,
        (false, None) => GatewayError::internal("the routing decision has no attempt"),
    })
}

fn conclude(ctx: &mut RequestCtx, why: Option<String>) {
    let winner = if ctx.served { ctx.trace.as_ref().map(|t| t.attempts.len()) } else { None };
    if let Some(t) = ctx.trace.as_mut() {
        t.conclude(winner.filter(|w| *w > 0), why);
    }
}

/// Why a member's answer does not count: failure class, message, HTTP status.
type MemberFailure = (Failure, String, Option<u16>);

/// One ensemble member's result.
struct MemberAnswer {
    index: usize,
    outcome: Result<(Exchange, Bytes, Response), MemberFailure>,
    started: Instant,
    ttfb: Option<Duration>,
    /// Tokens of an answer that was decoded but not accepted (billed all the same).
    rejected_usage: Option<crate::wire::canonical::Usage>,
}

fn vote_key(resp: &Response) -> String {
    wire::response_text(resp).split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// All members at once; the aggregation picks the answer. Members that fail or time out
/// are left out; with no valid answer at all the request fails with 502.
#[allow(clippy::too_many_arguments)]
pub(super) async fn parallel(
    exec: &mut Exec<'_, '_>,
    members: &[&Member],
    aggregation: Aggregation,
    timeout: Duration,
) -> Result<(), GatewayError> {
    let (state, settings, info) = (exec.state(), exec.settings(), exec.info);
    let mut prepared = Vec::with_capacity(members.len());
    for member in members {
        prepared.push(exec.prepare(&member.target, false));
    }
    let mut pending: FuturesUnordered<_> = members
        .iter()
        .zip(prepared.iter())
        .enumerate()
        .filter_map(|(index, (member, p))| {
            let p = p.as_ref().ok()?;
            Some(async move {
                let started = Instant::now();
                let outcome = match run(state, settings, member, p, Some(timeout), Mode::Whole).await {
                    Attempted::Whole { ex, body } => {
                        let ttfb = Some(ex.ttfb);
                        let mut rejected_usage = None;
                        let verdict = match decode(p.format, &body, &member.target.model) {
                            Ok(resp) => {
                                let verdict =
                                    match member.accept.as_ref().map_or(Ok(()), |a| check_accept(a, &resp)) {
                                        Ok(()) if !wire::response_text(&resp).trim().is_empty() => Ok(()),
                                        Ok(()) => {
                                            Err((Failure::Rejected, "empty answer".to_string(), Some(200)))
                                        }
                                        Err(why) => Err((Failure::Rejected, why, Some(200))),
                                    };
                                match verdict {
                                    Ok(()) => Ok(resp),
                                    Err(e) => {
                                        rejected_usage = Some(resp.usage);
                                        Err(e)
                                    }
                                }
                            }
                            Err(why) => Err((Failure::ServerError, why, Some(200))),
                        };
                        match verdict {
                            Ok(resp) => MemberAnswer {
                                index,
                                outcome: Ok((ex, body, resp)),
                                started,
                                ttfb,
                                rejected_usage: None,
                            },
                            Err(e) => {
                                upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
                                MemberAnswer { index, outcome: Err(e), started, ttfb, rejected_usage }
                            }
                        }
                    }
                    Attempted::Streaming { ex, .. } => MemberAnswer {
                        index,
                        outcome: Err((
                            Failure::ServerError,
                            "unexpected stream".into(),
                            Some(ex.header.status.as_u16()),
                        )),
                        started,
                        ttfb: Some(ex.ttfb),
                        rejected_usage: None,
                    },
                    Attempted::Status { ex, failure } => {
                        let status = ex.header.status.as_u16();
                        let ttfb = ex.ttfb;
                        let message = drain_error(state, settings, member, ex).await;
                        MemberAnswer {
                            index,
                            outcome: Err((failure, message, Some(status))),
                            started,
                            ttfb: Some(ttfb),
                            rejected_usage: None,
                        }
                    }
                    Attempted::Failed { failure, error } => MemberAnswer {
                        index,
                        outcome: Err((failure, error.message(), None)),
                        started,
                        ttfb: None,
                        rejected_usage: None,
                    },
                };
                outcome
            })
        })
        .collect();
    for (member, p) in members.iter().zip(prepared.iter()) {
        if let Err(e) = p {
            exec.record(
                member,
                Outcome::failure(Failure::Rejected, None, Some(e.message()), Instant::now(), None),
            );
        }
    }
    let mut answers: Vec<(usize, Exchange, Bytes, Response, usize)> = Vec::new();
    let mut winner: Option<usize> = None;
    while let Some(a) = pending.next().await {
        let member = members[a.index];
        match a.outcome {
            Ok((ex, body, resp)) => {
                exec.record(member, Outcome::success(ex.header.status.as_u16(), a.started, a.ttfb));
                let attempt_no = exec.req.ctx.attempts;
                answers.push((a.index, ex, body, resp, attempt_no));
                if aggregation == Aggregation::FirstValid {
                    winner = Some(answers.len() - 1);
                    break;
                }
            }
            Err((failure, message, status)) => {
                if let Some(u) = &a.rejected_usage {
                    billing::add_usage(exec.req.ctx, member.rates, u);
                }
                exec.record(member, Outcome::failure(failure, status, Some(message), a.started, a.ttfb));
            }
        }
    }
    // First-valid stops early: the others are cancelled (their futures are dropped).
    let cancelled = pending.len();
    drop(pending);
    let ctx = &mut *exec.req.ctx;
    if cancelled > 0 {
        if let Some(t) = ctx.trace.as_mut() {
            t.decision.reason = format!("{cancelled} slower member(s) cancelled");
        }
    }
    let reason;
    let pick = match aggregation {
        Aggregation::FirstValid => {
            reason = "first valid answer".to_string();
            winner
        }
        Aggregation::Majority | Aggregation::Weighted => {
            let mut tallies: Vec<(String, f64, usize)> = Vec::new();
            for (pos, (index, _, _, resp, _)) in answers.iter().enumerate() {
                let key = vote_key(resp);
                let weight = if aggregation == Aggregation::Weighted { members[*index].weight } else { 1.0 };
                match tallies.iter_mut().find(|(k, _, _)| *k == key) {
                    Some(t) => t.1 += weight,
                    None => tallies.push((key, weight, pos)),
                }
            }
            // Highest tally; ties go to the answer of the member listed first.
            let best = tallies.iter().fold(None::<&(String, f64, usize)>, |best, t| match best {
                Some(b) if b.1 > t.1 || (b.1 == t.1 && answers[b.2].0 < answers[t.2].0) => Some(b),
                _ => Some(t),
            });
            let total: f64 = tallies.iter().map(|t| t.1).sum();
            reason = match best {
                Some(b) => format!(
                    "{} with {} of {} votes across {} answers",
                    aggregation.as_str(),
                    b.1,
                    total,
                    answers.len()
                ),
                None => String::new(),
            };
            best.map(|b| b.2)
        }
    };
    let Some(pick) = pick else {
        conclude(ctx, None);
        return Err(GatewayError::UpstreamConnect {
            provider: members.first().map(|m| m.target.provider.id.clone()).unwrap_or_default(),
            message: "no ensemble member produced a valid answer".into(),
        });
    };
    let (index, ex, body, resp, attempt_no) = answers.swap_remove(pick);
    // Every member that answered was billed; the winner is added by `answer_body`.
    for (i, _, _, r, _) in &answers {
        billing::add_usage(ctx, members[*i].rates, &r.usage);
    }
    let member = members[index];
    ctx.ttfb = Some(ex.ttfb);
    ctx.set_served(member);
    if let Some(t) = ctx.trace.as_mut() {
        let extra = std::mem::take(&mut t.decision.reason);
        t.conclude(
            Some(attempt_no),
            Some(if extra.is_empty() { reason } else { format!("{reason}; {extra}") }),
        );
    }
    let Ok(p) = &prepared[index] else {
        return Err(GatewayError::internal("winning member has no prepared request"));
    };
    let served_now = Served::new(info, member, attempt_no);
    let result = exec.answer_body(&served_now, &ex, p, body, Some(resp)).await;
    upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    for (_, ex, ..) in answers {
        upstream::release(&state.connector, ex, settings.upstream_idle_timeout).await;
    }
    result
}
