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
    recv_with_fds(socket, buffer).map(|(n, _fds)| n)
}

/// systemd's side of the notify protocol, in the sandbox's scratch directory: the socket and
/// its path (for `NOTIFY_SOCKET`), receiving with `timeout`.
fn notify_socket(sandbox: &Sandbox, timeout: Duration) -> (UnixDatagram, PathBuf) {
    let path = sandbox.work_dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(timeout)).unwrap();
    (socket, path)
}

/// The next notification that is not a file descriptor store (FDSTORE=1, with descriptors,
/// which this closes).
fn next_state(socket: &UnixDatagram, buffer: &mut [u8]) -> std::io::Result<String> {
    loop {
        let (n, _fds) = recv_with_fds(socket, buffer)?;
        let state = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if !state.starts_with("FDSTORE=1") {
            return Ok(state);
        }
    }
}

/// A datagram and the descriptors that came with it, as systemd receives notifications.
fn recv_with_fds(
    socket: &UnixDatagram,
    buffer: &mut [u8],
) -> std::io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    loop {
        let mut iov = libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        };
        let mut control = [0u8; 256];
        // SAFETY: a zeroed msghdr is valid; its buffers outlive the call.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = control.len();
        // SAFETY: a valid socket and live buffers.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote.
        unsafe {
            let mut header = libc::CMSG_FIRSTHDR(&message);
            while !header.is_null() {
                if (*header).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    let data = libc::CMSG_DATA(header).cast::<i32>();
                    for i in 0..count {
                        fds.push(std::os::fd::OwnedFd::from_raw_fd(
                            data.add(i).read_unaligned(),
                        ));
                    }
                }
                header = libc::CMSG_NXTHDR(&message, header);
            }
        }
        return Ok((n as usize, fds));
    }
}

#[test]
fn after_a_crash_connects_wait_for_the_restarted_agent_instead_of_failing() {
    let Some(sandbox) = Sandbox::new("crash") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let (socket, socket_path) = notify_socket(&sandbox, Duration::from_secs(10));
    let notify = [("NOTIFY_SOCKET", socket_path.to_str().unwrap())];
    let flags = ["--provider", "aws"];
    let mut agent =
        sandbox.launch_agent_with_env("enforced", "agent", &[&default_policy()], &flags, &notify);
    // What systemd does with FDSTORE=1: keeps the descriptors for the next start.
    let mut buffer = [0u8; 512];
    let (n, stored) = recv_with_fds(&socket, &mut buffer).expect("FDSTORE");
    assert!(
        String::from_utf8_lossy(&buffer[..n]).starts_with("FDSTORE=1\nFDNAME=listeners"),
        "{}",
        String::from_utf8_lossy(&buffer[..n])
    );
    assert_eq!(stored.len(), 1, "the loopback listener");

    agent.process.signal(libc::SIGKILL);
    let _ = agent.process.wait(Duration::from_secs(5));
    assert!(!agent.is_running(), "the agent was killed");
    // A request while no agent runs: it connects (the socket is systemd's) and waits.
    let crashed = Instant::now();
    let waiting = sandbox.spawn_get(
        "enforced/system.slice/some.service",
        &url("/latest/meta-data/instance-id"),
        &[],
    );
    // systemd restarts the service (RestartSec=100ms) with the stored descriptors.
    std::thread::sleep(Duration::from_millis(100));
    let raw: Vec<i32> = stored.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let restarted = sandbox.launch_agent_passing(
        &raw,
        "enforced",
        "agent",
        &[&default_policy()],
        &flags,
        &notify,
    );
    let output = waiting.wait_with_output().expect("the waiting request");
    let waited = crashed.elapsed();
    assert!(
        output.status.success(),
        "the request made during the crash failed (exit {:?}):\n{}",
        output.status.code(),
        restarted.log()
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), INSTANCE_ID);
    assert!(
        restarted
            .log()
            .contains("listening sockets kept by systemd"),
        "{}",
        restarted.log()
    );
    eprintln!("a request made during the crash was answered after {waited:?}");
}

#[test]
fn ready_is_sent_after_attach_and_the_watchdog_is_pinged() {
    let Some(sandbox) = Sandbox::new("notify") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let (socket, socket_path) = notify_socket(&sandbox, Duration::from_secs(10));
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
    let first = next_state(&socket, &mut buffer).expect("READY within 10 s");
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
fn sigusr2_starts_the_installed_binary_which_takes_over_as_the_main_process() {
    let Some(sandbox) = Sandbox::new("usr2") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let (socket, socket_path) = notify_socket(&sandbox, Duration::from_secs(15));
    let mut agent = sandbox.launch_agent_with_env(
        "enforced",
        "agent",
        &[&default_policy()],
        &["--provider", "aws"],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buffer = [0u8; 512];
    let first = next_state(&socket, &mut buffer).expect("READY");
    assert!(first.starts_with("READY=1\nSTATUS="), "{first}");
    let first_pid = agent.process.child.id();

    // What a package upgrade does (systemctl kill --kill-whom=main --signal=SIGUSR2).
    agent.process.signal(libc::SIGUSR2);
    let ready = next_state(&socket, &mut buffer).expect("the successor's READY");
    let successor_pid: u32 = ready
        .lines()
        .find_map(|line| line.strip_prefix("MAINPID="))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {ready:?}"));
    assert_ne!(successor_pid, first_pid);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    // The first agent drains and exits, without telling systemd the service stops.
    assert_eq!(
        agent.process.wait(Duration::from_secs(15)),
        Some(0),
        "{}",
        agent.log()
    );
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while let Ok(n) = recv(&socket, &mut buffer) {
        assert_ne!(&buffer[..n], b"STOPPING=1", "the service does not stop");
    }
    let log = agent.log();
    assert!(log.contains("started the successor"), "{log}");
    assert!(log.contains("took over from the previous agent"), "{log}");
    // The successor serves.
    let served = sandbox.curl(
        "enforced/system.slice/some.service",
        Some(1000),
        &[&url("/latest/meta-data/instance-id")],
    );
    assert_eq!(served.body, INSTANCE_ID, "{served:?}");
    assert!(std::path::Path::new(&format!("/proc/{successor_pid}")).exists());
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
    let (path, _dir) = unit_for_this_build();
    let output = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Only complaints about this unit count; the host's own units are not ours to judge.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("imds-agent"))
        .collect();
    assert!(output.status.success() && ours.is_empty(), "{stderr}");
}

#[test]
fn the_unit_is_hardened_to_an_exposure_of_at_most_4() {
    let Ok(output) = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit_for_this_build().0)
        .output()
    else {
        skip("systemd-analyze is not installed");
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|score| score.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(exposure <= 4.0, "exposure {exposure}:\n{text}");
}

/// The unit as shipped, pointing at the binary this build made, in a directory of its own
/// (removed by the returned guard).
fn unit_for_this_build() -> (PathBuf, TempDir) {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "imds-unit-{}-{}",
        std::process::id(),
        std::thread::current().name().unwrap_or("t").replace("::", "-")
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let unit = std::fs::read_to_string(repo().join("packaging/imds-agent.service"))
        .unwrap()
        .replace(
            "/usr/bin/imds-agent",
            binary("imds-agent").to_str().unwrap(),
        );
    let path = dir.0.join("imds-agent.service");
    std::fs::write(&path, unit).unwrap();
    (path, dir)
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The package's maintainer scripts, run as dpkg runs them, with a `systemctl` that records
/// what it is asked, in a mount namespace of their own where /run/systemd/system exists.
fn run_maintainer_script(script: &str, args: &[&str], active: bool) -> Vec<String> {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "imds-scripts-{}-{script}-{}",
        std::process::id(),
        args.join("-")
    )));
    let bin = dir.0.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = dir.0.join("calls");
    let fake = format!(
        "#!/bin/sh\necho \"$*\" >> {calls}\ncase \"$*\" in *is-active*) exit {};; esac\nexit 0\n",
        if active { 0 } else { 3 },
        calls = calls.display()
    );
    for tool in ["systemctl", "imds-agent"] {
        let path = bin.join(tool);
        std::fs::write(
            &path,
            fake.replace("echo \"$*\"", &format!("echo \"{tool} $*\"")),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let script_path = repo().join("packaging/debian").join(script);
    let shell = format!(
        "mount -t tmpfs none /run && mkdir -p /run/systemd/system && PATH={bin}:$PATH sh {script} {args}",
        bin = bin.display(),
        script = script_path.display(),
        args = args.join(" ")
    );
    let status = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &shell])
        .status()
        .expect("unshare");
    assert!(status.success(), "{script} {args:?} failed");
    std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_package_starts_on_install_hands_over_on_upgrade_and_detaches_on_removal() {
    let install = run_maintainer_script("postinst", &["configure"], false);
    assert!(
        install
            .iter()
            .any(|c| c == "systemctl enable imds-agent.service")
            && install
                .iter()
                .any(|c| c == "systemctl start imds-agent.service"),
        "{install:?}"
    );
    // An upgrade of a running service: the agent hands over to the new binary, no restart.
    let upgrade = run_maintainer_script("postinst", &["configure", "0.0.9"], true);
    assert!(
        upgrade
            .iter()
            .any(|c| c == "systemctl kill --kill-whom=main --signal=SIGUSR2 imds-agent.service"),
        "{upgrade:?}"
    );
    assert!(
        !upgrade
            .iter()
            .any(|c| c.contains("restart") || c.contains("stop")),
        "{upgrade:?}"
    );
    // An upgrade of a stopped service leaves it stopped.
    let stopped = run_maintainer_script("postinst", &["configure", "0.0.9"], false);
    assert!(
        !stopped
            .iter()
            .any(|c| c.contains("start") || c.contains("kill")),
        "{stopped:?}"
    );
    let removal = run_maintainer_script("prerm", &["remove"], true);
    let stop = removal
        .iter()
        .position(|c| c == "systemctl stop imds-agent.service");
    let detach = removal.iter().position(|c| c == "imds-agent detach");
    assert!(
        matches!((stop, detach), (Some(s), Some(d)) if s < d),
        "stopped, then enforcement removed: {removal:?}"
    );
    // An upgrade's prerm leaves the service and its enforcement alone.
    assert!(run_maintainer_script("prerm", &["upgrade", "0.2.0"], true).is_empty());
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
        ("-rw-r--r--", "./etc/default/imds-agent"),
        ("-rw-r--r--", "./usr/share/man/man1/imds-agent.1.gz"),
        (
            "-rw-r--r--",
            "./usr/share/bash-completion/completions/imds-agent",
        ),
        (
            "-rw-r--r--",
            "./usr/share/zsh/vendor-completions/_imds-agent",
        ),
        (
            "-rw-r--r--",
            "./usr/share/fish/vendor_completions.d/imds-agent.fish",
        ),
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
    let conffiles = String::from_utf8_lossy(&control.stdout);
    assert!(conffiles.contains("/etc/imds-agent/policies.d/00-default.yaml"));
    assert!(conffiles.contains("/etc/default/imds-agent"));
    // The maintainer scripts shipped are the ones tested above.
    for script in ["postinst", "prerm", "postrm"] {
        let shipped = std::process::Command::new("dpkg-deb")
            .args(["-I"])
            .arg(&deb)
            .arg(script)
            .output()
            .unwrap();
        let ours = std::fs::read(repo().join("packaging/debian").join(script)).unwrap();
        assert_eq!(shipped.stdout, ours, "{script}");
    }
}
