//! Upgrades and crashes under load: keep-alive clients while the agent is replaced again and
//! again (handover), against the same clients with the agent left alone; and how long connects
//! are refused when the agent is killed and restarted at once (no systemd to keep its sockets).

use super::*;

/// Upgrades per measured run, a few hundred milliseconds apart.
const UPGRADES: usize = 10;
const SECONDS: &str = "6";
const WORKERS: &str = "4";

/// The agent's flags here: no provider probes, limits raised.
fn flags() -> Vec<&'static str> {
    let mut flags = vec!["--provider", "aws", "--drain-seconds", "5"];
    flags.extend(UNLIMITED);
    flags
}

/// (requests, failed, p50 us, p99 us, max us) of one sustained run.
fn parse(figures: &[f64]) -> Result<[f64; 5]> {
    match figures {
        [requests, failed, p50, p99, max] => {
            Ok([*requests, *failed, p50 / 1e3, p99 / 1e3, max / 1e3])
        }
        _ => Err(format!("sustained client printed {figures:?}")),
    }
}

pub(crate) fn upgrades_only(rounds: usize) -> Result {
    let sandbox = Sandbox::new("bench-upgrades").ok_or("cannot create the sandbox")?;
    let _imds = sandbox.start_fake_imds(false);
    let policy_dir = policy_for_bench(&sandbox.work_dir.join("policies"))?;
    print!("{}", upgrades(&sandbox, &policy_dir, rounds)?);
    Ok(())
}

pub(crate) fn upgrades(sandbox: &Sandbox, policy_dir: &Path, rounds: usize) -> Result<String> {
    let flags = flags();
    let start = || sandbox.start_agent("enforced", "agent", &[policy_dir], &flags);
    let load = ["sustained", "169.254.169.254:80", ID, SECONDS, WORKERS];
    let (mut steady, mut upgrading, mut refused_ms, mut upgrade_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut agent = start();
    for round in 0..rounds {
        // Steady: the same load, no upgrade.
        steady.push(parse(&child(sandbox, "enforced/client", &load)?)?);
        // The same load while the agent is upgraded UPGRADES times.
        let client = sandbox
            .command(binary("imds-bench"), "enforced/client")
            .args(load)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..UPGRADES {
            let begun = Instant::now();
            let next = start();
            if agent.process.wait(Duration::from_secs(20)) != Some(0) {
                return Err(format!("a predecessor did not hand over:\n{}", agent.log()));
            }
            upgrade_ms.push(begun.elapsed().as_secs_f64() * 1e3);
            agent = next;
            std::thread::sleep(Duration::from_millis(200));
        }
        let output = client.wait_with_output().map_err(|e| e.to_string())?;
        let figures: Vec<f64> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        upgrading.push(parse(&figures)?);
        // A crash, restarted at once: how long connects are refused.
        agent.process.signal(libc::SIGKILL);
        let _ = agent.process.wait(Duration::from_secs(5));
        let killed = Instant::now();
        agent = start();
        child(
            sandbox,
            "enforced/client",
            &["http", "169.254.169.254:80", ID, "1", "1", "close"],
        )?;
        refused_ms.push(killed.elapsed().as_secs_f64() * 1e3);
        eprintln!("bench: upgrades round {} of {rounds}", round + 1);
    }
    let sum = |runs: &[[f64; 5]], i: usize| runs.iter().map(|r| r[i]).sum::<f64>();
    let column = |runs: &[[f64; 5]], i: usize| median(runs.iter().map(|r| r[i]).collect());
    let mut report = String::from(
        "## 7. Upgrades and crashes\n\n\
         Keep-alive clients (4, each as an SDK's HTTP client: a request on a reused connection\n\
         that the server closed is sent again once on a new one) for 6 s, with the agent left\n\
         alone, and with the agent upgraded 10 times during the 6 s (a new agent takes the\n\
         listening sockets over, the old one drains: see `handover`). Then the agent killed\n\
         (SIGKILL) and started again at once, with no systemd to keep its sockets: the time until\n\
         a connect is served again. Under systemd the unit keeps the sockets across a crash,\n\
         and connects made meanwhile wait instead of failing (tested in `host.rs`).\n\n",
    );
    let _ = writeln!(
        report,
        "| | requests | failed | p50 / p99 / max |\n|---|---|---|---|\n\
         | steady | {:.0} | {:.0} | {:.0} / {:.0} / {:.0} us |\n\
         | {} upgrades per run | {:.0} | {:.0} | {:.0} / {:.0} / {:.0} us |\n",
        sum(&steady, 0),
        sum(&steady, 1),
        column(&steady, 2),
        column(&steady, 3),
        column(&steady, 4),
        UPGRADES,
        sum(&upgrading, 0),
        sum(&upgrading, 1),
        column(&upgrading, 2),
        column(&upgrading, 3),
        column(&upgrading, 4),
    );
    let _ = writeln!(
        report,
        "Failed requests per upgrade: {:.2} ({} upgrades). One upgrade, from starting the new\n\
         agent to the old one's exit: median {:.0} ms. After a crash and an immediate restart,\n\
         connects are refused for {:.0} ms (median; {rounds} crashes): the agent's start.\n",
        sum(&upgrading, 1) / (UPGRADES * rounds) as f64,
        UPGRADES * rounds,
        median(upgrade_ms),
        median(refused_ms),
    );
    drop(agent);
    Ok(report)
}
