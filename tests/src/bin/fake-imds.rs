//! The fake metadata service as a process, for the sandbox: it must run inside the sandbox's
//! network namespace, which a child process joins before exec.
//!
//! Prints `listening` on stdout once every listener is bound.

use std::{io::Write as _, net::SocketAddr};

use clap::Parser;
use imds_agent::provider::Provider;
use imds_tests::fake_imds::{self, Config};

/// A fake cloud metadata service (EC2's by default) for tests and the demo.
#[derive(Parser)]
struct Args {
    /// Address to serve on; repeatable.
    /// Link-local IPv6 as [ADDRESS%INTERFACE]:PORT.
    #[arg(long, required = true, value_parser = imds_agent::provider::parse_endpoint)]
    listen: Vec<SocketAddr>,
    /// Require session tokens (EC2 HttpTokens=required, Alibaba's hardened mode).
    #[arg(long)]
    tokens_required: bool,
    /// The instance role whose credentials are served.
    #[arg(long, default_value = "demo-node-role")]
    role: String,
    /// Whose metadata service to serve.
    #[arg(long, value_enum, default_value_t = Provider::Aws)]
    provider: Provider,
    /// Append each request to this file as `METHOD PATH`.
    #[arg(long)]
    request_log: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let listeners = match fake_imds::bind(&args.listen).await {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("fake-imds: cannot listen: {error}");
            std::process::exit(1);
        }
    };
    println!("listening on {:?}", args.listen);
    let _ = std::io::stdout().flush();
    fake_imds::serve(
        listeners,
        Config {
            tokens_required: args.tokens_required,
            role: args.role,
            provider: args.provider,
            request_log: args.request_log,
        },
    )
    .await;
}
