//! `mock-provider`: a fake model provider on a loopback port, speaking the Anthropic Messages
//! dialect at `/v1/messages` and Chat Completions at `/v1/chat/completions`.
//!
//! ```text
//! mock-provider [--listen 127.0.0.1:0] [--latency-ms N] [--event-gap-ms N]
//! ```
//! It prints `mock-provider listening on http://ADDR` once it accepts connections. Faults are
//! queued with `POST /_mock/push` (see `Reply::from_spec`), received requests are listed by
//! `GET /_mock/requests`, and `POST /_mock/reset` clears both.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use mock_provider::{MockProvider, Reply};

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn millis(args: &[String], name: &str) -> Duration {
    Duration::from_millis(
        arg_value(args, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("mock-provider [--listen 127.0.0.1:0] [--latency-ms N] [--event-gap-ms N]");
        return ExitCode::SUCCESS;
    }
    let listen = arg_value(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let mock = match MockProvider::bind(&listen, Reply::Model).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mock-provider: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    mock.set_latency(
        millis(&args, "--latency-ms"),
        millis(&args, "--event-gap-ms"),
    );
    println!("mock-provider listening on {}", mock.url());
    let _ = std::io::stdout().flush();
    // Serve until the process is stopped.
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}
