//! A test sandbox: a private network namespace where the metadata address is local, a parent
//! cgroup of its own with child cgroups for workloads, the agent and the fake IMDS, and a pin
//! directory of its own. Everything is removed on drop, also when a test panics.
//!
//! Safety rules this enforces: every process that sends traffic (workloads, the agent, the
//! fake IMDS) is started inside the sandbox's namespace and one of its cgroups; the test
//! process itself never connects anywhere, and programs attach only below the sandbox's own
//! parent cgroup.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// The metadata address inside every sandbox.
pub const METADATA_IP: &str = "169.254.169.254";
/// AWS's IPv6 metadata address, also local (and served) inside every sandbox.
pub const METADATA_IP6: &str = "fd00:ec2::254";
/// A non-metadata server inside every sandbox (served by the fake IMDS on a second listener).
pub const OTHER_SERVER: &str = "127.0.0.1:8080";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether python3 can import `modules` (a cloud SDK); if not, [`skip`] with the reason.
pub fn python_has(modules: &str, package: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(&format!(
            "python3 with {package} is not installed (cargo xtask setup installs it)"
        ));
    }
    found
}

/// Skips a test that cannot run here, or fails it under CI (`CI=true`), where a skip would
/// hide a broken set-up.
pub fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("cannot run under CI: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// The directory holding the workspace's binaries (target/debug), found from this process.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe has a directory");
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_owned()
    } else {
        dir.to_owned()
    }
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --bins, or cargo xtask test)",
        path.display()
    );
    path
}

/// A program attached to a cgroup, as `bpftool cgroup show` lists it.
pub struct AttachedProgram {
    pub id: u64,
    /// bpftool's name for the attach type, e.g. `cgroup_inet4_connect`.
    pub attach_type: String,
}

/// The attach types of the programs attached to `cgroup`, sorted; `None` (after [`skip`])
/// without bpftool.
pub fn attach_types(cgroup: &Path) -> Option<Vec<String>> {
    match attached_programs(cgroup) {
        Ok(programs) => {
            let mut types: Vec<String> = programs.into_iter().map(|p| p.attach_type).collect();
            types.sort();
            Some(types)
        }
        Err(error) => {
            skip(&error);
            None
        }
    }
}

/// What the agent attaches to the enforced cgroup: programs that run at socket() and at
/// connect() or sendmsg() to an address, and nothing at the TCP events of every connection.
pub const ENFORCED_ATTACH_TYPES: [&str; 5] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_inet_sock_create",
    "cgroup_udp4_sendmsg",
    "cgroup_udp6_sendmsg",
];

/// The programs attached to `cgroup` (not inherited ones), from `bpftool -j cgroup show`;
/// an error if bpftool cannot be run or fails.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<AttachedProgram>, String> {
    let output = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .map_err(|e| format!("bpftool: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "bpftool cgroup show {}: {}",
            cgroup.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // Nothing attached: bpftool prints nothing at all.
    if output.stdout.trim_ascii().is_empty() {
        return Ok(Vec::new());
    }
    let listed: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("bpftool output: {e}"))?;
    Ok(listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(AttachedProgram {
                id: p["id"].as_u64()?,
                attach_type: p["attach_type"].as_str()?.to_owned(),
            })
        })
        .collect())
}

pub struct Sandbox {
    pub name: String,
    netns: File,
    pub cgroup_mount: PathBuf,
    /// The sandbox's parent cgroup; every cgroup it creates is below it.
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub work_dir: PathBuf,
}

impl Sandbox {
    /// A new sandbox, or `None` (after [`skip`]) when this machine cannot run one.
    pub fn new(label: &str) -> Option<Self> {
        if let Some(reason) = missing_prerequisite() {
            skip(&reason);
            return None;
        }
        reap_stale();
        let name = format!(
            "imds-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup_mount = imds_agent::fs::cgroup2_mount().expect("cgroup2 mount");
        let cgroup_root = cgroup_mount.join(&name);
        let work_dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&work_dir).expect("work dir");
        std::fs::create_dir(&cgroup_root).expect("sandbox cgroup");
        // Constructed before the namespace so that Drop cleans up whatever succeeded.
        run("ip", &["netns", "add", &name]);
        let netns = File::open(format!("/run/netns/{name}"));
        let sandbox = Self {
            pin_dir: PathBuf::from(imds_agent::fs::BPFFS_ROOT).join(&name),
            netns: netns.expect("open netns"),
            name,
            cgroup_mount,
            cgroup_root,
            work_dir,
        };
        let ns = sandbox.name.as_str();
        run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        run(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{METADATA_IP}/32"),
                "dev",
                "lo",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{METADATA_IP6}/128"),
                "dev",
                "lo",
                "nodad",
            ],
        );
        Some(sandbox)
    }

    /// Creates (if needed) a cgroup below the sandbox root; `path` like "enforced/web".
    pub fn cgroup(&self, path: &str) -> PathBuf {
        let dir = self.cgroup_root.join(path);
        std::fs::create_dir_all(&dir).expect("create cgroup");
        dir
    }

    /// A command that runs in the sandbox's network namespace and in cgroup `cgroup`.
    pub fn command(&self, program: impl AsRef<OsStr>, cgroup: &str) -> Command {
        self.command_as(program, cgroup, None)
    }

    /// As [`Self::command`], then drops to `uid` (and the same gid) before exec. Joining the
    /// cgroup and the namespace needs root, so it must happen first: std's `Command::uid`
    /// switches before `pre_exec` hooks run.
    pub fn command_as(
        &self,
        program: impl AsRef<OsStr>,
        cgroup: &str,
        uid: Option<u32>,
    ) -> Command {
        self.command_in(&self.netns, program, cgroup, uid)
    }

    /// As [`Self::command_as`], in the network namespace `netns` (a pod's).
    fn command_in(
        &self,
        netns: &File,
        program: impl AsRef<OsStr>,
        cgroup: &str,
        uid: Option<u32>,
    ) -> Command {
        let procs = CString::new(
            self.cgroup(cgroup)
                .join("cgroup.procs")
                .as_os_str()
                .as_bytes(),
        )
        .expect("path has no NUL");
        let netns = netns.as_raw_fd();
        let mut command = Command::new(program);
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close,
        // setns) on data prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(id) = uid
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(id) != 0
                        || libc::setuid(id) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Runs `ip -n SANDBOX ARGS...` (adds interfaces and addresses inside the sandbox).
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Writes policy files (name, YAML) into the sandbox's policy directory and returns the
    /// directory, to pass to the agent's --policy (where it is also watched for edits).
    pub fn write_policies(&self, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.work_dir.join("policies");
        std::fs::create_dir_all(&dir).expect("policy directory");
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write policy");
        }
        dir
    }

    /// Starts the fake IMDS on the metadata address and on [`OTHER_SERVER`].
    pub fn start_fake_imds(&self, tokens_required: bool) -> Process {
        self.start_fake_imds_on(tokens_required, &[])
    }

    /// As [`Self::start_fake_imds`], also listening on `extra` (addresses the test made
    /// local with [`Self::ip`]).
    pub fn start_fake_imds_on(&self, tokens_required: bool, extra: &[&str]) -> Process {
        let flags: &[&str] = if tokens_required {
            &["--tokens-required"]
        } else {
            &[]
        };
        self.spawn_fake_imds(flags, extra)
    }

    /// The fake metadata service as `provider`'s (a `fake-imds --provider` name), on the
    /// same addresses and on `extra`.
    pub fn start_fake_cloud(&self, provider: &str, extra: &[&str]) -> Process {
        self.spawn_fake_imds(&["--provider", provider], extra)
    }

    /// The fake metadata service with `fake-imds` flags, on the sandbox's metadata addresses
    /// and on `extra`.
    pub fn spawn_fake_imds(&self, flags: &[&str], extra: &[&str]) -> Process {
        let mut command = self.command(binary("fake-imds"), "imds");
        command
            .args([
                "--listen",
                &format!("{METADATA_IP}:80"),
                "--listen",
                &format!("[{METADATA_IP6}]:80"),
                "--listen",
                OTHER_SERVER,
            ])
            .args(extra.iter().flat_map(|addr| ["--listen", addr]))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        command.args(flags);
        let mut child = command.spawn().expect("spawn fake-imds");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read fake-imds readiness");
        let process = Process { child, log: None };
        assert!(
            line.starts_with("listening"),
            "fake-imds did not start: {line:?}"
        );
        process
    }

    /// Starts the agent enforcing `enforce` (a cgroup below the sandbox root), with the agent
    /// process itself in `agent_cgroup`, and waits until it is enforcing; panics with its log
    /// if it exits instead.
    pub fn start_agent(
        &self,
        enforce: &str,
        agent_cgroup: &str,
        policies: &[&Path],
        extra: &[&str],
    ) -> Agent {
        let mut agent = self.launch_agent(enforce, agent_cgroup, policies, extra);
        assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
        agent
    }

    /// Starts the agent and waits until it is enforcing or has exited (for tests of start-up
    /// failures).
    pub fn launch_agent(
        &self,
        enforce: &str,
        agent_cgroup: &str,
        policies: &[&Path],
        extra: &[&str],
    ) -> Agent {
        self.launch_agent_with_env(enforce, agent_cgroup, policies, extra, &[])
    }

    /// As [`Self::launch_agent`], with extra environment variables for the agent.
    pub fn launch_agent_with_env(
        &self,
        enforce: &str,
        agent_cgroup: &str,
        policies: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let log = self.work_dir.join(format!(
            "agent-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut command = self.command(binary("imds-agent"), agent_cgroup);
        command
            .arg("--log-format=json")
            .arg("run")
            .arg("--cgroup")
            .arg(self.cgroup(enforce))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.work_dir.join("state"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("agent log"));
        for policy in policies {
            command.arg("--policy").arg(policy);
        }
        command.envs(env.iter().copied());
        let child = command.spawn().expect("spawn imds-agent");
        let mut agent = Agent {
            process: Process {
                child,
                log: Some(log),
            },
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if agent.log().contains("\"enforcing\"") {
                return agent;
            }
            if let Ok(Some(_)) = agent.process.child.try_wait() {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent did not start within 20 s:\n{}", agent.log());
    }

    /// Starts a GET of `url` from `cgroup` in the background, for a request held in flight
    /// (with the fake IMDS's `fake_delay_ms`); its stdout is the body.
    pub fn spawn_get(&self, cgroup: &str, url: &str) -> Child {
        self.command_as("curl", cgroup, None)
            .args(["-sS", "-m", "10", url])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn curl")
    }

    /// `curl` from a workload in `cgroup` (as `uid`, if given) with extra arguments.
    pub fn curl(&self, cgroup: &str, uid: Option<u32>, args: &[&str]) -> Curl {
        run_curl(self.command_as("curl", cgroup, uid), args)
    }

    /// A TCP listener inside the sandbox's network namespace, for a server the test process
    /// runs itself (a socket stays in the namespace it was created in). The namespace is
    /// joined by a short-lived thread, so the test process's own threads never are.
    pub fn bind_tcp(&self, addr: &str) -> std::net::TcpListener {
        let netns = self.netns.try_clone().expect("netns fd");
        let addr = addr.to_owned();
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns: {}", std::io::Error::last_os_error());
            }
            std::net::TcpListener::bind(&addr).expect("bind in the sandbox")
        })
        .join()
        .expect("bind thread")
    }

    /// Runs a Python script (a cloud SDK as the workload) in `cgroup` and parses the JSON it
    /// prints; the command can be adjusted first (environment).
    pub fn python_json(
        &self,
        cgroup: &str,
        script: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> serde_json::Value {
        let mut command = self.command("python3", cgroup);
        command.args(["-c", script]);
        adjust(&mut command);
        let output = command.output().expect("run python3");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("the script prints JSON")
    }

    /// The kernel counters (diverted, refused, ...) as `imds-agent status --json` shows them.
    pub fn kernel_counters(&self) -> serde_json::Value {
        let output = Command::new(binary("imds-agent"))
            .args(["status", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .expect("imds-agent status");
        let status: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("status is JSON");
        status["counters"].clone()
    }

    /// A "pod": a network namespace of its own, joined to the sandbox (the node) by a veth
    /// pair, with the node as its default gateway, as a CNI plugin sets one up. Without the
    /// programs, the pod reaches the metadata address through the node.
    pub fn add_pod_network(&self) -> PodNetwork {
        self.add_pod_network_at(NEXT.fetch_add(1, Ordering::Relaxed), false)
    }

    /// A pod network whose node end of the veth pair is a port of a bridge that holds the
    /// node's address, as the bridge CNI plugin, flannel and Docker connect containers.
    pub fn add_bridged_pod_network(&self) -> PodNetwork {
        self.add_pod_network_at(NEXT.fetch_add(1, Ordering::Relaxed), true)
    }

    /// Deletes `pod` and waits until the kernel has removed it (the namespace, its veth pair
    /// and its id go in the kernel's cleanup, after the fact). The slot gives a new pod its
    /// addresses, as Kubernetes gives a deleted pod's address to a new pod.
    pub fn remove_pod_network(&self, pod: PodNetwork) -> PodSlot {
        let (n, node_if) = (pod.n, pod.node_if.clone());
        drop(pod);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pod_netns_id(&node_if).is_some() {
            assert!(Instant::now() < deadline, "{node_if} outlived its pod");
            std::thread::sleep(Duration::from_millis(20));
        }
        PodSlot(n)
    }

    /// A new pod network with the addresses of a removed one.
    pub fn add_pod_network_in(&self, slot: PodSlot) -> PodNetwork {
        self.add_pod_network_at(slot.0, false)
    }

    /// The id in the sandbox's namespace of the pod namespace at the other end of `node_if`
    /// (`link-netnsid`; asking assigns one if it has none yet); `None` once the link is gone.
    pub fn pod_netns_id(&self, node_if: &str) -> Option<i64> {
        let output = Command::new("ip")
            .args(["-n", &self.name, "-j", "link", "show", "dev", node_if])
            .output()
            .expect("ip");
        let links: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        links[0]["link_netnsid"].as_i64()
    }

    fn add_pod_network_at(&self, n: u32, bridged: bool) -> PodNetwork {
        // "<sandbox>p<n>": reap_stale still finds the creating pid in the name.
        let name = format!("{}p{n}", self.name);
        run("ip", &["netns", "add", &name]);
        let netns = File::open(format!("/run/netns/{name}"));
        let pod = PodNetwork {
            netns: netns.expect("open pod netns"),
            name,
            n,
            node_if: format!("vn{n}"),
            node_ip: format!("10.213.{}.1", n % 250),
            pod_ip: format!("10.213.{}.2", n % 250),
        };
        let pod_if = format!("vp{n}");
        self.ip(&[
            "link",
            "add",
            &pod.node_if,
            "type",
            "veth",
            "peer",
            "name",
            &pod_if,
            "netns",
            &pod.name,
        ]);
        let node_address = format!("{}/24", pod.node_ip);
        if bridged {
            let bridge = format!("vb{n}");
            self.ip(&["link", "add", &bridge, "type", "bridge"]);
            self.ip(&["addr", "add", &node_address, "dev", &bridge]);
            self.ip(&["link", "set", &bridge, "up"]);
            self.ip(&["link", "set", &pod.node_if, "master", &bridge]);
        } else {
            self.ip(&["addr", "add", &node_address, "dev", &pod.node_if]);
        }
        self.ip(&["link", "set", &pod.node_if, "up"]);
        let in_pod = |args: &[&str]| {
            let mut all = vec!["-n", pod.name.as_str()];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        in_pod(&["link", "set", "lo", "up"]);
        in_pod(&["addr", "add", &format!("{}/24", pod.pod_ip), "dev", &pod_if]);
        in_pod(&["link", "set", &pod_if, "up"]);
        in_pod(&["route", "add", "default", "via", &pod.node_ip]);
        pod
    }

    /// `curl` from a workload in the pod's network namespace and in `cgroup`.
    pub fn curl_in_pod(&self, pod: &PodNetwork, cgroup: &str, args: &[&str]) -> Curl {
        run_curl(self.command_in(&pod.netns, "curl", cgroup, None), args)
    }
}

/// The addresses of a removed pod network ([`Sandbox::remove_pod_network`]).
pub struct PodSlot(u32);

/// A pod's network namespace, deleted (with its end of the veth pair) on drop.
pub struct PodNetwork {
    pub name: String,
    netns: File,
    n: u32,
    /// The node's end of the pod's veth pair, in the sandbox's namespace.
    pub node_if: String,
    /// The node's address on the pod's link: what `--pod-address` names.
    pub node_ip: String,
    pub pod_ip: String,
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// What [`Curl`] runs curl with: quiet but for errors, a 5 s limit, and the status code on a
/// line of its own after the body.
pub const CURL_ARGS: [&str; 7] = ["-sS", "--noproxy", "*", "-m", "5", "-w", "\n%{http_code}"];

fn run_curl(mut command: Command, args: &[&str]) -> Curl {
    command
        .args(CURL_ARGS)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    curl_result(command.output().expect("run curl"))
}

/// What a curl run with [`CURL_ARGS`] saw.
pub fn curl_result(output: std::process::Output) -> Curl {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curl {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        exit: output.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Whether `name` is a sandbox's ("imds-<label>-<pid>-<n>") whose test process is gone.
pub fn is_stale(name: &str) -> bool {
    let mut parts = name.rsplit('-');
    let (Some(_), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    name.starts_with("imds-")
        && pid
            .parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // 1. Every process in the sandbox's cgroups (cgroup.kill, kernel >= 5.14).
        let _ = std::fs::write(self.cgroup_root.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && has_processes(&self.cgroup_root) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // 2. Enforcement: unpinning the links detaches the programs.
        if let Err(error) = imds_agent::loader::detach(&self.pin_dir) {
            eprintln!("sandbox {}: detach: {error}", self.name);
        }
        // 3. Cgroups, deepest first (a cgroup's links go with it).
        remove_cgroups(&self.cgroup_root);
        // 4. The namespace and scratch files.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Removes sandboxes whose creating process is gone (killed before its Drop could run):
/// names end in "-<pid>-<n>".
fn reap_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let cgroup_mount = imds_agent::fs::cgroup2_mount().ok();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if !is_stale(name) {
            continue;
        }
        if let Some(mount) = &cgroup_mount {
            let cgroup = mount.join(name);
            let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(50));
            remove_cgroups(&cgroup);
        }
        let _ = imds_agent::loader::detach(&PathBuf::from(imds_agent::fs::BPFFS_ROOT).join(name));
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

fn has_processes(cgroup: &Path) -> bool {
    let own =
        std::fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty());
    own || subdirs(cgroup).iter().any(|d| has_processes(d))
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_cgroups(dir: &Path) {
    for sub in subdirs(dir) {
        remove_cgroups(&sub);
    }
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // EBUSY while the last process is still exiting.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("sandbox: could not remove cgroup {}", dir.display());
}

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (eBPF, cgroups, network namespaces)".into());
    }
    if let Err(e) = imds_agent::fs::cgroup2_mount() {
        return Some(e.to_string());
    }
    for tool in ["ip", "curl"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!(
                "`{tool}` is not installed (cargo xtask setup installs it)"
            ));
        }
    }
    None
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A child process that is killed when dropped.
pub struct Process {
    pub child: Child,
    log: Option<PathBuf>,
}

impl Process {
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Waits for the process to exit, up to `timeout`; its exit code (None: killed by a
    /// signal or still running).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent process and its JSON log.
pub struct Agent {
    pub process: Process,
}

impl Agent {
    pub fn log(&self) -> String {
        self.process
            .log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The audit lines logged so far, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v["target"] == "imds_agent::audit")
            .collect()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }
}

/// What a workload's curl saw.
#[derive(Debug)]
pub struct Curl {
    /// HTTP status, 0 when no response arrived.
    pub status: u16,
    pub body: String,
    /// curl's exit code: 0 ok, 7 connection refused or failed, 28 timeout.
    pub exit: i32,
    pub stderr: String,
}
