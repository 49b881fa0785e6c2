//! `imds-bench builds BASELINE`: this build's agent against another build's binary on the same
//! allowed requests, in one sandbox and one run, alternating round by round so that both see
//! the same machine. For a change to the request path: its figures against the commit before.

use super::*;

/// The request load of section 4, per round: (mode, clients).
const LOADS: [(&str, &str); 3] = [("keepalive", "1"), ("keepalive", "16"), ("close", "16")];

pub(crate) fn compare(baseline: &Path, rounds: usize) -> Result {
    if !baseline.is_file() {
        return Err(format!("{}: no such agent binary", baseline.display()));
    }
    let current = binary("imds-agent");
    let sandbox = Sandbox::new("bench-builds").ok_or("cannot create the sandbox")?;
    let _imds = sandbox.start_fake_imds(false);
    let policy_dir = policy_for_bench(&sandbox.work_dir.join("policies"))?;
    let per_worker = "2000";
    // (build, load) -> each round's [p50 ns, p99 ns, requests/s, CPU us per request]
    let mut figures = vec![vec![Vec::new(); LOADS.len()]; 2];
    for round in 0..rounds {
        // Which build goes first alternates, so neither always gets the warmer machine.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for build in order {
            let agent_binary = if build == 0 { baseline } else { &current };
            let agent = sandbox.start_agent_binary(
                agent_binary,
                "enforced",
                "agent",
                &[&policy_dir],
                &UNLIMITED,
            );
            // The agent's start-up work (policies, the first verdicts, the pod and policy
            // watches settling) would otherwise be charged to the first load's requests.
            child(
                &sandbox,
                "enforced/client",
                &["http", "169.254.169.254:80", ID, "500", "1", "keepalive"],
            )?;
            std::thread::sleep(Duration::from_millis(500));
            for (load, (mode, clients)) in LOADS.iter().enumerate() {
                let requests = per_worker.parse::<f64>().map_err(|e| e.to_string())?
                    * clients.parse::<f64>().map_err(|e| e.to_string())?;
                let before = cpu_usage_us(&sandbox.cgroup_root.join("agent"));
                let mut run = child(
                    &sandbox,
                    "enforced/client",
                    &["http", "169.254.169.254:80", ID, per_worker, clients, mode],
                )?;
                let used = cpu_usage_us(&sandbox.cgroup_root.join("agent")) - before;
                run.push(used / requests);
                figures[build][load].push(run);
            }
            drop(agent);
        }
        eprintln!("bench builds: round {} of {rounds}", round + 1);
    }
    println!(
        "| load | baseline p50 / p99, req/s, CPU | this build | this build / baseline |\n|---|---|---|---|"
    );
    for (load, (mode, clients)) in LOADS.iter().enumerate() {
        let summary = |build: usize| -> [f64; 4] {
            let runs = &figures[build][load];
            let column = |i: usize| median(runs.iter().map(|r: &Vec<f64>| r[i]).collect());
            [column(0) / 1e3, column(1) / 1e3, column(2), column(3)]
        };
        let (old, new) = (summary(0), summary(1));
        let cell = |f: [f64; 4]| {
            format!(
                "{:.0} / {:.0} us, {:.0} req/s, {:.1} us",
                f[0], f[1], f[2], f[3]
            )
        };
        let label = if *mode == "close" {
            "new connection"
        } else {
            "keep-alive"
        };
        println!(
            "| {label}, {clients} clients | {} | {} | p50 {:.2}, p99 {:.2}, req/s {:.2}, CPU {:.2} |",
            cell(old),
            cell(new),
            new[0] / old[0],
            new[1] / old[1],
            new[2] / old[2],
            new[3] / old[3]
        );
    }
    Ok(())
}
