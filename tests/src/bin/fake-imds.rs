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
    /// Append each request to this file as `METHOD PATH` (and ` mtls` over mutual TLS).
    #[arg(long)]
    request_log: Option<std::path::PathBuf>,
    /// Also serve over mutual TLS on this address (GCP's metadata server on port 443), with
    /// the certificates in --tls-dir; repeatable.
    #[arg(long, requires = "tls_dir")]
    tls_listen: Vec<SocketAddr>,
    /// server.crt and server.key (the server's), and client-ca.crt (whose clients it accepts).
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
    /// Serve this file's content as the instance's user data (EC2 and Azure).
    #[arg(long)]
    user_data: Option<std::path::PathBuf>,
    /// EC2's role credentials expire this long after they are served.
    #[arg(long, default_value_t = 6 * 3600)]
    credential_lifetime_seconds: u64,
    /// Throttle as Azure IMDS does: at most N requests in any second (managed identities
    /// 4N), beyond it 429.
    #[arg(long)]
    rate_limit: Option<usize>,
    /// Take this long over every answer, as a real service does (the fake's own is microseconds).
    #[arg(long, default_value_t = 0)]
    answer_delay_ms: u64,
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
    let mut listeners: Vec<_> = listeners.into_iter().map(|l| (l, None)).collect();
    if let Some(dir) = &args.tls_dir {
        let acceptor = fake_imds::tls_acceptor(dir).unwrap_or_else(|error| {
            eprintln!("fake-imds: TLS: {error}");
            std::process::exit(1);
        });
        let tls = fake_imds::bind(&args.tls_listen)
            .await
            .unwrap_or_else(|error| {
                eprintln!("fake-imds: cannot listen: {error}");
                std::process::exit(1);
            });
        listeners.extend(tls.into_iter().map(|l| (l, Some(acceptor.clone()))));
    }
    println!("listening on {:?} {:?}", args.listen, args.tls_listen);
    let _ = std::io::stdout().flush();
    fake_imds::serve(
        listeners,
        Config {
            tokens_required: args.tokens_required,
            role: args.role,
            provider: args.provider,
            request_log: args.request_log,
            user_data: match &args.user_data {
                Some(file) => std::fs::read_to_string(file).unwrap_or_else(|error| {
                    eprintln!("fake-imds: {}: {error}", file.display());
                    std::process::exit(1);
                }),
                None => fake_imds::USER_DATA.into(),
            },
            credential_lifetime: std::time::Duration::from_secs(args.credential_lifetime_seconds),
            rate_limit: args.rate_limit,
            answer_delay: std::time::Duration::from_millis(args.answer_delay_ms),
        },
    )
    .await;
}
