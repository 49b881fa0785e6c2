//! The agent as a node runs it: its image (`cargo xtask image`), started by podman and runc
//! from the DaemonSet that `kubectl kustomize deploy/` renders, on a node played by a sandbox
//! (see `kubelet.rs`), enforcing workload containers that the runtime made as pods: each in a
//! network namespace of its own on an `--internal` bridge, in kubelet's cgroup layout,
//! reported by the fake API server with labels and service accounts.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use imds_tests::{
    fake_imds::{ACCESS_KEY_PREFIX, INSTANCE_ID},
    fake_kube::{self, FakeApiServer, Kind},
    kubelet::{Node, PodNetwork, Podman, PodmanRun, Rendered, WORKLOAD_IMAGE, podman_run},
    sandbox::{Curl, ENFORCED_ATTACH_TYPES, Process, Sandbox, attach_types},
};

use crate::support::{Overlay, repo, wait_until};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const INSTANCE_ID_URL: &str = "http://169.254.169.254/latest/meta-data/instance-id";
const CREDENTIALS_URL: &str =
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/demo-node-role";

const AGENT_POD_UID: &str = "0c6f3d2a-9b1e-4f7a-8c5d-2e4b6a8c0d1f";
const API_POD_UID: &str = "5d9e1f3a-7b2c-4d6e-8f0a-1b3c5d7e9f20";
const WEB_POD_UID: &str = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";

/// botocore's own instance-metadata credential fetcher, as every AWS SDK for Python uses it,
/// with its defaults (1 s timeout, one attempt).
const BOTOCORE_FETCH: &str = r#"
import json
from botocore.utils import InstanceMetadataFetcher
creds = InstanceMetadataFetcher().retrieve_iam_role_credentials()
print(json.dumps({"role": creds.get("role_name"), "access_key": creds.get("access_key")}))
"#;

/// Unpins the agent's links and maps from the node's bpffs directory when dropped.
struct NodePins(PathBuf);

impl Drop for NodePins {
    fn drop(&mut self) {
        if let Err(error) = imds_agent::loader::detach(&self.0) {
            eprintln!("detach {}: {error}", self.0.display());
        }
    }
}

/// The node, its API server and its containers; dropped in this order (containers first).
struct Cluster {
    podman: Podman,
    _pins: NodePins,
    api: FakeApiServer,
    _imds: Process,
    request_log: PathBuf,
    network: PodNetwork,
    /// The agent's container, and how it is run.
    agent: String,
    agent_run: PodmanRun,
    /// Agents' containers a rollout replaced, oldest first.
    retired: Vec<String>,
    node: Node<'static>,
    /// The node's cgroup root, as podman's --cgroup-parent takes it.
    cgroup_root: String,
    sandbox: Sandbox,
}

impl Cluster {
    fn start(label: &str) -> Option<Self> {
        let sandbox = Sandbox::new(label)?;
        let rendered = Rendered::kustomize(&repo().join("deploy"));
        let daemonset = rendered.get("DaemonSet", "imds-agent");
        let image = daemonset["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .expect("the agent's image")
            .to_owned();
        let podman = Podman::new(&sandbox, &[&image, WORKLOAD_IMAGE])?;

        // What a node has before the agent comes: bpffs mounted (systemd mounts it), the
        // metadata service, and the pods' bridge.
        imds_agent::fs::ensure_bpffs().expect("bpffs on the node");
        let node_bpffs = sandbox.pin_dir.clone();
        std::fs::create_dir_all(&node_bpffs).expect("the node's bpffs directory");
        let pins = NodePins(node_bpffs.join("imds-agent"));
        let request_log = sandbox.work_dir.join("imds-requests.log");
        let imds = sandbox.spawn_fake_imds(
            &["--request-log", request_log.to_str().expect("UTF-8 path")],
            &[],
        );
        // Two clusters of one test run on two subnets.
        static CLUSTERS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let subnet = (std::process::id() % 100) as u8 * 2 + 20 + n % 2;
        let network = podman.create_network(&format!("{}-pods", sandbox.name), [10, 214, subnet]);

        let api = FakeApiServer::start(sandbox.bind_tcp("127.0.0.1:0"));
        // The pod default from deploy/, and the example namespace policy.
        let pod_default = rendered.get("ClusterImdsPolicy", "pod-default").clone();
        api.apply(Kind::ClusterImdsPolicy, pod_default);
        let example = std::fs::read_to_string(repo().join("policies/kubernetes/payments-api.yaml"))
            .expect("example policy");
        let example: Value = serde_saphyr::from_str(&example).expect("example policy parses");
        api.apply(Kind::ImdsPolicy, example);

        let cgroup_root = format!("/{}", sandbox.name);
        // The agent's seccomp profile, installed on the node as the seccomp component asks.
        let seccomp_root = sandbox.work_dir.join("node/seccomp");
        std::fs::create_dir_all(&seccomp_root).expect("the node's seccomp directory");
        std::fs::copy(
            repo().join(imds_tests::seccomp::PROFILE),
            seccomp_root.join("imds-agent.json"),
        )
        .expect("install the seccomp profile");
        let node = Node {
            name: NODE,
            labels: BTreeMap::from([
                ("kubernetes.io/os", "linux"),
                ("kubernetes.io/arch", "amd64"),
                ("kubernetes.io/hostname", NODE),
            ]),
            ip: network.gateway,
            host_paths: BTreeMap::from([
                ("/sys/fs/bpf", node_bpffs),
                ("/sys/fs/cgroup", sandbox.cgroup_root.clone()),
                (
                    "/run/imds-agent",
                    sandbox.work_dir.join("node/run/imds-agent"),
                ),
            ]),
            seccomp_root: seccomp_root.clone(),
            volume_dir: sandbox.work_dir.join("volumes"),
            cgroup_root: cgroup_root.clone(),
            kubeconfig: api.kubeconfig(&sandbox.work_dir),
        };
        let agent_run = podman_run(
            &rendered,
            daemonset,
            &node,
            AGENT_POD_UID,
            &format!("{}-agent", sandbox.name),
        );
        Some(Self {
            podman,
            _pins: pins,
            api,
            _imds: imds,
            request_log,
            network,
            agent: String::new(),
            agent_run,
            retired: Vec::new(),
            node,
            cgroup_root,
            sandbox,
        })
    }

    /// Starts the agent's container and waits for its readiness. The node's address (the
    /// bridge's) exists once the network has a container: the pods are started first.
    fn start_agent(&mut self) {
        self.agent = self.podman.start(&self.agent_run.args);
        self.wait_ready();
    }

    /// Polls the readiness probe the DaemonSet declares, from kubelet's cgroup, until ready.
    fn wait_ready(&self) {
        let (path, port) = self
            .agent_run
            .readiness
            .clone()
            .expect("the DaemonSet declares a readiness probe");
        let url = format!("http://{}:{port}{path}", self.network.gateway);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.probe(&url).status == 200 {
                return;
            }
            assert!(
                self.podman.is_running(&self.agent),
                "the agent's container exited:\n{}",
                self.podman.logs(&self.agent)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the agent never turned ready ({url}):\n{}",
            self.podman.logs(&self.agent)
        );
    }

    fn probe(&self, url: &str) -> Curl {
        self.sandbox
            .curl("system.slice/kubelet.service", None, &[url])
    }

    /// A pod: its container, started by podman, then reported by the API server as kubelet
    /// reports it (with the container's id).
    fn add_pod(&self, namespace: &str, name: &str, uid: &str, app: &str, account: &str) -> String {
        let container = format!("{}-{name}", self.sandbox.name);
        let id = self
            .podman
            .start_pod(&container, &self.network, &self.cgroup_root, uid);
        self.api.apply(
            Kind::Pod,
            fake_kube::pod_as(
                namespace,
                name,
                uid,
                NODE,
                json!({"app": app}),
                account,
                &id,
            ),
        );
        container
    }

    /// A container on the host network (the node's namespace), in `cgroup_parent` below the
    /// node's root, as a node daemon shipped as a container runs.
    fn add_host_container(&self, name: &str, cgroup_parent: &str) -> String {
        let container = format!("{}-{name}", self.sandbox.name);
        self.podman.start(&[
            "--name".into(),
            container.clone(),
            "--network".into(),
            "host".into(),
            "--cgroup-parent".into(),
            format!("{}/{cgroup_parent}", self.cgroup_root),
            "--pull".into(),
            "never".into(),
            WORKLOAD_IMAGE.into(),
            "sleep".into(),
            "infinity".into(),
        ]);
        container
    }

    /// A rollout of the DaemonSet `rendered` on this node, as the DaemonSet controller runs a
    /// surging one: the new pod (`pod_uid`) started beside the old, the old one deleted
    /// (SIGTERM, then its grace period) once the new one is ready.
    fn rollout(&mut self, rendered: &Rendered, pod_uid: &str) {
        let daemonset = rendered.get("DaemonSet", "imds-agent");
        let rolling = &daemonset["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!(
            (&rolling["maxSurge"], &rolling["maxUnavailable"]),
            (&json!(1), &json!(0)),
            "this test plays a surging rollout"
        );
        let name = format!("{}-agent-{}", self.sandbox.name, &pod_uid[..8]);
        let run = podman_run(rendered, daemonset, &self.node, pod_uid, &name);
        let new = self.podman.start(&run.args);
        let old = std::mem::replace(&mut self.agent, new);
        self.agent_run = run;
        // Both answer the node's probe address until the old one has handed over.
        assert!(
            wait_until(Duration::from_secs(30), || self
                .podman
                .logs(&old)
                .contains("handed over")),
            "the old agent did not hand over:\n{}\nthe new one:\n{}",
            self.podman.logs(&old),
            self.podman.logs(&self.agent)
        );
        self.wait_ready();
        // The controller deletes the old pod once the new one is available.
        let grace = daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        let deleting = Instant::now();
        self.podman
            .run(&["stop", "--time", &grace.to_string(), &old]);
        let stopped_in = deleting.elapsed();
        let exit = self
            .podman
            .run(&["inspect", "--format", "{{.State.ExitCode}}", &old]);
        assert_eq!(
            exit,
            "0",
            "the old agent's exit:\n{}",
            self.podman.logs(&old)
        );
        assert!(
            stopped_in < Duration::from_secs(5),
            "the old agent had drained before its pod was deleted, yet took {stopped_in:?}"
        );
        self.retired.push(old);
    }

    /// What every agent this node ran logged, but its audit lines, oldest first.
    fn agent_logs(&self) -> String {
        let mut out = String::new();
        for agent in self.retired.iter().chain([&self.agent]) {
            out.push_str(&format!("--- {agent}\n"));
            for line in self.podman.logs(agent).lines() {
                if !line.contains("imds_agent::audit") {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Audit lines of every agent this node ran, oldest first.
    fn audit(&self) -> Vec<Value> {
        // The agent writes a worker's lines when it goes idle, just after the answers left,
        // and conmon copies them into the log podman reads.
        std::thread::sleep(Duration::from_millis(100));
        self.retired
            .iter()
            .chain([&self.agent])
            .flat_map(|agent| {
                self.podman
                    .logs(agent)
                    .lines()
                    .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                    .filter(|v| v["target"] == "imds_agent::audit")
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn upstream_requests(&self) -> usize {
        std::fs::read_to_string(&self.request_log)
            .map(|log| log.lines().count())
            .unwrap_or(0)
    }
}

#[test]
fn the_daemonset_image_enforces_pods_that_a_real_runtime_runs() {
    let Some(mut cluster) = Cluster::start("containers") else {
        return;
    };
    // Pods that run before the agent does, as on a cluster it is installed into.
    let api_pod = cluster.add_pod("payments", "api-0", API_POD_UID, "api", "api");
    let web_pod = cluster.add_pod("frontend", "web-0", WEB_POD_UID, "web", "default");
    cluster.start_agent();
    let podman = &cluster.podman;

    // Attached where the DaemonSet says: the node's cgroup root (the hostPath volume's), and
    // the attribution program on the agent's own container's cgroup, which the agent found
    // through a mount of the node's tree.
    let Some(at_root) = attach_types(&cluster.sandbox.cgroup_root) else {
        return;
    };
    assert_eq!(at_root, ENFORCED_ATTACH_TYPES, "at the node's cgroup root");
    let agent_cgroup = cluster.sandbox.cgroup_root.join(format!(
        "kubepods/burstable/pod{AGENT_POD_UID}/libpod-{}",
        cluster.agent
    ));
    assert_eq!(
        attach_types(&agent_cgroup).unwrap_or_default(),
        ["cgroup_inet4_getpeername"],
        "at the agent's container's cgroup {}",
        agent_cgroup.display()
    );

    // The pod the namespace's ImdsPolicy selects: botocore, with its defaults, gets the
    // node role's credentials.
    let fetched = podman.exec(&api_pod, &["python3", "-c", BOTOCORE_FETCH]);
    let stdout = String::from_utf8_lossy(&fetched.stdout);
    assert!(
        fetched.status.success(),
        "botocore in {api_pod}: {}\n{}",
        String::from_utf8_lossy(&fetched.stderr),
        podman.logs(&cluster.agent)
    );
    let credentials: Value = serde_json::from_str(&stdout).expect("botocore printed JSON");
    assert_eq!(credentials["role"], "demo-node-role", "{credentials}");
    assert!(
        credentials["access_key"]
            .as_str()
            .is_some_and(|k| k.starts_with(ACCESS_KEY_PREFIX)),
        "{credentials}"
    );

    // Another pod: the cluster default only (instance information).
    let denied = podman.curl(&web_pod, &[CREDENTIALS_URL]);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(denied.body.contains("pod-default"), "{denied:?}");
    let allowed = podman.curl(&web_pod, &[INSTANCE_ID_URL]);
    assert_eq!((allowed.status, allowed.body.as_str()), (200, INSTANCE_ID));

    // Containers on the host network: a node daemon's (below system.slice) is governed by
    // the node policy, which lets it read credentials; one elsewhere is no policy's and gets
    // the unmatched decision.
    let daemon = cluster.add_host_container("daemon", "system.slice/node-daemon.service");
    let served = podman.curl(&daemon, &[CREDENTIALS_URL]);
    assert_eq!(served.status, 200, "{served:?}");
    let stray = cluster.add_host_container("stray", "stray");
    let unmatched = podman.curl(&stray, &[CREDENTIALS_URL]);
    assert_eq!(unmatched.status, 403, "{unmatched:?}");

    // What the audit says of each: the pod, its container by name, the policy.
    let audit = cluster.audit();
    let line = |pod: &str, path: &str| {
        audit
            .iter()
            .find(|a| a["pod"] == pod && a["path"].as_str().is_some_and(|p| p.ends_with(path)))
            .unwrap_or_else(|| panic!("no audit line for {pod} {path}: {audit:#?}"))
    };
    let api_line = line("api-0", "demo-node-role");
    assert_eq!(
        (
            &api_line["namespace"],
            &api_line["container"],
            &api_line["decision"],
            &api_line["policy"]
        ),
        (
            &json!("payments"),
            &json!("app"),
            &json!("allow"),
            &json!("imdspolicies/payments/api-credentials")
        ),
        "{api_line}"
    );
    assert!(
        api_line["cgroup"].as_str().is_some_and(
            |c| c.starts_with(&format!("/kubepods/besteffort/pod{API_POD_UID}/libpod-"))
        ),
        "{api_line}"
    );
    // What a SIEM correlates on: the node, the pod's uid and service account, the runtime's
    // container id, the SDK that asked, a request id.
    let api_container_id = podman.run(&["inspect", "--format", "{{.Id}}", &api_pod]);
    assert_eq!(
        (
            &api_line["node"],
            &api_line["pod_uid"],
            &api_line["service_account"],
            &api_line["container_id"]
        ),
        (
            &json!(NODE),
            &json!(API_POD_UID),
            &json!("api"),
            &json!(api_container_id)
        ),
        "{api_line}"
    );
    assert!(
        api_line["user_agent"]
            .as_str()
            .is_some_and(|ua| ua.starts_with("python-urllib3/")),
        "botocore's metadata fetcher asks through urllib3: {api_line}"
    );
    // A denial's answer carries its request id, which finds its audit line.
    let headers = podman.exec(
        &web_pod,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%header{imds-agent-request-id}",
            CREDENTIALS_URL,
        ],
    );
    let request_id = String::from_utf8_lossy(&headers.stdout).trim().to_owned();
    assert!(!request_id.is_empty(), "no request id on the denial");
    let denied_line = cluster
        .audit()
        .into_iter()
        .find(|a| a["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no audit line with request id {request_id}"));
    assert_eq!(
        (&denied_line["pod"], &denied_line["status"]),
        (&json!("web-0"), &json!(403))
    );
    assert!(
        denied_line["user_agent"]
            .as_str()
            .is_some_and(|ua| ua.starts_with("curl/")),
        "{denied_line}"
    );
    let web_line = line("web-0", "demo-node-role");
    assert_eq!(
        (&web_line["decision"], &web_line["policy"]),
        (&json!("deny"), &json!("clusterimdspolicies/pod-default")),
        "{web_line}"
    );
    let daemon_line = audit
        .iter()
        .find(|a| a["unit"] == "node-daemon.service")
        .unwrap_or_else(|| panic!("no audit line for the node daemon: {audit:#?}"));
    assert_eq!(
        (&daemon_line["decision"], &daemon_line["policy"]),
        (&json!("allow"), &json!("node-daemons")),
        "{daemon_line}"
    );

    // The agent's container killed: connects fail closed, and nothing reaches the metadata
    // service undecided.
    podman.run(&["kill", "--signal", "KILL", &cluster.agent]);
    assert!(
        wait_until(Duration::from_secs(10), || !podman
            .is_running(&cluster.agent)),
        "the agent's container did not stop"
    );
    let before = cluster.upstream_requests();
    for container in [&web_pod, &api_pod, &daemon] {
        let refused = podman.curl(container, &[INSTANCE_ID_URL]);
        assert_eq!(
            (refused.status, refused.exit),
            (0, 7),
            "{container} while no agent runs: {refused:?}"
        );
    }
    assert_eq!(
        cluster.upstream_requests(),
        before,
        "a request reached the metadata service while no agent ran"
    );

    // Restarted (as kubelet restarts it): it adopts the pinned programs and serves again.
    podman.run(&["start", &cluster.agent]);
    cluster.wait_ready();
    let again = podman.curl(&web_pod, &[INSTANCE_ID_URL]);
    assert_eq!((again.status, again.body.as_str()), (200, INSTANCE_ID));
    let denied_again = podman.curl(&web_pod, &[CREDENTIALS_URL]);
    assert_eq!(denied_again.status, 403, "{denied_again:?}");
}

/// SDK-style clients running in pods while the agent is rolled: a keep-alive curl loop (one
/// token for all its requests) and botocore's credential fetcher with its defaults.
struct PodClients {
    curl: String,
    botocore: String,
}

impl PodClients {
    fn start(podman: &Podman, curl: &str, botocore: &str) -> Self {
        // Paced below the agent's default rate per caller (50/s, bursts of 100): a client
        // that exceeds it gets 429, which is not what this test counts.
        let env = [
            "--env",
            "PAUSE=1.5",
            "--env",
            "STOP=/tmp/stop",
            "--env",
            "OUT=/tmp/curl.out",
            "--env",
            "ERR=/tmp/curl.err",
        ];
        let run = |container: &str, script: String| {
            let mut args = vec!["exec", "--detach"];
            args.extend(env);
            args.extend([container, "sh", "-c", &script]);
            podman.run(&args);
        };
        run(
            curl,
            format!("{}\ntouch /tmp/done", crate::upgrades::CURL_LOOP),
        );
        let python = crate::upgrades::BOTOCORE_LOOP.replace('\'', "'\\''");
        run(
            botocore,
            format!(
                "PAUSE=0.2 python3 -c '{python}' > /tmp/boto.out 2> /tmp/boto.err; touch /tmp/done"
            ),
        );
        Self {
            curl: curl.to_owned(),
            botocore: botocore.to_owned(),
        }
    }

    fn file(podman: &Podman, container: &str, path: &str) -> String {
        let output = podman.exec(container, &["cat", path]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn curl_statuses(&self, podman: &Podman) -> Vec<String> {
        Self::file(podman, &self.curl, "/tmp/curl.out")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Stops both loops and waits for them: (curl statuses, curl's complaints, botocore's
    /// "ok failed" line, botocore's complaints).
    fn stop(self, podman: &Podman) -> (Vec<String>, String, String, String) {
        for container in [&self.curl, &self.botocore] {
            podman.run(&["exec", container, "touch", "/tmp/stop"]);
        }
        for container in [&self.curl, &self.botocore] {
            assert!(
                wait_until(Duration::from_secs(30), || podman
                    .exec(container, &["test", "-e", "/tmp/done"])
                    .status
                    .success()),
                "the client loop in {container} did not end"
            );
        }
        (
            self.curl_statuses(podman),
            Self::file(podman, &self.curl, "/tmp/curl.err"),
            Self::file(podman, &self.botocore, "/tmp/boto.out"),
            Self::file(podman, &self.botocore, "/tmp/boto.err"),
        )
    }
}

/// The agent's process in its container, as the node sees it: /proc/<pid>/status.
fn agent_status(podman: &Podman, container: &str) -> String {
    let pid = podman.run(&["inspect", "--format", "{{.State.Pid}}", container]);
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status")
}

#[test]
fn a_daemonset_rollout_hands_over_without_a_failed_request() {
    let Some(mut cluster) = Cluster::start("rollout") else {
        return;
    };
    let api_pod = cluster.add_pod("payments", "api-0", API_POD_UID, "api", "api");
    let web_pod = cluster.add_pod("frontend", "web-0", WEB_POD_UID, "web", "default");
    cluster.start_agent();
    let clients = PodClients::start(&cluster.podman, &web_pod, &api_pod);
    assert!(
        wait_until(Duration::from_secs(30), || clients
            .curl_statuses(&cluster.podman)
            .len()
            >= 100),
        "the curl loop does not get going: {}",
        PodClients::file(&cluster.podman, &web_pod, "/tmp/curl.err")
    );

    // As many rollouts as the host's upgrade test makes, alternating between the seccomp
    // component's pod template (the agent's own system call allowlist, no CAP_SYS_ADMIN) and
    // the default one; the last is the component's.
    let overlay = Overlay::with(&["seccomp"]);
    let confined = Rendered::kustomize(&overlay.0);
    let default = Rendered::kustomize(&repo().join("deploy"));
    let revisions: Vec<&Rendered> = (0..crate::upgrades::UPGRADES)
        .map(|n| if n % 2 == 0 { &default } else { &confined })
        .collect();
    for (n, rendered) in revisions.iter().enumerate() {
        let pod_uid = format!("{n:02x}{}", &AGENT_POD_UID[2..]);
        cluster.rollout(rendered, &pod_uid);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The last agent runs under the profile, without CAP_SYS_ADMIN (bit 21), and serves.
    let status = agent_status(&cluster.podman, &cluster.agent);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("Seccomp:"), "2", "a seccomp filter:\n{status}");
    let effective = u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff");
    assert_eq!(effective & (1 << 21), 0, "CAP_SYS_ADMIN is effective");
    let before = clients.curl_statuses(&cluster.podman).len();
    assert!(
        wait_until(Duration::from_secs(10), || clients
            .curl_statuses(&cluster.podman)
            .len()
            > before + 50),
        "the confined agent does not serve"
    );

    let (statuses, curl_errors, botocore, botocore_errors) = clients.stop(&cluster.podman);
    let refusals: Vec<Value> = cluster
        .audit()
        .into_iter()
        .filter(|l| l["status"] != 200)
        .take(3)
        .collect();
    let failed: Vec<&String> = statuses.iter().filter(|s| *s != "200").collect();
    assert!(
        failed.is_empty() && curl_errors.is_empty(),
        "{} of {} curl requests failed across {} rollouts: {:?}; {curl_errors}\n{refusals:#?}\n{}",
        failed.len(),
        statuses.len(),
        revisions.len(),
        &failed[..failed.len().min(10)],
        cluster.agent_logs()
    );
    let (ok, failures) = botocore
        .trim()
        .split_once(' ')
        .and_then(|(ok, failed)| Some((ok.parse::<u64>().ok()?, failed.parse::<u64>().ok()?)))
        .unwrap_or((0, 1));
    assert!(
        ok > 5 && failures == 0,
        "botocore: {ok} fetched, {failures} failed: {botocore_errors}"
    );

    // Every metadata read the service saw was decided by one of the agents, and no token
    // was unknown to the agent that saw it.
    let audit = cluster.audit();
    let served = std::fs::read_to_string(&cluster.request_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("GET /latest/meta-data/"))
        .count();
    let forwarded = audit
        .iter()
        .filter(|l| l["method"] == "GET" && l["upstream_status"].as_u64().is_some_and(|s| s > 0))
        .count();
    assert_eq!(
        served, forwarded,
        "reads served without an agent's decision"
    );
    assert!(
        audit
            .iter()
            .all(|l| l["rule"] != "token-not-issued-to-caller"),
        "a token bound by one agent was unknown to the next"
    );
}
