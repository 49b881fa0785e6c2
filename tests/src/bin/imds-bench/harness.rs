//! What the measurements run on: helpers in the sandbox (servers, relay, nginx, DNAT), the
//! clients started in its cgroups, statistics, and the kernel's and cgroups' accounting.

use super::*;

/// A long-running helper in the sandbox (server, relay, nginx), killed on drop.
pub(crate) struct Background(pub(crate) std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master then stops its workers too.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Starts `imds-bench ARGS` in `cgroup` and waits for its "listening".
/// `pinned`: on CPU 1, for the packet-path server.
pub(crate) fn background(
    sandbox: &Sandbox,
    cgroup: &str,
    args: &[&str],
    pinned: bool,
) -> Result<Background> {
    let mut command = sandbox.command(binary("imds-bench"), cgroup);
    if pinned {
        command.env("IMDS_BENCH_CPU", "1");
    }
    let mut child = command
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
        &mut line,
    )
    .map_err(|e| e.to_string())?;
    let helper = Background(child);
    if line.trim() != "listening" {
        return Err(format!("{args:?} did not start"));
    }
    Ok(helper)
}

/// Runs a command inside the sandbox's network namespace (nsenter, not `ip netns exec`,
/// which remounts /sys); for iptables.
pub(crate) fn in_netns(sandbox: &Sandbox, program: &str, args: &[&str]) -> Result {
    let output = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", sandbox.name))
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The kube2iam/kiam way, in its own sandbox: a DNAT rule sends the metadata address's `port`
/// to a local proxy. Its mere presence turns on connection tracking for every packet in the
/// namespace, which section 2 measures.
pub(crate) fn add_dnat(sandbox: &Sandbox, port: u16, to: &str) -> Result {
    in_netns(
        sandbox,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "169.254.169.254",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ],
    )
}

/// What nginx's access log writes per request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccessLog {
    /// nginx's own line (`combined`: address, time, request line, status, size, referrer,
    /// user agent), about 100 bytes: the classic set-up as users run it.
    Classic,
    /// The agent's audit line for the same request (see [`agent_line_format`]), about 600
    /// bytes: what the classic set-up costs when it writes as much per request.
    AgentLine,
}

impl AccessLog {
    const BOTH: [Self; 2] = [Self::Classic, Self::AgentLine];

    /// The metadata address's port whose connects the DNAT rule sends to this server.
    fn port(self) -> u16 {
        match self {
            Self::Classic => 80,
            Self::AgentLine => 81,
        }
    }

    /// Where this server listens in the iptables sandbox (the DNAT target).
    fn listen(self) -> &'static str {
        match self {
            Self::Classic => "127.0.0.1:8954",
            Self::AgentLine => "127.0.0.1:8955",
        }
    }

    /// The file in nginx's directory this server's lines go to.
    pub(crate) fn file(self) -> &'static str {
        match self {
            Self::Classic => "access.log",
            Self::AgentLine => "agent-line.log",
        }
    }

    /// The address clients dial to reach this server through its DNAT rule.
    pub(crate) fn target(self) -> String {
        format!("169.254.169.254:{}", self.port())
    }
}

/// Both of nginx's DNAT rules (see [`start_nginx`]).
pub(crate) fn add_nginx_dnat(sandbox: &Sandbox) -> Result {
    for log in AccessLog::BOTH {
        add_dnat(sandbox, log.port(), log.listen())?;
    }
    Ok(())
}

/// An nginx `log_format` that writes the agent's audit line (`--log-format json`): its fields
/// under its names, in its order. Each value is nginx's own where nginx has one (time, request
/// id, host, worker pid, method, path, user agent, statuses, latency); the rest nginx cannot
/// know, and they are written as the agent writes them for section 4's client (its cgroup
/// below the enforced one, that cgroup's id, its executable, the policy and rule that allowed
/// it), so that the line has the agent's line's size.
fn agent_line_format(cgroup_id: u64, exe: &Path) -> String {
    [
        "{\"timestamp\":\"$time_iso8601\",\"level\":\"INFO\",\"message\":\"request\"",
        ",\"request_id\":\"$request_id\",\"node\":\"$hostname\",\"cgroup\":\"/client\"",
        &format!(",\"cgroup_id\":{cgroup_id}"),
        ",\"unit\":\"\",\"namespace\":\"\",\"pod\":\"\",\"pod_uid\":\"\"",
        ",\"service_account\":\"\",\"container\":\"\",\"container_id\":\"\"",
        ",\"uid\":0,\"gid\":0,\"pid\":$pid,\"comm\":\"imds-bench\"",
        &format!(",\"exe\":\"{}\",\"exe_check\":\"node-file\"", exe.display()),
        ",\"method\":\"$request_method\",\"path\":\"$uri\",\"user_agent\":\"$http_user_agent\"",
        ",\"decision\":\"allow\",\"policy\":\"bench\",\"rule\":\"id\",\"status\":$status",
        ",\"upstream_status\":$upstream_status,\"detail\":\"\",\"latency_us\":$request_time",
        ",\"target\":\"imds_agent::audit\"}",
    ]
    .concat()
}

/// nginx as the classic reverse proxy with location rules: the instance id is proxied (with
/// upstream keep-alive), everything else gets 403; one access-log line per request, as the
/// agent writes one audit line. Two servers share its two workers, one per [`AccessLog`], each
/// writing its own file.
pub(crate) fn start_nginx(sandbox: &Sandbox, upstream: &str) -> Result<Background> {
    let dir = sandbox.work_dir.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let d = dir.display();
    // Section 4's client, as the agent's line names it.
    let cgroup_id = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(sandbox.cgroup("outside")).map_or(0, |m| m.ino())
    };
    let server = |log: AccessLog| {
        let (listen, file) = (log.listen(), log.file());
        let format = match log {
            AccessLog::Classic => "",
            AccessLog::AgentLine => " agent_line",
        };
        format!(
            "  server {{\n    listen {listen};\n    access_log {d}/{file}{format};\n\
               location = {ID} {{ proxy_pass http://imds; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
               location / {{ return 403; }}\n  }}\n"
        )
    };
    let config = format!(
        "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  log_format agent_line escape=json '{}';\n\
           keepalive_requests 1000000;\n\
           upstream imds {{ server {upstream}; keepalive 32; keepalive_requests 1000000; }}\n\
         {}{}}}\n",
        agent_line_format(cgroup_id, &binary("imds-bench")),
        server(AccessLog::Classic),
        server(AccessLog::AgentLine),
    );
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let child = sandbox
        .command("nginx", "nginx")
        .args(["-p", &d.to_string(), "-c"])
        .arg(&config_path)
        .spawn()
        .map_err(|e| format!("nginx: {e}"))?;
    let nginx = Background(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dir.join("nginx.pid").exists() {
        if Instant::now() > deadline {
            return Err("nginx did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(nginx)
}

/// The length of the last line of the log at `path`, newline included (0 if there is none).
pub(crate) fn last_line_bytes(path: &Path) -> usize {
    use std::io::{Seek as _, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return 0;
    };
    let mut tail = Vec::new();
    let end = file.seek(SeekFrom::End(0)).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(end.saturating_sub(8192)))
        .is_err()
        || file.read_to_end(&mut tail).is_err()
    {
        return 0;
    }
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    body.iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |start| body.len() - start)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    pub(crate) min: u64,
    pub(crate) max: u64,
}

impl Stats {
    pub(crate) fn of(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            p50: at(0.5),
            p99: at(0.99),
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }
}

/// Median of repeated runs' values.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(crate) fn child(sandbox: &Sandbox, cgroup: &str, args: &[&str]) -> Result<Vec<f64>> {
    child_with(sandbox, cgroup, args, &[])
}

/// A packet-path client on CPU 0 (its server is on CPU 1).
pub(crate) fn pinned_child(sandbox: &Sandbox, cgroup: &str, args: &[&str]) -> Result<Vec<f64>> {
    child_with(sandbox, cgroup, args, &[("IMDS_BENCH_CPU", "0")])
}

pub(crate) fn child_with(
    sandbox: &Sandbox,
    cgroup: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Vec<f64>> {
    let output = sandbox
        .command(binary("imds-bench"), cgroup)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "client {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(|v| v.parse::<f64>().map_err(|e| e.to_string()))
        .collect()
}

pub(crate) const ID: &str = "/latest/meta-data/instance-id";

pub(crate) fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        || Path::new("/usr/sbin").join(program).is_file()
}

pub(crate) const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns on the kernel's BPF run-time accounting and puts the previous setting back on drop.
pub(crate) struct BpfStats {
    pub(crate) before: String,
}

impl BpfStats {
    pub(crate) fn enable() -> Self {
        let before = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(BPF_STATS, "1");
        Self { before }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.before.trim());
    }
}

/// The programs attached to `cgroup` during `connects` connect()+close() calls (the only
/// runs while the kernel's accounting was on, programs loaded fresh): their run time per
/// connect in total, and per program "name: ns per run x runs per connect", from the
/// kernel's BPF stats (bpftool prints run_time_ns and run_cnt when stats are enabled).
pub(crate) fn program_run_time(cgroup: &Path, connects: usize) -> (f64, String) {
    let json = |args: &[&str]| -> Option<serde_json::Value> {
        let output = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .ok()?;
        serde_json::from_slice(&output.stdout).ok()
    };
    let Ok(attached) = attached_programs(cgroup) else {
        return (f64::NAN, String::new());
    };
    let (mut total, mut parts) = (0.0, Vec::new());
    for program in attached {
        let Some(info) = json(&["prog", "show", "id", &program.id.to_string(), "-j"]) else {
            continue;
        };
        let (time, count) = (
            info["run_time_ns"].as_f64().unwrap_or(0.0),
            info["run_cnt"].as_f64().unwrap_or(0.0),
        );
        if count > 0.0 {
            total += time / connects as f64;
            parts.push(format!(
                "{} {:.0} ns x {:.1}",
                program.attach_type,
                time / count,
                count / connects as f64
            ));
        }
    }
    (total, parts.join(", "))
}

/// CPU time (user and system) used so far by the processes of `cgroup`, in microseconds.
pub(crate) fn cpu_usage_us(cgroup: &Path) -> f64 {
    cpu_stat_us(cgroup, "usage_usec")
}

/// One field of the cgroup's cpu.stat (`usage_usec`, `user_usec`, `system_usec`).
pub(crate) fn cpu_stat_us(cgroup: &Path, field: &str) -> f64 {
    std::fs::read_to_string(cgroup.join("cpu.stat"))
        .ok()
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").parse().ok())
            })
        })
        .flatten()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nginx's line, its variables filled in as nginx fills them, is the agent's: the same
    /// fields in the same order (audit.rs's `Request::fields`, between tracing-subscriber's
    /// timestamp, level and message and its target).
    #[test]
    fn nginx_writes_the_agents_fields_in_the_agents_order() {
        let mut line = agent_line_format(70287, Path::new("/usr/bin/imds-bench"));
        for (variable, value) in [
            ("$time_iso8601", "2026-12-04T22:02:26+00:00"),
            ("$request_id", "fa0aef96b5bfa77755ec194d32337e81"),
            ("$hostname", "vm"),
            ("$pid", "5197"),
            ("$request_method", "GET"),
            ("$uri", ID),
            ("$http_user_agent", "Botocore/1.34.0"),
            ("$upstream_status", "200"),
            ("$status", "200"),
            ("$request_time", "0.001"),
        ] {
            line = line.replace(variable, value);
        }
        assert!(!line.contains('$'), "a variable left unfilled: {line}");
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).expect(&line);
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "timestamp",
                "level",
                "message",
                "request_id",
                "node",
                "cgroup",
                "cgroup_id",
                "unit",
                "namespace",
                "pod",
                "pod_uid",
                "service_account",
                "container",
                "container_id",
                "uid",
                "gid",
                "pid",
                "comm",
                "exe",
                "exe_check",
                "method",
                "path",
                "user_agent",
                "decision",
                "policy",
                "rule",
                "status",
                "upstream_status",
                "detail",
                "latency_us",
                "target",
            ]
        );
        assert_eq!(fields["exe"], "/usr/bin/imds-bench");
        assert_eq!(fields["cgroup_id"], 70287);
        assert_eq!(fields["user_agent"], "Botocore/1.34.0");
    }

    #[test]
    fn a_logs_last_line_is_measured_whole() {
        let dir = std::env::temp_dir().join(format!("imds-bench-last-line-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("access.log");
        let long = "x".repeat(9000);
        for (content, expected) in [
            ("first\nsecond line\n".to_owned(), "second line\n".len()),
            (format!("{long}\n{}\n", "y".repeat(600)), 601),
            // The tail read holds no line whole: not a length.
            (format!("{long}\n"), 0),
            (String::new(), 0),
        ] {
            std::fs::write(&log, content).unwrap();
            assert_eq!(last_line_bytes(&log), expected);
        }
        assert_eq!(last_line_bytes(&dir.join("missing.log")), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
