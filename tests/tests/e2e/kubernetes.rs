//! The agent on Kubernetes, against a fake API server that speaks real list and watch JSON:
//! pods of this node and policy resources arrive by watch, decisions follow them, and the
//! agent reports each policy's status.

use std::time::Duration;

use imds_tests::{
    fake_imds::INSTANCE_ID,
    fake_kube::{self, FakeApiServer, Kind, policy},
    sandbox::{Agent, Curl, PodNetwork, Process, Sandbox},
};

use crate::support::wait_until;
use serde_json::{Value, json};

const NODE: &str = "node-a";
const METRICS: &str = "127.0.0.1:9754";
const INSTANCE_ID_URL: &str = "http://169.254.169.254/latest/meta-data/instance-id";
const CREDENTIALS_URL: &str =
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/demo-node-role";

const API_UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
const API_CONTAINER: &str = "aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233";
const WEB_UID: &str = "6fa459ea-ee8a-3ca4-894e-db77e160355e";
const WEB_CONTAINER: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A pod with one container, labelled `app`.
struct TestPod {
    namespace: &'static str,
    name: &'static str,
    uid: &'static str,
    container: &'static str,
    app: &'static str,
}

impl TestPod {
    /// The cgroup kubelet's systemd driver creates for the (burstable) pod's container.
    fn cgroup(&self) -> String {
        let uid = self.uid.replace('-', "_");
        format!(
            "enforced/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{}.scope",
            self.container
        )
    }
}

const API_0: TestPod = TestPod {
    namespace: "payments",
    name: "api-0",
    uid: API_UID,
    container: API_CONTAINER,
    app: "api",
};
const API_1: TestPod = TestPod {
    namespace: "payments",
    name: "api-1",
    uid: WEB_UID,
    container: WEB_CONTAINER,
    app: "api",
};
const WEB_0: TestPod = TestPod {
    namespace: "frontend",
    name: "web-0",
    uid: WEB_UID,
    container: WEB_CONTAINER,
    app: "web",
};

/// The payments namespace's policy: its `app: api` pods may read credentials.
fn payments_spec(allow_credentials: bool) -> Value {
    let mut rules = vec![json!({"name": "instance-info", "action": "allow",
                                "methods": ["GET"], "groups": ["instance-info"]})];
    if allow_credentials {
        rules.push(
            json!({"name": "credentials", "action": "allow", "methods": ["GET"],
                          "groups": ["credentials"]}),
        );
    }
    json!({"callers": {"podLabels": {"app": "api"}}, "default": "deny", "rules": rules})
}

/// The cluster default for every pod: instance information only.
fn baseline_spec() -> Value {
    json!({"callers": {"cgroups": ["/kubepods.slice/**"]}, "default": "deny",
           "rules": [{"name": "instance-info", "action": "allow", "methods": ["GET"],
                      "groups": ["instance-info"]}]})
}

/// The agent's flags on this node: Kubernetes, its metrics, and the pods' address.
fn agent_args(pod_network: &PodNetwork) -> Vec<&str> {
    vec![
        "--kubernetes",
        "--node-name",
        NODE,
        "--metrics-listen",
        METRICS,
        "--pod-address",
        &pod_network.node_ip,
    ]
}

struct Env {
    agent: Agent,
    /// A pod network namespace on this node, as a CNI plugin would give each pod.
    pod_network: PodNetwork,
    api: FakeApiServer,
    _imds: Process,
    sandbox: Sandbox,
}

impl Env {
    fn start(label: &str, extra: &[&str]) -> Option<Self> {
        Self::start_with(label, extra, Vec::new())
    }

    /// As [`Self::start`], with further objects in the API before the agent starts.
    fn start_with(label: &str, extra: &[&str], objects: Vec<(Kind, Value)>) -> Option<Self> {
        let sandbox = Sandbox::new(label)?;
        let imds = sandbox.start_fake_imds(false);
        let api = FakeApiServer::start(sandbox.bind_tcp("127.0.0.1:0"));
        let (kind, object) = policy(Some("payments"), "api", payments_spec(true));
        api.apply(kind, object);
        let (kind, object) = policy(None, "baseline", baseline_spec());
        api.apply(kind, object);
        for (kind, object) in objects {
            api.apply(kind, object);
        }
        let kubeconfig = api.kubeconfig(&sandbox.work_dir);
        let files = sandbox.write_policies(&[]);
        let pod_network = sandbox.add_pod_network();
        let mut args = agent_args(&pod_network);
        args.extend_from_slice(extra);
        let agent = sandbox.launch_agent_with_env(
            "enforced",
            "agent",
            &[&files],
            &args,
            &[("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))],
        );
        let mut env = Self {
            agent,
            pod_network,
            api,
            _imds: imds,
            sandbox,
        };
        assert!(env.agent.is_running(), "agent exited:\n{}", env.agent.log());
        let ready = wait_until(Duration::from_secs(10), || {
            env.get("outside", &format!("http://{METRICS}/readyz"))
                .status
                == 200
        });
        assert!(ready, "never ready:\n{}", env.agent.log());
        Some(env)
    }

    fn get(&self, cgroup: &str, url: &str) -> Curl {
        self.sandbox.curl(cgroup, None, &[url])
    }

    /// Creates the pod in the API on `node`; its container runs in [`TestPod::cgroup`].
    fn add_pod(&self, pod: &TestPod, node: &str) {
        self.api.apply(
            Kind::Pod,
            fake_kube::pod(
                pod.namespace,
                pod.name,
                pod.uid,
                node,
                json!({"app": pod.app}),
                pod.container,
            ),
        );
    }

    fn metrics(&self) -> String {
        self.get("outside", &format!("http://{METRICS}/metrics"))
            .body
    }
}

fn accepted_condition(api: &FakeApiServer, namespace: &str, name: &str) -> Option<Value> {
    let object = api.get(Kind::ImdsPolicy, namespace, name)?;
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

#[test]
fn pods_and_policies_arrive_by_watch_and_updates_flip_decisions() {
    let Some(env) = Env::start("kube-watch", &[]) else {
        return;
    };
    // The pod watch asks for this node's pods only.
    assert!(
        env.api
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("spec.nodeName%3Dnode-a")),
        "{:?}",
        env.api.requests()
    );
    let condition = accepted_condition(&env.api, "payments", "api").expect("status written");
    assert_eq!(
        (&condition["status"], &condition["observedGeneration"]),
        (&json!("True"), &json!(1)),
        "{condition}"
    );

    // Pods created after the agent started, one per namespace.
    env.add_pod(&API_0, NODE);
    env.add_pod(&WEB_0, NODE);
    let (api_pod, web_pod) = (API_0.cgroup(), WEB_0.cgroup());
    let creds = env.get(&api_pod, CREDENTIALS_URL);
    assert_eq!(creds.status, 200, "{creds:?}\n{}", env.agent.log());
    // The same from the pod's own network namespace, as on a real node.
    let from_pod = env
        .sandbox
        .curl_in_pod(&env.pod_network, &api_pod, &[CREDENTIALS_URL]);
    assert_eq!(from_pod.status, 200, "{from_pod:?}");
    let web_creds = env.get(&web_pod, CREDENTIALS_URL);
    assert_eq!(web_creds.status, 403, "{web_creds:?}");
    assert!(
        web_creds.body.contains("clusterimdspolicies/baseline"),
        "the denial names the cluster policy: {web_creds:?}"
    );
    let web_info = env.get(&web_pod, INSTANCE_ID_URL);
    assert_eq!(
        (web_info.status, web_info.body.as_str()),
        (200, INSTANCE_ID)
    );
    let line = env
        .agent
        .audit()
        .into_iter()
        .find(|l| l["status"] == 200)
        .expect("audit");
    assert_eq!(line["namespace"], "payments", "{line}");
    assert_eq!(line["policy"], "imdspolicies/payments/api", "{line}");

    // An update through the watch flips the decision.
    let (kind, object) = policy(Some("payments"), "api", payments_spec(false));
    env.api.apply(kind, object);
    assert!(
        wait_until(Duration::from_secs(5), || env
            .get(&api_pod, CREDENTIALS_URL)
            .status
            == 403),
        "the update never took effect:\n{}",
        env.agent.log()
    );
    assert!(wait_until(Duration::from_secs(5), || {
        accepted_condition(&env.api, "payments", "api")
            .is_some_and(|c| c["observedGeneration"] == 2 && c["status"] == "True")
    }));

    // A broken update is rejected in the status, and the version in force stays.
    let mut broken = payments_spec(true);
    broken["rules"][1]["methods"] = json!(["FETCH"]);
    let (kind, object) = policy(Some("payments"), "api", broken);
    env.api.apply(kind, object);
    assert!(
        wait_until(Duration::from_secs(5), || {
            accepted_condition(&env.api, "payments", "api")
                .is_some_and(|c| c["observedGeneration"] == 3 && c["status"] == "False")
        }),
        "{:?}",
        env.api.get(Kind::ImdsPolicy, "payments", "api")
    );
    let condition = accepted_condition(&env.api, "payments", "api").expect("condition");
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("rules[1].methods[0]") && message.contains("FETCH"),
        "says what and where: {message}"
    );
    assert!(
        message.contains("previously accepted version stays in force"),
        "{message}"
    );
    assert_eq!(env.get(&api_pod, CREDENTIALS_URL).status, 403);
    assert_eq!(env.get(&api_pod, INSTANCE_ID_URL).status, 200);

    // A namespace's policy cannot reach into another namespace.
    let mut grab = payments_spec(true);
    grab["callers"] = json!({"namespaces": ["frontend"]});
    let (kind, object) = policy(Some("payments"), "grab", grab);
    env.api.apply(kind, object);
    assert!(wait_until(Duration::from_secs(5), || {
        accepted_condition(&env.api, "payments", "grab").is_some_and(|c| c["status"] == "False")
    }));
    assert_eq!(env.get(&web_pod, CREDENTIALS_URL).status, 403);
}

/// A namespace admin's ImdsPolicy with a value the agent cannot read (a uid past u32; the
/// schema of older releases admitted it) must stall nothing: a new agent becomes ready, the
/// object is reported, every other policy applies, and a fix is picked up.
#[test]
fn a_policy_the_agent_cannot_read_is_reported_and_stalls_nothing() {
    let mut unreadable = payments_spec(true);
    unreadable["callers"]["uids"] = json!([4294967296u64]);
    let bad = policy(Some("tenant"), "huge-uid", unreadable);
    // Env::start_with fails the test unless the agent turns ready.
    let Some(env) = Env::start_with("kube-unreadable", &[], vec![bad]) else {
        return;
    };
    assert!(
        wait_until(Duration::from_secs(5), || {
            accepted_condition(&env.api, "tenant", "huge-uid")
                .is_some_and(|c| c["status"] == "False")
        }),
        "the unreadable object is never reported:\n{}",
        env.agent.log()
    );
    let condition = accepted_condition(&env.api, "tenant", "huge-uid").expect("condition");
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("cannot be read") && message.contains("4294967296"),
        "says what: {message}"
    );
    // The other policies apply: the namespace policy and the cluster default.
    env.add_pod(&API_0, NODE);
    env.add_pod(&WEB_0, NODE);
    assert_eq!(env.get(&API_0.cgroup(), CREDENTIALS_URL).status, 200);
    assert_eq!(env.get(&WEB_0.cgroup(), CREDENTIALS_URL).status, 403);
    assert!(
        env.metrics()
            .contains("imds_agent_policy_resources{state=\"invalid\"} 1"),
        "{}",
        env.metrics()
    );

    // Fixed by its owner: accepted.
    let (kind, object) = policy(Some("tenant"), "huge-uid", payments_spec(true));
    env.api.apply(kind, object);
    assert!(
        wait_until(Duration::from_secs(5), || {
            accepted_condition(&env.api, "tenant", "huge-uid")
                .is_some_and(|c| c["status"] == "True")
        }),
        "{:?}",
        env.api.get(Kind::ImdsPolicy, "tenant", "huge-uid")
    );
}

/// A pod whose metadata request is denied gets an Event saying why (`kubectl describe pod`),
/// once per policy and rule per interval; a pod that is served gets none.
#[test]
fn a_denied_pod_gets_an_event_naming_the_policy_and_rule() {
    let Some(env) = Env::start("kube-events", &[]) else {
        return;
    };
    env.add_pod(&API_0, NODE);
    env.add_pod(&WEB_0, NODE);
    assert_eq!(env.get(&API_0.cgroup(), CREDENTIALS_URL).status, 200);
    for _ in 0..3 {
        assert_eq!(env.get(&WEB_0.cgroup(), CREDENTIALS_URL).status, 403);
    }
    assert!(
        wait_until(Duration::from_secs(5), || !env.api.events().is_empty()),
        "no event:\n{}",
        env.agent.log()
    );
    // Time for any further (wrong) events to arrive.
    std::thread::sleep(Duration::from_millis(300));
    let events = env.api.events();
    assert_eq!(events.len(), 1, "one per pod, policy and rule: {events:#?}");
    let event = &events[0];
    assert_eq!(
        (
            &event["regarding"]["kind"],
            &event["regarding"]["namespace"],
            &event["regarding"]["name"],
            &event["regarding"]["uid"],
            &event["reason"],
            &event["type"],
        ),
        (
            &json!("Pod"),
            &json!("frontend"),
            &json!("web-0"),
            &json!(WEB_UID),
            &json!("MetadataRequestDenied"),
            &json!("Warning"),
        ),
        "{event}"
    );
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("clusterimdspolicies/baseline")
            && note.contains("/latest/meta-data/iam/security-credentials/demo-node-role"),
        "{note}"
    );
}

#[test]
fn a_deleted_pod_is_forgotten_and_an_api_outage_keeps_enforcement() {
    let Some(mut env) = Env::start("kube-outage", &["--unknown-pod-wait-ms", "300"]) else {
        return;
    };
    env.add_pod(&API_0, NODE);
    env.add_pod(&API_1, NODE);
    let (first, second) = (API_0.cgroup(), API_1.cgroup());
    assert_eq!(env.get(&first, CREDENTIALS_URL).status, 200);
    assert_eq!(env.get(&second, CREDENTIALS_URL).status, 200);

    // Deleted: its cgroup id (still there in the sandbox) no longer carries its metadata.
    env.api.delete(Kind::Pod, "payments", "api-0");
    assert!(
        wait_until(Duration::from_secs(5), || env
            .get(&first, CREDENTIALS_URL)
            .status
            == 403),
        "{}",
        env.agent.log()
    );
    let line = env.agent.audit().into_iter().last().expect("audit");
    assert_eq!(line["namespace"], "", "no pod metadata: {line}");

    // The API server goes away: the last known state stays in force.
    env.api.stop();
    assert!(
        wait_until(Duration::from_secs(10), || {
            env.metrics()
                .lines()
                .any(|l| l.starts_with("imds_agent_watch_errors_total{resource=\"pods\"}"))
        }),
        "{}",
        env.metrics()
    );
    assert_eq!(env.get(&second, CREDENTIALS_URL).status, 200);
    assert_eq!(env.get(&first, CREDENTIALS_URL).status, 403);
    let metrics = env.metrics();
    assert!(
        metrics.contains("imds_agent_watch_synced{resource=\"pods\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("imds_agent_pods_known 1"), "{metrics}");
    assert!(env.agent.is_running());
}

#[test]
fn a_connection_from_a_pod_not_yet_reported_waits_for_it() {
    let Some(env) = Env::start("kube-wait", &[]) else {
        return;
    };
    let cgroup = API_0.cgroup();
    // The container runs (and connects) before the watch has reported its pod.
    let mut early = env.sandbox.spawn_get(&cgroup, CREDENTIALS_URL, &[]);
    std::thread::sleep(Duration::from_millis(300));
    env.add_pod(&API_0, NODE);
    let output = early.wait().expect("curl");
    assert!(output.success());
    let mut body = String::new();
    std::io::Read::read_to_string(early.stdout.as_mut().expect("stdout"), &mut body).unwrap();
    assert!(body.contains("AccessKeyId"), "{body}\n{}", env.agent.log());
    // A pod on another node is not watched: its uid stays unknown here.
    env.add_pod(&API_1, "node-b");
    let other = env.get(&API_1.cgroup(), CREDENTIALS_URL);
    assert_eq!(other.status, 403, "{other:?}");
}

#[test]
fn the_start_up_taint_is_removed_once_enforcing() {
    const TAINT: &str = "imds-agent.dev/agent-not-ready";
    let Some(sandbox) = Sandbox::new("kube-taint") else {
        return;
    };
    let api = FakeApiServer::start(sandbox.bind_tcp("127.0.0.1:0"));
    api.apply(
        Kind::Node,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
        "spec": {"taints": [
            {"key": TAINT, "effect": "NoExecute"},
            {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
        ]}}),
    );
    // Two policies: one another node's agent has reported already, one new.
    for name in ["reported", "new"] {
        let (kind, mut object) = policy(None, name, baseline_spec());
        if name == "reported" {
            object["status"] = json!({"conditions": [{
                "type": "Accepted", "status": "True", "reason": "Valid", "message": "in force",
                "observedGeneration": 1, "lastTransitionTime": "2026-11-23T00:00:00Z"
            }]});
        }
        api.apply(kind, object);
    }
    let kubeconfig = api.kubeconfig(&sandbox.work_dir);
    let files = sandbox.write_policies(&[]);
    let agent = sandbox.launch_agent_with_env(
        "enforced",
        "agent",
        &[&files],
        &[
            "--kubernetes",
            "--node-name",
            NODE,
            "--remove-node-taint",
            TAINT,
        ],
        &[("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))],
    );
    let taints = || api.get(Kind::Node, "", NODE).expect("node")["spec"]["taints"].clone();
    assert!(
        wait_until(Duration::from_secs(10), || taints()
            .as_array()
            .is_some_and(|t| t.len() == 1)),
        "{}\n{}",
        taints(),
        agent.log()
    );
    assert_eq!(taints()[0]["key"], "dedicated", "other taints stay");
    // Only once enforcing: the pod and policy lists came first.
    let requests = api.requests();
    let patched = requests
        .iter()
        .position(|r| r.starts_with("PATCH /api/v1/nodes/"))
        .expect("patch");
    for list in [
        "GET /api/v1/pods?",
        "GET /apis/imds-agent.dev/v1alpha1/imdspolicies?",
    ] {
        let listed = requests
            .iter()
            .position(|r| r.starts_with(list))
            .expect(list);
        assert!(listed < patched, "{requests:?}");
    }
    // A status is written once per change, not once per node.
    assert!(wait_until(Duration::from_secs(5), || {
        api.get(Kind::ClusterImdsPolicy, "", "new")
            .is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
    }));
    let requests = api.requests();
    let status_writes = |name: &str| {
        let prefix =
            format!("PATCH /apis/imds-agent.dev/v1alpha1/clusterimdspolicies/{name}/status");
        requests.iter().filter(|r| r.starts_with(&prefix)).count()
    };
    assert_eq!(
        (status_writes("reported"), status_writes("new")),
        (0, 1),
        "{requests:?}"
    );
}

/// A successor that took the sockets before it had listed the cluster's policies would
/// decide pods' requests by the node policy alone: it serves only once it has listed them,
/// and until then its predecessor does.
#[test]
fn a_successor_serves_only_once_it_has_listed_pods_and_policies() {
    let Some(mut env) = Env::start("k8s-listed-first", &[]) else {
        return;
    };
    env.add_pod(&WEB_0, NODE);
    let read = || env.get(&WEB_0.cgroup(), INSTANCE_ID_URL).status;
    assert!(
        wait_until(Duration::from_secs(5), || read() == 200),
        "{}",
        env.agent.log()
    );
    // The cluster default (which lets the pod read its instance id) is listed 2 s late.
    env.api
        .delay_lists(Kind::ClusterImdsPolicy, Duration::from_secs(2));
    let kubeconfig = env.api.kubeconfig(&env.sandbox.work_dir);
    let files = env.sandbox.write_policies(&[]);
    let successor = env.sandbox.launch_agent_with_env(
        "enforced",
        "agent-next",
        &[&files],
        &agent_args(&env.pod_network),
        &[("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))],
    );
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        statuses.push(read());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{statuses:?}\n{}",
        successor.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || env
            .agent
            .log()
            .contains("handed over")),
        "{}",
        env.agent.log()
    );
    assert_eq!(read(), 200, "{}", successor.log());
    env.agent.process.signal(libc::SIGTERM);
    assert_eq!(env.agent.process.wait(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_handed_over_agent_stays_until_its_pod_is_deleted() {
    let Some(mut env) = Env::start("k8s-handover", &[]) else {
        return;
    };
    // The new pod's agent (a DaemonSet rollout with surge), on the node's state directory.
    let kubeconfig = env.api.kubeconfig(&env.sandbox.work_dir);
    let files = env.sandbox.write_policies(&[]);
    let mut successor = env.sandbox.launch_agent_with_env(
        "enforced",
        "agent-next",
        &[&files],
        &agent_args(&env.pod_network),
        &[("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))],
    );
    assert!(successor.is_running(), "{}", successor.log());
    assert!(
        wait_until(Duration::from_secs(15), || env
            .agent
            .log()
            .contains("handed over")),
        "the running agent did not hand over:\n{}",
        env.agent.log()
    );
    // It does not exit on its own: kubelet would restart its container, which would take
    // the sockets back.
    std::thread::sleep(Duration::from_secs(1));
    assert!(env.agent.is_running(), "{}", env.agent.log());
    // The successor serves the readiness probe on the socket it took over.
    let ready = env.get("outside", &format!("http://{METRICS}/readyz"));
    assert_eq!(ready.status, 200, "{}", successor.log());
    // The old pod deleted (SIGTERM): it exits cleanly.
    env.agent.process.signal(libc::SIGTERM);
    assert_eq!(
        env.agent.process.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        env.agent.log()
    );
    assert!(successor.is_running(), "{}", successor.log());
}
