//! Client connections before and between requests: each listener's connection cap, the
//! deadline for a request's head, and the keep-alive wait.
//!
//! pingora bounds each *read* of a request head by the keep-alive timeout, which an HTTP/1.1
//! client gets unbounded by default (or picks itself with `Keep-Alive: timeout=`): a client
//! idling, or trickling its head a byte at a time, would hold a connection forever. So the
//! listeners run their HTTP app inside [`Guarded`], which owns the connection loop pingora
//! would otherwise run (HTTP/1.x, what the listeners speak).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};

use crate::config::ConnectionLimits;
use crate::metrics::Metrics;

/// The connection's state the listener's app reports to, per request.
struct Exchange {
    /// Set once the current request's head is read (its deadline no longer applies).
    head_read: AtomicBool,
    /// `keepalive_timeout_seconds: 0`: every answer closes the connection.
    no_keepalive: bool,
}

tokio::task_local! {
    static EXCHANGE: Arc<Exchange>;
}

/// The listener's app has read the current request's head: from here on the request's own
/// deadlines (the body's, the upstream's) apply, not the head's. pingora sets the session's
/// keep-alive from the request itself as it reads the head, so the listener's "no
/// keep-alive" is applied again here.
pub fn head_read(session: &mut ServerSession) {
    let no_keepalive = EXCHANGE
        .try_with(|x| {
            x.head_read.store(true, Ordering::Relaxed);
            x.no_keepalive
        })
        .unwrap_or(false);
    if no_keepalive {
        session.set_keepalive(None);
    }
}

/// Why a request's framing is refused, if it is: a transfer coding other than one
/// `chunked` (RFC 9112 §6.1: one the gateway does not decode; `chunked, chunked` is a
/// classic smuggling shape, where a front and the gateway could disagree on where the body
/// ends). Answered with an error and a close.
pub fn framing_problem(head: &pingora::http::RequestHeader) -> Option<&'static str> {
    let mut lines = head.headers.get_all(http::header::TRANSFER_ENCODING).iter();
    let first = lines.next()?;
    let single_chunked = first.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
    // With both headers pingora has already dropped Content-Length and will close after
    // the answer (RFC 9112 §6.3), so that shape needs nothing here.
    (!single_chunked || lines.next().is_some())
        .then_some("the only Transfer-Encoding accepted is a single \"chunked\"")
}

/// Bytes a second a client must at least read a large whole answer at.
const MIN_SEND_RATE: u64 = 8 * 1024;

/// Before an answer of `len` bytes goes out in one write: the write timeout bounds one
/// write, so a large answer gets a second more per `MIN_SEND_RATE` bytes (a slow but
/// reading client is not cut off).
pub fn allow_for_answer(session: &mut ServerSession, len: usize) {
    if let Some(base) = session.get_write_timeout() {
        session.set_write_timeout(Some(base + Duration::from_secs(len as u64 / MIN_SEND_RATE)));
    }
}

/// What one listener allows its clients.
pub struct Policy {
    /// How long a request's head may take from the connection opening (on a kept-alive
    /// connection: this plus the keep-alive time, from the previous answer).
    pub header_timeout: Duration,
    /// How long an idle connection waits for its next request; 0: no keep-alive.
    pub keepalive_seconds: u64,
    /// The longest one write to the client may wait.
    pub write_timeout: Duration,
    pub max_connections: usize,
    /// The body of the 503 sent over the cap, in the format the request's path speaks.
    pub overloaded: fn(path: &str) -> Bytes,
}

impl Policy {
    pub fn new(limits: &ConnectionLimits, max_connections: usize, overloaded: fn(&str) -> Bytes) -> Policy {
        Policy {
            header_timeout: limits.header_timeout,
            keepalive_seconds: limits.keepalive_seconds,
            write_timeout: limits.write_timeout,
            max_connections,
            overloaded,
        }
    }
}

struct Counters {
    open: IntGauge,
    refused: IntCounter,
    header_timeouts: IntCounter,
}

/// An HTTP app behind a listener's connection policy.
pub struct Guarded<A> {
    app: Arc<A>,
    policy: Policy,
    open: AtomicUsize,
    counters: Counters,
}

impl<A> Guarded<A> {
    pub fn new(app: A, policy: Policy, listener: &str, metrics: &Metrics) -> Guarded<A> {
        Guarded {
            app: Arc::new(app),
            policy,
            open: AtomicUsize::new(0),
            counters: Counters {
                open: metrics.client_connections.with_label_values(&[listener]),
                refused: metrics.client_connections_refused.with_label_values(&[listener]),
                header_timeouts: metrics.client_timeouts.with_label_values(&[listener, "header"]),
            },
        }
    }

    /// The keep-alive pingora applies to the session: per read while waiting for the next
    /// head. `Some(0)` would mean unbounded, so no keep-alive is `None`.
    fn keepalive(&self, shutdown: &ShutdownWatch) -> Option<u64> {
        (!*shutdown.borrow() && self.policy.keepalive_seconds > 0).then_some(self.policy.keepalive_seconds)
    }

    /// Over the cap: read the head briefly (to answer in the path's format), answer 503 and
    /// close. A client that does not send its head at once just sees the close.
    async fn refuse(&self, stream: Stream) {
        self.counters.refused.inc();
        let mut session = ServerSession::new_http1(stream);
        let wait = self.policy.header_timeout.min(Duration::from_secs(1));
        let path = match tokio::time::timeout(wait, session.read_request()).await {
            Ok(Ok(true)) => session.req_header().uri.path().to_string(),
            _ => return,
        };
        // After the read: pingora sets keep-alive from the request's own headers.
        session.set_keepalive(None);
        let body = (self.policy.overloaded)(&path);
        let Ok(header) = overloaded_header(body.len()) else { return };
        let answer = async {
            session.write_response_header(Box::new(header)).await?;
            session.write_response_body(body, true).await?;
            session.finish_body().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
        // Closing with the body unread would reset the connection, which can destroy the
        // answer before the client reads it: take what is still arriving, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(1), session.drain_request_body()).await;
        session.shutdown().await;
    }
}

fn overloaded_header(len: usize) -> pingora::Result<ResponseHeader> {
    let mut h = ResponseHeader::build(503, Some(4))?;
    h.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    h.insert_header(http::header::CONTENT_LENGTH, len.to_string())?;
    h.insert_header(http::header::RETRY_AFTER, "1")?;
    Ok(h)
}

/// Keeps the open-connection count right however the connection ends.
struct Slot<'a> {
    open: &'a AtomicUsize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The gauge of connections being served (not those being turned away).
struct Gauge<'a>(&'a IntGauge);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl<A> ServerApp for Guarded<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let _slot = Slot { open: &self.open };
        if open > self.policy.max_connections {
            self.refuse(stream).await;
            return None;
        }
        self.counters.open.inc();
        let _gauge = Gauge(&self.counters.open);
        let exchange = Arc::new(Exchange {
            head_read: AtomicBool::new(false),
            no_keepalive: self.policy.keepalive_seconds == 0,
        });
        let mut session = ServerSession::new_http1(stream);
        let mut deadline = self.policy.header_timeout;
        loop {
            session.set_keepalive(self.keepalive(shutdown));
            // A client that stops reading its answer (a stream, say) would hold the
            // request, and its upstream, for as long as the answer runs.
            session.set_write_timeout(Some(self.policy.write_timeout));
            // Requests a client sent without waiting for answers are served in order.
            session.set_pipelining_enabled(true);
            exchange.head_read.store(false, Ordering::Relaxed);
            let serve = EXCHANGE.scope(exchange.clone(), self.app.process_new_http(session, shutdown));
            tokio::pin!(serve);
            let reused = tokio::select! {
                biased;
                reused = &mut serve => reused,
                _ = tokio::time::sleep(deadline) => {
                    if exchange.head_read.load(Ordering::Relaxed) {
                        serve.await
                    } else {
                        // Dropping the session closes the connection.
                        self.counters.header_timeouts.inc();
                        return None;
                    }
                }
            };
            let (stream, persistent) = reused?.consume();
            session = ServerSession::new_http1(stream);
            if let Some(persistent) = persistent {
                persistent.apply_to_session(&mut session);
            }
            // pingora bounds the keep-alive wait itself, per read (it ends an idle
            // connection quietly); the head then has its own time on top. Counted from the
            // end of the previous exchange, not from the next head's first byte: the bytes
            // of a pipelined next request may already be read, and the loop cannot see
            // them to know whether to wait for more.
            deadline = self.policy.header_timeout + Duration::from_secs(self.policy.keepalive_seconds);
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}
