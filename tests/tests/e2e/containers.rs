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

use crate::support::{repo, wait_until};
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
        let subnet = (std::process::id() % 200) as u8 + 20;
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
            ]),
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

    fn audit(&self) -> Vec<Value> {
        self.podman
            .logs(&self.agent)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|v| v["target"] == "imds_agent::audit")
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
