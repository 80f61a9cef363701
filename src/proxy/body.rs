//! Reading the client's request body, bounded in size and time. The whole body is needed
//! before routing (the model name is inside it), so it is read here, once, into memory.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::error::GatewayError;

/// The body length the client declared in `Content-Length`, when it is a number.
pub fn declared_length(header: &pingora::http::RequestHeader) -> Option<u64> {
    header.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
}

/// Reads the complete body. Rejects by `Content-Length` before reading anything when the
/// declared size is over `limit`, and while reading when a chunked body grows past it.
pub async fn read_body(session: &mut Session, limit: u64, deadline: Duration) -> Result<Bytes, GatewayError> {
    let declared = match session.req_header().headers.get(http::header::CONTENT_LENGTH) {
        Some(v) => {
            let n =
                v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| {
                    GatewayError::invalid("invalid_request", "invalid Content-Length header")
                })?;
            if n > limit {
                return Err(GatewayError::PayloadTooLarge { limit });
            }
            Some(n)
        }
        None => None,
    };
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit) as usize);
    let read_all = async {
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if buf.len() as u64 + chunk.len() as u64 > limit {
                        return Err(GatewayError::PayloadTooLarge { limit });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    return Err(GatewayError::invalid(
                        "invalid_request",
                        format!("could not read the request body: {}", e.etype().as_str()),
                    ))
                }
            }
        }
    };
    match tokio::time::timeout(deadline, read_all).await {
        Ok(Ok(())) => Ok(buf.freeze()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(GatewayError::RequestTimeout {
            message: format!("the request body was not received within {} ms", deadline.as_millis()),
        }),
    }
}
