//! Minimal HTTP/1.1 client: one keep-alive connection per [`Conn`], bodies by
//! Content-Length, chunked or connection close, and a streaming reader that
//! hands out body bytes as soon as they come off the socket (for SSE tests).

use std::io::{self, Write};
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::{self, ChunkedDecoder, Decoded};

const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Bodies up to this size are copied behind the head for a single write.
const COALESCE_LIMIT: usize = 64 * 1024;

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// One keep-alive TCP connection (TCP_NODELAY). If the server closed it, or
/// a previous response was not read to the end, the next request reconnects
/// to the same address transparently.
#[derive(Debug)]
pub struct Conn {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    buf: BytesMut,
    head: Vec<u8>,
    /// A response is (possibly) still partially unread on `stream`.
    dirty: bool,
    /// The last response said `connection: close`.
    close_after: bool,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = open(addr).await?;
        Ok(Conn {
            addr,
            host: addr.to_string(),
            stream: Some(stream),
            buf: BytesMut::with_capacity(16 * 1024),
            head: Vec::with_capacity(1024),
            dirty: false,
            close_after: false,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends a request and reads the whole response. Sets `Host` (unless
    /// given) and `Content-Length`.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut s = self.request_streaming(method, path, headers, body).await?;
        let mut out = Vec::with_capacity(s.size_hint());
        while let Some(chunk) = s.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(Response { status: s.status, headers: std::mem::take(&mut s.headers), body: out })
    }

    /// Sends a request and returns once the response head is read; the body
    /// is then pulled with [`StreamingResponse::next_chunk`].
    pub async fn request_streaming(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<StreamingResponse<'_>> {
        let (status, headers, kind) = self.send(method, path, headers, body).await?;
        Ok(StreamingResponse { status, headers, conn: ConnSlot::Borrowed(self), kind })
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<(u16, Vec<(String, String)>, BodyKind)> {
        if self.dirty || self.close_after || self.stream.is_none() {
            self.stream = None;
            self.close_after = false;
            self.buf.clear();
            self.stream = Some(open(self.addr).await?);
        }
        // Until the body is fully read the connection cannot be reused.
        self.dirty = true;
        self.head.clear();
        let _ = write!(self.head, "{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            let _ = write!(self.head, "host: {}\r\n", self.host);
        }
        for (k, v) in headers {
            if k.eq_ignore_ascii_case("content-length") {
                continue;
            }
            let _ = write!(self.head, "{k}: {v}\r\n");
        }
        if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS") {
            let _ = write!(self.head, "content-length: {}\r\n", body.len());
        }
        self.head.extend_from_slice(b"\r\n");
        let stream = self.stream.as_mut().ok_or_else(not_connected)?;
        if body.len() <= COALESCE_LIMIT {
            self.head.extend_from_slice(body);
            stream.write_all(&self.head).await?;
        } else {
            stream.write_all(&self.head).await?;
            stream.write_all(body).await?;
        }
        self.read_head_of(method).await
    }

    /// Wraps a stream connected to `addr`, with bytes already read from it in `buf`, to read
    /// answers off it (the fuzz run writes its own, malformed, requests). The address is
    /// given: a peer that already closed has none to ask the socket for.
    pub fn from_stream(stream: TcpStream, buf: BytesMut, addr: SocketAddr) -> Conn {
        Conn {
            addr,
            host: addr.to_string(),
            stream: Some(stream),
            buf,
            head: Vec::new(),
            dirty: true,
            close_after: false,
        }
    }

    /// Reads the whole answer to a request of `method` already sent (1xx skipped).
    pub async fn read_response(&mut self, method: &str) -> io::Result<Response> {
        let (status, headers, kind) = self.read_head_of(method).await?;
        let mut s = StreamingResponse { status, headers, conn: ConnSlot::Borrowed(self), kind };
        let body = s.collect().await?;
        Ok(Response { status: s.status, headers: std::mem::take(&mut s.headers), body })
    }

    /// Reads an answer's head and how its body is framed.
    async fn read_head_of(&mut self, method: &str) -> io::Result<(u16, Vec<(String, String)>, BodyKind)> {
        let stream = self.stream.as_mut().ok_or_else(not_connected)?;
        loop {
            let (status, hdrs, len, close) = read_head(stream, &mut self.buf).await?;
            // Interim responses (100 Continue, 103 Early Hints) precede the
            // real one; 101 would be a protocol switch we do not support.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let chunked = find_header(&hdrs, "transfer-encoding")
                .is_some_and(|v| wire::has_token(v.as_bytes(), "chunked"));
            let kind = if method == "HEAD" || status == 204 || status == 304 {
                BodyKind::Length(0)
            } else if chunked {
                BodyKind::Chunked(ChunkedDecoder::new())
            } else if let Some(n) = len {
                BodyKind::Length(n)
            } else {
                BodyKind::Close
            };
            // Read this response, then reconnect for the next one.
            self.close_after = close;
            return Ok((status, hdrs, kind));
        }
    }
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

async fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads and parses a response head: (status, headers, content-length,
/// connection-close).
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> io::Result<(u16, Vec<(String, String)>, Option<u64>, bool)> {
    loop {
        if !buf.is_empty() {
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut hs);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut close = resp.version == Some(0);
                    let mut len = None;
                    let mut headers = Vec::with_capacity(resp.headers.len());
                    for h in resp.headers.iter() {
                        let name = h.name.to_ascii_lowercase();
                        match name.as_str() {
                            "content-length" => len = Some(wire::parse_len(h.value)?),
                            "connection" => {
                                if wire::has_token(h.value, "close") {
                                    close = true;
                                } else if wire::has_token(h.value, "keep-alive") {
                                    close = false;
                                }
                            }
                            _ => {}
                        }
                        headers.push((name, String::from_utf8_lossy(h.value).into_owned()));
                    }
                    let _ = buf.split_to(n);
                    return Ok((status, headers, len, close));
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_HEAD {
                        return Err(wire::invalid("response head too large"));
                    }
                }
                Err(e) => return Err(wire::invalid(&format!("bad response head: {e}"))),
            }
        }
        fill(stream, buf).await.and_then(|n| {
            if n == 0 {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before response head"))
            } else {
                Ok(())
            }
        })?;
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    stream.read_buf(buf).await
}

#[derive(Debug)]
enum BodyKind {
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Delimited by the server closing the connection.
    Close,
    /// Fully read.
    Done,
}

#[derive(Debug)]
enum ConnSlot<'a> {
    Borrowed(&'a mut Conn),
    Owned(Box<Conn>),
}

impl ConnSlot<'_> {
    fn get(&mut self) -> &mut Conn {
        match self {
            ConnSlot::Borrowed(c) => c,
            ConnSlot::Owned(c) => c,
        }
    }
}

/// A response whose head has been read; the body is read incrementally.
/// Dropping it before the end makes the connection reconnect on next use.
#[derive(Debug)]
pub struct StreamingResponse<'a> {
    pub status: u16,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    conn: ConnSlot<'a>,
    kind: BodyKind,
}

impl StreamingResponse<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    fn size_hint(&self) -> usize {
        match self.kind {
            BodyKind::Length(n) => usize::try_from(n).unwrap_or(0).min(64 * 1024 * 1024),
            _ => 0,
        }
    }

    /// The next piece of (de-chunked) body data, as soon as any is available
    /// from the socket; `None` at the end of the body. A connection that
    /// ends early is an `UnexpectedEof` error (a reset: `ConnectionReset`).
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let conn = self.conn.get();
        loop {
            match &mut self.kind {
                BodyKind::Done => return Ok(None),
                BodyKind::Length(rem) => {
                    if *rem == 0 {
                        self.kind = BodyKind::Done;
                        conn.dirty = false;
                        return Ok(None);
                    }
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(*rem).unwrap_or(usize::MAX).min(conn.buf.len());
                        *rem -= n as u64;
                        return Ok(Some(conn.buf.split_to(n).freeze()));
                    }
                }
                BodyKind::Chunked(dec) => match dec.next(&mut conn.buf)? {
                    Decoded::Data(d) => return Ok(Some(d)),
                    Decoded::Done => {
                        self.kind = BodyKind::Done;
                        conn.dirty = false;
                        return Ok(None);
                    }
                    Decoded::NeedMore => {}
                },
                BodyKind::Close => {
                    if !conn.buf.is_empty() {
                        return Ok(Some(conn.buf.split().freeze()));
                    }
                }
            }
            let stream = conn.stream.as_mut().ok_or_else(not_connected)?;
            if fill(stream, &mut conn.buf).await? == 0 {
                if matches!(self.kind, BodyKind::Close) {
                    self.kind = BodyKind::Done;
                    conn.stream = None;
                    return Ok(None);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-body"));
            }
        }
    }

    /// Reads the rest of the body into one buffer.
    pub async fn collect(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = self.next_chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}

/// One-shot request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    Conn::connect(addr).await?.request(method, path, headers, body).await
}

/// One-shot streaming request on a fresh connection owned by the response.
pub async fn request_streaming(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<StreamingResponse<'static>> {
    let mut conn = Box::new(Conn::connect(addr).await?);
    let (status, headers, kind) = conn.send(method, path, headers, body).await?;
    Ok(StreamingResponse { status, headers, conn: ConnSlot::Owned(conn), kind })
}
