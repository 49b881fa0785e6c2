//! `imds-bench profile`: the agent under load, recorded or counted.

use super::*;

/// `imds-bench profile keepalive|close [perf|strace|none] [OUTPUT]`: the agent under section 3's
/// load (16 clients), recorded with `perf record` (DWARF call graphs: release builds have no
/// frame pointers) or counted with `strace -c -f` (syscalls per request), into OUTPUT.
pub(crate) fn profile(mode: &str, tool: &str, output: Option<&str>) -> Result {
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
    let policy_dir = policy_for_bench(&sandbox.work_dir.join("policies"))?;
    let agent = sandbox.start_agent("enforced", "agent", &[&policy_dir], &UNLIMITED);
    let pid = agent.process.child.id().to_string();
    let recorder_args: Vec<&str> = if tool == "perf" {
        vec![
            "record",
            "--call-graph",
            "dwarf,16384",
            "-o",
            output,
            "-p",
            &pid,
        ]
    } else {
        vec!["-c", "-f", "-o", output, "-p", &pid]
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
    let per_worker = "1500";
    let agent_cgroup = sandbox.cgroup_root.join("agent");
    let cpu_before = cpu_usage_us(&agent_cgroup);
    let result = child(
        &sandbox,
        "enforced/client",
        &["http", "169.254.169.254:80", ID, per_worker, &clients, mode],
    );
    if let Some(recorder) = &mut recorder {
        // SAFETY: kill with a pid of our own child.
        unsafe { libc::kill(recorder.id() as i32, libc::SIGINT) };
        let _ = recorder.wait();
    }
    let cpu_per_request = (cpu_usage_us(&agent_cgroup) - cpu_before) / (clients_n as f64 * 1500.0);
    let samples = result?;
    let recorded = if recorder.is_some() {
        format!("; {tool} output in {output}")
    } else {
        String::new()
    };
    eprintln!(
        "profile: {mode}, {} requests, {:.0} req/s, agent CPU {cpu_per_request:.1} us per request{recorded}",
        clients_n * 1500,
        samples.last().copied().unwrap_or(0.0)
    );
    Ok(())
}
