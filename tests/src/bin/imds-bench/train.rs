//! `imds-bench train AGENT`: the requests `cargo xtask pgo` records an instrumented agent build
//! under, so that the release build is optimised for the request path users run. The same
//! requests as section 4 (allowed reads, one client and 16, kept-alive and a new connection
//! each), then SIGTERM: an instrumented build writes its counts only as it exits.

use super::*;

/// (mode, clients, requests per client).
const LOADS: [(&str, &str, &str); 3] = [
    ("keepalive", "1", "3000"),
    ("keepalive", "16", "1000"),
    ("close", "16", "500"),
];

pub(crate) fn train(agent_binary: &Path) -> Result {
    if !agent_binary.is_file() {
        return Err(format!("{}: no such agent binary", agent_binary.display()));
    }
    let sandbox = Sandbox::new("bench-train").ok_or("cannot create the sandbox")?;
    let _imds = sandbox.start_fake_imds(false);
    let policy_dir = policy_for_bench(&sandbox.work_dir.join("policies"))?;
    let mut agent = sandbox.start_agent_binary(
        agent_binary,
        "enforced",
        "agent",
        &[&policy_dir],
        &UNLIMITED,
    );
    for (mode, clients, per_client) in LOADS {
        child(
            &sandbox,
            "enforced/client",
            &["http", "169.254.169.254:80", ID, per_client, clients, mode],
        )?;
        eprintln!("bench train: {clients} clients x {per_client} requests ({mode})");
    }
    agent.process.signal(libc::SIGTERM);
    match agent.process.wait(Duration::from_secs(30)) {
        Some(0) => Ok(()),
        code => Err(format!(
            "the agent did not exit cleanly on SIGTERM ({code:?}), so its counts are not \
             written:\n{}",
            agent.log()
        )),
    }
}
