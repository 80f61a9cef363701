//! Closed-loop HTTP/1.1 load driver: `--connections` keep-alive connections,
//! each sending its next request as soon as the previous response is read.
//! Latencies go into an HdrHistogram at microsecond resolution.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use modelux_loadtest::httpc::Conn;

#[derive(Parser, Debug)]
#[command(about = "Closed-loop HTTP/1.1 load driver")]
struct Args {
    /// host:port to connect to.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    #[arg(long, default_value = "/openai/v1/chat/completions")]
    path: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured duration (after warmup).
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Stop after this many requests in total (warmup included).
    #[arg(long)]
    max_requests: Option<u64>,
    /// Requests completing during warmup are not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Extra request header "Name: value" (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Request body file (default: a small chat request for --model).
    #[arg(long)]
    body_file: Option<String>,
    /// Model for the default body.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Streamed requests ("stream": true in the default body); also
    /// measures time to first body byte.
    #[arg(long)]
    stream: bool,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Pace the load: this many requests per second in total, spread evenly over the
    /// connections (each sends at most one request per interval). Latency is then
    /// measured well below saturation, i.e. without queueing in the proxy.
    #[arg(long)]
    rate: Option<f64>,
    /// Per-request timeout; a timed-out request counts as an error.
    #[arg(long, default_value_t = 30.0)]
    timeout_s: f64,
}

/// Per-connection results, merged at the end (no shared state on the hot path
/// besides the request-budget counter).
struct Stats {
    lat: Histogram<u64>,
    ttfb: Histogram<u64>,
    ok: u64,
    errors: u64,
    io_errors: u64,
    status: BTreeMap<u16, u64>,
    last_done: Option<Instant>,
    /// Every finished request, warmup included (for CPU-per-request math
    /// by callers that sample CPU across the whole run).
    completed_all: u64,
}

impl Stats {
    fn new() -> io::Result<Stats> {
        // 1 µs .. 10 min, 3 significant digits.
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).map_err(io::Error::other);
        Ok(Stats {
            lat: h()?,
            ttfb: h()?,
            ok: 0,
            errors: 0,
            io_errors: 0,
            status: BTreeMap::new(),
            last_done: None,
            completed_all: 0,
        })
    }

    fn merge(&mut self, o: &Stats) -> io::Result<()> {
        self.lat.add(&o.lat).map_err(io::Error::other)?;
        self.ttfb.add(&o.ttfb).map_err(io::Error::other)?;
        self.ok += o.ok;
        self.errors += o.errors;
        self.io_errors += o.io_errors;
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() += v;
        }
        self.last_done = self.last_done.max(o.last_done);
        self.completed_all += o.completed_all;
        Ok(())
    }
}

struct Plan {
    addr: SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    stream: bool,
    measure_from: Instant,
    deadline: Instant,
    timeout: Duration,
    budget: Option<u64>,
    issued: AtomicU64,
    stop: AtomicBool,
    /// Paced mode: time between two sends on one connection.
    interval: Option<Duration>,
    connections: usize,
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

async fn run(args: Args) -> io::Result<()> {
    let addr = args
        .target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid_input(format!("cannot resolve {}", args.target)))?;
    let mut headers = Vec::new();
    let mut has_ct = false;
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| invalid_input(format!("bad --header {h:?}, want \"Name: value\"")))?;
        has_ct |= k.trim().eq_ignore_ascii_case("content-type");
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if !has_ct {
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
    }
    let body = match &args.body_file {
        Some(f) => std::fs::read(f)?,
        None => {
            let mut v = serde_json::json!({
                "model": args.model,
                "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
                "max_tokens": 16,
            });
            if args.stream {
                v["stream"] = true.into();
            }
            serde_json::to_vec(&v).map_err(io::Error::other)?
        }
    };
    let secs = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::ZERO);
    let start = Instant::now();
    let measure_from = start + secs(args.warmup_s);
    let deadline = measure_from + secs(args.duration_s);
    let plan = Arc::new(Plan {
        addr,
        path: args.path.clone(),
        headers,
        body,
        stream: args.stream,
        measure_from,
        deadline,
        timeout: secs(args.timeout_s).max(Duration::from_millis(1)),
        budget: args.max_requests,
        issued: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        interval: args
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(args.connections.max(1) as f64 / r)),
        connections: args.connections.max(1),
    });

    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections.max(1) {
        tasks.push(tokio::spawn(worker(plan.clone(), i)));
    }
    // Hard bound: in-flight requests get a short grace period after the
    // deadline, then are abandoned so the process always exits.
    let hard_stop = deadline + Duration::from_secs(2).min(plan.timeout);
    let mut total = Stats::new()?;
    let mut aborted = 0usize;
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(hard_stop.into(), t).await {
            Ok(Ok(Ok(s))) => total.merge(&s)?,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => {
                plan.stop.store(true, Ordering::Relaxed);
                abort.abort();
                aborted += 1;
            }
        }
    }
    // The measured window ends at the deadline, or earlier when the request
    // budget ran out.
    let end = total.last_done.map_or(deadline, |l| l.min(deadline)).max(measure_from);
    let window = end.duration_since(measure_from).as_secs_f64();
    let requests = total.ok + total.errors;
    let rps = if window > 0.0 { requests as f64 / window } else { 0.0 };
    report(&args, &total, requests, rps, window, aborted);
    Ok(())
}

async fn worker(plan: Arc<Plan>, index: usize) -> io::Result<Stats> {
    let mut st = Stats::new()?;
    let hdrs: Vec<(&str, &str)> = plan.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut conn: Option<Conn> = None;
    // Paced mode: stagger the connections across one interval so sends do not bunch up.
    let mut next_send =
        plan.interval.map(|iv| Instant::now() + iv.mul_f64(index as f64 / plan.connections as f64));
    loop {
        if let (Some(iv), Some(at)) = (plan.interval, next_send.as_mut()) {
            let now = Instant::now();
            if *at > now {
                tokio::time::sleep_until((*at).into()).await;
            } else if now.duration_since(*at) > iv {
                // Fell behind by more than an interval: do not fire a burst to catch up.
                *at = now;
            }
            *at += iv;
        }
        if plan.stop.load(Ordering::Relaxed) || Instant::now() >= plan.deadline {
            break;
        }
        if let Some(b) = plan.budget {
            if plan.issued.fetch_add(1, Ordering::Relaxed) >= b {
                break;
            }
        }
        let t0 = Instant::now();
        let res = tokio::time::timeout(plan.timeout, one(&plan, &mut conn, &hdrs)).await;
        let done = Instant::now();
        let measured = t0 >= plan.measure_from && done <= plan.deadline;
        st.completed_all += 1;
        let outcome = match res {
            Ok(Ok(o)) => Some(o),
            Ok(Err(_)) | Err(_) => None,
        };
        if outcome.is_none() {
            // Start over on a fresh connection; back off a little so a dead
            // target does not turn into a connect spin.
            conn = None;
            if measured {
                st.errors += 1;
                st.io_errors += 1;
                st.last_done = Some(done);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let Some((status, ttfb)) = outcome else {
            continue;
        };
        if !measured {
            continue;
        }
        st.last_done = Some(done);
        *st.status.entry(status).or_default() += 1;
        if (200..300).contains(&status) {
            st.ok += 1;
            let us = done.duration_since(t0).as_micros().max(1);
            st.lat.saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
            if let Some(t) = ttfb {
                let us = t.duration_since(t0).as_micros().max(1);
                st.ttfb.saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
            }
        } else {
            st.errors += 1;
        }
    }
    Ok(st)
}

/// One request; returns (status, time of first body bytes when streaming).
async fn one(
    plan: &Plan,
    conn: &mut Option<Conn>,
    hdrs: &[(&str, &str)],
) -> io::Result<(u16, Option<Instant>)> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(Conn::connect(plan.addr).await?),
    };
    if !plan.stream {
        let r = c.request("POST", &plan.path, hdrs, &plan.body).await?;
        return Ok((r.status, None));
    }
    let mut s = c.request_streaming("POST", &plan.path, hdrs, &plan.body).await?;
    let mut first = None;
    while s.next_chunk().await?.is_some() {
        first.get_or_insert_with(Instant::now);
    }
    Ok((s.status, first))
}

fn pct(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

fn report(args: &Args, s: &Stats, requests: u64, rps: f64, window: f64, aborted: usize) {
    let q = |h: &Histogram<u64>| [pct(h, 0.5), pct(h, 0.9), pct(h, 0.99), pct(h, 0.999), h.max()];
    let lat = q(&s.lat);
    let ttfb = q(&s.ttfb);
    if args.json {
        let mut v = serde_json::json!({
            "target": args.target,
            "path": args.path,
            "connections": args.connections,
            "stream": args.stream,
            "window_s": window,
            "requests": requests,
            "completed_all": s.completed_all,
            "ok": s.ok,
            "errors": s.errors,
            "io_errors": s.io_errors,
            "aborted_connections": aborted,
            "rps": rps,
            "mean_us": s.lat.mean(),
            "p50_us": lat[0],
            "p90_us": lat[1],
            "p99_us": lat[2],
            "p999_us": lat[3],
            "max_us": lat[4],
            "status": s.status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        });
        if args.stream {
            v["ttfb_p50_us"] = ttfb[0].into();
            v["ttfb_p90_us"] = ttfb[1].into();
            v["ttfb_p99_us"] = ttfb[2].into();
            v["ttfb_p999_us"] = ttfb[3].into();
            v["ttfb_max_us"] = ttfb[4].into();
        }
        println!("{v}");
        return;
    }
    println!(
        "target {} {} | {} connections | {:.2} s measured{}",
        args.target,
        args.path,
        args.connections,
        window,
        if args.stream { " | streaming" } else { "" }
    );
    println!("requests {requests}  errors {} (io {})  req/s {rps:.0}", s.errors, s.io_errors);
    let statuses: Vec<String> = s.status.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    println!("status   {}", statuses.join(" "));
    let line = |name: &str, v: &[u64; 5]| {
        println!("{name:<8} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (µs)", v[0], v[1], v[2], v[3], v[4]);
    };
    line("latency", &lat);
    if args.stream {
        line("ttfb", &ttfb);
    }
    if aborted > 0 {
        println!("({aborted} connections were still waiting at the hard stop)");
    }
}
