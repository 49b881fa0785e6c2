//! How fast changes take effect: agent start, policy change, a new cgroup.

use super::*;

/// `reactions [ROUNDS]`: section 6 alone (default 20 rounds), each round on stderr.
pub(crate) fn reactions_only(rounds: usize) -> Result {
    let sandbox = Sandbox::new("reactions").ok_or("cannot create the sandbox")?;
    let _imds = sandbox.start_fake_imds(false);
    let policy_dir = policy_for_bench(&sandbox.work_dir.join("policies"))?;
    print!("{}", reactions(&sandbox, &policy_dir, rounds)?);
    Ok(())
}

/// Agent start -> ready; policy change -> enforced; new cgroup -> first request served.
pub(crate) fn reactions(sandbox: &Sandbox, policy_dir: &Path, rounds: usize) -> Result<String> {
    let socket_path = sandbox.work_dir.join("notify.sock");
    let mut start_ms = Vec::new();
    let mut reload_ms = Vec::new();
    let mut first_ms = Vec::new();
    for round in 0..rounds {
        let _ = std::fs::remove_file(&socket_path);
        let socket = UnixDatagram::bind(&socket_path).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        // READY is timed as it arrives, by a thread, not when the launcher gets to it.
        let ready = std::thread::spawn(move || {
            let mut buffer = [0u8; 256];
            // The agent stores its listening sockets first (FDSTORE=1), then says READY.
            loop {
                let n = socket.recv(&mut buffer).ok()?;
                if buffer[..n].starts_with(b"READY=1") {
                    return Some(Instant::now());
                }
            }
        });
        let spawned = Instant::now();
        let agent = sandbox.launch_agent_with_env(
            "enforced",
            "agent",
            &[policy_dir],
            &UNLIMITED,
            &[("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8"))],
        );
        let ready_at = ready
            .join()
            .ok()
            .flatten()
            .ok_or("no READY from the agent")?;
        start_ms.push(ready_at.duration_since(spawned).as_secs_f64() * 1e3);

        eprintln!(
            "bench: 6. round {round}: started in {:.1} ms",
            start_ms[round]
        );
        // New cgroup -> first request served (the client times its own first request).
        let fresh = format!("enforced/client/fresh-{round}");
        let first = child(
            sandbox,
            &fresh,
            &["http", "169.254.169.254:80", ID, "1", "1", "close"],
        )?;
        first_ms.push(first[0] / 1e6);

        eprintln!(
            "bench: 6. round {round}: first request {:.2} ms",
            first_ms[round]
        );
        // Policy change -> enforced: a client polls until the decision flips.
        let mut flip = sandbox
            .command(binary("imds-bench"), "enforced/client")
            .args(["flip", "169.254.169.254:80", ID, "403"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut out = std::io::BufReader::new(flip.stdout.take().expect("piped"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).map_err(|e| e.to_string())?;
        let file = policy_dir.join("bench.yaml");
        let original = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
        // The agent acts on a file notification; where it has to poll instead (every
        // POLL_INTERVAL from its start), every round would get here about as long after the
        // start and the write land at the same point of the poll cycle each time. Spread the
        // writes evenly over one interval, so that either way the figure is the reload's.
        std::thread::sleep(POLL_INTERVAL * round as u32 / rounds as u32);
        let written = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        std::fs::write(&file, original.replace("action: allow", "action: deny"))
            .map_err(|e| e.to_string())?;
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).map_err(|e| e.to_string())?;
        let seen: u128 = line.trim().parse().map_err(|_| format!("flip: {line:?}"))?;
        let _ = flip.wait();
        reload_ms.push((seen.saturating_sub(written)) as f64 / 1e6);
        eprintln!(
            "bench: 6. round {round}: policy change enforced in {:.1} ms",
            reload_ms[round]
        );
        std::fs::write(&file, original).map_err(|e| e.to_string())?;
        drop(agent);
    }
    let row = |label: &str, values: &[f64], target: &str| {
        let (min, max) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        format!(
            "| {label} | {:.1} ms (min {min:.1}, max {max:.1}) | {target} |\n",
            median(values.to_vec())
        )
    };
    Ok(format!(
        "| measure | median over {rounds} runs | target |\n|---|---|---|\n{}{}{}",
        row(
            "agent start -> programs attached and READY",
            &start_ms,
            "<= 500 ms"
        ),
        row("policy file change -> enforced", &reload_ms, "<= 200 ms"),
        row(
            "new cgroup -> first request served (client's own timing)",
            &first_ms,
            "<= 5 ms"
        ),
    ))
}
