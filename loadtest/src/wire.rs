//! HTTP/1.1 framing helpers shared by the mock server and the client.

use std::io;

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size or trailer line we accept; real ones are a few bytes.
const MAX_LINE: usize = 4096;

/// Result of one step of [`ChunkedDecoder::next`].
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Decoded body bytes (possibly a part of one chunk).
    Data(Bytes),
    /// The buffer holds no complete next element: read more from the socket.
    NeedMore,
    /// The terminating zero-size chunk and trailers were consumed.
    Done,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// Incremental `Transfer-Encoding: chunked` decoder. It consumes framing from
/// the front of the read buffer and hands out data without copying, so a
/// streaming reader sees each chunk as soon as its bytes arrive.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: State,
}

impl ChunkedDecoder {
    pub(crate) fn new() -> Self {
        ChunkedDecoder { state: State::Size }
    }

    pub(crate) fn next(&mut self, buf: &mut BytesMut) -> io::Result<Decoded> {
        loop {
            match self.state {
                State::Size => {
                    let Some(pos) = find_crlf(buf) else {
                        return need_more_line(buf);
                    };
                    let size = parse_chunk_size(&buf[..pos])?;
                    buf.advance(pos + 2);
                    self.state = if size == 0 { State::Trailer } else { State::Data(size) };
                }
                State::Data(rem) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(rem).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = rem - n as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailer => {
                    let Some(pos) = find_crlf(buf) else {
                        return need_more_line(buf);
                    };
                    buf.advance(pos + 2);
                    if pos == 0 {
                        self.state = State::Done;
                    }
                }
                State::Done => return Ok(Decoded::Done),
            }
        }
    }
}

fn need_more_line(buf: &BytesMut) -> io::Result<Decoded> {
    if buf.len() > MAX_LINE {
        Err(invalid("chunk framing line too long"))
    } else {
        Ok(Decoded::NeedMore)
    }
}

fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let mut size: u64 = 0;
    let mut digits = 0;
    for &b in line {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            // chunk extensions (";name=value") and padding are ignored.
            b';' | b' ' | b'\t' => break,
            _ => return Err(invalid("bad chunk size")),
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or_else(|| invalid("chunk size overflow"))?;
        digits += 1;
    }
    if digits == 0 {
        return Err(invalid("empty chunk size"));
    }
    Ok(size)
}

pub(crate) fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

pub(crate) fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Appends one chunk (`{len:x}\r\n{data}\r\n`) to `out`.
pub(crate) fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Case-insensitive check whether a comma-separated header value contains
/// `token` (e.g. `Connection: keep-alive, Upgrade`).
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses a Content-Length value.
pub(crate) fn parse_len(value: &[u8]) -> io::Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| invalid("bad content-length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> io::Result<(Vec<u8>, bool)> {
        let mut dec = ChunkedDecoder::new();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match dec.next(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::NeedMore => return Ok((out, false)),
                Decoded::Done => return Ok((out, true)),
            }
        }
    }

    #[test]
    fn decodes_chunks_with_extensions_and_trailers() -> io::Result<()> {
        let (out, done) = decode_all(b"5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")?;
        assert_eq!(out, b"hello world");
        assert!(done);
        Ok(())
    }

    #[test]
    fn partial_input_needs_more() -> io::Result<()> {
        let (out, done) = decode_all(b"a\r\nhel")?;
        assert_eq!(out, b"hel");
        assert!(!done);
        Ok(())
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode_all(b"zz\r\n").is_err());
        assert!(decode_all(b"2\r\nabXX").is_err());
    }
}
