//! Incremental Server-Sent Events parsing: feed arbitrary byte slices (a network read can
//! split anywhere, even inside a UTF-8 sequence or a CRLF), get complete events out.

/// One event: its `event:` name (empty when absent) and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub event: String,
    pub data: String,
}

/// Cuts a streamed body into events, one network read at a time. SSE for most providers;
/// an adapter whose provider frames its streams otherwise (Bedrock's AWS eventstream)
/// brings its own.
pub trait Framer: Send {
    /// Adds bytes (split anywhere); appends each event completed by them.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), String>;
    /// End of body: flushes a last event; `Err` when the body ended inside a frame.
    fn finish(&mut self, out: &mut Vec<Event>) -> Result<(), String>;
}

impl Framer for Parser {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        Parser::feed(self, bytes, out)
    }

    fn finish(&mut self, out: &mut Vec<Event>) -> Result<(), String> {
        Parser::finish(self, out);
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

/// Longest line accepted; beyond it the upstream is not speaking SSE and the caller errors.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Adds bytes; appends each event completed by them to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let line_end = if end > start && self.buf[end - 1] == b'\r' { end - 1 } else { end };
            let line = String::from_utf8_lossy(&self.buf[start..line_end]).into_owned();
            start = end + 1;
            self.line(&line, out);
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            return Err("SSE line too long".into());
        }
        Ok(())
    }

    /// Flushes a last event not followed by a blank line (a stream that ended early).
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            self.line(line.trim_end_matches('\r'), out);
        }
        self.dispatch(out);
    }

    fn line(&mut self, line: &str, out: &mut Vec<Event>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        if self.has_data {
            out.push(Event { event: std::mem::take(&mut self.event), data: std::mem::take(&mut self.data) });
        } else {
            self.event.clear();
        }
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_at_every_offset() {
        let input = "event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\ndata: x\ndata: y\n\nevent: e\ndata: é\n\n";
        let bytes = input.as_bytes();
        let expected = vec![
            Event { event: "message_start".into(), data: "{\"a\":1}".into() },
            Event { event: String::new(), data: "x\ny".into() },
            Event { event: "e".into(), data: "é".into() },
        ];
        for split in 0..=bytes.len() {
            let mut p = Parser::new();
            let mut out = Vec::new();
            p.feed(&bytes[..split], &mut out).unwrap();
            p.feed(&bytes[split..], &mut out).unwrap();
            p.finish(&mut out);
            assert_eq!(out, expected, "split at {split}");
        }
    }
}
