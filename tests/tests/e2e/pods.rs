//! Pods in network namespaces of their own, as on Kubernetes: a "pod" namespace joined to the
//! sandbox (the node) by a veth pair, with the node as its gateway. The pod's loopback is its
//! own, so its diverted connects must go to a node address where the agent listens, while
//! callers in the node's namespace (hostNetwork pods, host daemons) stay on loopback.

use imds_tests::{
    fake_imds::INSTANCE_ID,
    sandbox::{Agent, ENFORCED_ATTACH_TYPES, PodNetwork, Process, Sandbox, attach_types},
};

const INSTANCE_ID_URL: &str = "http://169.254.169.254/latest/meta-data/instance-id";
const CREDENTIALS_URL: &str =
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/demo-node-role";

const POD_POLICY: &str = r#"
name: pods
callers:
  cgroups: ["/pod-a/**"]
default: deny
rules:
  - name: instance-info
    action: allow
    methods: [GET]
    paths: [/latest/meta-data/instance-id]
"#;

struct Env {
    pod: PodNetwork,
    _imds: Process,
    agent: Agent,
    sandbox: Sandbox,
}

fn start(label: &str, pod_address: Option<&str>) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    let pod = sandbox.add_pod_network();
    // Also a server on the node's address that is not the metadata service.
    let imds = sandbox.start_fake_imds_on(false, &[&format!("{}:8080", pod.node_ip)]);
    let policies = sandbox.write_policies(&[("pods.yaml", POD_POLICY)]);
    let address = pod_address.unwrap_or(&pod.node_ip).to_owned();
    let agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&policies],
        &["--pod-address", &address],
    );
    Some(Env {
        pod,
        _imds: imds,
        agent,
        sandbox,
    })
}

/// The fake metadata service and an agent serving pods on `node_ip` with [`POD_POLICY`].
fn serve_pods(sandbox: &Sandbox, node_ip: &str) -> (Process, Agent) {
    let imds = sandbox.start_fake_imds(false);
    let policies = sandbox.write_policies(&[("pods.yaml", POD_POLICY)]);
    let agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&policies],
        &["--pod-address", node_ip],
    );
    (imds, agent)
}

/// A workload of the pod in cgroup /pod-a gets what [`POD_POLICY`] grants and is denied the
/// rest, and the agent audits both requests under the pod's cgroup.
fn assert_pod_a_served(sandbox: &Sandbox, pod: &PodNetwork, agent: &Agent) {
    let allowed = sandbox.curl_in_pod(pod, "enforced/pod-a", &[INSTANCE_ID_URL]);
    assert_eq!(
        (allowed.status, allowed.body.as_str()),
        (200, INSTANCE_ID),
        "{allowed:?}\n{}",
        agent.log()
    );
    let denied = sandbox.curl_in_pod(pod, "enforced/pod-a", &[CREDENTIALS_URL]);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(denied.body.contains("pods"), "{denied:?}");
    let audit = agent.audit();
    let last: Vec<_> = audit
        .iter()
        .rev()
        .take(2)
        .map(|l| (l["cgroup"].as_str(), l["decision"].as_str()))
        .collect();
    assert_eq!(
        last,
        [
            (Some("/pod-a"), Some("deny")),
            (Some("/pod-a"), Some("allow"))
        ],
        "{audit:#?}"
    );
}

#[test]
fn a_pod_in_its_own_network_namespace_is_diverted_to_the_node_address() {
    let Some(env) = start("podnet", None) else {
        return;
    };
    let (sandbox, pod) = (&env.sandbox, &env.pod);

    // Control: a pod cgroup outside the enforced tree reaches the metadata service through the
    // node, as every pod would without enforcement.
    let unenforced = sandbox.curl_in_pod(pod, "outside", &[INSTANCE_ID_URL]);
    assert_eq!(
        (unenforced.status, unenforced.body.as_str()),
        (200, INSTANCE_ID),
        "{unenforced:?}"
    );

    // Both reach the agent (a rewrite to loopback would find no listener in the pod).
    assert_pod_a_served(sandbox, pod, &env.agent);
    assert_eq!(env.agent.audit().len(), 2);

    // Found in the pod's namespace by the agent's getpeername program: serving pods adds no
    // program at the TCP events of every connection in the enforced cgroups.
    if let Some(enforced) = attach_types(&sandbox.cgroup("enforced")) {
        assert_eq!(enforced, ENFORCED_ATTACH_TYPES);
    }

    // The node's namespace (a hostNetwork pod in the same cgroup) still goes to loopback.
    let host = sandbox.curl("enforced/pod-a", None, &[INSTANCE_ID_URL]);
    assert_eq!(
        (host.status, host.body.as_str()),
        (200, INSTANCE_ID),
        "{host:?}"
    );
    let host_denied = sandbox.curl("enforced/pod-a", None, &[CREDENTIALS_URL]);
    assert_eq!(host_denied.status, 403, "{host_denied:?}");

    // The node listener serves only what the kernel diverted: a pod going there directly
    // (to dodge the policy, or from another machine) is refused.
    let direct = format!(
        "http://{}:954/latest/meta-data/iam/security-credentials/demo-node-role",
        pod.node_ip
    );
    for cgroup in ["enforced/pod-a", "outside"] {
        let straight = sandbox.curl_in_pod(pod, cgroup, &[&direct]);
        assert_eq!(straight.status, 403, "{cgroup}: {straight:?}");
        assert!(
            straight.body.contains("not diverted by the kernel"),
            "{straight:?}"
        );
    }
}

#[test]
fn a_pod_address_given_to_a_new_pod_is_served_in_the_new_pods_namespace() {
    let Some(sandbox) = Sandbox::new("podnet-reuse") else {
        return;
    };
    let first = sandbox.add_pod_network();
    let (_imds, agent) = serve_pods(&sandbox, &first.node_ip);
    assert_pod_a_served(&sandbox, &first, &agent);
    let first_id = sandbox.pod_netns_id(&first.node_if);

    // The agent now knows the address by the first pod's namespace id. The pod goes, another
    // pod's namespace takes that id, and a new pod gets the first one's addresses.
    let slot = sandbox.remove_pod_network(first);
    let other = sandbox.add_pod_network();
    let other_id = sandbox.pod_netns_id(&other.node_if);
    let second = sandbox.add_pod_network_in(slot);
    let second_id = sandbox.pod_netns_id(&second.node_if);
    assert_eq!(
        (other_id, second_id == first_id),
        (first_id, false),
        "premise: the freed id went to the other pod"
    );
    assert_pod_a_served(&sandbox, &second, &agent);
}

#[test]
fn a_pod_on_a_bridge_is_found_behind_its_bridge_port() {
    let Some(sandbox) = Sandbox::new("podnet-bridge") else {
        return;
    };
    let pod = sandbox.add_bridged_pod_network();
    let (_imds, agent) = serve_pods(&sandbox, &pod.node_ip);
    // The route to the pod leaves by the bridge, which has no other end: the pod's namespace
    // is behind the bridge port its address was learned on.
    assert_pod_a_served(&sandbox, &pod, &agent);
}

#[test]
fn without_a_pod_address_connects_from_pods_are_refused_in_the_kernel() {
    let Some(env) = start("podnet-none", Some("none")) else {
        return;
    };
    let (sandbox, pod) = (&env.sandbox, &env.pod);
    // No address where a pod could reach the agent: fail closed at connect(), counted as
    // refused (not diverted into the pod's own loopback).
    let before = sandbox.kernel_counters();
    let refused = sandbox.curl_in_pod(pod, "enforced/pod-a", &[INSTANCE_ID_URL]);
    assert_eq!(refused.status, 0, "{refused:?}");
    assert_eq!(refused.exit, 7, "connect() fails: {refused:?}");
    let after = sandbox.kernel_counters();
    assert_eq!(after["diverted"], before["diverted"], "{after}");
    assert_eq!(
        after["refused"].as_u64(),
        before["refused"].as_u64().map(|n| n + 1),
        "{after}"
    );
    assert!(env.agent.audit().is_empty(), "{:?}", env.agent.audit());
    // Callers in the node's namespace are served as before.
    let host = sandbox.curl("enforced/pod-a", None, &[INSTANCE_ID_URL]);
    assert_eq!(
        (host.status, host.body.as_str()),
        (200, INSTANCE_ID),
        "{host:?}"
    );
    // Other destinations from the pod are untouched: a server on the node's address.
    let other = sandbox.curl_in_pod(
        pod,
        "enforced/pod-a",
        &[&format!(
            "http://{}:8080/latest/meta-data/instance-id",
            pod.node_ip
        )],
    );
    assert_eq!(
        (other.status, other.body.as_str()),
        (200, INSTANCE_ID),
        "{other:?}"
    );
}
