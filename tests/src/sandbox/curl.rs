//! Workloads' requests: curl in a cgroup of the sandbox, and what it saw.

use super::*;

impl Sandbox {
    /// Starts a GET of `url` from `cgroup` in the background with extra curl `args`, for a
    /// request held in flight (with the fake IMDS's `X-Fake-Delay-Ms`); its stdout is the body.
    pub fn spawn_get(&self, cgroup: &str, url: &str, args: &[&str]) -> Child {
        self.command_as("curl", cgroup, None)
            .args(["-sS", "-m", "10"])
            .args(args)
            .arg(url)
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
}

/// What [`Curl`] runs curl with: quiet but for errors, a 5 s limit, and the status code on a
/// line of its own after the body.
pub const CURL_ARGS: [&str; 7] = ["-sS", "--noproxy", "*", "-m", "5", "-w", "\n%{http_code}"];

pub(super) fn run_curl(mut command: Command, args: &[&str]) -> Curl {
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
