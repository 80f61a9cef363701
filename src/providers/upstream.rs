//! The upstream leg, driven from the proxy's `request_filter` (and from the management
//! API's credential checks) with pingora's own HTTP `Connector` (pooled connections,
//! rustls TLS, per-peer timeouts).
//!
//! Why not pingora's proxy phases (`upstream_peer` + `request_body_filter`)? Routing needs
//! the model, which is in the body, so the body must be read in `request_filter`; after
//! that pingora 0.9 replays a body to the upstream only from its 64 KiB retry buffer, and
//! LLM requests (long conversations, base64 images) are routinely larger. Driving the
//! connector ourselves sends any body size, lets us rewrite it freely, and keeps every
//! attempt (and, later, fallback, fan-out and cascades) under the same async control flow.
//! `tests/gateway.rs` proves a 10 MiB body arrives intact.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error as PError, ErrorType};
use tokio::io::AsyncWriteExt;

use super::{Provider, Timeouts};
use crate::error::GatewayError;
use crate::metrics::Metrics;

/// An upstream exchange whose response header has arrived.
pub struct Exchange {
    pub session: HttpSession,
    pub peer: HttpPeer,
    pub header: ResponseHeader,
    /// Time from the start of the attempt to the response header.
    pub ttfb: Duration,
    pub started: Instant,
    /// The connection may go back to the pool once the answer is read (not after an
    /// upload the provider stopped reading: the request on it never ended).
    pub reusable: bool,
}

fn map_error(provider: &Provider, e: &PError, timeouts: &Timeouts) -> GatewayError {
    match e.etype() {
        ErrorType::ConnectTimedout => GatewayError::UpstreamConnect {
            provider: provider.id.clone(),
            message: format!("connect timed out after {} ms", timeouts.connect.as_millis()),
        },
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => GatewayError::UpstreamTimeout {
            provider: provider.id.clone(),
            after_ms: timeouts.read_write.as_millis() as u64,
        },
        ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::ConnectProxyFailure
        | ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError => {
            provider.forget_address();
            GatewayError::UpstreamConnect {
                provider: provider.id.clone(),
                message: e.etype().as_str().to_string(),
            }
        }
        _ => GatewayError::UpstreamConnect {
            provider: provider.id.clone(),
            message: format!(
                "{}{}",
                e.etype().as_str(),
                e.context.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
            ),
        },
    }
}

/// Serialises the request head. The head is written by us rather than by pingora's
/// client, which flushes the head on its own: head and body then leave in one write
/// (one packet for typical requests instead of two).
/// How a request body is framed.
#[derive(Clone, Copy)]
enum Framing {
    Length(u64),
    /// `Transfer-Encoding: chunked`: a streamed body whose length the client did not give.
    Chunked,
}

/// A `content-type` among `extra` replaces the JSON default (uploads send multipart).
fn request_head(
    provider: &Provider,
    method: &str,
    path: &str,
    framing: Framing,
    accept: &str,
    extra: &[(&str, &str)],
    credential: Option<&(&'static str, String)>,
) -> Result<Vec<u8>, GatewayError> {
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(GatewayError::internal("upstream path contains forbidden bytes"));
    }
    let mut head = Vec::with_capacity(256 + path.len());
    let mut put = |parts: &[&str]| {
        for p in parts {
            head.extend_from_slice(p.as_bytes());
        }
    };
    put(&[method, " ", path, " HTTP/1.1\r\nHost: ", &provider.host_header, "\r\n"]);
    if method != "GET" {
        if !extra.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
            put(&["Content-Type: application/json\r\n"]);
        }
        match framing {
            Framing::Length(n) => put(&["Content-Length: ", &n.to_string(), "\r\n"]),
            Framing::Chunked => put(&["Transfer-Encoding: chunked\r\n"]),
        }
    }
    // The gateway reads upstream bodies (usage, errors): ask for them uncompressed.
    put(&["Accept: ", accept, "\r\nAccept-Encoding: identity\r\n"]);
    put(&["User-Agent: modelux/", env!("CARGO_PKG_VERSION"), "\r\n"]);
    if let Some((name, value)) = credential.or(provider.auth_header.as_ref()) {
        put(&[name, ": ", value, "\r\n"]);
    }
    for (name, value) in extra {
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(GatewayError::invalid(
                "invalid_request",
                format!("header {name} contains a line break"),
            ));
        }
        put(&[name, ": ", value, "\r\n"]);
    }
    put(&["\r\n"]);
    Ok(head)
}

/// Bodies up to this size are copied behind the head to go out in a single write.
const COALESCE_LIMIT: usize = 64 * 1024;

async fn send_request(
    session: HttpSession,
    head: &[u8],
    body: &Bytes,
    timeouts: &Timeouts,
) -> (HttpSession, pingora::Result<()>) {
    let HttpSession::H1(h1) = session else {
        // ALPN is H1-only, so pingora never hands out another kind here.
        return (
            session,
            Err(PError::explain(ErrorType::InternalError, "expected an HTTP/1.1 upstream session")),
        );
    };
    let mut stream = h1.into_inner();
    let written = async {
        if body.len() <= COALESCE_LIMIT {
            let mut buf = Vec::with_capacity(head.len() + body.len());
            buf.extend_from_slice(head);
            buf.extend_from_slice(body);
            stream.write_all(&buf).await?;
        } else {
            stream.write_all(head).await?;
            stream.write_all(body).await?;
        }
        stream.flush().await
    };
    let result = match tokio::time::timeout(timeouts.read_write, written).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PError::because(ErrorType::WriteError, "writing upstream request", e)),
        Err(_) => Err(PError::explain(ErrorType::WriteTimedout, "writing upstream request")),
    };
    let mut session = HttpSession::H1(pingora::protocols::http::v1::client::HttpSession::new(stream));
    // Peer options do not reach a session from the connector; pingora's proxy applies them
    // itself, so do we: every read (header, each body chunk) is bounded.
    session.set_read_timeout(Some(timeouts.read_write));
    session.set_write_timeout(Some(timeouts.read_write));
    (session, result)
}

/// Sends one request and waits for the response header. A pooled connection that turns out
/// to be dead (closed by the upstream while idle) is retried once on a fresh connection,
/// only when nothing came back on it.
/// One upstream request: where to, what, and which headers beyond the provider's own.
pub struct Call<'a> {
    /// `POST` for everything the proxy sends; `GET` for credential checks.
    pub method: &'a str,
    pub path: &'a str,
    pub body: Bytes,
    pub accept: &'a str,
    pub extra_headers: &'a [(&'a str, &'a str)],
    /// The caller's own credential (BYOK) in place of the provider's stored one.
    pub credential: Option<&'a (&'static str, String)>,
}

pub async fn exchange(
    connector: &Connector,
    metrics: &Metrics,
    timeouts: &Timeouts,
    provider: &Provider,
    call: Call<'_>,
) -> Result<Exchange, GatewayError> {
    let started = Instant::now();
    let peer = provider.peer(timeouts).await?;
    let head = request_head(
        provider,
        call.method,
        call.path,
        Framing::Length(call.body.len() as u64),
        call.accept,
        call.extra_headers,
        call.credential,
    )?;
    let body = call.body;
    let mut allow_stale_retry = true;
    loop {
        let (mut session, reused) =
            connector.get_http_session(&peer).await.map_err(|e| map_error(provider, &e, timeouts))?;
        // Peer options do not reach a session from the connector; pingora's proxy applies
        // them itself, so do we: every read (header, each body chunk) is bounded.
        session.set_read_timeout(Some(timeouts.read_write));
        session.set_write_timeout(Some(timeouts.read_write));
        if reused {
            metrics.upstream_connections_reused.inc();
        } else {
            metrics.upstream_connections_new.inc();
        }
        let (mut session, written) = send_request(session, &head, &body, timeouts).await;
        let sent = match written {
            Ok(()) => session.read_response_header().await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                let Some(resp) = session.response_header().cloned() else {
                    return Err(GatewayError::internal("upstream response header missing after read"));
                };
                return Ok(Exchange {
                    session,
                    peer,
                    header: resp,
                    ttfb: started.elapsed(),
                    started,
                    reusable: true,
                });
            }
            Err(e) => {
                let stale = reused
                    && allow_stale_retry
                    && matches!(
                        e.etype(),
                        ErrorType::ConnectionClosed
                            | ErrorType::ReadError
                            | ErrorType::WriteError
                            | ErrorType::InvalidHTTPHeader
                    );
                if stale {
                    allow_stale_retry = false;
                    continue;
                }
                return Err(map_error(provider, &e, timeouts));
            }
        }
    }
}

/// How long an upload the provider stopped reading waits for the answer it may have sent.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Where a streamed request body comes from (a client's upload), piece by piece.
pub trait BodySource: Send {
    /// The next piece; `None` at the end. An `Err` abandons the request.
    fn next_piece(&mut self)
        -> impl std::future::Future<Output = Result<Option<Bytes>, GatewayError>> + Send;
}

/// Like `exchange`, with the body streamed from `source` as it arrives (`length`: the
/// client's declared length; otherwise chunked): an upload of any size passes through
/// holding one piece at a time. The body cannot be sent twice, so only a failure to write
/// the head to a pooled connection moves to a fresh one.
pub async fn exchange_streaming<S: BodySource>(
    connector: &Connector,
    metrics: &Metrics,
    timeouts: &Timeouts,
    provider: &Provider,
    call: Call<'_>,
    length: Option<u64>,
    source: &mut S,
) -> Result<Exchange, GatewayError> {
    let started = Instant::now();
    let peer = provider.peer(timeouts).await?;
    let framing = length.map_or(Framing::Chunked, Framing::Length);
    let head = request_head(
        provider,
        call.method,
        call.path,
        framing,
        call.accept,
        call.extra_headers,
        call.credential,
    )?;
    let write_error = |e: std::io::Error| {
        map_error(provider, &PError::because(ErrorType::WriteError, "writing upstream request", e), timeouts)
    };
    let timed_out = || GatewayError::UpstreamTimeout {
        provider: provider.id.clone(),
        after_ms: timeouts.read_write.as_millis() as u64,
    };
    let mut tries = 0;
    let mut stream = loop {
        tries += 1;
        let (session, reused) =
            connector.get_http_session(&peer).await.map_err(|e| map_error(provider, &e, timeouts))?;
        if reused {
            metrics.upstream_connections_reused.inc();
        } else {
            metrics.upstream_connections_new.inc();
        }
        let HttpSession::H1(h1) = session else {
            return Err(GatewayError::internal("expected an HTTP/1.1 upstream session"));
        };
        let mut stream = h1.into_inner();
        match tokio::time::timeout(timeouts.read_write, stream.write_all(&head)).await {
            Ok(Ok(())) => break stream,
            Ok(Err(_)) if reused && tries < 3 => continue,
            Ok(Err(e)) => return Err(write_error(e)),
            Err(_) => return Err(timed_out()),
        }
    };
    let chunked = length.is_none();
    let mut refused = None;
    while let Some(piece) = source.next_piece().await? {
        if piece.is_empty() {
            continue;
        }
        let write = async {
            if chunked {
                stream.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
                stream.write_all(&piece).await?;
                stream.write_all(b"\r\n").await
            } else {
                stream.write_all(&piece).await
            }
        };
        match tokio::time::timeout(timeouts.read_write, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                refused = Some(write_error(e));
                break;
            }
            Err(_) => return Err(timed_out()),
        }
    }
    if refused.is_none() {
        let finish = async {
            if chunked {
                stream.write_all(b"0\r\n\r\n").await?;
            }
            stream.flush().await
        };
        match tokio::time::timeout(timeouts.read_write, finish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => refused = Some(write_error(e)),
            Err(_) => return Err(timed_out()),
        }
    }
    let mut session = HttpSession::H1(pingora::protocols::http::v1::client::HttpSession::new(stream));
    session.set_read_timeout(Some(timeouts.read_write));
    session.set_write_timeout(Some(timeouts.read_write));
    if let Some(refused) = refused {
        // The provider stopped reading: it may have answered first (a 413, a 401), and
        // that answer, not the broken write, is what the client should get.
        return match tokio::time::timeout(EARLY_ANSWER_WAIT, session.read_response_header()).await {
            Ok(Ok(())) => match session.response_header().cloned() {
                Some(header) => {
                    Ok(Exchange { session, peer, header, ttfb: started.elapsed(), started, reusable: false })
                }
                None => Err(refused),
            },
            _ => Err(refused),
        };
    }
    session.read_response_header().await.map_err(|e| map_error(provider, &e, timeouts))?;
    let Some(header) = session.response_header().cloned() else {
        return Err(GatewayError::internal("upstream response header missing after read"));
    };
    Ok(Exchange { session, peer, header, ttfb: started.elapsed(), started, reusable: true })
}

/// Reads the rest of a (non-streamed) upstream body, bounded by `limit` bytes.
pub async fn read_all(
    ex: &mut Exchange,
    limit: usize,
    provider: &Provider,
    timeouts: &Timeouts,
) -> Result<Bytes, GatewayError> {
    let mut out = bytes::BytesMut::new();
    loop {
        match ex.session.read_response_body().await {
            Ok(Some(chunk)) => {
                if out.len() + chunk.len() > limit {
                    return Err(GatewayError::UpstreamConnect {
                        provider: provider.id.clone(),
                        message: format!("response body larger than {limit} bytes"),
                    });
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out.freeze()),
            Err(e) => return Err(map_error(provider, &e, timeouts)),
        }
    }
}

/// Reads the next piece of a streamed upstream body.
pub async fn next_chunk(
    ex: &mut Exchange,
    provider: &Provider,
    timeouts: &Timeouts,
) -> Result<Option<Bytes>, GatewayError> {
    ex.session.read_response_body().await.map_err(|e| map_error(provider, &e, timeouts))
}

/// Returns the connection to the pool when the response was read completely.
pub async fn release(connector: &Connector, mut ex: Exchange, idle: Duration) {
    if ex.reusable && ex.session.response_done() {
        connector.release_http_session(ex.session, &ex.peer, Some(idle)).await;
    } else {
        ex.session.shutdown().await;
    }
}

/// A whole call: the status and body (at most `limit` bytes), the connection back in the
/// pool. For the gateway's own calls (key checks, the semantic cache's embeddings), not a
/// client's answer.
pub async fn round_trip(
    connector: &Connector,
    metrics: &Metrics,
    timeouts: &Timeouts,
    provider: &Provider,
    call: Call<'_>,
    limit: usize,
) -> Result<(u16, Bytes), GatewayError> {
    let mut ex = exchange(connector, metrics, timeouts, provider, call).await?;
    let status = ex.header.status.as_u16();
    let body = read_all(&mut ex, limit, provider, timeouts).await;
    release(connector, ex, timeouts.idle).await;
    Ok((status, body?))
}

/// `<provider> answered <status>: <its message>` for a failed call of the gateway's own.
pub fn answered(provider: &Provider, status: u16, body: &[u8]) -> String {
    let said = provider
        .format()
        .codec()
        .error_message(body)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    format!("{} answered {status}: {said}", provider.id)
}

/// Checks a provider's key with its kind's cheap authenticated read (`Adapter::verify_path`).
/// `Ok(false)`: the kind has no such read, nothing was checked. `Err`: the provider's own
/// message (or why it could not be reached).
pub async fn verify(
    connector: &Connector,
    metrics: &Metrics,
    timeouts: &Timeouts,
    provider: &Provider,
) -> Result<bool, String> {
    let Some(path) = provider.adapter.verify_path(provider) else { return Ok(false) };
    let signed = provider.signed_headers(&path, b"").map_err(|e| e.message())?;
    let extra: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let call = Call {
        credential: None,
        method: "GET",
        path: &path,
        body: Bytes::new(),
        accept: "application/json",
        extra_headers: &extra,
    };
    let mut ex = exchange(connector, metrics, timeouts, provider, call).await.map_err(|e| e.message())?;
    let status = ex.header.status.as_u16();
    let body = read_all(&mut ex, 256 * 1024, provider, timeouts).await.unwrap_or_default();
    release(connector, ex, timeouts.idle).await;
    if (200..300).contains(&status) {
        return Ok(true);
    }
    Err(answered(provider, status, &body))
}
