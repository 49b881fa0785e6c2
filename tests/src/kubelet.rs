//! A node's kubelet and container runtime, played by podman and runc inside a sandbox: the
//! agent runs from its image under the pod spec that `kubectl kustomize deploy/` renders,
//! translated here field by field (capabilities, read-only root, seccomp, host network and
//! PID, volumes, environment, arguments), and workload containers run as pods (a network
//! namespace of their own on a bridge, a kubelet-style cgroup).
//!
//! A field of the pod spec that this translation does not know fails the test: a change in
//! deploy/ must change what the test runs, never be skipped by it.
//!
//! The node is the sandbox: its network namespace is the host network, its parent cgroup is
//! the node's cgroup root (the agent's hostPath `/sys/fs/cgroup`), a directory of its own on
//! the host's bpffs is the node's `/sys/fs/bpf`. Podman runs inside the namespace
//! (`nsenter --net`, which keeps the cgroup and bpf mounts that `ip netns exec` hides), on an
//! `--internal` network, with a containers.conf of the test's own.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::sandbox::{self, Curl, Sandbox};

/// What the test's podman runs with (shared with `cargo xtask image`).
const CONTAINERS_CONF: &str = include_str!("../containers.conf");

/// The label on everything podman creates for a test, naming the sandbox it belongs to.
const LABEL: &str = "dev.imds-agent.test";

/// The workload image `cargo xtask image` builds (Debian with curl and botocore).
pub const WORKLOAD_IMAGE: &str = "localhost/imds-test-workload:latest";

/// The manifests `kubectl kustomize` renders from a kustomization directory.
pub struct Rendered {
    pub objects: Vec<Value>,
}

impl Rendered {
    pub fn kustomize(dir: &Path) -> Self {
        let output = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("run kubectl kustomize");
        assert!(
            output.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("UTF-8 manifests");
        let objects = serde_saphyr::from_multiple::<Value>(&text)
            .unwrap_or_else(|e| panic!("kubectl kustomize's output does not parse: {e}"));
        Self { objects }
    }

    /// The one object of `kind` whose name is `name` (generated names: `name-<hash>`).
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        let matches: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .filter(|o| {
                let object = o["metadata"]["name"].as_str().unwrap_or_default();
                object == name
            })
            .collect();
        match matches.as_slice() {
            [one] => one,
            _ => panic!(
                "the rendered manifests hold {} {kind} named {name}",
                matches.len()
            ),
        }
    }
}

/// The node the pod spec is run on: what kubelet would fill in for it.
pub struct Node<'a> {
    pub name: &'a str,
    pub labels: BTreeMap<&'a str, &'a str>,
    /// status.hostIP and status.hostIPs.
    pub ip: Ipv4Addr,
    /// hostPath volumes: the node's path, and where the test gives it.
    pub host_paths: BTreeMap<&'a str, PathBuf>,
    /// kubelet's seccomp profile root (`localhostProfile` names a file in it).
    pub seccomp_root: PathBuf,
    /// Where configMap and emptyDir volumes are written.
    pub volume_dir: PathBuf,
    /// The cgroup v2 path (from the cgroup root) under which pods' cgroups are made, as
    /// kubelet's cgroupfs driver does (`<root>/kubepods/<qos>/pod<uid>`).
    pub cgroup_root: String,
    /// The service account stand-in: the fake API server speaks plain HTTP, so instead of
    /// the token and CA kubelet projects, a kubeconfig is mounted and named by KUBECONFIG.
    pub kubeconfig: PathBuf,
}

/// One container of a pod, as `podman run` arguments.
pub struct PodmanRun {
    pub args: Vec<String>,
    /// The HTTP readiness probe: (path, port).
    pub readiness: Option<(String, u16)>,
}

/// Keys of a pod spec and of a container that [`podman_run`] translates or that mean nothing
/// on one node (scheduling, priority, probes other than readiness). Anything else fails.
const POD_SPEC_KEYS: &[&str] = &[
    "serviceAccountName",
    "priorityClassName",
    "tolerations",
    "nodeSelector",
    "hostNetwork",
    "hostPID",
    "dnsPolicy",
    "terminationGracePeriodSeconds",
    "containers",
    "volumes",
];
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "args",
    "env",
    "envFrom",
    "ports",
    "readinessProbe",
    "livenessProbe",
    "resources",
    "securityContext",
    "volumeMounts",
];

/// The `podman run` arguments for the pod template of `workload` (a DaemonSet) on `node`:
/// the container runs in its own pod cgroup, with the pod's uid `pod_uid`.
pub fn podman_run(
    rendered: &Rendered,
    workload: &Value,
    node: &Node<'_>,
    pod_uid: &str,
    name: &str,
) -> PodmanRun {
    let spec = &workload["spec"]["template"]["spec"];
    known_keys(spec, POD_SPEC_KEYS, "the pod spec");
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container per agent pod");
    let container = &containers[0];
    known_keys(container, CONTAINER_KEYS, "the container");

    for (key, value) in spec["nodeSelector"].as_object().into_iter().flatten() {
        assert_eq!(
            node.labels.get(key.as_str()).copied(),
            value.as_str(),
            "the nodeSelector {key}={value} does not select the node {}",
            node.name
        );
    }

    // A surging rollout runs the new pod beside the old one on each node: a host port (on the
    // host network, every declared port is one) would keep the scheduler from placing it.
    let surge = &workload["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"];
    if spec["hostNetwork"] == true && !matches!(surge, Value::Null) && *surge != 0 {
        assert!(
            container["ports"].is_null(),
            "the DaemonSet surges (maxSurge {surge}) but its host-network pod declares ports: \
             the scheduler would not place a new pod beside the old one"
        );
    }

    let mut args: Vec<String> = vec!["--name".into(), name.into()];
    let mut flag = |a: &str, b: &str| {
        args.push(a.to_owned());
        args.push(b.to_owned());
    };
    assert_eq!(
        spec["hostNetwork"], true,
        "the agent runs on the host network"
    );
    flag("--network", "host");
    if spec["hostPID"] == true {
        flag("--pid", "host");
    }
    if let Some(seconds) = spec["terminationGracePeriodSeconds"].as_u64() {
        flag("--stop-timeout", &seconds.to_string());
    }
    flag(
        "--cgroup-parent",
        &format!(
            "{}/kubepods/{}/pod{pod_uid}",
            node.cgroup_root,
            qos(&container["resources"])
        ),
    );
    if let Some(memory) = container["resources"]["limits"]["memory"].as_str() {
        flag("--memory", &quantity_bytes(memory).to_string());
    }

    let security = &container["securityContext"];
    known_keys(
        security,
        &[
            "privileged",
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "runAsUser",
            "capabilities",
            "seccompProfile",
        ],
        "the securityContext",
    );
    if security["privileged"] == true {
        args.push("--privileged".into());
    }
    if security["allowPrivilegeEscalation"] == false {
        args.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    if security["readOnlyRootFilesystem"] == true {
        // kubelet adds no tmpfs of its own; podman would.
        args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if let Some(user) = security["runAsUser"].as_u64() {
        args.extend(["--user".into(), user.to_string()]);
    }
    for drop in security["capabilities"]["drop"]
        .as_array()
        .into_iter()
        .flatten()
    {
        args.extend(["--cap-drop".into(), capability(drop)]);
    }
    for add in security["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
    {
        args.extend(["--cap-add".into(), capability(add)]);
    }
    match security["seccompProfile"]["type"].as_str() {
        // The runtime's own default profile: podman's, as CRI-O's is.
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => args.extend(["--security-opt".into(), "seccomp=unconfined".into()]),
        Some("Localhost") => {
            let name = security["seccompProfile"]["localhostProfile"]
                .as_str()
                .expect("localhostProfile");
            let file = node.seccomp_root.join(name);
            assert!(
                file.is_file(),
                "the node has no seccomp profile {name} (kubelet would not start the container)"
            );
            args.extend([
                "--security-opt".into(),
                format!("seccomp={}", file.display()),
            ]);
        }
        Some(other) => panic!("seccompProfile {other}: not run by this test"),
    }

    // Volumes.
    let volumes: BTreeMap<&str, &Value> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().expect("volume name"), v))
        .collect();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        known_keys(mount, &["name", "mountPath", "readOnly"], "a volumeMount");
        let volume_name = mount["name"].as_str().expect("mount name");
        let volume = volumes
            .get(volume_name)
            .unwrap_or_else(|| panic!("volumeMount {volume_name}: no such volume"));
        let source = volume_source(rendered, volume, node);
        let mut spec = format!(
            "{}:{}",
            source.display(),
            mount["mountPath"].as_str().expect("mountPath")
        );
        if mount["readOnly"] == true {
            spec.push_str(":ro");
        }
        args.extend(["--volume".into(), spec]);
    }
    args.extend([
        "--volume".into(),
        format!(
            "{}:/var/run/secrets/imds-test/kubeconfig:ro",
            node.kubeconfig.display()
        ),
    ]);

    // Environment, then arguments expanded from it as kubelet does ($(VAR)).
    let mut env: Vec<(String, String)> = vec![(
        "KUBECONFIG".into(),
        "/var/run/secrets/imds-test/kubeconfig".into(),
    )];
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let name = source["configMapRef"]["name"]
            .as_str()
            .expect("envFrom is a configMapRef");
        let map = rendered.get("ConfigMap", name);
        for (key, value) in map["data"].as_object().into_iter().flatten() {
            env.push((key.clone(), value.as_str().expect("string data").to_owned()));
        }
    }
    for variable in container["env"].as_array().into_iter().flatten() {
        let key = variable["name"].as_str().expect("env name").to_owned();
        let value = match (
            &variable["value"],
            &variable["valueFrom"]["fieldRef"]["fieldPath"],
        ) {
            (Value::String(value), _) => value.clone(),
            (_, Value::String(field)) => field_ref(field, node),
            _ => panic!("env {key}: a source this test does not provide: {variable}"),
        };
        env.push((key, value));
    }
    for (key, value) in &env {
        args.extend(["--env".into(), format!("{key}={value}")]);
    }
    args.extend([
        "--pull".into(),
        "never".into(),
        container["image"].as_str().expect("image").to_owned(),
    ]);
    for arg in container["args"].as_array().into_iter().flatten() {
        args.push(expand(arg.as_str().expect("string arg"), &env));
    }

    let readiness = container["readinessProbe"]["httpGet"]
        .as_object()
        .map(|probe| {
            let port = match &probe["port"] {
                Value::Number(n) => n.as_u64().expect("port") as u16,
                Value::String(name) => container["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == name.as_str())
                    .and_then(|p| p["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("probe port {name}: no such port"))
                    as u16,
                other => panic!("probe port {other}"),
            };
            (probe["path"].as_str().unwrap_or("/").to_owned(), port)
        });
    PodmanRun { args, readiness }
}

fn known_keys(object: &Value, known: &[&str], what: &str) {
    for key in object.as_object().into_iter().flatten().map(|(k, _)| k) {
        assert!(
            known.contains(&key.as_str()),
            "{what} has `{key}`, which this test does not know how to run: teach kubelet.rs"
        );
    }
}

/// kubelet's QoS class, for the pod cgroup's parent.
fn qos(resources: &Value) -> &'static str {
    let requests = resources["requests"].as_object();
    let limits = resources["limits"].as_object();
    match (requests, limits) {
        (None, None) => "besteffort",
        (_, Some(limits))
            if ["cpu", "memory"].iter().all(|r| {
                limits.contains_key(*r) && requests.is_none_or(|q| q.get(*r) == limits.get(*r))
            }) =>
        {
            "guaranteed"
        }
        _ => "burstable",
    }
}

/// A memory quantity (`256Mi`, `1Gi`, `64M`, bytes) in bytes.
fn quantity_bytes(quantity: &str) -> u64 {
    let split = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (number, unit) = quantity.split_at(split);
    let number: u64 = number.parse().expect("quantity number");
    let factor = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => panic!("quantity unit {other}"),
    };
    number * factor
}

fn capability(value: &Value) -> String {
    let name = value.as_str().expect("capability name");
    if name == "ALL" {
        "all".into()
    } else {
        format!("CAP_{name}")
    }
}

/// Where a volume comes from on this node.
fn volume_source(rendered: &Rendered, volume: &Value, node: &Node<'_>) -> PathBuf {
    let name = volume["name"].as_str().expect("volume name");
    if let Some(host) = volume["hostPath"].as_object() {
        let path = host["path"].as_str().expect("hostPath path");
        let given = node
            .host_paths
            .get(path)
            .unwrap_or_else(|| panic!("hostPath {path}: this test's node does not provide it"));
        match host.get("type").and_then(Value::as_str) {
            Some("Directory") => assert!(
                given.is_dir(),
                "hostPath {path} ({}) is not a directory",
                given.display()
            ),
            // As kubelet makes it: root's, 0755.
            Some("DirectoryOrCreate") => {
                std::fs::create_dir_all(given).expect("hostPath DirectoryOrCreate")
            }
            None => {}
            Some(other) => panic!("hostPath {path}: type {other} is not provided by this test"),
        }
        return given.clone();
    }
    let dir = node.volume_dir.join(name);
    std::fs::create_dir_all(&dir).expect("volume directory");
    if let Some(map) = volume["configMap"]["name"].as_str() {
        let map = rendered.get("ConfigMap", map);
        for (key, value) in map["data"].as_object().into_iter().flatten() {
            std::fs::write(dir.join(key), value.as_str().expect("string data"))
                .expect("write configMap key");
        }
        return dir;
    }
    assert!(
        volume.get("emptyDir").is_some(),
        "volume {name}: a kind this test does not provide: {volume}"
    );
    dir
}

/// The downward API's fields that the agent's pod uses.
fn field_ref(field: &str, node: &Node<'_>) -> String {
    match field {
        "spec.nodeName" => node.name.to_owned(),
        "status.hostIP" | "status.hostIPs" | "status.podIP" | "status.podIPs" => {
            node.ip.to_string()
        }
        other => panic!("fieldRef {other}: not provided by this test"),
    }
}

/// `$(VAR)` in an argument, replaced as kubelet replaces it (`$$` is a literal `$`; an
/// unknown variable stays as written).
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .filter(|(name, _)| env.iter().any(|(k, _)| k == name))
        {
            let value = env.iter().rev().find(|(k, _)| k == name).expect("found");
            out.push_str(&value.1);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Podman inside a sandbox's network namespace, removing what it made when dropped.
pub struct Podman {
    netns: String,
    tag: String,
    conf: PathBuf,
    networks: Mutex<Vec<String>>,
    /// The sandbox's name: runc also makes its cgroups in the cgroup v1 hierarchies of this
    /// hybrid layout, which go when the podman state does.
    sandbox: String,
}

/// A bridge network for pods.
pub struct PodNetwork {
    pub name: String,
    pub gateway: Ipv4Addr,
}

impl Podman {
    /// Podman for `sandbox`, or `None` (after [`sandbox::skip`]) when this machine lacks it or
    /// the images. Removes what earlier runs killed before their cleanup left behind.
    pub fn new(sandbox: &Sandbox, images: &[&str]) -> Option<Self> {
        for tool in ["podman", "runc", "kubectl", "nsenter"] {
            if which(tool).is_none() {
                sandbox::skip(&format!(
                    "`{tool}` is not installed (cargo xtask setup installs it)"
                ));
                return None;
            }
        }
        let conf = sandbox.work_dir.join("containers.conf");
        std::fs::write(&conf, CONTAINERS_CONF).expect("write containers.conf");
        let podman = Self {
            netns: format!("/run/netns/{}", sandbox.name),
            tag: sandbox.name.clone(),
            conf,
            networks: Mutex::default(),
            sandbox: sandbox.name.clone(),
        };
        podman.reap_stale();
        for image in images {
            let exists = podman.command(&["image", "exists", image]).status();
            if !exists.is_ok_and(|s| s.success()) {
                sandbox::skip(&format!(
                    "image {image} is not in local storage (cargo xtask image builds it)"
                ));
                return None;
            }
        }
        Some(podman)
    }

    /// `podman ARGS` in the sandbox's network namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .stdin(Stdio::null());
        command
    }

    /// Runs `podman ARGS`, panicking with its error output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.command(args).output().expect("run podman");
        assert!(
            output.status.success(),
            "podman {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// `podman run --detach` with the test's label; returns the container's id.
    pub fn start(&self, args: &[String]) -> String {
        let mut all: Vec<&str> = vec!["run", "--detach", "--label"];
        let label = format!("{LABEL}={}", self.tag);
        all.push(&label);
        all.extend(args.iter().map(String::as_str));
        self.run(&all)
    }

    /// A pod: the workload image, sleeping, in its own network namespace on `network` and
    /// in kubelet's cgroup for a best-effort pod `pod_uid` below `cgroup_root`.
    pub fn start_pod(
        &self,
        name: &str,
        network: &PodNetwork,
        cgroup_root: &str,
        pod_uid: &str,
    ) -> String {
        self.start(&[
            "--name".into(),
            name.into(),
            "--network".into(),
            network.name.clone(),
            "--cgroup-parent".into(),
            format!("{cgroup_root}/kubepods/besteffort/pod{pod_uid}"),
            "--pull".into(),
            "never".into(),
            WORKLOAD_IMAGE.into(),
            "sleep".into(),
            "infinity".into(),
        ])
    }

    /// An `--internal` bridge network (no route out of the sandbox) with this subnet.
    pub fn create_network(&self, name: &str, subnet_prefix: [u8; 3]) -> PodNetwork {
        let [a, b, c] = subnet_prefix;
        let gateway = Ipv4Addr::new(a, b, c, 1);
        let label = format!("{LABEL}={}", self.tag);
        self.run(&[
            "network",
            "create",
            "--internal",
            "--disable-dns",
            "--label",
            &label,
            "--subnet",
            &format!("{a}.{b}.{c}.0/24"),
            "--gateway",
            &gateway.to_string(),
            name,
        ]);
        self.networks
            .lock()
            .expect("networks")
            .push(name.to_owned());
        PodNetwork {
            name: name.to_owned(),
            gateway,
        }
    }

    /// `curl` inside a container (`podman exec`), as [`Sandbox::curl`] runs it.
    pub fn curl(&self, container: &str, args: &[&str]) -> Curl {
        let mut command = self.command(&["exec", container, "curl"]);
        command.args(sandbox::CURL_ARGS).args(args);
        sandbox::curl_result(command.output().expect("podman exec curl"))
    }

    /// `podman exec CONTAINER ARGS`, with its output whatever its exit.
    pub fn exec(&self, container: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", container];
        all.extend_from_slice(args);
        self.command(&all).output().expect("podman exec")
    }

    /// The container's log (its stdout and stderr).
    pub fn logs(&self, container: &str) -> String {
        let output = self
            .command(&["logs", container])
            .output()
            .expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Whether the container is running.
    pub fn is_running(&self, container: &str) -> bool {
        self.run(&["inspect", "--format", "{{.State.Running}}", container]) == "true"
    }

    /// Removes containers and networks labelled for sandboxes whose test process is gone.
    fn reap_stale(&self) {
        self.remove_stale(
            &["ps", "--all"],
            "{{.Names}}",
            &["rm", "--force", "--time", "0"],
        );
        self.remove_stale(
            &["network", "ls"],
            "{{.Name}}",
            &["network", "rm", "--force"],
        );
    }

    /// `podman LIST --filter label=...`, then `podman REMOVE NAME` for each whose sandbox is
    /// stale; `name` is the listing's template field for the name.
    fn remove_stale(&self, list: &[&str], name: &str, remove: &[&str]) {
        let filter = format!("label={LABEL}");
        let format = format!("{name} {{{{.Labels}}}}");
        let mut args = list.to_vec();
        args.extend(["--filter", &filter, "--format", &format]);
        let Ok(listed) = self.command(&args).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if label_value(line).is_some_and(|owner| sandbox::is_stale(&owner)) {
                let mut args = remove.to_vec();
                args.push(name);
                let _ = self.command(&args).output();
            }
        }
    }
}

/// The sandbox name in a `--format '{{.Labels}}'` line (`map[dev.imds-agent.test:NAME]`).
fn label_value(line: &str) -> Option<String> {
    let rest = line.split_once(&format!("{LABEL}:"))?.1;
    Some(
        rest.split(|c: char| c == ']' || c.is_whitespace())
            .next()?
            .to_owned(),
    )
}

impl Drop for Podman {
    fn drop(&mut self) {
        let filter = format!("label={LABEL}={}", self.tag);
        let listed = self
            .command(&["ps", "--all", "--quiet", "--filter", &filter])
            .output();
        if let Ok(listed) = listed {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = self.command(&["rm", "--force", "--time", "0", id]).output();
            }
        }
        for network in self.networks.lock().expect("networks").iter() {
            let _ = self
                .command(&["network", "rm", "--force", network])
                .output();
        }
        remove_v1_cgroups(&self.sandbox);
    }
}

/// runc's cgroups in the v1 hierarchies (`/sys/fs/cgroup/<controller>/<sandbox>/...`) of a
/// hybrid layout, deepest first; the sandbox removes the v2 ones.
fn remove_v1_cgroups(sandbox: &str) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup") {
            continue;
        }
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let dir = Path::new(point).join(sandbox);
        if dir.exists() {
            remove_tree(&dir);
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline && dir.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_expand_as_kubelet_expands_them() {
        let env = vec![
            ("NODE_IP".to_owned(), "10.0.0.7".to_owned()),
            ("EMPTY".to_owned(), String::new()),
        ];
        assert_eq!(expand("--x=[$(NODE_IP)]:9754", &env), "--x=[10.0.0.7]:9754");
        assert_eq!(
            expand("$(UNKNOWN)/$$(NODE_IP)/$(EMPTY)", &env),
            "$(UNKNOWN)/$(NODE_IP)/"
        );
        assert_eq!(expand("a$b$", &env), "a$b$");
    }

    #[test]
    fn qos_and_quantities_as_kubelet_reads_them() {
        let burstable = serde_json::json!({"requests": {"cpu": "50m", "memory": "64Mi"},
                                           "limits": {"memory": "256Mi"}});
        assert_eq!(qos(&burstable), "burstable");
        assert_eq!(qos(&Value::Null), "besteffort");
        let guaranteed = serde_json::json!({"limits": {"cpu": "1", "memory": "1Gi"}});
        assert_eq!(qos(&guaranteed), "guaranteed");
        assert_eq!(quantity_bytes("256Mi"), 256 << 20);
        assert_eq!(quantity_bytes("1G"), 1_000_000_000);
    }
}
