//! Standalone mock LLM upstream for load tests (`modelux_loadtest::mock`): OpenAI, Anthropic,
//! Gemini, Cohere, Bedrock and Azure OpenAI routes on one port, all with the same knobs.

use std::io;
use std::time::Duration;

use clap::Parser;
use modelux_loadtest::mock::{MockConfig, MockServer};

#[derive(Parser, Debug)]
#[command(
    about = "Mock LLM upstream: OpenAI, Anthropic, Gemini, Cohere, Bedrock and Azure OpenAI wire formats"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; see the printed line).
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: String,
    /// Delay before response headers.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Streaming: delay before the first content chunk.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Streaming: delay between content chunks.
    #[arg(long, default_value_t = 0)]
    inter_token_ms: u64,
    /// Content tokens per response.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Fraction of requests (0..1) answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, default_value_t = 500)]
    error_status: u16,
    /// Keep every request (method, path, headers, body) for `GET /mock/requests`. For tests:
    /// the record grows without bound.
    #[arg(long)]
    record: bool,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.error_rate) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "--error-rate must be within 0..1"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let cfg = MockConfig {
        latency: Duration::from_millis(args.latency_ms),
        ttft: Duration::from_millis(args.ttft_ms),
        inter_token: Duration::from_millis(args.inter_token_ms),
        tokens: args.tokens,
        error_rate: args.error_rate,
        error_status: args.error_status,
        script: Vec::new(),
        // Recording every request would grow without bound under load: tests ask for it.
        record: args.record,
    };
    let server = MockServer::start_on(listener, cfg).await?;
    // Scripts (run.sh) parse this line to learn the port.
    println!("listening on {}", server.addr());
    wait_for_signal().await?;
    eprintln!("served {} requests", server.request_count());
    server.shutdown();
    Ok(())
}

async fn wait_for_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
