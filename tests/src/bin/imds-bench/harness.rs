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

/// The kube2iam/kiam way, in its own sandbox: a DNAT rule sends the metadata address to a
/// local proxy. Its mere presence turns on connection tracking for every packet in the
/// namespace, which section 2 measures.
pub(crate) fn add_dnat(sandbox: &Sandbox, to: &str) -> Result {
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
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ],
    )
}

/// nginx as the classic reverse proxy with location rules: the instance id is proxied (with
/// upstream keep-alive), everything else gets 403; one access-log line per request, as the
/// agent writes one audit line.
pub(crate) fn start_nginx(sandbox: &Sandbox, listen: &str, upstream: &str) -> Result<Background> {
    let dir = sandbox.work_dir.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let d = dir.display();
    let config = format!(
        "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {d}/access.log;\n\
           keepalive_requests 1000000;\n\
           upstream imds {{ server {upstream}; keepalive 32; keepalive_requests 1000000; }}\n\
           server {{\n    listen {listen};\n\
             location = {ID} {{ proxy_pass http://imds; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
             location / {{ return 403; }}\n  }}\n}}\n"
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
