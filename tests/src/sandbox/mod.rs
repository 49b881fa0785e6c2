//! A test sandbox: a private network namespace where the metadata address is local, a parent
//! cgroup of its own with child cgroups for workloads, the agent and the fake IMDS, and a pin
//! directory of its own. Everything is removed on drop, also when a test panics.
//!
//! Safety rules this enforces: every process that sends traffic (workloads, the agent, the
//! fake IMDS) is started inside the sandbox's namespace and one of its cgroups; the test
//! process itself never connects anywhere, and programs attach only below the sandbox's own
//! parent cgroup.
//!
//! By role: `processes` starts the agent and the fake services, `curl` runs workloads'
//! requests, `pods` adds pod network namespaces, `programs` reads what is attached.

mod curl;
mod pods;
mod processes;
mod programs;

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

pub use curl::{CURL_ARGS, Curl, curl_result};
pub use pods::{PodNetwork, PodSlot};
pub use processes::{Agent, Process, read_settled};
pub use programs::{AttachedProgram, ENFORCED_ATTACH_TYPES, attach_types, attached_programs};

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
        // 2. Enforcement: unpinning the links detaches the programs (a second installation's
        // too, see `start_second_agent`).
        for pin_dir in [self.pin_dir.clone(), self.second_pin_dir()] {
            if let Err(error) = imds_agent::loader::detach(&pin_dir) {
                eprintln!("sandbox {}: detach: {error}", self.name);
            }
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
