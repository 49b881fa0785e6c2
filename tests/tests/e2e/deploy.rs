//! Every file under `deploy/` (and the example resources in `policies/kubernetes/`) parsed
//! into the Kubernetes API's own types, with unknown fields as errors, and checked against
//! each other and against the agent's command line, so that a typo fails CI rather than a
//! rollout.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use imds_agent::kube::crd::{ClusterImdsPolicy, ImdsPolicy};
use imds_tests::kubelet::Rendered;

use crate::support::{Overlay, repo};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

/// The parts of a kustomization this repository uses; anything else is a typo.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
    images: Vec<Image>,
    config_map_generator: Vec<Generator>,
    patches: Vec<Value>,
}

/// An optional kustomize component (`deploy/<name>/`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Component {
    api_version: String,
    kind: String,
    resources: Vec<String>,
    patches: Vec<Patch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    target: Value,
    patch: String,
}

/// One RFC 6902 operation of a component's patch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Operation {
    op: String,
    path: String,
    value: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    new_name: String,
    new_tag: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Generator {
    name: String,
    namespace: String,
    #[serde(default)]
    literals: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
}

/// Every path present in `original` but missing from `parsed` (the object as the typed
/// value serializes it again): fields the type does not know.
fn unknown_fields(original: &Value, parsed: &Value, at: &str, out: &mut Vec<String>) {
    match (original, parsed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => unknown_fields(value, other, &format!("{at}.{key}"), out),
                    None => out.push(format!("{at}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_fields(x, y, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Parses one document as `T`, failing on any field `T` does not have.
fn strict<T: DeserializeOwned + Serialize>(file: &Path, document: &Value) -> T {
    let typed: T = serde_json::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let again = serde_json::to_value(&typed).expect("serialize");
    let mut unknown = Vec::new();
    unknown_fields(document, &again, "", &mut unknown);
    assert!(
        unknown.is_empty(),
        "{}: unknown fields {unknown:?}",
        file.display()
    );
    typed
}

/// Every object in a file, by kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    crds: Vec<CustomResourceDefinition>,
    policies: Vec<ImdsPolicy>,
    cluster_policies: Vec<ClusterImdsPolicy>,
}

fn parse_resources(file: &Path, objects: &mut Objects) {
    let text = std::fs::read_to_string(file).expect("read");
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(!documents.is_empty(), "{}: no documents", file.display());
    for document in documents.into_iter().filter(|d| !d.is_null()) {
        let api_version = document["apiVersion"].as_str().unwrap_or_default();
        let kind = document["kind"].as_str().unwrap_or_default();
        match (api_version, kind) {
            ("v1", "Namespace") => objects.namespaces.push(strict(file, &document)),
            ("v1", "ServiceAccount") => objects.service_accounts.push(strict(file, &document)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                objects.cluster_roles.push(strict(file, &document));
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                objects.bindings.push(strict(file, &document));
            }
            ("apps/v1", "DaemonSet") => objects.daemon_sets.push(strict(file, &document)),
            ("v1", "Service") => objects.services.push(strict(file, &document)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                objects.crds.push(strict(file, &document));
            }
            ("imds-agent.dev/v1alpha1", "ImdsPolicy") => {
                objects.policies.push(strict(file, &document));
            }
            ("imds-agent.dev/v1alpha1", "ClusterImdsPolicy") => {
                objects.cluster_policies.push(strict(file, &document));
            }
            other => panic!("{}: unexpected object {other:?}", file.display()),
        }
    }
}

/// Policy resources must also pass the agent's own validation, as the agent would run it.
fn check_policies(objects: &Objects) {
    for policy in &objects.policies {
        let namespace = policy.metadata.namespace.as_deref().expect("namespaced");
        let name = policy.metadata.name.clone().expect("name");
        imds_agent::policy::compile_resource(
            Path::new(&name),
            name.clone(),
            &policy.spec.policy,
            Some(namespace),
        )
        .unwrap_or_else(|e| panic!("ImdsPolicy {namespace}/{name}: {e:?}"));
    }
    for policy in &objects.cluster_policies {
        let name = policy.metadata.name.clone().expect("name");
        imds_agent::policy::compile_resource(
            Path::new(&name),
            name.clone(),
            &policy.spec.policy,
            None,
        )
        .unwrap_or_else(|e| panic!("ClusterImdsPolicy {name}: {e:?}"));
    }
}

#[test]
fn every_deploy_file_parses_into_the_api_types_and_fits_together() {
    let deploy = repo().join("deploy");
    let kustomization: Kustomization = serde_saphyr::from_str(
        &std::fs::read_to_string(deploy.join("kustomization.yaml")).expect("kustomization"),
    )
    .unwrap_or_else(|e| panic!("deploy/kustomization.yaml: {e}"));
    assert_eq!(
        (
            kustomization.api_version.as_str(),
            kustomization.kind.as_str()
        ),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    );
    assert_eq!(kustomization.images.len(), 1);
    // The image `cargo xtask image` builds: its name in local storage, the agent's version.
    let image = &kustomization.images[0];
    assert_eq!(
        (image.new_name.as_str(), image.new_tag.as_str()),
        ("localhost/imds-agent", env!("CARGO_PKG_VERSION")),
        "deploy/ names another image than `cargo xtask image` builds"
    );
    assert!(!kustomization.patches.is_empty());

    let mut objects = Objects::default();
    for resource in &kustomization.resources {
        parse_resources(&deploy.join(resource), &mut objects);
    }
    // Every file is used: a resource, or a generator's input; directories are components,
    // but for the Helm chart (checked against the kustomize build on its own).
    let generated: Vec<&String> = kustomization
        .config_map_generator
        .iter()
        .flat_map(|g| &g.files)
        .collect();
    let mut extra_args = Vec::new();
    for entry in std::fs::read_dir(&deploy).expect("deploy/") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "helm" {
            continue;
        }
        if entry.path().is_dir() {
            extra_args.extend(parse_component(&entry.path(), &mut objects));
            continue;
        }
        assert!(
            name == "kustomization.yaml"
                || kustomization.resources.contains(&name)
                || generated.contains(&&name),
            "deploy/{name} is not referenced by kustomization.yaml"
        );
    }
    // The node policy is a policy file for the agent.
    for file in &generated {
        let path = deploy.join(file);
        let text = std::fs::read_to_string(&path).expect("generator file");
        imds_agent::policy::parse(&path, &text).unwrap_or_else(|e| panic!("{e:?}"));
    }

    // The CRDs are the generated ones.
    assert_eq!(
        objects
            .crds
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        [
            "imdspolicies.imds-agent.dev",
            "clusterimdspolicies.imds-agent.dev"
        ]
    );
    check_policies(&objects);

    // RBAC: least privilege, bound to the DaemonSet's ServiceAccount in the namespace.
    let [daemon_set] = objects.daemon_sets.as_slice() else {
        panic!("one DaemonSet expected");
    };
    let pod = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let account = pod
        .service_account_name
        .clone()
        .expect("serviceAccountName");
    assert!(
        objects
            .service_accounts
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(&account))
    );
    let binding = objects
        .bindings
        .iter()
        .find(|b| b.role_ref.name == "imds-agent")
        .expect("binding");
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    let namespace = daemon_set.metadata.namespace.as_deref();
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (account.as_str(), namespace)
    );
    assert!(
        objects
            .service_accounts
            .iter()
            .all(|s| s.metadata.namespace.as_deref() == namespace),
        "the ServiceAccount is in the DaemonSet's namespace"
    );
    for generator in &kustomization.config_map_generator {
        assert_eq!(
            Some(generator.namespace.as_str()),
            namespace,
            "{}",
            generator.name
        );
    }
    let role = objects
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("imds-agent"))
        .expect("agent role");
    let mut granted = BTreeMap::new();
    for rule in role.rules.as_ref().expect("rules") {
        for resource in rule.resources.as_ref().expect("resources") {
            granted.insert(resource.clone(), rule.verbs.clone());
        }
    }
    let read = ["get", "list", "watch"].map(String::from).to_vec();
    assert_eq!(granted["pods"], read);
    assert_eq!(granted["imdspolicies"], read);
    assert!(!granted.contains_key("nodes") && !granted.contains_key("secrets"));
    assert_eq!(
        granted["events"],
        ["create"],
        "events on pods, nothing more"
    );
    assert!(
        granted["imdspolicies/status"]
            .iter()
            .all(|v| v != "delete" && v != "create"),
        "{granted:?}"
    );

    // The DaemonSet: every node, critical, host namespaces, no privileged mode.
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.host_network, Some(true));
    let tolerations = pod.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let container = &pod.containers[0];

    // The metrics Service selects the agents and names their metrics port.
    let [service] = objects.services.as_slice() else {
        panic!("one Service expected");
    };
    let service_spec = service.spec.as_ref().expect("service spec");
    let pod_labels = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (key, value) in service_spec.selector.iter().flatten() {
        assert_eq!(
            pod_labels.get(key),
            Some(value),
            "the Service selects {key}={value}"
        );
    }
    // The metrics port is the one the agent listens on; the pod declares none (on the host
    // network a declared port is a host port, which would stop the rollout's surge pod).
    assert!(
        container.ports.is_none(),
        "the agent's container declares ports"
    );
    let rolling = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        (&rolling.max_surge, &rolling.max_unavailable),
        (&Some(IntOrString::Int(1)), &Some(IntOrString::Int(0))),
        "a rollout starts the new agent before the old one goes"
    );
    let metrics_port: i32 = container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--metrics-listen="))
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .expect("--metrics-listen with a port");
    for port in service_spec.ports.iter().flatten() {
        assert_eq!(
            port.target_port,
            Some(IntOrString::Int(metrics_port)),
            "the Service targets the agent's metrics port"
        );
    }
    for probe in [&container.readiness_probe, &container.liveness_probe] {
        let port = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| &h.port);
        assert_eq!(
            port,
            Some(&IntOrString::Int(metrics_port)),
            "a probe's port"
        );
    }
    // The state directory is the node's: the old pod offers its sockets there to the new.
    let state = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "state")
        .and_then(|v| v.host_path.as_ref())
        .expect("the state volume is a hostPath");
    assert!(
        container
            .args
            .iter()
            .flatten()
            .any(|a| *a == format!("--state-dir={}", state.path)),
        "the agent's --state-dir is the node's {}",
        state.path
    );
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.privileged, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert!(container.readiness_probe.is_some() && container.liveness_probe.is_some());
    // The image the kustomization sets is the container's.
    assert_eq!(
        container.image.as_deref(),
        Some(kustomization.images[0].name.as_str())
    );

    // Volumes and config maps the container uses exist.
    let volumes: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for mount in container.volume_mounts.iter().flatten() {
        assert!(
            volumes.contains(&mount.name.as_str()),
            "volume {}",
            mount.name
        );
    }
    let generators: Vec<&str> = kustomization
        .config_map_generator
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    let config_maps = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.config_map.as_ref().map(|c| c.name.as_str()))
        .chain(
            container
                .env_from
                .iter()
                .flatten()
                .filter_map(|e| e.config_map_ref.as_ref().map(|c| c.name.as_str())),
        );
    for name in config_maps {
        assert!(
            generators.contains(&name),
            "config map {name} is not generated"
        );
    }

    // The container's command line is the agent's: parse it with the agent's own parser,
    // with the $(VAR) references the kubelet substitutes, on an IPv4, a dual-stack and an
    // IPv6-only node.
    let env: Vec<&str> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    use clap::{CommandFactory as _, Parser as _};
    let nodes = [
        ("10.0.0.7", "10.0.0.7"),
        ("fd00::7", "fd00::7,10.0.0.7"),
        ("fd00::7", "fd00::7"),
    ];
    for (node_ip, node_ips) in nodes {
        let args: Vec<String> = container
            .args
            .iter()
            .flatten()
            .map(|a| {
                let mut a = a.clone();
                let values = [
                    ("$(NODE_NAME)", "node-a"),
                    ("$(NODE_IPS)", node_ips),
                    ("$(NODE_IP)", node_ip),
                ];
                for (var, value) in values {
                    if a.contains(var) {
                        assert!(env.contains(&&var[2..var.len() - 1]), "{var} is not in env");
                        a = a.replace(var, value);
                    }
                }
                assert!(!a.contains("$("), "unresolved reference in {a}");
                a
            })
            .chain(extra_args.iter().cloned())
            .collect();
        imds_agent::cli::Cli::try_parse_from(std::iter::once("imds-agent".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("the DaemonSet's args on a node at {node_ips}: {e}"));
    }
    // Each setting in the settings config map is one the agent reads from its environment.
    let command = imds_agent::cli::Cli::command();
    let run = command.find_subcommand("run").expect("run");
    let known: Vec<String> = run
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for generator in &kustomization.config_map_generator {
        for literal in &generator.literals {
            let (key, _) = literal.split_once('=').expect("KEY=VALUE");
            assert!(
                known.iter().any(|k| k == key),
                "{key} is not an agent setting ({known:?})"
            );
        }
    }
}

/// Parses a component's resources and returns the arguments its patches add to the agent.
fn parse_component(dir: &Path, objects: &mut Objects) -> Vec<String> {
    let file = dir.join("kustomization.yaml");
    let component: Component =
        serde_saphyr::from_str(&std::fs::read_to_string(&file).expect("component"))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert_eq!(
        (component.api_version.as_str(), component.kind.as_str()),
        ("kustomize.config.k8s.io/v1alpha1", "Component")
    );
    for resource in &component.resources {
        parse_resources(&dir.join(resource), objects);
    }
    let mut args = Vec::new();
    // What a component may change of the agent's container besides adding arguments.
    const REPLACEABLE: &[&str] = &[
        "/spec/template/spec/containers/0/securityContext/seccompProfile",
        "/spec/template/spec/containers/0/securityContext/capabilities/add",
    ];
    for patch in &component.patches {
        assert_eq!(patch.target["kind"], "DaemonSet", "{}", file.display());
        let operations: Vec<Operation> = serde_saphyr::from_str(&patch.patch)
            .unwrap_or_else(|e| panic!("{}: patch: {e}", file.display()));
        for operation in operations {
            match (operation.op.as_str(), operation.path.as_str()) {
                ("add", "/spec/template/spec/containers/0/args/-") => {
                    args.push(operation.value.as_str().expect("an argument").to_owned())
                }
                ("replace", path) if REPLACEABLE.contains(&path) => {}
                (op, path) => panic!("{}: {op} {path}: not expected", file.display()),
            }
        }
    }
    args
}

/// The seccomp profile users install for the agent's pods is the host unit's allowlist, as
/// systemd expands it: one list for both.
#[test]
fn the_seccomp_profile_is_the_units_system_call_allowlist() {
    let unit = repo().join("packaging/imds-agent.service");
    let Some(derived) = imds_tests::seccomp::profile_for_unit(&unit) else {
        imds_tests::sandbox::skip("systemd-analyze is not installed");
        return;
    };
    let file = repo().join(imds_tests::seccomp::PROFILE);
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    if committed != derived {
        let fresh = repo().join("target/imds-agent.seccomp.json");
        std::fs::write(&fresh, &derived).expect("write the derived profile");
        panic!(
            "{} is not the unit's SystemCallFilter= as this systemd expands it; the derived \
             profile is at {} (copy it over if the unit's list is the one meant)",
            file.display(),
            fresh.display()
        );
    }
    let profile: Value = serde_json::from_str(&committed).expect("JSON");
    let allowed = profile["syscalls"][0]["names"].as_array().expect("names");
    for needed in ["bpf", "open_by_handle_at", "accept4", "sendmsg", "recvmsg"] {
        assert!(
            allowed.iter().any(|n| n == needed),
            "{needed} is not allowed"
        );
    }
    for never in ["ptrace", "init_module", "kexec_load", "setrlimit"] {
        assert!(!allowed.iter().any(|n| n == never), "{never} is allowed");
    }
}

#[test]
fn the_example_policy_resources_are_valid() {
    let dir = repo().join("policies/kubernetes");
    let mut objects = Objects::default();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("policies/kubernetes") {
        parse_resources(&entry.expect("entry").path(), &mut objects);
        files += 1;
    }
    assert!(files >= 3 && !objects.policies.is_empty() && !objects.cluster_policies.is_empty());
    check_policies(&objects);
}

#[test]
fn an_unknown_field_is_caught() {
    let typo = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "lables": {"a": "b"}}
    });
    let result = std::panic::catch_unwind(|| strict::<ServiceAccount>(Path::new("t.yaml"), &typo));
    assert!(result.is_err(), "a misspelt field must fail");
}

/// `kubectl kustomize`, as users apply deploy/ (and with the startup-taint component, through
/// an overlay as a user would enable it): every namespaced object in the agent's namespace,
/// and no namespace on a cluster-scoped one (kustomize would stamp one on the
/// ClusterImdsPolicy, which some GitOps tools reject).
#[test]
fn the_rendered_manifests_put_namespaces_only_on_namespaced_objects() {
    let overlay = Overlay::with(&["startup-taint"]);
    let renderings = [
        ("deploy/", Rendered::kustomize(&repo().join("deploy"))),
        (
            "deploy/ with startup-taint",
            Rendered::kustomize(&overlay.0),
        ),
    ];
    for (what, rendered) in &renderings {
        // Cluster-scoped: built-in kinds the manifests use, and custom kinds whose CRD says so.
        let mut cluster_scoped: Vec<&str> = vec![
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        cluster_scoped.extend(
            rendered
                .objects
                .iter()
                .filter(|o| {
                    o["kind"] == "CustomResourceDefinition" && o["spec"]["scope"] == "Cluster"
                })
                .filter_map(|o| o["spec"]["names"]["kind"].as_str()),
        );
        for object in &rendered.objects {
            let kind = object["kind"].as_str().unwrap_or_default();
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let namespace = &object["metadata"]["namespace"];
            if cluster_scoped.contains(&kind) {
                assert!(
                    namespace.is_null(),
                    "{what}: {kind} {name} has namespace {namespace}"
                );
            } else {
                assert_eq!(namespace, "imds-agent", "{what}: {kind} {name}");
            }
        }
        assert!(
            rendered
                .objects
                .iter()
                .any(|o| o["kind"] == "ClusterImdsPolicy"),
            "{what}: the pod default is rendered"
        );
    }
    let taint = &renderings[1].1;
    let args =
        &taint.get("DaemonSet", "imds-agent")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array().is_some_and(|a| a
            .iter()
            .any(|arg| arg == "--remove-node-taint=imds-agent.dev/agent-not-ready")),
        "{args}"
    );
}

/// Runs `program args`, returning (success, stdout and stderr); `None` (after a skip) when
/// the tool is not installed.
fn tool(program: &str, args: &[&std::ffi::OsStr]) -> Option<(bool, String)> {
    match std::process::Command::new(program).args(args).output() {
        Ok(output) => Some((
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )),
        Err(error) => {
            imds_tests::sandbox::skip(&format!(
                "{program}: {error} (cargo xtask setup installs it)"
            ));
            None
        }
    }
}

/// What users' pipelines run on manifests: `kubernetes-validate --strict` (the API's own
/// schemas, unknown fields refused) on every object of both renderings, and every custom
/// resource in the repository (the rendered pod default, the examples in policies/kubernetes)
/// against deploy/crds.yaml's schema as the API server reads it. The schema check is shown
/// to refuse what the server would (a value past a bound, an unknown field).
#[test]
fn manifests_pass_kubernetes_validate_and_custom_resources_their_schema() {
    let dir = repo().join(format!("target/manifest-checks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("check directory");
    let overlay = Overlay::with(&["startup-taint", "seccomp"]);
    let mut rendered = Vec::new();
    for (name, source) in [
        ("deploy.yaml", repo().join("deploy")),
        ("components.yaml", overlay.0.clone()),
    ] {
        let output = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&source)
            .output()
            .expect("kubectl kustomize");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let file = dir.join(name);
        std::fs::write(&file, &output.stdout).expect("write rendering");
        rendered.push(file);
    }
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: imds-agent.dev/v1alpha1\nkind: ImdsPolicy\nmetadata: {name: bad, namespace: t}\n\
         spec:\n  default: deny\n  callers: {uids: [4294967296]}\n  surplus: 1\n  \
         rules: [{name: \"two words\", action: allow, methods: [FETCH], groups: [secrets]}]\n",
    )
    .expect("write bad resource");

    let validate: Vec<&std::ffi::OsStr> = std::iter::once("--strict".as_ref())
        .chain(rendered.iter().map(|p| p.as_os_str()))
        .collect();
    let Some((valid, report)) = tool("kubernetes-validate", &validate) else {
        std::fs::remove_dir_all(&dir).ok();
        return;
    };
    assert!(valid && !report.contains("ERROR"), "{report}");
    assert_eq!(
        report
            .matches("passed for resource daemonset/imds-agent")
            .count(),
        2,
        "{report}"
    );

    let script = repo().join("tests/validate_custom_resources.py");
    let crds = repo().join("deploy/crds.yaml");
    let mut resources: Vec<PathBuf> = rendered.clone();
    for entry in std::fs::read_dir(repo().join("policies/kubernetes")).expect("examples") {
        resources.push(entry.expect("entry").path());
    }
    let args = |files: &[PathBuf]| -> Vec<std::ffi::OsString> {
        [script.as_os_str(), crds.as_os_str()]
            .into_iter()
            .map(ToOwned::to_owned)
            .chain(files.iter().map(|f| f.as_os_str().to_owned()))
            .collect()
    };
    let run = |files: &[PathBuf]| {
        let args = args(files);
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        tool("python3", &refs).expect("python3 runs")
    };
    let (valid, report) = run(&resources);
    assert!(valid, "{report}");
    assert!(
        report.contains("checked 5 custom resources, 0 errors"),
        "{report}"
    );
    let (valid, report) = run(std::slice::from_ref(&bad));
    assert!(!valid, "{report}");
    assert!(
        report.contains("spec.callers.uids.0: 4294967296 is greater than the maximum")
            && report.contains("'surplus' was unexpected"),
        "{report}"
    );
    // What the schema says of a rule: its name's form, known methods and groups.
    for refused in [
        "spec.rules.0.name: 'two words' does not match",
        "spec.rules.0.methods.0: 'FETCH' is not one of",
        "spec.rules.0.groups.0: 'secrets' is not one of",
    ] {
        assert!(report.contains(refused), "{refused}:\n{report}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `helm template` of the chart in deploy/helm/imds-agent into the agent's namespace, with
/// `--set` values; `None` (after a skip) without helm.
fn helm_template(set: &[&str]) -> Option<Vec<Value>> {
    let chart = repo().join("deploy/helm/imds-agent");
    let mut command = std::process::Command::new("helm");
    command.args(["template", "imds-agent"]).arg(&chart).args([
        "--namespace",
        "imds-agent",
        "--include-crds",
    ]);
    for value in set {
        command.args(["--set", value]);
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(error) => {
            imds_tests::sandbox::skip(&format!("helm: {error} (cargo xtask setup installs it)"));
            return None;
        }
    };
    assert!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let objects: Vec<Value> = serde_saphyr::from_multiple(&text).expect("helm's output parses");
    Some(objects.into_iter().filter(|o| !o.is_null()).collect())
}

/// A rendering's objects by (kind, name), with what only the packaging tool adds taken off:
/// kustomize's hash suffix on generated ConfigMaps (and on the references to them), Helm's
/// own labels, and the pod template's config checksum (Helm's way to roll the agents on a
/// change of configuration, as the hashed names are kustomize's).
fn comparable(objects: &[Value]) -> BTreeMap<(String, String), Value> {
    let mut text = serde_json::to_string(objects).expect("serialise");
    for object in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if let Some((base, hash)) = name.rsplit_once('-')
            && hash.len() == 10
            && hash.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            text = text.replace(&format!("\"{name}\""), &format!("\"{base}\""));
        }
    }
    let objects: Vec<Value> = serde_json::from_str(&text).expect("parse");
    objects
        .into_iter()
        .map(|mut object| {
            for meta in ["/metadata", "/spec/template/metadata"] {
                let Some(meta) = object.pointer_mut(meta).and_then(Value::as_object_mut) else {
                    continue;
                };
                if let Some(labels) = meta.get_mut("labels").and_then(Value::as_object_mut) {
                    for helm in [
                        "helm.sh/chart",
                        "app.kubernetes.io/instance",
                        "app.kubernetes.io/managed-by",
                    ] {
                        labels.remove(helm);
                    }
                }
                if let Some(annotations) =
                    meta.get_mut("annotations").and_then(Value::as_object_mut)
                {
                    annotations.remove("checksum/config");
                }
                meta.retain(|_, v| !v.as_object().is_some_and(serde_json::Map::is_empty));
            }
            let key = (
                object["kind"].as_str().unwrap_or_default().to_owned(),
                object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            (key, object)
        })
        .collect()
}

/// Where two values first differ (a JSON pointer and both sides), if they do. Numbers are
/// compared by value: kustomize writes 21600.0 as 21600, Helm leaves it as it is.
fn first_difference(helm: &Value, kustomize: &Value, at: &str) -> Option<String> {
    match (helm, kustomize) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                first_difference(
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    &format!("{at}/{k}"),
                )
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{at}/{i}"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        (a, b) => Some(format!("{at}: helm {a}, kustomize {b}")),
    }
}

/// The Helm chart renders what `kubectl kustomize deploy/` does, by default and with the
/// startup taint; the release namespace is Helm's to create (`--create-namespace`), so the
/// kustomize build's Namespace is the one object only the chart's `namespace.create` makes.
/// `helm lint --strict` is clean, and monitoring turns on the operator's monitors.
#[test]
fn the_helm_chart_renders_what_kustomize_builds() {
    let Some(default) = helm_template(&[]) else {
        return;
    };
    let kustomized: Vec<Value> = Rendered::kustomize(&repo().join("deploy"))
        .objects
        .into_iter()
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    let assert_same = |what: &str, helm: &[Value], kustomize: &[Value]| {
        let (helm, kustomize) = (comparable(helm), comparable(kustomize));
        assert_eq!(
            helm.keys().collect::<Vec<_>>(),
            kustomize.keys().collect::<Vec<_>>(),
            "{what}: the same objects"
        );
        for (key, object) in &kustomize {
            if let Some(difference) = first_difference(&helm[key], object, "") {
                panic!("{what}: {key:?}: {difference}");
            }
        }
    };
    assert_same("default", &default, &kustomized);

    let tainted: Vec<Value> = Rendered::kustomize(&Overlay::with(&["startup-taint"]).0)
        .objects
        .into_iter()
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    let helm_tainted = helm_template(&["startupTaint.enabled=true"]).expect("helm ran before");
    assert_same("startup taint", &helm_tainted, &tainted);

    let confined: Vec<Value> = Rendered::kustomize(&Overlay::with(&["seccomp"]).0)
        .objects
        .into_iter()
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    let helm_confined =
        helm_template(&["seccompLocalhostProfile=imds-agent.json"]).expect("helm ran before");
    assert_same("seccomp profile", &helm_confined, &confined);

    // With the chart making its namespace, every object of the kustomize build, the
    // Namespace with its Pod Security label included.
    let with_namespace = helm_template(&["namespace.create=true"]).expect("helm ran before");
    let everything = Rendered::kustomize(&repo().join("deploy")).objects;
    assert_same("namespace.create", &with_namespace, &everything);
    let monitored = helm_template(&[
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.podMonitor.enabled=true",
    ])
    .expect("helm ran before");
    for kind in ["ServiceMonitor", "PodMonitor"] {
        let monitor = monitored
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"));
        assert_eq!(
            monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], "imds-agent",
            "{monitor}"
        );
    }
    let settings = helm_template(&["mode=audit", "endpoints={169.254.170.2:80}"]).expect("helm");
    let data = &settings
        .iter()
        .find(|o| o["metadata"]["name"] == "imds-agent-settings")
        .expect("settings")["data"];
    assert_eq!(
        (&data["IMDS_AGENT_MODE"], &data["IMDS_AGENT_ENDPOINTS"]),
        (&json!("audit"), &json!("169.254.170.2:80"))
    );

    let lint = std::process::Command::new("helm")
        .args(["lint", "--strict"])
        .arg(repo().join("deploy/helm/imds-agent"))
        .output()
        .expect("helm lint");
    assert!(
        lint.status.success(),
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
}

/// The metric families an expression names (ours: `imds_agent_*` and `process_*`), with the
/// sample suffixes a counter or a histogram adds taken off.
fn families_named(expression: &str) -> Vec<String> {
    expression
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("imds_agent_") || token.starts_with("process_"))
        .map(|token| {
            ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| token.strip_suffix(suffix))
                .unwrap_or(token)
                .to_owned()
        })
        .collect()
}

/// The Grafana dashboard and the alerts in the chart ask only for metrics the agent exposes
/// (a renamed metric would leave a panel or an alert silently empty), and the chart renders
/// both, with the dashboard's JSON intact.
#[test]
fn the_dashboard_and_the_alerts_name_metrics_the_agent_exposes() {
    // Every family with a sample: those that have none until an event get one here.
    let metrics = imds_agent::metrics::Metrics::default();
    metrics.request("allow", "", "other", 200);
    metrics.denial("p", "r");
    metrics.request_duration(0.001);
    metrics.upstream_latency(0.001);
    metrics.imdsv1_request("");
    metrics.watch_synced("pods", true);
    metrics.watch_error("pods");
    metrics.pods_known(1);
    metrics.policy_resources(1, 0);
    let exposed: Vec<String> = metrics
        .exposition()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(
        exposed.iter().any(|f| f == "imds_agent_requests"),
        "{exposed:?}"
    );

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/helm/imds-agent/dashboards/imds-agent.json"))
            .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(expressions.len() >= 10, "{expressions:?}");

    let Some(rendered) = helm_template(&[
        "monitoring.prometheusRule.enabled=true",
        "monitoring.dashboard.enabled=true",
    ]) else {
        return;
    };
    let rules = rendered
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .expect("the PrometheusRule");
    let alerts: Vec<&Value> = rules["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| {
            g["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .leak()
                .iter()
        })
        .collect();
    let names: Vec<&str> = alerts.iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(
        names,
        [
            "ImdsAgentNotReady",
            "ImdsAgentPolicyRejected",
            "ImdsAgentWatchNotSynced",
            "ImdsAgentRefusalsRising"
        ]
    );
    expressions.extend(
        alerts
            .iter()
            .filter_map(|r| r["expr"].as_str().map(str::to_owned)),
    );
    for expression in &expressions {
        for family in families_named(expression) {
            assert!(
                exposed.contains(&family),
                "{family} (in {expression}) is no metric the agent exposes: {exposed:?}"
            );
        }
    }
    let shipped = rendered
        .iter()
        .find(|o| o["metadata"]["name"] == "imds-agent-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(shipped["metadata"]["labels"]["grafana_dashboard"], "1");
    let carried: Value = serde_json::from_str(
        shipped["data"]["imds-agent.json"]
            .as_str()
            .expect("JSON text"),
    )
    .expect("the ConfigMap carries the dashboard as JSON");
    assert_eq!(carried, dashboard);
}
