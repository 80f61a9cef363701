//! Token usage of passthrough answers (same-format hops, no decoder in the path): read from
//! a whole body, or tapped from a stream on its way to the client without changing it.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::anthropic::UsageCounts as AnthropicCounts;
use super::canonical::Usage;
use super::openai::codec::usage as openai_usage;
use super::WireFormat;

/// Longest line, event data or held event the tap scans; beyond it bytes pass unscanned.
const MAX_SCAN: usize = 1024 * 1024;

/// Of a Responses API `data:` line longer than `MAX_SCAN` (a `response.completed` event
/// repeats the whole output, images included), the end is kept: its usage is there.
const RESPONSES_TAIL: usize = 64 * 1024;

/// The usage of a whole OpenAI (chat completion, embeddings) or Anthropic (message) body;
/// `None` for other formats or a body without a usage object.
pub fn from_body(format: WireFormat, body: &[u8]) -> Option<Usage> {
    // Only `usage` is built; serde skips the rest of the body without allocating.
    #[derive(Deserialize)]
    struct Body {
        usage: Option<Value>,
    }
    if !matches!(format, WireFormat::OpenAi | WireFormat::Anthropic) || !is_object(body) {
        return None;
    }
    let u = serde_json::from_slice::<Body>(body).ok()?.usage.filter(Value::is_object)?;
    Some(match format {
        WireFormat::Anthropic => {
            let mut counts = AnthropicCounts::default();
            counts.update(&u);
            counts.usage()
        }
        _ => openai_usage(&u),
    })
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = hay.get(from..)?.iter().position(|&b| b == first) {
        let at = from + i;
        if hay.get(at + 1..at + needle.len()) == Some(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Derived structs also accept a JSON array (fields by position): only objects are read.
fn is_object(json: &[u8]) -> bool {
    json.get(skip_ws(json, 0)) == Some(&b'{')
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while s.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

fn skip_ws_back(s: &[u8], mut end: usize) -> usize {
    while end > 0 && s.get(end - 1).is_some_and(u8::is_ascii_whitespace) {
        end -= 1;
    }
    end
}

/// Whether `data` has a `"usage"` member whose value is not `null`. Inside a JSON string
/// every quote is escaped, so `"usage"` followed by `:` can only be a key: the events that
/// reach the JSON parser are the few that carry a usage.
fn has_usage(data: &[u8]) -> bool {
    let mut from = 0;
    while let Some(i) = data.get(from..).and_then(|d| find(d, b"\"usage\"")) {
        from += i + b"\"usage\"".len();
        let colon = skip_ws(data, from);
        if data.get(colon) == Some(&b':') {
            let value = skip_ws(data, colon + 1);
            if !data.get(value..).is_some_and(|v| v.starts_with(b"null")) {
                return true;
            }
        }
    }
    false
}

/// The byte range of a top-level `"usage":null` member (with its separating comma) in an
/// OpenAI `data:` line, when it is the object's last or first member: the shapes OpenAI
/// adds to every chunk once `include_usage` is set.
fn null_usage_member(line: &[u8]) -> Option<std::ops::Range<usize>> {
    let value = line.strip_prefix(b"data:")?;
    let start = line.len() - value.len() + usize::from(value.first() == Some(&b' '));
    let end = skip_ws_back(line, line.len());
    if line.get(start) != Some(&b'{') || end <= start + 1 || line.get(end - 1) != Some(&b'}') {
        return None;
    }
    // Last member: `,"usage":null}` (any whitespace between the tokens).
    let back = |end: usize, token: &[u8]| {
        let end = skip_ws_back(line, end);
        let from = end.checked_sub(token.len())?;
        (from > start && line.get(from..end) == Some(token)).then_some(from)
    };
    let null_end = skip_ws_back(line, end - 1);
    let last = back(null_end, b"null")
        .and_then(|at| back(at, b":"))
        .and_then(|at| back(at, b"\"usage\""))
        .and_then(|at| back(at, b","));
    if let Some(comma) = last {
        return Some(comma..null_end);
    }
    // First member: `{"usage":null,` (the comma's trailing whitespace goes too).
    let fwd = |at: usize, token: &[u8]| {
        let at = skip_ws(line, at);
        (line.get(at..at + token.len()) == Some(token)).then_some(at + token.len())
    };
    let key = skip_ws(line, start + 1);
    let after = fwd(key, b"\"usage\"")
        .and_then(|at| fwd(at, b":"))
        .and_then(|at| fwd(at, b"null"))
        .and_then(|at| fwd(at, b","))?;
    (after < end).then(|| key..skip_ws(line, after))
}

/// The Anthropic events that carry usage, by their `event:` name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EventName {
    Unnamed,
    Usage,
    Other,
}

/// Reads usage from a passthrough stream as its upstream bytes pass to the client: a
/// synchronous state machine fed one upstream read at a time.
///
/// With `strip_usage` (OpenAI only: the gateway asked for `include_usage` on the client's
/// behalf) it also takes out what that option added: the final usage-only chunk and the
/// `"usage":null` member of every other chunk. Otherwise every byte passes at once and
/// unchanged; only the incomplete last line is copied, for scanning.
pub struct UsageTap {
    format: WireFormat,
    strip: bool,
    usage: Option<Usage>,
    anthropic: AnthropicCounts,
    /// The incomplete last line: already sent, or held when stripping.
    line: Vec<u8>,
    /// The current line outgrew `MAX_SCAN`: its bytes pass unscanned until its end.
    line_skipped: bool,
    /// Stripping: the complete lines of the current event, not sent yet.
    held: Vec<u8>,
    /// Stripping: the current event is held (false once it outgrew `MAX_SCAN`).
    holding: bool,
    event: EventName,
    /// The current event's `data:` lines joined by `\n`, as the SSE parser joins them.
    data: Vec<u8>,
    has_data: bool,
    data_skipped: bool,
    /// Data events seen: about one per generated token, an estimate when usage is missing.
    events: u64,
    /// An OpenAI Responses API stream: usage is in the `response` of its last event
    /// (`response.completed`, `.incomplete`, `.failed`), the id in its first.
    responses: bool,
    /// The response id its first events carry (Responses API streams).
    response_id: Option<String>,
    /// Responses: the current line outgrew `MAX_SCAN`; `line` holds its end.
    line_tail: bool,
    /// Responses: `data` holds only the end of the event's data.
    data_tail: bool,
}

impl UsageTap {
    pub fn new(format: WireFormat, strip_usage: bool) -> UsageTap {
        let strip = strip_usage && format == WireFormat::OpenAi;
        UsageTap {
            format,
            strip,
            usage: None,
            events: 0,
            anthropic: AnthropicCounts::default(),
            line: Vec::new(),
            line_skipped: false,
            held: Vec::new(),
            holding: strip,
            event: EventName::Unnamed,
            data: Vec::new(),
            has_data: false,
            data_skipped: false,
            responses: false,
            response_id: None,
            line_tail: false,
            data_tail: false,
        }
    }

    /// A tap for an OpenAI Responses API stream (`POST /responses` with `stream: true`).
    pub fn responses() -> UsageTap {
        UsageTap { responses: true, ..UsageTap::new(WireFormat::OpenAi, false) }
    }

    /// Whether this taps a Responses API stream.
    pub fn is_responses(&self) -> bool {
        self.responses
    }

    /// The response id the stream announced (Responses API), once seen.
    pub fn response_id(&self) -> Option<&str> {
        self.response_id.as_deref()
    }

    /// The usage seen so far; `None` until the stream reported one.
    /// Data events passed so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Takes one upstream read; appends to `out` what the client gets now.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if !self.strip {
            out.extend_from_slice(chunk);
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            let Some(i) = rest.iter().position(|&b| b == b'\n') else {
                self.partial(rest, out);
                break;
            };
            let (part, tail) = rest.split_at(i + 1);
            rest = tail;
            if self.line_skipped {
                self.line_skipped = false;
                if self.strip {
                    out.extend_from_slice(part);
                }
            } else if self.line.is_empty() {
                self.complete_line(part, out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(part);
                self.complete_line(&line, out);
                line.clear();
                self.line = line;
            }
        }
    }

    /// The upstream body ended: sends what is held (an unterminated last line as it is) and
    /// reads a last event that lacked its blank line.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.strip {
            out.append(&mut self.held);
            if !self.line_skipped {
                out.extend_from_slice(&self.line);
            }
        }
        if self.line_tail {
            let line = std::mem::take(&mut self.line);
            self.data_tail_line(&line);
        } else if !self.line_skipped && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.field(trim_eol(&line));
        }
        self.dispatch();
        self.line.clear();
        self.line_skipped = false;
        self.holding = self.strip;
    }

    /// Bytes of a line whose end has not arrived yet.
    fn partial(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.line_skipped {
            if self.strip {
                out.extend_from_slice(bytes);
            }
            return;
        }
        if self.line.len() + bytes.len() <= MAX_SCAN {
            self.line.extend_from_slice(bytes);
            return;
        }
        let data_line =
            if self.line.is_empty() { bytes.starts_with(b"data:") } else { self.line.starts_with(b"data:") };
        if self.responses && (self.line_tail || data_line) {
            self.line.extend_from_slice(bytes);
            let cut = self.line.len().saturating_sub(RESPONSES_TAIL);
            self.line.drain(..cut);
            self.line_tail = true;
            return;
        }
        // Not a line worth scanning (nor holding): let it and its event through.
        self.line_skipped = true;
        self.data_skipped = true;
        if self.strip {
            self.holding = false;
            out.append(&mut self.held);
            out.extend_from_slice(&self.line);
            out.extend_from_slice(bytes);
        }
        self.line.clear();
    }

    /// The end of a Responses `data:` line too long to keep whole.
    fn data_tail_line(&mut self, line: &[u8]) {
        self.line_tail = false;
        self.data.clear();
        self.data.extend_from_slice(trim_eol(line));
        self.has_data = true;
        self.data_tail = true;
    }

    /// A whole line, `\n` included.
    fn complete_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if self.line_tail {
            // Never set when stripping (Responses streams are not stripped).
            self.data_tail_line(line);
            return;
        }
        let content = trim_eol(line);
        if content.is_empty() {
            let usage_only = self.dispatch();
            if self.strip {
                if self.holding && !usage_only {
                    out.append(&mut self.held);
                    out.extend_from_slice(line);
                } else if !self.holding {
                    out.extend_from_slice(line);
                }
                self.held.clear();
                self.holding = true;
            }
            return;
        }
        self.field(content);
        if !self.strip {
            return;
        }
        // A comment before the event starts is not part of it: it goes out now.
        let dest = if self.holding && !(content.starts_with(b":") && self.held.is_empty()) {
            &mut self.held
        } else {
            &mut *out
        };
        match null_usage_member(content) {
            Some(r) => {
                dest.extend_from_slice(line.get(..r.start).unwrap_or_default());
                dest.extend_from_slice(line.get(r.end..).unwrap_or_default());
            }
            None => dest.extend_from_slice(line),
        }
        if self.holding && self.held.len() > MAX_SCAN {
            self.holding = false;
            out.append(&mut self.held);
        }
    }

    /// One non-blank line of the current event, without its line ending.
    fn field(&mut self, content: &[u8]) {
        if content.starts_with(b":") {
            return;
        }
        let (name, value) = match content.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = content.get(i + 1..).unwrap_or_default();
                (content.get(..i).unwrap_or_default(), v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (content, &b""[..]),
        };
        match name {
            b"event" => {
                self.event = match value {
                    b"message_start" | b"message_delta" => EventName::Usage,
                    _ => EventName::Other,
                }
            }
            b"data" => {
                if self.data.len() + value.len() + 1 > MAX_SCAN {
                    self.data_skipped = true;
                    self.data.clear();
                } else if !self.data_skipped {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                }
                self.has_data = true;
            }
            _ => {}
        }
    }

    /// The current event ended: records its usage and starts the next. True when it was
    /// the usage-only chunk the client did not ask for.
    fn dispatch(&mut self) -> bool {
        let wanted = self.has_data
            && !self.data_skipped
            && (self.format == WireFormat::OpenAi || self.event != EventName::Other)
            && is_object(&self.data)
            && has_usage(&self.data);
        // The id is in the stream's first event (`response.created`); a few are looked at.
        if self.responses
            && self.response_id.is_none()
            && self.events < 4
            && self.has_data
            && !self.data_skipped
        {
            self.response_id = response_id(&self.data);
        }
        let usage_only = wanted && self.scan();
        if self.data_tail {
            if let Some(u) = last_usage(&self.data) {
                self.usage = Some(openai_usage(&u));
            }
            self.data_tail = false;
        }
        self.events += u64::from(self.has_data);
        self.event = EventName::Unnamed;
        self.data.clear();
        self.has_data = false;
        self.data_skipped = false;
        usage_only && self.strip
    }

    fn scan(&mut self) -> bool {
        match self.format {
            WireFormat::OpenAi if self.responses => {
                #[derive(Deserialize)]
                struct Response {
                    usage: Option<Value>,
                }
                #[derive(Deserialize)]
                struct Event {
                    response: Option<Response>,
                }
                let Ok(e) = serde_json::from_slice::<Event>(&self.data) else { return false };
                if let Some(u) = e.response.and_then(|r| r.usage).filter(Value::is_object) {
                    self.usage = Some(openai_usage(&u));
                }
                false
            }
            WireFormat::OpenAi => {
                #[derive(Deserialize)]
                struct Chunk<'a> {
                    #[serde(borrow)]
                    choices: Option<&'a RawValue>,
                    usage: Option<Value>,
                }
                let Ok(c) = serde_json::from_slice::<Chunk>(&self.data) else { return false };
                let Some(u) = c.usage.filter(Value::is_object) else { return false };
                self.usage = Some(openai_usage(&u));
                c.choices.is_some_and(|c| {
                    let inner = c.get().trim();
                    inner
                        .strip_prefix('[')
                        .and_then(|s| s.strip_suffix(']'))
                        .is_some_and(|s| s.trim().is_empty())
                })
            }
            WireFormat::Anthropic => {
                #[derive(Deserialize)]
                struct Message {
                    usage: Option<Value>,
                }
                #[derive(Deserialize)]
                struct Event {
                    #[serde(rename = "type")]
                    kind: Option<String>,
                    message: Option<Message>,
                    usage: Option<Value>,
                }
                let Ok(e) = serde_json::from_slice::<Event>(&self.data) else { return false };
                // The data's own `type` decides, as in the Anthropic stream decoder.
                let u = match e.kind.as_deref() {
                    Some("message_start") => e.message.and_then(|m| m.usage),
                    Some("message_delta") => e.usage,
                    Some(_) => None,
                    None if self.event == EventName::Usage => e.message.and_then(|m| m.usage).or(e.usage),
                    None => None,
                };
                if let Some(u) = u.filter(Value::is_object) {
                    self.anthropic.update(&u);
                    self.usage = Some(self.anthropic.usage());
                }
                false
            }
            _ => false,
        }
    }
}

/// The value of the last `"usage": {…}` member in the end of a JSON text. A `"usage":
/// null` met first means the response has none (an earlier object belongs to something
/// else, a tool's schema); other values (a caller's metadata string) are passed over.
fn last_usage(tail: &[u8]) -> Option<Value> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        let colon = skip_ws(tail, at + KEY.len());
        if tail.get(colon) == Some(&b':') {
            let value = skip_ws(tail, colon + 1);
            match tail.get(value) {
                Some(b'{') => {
                    let mut values =
                        serde_json::Deserializer::from_slice(&tail[value..]).into_iter::<Value>();
                    if let Some(Ok(v)) = values.next() {
                        return Some(v);
                    }
                }
                Some(b'n') => return None,
                _ => {}
            }
        }
        end = at;
    }
    None
}

/// What the gateway reads of a whole Responses API answer, in one pass.
#[derive(Debug, Default, PartialEq)]
pub struct ResponseRead {
    pub id: Option<String>,
    pub usage: Option<Usage>,
    /// `queued` or `in_progress`: a background response that has not run yet.
    pub background_started: bool,
}

/// A whole Responses API body: its id, its usage, whether it started in the background.
pub fn read_response(body: &[u8]) -> ResponseRead {
    #[derive(Deserialize)]
    struct Body<'a> {
        id: Option<String>,
        #[serde(borrow)]
        status: Option<std::borrow::Cow<'a, str>>,
        usage: Option<Value>,
    }
    if !is_object(body) {
        return ResponseRead::default();
    }
    let Ok(b) = serde_json::from_slice::<Body>(body) else { return ResponseRead::default() };
    ResponseRead {
        id: b.id.filter(|id| !id.is_empty()),
        usage: b.usage.filter(Value::is_object).map(|u| openai_usage(&u)),
        background_started: matches!(b.status.as_deref(), Some("queued" | "in_progress")),
    }
}

/// `response.id` of a Responses API stream event, or `id` of a whole response body.
pub fn response_id(json: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Response {
        id: Option<String>,
    }
    #[derive(Deserialize)]
    struct Event {
        id: Option<String>,
        response: Option<Response>,
    }
    if !is_object(json) {
        return None;
    }
    let e = serde_json::from_slice::<Event>(json).ok()?;
    e.response.and_then(|r| r.id).or(e.id).filter(|id| !id.is_empty())
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Usage {
        Usage { input, output, cache_read, cache_write, reasoning: 0 }
    }

    /// Feeds `chunks`, checking that a tap that does not strip never holds bytes back.
    fn run(format: WireFormat, strip: bool, chunks: &[&[u8]]) -> (Vec<u8>, Option<Usage>) {
        let mut tap = UsageTap::new(format, strip);
        let mut out = Vec::new();
        for c in chunks {
            let before = out.len();
            tap.feed(c, &mut out);
            if !strip || format != WireFormat::OpenAi {
                assert_eq!(&out[before..], *c);
            }
        }
        tap.finish(&mut out);
        (out, tap.usage())
    }

    /// Every split of `input` into two chunks, and a sample of three-chunk splits.
    fn splits(input: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut all: Vec<Vec<&[u8]>> = (0..=input.len()).map(|i| vec![&input[..i], &input[i..]]).collect();
        for i in (0..=input.len()).step_by(17) {
            for j in (i..=input.len()).step_by(29) {
                all.push(vec![&input[..i], &input[i..j], &input[j..]]);
            }
        }
        all.push(input.chunks(1).collect());
        all
    }

    /// What the client would have received without `include_usage`, built line by line:
    /// no usage-only event, no trailing `"usage":null` member.
    fn without_usage(stream: &str) -> String {
        let mut out = String::new();
        let mut event = String::new();
        for line in stream.split_inclusive('\n') {
            event.push_str(line);
            if line.trim_end_matches(['\r', '\n']).is_empty() {
                if !(event.contains(r#""choices":[]"#) && event.contains(r#""usage":{"#)) {
                    out.push_str(&event.replace(r#","usage":null}"#, "}"));
                }
                event.clear();
            }
        }
        out + &event
    }

    fn assert_stream(format: WireFormat, strip: bool, input: &[u8], expected: &[u8], want: Option<Usage>) {
        for chunks in splits(input) {
            let (out, got) = run(format, strip, &chunks);
            let at: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(expected), "chunks {at:?}");
            assert_eq!(got, want, "chunks {at:?}");
        }
    }

    #[test]
    fn responses_streams_give_their_id_and_the_completed_usage() {
        let stream = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_9\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\" hi\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_9\",\"usage\":{\"input_tokens\":12,",
            "\"input_tokens_details\":{\"cached_tokens\":4},\"output_tokens\":7,",
            "\"output_tokens_details\":{\"reasoning_tokens\":2},\"total_tokens\":19}}}\n\n",
        );
        // Fed in awkward pieces: the bytes pass unchanged all the same.
        let mut tap = UsageTap::responses();
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(7) {
            tap.feed(piece, &mut out);
        }
        tap.finish(&mut out);
        assert_eq!(out, stream.as_bytes());
        assert_eq!(tap.response_id(), Some("resp_9"));
        assert_eq!(
            tap.usage(),
            Some(Usage { input: 12, output: 7, cache_read: 4, cache_write: 0, reasoning: 2 })
        );
        // A completed event too long to scan whole (2 MiB of output): its end has the usage.
        let big = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"text\":\"{}\"}}],\"usage\":{{\"input_tokens\":5,\"output_tokens\":600000}},\"metadata\":{{}}}}}}\n\n",
            "x".repeat(2 << 20)
        );
        let mut tap = UsageTap::responses();
        let mut out = Vec::new();
        for piece in big.as_bytes().chunks(16 * 1024) {
            tap.feed(piece, &mut out);
        }
        tap.finish(&mut out);
        assert_eq!(out.len(), big.len());
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((5, 600_000)));
        // A whole Responses body is read the same way.
        let body = br#"{"id":"resp_9","object":"response","usage":{"input_tokens":3,"output_tokens":5}}"#;
        assert_eq!(from_body(WireFormat::OpenAi, body).map(|u| (u.input, u.output)), Some((3, 5)));
        assert_eq!(response_id(body).as_deref(), Some("resp_9"));
        let read = read_response(body);
        assert_eq!(
            (read.id.as_deref(), read.usage.map(|u| u.output), read.background_started),
            (Some("resp_9"), Some(5), false)
        );
        let queued = read_response(br#"{"id":"resp_q","status":"queued","usage":null}"#);
        assert_eq!((queued.usage, queued.background_started), (None, true));
    }

    #[test]
    fn from_body_reads_fixtures() {
        let openai = fixture("openai/chat_completion.json");
        assert_eq!(from_body(WireFormat::OpenAi, &openai), Some(usage(19, 10, 0, 0)));
        for (file, want) in [
            ("anthropic/message.json", usage(12, 12, 0, 0)),
            ("anthropic/message_thinking.json", usage(46, 71, 0, 0)),
            ("anthropic/message_tool_use.json", usage(384, 84, 0, 0)),
        ] {
            assert_eq!(from_body(WireFormat::Anthropic, &fixture(file)), Some(want), "{file}");
        }
        // The format decides how the object is read; other formats have no passthrough.
        assert_eq!(from_body(WireFormat::Gemini, &openai), None);
        assert_eq!(from_body(WireFormat::Bedrock, &openai), None);
        assert_eq!(from_body(WireFormat::OpenAi, &fixture("openai/error_429.json")), None);
        assert_eq!(from_body(WireFormat::Anthropic, &fixture("anthropic/error_529.json")), None);
    }

    #[test]
    fn from_body_cache_reasoning_embeddings_and_junk() {
        let oa = br#"{"id":"x","choices":[{"message":{"content":"usage"}}],"usage":{"prompt_tokens":100,"completion_tokens":50,"prompt_tokens_details":{"cached_tokens":60},"completion_tokens_details":{"reasoning_tokens":20}}}"#;
        assert_eq!(
            from_body(WireFormat::OpenAi, oa),
            Some(Usage { input: 100, output: 50, cache_read: 60, cache_write: 0, reasoning: 20 })
        );
        let emb = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(from_body(WireFormat::OpenAi, emb), Some(usage(8, 0, 0, 0)));
        let an = br#"{"type":"message","content":[],"usage":{"input_tokens":10,"cache_creation_input_tokens":20,"cache_read_input_tokens":100,"output_tokens":5}}"#;
        assert_eq!(from_body(WireFormat::Anthropic, an), Some(usage(130, 5, 100, 20)));
        // Null counts and details read as zero, as in the decoders.
        let nulls = br#"{"usage":{"prompt_tokens":3,"completion_tokens":null,"prompt_tokens_details":null}}"#;
        assert_eq!(from_body(WireFormat::OpenAi, nulls), Some(usage(3, 0, 0, 0)));
        for body in [
            &br#"{"id":"x","choices":[]}"#[..],
            br#"{"usage":null}"#,
            br#"{"usage":7}"#,
            br#"[{"usage":{"prompt_tokens":1}}]"#,
            br#"{"usage":{"prompt_tokens":1}"#,
            b"",
            b"\xff\xfe\x00garbage",
            b"data: {}\n\n",
        ] {
            assert_eq!(from_body(WireFormat::OpenAi, body), None, "{}", String::from_utf8_lossy(body));
            assert_eq!(from_body(WireFormat::Anthropic, body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn openai_stream_passes_through_unchanged() {
        let input = fixture("openai/chat_completion_stream.txt");
        assert_stream(WireFormat::OpenAi, false, &input, &input, Some(usage(19, 9, 0, 0)));
        let tools = fixture("openai/chat_completion_tool_stream.txt");
        assert_stream(WireFormat::OpenAi, false, &tools, &tools, Some(usage(85, 40, 64, 0)));
    }

    #[test]
    fn openai_stream_strips_what_the_gateway_asked_for() {
        for (file, want) in [
            ("openai/chat_completion_stream.txt", usage(19, 9, 0, 0)),
            ("openai/chat_completion_tool_stream.txt", usage(85, 40, 64, 0)),
        ] {
            let input = fixture(file);
            let expected = without_usage(std::str::from_utf8(&input).unwrap());
            // The independent construction did remove something, and kept the rest.
            assert!(!expected.contains("usage"), "{file}");
            assert!(expected.ends_with("data: [DONE]\n\n"), "{file}");
            assert_eq!(
                expected.matches("\n\n").count() + 1,
                input.windows(2).filter(|w| w == b"\n\n").count()
            );
            assert_stream(WireFormat::OpenAi, true, &input, expected.as_bytes(), Some(want));
        }
    }

    #[test]
    fn crlf_streams() {
        let lf = String::from_utf8(fixture("openai/chat_completion_stream.txt")).unwrap();
        let crlf = lf.replace('\n', "\r\n");
        let want = Some(usage(19, 9, 0, 0));
        assert_stream(WireFormat::OpenAi, false, crlf.as_bytes(), crlf.as_bytes(), want);
        let expected = without_usage(&lf).replace('\n', "\r\n");
        assert_eq!(expected, without_usage(&crlf));
        assert_stream(WireFormat::OpenAi, true, crlf.as_bytes(), expected.as_bytes(), want);
        let an = String::from_utf8(fixture("anthropic/message_stream.txt")).unwrap().replace('\n', "\r\n");
        assert_stream(WireFormat::Anthropic, false, an.as_bytes(), an.as_bytes(), Some(usage(12, 12, 0, 0)));
    }

    #[test]
    fn anthropic_streams_pass_through_with_usage() {
        for (file, want) in [
            ("anthropic/message_stream.txt", usage(12, 12, 0, 0)),
            ("anthropic/message_thinking_stream.txt", usage(46, 71, 0, 0)),
            ("anthropic/message_tool_use_stream.txt", usage(384, 84, 0, 0)),
        ] {
            let input = fixture(file);
            assert_stream(WireFormat::Anthropic, false, &input, &input, Some(want));
            // Stripping is an OpenAI matter: an Anthropic tap never holds bytes back.
            assert_stream(WireFormat::Anthropic, true, &input, &input, Some(want));
        }
    }

    #[test]
    fn anthropic_latest_value_of_each_field_wins() {
        let input = concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"id":"m","content":[],"usage":{"input_tokens":5,"cache_creation_input_tokens":7,"cache_read_input_tokens":100,"output_tokens":1}}}"#,
            "\n\n",
            "event: content_block_delta\n",
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"usage"}}"#,
            "\n\n",
            "event: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":12}}"#,
            "\n\n",
            "event: message_delta\n",
            r#"data: {"type":"message_delta","delta":{},"usage":{"input_tokens":6,"cache_read_input_tokens":90,"output_tokens":30}}"#,
            "\n\n",
            "event: message_stop\n",
            r#"data: {"type":"message_stop"}"#,
            "\n\n",
        );
        let want = Some(usage(6 + 7 + 90, 30, 90, 7));
        assert_stream(WireFormat::Anthropic, false, input.as_bytes(), input.as_bytes(), want);
        // Only message_start and message_delta count, by name or by their own `type`.
        let fake = concat!(
            "event: content_block_delta\n",
            r#"data: {"type":"message_delta","usage":{"output_tokens":99}}"#,
            "\n\n",
            r#"data: {"type":"content_block_delta","usage":{"output_tokens":98}}"#,
            "\n\n",
            r#"data: {"type":"message_delta","usage":{"output_tokens":4}}"#,
            "\n\n",
        );
        let (out, got) = run(WireFormat::Anthropic, false, &[fake.as_bytes()]);
        assert_eq!(out, fake.as_bytes());
        assert_eq!(got, Some(usage(0, 4, 0, 0)));
    }

    #[test]
    fn comments_usage_in_strings_and_other_member_shapes() {
        let input = concat!(
            ": keep-alive\n\n",
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"usage"},"finish_reason":null}],"usage":null}"#,
            "\n\n",
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"a \"usage\":{\"prompt_tokens\":5} ,\"usage\":null}"},"finish_reason":null}],"usage":null}"#,
            "\n\n",
            ": note\n",
            r#"data: {"id":"c", "choices":[{"index":0,"delta":{},"finish_reason":"stop"}], "usage": null }"#,
            "\n\n",
            r#"data: {"usage":null,"id":"c","choices":[]}"#,
            "\n\n",
            r#"data: { "usage" : null , "id":"c","choices":[]}"#,
            "\n\n",
            ": before usage\n",
            r#"data: {"id":"c","choices": [ ],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
            "\n\n",
            "data: [DONE]\n\n",
        );
        let expected = concat!(
            ": keep-alive\n\n",
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"usage"},"finish_reason":null}]}"#,
            "\n\n",
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"a \"usage\":{\"prompt_tokens\":5} ,\"usage\":null}"},"finish_reason":null}]}"#,
            "\n\n",
            ": note\n",
            r#"data: {"id":"c", "choices":[{"index":0,"delta":{},"finish_reason":"stop"}] }"#,
            "\n\n",
            r#"data: {"id":"c","choices":[]}"#,
            "\n\n",
            r#"data: { "id":"c","choices":[]}"#,
            "\n\n",
            ": before usage\n",
            "data: [DONE]\n\n",
        );
        let want = Some(usage(7, 3, 0, 0));
        assert_stream(WireFormat::OpenAi, false, input.as_bytes(), input.as_bytes(), want);
        assert_stream(WireFormat::OpenAi, true, input.as_bytes(), expected.as_bytes(), want);
    }

    #[test]
    fn strip_keeps_chunks_that_carry_choices_or_null_usage() {
        // Azure's prompt-filter chunk has no choices but no usage either; a vendor that
        // reports usage on its last choice chunk keeps it (only the usage chunk is OpenAI's).
        let input = concat!(
            r#"data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}],"usage":null}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#,
            "\n\n",
            "data: [DONE]\n\n",
        );
        let expected = input.replacen(r#","usage":null"#, "", 1);
        assert_stream(
            WireFormat::OpenAi,
            true,
            input.as_bytes(),
            expected.as_bytes(),
            Some(usage(2, 1, 0, 0)),
        );
    }

    #[test]
    fn strip_holds_only_the_incomplete_event() {
        let input = fixture("openai/chat_completion_stream.txt");
        let first_end = input.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let mut tap = UsageTap::new(WireFormat::OpenAi, true);
        let mut out = Vec::new();
        tap.feed(&input[..first_end + 20], &mut out);
        let expected = without_usage(std::str::from_utf8(&input[..first_end]).unwrap());
        assert_eq!(out, expected.as_bytes());
        assert_eq!(tap.usage(), None);
    }

    #[test]
    fn unterminated_tail_is_flushed_as_is() {
        for (input, expected) in [
            ("data: [DONE]\n", "data: [DONE]\n"),
            ("data: [DONE]", "data: [DONE]"),
            (r#"data: {"choices":[],"usage":null}"#, r#"data: {"choices":[],"usage":null}"#),
            (
                "data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":null}\r",
                "data: {\"choices\":[]}\n\ndata: {\"choices\":[],\"usage\":null}\r",
            ),
        ] {
            assert_stream(WireFormat::OpenAi, true, input.as_bytes(), expected.as_bytes(), None);
            assert_stream(WireFormat::OpenAi, false, input.as_bytes(), input.as_bytes(), None);
        }
        // A usage event that lacked its blank line still counts.
        let tail = br#"data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
        assert_stream(WireFormat::OpenAi, true, tail, tail, Some(usage(4, 2, 0, 0)));
    }

    #[test]
    fn junk_never_panics_and_huge_lines_pass() {
        // Deterministic pseudo-random bytes, with SSE-looking pieces mixed in.
        let mut junk = Vec::new();
        let mut x: u32 = 12345;
        for i in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            junk.push((x >> 16) as u8);
            if i % 997 == 0 {
                junk.extend_from_slice(b"\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":\xff");
            }
            if i % 1999 == 0 {
                junk.extend_from_slice(b"\n\nevent: message_delta\ndata: {\"usage\":[}\n\n");
            }
        }
        for format in [WireFormat::OpenAi, WireFormat::Anthropic, WireFormat::Gemini] {
            for strip in [false, true] {
                for size in [1, 7, 4096] {
                    let chunks: Vec<&[u8]> = junk.chunks(size).collect();
                    // Nothing in it is a usage chunk or a `"usage":null` member.
                    let (out, _) = run(format, strip, &chunks);
                    assert_eq!(out, junk);
                }
            }
        }

        // A line beyond the scan limit passes unscanned; the stream is read again after it.
        let mut big = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1},\"x\":\"".to_vec();
        big.resize(big.len() + 3 * MAX_SCAN / 2, b'a');
        big.extend_from_slice(b"\"}\n\n");
        let after = b"data: {\"choices\":[{}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9}}\n\n";
        let input = [&big[..], after].concat();
        let expected = [&big[..], b"data: {\"choices\":[{}]}\n\n"].concat();
        for strip in [false, true] {
            for size in [1000, 65536, input.len()] {
                let chunks: Vec<&[u8]> = input.chunks(size).collect();
                let (out, got) = run(WireFormat::OpenAi, strip, &chunks);
                assert!(out == *if strip { &expected } else { &input }, "strip {strip} size {size}");
                assert_eq!(got, Some(usage(9, 0, 0, 0)));
            }
        }
        // Many lines in one event: the held event is let go once it outgrows the limit.
        let mut long_event = Vec::new();
        while long_event.len() <= MAX_SCAN + 100 {
            long_event.extend_from_slice(b"data: 0123456789012345678901234567890123456789\n");
        }
        long_event.extend_from_slice(b"\n");
        let (out, _) = run(WireFormat::OpenAi, true, &long_event.chunks(4096).collect::<Vec<_>>());
        assert_eq!(out, long_event);
        let mut tap = UsageTap::new(WireFormat::OpenAi, true);
        let mut out = Vec::new();
        tap.feed(&long_event[..long_event.len() - 1], &mut out);
        assert!(out.len() > MAX_SCAN, "a huge event is not held whole");
    }

    #[test]
    fn null_usage_member_shapes() {
        let cut = |s: &str| {
            let r = null_usage_member(s.as_bytes())?;
            Some(format!("{}{}", &s[..r.start], &s[r.end..]))
        };
        assert_eq!(cut(r#"data: {"a":1,"usage":null}"#).as_deref(), Some(r#"data: {"a":1}"#));
        assert_eq!(cut(r#"data:{"a":1 , "usage" : null } "#).as_deref(), Some(r#"data:{"a":1  } "#));
        assert_eq!(cut(r#"data: {"usage":null,"a":1}"#).as_deref(), Some(r#"data: {"a":1}"#));
        assert_eq!(cut(r#"data: {"usage": null,  "a":1}"#).as_deref(), Some(r#"data: {"a":1}"#));
        for keep in [
            r#"data: {"usage":null}"#,
            r#"data: {"a":{"b":1,"usage":null},"c":2}"#,
            r#"data: {"a":"x\",\"usage\":null}"#,
            r#"data: {"a":1,"usage":{}}"#,
            r#"event: {"a":1,"usage":null}"#,
            r#"data: {"a":1,"usage":nul}"#,
            "data: }",
            "data: {",
            "data:",
            "",
        ] {
            assert_eq!(cut(keep), None, "{keep}");
        }
    }
}
