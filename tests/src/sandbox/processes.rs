//! The agent and the fake services, started inside the sandbox.

use super::*;

impl Sandbox {
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
        let agent = binary("imds-agent");
        self.start_agent_binary(&agent, enforce, agent_cgroup, policies, extra)
    }

    /// As [`Self::start_agent`], with another build of the agent (`imds-bench builds`).
    pub fn start_agent_binary(
        &self,
        agent: &Path,
        enforce: &str,
        agent_cgroup: &str,
        policies: &[&Path],
        extra: &[&str],
    ) -> Agent {
        let mut agent = self.launch(agent, enforce, agent_cgroup, policies, extra, &[]);
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
        let agent = binary("imds-agent");
        self.launch(&agent, enforce, agent_cgroup, policies, extra, env)
    }

    /// As systemd starts a service with stored file descriptors: `fds` become descriptors 3
    /// onwards of the agent, with `LISTEN_FDS` and `LISTEN_PID` set.
    pub fn launch_agent_passing(
        &self,
        fds: &[std::os::fd::RawFd],
        enforce: &str,
        agent_cgroup: &str,
        policies: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let agent = binary("imds-agent");
        let script = format!(
            "export LISTEN_PID=$$ LISTEN_FDS={}; exec \"$0\" \"$@\"",
            fds.len()
        );
        let mut command = self.command("sh", agent_cgroup);
        command.args(["-c", &script]).arg(&agent);
        let fds = fds.to_vec();
        // SAFETY: only dup2 between fork and exec. First out of the way (100 onwards), then
        // into place, so that no descriptor is overwritten before it is copied.
        unsafe {
            command.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    if libc::dup2(*fd, 100 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..fds.len() {
                    if libc::dup2(100 + i as i32, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        self.start_logged(command, enforce, policies, extra, env)
    }

    /// The pin directory of a second, separate installation in this sandbox.
    pub fn second_pin_dir(&self) -> PathBuf {
        let mut dir = self.pin_dir.clone().into_os_string();
        dir.push("-second");
        PathBuf::from(dir)
    }

    /// A second, separate installation of the agent (its own pin and state directories), as
    /// another program at the same hooks is to the first: `extra` must give it another
    /// `--listen` address.
    pub fn start_second_agent(
        &self,
        enforce: &str,
        agent_cgroup: &str,
        policies: &[&Path],
        extra: &[&str],
    ) -> Agent {
        let command = self.command(binary("imds-agent"), agent_cgroup);
        let pin_dir = self.second_pin_dir();
        let state_dir = self.work_dir.join("state-second");
        let mut agent = self.start_installed(
            command,
            enforce,
            policies,
            extra,
            &[],
            (&pin_dir, &state_dir),
        );
        assert!(
            agent.is_running(),
            "the second agent exited:\n{}",
            agent.log()
        );
        agent
    }

    fn launch(
        &self,
        agent: &Path,
        enforce: &str,
        agent_cgroup: &str,
        policies: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let command = self.command(agent, agent_cgroup);
        self.start_logged(command, enforce, policies, extra, env)
    }

    /// Runs `command` (the agent, or a wrapper that executes it) with the sandbox's `run`
    /// arguments and waits until it enforces or exits.
    fn start_logged(
        &self,
        command: Command,
        enforce: &str,
        policies: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let state_dir = self.work_dir.join("state");
        self.start_installed(
            command,
            enforce,
            policies,
            extra,
            env,
            (&self.pin_dir, &state_dir),
        )
    }

    /// As [`Self::start_logged`], with the installation's (pin, state) directories.
    fn start_installed(
        &self,
        mut command: Command,
        enforce: &str,
        policies: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
        (pin_dir, state_dir): (&Path, &Path),
    ) -> Agent {
        let log = self.work_dir.join(format!(
            "agent-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        command
            .arg("--log-format=json")
            .arg("run")
            .arg("--cgroup")
            .arg(self.cgroup(enforce))
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--state-dir")
            .arg(state_dir)
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
}

/// A log file's text once it has stopped growing (two reads 10 ms apart agree, for at most
/// half a second): the agent writes a runtime worker's audit lines when the worker goes idle,
/// just after the answers left, so a client can have its answer a moment before the line.
pub fn read_settled(path: &Path) -> String {
    let read = || std::fs::read_to_string(path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut text = read();
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let again = read();
        let settled = again.len() == text.len();
        text = again;
        if settled || Instant::now() > deadline {
            return text;
        }
    }
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

    /// The audit lines logged so far, parsed (read as [`read_settled`] reads).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let log = self
            .process
            .log
            .as_deref()
            .map(read_settled)
            .unwrap_or_default();
        log.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v["target"] == "imds_agent::audit")
            .collect()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }
}
