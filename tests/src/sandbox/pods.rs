//! Pod network namespaces inside the sandbox, reaching the node over veth pairs or a bridge.

use super::{curl::run_curl, *};

impl Sandbox {
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
