//! The standalone host service: systemd integration, the packaged default policy, status,
//! the unit file and the Debian package.

use std::{
    os::unix::net::UnixDatagram,
    path::PathBuf,
    time::{Duration, Instant},
};

use imds_tests::{
    fake_imds::{ACCESS_KEY_PREFIX, INSTANCE_ID},
    sandbox::{Agent, Sandbox, binary, skip},
};

use crate::support::repo;

const IMDS: &str = "http://169.254.169.254";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/demo-node-role";

fn default_policy() -> PathBuf {
    repo().join("packaging/default-policy.yaml")
}

fn url(path: &str) -> String {
    format!("{IMDS}{path}")
}

/// A datagram, retried when interrupted: with a receive timeout set, the kernel answers an
/// interruption with EINTR instead of restarting the call, and std does not retry.
fn recv(socket: &UnixDatagram, buffer: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match socket.recv(buffer) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[test]
fn ready_is_sent_after_attach_and_the_watchdog_is_pinged() {
    let Some(sandbox) = Sandbox::new("notify") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let socket_path = sandbox.work_dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut agent = sandbox.launch_agent_with_env(
        "enforced",
        "agent",
        &[&default_policy()],
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut buffer = [0u8; 512];
    let n = recv(&socket, &mut buffer).expect("READY within 10 s");
    let first = String::from_utf8_lossy(&buffer[..n]).into_owned();
    assert!(first.starts_with("READY=1\nSTATUS=enforcing "), "{first}");
    // READY means enforcing: the programs are attached by then.
    assert!(imds_agent::loader::is_attached(&sandbox.pin_dir));
    // Pings at half the interval.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let n = recv(&socket, &mut buffer).expect("watchdog pings");
        if &buffer[..n] == b"WATCHDOG=1" {
            pings += 1;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    agent.process.signal(libc::SIGTERM);
    let n = recv(&socket, &mut buffer).unwrap();
    let mut last = String::from_utf8_lossy(&buffer[..n]).into_owned();
    while last == "WATCHDOG=1" {
        let n = recv(&socket, &mut buffer).unwrap();
        last = String::from_utf8_lossy(&buffer[..n]).into_owned();
    }
    assert_eq!(last, "STOPPING=1");
    assert_eq!(agent.process.wait(Duration::from_secs(10)), Some(0));
}

fn host_agent(sandbox: &Sandbox) -> Agent {
    sandbox.start_agent("enforced", "agent", &[&default_policy()], &[])
}

#[test]
fn the_packaged_default_policy_keeps_secrets_from_unprivileged_users() {
    let Some(sandbox) = Sandbox::new("host-default") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let _agent = host_agent(&sandbox);
    let daemon = "enforced/system.slice/some-daemon.service";

    let nobody = sandbox.curl(daemon, Some(65534), &[&url(CREDENTIALS)]);
    assert_eq!(
        nobody.body,
        "imds-agent: denied by policy 'host-default' rule 'no-secrets'\n"
    );
    let user_data = sandbox.curl(daemon, Some(1000), &[&url("/latest/user-data")]);
    assert_eq!(user_data.status, 403);
    let dated = sandbox.curl(
        daemon,
        Some(1000),
        &[&url(
            "/2021-03-23/meta-data/iam/security-credentials/demo-node-role",
        )],
    );
    assert_eq!(
        dated.body,
        "imds-agent: denied by policy 'host-default' rule 'no-secrets-in-any-version'\n"
    );
    // Where it runs is not a secret.
    assert_eq!(
        sandbox
            .curl(daemon, Some(1000), &[&url("/latest/meta-data/instance-id")])
            .body,
        INSTANCE_ID
    );

    let root = sandbox.curl(daemon, Some(0), &[&url(CREDENTIALS)]);
    assert!(root.body.contains(ACCESS_KEY_PREFIX), "{root:?}");
    // A named unit, whatever its user.
    let cloud_init = sandbox.curl(
        "enforced/system.slice/cloud-init.service",
        Some(1000),
        &[&url(CREDENTIALS)],
    );
    assert!(
        cloud_init.body.contains(ACCESS_KEY_PREFIX),
        "{cloud_init:?}"
    );
}

#[test]
fn a_host_without_policy_files_denies_everyone() {
    let Some(sandbox) = Sandbox::new("no-policy") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let empty = sandbox.work_dir.join("policies.d");
    std::fs::create_dir_all(&empty).unwrap();
    let agent = sandbox.start_agent("enforced", "agent", &[&empty], &[]);
    assert!(agent.log().contains("no policy files"), "{}", agent.log());
    for uid in [0, 1000] {
        let attempt = sandbox.curl(
            "enforced/system.slice/x.service",
            Some(uid),
            &[&url(CREDENTIALS)],
        );
        assert_eq!(
            attempt.body, "imds-agent: denied by policy '(none)' rule 'unmatched'\n",
            "uid {uid}"
        );
    }
}

fn status(sandbox: &Sandbox) -> String {
    let output = std::process::Command::new(binary("imds-agent"))
        .args(["status", "--pin-dir"])
        .arg(&sandbox.pin_dir)
        .arg("--state-dir")
        .arg(sandbox.work_dir.join("state"))
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn status_shows_attachment_policy_decisions_and_recent_denials() {
    let Some(sandbox) = Sandbox::new("status") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let mut agent = host_agent(&sandbox);
    let daemon = "enforced/system.slice/some-daemon.service";
    sandbox.curl(daemon, Some(1000), &[&url(CREDENTIALS)]);
    sandbox.curl(daemon, Some(1000), &[&url("/latest/meta-data/instance-id")]);

    // The agent writes its state every second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = status(&sandbox);
    while !text.contains("deny 1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = status(&sandbox);
    }
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "enforcement: attached (pin dir {})",
            sandbox.pin_dir.display()
        )
    );
    assert_eq!(
        lines[1],
        "kernel: diverted 2, passed 0, refused 0, bypassed 0"
    );
    assert_eq!(
        lines[2],
        format!(
            "agent: running (pid {}), enforcing {}, listening on 127.0.0.1:954",
            agent.process.child.id(),
            sandbox.cgroup_root.join("enforced").display()
        )
    );
    assert_eq!(
        lines[3],
        format!(
            "policy: version 1, 1 policies (host-default) from {}",
            default_policy().display()
        )
    );
    assert_eq!(lines[4], "decisions: allow 1, deny 1");
    assert_eq!(lines[5], "recent denials (newest last):");
    assert!(
        lines[6].ends_with(&format!("some-daemon.service uid=1000 comm=curl GET {CREDENTIALS} -> policy 'host-default' rule 'no-secrets'")),
        "{text}"
    );

    agent.process.signal(libc::SIGTERM);
    agent.process.wait(Duration::from_secs(10));
    let stopped = status(&sandbox);
    assert!(stopped.contains("enforcement: attached"), "{stopped}");
    assert!(
        stopped.contains(
            "agent: not running: enforced callers cannot reach the metadata service (fail closed)"
        ),
        "{stopped}"
    );
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        skip("systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success());
    let dir = std::env::temp_dir().join(format!("imds-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The unit as shipped, pointing at the binary this build made (verify checks it exists).
    let unit = std::fs::read_to_string(repo().join("packaging/imds-agent.service"))
        .unwrap()
        .replace(
            "/usr/bin/imds-agent",
            binary("imds-agent").to_str().unwrap(),
        );
    let path = dir.join("imds-agent.service");
    std::fs::write(&path, unit).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Only complaints about this unit count; the host's own units are not ours to judge.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("imds-agent"))
        .collect();
    assert!(output.status.success() && ours.is_empty(), "{stderr}");
}

#[test]
fn the_debian_package_holds_the_binary_unit_and_default_policy() {
    let debian = repo().join("target/debian");
    let Some(deb) = std::fs::read_dir(&debian).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
    }) else {
        skip("no .deb in target/debian: cargo xtask package (cargo xtask test builds it first)");
        return;
    };
    let listing = std::process::Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for (mode, file) in [
        ("-rwxr-xr-x", "./usr/bin/imds-agent"),
        ("-rw-r--r--", "./lib/systemd/system/imds-agent.service"),
        ("-rw-r--r--", "./etc/imds-agent/policies.d/00-default.yaml"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(file)),
            "{file} ({mode}) missing:\n{listing}"
        );
    }
    let info = std::process::Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .args(["Package", "Conffiles"])
        .output()
        .unwrap();
    let control = std::process::Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&deb)
        .arg("conffiles")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("Package: imds-agent"));
    // The default policy is a conffile: an administrator's edits survive upgrades.
    assert!(
        String::from_utf8_lossy(&control.stdout)
            .contains("/etc/imds-agent/policies.d/00-default.yaml")
    );
}
