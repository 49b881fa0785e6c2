//! `cargo xtask bench`: measurements side by side in one run, in a sandbox, written to
//! BENCHMARKS.md as ratios to a baseline measured in the same run.
//!
//! `imds-bench run` drives; the measured clients are this binary again (`connect`, `http`,
//! `flip`, ...), started inside the sandbox's cgroups and namespace. By part: `clients` (what
//! is measured), `harness` (what it runs on), `report` (the sections of BENCHMARKS.md),
//! `engine`, `reactions`, `profile`, `lines` (a recording by the agent's source lines), `builds` (two agent builds side by side), and `train`
//! (the requests the release build's profile is recorded under).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use imds_agent::{
    identity::{Identity, pods::PodDirectory},
    policy::{CanonicalPath, PolicySet, Unmatched, store::POLL_INTERVAL},
};
use imds_tests::sandbox::{Sandbox, attached_programs, binary};

mod builds;
mod clients;
mod engine;
mod harness;
mod hyper_relay;
mod lines;
mod profile;
mod reactions;
mod report;
mod shield;
mod tokio_relay;
mod train;
mod upgrades;

use engine::*;
use harness::*;
use reactions::*;
use report::*;
use upgrades::*;

#[derive(clap::Parser)]
#[command(
    name = "imds-bench",
    about = "Measurements side by side in one run, in a sandbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Every section, written to BENCHMARKS.md (what `cargo xtask bench` runs).
    Run {
        /// Fewer rounds and requests.
        #[arg(long)]
        quick: bool,
    },
    /// The agent under section 4's load, recorded with perf or counted with strace.
    Profile {
        #[arg(value_parser = ["keepalive", "close"], default_value = "keepalive")]
        mode: String,
        #[arg(value_parser = ["perf", "strace", "none"], default_value = "perf")]
        tool: String,
        /// Where the recording goes (perf.data, strace.txt).
        output: Option<String>,
        /// Load and record iptables + nginx (section 4's classic proxy) instead of the agent.
        #[arg(long, conflicts_with = "hyper_relay")]
        nginx: bool,
        /// With --nginx: nginx writes the agent's audit line per request instead of its own.
        #[arg(long, requires = "nginx")]
        agent_line: bool,
        /// Load and record section 4's hyper relay (the agent's HTTP machinery alone) instead
        /// of the agent.
        #[arg(long, conflicts_with = "tokio_relay")]
        hyper_relay: bool,
        /// Load and record a relay on tokio alone (the hyper relay without hyper).
        #[arg(long, conflicts_with = "nginx")]
        tokio_relay: bool,
    },
    /// A `profile ... perf` recording by the agent's source lines: each sample goes to the
    /// innermost line of imds-agent/src in its call chain (a build with line tables:
    /// CARGO_PROFILE_RELEASE_DEBUG=line-tables-only).
    Lines {
        perf_data: PathBuf,
        /// The recorded agent binary, if it is no longer where perf saw it.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// How many lines to print.
        #[arg(long, default_value_t = 30)]
        top: usize,
    },
    /// The policy engine at scale alone.
    Engine {
        #[arg(default_value_t = 3)]
        rounds: usize,
    },
    /// How fast changes take effect, alone; each round on stderr.
    Reactions {
        #[arg(default_value_t = 20)]
        rounds: usize,
    },
    /// Section 4 (the agent against direct, a bare relay and iptables + nginx) alone.
    Alternatives {
        #[arg(default_value_t = 3)]
        rounds: usize,
    },
    /// The shield (section 8) alone.
    Shield {
        #[arg(default_value_t = 3)]
        rounds: usize,
    },
    /// Upgrades and crashes under load, alone.
    Upgrades {
        #[arg(default_value_t = 3)]
        rounds: usize,
    },
    /// Two agent builds side by side on the same requests in one run: BASELINE (a previous
    /// build's binary) against this build's. Prints a Markdown table of ratios.
    Builds {
        baseline: PathBuf,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Section 4's requests through AGENT (an instrumented build, for `cargo xtask pgo`),
    /// which is then stopped with SIGTERM so that it writes its profile.
    Train { agent: PathBuf },
    // The measured clients and servers (started inside the sandbox by the commands above).
    /// N times connect()+close(); prints "p50 p99 min max" in nanoseconds.
    #[command(hide = true)]
    Connect { addr: SocketAddr, n: usize },
    /// N connect()+close() from each of two cgroups (absolute directories), alternating.
    #[command(hide = true)]
    ConnectAb {
        addr: SocketAddr,
        n: usize,
        cgroup_a: PathBuf,
        cgroup_b: PathBuf,
    },
    /// N GETs of PATH per worker; prints "p50_ns p99_ns requests_per_second".
    #[command(hide = true)]
    Http {
        addr: SocketAddr,
        path: String,
        n: usize,
        concurrency: usize,
        #[arg(value_parser = ["keepalive", "close"])]
        mode: String,
    },
    /// Keep-alive GETs for SECONDS per worker, retrying once where a reused connection was
    /// closed; prints "requests failed p50_ns p99_ns max_ns".
    #[command(hide = true)]
    Sustained {
        addr: SocketAddr,
        path: String,
        seconds: f64,
        workers: usize,
    },
    /// GETs PATH until the status is STATUS; prints when, in nanoseconds since the epoch.
    #[command(hide = true)]
    Flip {
        addr: SocketAddr,
        path: String,
        status: u16,
    },
    /// The non-metadata server of the packet-path measurements.
    #[command(hide = true)]
    Serve { addr: SocketAddr },
    /// A bare TCP relay.
    #[command(hide = true)]
    Relay {
        listen: SocketAddr,
        target: SocketAddr,
    },
    /// An HTTP relay on hyper's server and client, nothing else.
    #[command(hide = true)]
    HyperRelay {
        listen: SocketAddr,
        target: SocketAddr,
    },
    /// The hyper relay without hyper: heads relayed as read, answers to their length.
    #[command(hide = true)]
    TokioRelay {
        listen: SocketAddr,
        target: SocketAddr,
    },
    /// Sends MIB mebibytes on one connection; prints MiB/s.
    #[command(hide = true)]
    Bulk { addr: SocketAddr, mib: usize },
    /// N one-byte request/response round trips; prints round trips per second.
    #[command(hide = true)]
    Rr { addr: SocketAddr, n: usize },
}

fn main() -> ExitCode {
    let Cli { command } = clap::Parser::parse();
    let result = match command {
        Command::Run { quick } => run(quick),
        Command::Profile {
            mode,
            tool,
            output,
            nginx,
            agent_line,
            hyper_relay,
            tokio_relay,
        } => {
            let server = match (nginx, hyper_relay, tokio_relay) {
                (true, _, _) if agent_line => profile::Server::Nginx(AccessLog::AgentLine),
                (true, _, _) => profile::Server::Nginx(AccessLog::Classic),
                (_, true, _) => profile::Server::HyperRelay,
                (_, _, true) => profile::Server::TokioRelay,
                _ => profile::Server::Agent,
            };
            profile::profile(&mode, &tool, output.as_deref(), server)
        }
        Command::Lines {
            perf_data,
            agent,
            top,
        } => lines::lines(&perf_data, agent.as_deref(), top),
        Command::Engine { rounds } => engine(rounds),
        Command::Reactions { rounds } => reactions_only(rounds),
        Command::Upgrades { rounds } => upgrades_only(rounds),
        Command::Shield { rounds } => shield::shield_only(rounds),
        Command::Alternatives { rounds } => report::alternatives_only(rounds),
        Command::Builds { baseline, rounds } => builds::compare(&baseline, rounds),
        Command::Train { agent } => train::train(&agent),
        Command::Connect { addr, n } => clients::connect(addr, n),
        Command::ConnectAb {
            addr,
            n,
            cgroup_a,
            cgroup_b,
        } => clients::connect_ab(addr, n, &cgroup_a, &cgroup_b),
        Command::Http {
            addr,
            path,
            n,
            concurrency,
            mode,
        } => clients::http(addr, path, n, concurrency, mode == "close"),
        Command::Sustained {
            addr,
            path,
            seconds,
            workers,
        } => clients::sustained(addr, path, seconds, workers),
        Command::Flip { addr, path, status } => clients::flip(addr, &path, status),
        Command::Serve { addr } => clients::serve(addr),
        Command::Relay { listen, target } => clients::relay(listen, target),
        Command::HyperRelay { listen, target } => hyper_relay::hyper_relay(listen, target),
        Command::TokioRelay { listen, target } => tokio_relay::tokio_relay(listen, target),
        Command::Bulk { addr, mib } => clients::bulk(addr, mib),
        Command::Rr { addr, n } => clients::rr(addr, n),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("imds-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;
