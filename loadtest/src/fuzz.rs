//! An HTTP-level fuzz run over a live gateway: hostile requests (malformed request lines,
//! conflicting lengths, chunked-encoding edge cases, oversize and very many headers, bad
//! bytes in headers and JSON, deep JSON, huge numbers, duplicate keys, `mlx:*` extensions
//! of the wrong type, extreme sizes, truncated bodies, abrupt closes) to both surfaces and
//! the management listener, interleaved with good requests.
//!
//! Every hostile request must get a well-formed answer (an error in the format of the
//! surface it was sent to) or a clean close within [`Run::bound`]; every good request must
//! succeed. Each request runs on its own connection, so one case cannot hide another's
//! outcome. Cases are drawn from a seeded generator: a run is reproducible from its seed,
//! and each failure names its case and index.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where the gateway is and what it accepts.
#[derive(Clone, Debug)]
pub struct Target {
    pub proxy: SocketAddr,
    pub manage: SocketAddr,
    /// A project key.
    pub key: String,
    /// A management key.
    pub admin_key: String,
    /// A model the proxy answers on both surfaces (e.g. `@fast`).
    pub model: String,
}

/// One fuzz run's parameters.
#[derive(Clone, Debug)]
pub struct Run {
    pub seed: u64,
    /// Stop after this many requests (hostile and good)…
    pub requests: u64,
    /// …or after this long, whichever comes first.
    pub duration: Duration,
    pub concurrency: usize,
    /// One good request after every this many hostile ones.
    pub good_every: u64,
    /// The longest any request may go unanswered and unclosed.
    pub bound: Duration,
    /// The gateway's pid, for its RSS (Linux `/proc`); `None` in process.
    pub pid: Option<u32>,
}

/// What a run saw.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub requests: u64,
    pub hostile: u64,
    pub good: u64,
    pub seconds: f64,
    /// Hostile outcomes: `answered_4xx`, `answered_5xx`, `answered_2xx` (a request the
    /// gateway may take, e.g. a huge `max_tokens` the upstream judges), `closed`, `reset`,
    /// `client_aborted` (the case closed the connection itself).
    pub outcomes: BTreeMap<String, u64>,
    /// Requests per case name.
    pub cases: BTreeMap<String, u64>,
    pub failures: u64,
    /// The first failures, with the case and its index (reproducible from the seed).
    pub failure_samples: Vec<String>,
    pub slowest_ms: u64,
    /// RSS in KiB after the first tenth of the run, and at the end.
    pub rss_kib_start: Option<u64>,
    pub rss_kib_end: Option<u64>,
    pub rss_kib_max: Option<u64>,
}

impl Report {
    /// RSS at the end over RSS after warm-up, when measured.
    pub fn rss_growth(&self) -> Option<f64> {
        Some(self.rss_kib_end? as f64 / self.rss_kib_start? as f64 - 1.0)
    }
}

/// A small deterministic generator (xorshift64*): cases are reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Surface {
    OpenAi,
    Anthropic,
    Manage,
    /// The head does not parse: any surface's error, or pingora's bare 400, or a close.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// An error answer (4xx/5xx) or a close.
    Error,
    /// Any well-formed answer, or a close: the gateway may take the request (a huge
    /// `max_tokens` is the upstream's to judge).
    Any,
    /// A good request: a 2xx answer.
    Success,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum After {
    /// Wait for the answer.
    Read,
    /// Half-close (FIN) after writing, then wait for the answer.
    ShutdownWrite,
    /// Reset the connection right after writing; nothing to check but the gateway's health.
    Reset,
}

struct Case {
    name: &'static str,
    manage: bool,
    bytes: Vec<u8>,
    after: After,
    surface: Surface,
    expect: Expect,
}

const CHAT: &str = "/openai/v1/chat/completions";
const MESSAGES: &str = "/anthropic/v1/messages";

fn http(method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: fuzz\r\n").into_bytes();
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

impl Target {
    fn auth(&self) -> (&'static str, String) {
        ("authorization", format!("Bearer {}", self.key))
    }

    fn json_post(&self, path: &str, body: &[u8]) -> Vec<u8> {
        http(
            "POST",
            path,
            &[
                self.auth(),
                ("content-type", "application/json".into()),
                ("content-length", body.len().to_string()),
            ],
            body,
        )
    }

    fn chat_json(&self) -> String {
        format!(
            r#"{{"model":"{}","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}]}}"#,
            self.model
        )
    }

    fn good(&self, rng: &mut Rng) -> Case {
        let (name, manage, bytes, surface) = match rng.below(3) {
            0 => (
                "good_openai_chat",
                false,
                self.json_post(CHAT, self.chat_json().as_bytes()),
                Surface::OpenAi,
            ),
            1 => (
                "good_anthropic_messages",
                false,
                self.json_post(MESSAGES, self.chat_json().as_bytes()),
                Surface::Anthropic,
            ),
            _ => (
                "good_manage_list",
                true,
                http(
                    "GET",
                    "/manage/v1/projects",
                    &[("authorization", format!("Bearer {}", self.admin_key))],
                    b"",
                ),
                Surface::Manage,
            ),
        };
        Case { name, manage, bytes, after: After::Read, surface, expect: Expect::Success }
    }

    /// One hostile request, drawn by `rng`.
    fn hostile(&self, rng: &mut Rng) -> Case {
        let proxy = |name, bytes, surface, expect| Case {
            name,
            manage: false,
            bytes,
            after: After::Read,
            surface,
            expect,
        };
        let chat = self.chat_json();
        let path = if rng.below(2) == 0 { CHAT } else { MESSAGES };
        let surface = if path == CHAT { Surface::OpenAi } else { Surface::Anthropic };
        match rng.below(15) {
            0 => {
                let long_uri =
                    format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)).into_bytes();
                let random: Vec<u8> = (0..1 + rng.below(512)).map(|_| rng.next() as u8).collect();
                let lines: [Vec<u8>; 9] = [
                    b"GARBAGE\r\n\r\n".to_vec(),
                    format!("POST {CHAT} HTTP/9.9\r\nhost: x\r\n\r\n").into_bytes(),
                    b"POST\r\n\r\n".to_vec(),
                    b" / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
                    b"PO\0ST / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
                    format!("POST {CHAT}\r\n\r\n").into_bytes(),
                    b"\r\n\r\n\r\n\r\n".to_vec(),
                    long_uri,
                    random,
                ];
                proxy("malformed_request_line", rng.pick(&lines).clone(), Surface::Unknown, Expect::Error)
            }
            1 => {
                let body = chat.as_bytes();
                let n = body.len();
                let variants: [(Vec<(&str, String)>, Expect); 6] = [
                    (
                        vec![("content-length", n.to_string()), ("content-length", (n + 7).to_string())],
                        Expect::Error,
                    ),
                    (vec![("content-length", format!("{n}, {}", n + 1))], Expect::Error),
                    (vec![("content-length", "-5".into())], Expect::Error),
                    (vec![("content-length", "1e3".into())], Expect::Error),
                    (vec![("content-length", "99999999999999999999999".into())], Expect::Error),
                    (vec![("content-length", n.to_string()), ("content-length", n.to_string())], Expect::Any),
                ];
                let (lengths, expect) = rng.pick(&variants);
                let mut headers = vec![self.auth(), ("content-type", "application/json".into())];
                headers.extend(lengths.iter().cloned());
                // A length the HTTP layer cannot frame by is refused there (pingora's bare
                // 400 and a close), before any surface reads the request.
                let surf = if *expect == Expect::Error { Surface::Unknown } else { surface };
                proxy("conflicting_lengths", http("POST", path, &headers, body), surf, *expect)
            }
            2 => {
                let body = chat.as_bytes();
                let hex = format!("{:x}", body.len());
                let chunked = |te: &str, framed: Vec<u8>, expect| {
                    let headers = vec![
                        self.auth(),
                        ("content-type", "application/json".into()),
                        ("transfer-encoding", te.to_string()),
                    ];
                    proxy("chunked_edge_cases", http("POST", path, &headers, &framed), surface, expect)
                };
                let split = body.len() / 2;
                let mut two = format!("{:x}\r\n", split).into_bytes();
                two.extend_from_slice(&body[..split]);
                two.extend_from_slice(format!("\r\n{:x};ext=1\r\n", body.len() - split).as_bytes());
                two.extend_from_slice(&body[split..]);
                two.extend_from_slice(b"\r\n0\r\nx-trailer: 1\r\n\r\n");
                let mut plain = format!("{hex}\r\n").into_bytes();
                plain.extend_from_slice(body);
                plain.extend_from_slice(b"\r\n0\r\n\r\n");
                let mut cl_and_te = http(
                    "POST",
                    path,
                    &[self.auth(), ("content-length", "5".into()), ("transfer-encoding", "chunked".into())],
                    b"",
                );
                cl_and_te.extend_from_slice(&plain);
                match rng.below(7) {
                    0 => chunked("chunked", two, Expect::Any),
                    1 => chunked("chunked", b"zz\r\nabc\r\n0\r\n\r\n".to_vec(), Expect::Error),
                    2 => chunked(
                        "chunked",
                        b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n".to_vec(),
                        Expect::Error,
                    ),
                    3 => chunked("chunked", format!("{hex}\r\n{chat}").into_bytes(), Expect::Error),
                    4 => chunked("gzip, chunked", plain, Expect::Error),
                    // RFC 9112 §6.3 lets the server go by Transfer-Encoding alone (pingora
                    // drops the Content-Length), then close.
                    5 => proxy("chunked_edge_cases", cl_and_te, surface, Expect::Any),
                    _ => {
                        let mut c = chunked("chunked", b"400\r\n{\"model\":".to_vec(), Expect::Error);
                        c.after = After::ShutdownWrite;
                        c
                    }
                }
            }
            3 => {
                let base = |extra: Vec<(&'static str, String)>| {
                    let mut headers = vec![
                        self.auth(),
                        ("content-type", "application/json".into()),
                        ("content-length", chat.len().to_string()),
                    ];
                    headers.extend(extra);
                    http("POST", path, &headers, chat.as_bytes())
                };
                match rng.below(4) {
                    0 => proxy(
                        "oversize_headers",
                        base(vec![("x-big", "b".repeat(100_000))]),
                        surface,
                        Expect::Any,
                    ),
                    1 => proxy(
                        "oversize_headers",
                        base(vec![("x-huge", "h".repeat(1_100_000))]),
                        Surface::Unknown,
                        Expect::Error,
                    ),
                    2 => {
                        let many = (0..300)
                            .map(|i| (Box::leak(format!("x-h{i}").into_boxed_str()) as &str, "v".to_string()))
                            .collect();
                        proxy("very_many_headers", base(many), Surface::Unknown, Expect::Error)
                    }
                    _ => proxy(
                        "oversize_headers",
                        base(vec![("bad name", "v".into())]),
                        Surface::Unknown,
                        Expect::Error,
                    ),
                }
            }
            4 => {
                let mut raw = self.json_post(path, chat.as_bytes());
                let (at, insert, surf, expect): (&str, &[u8], Surface, Expect) = match rng.below(4) {
                    0 => ("host: fuzz\r\n", b"x-nul: a\0b\r\n", Surface::Unknown, Expect::Error),
                    1 => ("host: fuzz\r\n", b"x-modelux-user-id: \xff\xfe\xfd\r\n", surface, Expect::Any),
                    2 => (
                        "host: fuzz\r\n",
                        b"x-modelux-user-tags: team=\xc3\x28,a=b\r\n",
                        surface,
                        Expect::Any,
                    ),
                    _ => ("host: fuzz\r\n", b"x-modelux-trace-id: \x80\x81\r\n", surface, Expect::Any),
                };
                if let Some(pos) = raw.windows(at.len()).position(|w| w == at.as_bytes()) {
                    let end = pos + at.len();
                    raw.splice(end..end, insert.iter().copied());
                }
                proxy("bad_bytes_in_headers", raw, surf, expect)
            }
            5 => {
                let m = &self.model;
                let deep_array =
                    format!(r#"{{"model":"{m}","messages":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
                let deep_object = format!(
                    r#"{{"model":"{m}","messages":[],"metadata":{}1{}}}"#,
                    r#"{"a":"#.repeat(100_000),
                    "}".repeat(100_000)
                );
                let bodies: [(Vec<u8>, Expect); 10] = [
                    // Valid JSON, forwarded as sent on the same-format route (the gateway
                    // never recurses into it); the upstream judges it.
                    (deep_array.into_bytes(), Expect::Any),
                    (deep_object.into_bytes(), Expect::Any),
                    (format!(r#"{{"model":"{m}","messages":[{{"role":"user","content":"\ud800"}}]}}"#).into_bytes(), Expect::Any),
                    ([format!(r#"{{"model":"{m}","messages":[{{"role":"user","content":""#).as_bytes(), b"\xff\xfe", b"\"}]}"].concat(), Expect::Error),
                    ([format!(r#"{{"model":"{m}","messages":[{{"role":"user","content":""#).as_bytes(), b"a\0b", b"\"}]}"].concat(), Expect::Error),
                    // Beyond f64: refused where the gateway reads it (a translation), else
                    // forwarded as sent.
                    (format!(r#"{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}],"temperature":1e400}}"#).into_bytes(), Expect::Any),
                    (format!(r#"{{"model":"{m}","model":"other","messages":[]}}"#).into_bytes(), Expect::Error),
                    (chat.as_bytes()[..chat.len() / 2].to_vec(), Expect::Error),
                    (b"[1,2,3]".to_vec(), Expect::Error),
                    (b"".to_vec(), Expect::Error),
                ];
                let (body, expect) = rng.pick(&bodies);
                proxy("bad_json", self.json_post(path, body), surface, *expect)
            }
            6 => {
                let m = &self.model;
                let ext = [
                    r#""mlx:tags":5"#,
                    r#""mlx:tags":{"a":1}"#,
                    r#""mlx:trace":"yes""#,
                    r#""mlx:end_user":[]"#,
                    r#""mlx:cache":"x""#,
                    r#""mlx:cache":{"skip":"no"}"#,
                    r#""mlx:tags":{"a":"b"},"mlx:tags":{"c":"d"}"#,
                ];
                let body = format!(
                    r#"{{"model":"{m}","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}],{}}}"#,
                    rng.pick(&ext)
                );
                proxy("mlx_wrong_types", self.json_post(path, body.as_bytes()), surface, Expect::Error)
            }
            7 => {
                let m = &self.model;
                let fields = [
                    r#""max_tokens":100000000000000000000"#,
                    r#""max_tokens":-1"#,
                    r#""max_tokens":18446744073709551616"#,
                    r#""max_tokens":1e20"#,
                    r#""n":1000000,"max_tokens":8"#,
                    r#""n":-3,"max_tokens":8"#,
                    r#""max_tokens":8,"temperature":1.7976931348623157e308"#,
                    r#""max_tokens":123456789012345678901234567890123456789"#,
                ];
                let body = format!(
                    r#"{{"model":"{m}",{},"messages":[{{"role":"user","content":"hi"}}]}}"#,
                    rng.pick(&fields)
                );
                proxy("extreme_sizes", self.json_post(path, body.as_bytes()), surface, Expect::Any)
            }
            8 => {
                let models = [
                    "local/mock\\r\\nX-Evil: 1",
                    "gpt-4o-mini\\u0001",
                    "a\\u0000b",
                    &"m".repeat(300),
                    "x\\u2028\\u0085",
                ];
                let body = format!(
                    r#"{{"model":"{}","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}]}}"#,
                    rng.pick(&models)
                );
                proxy("header_unsafe_model", self.json_post(path, body.as_bytes()), surface, Expect::Error)
            }
            9 => {
                let bytes = http(
                    "POST",
                    path,
                    &[
                        self.auth(),
                        ("content-type", "application/json".into()),
                        ("content-length", "1000".into()),
                    ],
                    &chat.as_bytes()[..chat.len() / 2],
                );
                // Half-closed, or left hanging for the body deadline to answer.
                let after = if rng.below(2) == 0 { After::ShutdownWrite } else { After::Read };
                Case { name: "truncated_body", manage: false, bytes, after, surface, expect: Expect::Error }
            }
            10 => {
                let full = self.json_post(path, chat.as_bytes());
                let cut = 1 + rng.below(full.len() - 1);
                Case {
                    name: "abrupt_close",
                    manage: false,
                    bytes: full[..cut].to_vec(),
                    after: After::Reset,
                    surface,
                    expect: Expect::Any,
                }
            }
            11 | 12 => self.manage_hostile(rng),
            13 => {
                let variants: [(&str, &str, Expect); 6] = [
                    ("PUT", CHAT, Expect::Error),
                    ("GET", "/openai/v1/unknown/thing", Expect::Error),
                    ("DELETE", MESSAGES, Expect::Error),
                    ("GET", "/openai/v1/models/..%2f..%2fetc%2fpasswd", Expect::Any),
                    ("CONNECT", "fuzz:443", Expect::Error),
                    ("GET", "/openai/v1/files?limit=-1&after=%00", Expect::Any),
                ];
                let (method, p, expect) = rng.pick(&variants);
                let surf = if p.starts_with("/anthropic") {
                    Surface::Anthropic
                } else if *method == "CONNECT" {
                    Surface::Unknown
                } else {
                    Surface::OpenAi
                };
                proxy("wrong_method_or_path", http(method, p, &[self.auth()], b""), surf, *expect)
            }
            _ => {
                let headers = vec![
                    self.auth(),
                    ("content-type", "application/json".into()),
                    ("content-length", chat.len().to_string()),
                    ("expect", "100-continue".into()),
                ];
                proxy("expect_continue", http("POST", path, &headers, chat.as_bytes()), surface, Expect::Any)
            }
        }
    }

    fn manage_hostile(&self, rng: &mut Rng) -> Case {
        let admin = ("authorization", format!("Bearer {}", self.admin_key));
        let json = |method: &str, path: &str, body: &[u8]| {
            http(
                method,
                path,
                &[
                    admin.clone(),
                    ("content-type", "application/json".into()),
                    ("content-length", body.len().to_string()),
                ],
                body,
            )
        };
        let big = format!(r#"{{"id":"p","name":"{}"}}"#, "n".repeat(3 << 20));
        let deep = format!(r#"{{"id":{}1{}}}"#, "[".repeat(50_000), "]".repeat(50_000));
        let variants: [(Vec<u8>, Expect); 12] = [
            (json("POST", "/manage/v1/projects", b"{not json"), Expect::Error),
            (json("POST", "/manage/v1/projects", big.as_bytes()), Expect::Error),
            (json("POST", "/manage/v1/projects", deep.as_bytes()), Expect::Error),
            (json("POST", "/manage/v1/projects", br#"{"id":5,"name":[]}"#), Expect::Error),
            (json("POST", "/manage/v1/projects", b"{\"id\":\"a\xff\"}"), Expect::Error),
            (
                http("GET", "/manage/v1/projects", &[("authorization", "Bearer \u{7f}nope".into())], b""),
                Expect::Error,
            ),
            (http("GET", "/manage/v1/../../etc/passwd", std::slice::from_ref(&admin), b""), Expect::Error),
            (
                http("GET", "/manage/v1/logs?limit=-1&from=notadate", std::slice::from_ref(&admin), b""),
                Expect::Error,
            ),
            (
                http(
                    "GET",
                    "/manage/v1/logs?limit=99999999999999999999999",
                    std::slice::from_ref(&admin),
                    b"",
                ),
                Expect::Error,
            ),
            (json("PATCH", "/manage/v1/projects/%00%ff", br#"{"name":1e999}"#), Expect::Error),
            (json("POST", "/mcp", b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":5}"), Expect::Any),
            (
                json("POST", "/manage/v1/routing-configs", br#"{"slug":"x","strategy":"nope","mlx:tags":5}"#),
                Expect::Error,
            ),
        ];
        let (bytes, expect) = rng.pick(&variants);
        Case {
            name: "manage_hostile",
            manage: true,
            bytes: bytes.clone(),
            after: After::Read,
            surface: Surface::Manage,
            expect: *expect,
        }
    }
}

/// What came back on one connection.
enum Seen {
    Answer {
        status: u16,
        body: Vec<u8>,
        content_type: String,
    },
    Closed,
    Reset,
    /// Bytes that do not make a whole answer before the close.
    Partial(String),
    Hung,
}

async fn exchange(addr: SocketAddr, case: &Case, bound: Duration) -> io::Result<Seen> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    // The gateway may answer (and close) before reading everything: a failed write is
    // not the case's failure, what comes back is.
    let _ = s.write_all(&case.bytes).await;
    match case.after {
        After::Reset => {
            // A zero linger never blocks (the deprecation is about waiting out a nonzero
            // one): the drop sends a reset at once, which is the point.
            #[allow(deprecated)]
            s.set_linger(Some(Duration::ZERO))?;
            drop(s);
            return Ok(Seen::Closed);
        }
        After::ShutdownWrite => {
            let _ = s.shutdown().await;
        }
        After::Read => {}
    }
    // The request's method frames the answer (a HEAD's has no body).
    let method =
        case.bytes.split(|b| *b == b' ').next().and_then(|m| std::str::from_utf8(m).ok()).unwrap_or("GET");
    match tokio::time::timeout(bound, read_answer(s, addr, method)).await {
        Ok(seen) => Ok(seen),
        Err(_) => Ok(Seen::Hung),
    }
}

/// Reads one answer off `s` with the harness's HTTP client (1xx skipped; framed by
/// Content-Length, chunked encoding or the close), after telling apart a close or reset
/// before any byte.
async fn read_answer(mut s: TcpStream, addr: SocketAddr, method: &str) -> Seen {
    let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
    match s.read_buf(&mut buf).await {
        Ok(0) => return Seen::Closed,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Seen::Reset,
        Err(e) => return Seen::Partial(format!("read error before any byte: {e}")),
        Ok(_) => {}
    }
    match crate::httpc::Conn::from_stream(s, buf, addr).read_response(method).await {
        Ok(r) => Seen::Answer {
            status: r.status,
            content_type: r.header("content-type").unwrap_or_default().to_string(),
            body: r.body,
        },
        Err(e) => Seen::Partial(e.to_string()),
    }
}

/// Whether an error body is in `surface`'s format.
fn error_format_ok(surface: Surface, body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    let openai = v["error"]["message"].is_string() && v["error"]["type"].is_string();
    let anthropic =
        v["type"] == "error" && v["error"]["type"].is_string() && v["error"]["message"].is_string();
    let manage = openai && v["error"]["code"].is_string();
    match surface {
        Surface::OpenAi => openai,
        Surface::Anthropic => anthropic,
        Surface::Manage => manage,
        Surface::Unknown => openai || anthropic,
    }
}

/// The outcome's name, or why it fails the case.
fn judge(case: &Case, seen: &Seen) -> Result<&'static str, String> {
    match (seen, case.expect) {
        (Seen::Hung, _) => Err("no answer and no close within the bound".into()),
        (Seen::Partial(why), _) => Err(format!("cut-off answer: {why}")),
        (_, _) if case.after == After::Reset => Ok("client_aborted"),
        (Seen::Closed, Expect::Success) | (Seen::Reset, Expect::Success) => {
            Err("good request: connection closed".into())
        }
        (Seen::Closed, _) => Ok("closed"),
        (Seen::Reset, _) => Ok("reset"),
        (Seen::Answer { status, body, .. }, Expect::Success) => {
            if (200..300).contains(status) {
                Ok("good_ok")
            } else {
                Err(format!(
                    "good request answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ))
            }
        }
        (Seen::Answer { status, body, content_type }, expect) => {
            if (200..400).contains(status) {
                return if expect == Expect::Any {
                    Ok("answered_2xx")
                } else {
                    Err(format!("hostile request answered {status}"))
                };
            }
            if !(400..600).contains(status) {
                return Err(format!("unexpected status {status}"));
            }
            // pingora's own answer to a head it cannot parse has no body.
            let bare = body.is_empty() && case.surface == Surface::Unknown;
            let formatted = content_type.contains("json") && error_format_ok(case.surface, body);
            if !bare && !formatted {
                return Err(format!(
                    "{status} not in the {:?} error format: {}",
                    case.surface,
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ));
            }
            Ok(if *status < 500 { "answered_4xx" } else { "answered_5xx" })
        }
    }
}

/// The RSS of `pid` in KiB (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs the fuzz: `run.concurrency` workers draw case indices until the count or the time
/// runs out.
pub async fn run(target: Target, run: Run) -> Report {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let report = Arc::new(Mutex::new(Report { seed: run.seed, ..Report::default() }));
    let warm = (run.requests / 10).max(1);
    let mut workers = Vec::new();
    for _ in 0..run.concurrency.max(1) {
        let (target, run, next, report) = (target.clone(), run.clone(), next.clone(), report.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= run.requests || started.elapsed() >= run.duration {
                    break;
                }
                let mut rng = Rng::new(run.seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
                let good = run.good_every > 0 && i % (run.good_every + 1) == run.good_every;
                let case = if good { target.good(&mut rng) } else { target.hostile(&mut rng) };
                let addr = if case.manage { target.manage } else { target.proxy };
                let t0 = Instant::now();
                let seen = match exchange(addr, &case, run.bound).await {
                    Ok(seen) => seen,
                    Err(e) => Seen::Partial(format!("could not connect: {e}")),
                };
                let took = t0.elapsed();
                let verdict = judge(&case, &seen);
                let rss = if i == warm { run.pid.and_then(rss_kib) } else { None };
                let mut r = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                r.requests += 1;
                if good {
                    r.good += 1;
                } else {
                    r.hostile += 1;
                }
                *r.cases.entry(case.name.to_string()).or_default() += 1;
                r.slowest_ms = r.slowest_ms.max(took.as_millis() as u64);
                if rss.is_some() {
                    r.rss_kib_start = rss;
                }
                match verdict {
                    Ok(outcome) => *r.outcomes.entry(outcome.to_string()).or_default() += 1,
                    Err(why) => {
                        r.failures += 1;
                        if r.failure_samples.len() < 40 {
                            let sent = String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(160)])
                                .replace("\r\n", "⏎");
                            r.failure_samples.push(format!("#{i} {}: {why} (sent: {sent})", case.name));
                        }
                    }
                }
            }
        }));
    }
    let sampler = run.pid.map(|pid| {
        let report = report.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(kib) = rss_kib(pid) {
                    let mut r = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    r.rss_kib_max = Some(r.rss_kib_max.unwrap_or(0).max(kib));
                }
            }
        })
    });
    for w in workers {
        let _ = w.await;
    }
    if let Some(s) = sampler {
        s.abort();
    }
    let mut r = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    r.seconds = started.elapsed().as_secs_f64();
    r.rss_kib_end = run.pid.and_then(rss_kib);
    std::mem::take(&mut *r)
}
