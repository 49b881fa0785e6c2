//! `imds-agent run`: validate everything, bind, attach, serve, drain.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::RunArgs,
    fs,
    identity::Resolver,
    loader::{AttachConfig, Enforcer, LoaderError},
    policy::{PolicyError, PolicySet},
    proxy::{self, Filter},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration: nothing was attached (exit 64).
    #[error("invalid policy:\n{}", format_policy_errors(.0))]
    Policy(Vec<PolicyError>),
    #[error("{0}")]
    Config(String),
    /// Runtime failure (exit 1).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddrV4,
        source: std::io::Error,
    },
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RunError {
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Policy(_) | Self::Config(_))
    }
}

pub fn format_policy_errors(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The enforced root: the given cgroup or the cgroup v2 root, checked to be a directory on
/// the cgroup2 mount.
fn enforced_root(mount: &Path, cgroup: Option<&Path>) -> Result<PathBuf, RunError> {
    let root = cgroup.map_or_else(|| mount.to_owned(), Path::to_owned);
    if !root.starts_with(mount) {
        return Err(RunError::Config(format!(
            "--cgroup {}: not below the cgroup v2 mount {}",
            root.display(),
            mount.display()
        )));
    }
    if !root.join("cgroup.procs").is_file() {
        return Err(RunError::Config(format!(
            "--cgroup {}: not a cgroup v2 directory",
            root.display()
        )));
    }
    Ok(root)
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    // Everything that can be wrong with the configuration is found before anything is bound
    // or attached.
    let policy = PolicySet::load(&args.policy, args.unmatched).map_err(RunError::Policy)?;
    let mount = fs::cgroup2_mount().map_err(|e| RunError::Config(e.to_string()))?;
    let cgroup = enforced_root(&mount, args.cgroup.as_deref())?;
    if args.endpoints.is_empty() {
        return Err(RunError::Config(
            "at least one --endpoint is required".into(),
        ));
    }
    let resolver = Resolver::new(&mount, &cgroup)?;

    // Listen before attaching: once the programs divert, the listener must be there.
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: args.listen,
            source,
        })?;
    let enforcer = Enforcer::attach(&AttachConfig {
        cgroup: &cgroup,
        pin_dir: &args.pin_dir,
        divert_to: args.listen,
        endpoints: &args.endpoints,
    })?;
    tracing::info!(
        cgroup = %cgroup.display(),
        pin_dir = %args.pin_dir.display(),
        listen = %args.listen,
        endpoints = ?args.endpoints,
        policies = ?policy.policies().iter().map(|p| p.name()).collect::<Vec<_>>(),
        unmatched = %args.unmatched,
        "enforcing"
    );

    let filter = Arc::new(Filter {
        enforcer: Arc::new(enforcer),
        resolver,
        policy: Arc::new(policy),
    });
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM"),
            _ = sigint.recv() => tracing::info!("SIGINT"),
        }
    };
    proxy::serve(
        listener,
        filter.clone(),
        shutdown,
        Duration::from_secs(args.drain_seconds),
    )
    .await;
    if let Ok(counters) = filter.enforcer.counters() {
        tracing::info!(?counters, "stopped; programs stay attached (pinned)");
    }
    Ok(())
}
