//! The fake metadata service as a process, for the sandbox: it must run inside the sandbox's
//! network namespace, which a child process joins before exec.
//!
//! Prints `listening` on stdout once every listener is bound.

use std::{io::Write as _, net::SocketAddr};

use clap::Parser;
use imds_tests::fake_imds::{self, Config};

/// A fake AWS instance metadata service (IMDSv1 and v2) for tests and the demo.
#[derive(Parser)]
struct Args {
    /// Address to serve on; repeatable.
    /// Link-local IPv6 as [ADDRESS%INTERFACE]:PORT.
    #[arg(long, required = true, value_parser = imds_agent::provider::parse_endpoint)]
    listen: Vec<SocketAddr>,
    /// Require IMDSv2 session tokens (HttpTokens=required).
    #[arg(long)]
    tokens_required: bool,
    /// The instance role whose credentials are served.
    #[arg(long, default_value = "demo-node-role")]
    role: String,
    /// Serve GCP's metadata server instead of EC2's.
    #[arg(long, conflicts_with = "azure")]
    gcp: bool,
    /// Serve Azure's instance metadata service instead of EC2's.
    #[arg(long)]
    azure: bool,
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
            gcp: args.gcp,
            azure: args.azure,
        },
    )
    .await;
}
