//! The demo behind `cargo xtask demo`: a sandbox with the fake IMDS, the agent enforcing the
//! example policies in `policies/`, and two workloads in two cgroups making requests. Prints
//! what each workload got and the agent's audit lines, then removes everything.

use std::{path::Path, process::ExitCode};

use imds_tests::{
    fake_imds::TTL_HEADER,
    sandbox::{Curl, Sandbox},
};

const IMDS: &str = "http://169.254.169.254";

struct Step {
    workload: &'static str,
    cgroup: &'static str,
    uid: u32,
    what: &'static str,
    args: Vec<String>,
}

fn step(
    workload: &'static str,
    cgroup: &'static str,
    uid: u32,
    what: &'static str,
    args: &[&str],
) -> Step {
    Step {
        workload,
        cgroup,
        uid,
        what,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
    }
}

fn get(path: &str) -> String {
    format!("{IMDS}{path}")
}

fn outcome(curl: &Curl) -> String {
    // Credentials are JSON: show the key id, which is what a thief would be after.
    let first_line = curl
        .body
        .lines()
        .find(|l| l.contains("AccessKeyId"))
        .or_else(|| curl.body.lines().next())
        .unwrap_or("")
        .trim();
    let short: String = first_line.chars().take(60).collect();
    match curl.status {
        0 => format!("no connection (curl exit {})", curl.exit),
        200 => format!("ALLOWED  200  {short}"),
        403 => format!("DENIED   403  {short}"),
        status => format!("         {status}  {short}"),
    }
}

fn main() -> ExitCode {
    let policies = Path::new("policies");
    if !policies.is_dir() {
        eprintln!("imds-demo: run from the workspace root (cargo xtask demo)");
        return ExitCode::from(64);
    }
    let Some(sandbox) = Sandbox::new("demo") else {
        return ExitCode::FAILURE;
    };
    println!(
        "sandbox: network namespace {0}, cgroup {1}",
        sandbox.name,
        sandbox.cgroup_root.display()
    );
    println!(
        "         169.254.169.254 is the fake IMDS inside the namespace; nothing leaves it.\n"
    );
    let _imds = sandbox.start_fake_imds(false);
    let agent = sandbox.start_agent("enforced", "agent", &[policies], &[]);
    println!(
        "agent:   enforcing {}/enforced with policies/ (10-web.yaml, 20-batch.yaml)\n",
        sandbox.cgroup_root.display()
    );

    let creds = "/latest/meta-data/iam/security-credentials/demo-node-role";
    let token_url = get("/latest/api/token");
    let ttl = format!("{TTL_HEADER}: 300");
    let steps = [
        step(
            "web",
            "enforced/web",
            0,
            "GET instance-id",
            &[&get("/latest/meta-data/instance-id")],
        ),
        step(
            "web",
            "enforced/web",
            0,
            "GET placement/region",
            &[&get("/latest/meta-data/placement/region")],
        ),
        step(
            "web",
            "enforced/web",
            0,
            "PUT api/token (IMDSv2)",
            &["-X", "PUT", "-H", &ttl, &token_url],
        ),
        step(
            "web",
            "enforced/web",
            0,
            "GET role credentials",
            &[&get(creds)],
        ),
        step(
            "web",
            "enforced/web",
            0,
            "GET user-data",
            &[&get("/latest/user-data")],
        ),
        step(
            "batch",
            "enforced/batch",
            1000,
            "GET role credentials",
            &[&get(creds)],
        ),
        step(
            "batch",
            "enforced/batch",
            0,
            "GET role credentials",
            &[&get(creds)],
        ),
        step(
            "batch",
            "enforced/batch",
            1000,
            "GET user-data",
            &[&get("/latest/user-data")],
        ),
        step(
            "(not enforced)",
            "outside",
            0,
            "GET instance-id",
            &[&get("/latest/meta-data/instance-id")],
        ),
    ];
    println!("{:<15} {:>5}  {:<24} RESULT", "WORKLOAD", "UID", "REQUEST");
    for s in &steps {
        let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
        let curl = sandbox.curl(s.cgroup, Some(s.uid), &args);
        println!(
            "{:<15} {:>5}  {:<24} {}",
            s.workload,
            s.uid,
            s.what,
            outcome(&curl)
        );
    }

    println!("\naudit log (one JSON line per request; shown abridged):");
    for line in agent.audit() {
        println!(
            "  {:<6} {:<7} {:<5} uid={:<5} {:<4} {:<58} policy={} rule={}",
            line["decision"].as_str().unwrap_or(""),
            line["cgroup"].as_str().unwrap_or(""),
            line["comm"].as_str().unwrap_or(""),
            line["uid"].to_string(),
            line["method"].as_str().unwrap_or(""),
            line["path"].as_str().unwrap_or(""),
            line["policy"].as_str().unwrap_or(""),
            line["rule"].as_str().unwrap_or(""),
        );
    }
    drop(agent);
    drop(sandbox);
    println!("\ncleaned up: namespace, cgroups and pinned programs removed.");
    ExitCode::SUCCESS
}
