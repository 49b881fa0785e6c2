//! `imds-agent run`: validate everything, bind, attach, serve, drain.

use std::{
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::{ProviderSetting, RunArgs},
    fs,
    identity::{Resolver, pods::PodDirectory},
    loader::{AttachConfig, Enforcer, LoaderError},
    metrics::{self, Metrics},
    policy::{PolicyError, store::PolicyStore},
    provider::Provider,
    proxy::{self, Filter},
    supervisor::Tasks,
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
    /// A background task ended while the agent ran (exit 1).
    #[error("a background task ended: {0}")]
    Task(String),
    /// The serving threads ended while the agent ran (exit 1): the service manager restarts
    /// it.
    #[error(transparent)]
    Serve(#[from] crate::proxy::ServeError),
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

/// Aborts TCP connections from the enforced tree to a metadata endpoint that predate the
/// programs (see `loader::sockdiag`). Failure to do so is logged, not fatal: the kernel
/// already enforces every new connection.
fn close_preexisting(resolver: &Resolver, endpoints: &[std::net::SocketAddr]) {
    use crate::loader::sockdiag;
    let sockets = match sockdiag::tcp_sockets() {
        Ok(sockets) => sockets,
        Err(error) => {
            tracing::warn!(%error, "cannot list existing connections; those to the metadata service stay open");
            return;
        }
    };
    let to_metadata = |s: &sockdiag::DiagSocket| {
        endpoints.iter().any(|e| {
            e.port() == s.destination.port()
                && match e {
                    std::net::SocketAddr::V4(e) => sockdiag::destination_ipv4(s) == Some(*e.ip()),
                    std::net::SocketAddr::V6(_) => s.destination.ip() == e.ip(),
                }
        })
    };
    let mut closed = 0;
    for socket in sockets.iter().filter(|s| to_metadata(s)) {
        let Some(cgroup_id) = socket.cgroup_id else {
            continue;
        };
        if !resolver.is_enforced(cgroup_id) {
            continue;
        }
        match sockdiag::destroy(socket) {
            Ok(()) => closed += 1,
            Err(error) => {
                tracing::warn!(%error, source = %socket.source, "cannot close an existing connection to the metadata service")
            }
        }
    }
    if closed > 0 {
        tracing::info!(
            closed,
            "closed connections to the metadata service that predate enforcement"
        );
    }
}

/// How the filter behaves, from the command line.
fn settings(
    args: &RunArgs,
    provider: Provider,
    endpoints: Vec<std::net::SocketAddr>,
) -> proxy::Settings {
    proxy::Settings {
        timeouts: proxy::gate::Timeouts {
            head: Duration::from_millis(args.head_timeout_ms),
            idle: Duration::from_millis(args.idle_timeout_ms),
        },
        upstream: proxy::UpstreamTimeouts {
            request: Duration::from_millis(args.upstream_timeout_ms),
            long_poll: Duration::from_secs(args.long_poll_max_seconds),
        },
        endpoints,
        unknown_pod_wait: if args.kubernetes {
            Duration::from_millis(args.unknown_pod_wait_ms)
        } else {
            Duration::ZERO
        },
        explain_denials: args.explain_denials,
        token_binding: !args.no_token_binding,
        mds_tls: (provider == Provider::Gcp)
            .then(|| proxy::mds_tls::MdsTls::new(args.gcp_mtls_dir.clone())),
    }
}

/// The shield's cache and the metadata service's request limits: the provider's documented
/// ones, or `--upstream-rate` and `--upstream-in-flight` for every diverted endpoint (a
/// managed-identity limit stays).
fn shield_settings(
    args: &RunArgs,
    provider: Provider,
    endpoints: &[std::net::SocketAddr],
) -> proxy::shield::Settings {
    use proxy::shield::paths::{Limit, documented_limits};
    let mut limits = documented_limits(provider);
    if args.upstream_rate.is_some() || args.upstream_in_flight.is_some() {
        limits.retain(|limit| limit.prefix != "/");
        for endpoint in endpoints {
            limits.push(Limit {
                address: endpoint.ip(),
                prefix: "/",
                rate: args.upstream_rate.unwrap_or(0),
                in_flight: args.upstream_in_flight.unwrap_or(0),
            });
        }
    }
    proxy::shield::Settings {
        cache: !args.no_cache,
        limits,
        wait: Duration::from_millis(args.upstream_wait_ms),
    }
}

/// A listening socket on `addr`: the predecessor's, if it handed one over, else a new one.
/// Not registered with a runtime: the serving threads each register a copy with their own.
async fn listen(
    received: &mut Vec<std::net::TcpListener>,
    addr: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpListener> {
    if let Some(i) = received
        .iter()
        .position(|l| l.local_addr().is_ok_and(|a| a == addr))
    {
        let listener = received.swap_remove(i);
        listener.set_nonblocking(true)?;
        return Ok(listener);
    }
    TcpListener::bind(addr).await?.into_std()
}

/// How long a starting agent on Kubernetes waits for its first listing before it serves.
const READY_WAIT: Duration = Duration::from_secs(10);
/// When the other programs at connect() are looked at.
const NEIGHBOUR_CHECK_DELAY: Duration = Duration::from_secs(1);

/// Waits until `ready` holds, at most `limit`; whether it does.
async fn until_ready(ready: &metrics::Readiness, limit: Option<Duration>) -> bool {
    let started = std::time::Instant::now();
    while !ready() {
        if limit.is_some_and(|limit| started.elapsed() >= limit) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Says what other programs at connect() mean for enforcement (see `loader::neighbours`):
/// one that runs first may take metadata connects before the agent sees them.
fn warn_of_neighbours(enforcer: &Enforcer, mount: &std::path::Path, cgroup: &std::path::Path) {
    let neighbours = match enforcer.neighbours(mount, cgroup) {
        Ok(neighbours) => neighbours,
        Err(error) => {
            tracing::warn!(%error, "cannot list the other programs at connect()");
            return;
        }
    };
    for other in neighbours {
        let name = other.name.as_deref().unwrap_or("?");
        if other.runs_first {
            tracing::error!(
                hook = other.hook,
                program_id = other.id,
                program = name,
                attached_at = %other.cgroup,
                "another program runs at connect() before the agent's on the enforced cgroups: \
                 if it redirects metadata connects (Azure's guest proxy agent does, from the \
                 cgroup root), they never reach the agent and its policies do not apply. \
                 Enforce a subtree below it (--cgroup: a cgroup's own programs run before its \
                 parents'), or remove it; attaching it after the agent holds only until the \
                 agent's next upgrade or restart"
            );
        } else {
            tracing::info!(
                hook = other.hook,
                program_id = other.id,
                program = name,
                attached_at = %other.cgroup,
                "another program runs at connect() after the agent's: diverted connects reach \
                 it with the agent's address, and the agent's own requests to the metadata \
                 service pass through it (Azure's guest proxy agent serves root by default)"
            );
        }
    }
}

/// The per-caller state, empty, with the command line's limits; idle upstream connections
/// kept for each of `serve_threads`.
fn caller_state(
    args: &RunArgs,
    serve_threads: usize,
    tokens: Arc<proxy::tokens::TokenBindings>,
) -> proxy::CallerState {
    proxy::CallerState {
        limits: proxy::limits::Limits::new(proxy::limits::LimitsConfig {
            max_in_flight: args.max_in_flight_per_caller,
            rate: args.rate_per_caller,
            burst: args.burst_per_caller,
            max_connections: args.max_connections,
        }),
        pool: Arc::new(proxy::pool::UpstreamPool::new(serve_threads)),
        tokens,
    }
}

/// SIGUSR2: starts the program at this process's own path (after a package upgrade, the new
/// version) with the same arguments and environment; it takes the listening sockets over
/// (see `handover`) and this agent drains and exits. As nginx's binary upgrade, so that a
/// package's upgrade keeps its service running: the successor tells systemd it is the main
/// process now. Until it has taken over, this agent serves; if it exits first, nothing changed.
async fn upgrade_in_place() {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.is_empty() {
        tracing::warn!("SIGUSR2: this process's path is unknown; no upgrade");
        return;
    }
    let program = args.remove(0);
    let child = std::process::Command::new(&program)
        .args(args)
        // The watchdog is the successor's once it is the main process.
        .env_remove("WATCHDOG_PID")
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            tracing::warn!(%error, program = %program.to_string_lossy(), "SIGUSR2: cannot start the successor");
            return;
        }
    };
    tracing::info!(pid = child.id(), program = %program.to_string_lossy(), "SIGUSR2: started the successor; it takes over");
    // Polled, not waited for in a thread (which would keep this process from exiting): a
    // successor that fails is reaped and reported; one that takes over outlives this agent.
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    loop {
        poll.tick().await;
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(%status, "SIGUSR2: the successor exited; still serving");
                return;
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "SIGUSR2: cannot watch the successor");
                return;
            }
        }
    }
}

/// Takes the predecessor's token bindings and inventory once it has drained; until then an
/// unknown token waits for them (see `proxy::tokens`).
async fn take_predecessor_state(
    takeover: crate::handover::Takeover,
    tokens: &proxy::tokens::TokenBindings,
    inventory: &crate::inventory::Inventory,
) {
    match tokio::task::spawn_blocking(move || takeover.serving()).await {
        Ok(Ok(state)) => {
            let bindings = state.tokens.len();
            tokens.import(
                state
                    .tokens
                    .into_iter()
                    .map(|(hash, cgroup_id, uid, gid, left)| {
                        let owner = crate::identity::CallerKey {
                            cgroup_id,
                            uid,
                            gid,
                        };
                        (hash, owner, Duration::from_millis(left))
                    }),
            );
            inventory.merge(state.inventory);
            tracing::info!(
                token_bindings = bindings,
                "took over from the previous agent"
            );
        }
        Ok(Err(error)) => {
            tokens.stop_awaiting();
            tracing::warn!(%error, "the previous agent's state did not arrive; its tokens get 401 and are fetched anew");
        }
        Err(error) => {
            tokens.stop_awaiting();
            tracing::warn!(%error, "the handover thread failed");
        }
    }
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    // First of all: a SIGTERM during start-up must end in an orderly exit, not the default
    // action (the handlers only exist once registered).
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr2 = signal(SignalKind::user_defined2())?;
    // Everything that can be wrong with the configuration is found before anything is bound
    // or attached.
    let policy = Arc::new(
        PolicyStore::load(args.policy.clone(), args.unmatched, args.mode)
            .map_err(RunError::Policy)?,
    );
    if args.mode == crate::policy::Mode::Audit {
        tracing::warn!(
            "--mode audit: a dry run, nothing is denied (would-be denials are logged and counted as would-deny)"
        );
    }
    if policy.current().policies().is_empty() {
        tracing::warn!(
            unmatched = %args.unmatched,
            "no policy files: every caller gets the --unmatched decision"
        );
    }
    let pods = Arc::new(PodDirectory::default());
    if let Some(file) = &args.pods {
        pods.load_file(file).map_err(RunError::Config)?;
    }
    let mount = fs::cgroup2_mount().map_err(|e| RunError::Config(e.to_string()))?;
    let collapsing = fs::collapsing_v1_controllers(&fs::mounts()?);
    if !collapsing.is_empty() && !args.allow_cgroup_v1_net {
        return Err(RunError::Config(format!(
            "cgroup v1 {} is mounted: once used, the kernel stops matching sockets to cgroup v2 \
             and per-cgroup enforcement would silently apply to the wrong cgroups. Unmount it \
             (or pass --allow-cgroup-v1-net if it is certainly unused). Any enforcement already \
             pinned stays in place.",
            collapsing.join(" and ")
        )));
    }
    let cgroup = enforced_root(&mount, args.cgroup.as_deref())?;
    let provider = match args.provider {
        ProviderSetting::Fixed(provider) => provider,
        ProviderSetting::Auto => match crate::detect::detect(&args.pin_dir).await {
            Some(provider) => {
                tracing::info!(%provider, "detected the cloud provider");
                provider
            }
            None => {
                tracing::warn!(
                    "no metadata service answered the provider probes: guarding aws's \
                     addresses (pass --provider to choose)"
                );
                Provider::Aws
            }
        },
    };
    let mut endpoints = args.effective_endpoints(provider);
    for problem in crate::provider::resolve_link_local(&mut endpoints) {
        tracing::warn!("{problem}");
    }
    let kube_client = if args.kubernetes {
        Some(
            kube::Client::try_default()
                .await
                .map_err(|e| RunError::Config(format!("--kubernetes: no API client: {e}")))?,
        )
    } else {
        None
    };
    let resolver = Resolver::new(&mount, &cgroup, pods.clone())?;

    // An agent already serving hands its listening sockets over (an upgrade; see `handover`).
    let mut takeover = crate::handover::take_over(&args.state_dir).map_err(|e| {
        RunError::Config(format!(
            "taking over from the agent running at {}: {e}",
            args.state_dir.display()
        ))
    })?;
    let took_over = takeover.is_some();
    let mut received = takeover
        .as_mut()
        .map(|t| std::mem::take(&mut t.listeners))
        .unwrap_or_default();
    let from_systemd = crate::notify::passed_listeners();
    if takeover.is_some() {
        tracing::info!(
            sockets = received.len(),
            "taking over from the running agent"
        );
    } else if !from_systemd.is_empty() {
        // A restart (after a crash): systemd kept the sockets, and connects made meanwhile
        // waited in their accept queue instead of being refused.
        tracing::info!(
            sockets = from_systemd.len(),
            "listening sockets kept by systemd"
        );
        received = from_systemd;
    }
    // Listen before attaching: once the programs divert, the listener must be there.
    let offered = received.len();
    let listener = listen(&mut received, args.listen.into())
        .await
        .map_err(|source| RunError::Listen {
            addr: args.listen,
            source,
        })?;
    let (pod_address, problem) = args.pod_address.resolve();
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
    let mut listeners = vec![listener];
    if let Some(ip) = pod_address {
        let addr = std::net::SocketAddrV4::new(ip, args.listen.port());
        listeners.push(
            listen(&mut received, addr.into())
                .await
                .map_err(|source| RunError::Listen { addr, source })?,
        );
    }
    // Every listener connects are diverted to was made by an earlier agent (a predecessor's,
    // or kept by systemd); the metrics listener's connections need no attribution.
    let listeners_adopted = offered - received.len() == listeners.len();
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(
            listen(&mut received, addr)
                .await
                .and_then(TcpListener::from_std)
                .map_err(|e| RunError::Config(format!("--metrics-listen {addr}: {e}")))?,
        ),
        None => None,
    };
    // systemd keeps a copy (FileDescriptorStoreMax= in the unit): if this agent crashes, the
    // sockets stay open and the restarted agent is given them, so connects queue rather than
    // fail while no agent runs. Outside systemd this does nothing.
    let mut kept: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    kept.extend(metrics_listener.as_ref().map(AsRawFd::as_raw_fd));
    if let Err(error) = crate::notify::notify_with_fds("FDSTORE=1\nFDNAME=listeners", &kept) {
        tracing::warn!(%error, "systemd does not keep the listening sockets");
    }
    let mut enforcer = Enforcer::attach(&AttachConfig {
        cgroup: &cgroup,
        pin_dir: &args.pin_dir,
        divert_to: args.listen,
        pod_divert_to: pod_address,
        endpoints: &endpoints,
        refuse_raw_sockets: !args.allow_raw_sockets,
        listeners_adopted,
    })?;
    // Connects are diverted from here on; connections made before are closed, so that an
    // open keep-alive connection cannot dodge the policy. Not when taking over: enforcement
    // never lapsed, and the connections to the metadata service in the enforced tree are then
    // the predecessor's own upstream ones (a pod's agent is in the tree it enforces), with
    // requests in flight that it is still serving.
    if !took_over {
        close_preexisting(&resolver, &endpoints);
    }
    tracing::info!(
        cgroup = %cgroup.display(),
        pin_dir = %args.pin_dir.display(),
        listen = %args.listen,
        pod_address = %pod_address.map_or("none".to_owned(), |ip| ip.to_string()),
        %provider,
        endpoints = ?endpoints,
        policies = ?policy.current().policies().iter().map(|p| p.name()).collect::<Vec<_>>(),
        unmatched = %args.unmatched,
        mode = ?args.mode,
        "enforcing"
    );

    // A predecessor's token bindings are hashed with its key: this agent takes the key over,
    // and the bindings once the predecessor has drained.
    let tokens = Arc::new(match &takeover {
        Some(takeover) => {
            let tokens = proxy::tokens::TokenBindings::with_key(takeover.token_key);
            tokens.await_predecessor();
            tokens
        }
        None => proxy::tokens::TokenBindings::default(),
    });
    let kernel_log = enforcer.kernel_log.take();
    let enforcer = Arc::new(enforcer);
    let metrics = Arc::new(Metrics::default());
    let tally = Arc::new(crate::tally::Tally::default());
    // Counted once: the pool keeps a shard per serving thread.
    let serve_threads = args.serve_threads();
    let filter = Arc::new(Filter {
        enforcer: enforcer.clone(),
        resolver,
        policy: policy.clone(),
        provider,
        settings: settings(&args, provider, endpoints.clone()),
        callers: caller_state(&args, serve_threads, tokens.clone()),
        shield: proxy::shield::Shield::new(shield_settings(&args, provider, &endpoints)),
        sinks: proxy::audit::Sinks {
            metrics: metrics.clone(),
            tally: tally.clone(),
            inventory: Arc::new(crate::inventory::Inventory::default()),
            node: args.node_name.clone().unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_default()
            }),
            denial_events: kube_client.clone().map(|client| {
                crate::kube::events::DenialEvents::start(
                    client,
                    args.node_name.clone().unwrap_or_default(),
                )
            }),
        },
    });
    // Healthy from here on: attached, policy loaded. Ready once the watches have listed.
    let synced = Arc::new(crate::kube::watch::Synced::default());
    let mut tasks = Tasks::default();
    // A moment after start: on an upgrade the predecessor's links, replaced by this agent's,
    // may still be attached for a little while.
    let (neighbours_of, mount_dir, enforced_dir) =
        (enforcer.clone(), mount.clone(), cgroup.clone());
    tasks.job("other programs at connect()", async move {
        tokio::time::sleep(NEIGHBOUR_CHECK_DELAY).await;
        warn_of_neighbours(&neighbours_of, &mount_dir, &enforced_dir);
    });
    if let (Some(client), Some(key)) = (&kube_client, &args.remove_node_taint) {
        let synced = synced.clone();
        tasks.job(
            "node taint removal",
            crate::kube::taint::remove_when_ready(
                client.clone(),
                args.node_name.clone().unwrap_or_default(),
                key.clone(),
                move || synced.all(),
            ),
        );
    }
    let ready: metrics::Readiness = if let Some(client) = kube_client {
        tasks.service(
            "Kubernetes watches",
            Arc::new(crate::kube::watch::Watches {
                client,
                node: args.node_name.clone().unwrap_or_default(),
                pods: pods.clone(),
                policy: policy.clone(),
                metrics: metrics.clone(),
                synced: synced.clone(),
            })
            .run(),
        );
        Arc::new(move || synced.all())
    } else {
        Arc::new(|| true)
    };
    let metrics_fd = metrics_listener.as_ref().map(AsRawFd::as_raw_fd);
    if let Some(listener) = metrics_listener {
        tasks.service(
            "metrics endpoint",
            metrics::serve(
                listener,
                metrics,
                policy.clone(),
                enforcer.clone(),
                ready.clone(),
            ),
        );
    }
    tasks.service("policy file watch", policy.clone().watch());
    if let Some(kernel_log) = kernel_log {
        tasks.service("kernel log", kernel_log.run());
    }
    let (pool, tokens) = (filter.callers.pool.clone(), filter.callers.tokens.clone());
    tasks.service("idle connection and token sweep", async move {
        let mut interval = tokio::time::interval(crate::proxy::pool::IDLE_TIMEOUT / 2);
        loop {
            interval.tick().await;
            pool.sweep();
            tokens.sweep();
        }
    });
    // Kernel verdicts (a predecessor's included) are asked again of each policy version once
    // this agent knows what it enforces (on Kubernetes: the pods and policies listed); those
    // a version no longer makes are removed.
    let (verdicts, changes, known) = (filter.clone(), policy.subscribe(), ready.clone());
    let serving_ready = ready.clone();
    tasks.service("kernel verdict revalidation", async move {
        until_ready(&known, None).await;
        let still_made = |caller| {
            let identity = verdicts.resolver.identify_key(caller)?;
            let admission = verdicts.policy.current().admit(&identity);
            admission.kernel_verdict.map(|(verdict, _)| verdict)
        };
        verdicts.enforcer.verdicts.follow(changes, still_made).await;
    });
    tasks.service("upgrade on SIGUSR2", async move {
        while sigusr2.recv().await.is_some() {
            upgrade_in_place().await;
        }
    });
    tasks.service("audit lines of busy workers", async {
        // A worker writes its batch of audit lines when it goes idle; one that stays busy has
        // its lines written by this at the latest.
        let mut every = tokio::time::interval(crate::audit::LONGEST_WAIT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            crate::audit::flush_all();
        }
    });
    let store = policy.clone();
    tasks.service("SIGHUP reload", async move {
        while sighup.recv().await.is_some() {
            crate::audit::reopen();
            let store = store.clone();
            let _ = tokio::task::spawn_blocking(move || store.reload_and_log("SIGHUP")).await;
        }
    });
    // Attached, policy loaded, listening: tell systemd (Type=notify) and start the watchdog.
    let status = format!(
        "STATUS=enforcing {} with {} policies",
        cgroup.display(),
        filter.policy.current().policies().len()
    );
    // A successor started by its predecessor (SIGUSR2) becomes the service's main process.
    let main_pid = if took_over {
        format!("MAINPID={}\n", std::process::id())
    } else {
        String::new()
    };
    if let Err(error) = crate::notify::notify(&format!("READY=1\n{main_pid}{status}")) {
        tracing::warn!(%error, "cannot notify systemd");
    }
    tasks.service(
        "state file",
        crate::status::write_periodically(
            args.state_dir.clone(),
            crate::status::AgentState {
                pid: std::process::id(),
                cgroup: cgroup.clone(),
                listen: args.listen.to_string(),
                policy_version: 0,
                policy_sources: Vec::new(),
                policies: Vec::new(),
                decisions: Default::default(),
                recent_denials: Vec::new(),
                inventory: Vec::new(),
            },
            filter.policy.clone(),
            tally,
            filter.sinks.inventory.clone(),
        ),
    );
    if let Some(interval) = crate::notify::watchdog_interval() {
        tasks.service("systemd watchdog", crate::notify::watchdog(interval));
    }
    // On Kubernetes the pods and policies are listed before this agent serves: a request
    // decided before then would meet the node policy alone (pods would be denied what their
    // policies allow). Meanwhile connects wait in the accept queue, or the predecessor serves
    // them; a cluster that has not answered within READY_WAIT gets what is known.
    if args.kubernetes && !until_ready(&serving_ready, Some(READY_WAIT)).await {
        tracing::warn!(
            waited_ms = READY_WAIT.as_millis() as u64,
            "pods and policies not listed yet: serving with what is known"
        );
    }
    // Upgrades: take over from the predecessor (if any), then offer this agent's sockets to
    // the next one.
    let (handed_over, mut successor) = tokio::sync::oneshot::channel();
    let mut sockets: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    sockets.extend(metrics_fd);
    let (state_dir, tokens, inventory) = (
        args.state_dir.clone(),
        filter.callers.tokens.clone(),
        filter.sinks.inventory.clone(),
    );
    tasks.job("upgrade handover", async move {
        if let Some(takeover) = takeover {
            take_predecessor_state(takeover, &tokens, &inventory).await;
        }
        match crate::handover::Offer::open(&state_dir) {
            Ok(offer) => {
                let next = offer.hand_over(sockets, tokens.key()).await;
                let _ = handed_over.send(next);
            }
            Err(error) => {
                tracing::warn!(%error, "no handover socket: an upgrade will refuse connects while no agent listens");
            }
        }
    });
    let mut failure = None;
    let mut next_agent = None;
    let shutdown = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM"),
            _ = sigint.recv() => tracing::info!("SIGINT"),
            Ok(next) = &mut successor => {
                tracing::info!("a successor serves; draining");
                next_agent = Some(next);
            }
            failed = tasks.failure() => {
                tracing::error!(task = %failed, "a background task ended; stopping (the programs stay attached: callers are refused until the agent is back)");
                failure = Some(failed);
            }
        }
    };
    let served = proxy::serve(
        listeners,
        serve_threads,
        filter.clone(),
        shutdown,
        Duration::from_secs(args.drain_seconds),
    )
    .await;
    if let Some(next) = next_agent {
        // Drained: what this agent learnt goes to its successor.
        let state = crate::handover::State {
            tokens: filter
                .callers
                .tokens
                .export()
                .into_iter()
                .map(|(hash, owner, left)| {
                    let left = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                    (hash, owner.cgroup_id, owner.uid, owner.gid, left)
                })
                .collect(),
            inventory: filter.sinks.inventory.snapshot(),
        };
        match tokio::task::spawn_blocking(move || next.send_state(state)).await {
            Ok(Ok(())) => tracing::info!("handed over"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "the successor did not take this agent's state")
            }
            Err(error) => tracing::warn!(%error, "the handover thread failed"),
        }
        tasks.stop().await;
        if args.kubernetes {
            // The pod stays until the DaemonSet removes it: exiting now would have the kubelet
            // restart the container, which would take the sockets back.
            let _ = sigterm.recv().await;
        }
        return Ok(());
    }
    // Not after a handover: the service goes on, served by the successor.
    let _ = crate::notify::notify("STOPPING=1");
    tasks.stop().await;
    let _ = std::fs::remove_file(args.state_dir.join(crate::status::STATE_FILE));
    if let Ok(counters) = filter.enforcer.counters() {
        tracing::info!(?counters, "stopped; programs stay attached (pinned)");
    }
    served?;
    match failure {
        Some(failed) => Err(RunError::Task(failed)),
        None => Ok(()),
    }
}
