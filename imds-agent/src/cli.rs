//! Command line. The doc comments are the help text.

use std::{net::SocketAddrV4, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{policy::Unmatched, provider::Provider};

/// Default pin directory: one installation per host.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/imds-agent";
/// Where the running agent keeps its state for `status` (systemd's RuntimeDirectory).
pub const DEFAULT_STATE_DIR: &str = "/run/imds-agent";

/// Per-cgroup enforcer for the cloud instance metadata service (IMDS).
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log format on stderr. Audit lines (one per request) are log events with target
    /// imds_agent::audit. Filter with IMDS_AGENT_LOG (e.g. "info", "imds_agent=debug").
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Where audit lines go: `stderr` (with the other logs, as --log-format writes them),
    /// `stdout`, or a file to append to. Apart from stderr they are always JSON, one line per
    /// request, so that a collector takes them apart from the operational log. A file is
    /// reopened on SIGHUP, after a log rotation moved it.
    #[arg(long, default_value = "stderr", global = true)]
    pub audit_log: String,
    /// How JSON audit lines name their fields: `default`, or `otel` for OpenTelemetry's
    /// semantic conventions (http.request.method, url.path, k8s.pod.name, container.id, ...;
    /// ECS shares most), the agent's own fields under `imds_agent.`.
    #[arg(long, value_enum, default_value_t = AuditNames::Default, global = true)]
    pub audit_names: AuditNames,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuditNames {
    Default,
    Otel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Generated {
    Man,
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the programs and serve diverted metadata requests until SIGTERM or SIGINT.
    ///
    /// The programs stay attached (pinned) when the agent exits, on purpose: enforced
    /// cgroups then cannot reach the metadata service at all until an agent serves again.
    /// Use `imds-agent detach` to remove enforcement.
    Run(Box<RunArgs>),
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The caller inventory of the running agent: per workload (pod and container, unit or
    /// cgroup), its executables, the path groups it reads, its denials, and its requests
    /// without a session token (IMDSv1): who must change before tokens can be required.
    Report {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "suggest_policy")]
        json: bool,
        /// Print least-privilege policies written from what each workload did (run the
        /// agent with --mode audit to collect it): policy files as YAML documents, one per
        /// workload, allowing the path groups and paths it was allowed, with the methods it
        /// used, and tokens.required where it used session tokens only.
        #[arg(long)]
        suggest_policy: bool,
        /// With --suggest-policy: ImdsPolicy objects for the pods instead (other workloads
        /// are left out: node policies are files).
        #[arg(long, requires = "suggest_policy")]
        kubernetes: bool,
        /// With --suggest-policy: only requests made since then, a duration back from now
        /// (30m, 24h, 7d) or a UTC time (2026-12-01T00:00:00Z).
        #[arg(long, requires = "suggest_policy", value_parser = parse_since)]
        since: Option<String>,
    },
    /// Print the ImdsPolicy and ClusterImdsPolicy CustomResourceDefinitions (YAML).
    Crds,
    /// Remove enforcement: unpin the links (detaching the programs) and the maps.
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print the manual page (roff) or a shell's completions, as the package installs them.
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
    },
    /// Show whether enforcement is attached, the running agent's policy (version, files),
    /// counters by decision and the recent denials.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Root of the enforced cgroup tree: a cgroup v2 directory. Default: the cgroup v2 root
    /// found in /proc/self/mountinfo. Policy cgroup paths are relative to it.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Policy file or directory (*.yaml, *.yml in name order); repeatable.
    #[arg(long, required = true)]
    pub policy: Vec<PathBuf>,
    /// What happens to callers that no policy selects.
    #[arg(long, value_enum, default_value_t = Unmatched::Deny, env = "IMDS_AGENT_UNMATCHED")]
    pub unmatched: Unmatched,
    /// enforce, or audit: a dry run of every policy. Nothing is denied (nor refused in the
    /// kernel); each request that would be denied is served, logged with decision
    /// "would-deny" naming the policy and rule, and counted.
    #[arg(long, value_enum, default_value_t = crate::policy::Mode::Enforce, env = "IMDS_AGENT_MODE")]
    pub mode: crate::policy::Mode,
    /// Pod metadata file (`pods: [{uid, namespace, name, labels, serviceAccount,
    /// containers: [{name, id}]}]`), for pod selectors on hosts without an API server.
    #[arg(long)]
    pub pods: Option<PathBuf>,
    /// Watch the Kubernetes API server for this node's pods (pod selectors) and for
    /// ImdsPolicy and ClusterImdsPolicy resources (in force with the --policy files). The
    /// client is configured from KUBECONFIG, ~/.kube/config or the in-cluster service account.
    #[arg(long, requires = "node_name", conflicts_with = "pods")]
    pub kubernetes: bool,
    /// This node's name, for the pod watch's spec.nodeName field selector (the DaemonSet sets
    /// it from spec.nodeName with the downward API).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Once attached and synced, remove this taint from the node (e.g.
    /// imds-agent.dev/agent-not-ready, registered by the kubelet with
    /// --register-with-taints), so that pods start only where enforcement is in place. Needs
    /// get and patch on nodes.
    #[arg(long, requires = "kubernetes")]
    pub remove_node_taint: Option<String>,
    /// How long a connection from a pod the watch has not reported yet waits for it, in
    /// milliseconds; then it is decided without pod metadata (only policies that do not select
    /// by namespace, labels, service account or container apply: never another pod's).
    #[arg(long, default_value_t = 2000)]
    pub unknown_pod_wait_ms: u64,
    /// bpffs directory for the pinned links and maps (mounted at /sys/fs/bpf if needed).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Where the agent listens for diverted connections. A port below 1024, so that an
    /// unprivileged process cannot take it over while the agent is down.
    #[arg(long, default_value = "127.0.0.1:954")]
    pub listen: SocketAddrV4,
    /// Where callers in other network namespaces (pods) reach the agent: an IPv4 address of
    /// this node, where the agent also listens on the --listen port. Their diverted connects
    /// go there, since a pod's loopback is its own. `auto`: the address of the default
    /// route's interface; `none`: such connects are refused. A comma-separated list (as
    /// Kubernetes writes status.hostIPs) gives its first IPv4 address; a list of IPv6
    /// addresses only (an IPv6-only node) refuses pods' connects, with a warning. On
    /// Kubernetes the DaemonSet passes the node's addresses (status.hostIPs). A pod's connection is attributed in the
    /// pod's network namespace, found by the route to the pod's address: its veth (or netkit)
    /// link, or the bridge port behind which the pod's address was learned.
    #[arg(long, default_value = "auto")]
    pub pod_address: crate::node::PodAddress,
    /// The cloud the agent runs on (auto, aws, gcp, azure, oci, openstack, digitalocean,
    /// alibaba, hetzner, volcengine); picks the metadata endpoints diverted by default and the
    /// request rules: aws 169.254.169.254:80 and [fd00:ec2::254]:80; openstack
    /// 169.254.169.254:80 and [fe80::a9fe:a9fe]:80; alibaba 100.100.100.200:80; volcengine
    /// 100.96.0.96:80; azure 169.254.169.254:80, 168.63.129.16:80 and :32526 (its WireServer
    /// and HostGAPlugin); the others 169.254.169.254:80.
    /// `auto`: probe each provider's metadata service at start-up (at most 0.5 s); if none
    /// answers, guard aws's addresses.
    #[arg(long, default_value = "auto", env = "IMDS_AGENT_PROVIDER")]
    pub provider: ProviderSetting,
    /// A further metadata endpoint to divert (ADDRESS:PORT; IPv6 as [ADDRESS]:PORT, link-local
    /// as [ADDRESS%INTERFACE]:PORT); repeatable. E.g. 169.254.170.2:80 to govern ECS task
    /// credentials. IPv6 connects to addresses embedding an IPv4 endpoint (::ffff:a.b.c.d,
    /// ::a.b.c.d, 64:ff9b::a.b.c.d) are diverted too. Other TCP ports on an endpoint's address
    /// are refused, except DNS (53).
    /// From the environment: IMDS_AGENT_ENDPOINTS, comma-separated.
    #[arg(
        long = "endpoint",
        value_parser = crate::provider::parse_endpoint,
        env = "IMDS_AGENT_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Vec<std::net::SocketAddr>,
    /// Divert only the --endpoint addresses, not the provider's defaults.
    #[arg(long, requires = "endpoints")]
    pub no_default_endpoints: bool,
    /// Serve Prometheus /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9754). An
    /// address in brackets may be of either family, so `[$(NODE_IP)]:9754` serves an IPv4 or
    /// an IPv6 node.
    #[arg(long, value_parser = parse_listen_address, env = "IMDS_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Run although a cgroup v1 net_cls or net_prio hierarchy is mounted (by default the agent
    /// refuses: their use disables the kernel's cgroup v2 socket matching).
    #[arg(long)]
    pub allow_cgroup_v1_net: bool,
    /// Explain each denial in an `imds-agent-explain` response header: the decision and, for
    /// every policy, whether it selected the caller (which field did not match) and what it
    /// decided, as `imds-agent policy explain` prints it. For developers fixing a policy;
    /// off by default, since it shows the caller every policy's name and source.
    #[arg(long)]
    pub explain_denials: bool,
    /// Accept AWS session tokens from any caller. By default a token is bound to the caller
    /// (cgroup, uid, gid) it was handed out to through the agent, and refused (401) from
    /// anyone else, and so are tokens the agent did not hand out; SDKs then fetch their own.
    #[arg(long)]
    pub no_token_binding: bool,
    /// Let enforced cgroups create raw IP sockets. By default they cannot: a raw socket can
    /// forge a TCP handshake to the metadata service past the connect hooks.
    #[arg(long)]
    pub allow_raw_sockets: bool,
    /// How long a client may take to send one request head, from its first byte (slowloris
    /// bound), in milliseconds; then 408 and close.
    #[arg(long, default_value_t = 10_000)]
    pub head_timeout_ms: u64,
    /// How long a keep-alive connection may sit idle between requests, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// How long the metadata service may take to answer, in milliseconds: its head and a body
    /// of up to 64 KiB (read whole before it is answered) within this bound together; then 504.
    #[arg(long, default_value_t = 15_000)]
    pub upstream_timeout_ms: u64,
    /// Cap on GCP wait_for_change long-polls (their timeout_sec, plus the upstream timeout),
    /// in seconds.
    #[arg(long, default_value_t = 3600)]
    pub long_poll_max_seconds: u64,
    /// Serve no answer from memory: by default answers fixed for the instance's life
    /// (identifiers, type, placement, account, zone), role credentials and access tokens
    /// (until 20 minutes before they expire) are read from the metadata service once.
    #[arg(long)]
    pub no_cache: bool,
    /// At most this many requests per second to the metadata service (0: no bound). Default:
    /// the service's documented limit (Azure: 5, and 20 for managed identities); none for the
    /// others.
    #[arg(long)]
    pub upstream_rate: Option<u32>,
    /// At most this many requests in flight to the metadata service (0: no bound). Default:
    /// the service's documented limit (Azure's managed identities: 5); none otherwise.
    #[arg(long)]
    pub upstream_in_flight: Option<u32>,
    /// How long a request may wait for its turn under those limits, in milliseconds; then
    /// the agent answers 429 itself, as the service would have.
    #[arg(long, default_value_t = 5_000)]
    pub upstream_wait_ms: u64,
    /// Requests one caller (cgroup and uid) may have in flight at once; more get 429.
    #[arg(long, default_value_t = 16)]
    pub max_in_flight_per_caller: u32,
    /// Sustained requests per second per caller; beyond it (and the burst), 429.
    #[arg(long, default_value_t = 50.0)]
    pub rate_per_caller: f64,
    /// Requests a caller may make in a burst above the rate.
    #[arg(long, default_value_t = 100.0)]
    pub burst_per_caller: f64,
    /// Client connections open at once, over all callers; more get 503 and are closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Threads serving client connections; each serves a connection it accepted to its end,
    /// upstream included [default: half the CPUs the agent may use, at least 1, at most 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub serve_threads: Option<u16>,
    /// Where the agent writes its state for `imds-agent status`.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Upper bound on finishing in-flight requests at shutdown, in seconds.
    #[arg(long, default_value_t = 10)]
    pub drain_seconds: u64,
    /// With --provider gcp: where the node's credentials for the metadata server's mutual TLS
    /// are (root.crt, client.key, as GCP's guest agent writes them). Where they exist, the
    /// agent's requests to the metadata server use https://metadata.google.internal with
    /// them; workloads keep speaking plain HTTP to the agent (GCE_METADATA_MTLS_MODE=none).
    #[arg(long, default_value = crate::proxy::mds_tls::DEFAULT_DIR, env = "IMDS_AGENT_GCP_MTLS_DIR")]
    pub gcp_mtls_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files or directories without starting anything; prints every error
    /// as FILE:LINE:COLUMN: FIELD: REASON and exits 64 if there is one.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the decision for one request, the policy and rule that made it, and why each
    /// other policy did not apply.
    Explain(ExplainArgs),
    /// Check tables of cases (caller, request, expected decision) against policies without
    /// attaching anything; prints PASS or FAIL per case and exits 1 if one fails, 64 if a
    /// file cannot be used. The case file's format is in the README.
    Test {
        /// Case files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Policy file or directory besides those the case files name; repeatable.
        #[arg(long)]
        policy: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Policy file or directory; repeatable.
    #[arg(long, required = true)]
    pub policy: Vec<PathBuf>,
    /// The caller's cgroup path, relative to the enforced root (e.g. /web, or a kubepods path).
    #[arg(long, conflicts_with = "pod", required_unless_present = "pod")]
    pub cgroup: Option<String>,
    /// The caller as NAMESPACE/NAME[/CONTAINER], looked up in --pods.
    #[arg(long, requires = "pods")]
    pub pod: Option<String>,
    /// Pod metadata file, as for `run --pods`.
    #[arg(long)]
    pub pods: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    /// Default: the uid.
    #[arg(long)]
    pub gid: Option<u32>,
    /// The caller's executable, for `executables` selectors.
    #[arg(long)]
    pub exe: Option<String>,
    #[arg(long, value_enum, default_value_t = Unmatched::Deny)]
    pub unmatched: Unmatched,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
}

/// `--provider`: a provider, or `auto` (detected at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderSetting {
    Auto,
    Fixed(Provider),
}

impl std::str::FromStr for ProviderSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        Provider::from_str(s, false).map(Self::Fixed).map_err(|_| {
            let names: Vec<String> = Provider::value_variants()
                .iter()
                .map(ToString::to_string)
                .collect();
            format!("{s:?}: expected auto or one of {}", names.join(", "))
        })
    }
}

/// Serving threads by default at most: a metadata service's load does not need more.
const MAX_DEFAULT_SERVE_THREADS: usize = 4;

/// Serving threads without `--serve-threads`: half the CPUs this process may use, at least
/// one. Every request has a caller on this node too: threads that compete with their callers
/// for every CPU wake more often for fewer requests each (BENCHMARKS.md's before/after table).
pub fn default_serve_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, std::num::NonZero::get) / 2)
        .clamp(1, MAX_DEFAULT_SERVE_THREADS)
}

impl RunArgs {
    /// How many threads serve client connections.
    pub fn serve_threads(&self) -> usize {
        match self.serve_threads {
            Some(threads) => usize::from(threads),
            None => default_serve_threads(),
        }
    }

    /// The endpoints to divert on `provider`: its defaults (unless turned off) and the extra
    /// ones, each once.
    pub fn effective_endpoints(&self, provider: Provider) -> Vec<std::net::SocketAddr> {
        let mut all = if self.no_default_endpoints {
            Vec::new()
        } else {
            provider.default_endpoints()
        };
        for endpoint in &self.endpoints {
            // An explicit endpoint replaces a default on the same address and port (it may
            // name the interface of a link-local one).
            all.retain(|e| e.ip() != endpoint.ip() || e.port() != endpoint.port());
            all.push(*endpoint);
        }
        all
    }
}

/// `--since`: a duration back from now (`30m`, `24h`, `7d`, `90s`) or a UTC time as the
/// inventory writes them (`2026-12-01T00:00:00Z`), as that UTC time.
pub fn parse_since(s: &str) -> Result<String, String> {
    let looks_like_time = s.len() == 20
        && s.ends_with('Z')
        && s.as_bytes().get(10) == Some(&b'T')
        && s.bytes().filter(u8::is_ascii_digit).count() == 14;
    if looks_like_time {
        return Ok(s.to_owned());
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    let Some(back) = number
        .parse::<u64>()
        .ok()
        .filter(|_| seconds > 0)
        .and_then(|n| n.checked_mul(seconds))
    else {
        return Err(format!(
            "{s:?}: expected a duration (30m, 24h, 7d) or a UTC time (2026-12-01T00:00:00Z)"
        ));
    };
    let then = std::time::SystemTime::now()
        .checked_sub(std::time::Duration::from_secs(back))
        .unwrap_or(std::time::UNIX_EPOCH);
    Ok(crate::calendar::iso8601(then))
}

/// `ADDRESS:PORT`, `[IPV6]:PORT`, or `[IPV4]:PORT`: brackets are accepted around either
/// family, so a Kubernetes manifest can write `[$(NODE_IP)]:PORT` whatever the node's family.
pub fn parse_listen_address(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let bracketed = s
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
        .and_then(|(ip, port)| Some((ip.parse::<std::net::IpAddr>().ok()?, port.parse().ok()?)));
    bracketed
        .map(|(ip, port)| std::net::SocketAddr::new(ip, port))
        .ok_or_else(|| format!("{s:?}: expected ADDRESS:PORT or [ADDRESS]:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_take_brackets_around_either_family() {
        for (text, expected) in [
            ("127.0.0.1:9754", "127.0.0.1:9754"),
            ("[10.0.0.7]:9754", "10.0.0.7:9754"),
            ("[fd00::7]:9754", "[fd00::7]:9754"),
        ] {
            assert_eq!(parse_listen_address(text), Ok(expected.parse().unwrap()));
        }
        for bad in [
            "fd00::7:9754",
            "[10.0.0.7]",
            "10.0.0.7",
            "[node]:9754",
            "[::1]:x",
        ] {
            assert!(parse_listen_address(bad).is_err(), "{bad} parsed");
        }
    }
}
