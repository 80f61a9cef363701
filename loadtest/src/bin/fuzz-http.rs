//! HTTP-level fuzz run over a live gateway (see `modelux_loadtest::fuzz`). Prints the
//! report as JSON; exits 1 when any request failed its check, or the gateway's RSS grew by
//! more than `--max-rss-growth` over the run.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::Parser;
use modelux_loadtest::fuzz::{self, Run, Target};

#[derive(Parser, Debug)]
#[command(about = "Hostile HTTP requests, interleaved with good ones, against a running gateway")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    proxy: String,
    #[arg(long, default_value = "127.0.0.1:9090")]
    manage: String,
    #[arg(long, env = "MODELUX_FUZZ_KEY")]
    key: String,
    #[arg(long, env = "MODELUX_FUZZ_ADMIN_KEY")]
    admin_key: String,
    /// A model both surfaces answer.
    #[arg(long, default_value = "@fast")]
    model: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Stop after this many minutes even if `--requests` is not reached.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// One good request after every this many hostile ones.
    #[arg(long, default_value_t = 9)]
    good_every: u64,
    /// Seconds a request may go without an answer or a close.
    #[arg(long, default_value_t = 10)]
    bound_s: u64,
    /// The gateway's pid, to follow its RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// Largest RSS growth allowed from the end of the first tenth to the end (0.10 = 10%).
    #[arg(long, default_value_t = 0.10)]
    max_rss_growth: f64,
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs().map_err(|e| format!("{s}: {e}"))?.next().ok_or_else(|| format!("{s}: no address"))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (proxy, manage) = match (addr(&args.proxy), addr(&args.manage)) {
        (Ok(p), Ok(m)) => (p, m),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("fuzz-http: {e}");
            std::process::exit(2);
        }
    };
    let target = Target { proxy, manage, key: args.key, admin_key: args.admin_key, model: args.model };
    let run = Run {
        seed: args.seed,
        requests: args.requests,
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        concurrency: args.concurrency,
        good_every: args.good_every,
        bound: Duration::from_secs(args.bound_s),
        pid: args.pid,
    };
    let report = fuzz::run(target, run).await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    let growth = report.rss_growth();
    if let Some(g) = growth {
        eprintln!("fuzz-http: RSS {:+.1}% from the first tenth to the end", g * 100.0);
    }
    if report.failures > 0 || growth.is_some_and(|g| g > args.max_rss_growth) {
        std::process::exit(1);
    }
}
