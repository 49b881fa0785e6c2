//! `imds-bench profile`: the agent under load, recorded or counted.

use super::*;

/// What `profile` loads and records.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    Agent,
    /// Section 4's iptables + nginx, writing its own access-log line or the agent's.
    Nginx(AccessLog),
    /// Section 4's hyper relay.
    HyperRelay,
    /// The hyper relay without hyper.
    TokioRelay,
}

/// `imds-bench profile keepalive|close [perf|strace|none] [OUTPUT]`: the agent under section 3's
/// load (16 clients), recorded with `perf record` (DWARF call graphs: release builds have no
/// frame pointers) or counted with `strace -c -f` (syscalls per request), into OUTPUT. Section
/// 4's iptables + nginx or hyper relay can take the agent's place, so that each can be read
/// the same way.
pub(crate) fn profile(mode: &str, tool: &str, output: Option<&str>, server: Server) -> Result {
    if mode != "keepalive" && mode != "close" {
        return Err(format!("mode {mode:?}: keepalive or close"));
    }
    let (program, default_output) = match tool {
        "perf" => ("perf", "perf.data"),
        "strace" => ("strace", "strace.txt"),
        // The same load, unobserved: for trying a change quickly.
        "none" => ("", ""),
        other => return Err(format!("tool {other:?}: perf, strace or none")),
    };
    let output = output.unwrap_or(default_output);
    // Section 3's 16 clients unless IMDS_BENCH_CLIENTS says otherwise (1: single-client latency).
    let clients_n: usize = std::env::var("IMDS_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let clients = clients_n.to_string();
    let sandbox = Sandbox::new("profile").ok_or("cannot create the sandbox")?;
    let _imds = sandbox.start_fake_imds(false);
    // What is recorded: the agent, or nginx's workers (the master only forks them); either is
    // kept running until the recording ends.
    let (_server, server_cgroup, client_cgroup, pids, target) = if let Server::Nginx(log) = server {
        add_nginx_dnat(&sandbox)?;
        let server = start_nginx(&sandbox, "127.0.0.1:8080")?;
        let master = server.0.id();
        // The master forks its workers after writing the pid file start_nginx waits for.
        let workers = || -> Result<Vec<String>> {
            let procs = std::fs::read_to_string(sandbox.cgroup_root.join("nginx/cgroup.procs"))
                .map_err(|e| format!("nginx's cgroup: {e}"))?;
            Ok(procs
                .lines()
                .filter(|pid| pid.parse() != Ok(master))
                .map(str::to_string)
                .collect())
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers()?.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let workers = workers()?;
        if workers.is_empty() {
            return Err("nginx started no workers".into());
        }
        (
            Box::new(server) as Box<dyn std::any::Any>,
            "nginx",
            "outside",
            workers,
            log.target(),
        )
    } else if server == Server::HyperRelay || server == Server::TokioRelay {
        let name = if server == Server::HyperRelay {
            "hyper-relay"
        } else {
            "tokio-relay"
        };
        let relay = background(
            &sandbox,
            name,
            &[name, HYPER_RELAY_LISTEN, "169.254.169.254:80"],
            false,
        )?;
        let pid = relay.0.id().to_string();
        (
            Box::new(relay) as Box<dyn std::any::Any>,
            name,
            "outside",
            vec![pid],
            HYPER_RELAY_LISTEN.to_owned(),
        )
    } else {
        let policy_dir = policy_for_bench(&sandbox.work_dir.join("policies"))?;
        let agent = sandbox.start_agent("enforced", "agent", &[&policy_dir], &UNLIMITED);
        let pid = agent.process.child.id().to_string();
        (
            Box::new(agent) as Box<dyn std::any::Any>,
            "agent",
            "enforced/client",
            vec![pid],
            "169.254.169.254:80".to_owned(),
        )
    };
    let pid_list = pids.join(",");
    let recorder_args: Vec<&str> = if tool == "perf" {
        vec![
            "record",
            "--call-graph",
            "dwarf,16384",
            "-o",
            output,
            "-p",
            &pid_list,
        ]
    } else {
        let mut args = vec!["-c", "-f", "-o", output];
        for pid in &pids {
            args.extend(["-p", pid]);
        }
        args
    };
    let mut recorder = if program.is_empty() {
        None
    } else {
        let recorder = std::process::Command::new(program)
            .args(&recorder_args)
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        std::thread::sleep(Duration::from_millis(300));
        Some(recorder)
    };
    // 1,500 requests per client unless IMDS_BENCH_PER_CLIENT says otherwise (with one client,
    // more, so that the agent's first requests weigh less).
    let per_worker = std::env::var("IMDS_BENCH_PER_CLIENT").unwrap_or_else(|_| "1500".into());
    let per_worker_n: f64 = per_worker
        .parse()
        .map_err(|_| format!("IMDS_BENCH_PER_CLIENT={per_worker:?}: a number"))?;
    let server_cgroup = sandbox.cgroup_root.join(server_cgroup);
    let cpu_before = cpu_usage_us(&server_cgroup);
    let user_before = cpu_stat_us(&server_cgroup, "user_usec");
    let result = child(
        &sandbox,
        client_cgroup,
        &["http", &target, ID, &per_worker, &clients, mode],
    );
    if let Some(recorder) = &mut recorder {
        // SAFETY: kill with a pid of our own child.
        unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
        let _ = recorder.wait();
    }
    let requests = clients_n as f64 * per_worker_n;
    let cpu_per_request = (cpu_usage_us(&server_cgroup) - cpu_before) / requests;
    // The rest is the kernel's: system calls, and the softirqs they run (loopback delivers a
    // sent packet to its receiver on the sender's CPU time).
    let user_per_request = (cpu_stat_us(&server_cgroup, "user_usec") - user_before) / requests;
    let samples = result?;
    let recorded = if recorder.is_some() {
        format!("; {tool} output in {output}")
    } else {
        String::new()
    };
    eprintln!(
        "profile: {mode}, {requests} requests, {:.0} req/s, {} CPU {cpu_per_request:.1} us per request ({user_per_request:.1} in user space){recorded}",
        samples.last().copied().unwrap_or(0.0),
        match server {
            Server::Agent => "agent",
            Server::Nginx(AccessLog::Classic) => "nginx",
            Server::Nginx(AccessLog::AgentLine) => "nginx (the agent's line)",
            Server::HyperRelay => "hyper relay",
            Server::TokioRelay => "tokio relay",
        },
    );
    Ok(())
}
