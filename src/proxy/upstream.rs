//! The upstream leg, driven from `request_filter` with pingora's own HTTP `Connector`
//! (pooled connections, rustls TLS, per-peer timeouts).
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
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error as PError, ErrorType};

use crate::config::Settings;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::providers::Provider;

/// An upstream exchange whose response header has arrived.
pub struct Exchange {
    pub session: HttpSession,
    pub peer: HttpPeer,
    pub header: ResponseHeader,
    /// Time from the start of the attempt to the response header.
    pub ttfb: Duration,
    pub started: Instant,
}

fn map_error(provider: &Provider, e: &PError, settings: &Settings) -> GatewayError {
    match e.etype() {
        ErrorType::ConnectTimedout => GatewayError::UpstreamConnect {
            provider: provider.id.clone(),
            message: format!("connect timed out after {} ms", settings.upstream_connect_timeout.as_millis()),
        },
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => GatewayError::UpstreamTimeout {
            provider: provider.id.clone(),
            after_ms: settings.upstream_timeout.as_millis() as u64,
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

fn request_header(
    provider: &Provider,
    path: &str,
    body_len: usize,
    accept: &str,
) -> Result<RequestHeader, GatewayError> {
    let build = || -> pingora::Result<RequestHeader> {
        let mut req = RequestHeader::build("POST", path.as_bytes(), Some(8))?;
        req.insert_header(http::header::HOST, provider.host_header.as_str())?;
        req.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        req.insert_header(http::header::CONTENT_LENGTH, body_len.to_string())?;
        req.insert_header(http::header::ACCEPT, accept)?;
        // The gateway reads upstream bodies (usage, errors): ask for them uncompressed.
        req.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
        req.insert_header(http::header::USER_AGENT, concat!("modelux/", env!("CARGO_PKG_VERSION")))?;
        if let Some(auth) = &provider.authorization {
            req.insert_header(http::header::AUTHORIZATION, auth.as_str())?;
        }
        Ok(req)
    };
    build().map_err(|e| GatewayError::internal(format!("building upstream request: {e}")))
}

/// Sends one request and waits for the response header. A pooled connection that turns out
/// to be dead (closed by the upstream while idle) is retried once on a fresh connection,
/// only when nothing came back on it.
pub async fn exchange(
    connector: &Connector,
    metrics: &Metrics,
    settings: &Settings,
    provider: &Provider,
    path: &str,
    body: Bytes,
    accept: &str,
) -> Result<Exchange, GatewayError> {
    let started = Instant::now();
    let peer = provider.peer(settings).await?;
    let header = request_header(provider, path, body.len(), accept)?;
    let mut allow_stale_retry = true;
    loop {
        let (mut session, reused) =
            connector.get_http_session(&peer).await.map_err(|e| map_error(provider, &e, settings))?;
        // Peer options do not reach a session from the connector; pingora's proxy applies
        // them itself, so do we: every read (header, each body chunk) is bounded.
        session.set_read_timeout(Some(settings.upstream_timeout));
        session.set_write_timeout(Some(settings.upstream_timeout));
        if reused {
            metrics.upstream_connections_reused.inc();
        } else {
            metrics.upstream_connections_new.inc();
        }
        let sent = async {
            session.write_request_header(Box::new(header.clone())).await?;
            session.write_request_body(body.clone(), true).await?;
            session.finish_request_body().await?;
            session.read_response_header().await
        }
        .await;
        match sent {
            Ok(()) => {
                let Some(resp) = session.response_header().cloned() else {
                    return Err(GatewayError::internal("upstream response header missing after read"));
                };
                return Ok(Exchange { session, peer, header: resp, ttfb: started.elapsed(), started });
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
                return Err(map_error(provider, &e, settings));
            }
        }
    }
}

/// Reads the rest of a (non-streamed) upstream body, bounded by `limit` bytes.
pub async fn read_all(
    ex: &mut Exchange,
    limit: usize,
    provider: &Provider,
    settings: &Settings,
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
            Err(e) => return Err(map_error(provider, &e, settings)),
        }
    }
}

/// Reads the next piece of a streamed upstream body.
pub async fn next_chunk(
    ex: &mut Exchange,
    provider: &Provider,
    settings: &Settings,
) -> Result<Option<Bytes>, GatewayError> {
    ex.session.read_response_body().await.map_err(|e| map_error(provider, &e, settings))
}

/// Returns the connection to the pool when the response was read completely.
pub async fn release(connector: &Connector, mut ex: Exchange, idle: Duration) {
    if ex.session.response_done() {
        connector.release_http_session(ex.session, &ex.peer, Some(idle)).await;
    } else {
        ex.session.shutdown().await;
    }
}
