//! `imds-agent policy explain`: the decision for one request from a described caller, and why.

use crate::{
    cli::ExplainArgs,
    identity::{Identity, pods::PodDirectory},
    policy::{CanonicalPath, PolicySet},
    run::format_policy_errors,
};

pub fn explain(args: &ExplainArgs) -> Result<String, String> {
    let set = PolicySet::load(&args.policy, args.unmatched)
        .map_err(|errors| format!("invalid policy:\n{}", format_policy_errors(&errors)))?;
    let pods = PodDirectory::default();
    if let Some(file) = &args.pods {
        pods.load_file(file)?;
    }
    let gid = args.gid.unwrap_or(args.uid);
    let cgroup = match (&args.cgroup, &args.pod) {
        (Some(cgroup), _) => cgroup.clone(),
        (None, Some(pod)) => pod_cgroup(&pods, pod)?,
        (None, None) => return Err("--cgroup or --pod is required".into()),
    };
    let mut identity = Identity::for_cgroup(&cgroup, args.uid, gid, &pods);
    identity.exe = args
        .exe
        .as_deref()
        .map(crate::identity::executable::Executable::assumed);
    let path =
        CanonicalPath::parse(&args.path).map_err(|e| format!("path {:?}: {e}", args.path))?;
    let method = args.method.to_ascii_uppercase();
    Ok(format!(
        "caller: cgroup {cgroup}, uid {}, gid {gid}{}\n{}",
        args.uid,
        identity
            .pod
            .as_ref()
            .map(|p| format!(", pod {}/{}", p.namespace, p.name))
            .unwrap_or_default(),
        set.explain(&identity, &method, &path)
    ))
}

/// The cgroup kubelet (systemd driver) gives a pod's container: NAMESPACE/NAME[/CONTAINER],
/// looked up in the pod metadata given.
pub(crate) fn pod_cgroup(pods: &PodDirectory, spec: &str) -> Result<String, String> {
    let mut parts = spec.splitn(3, '/');
    let (Some(namespace), Some(name)) = (parts.next(), parts.next()) else {
        return Err(format!("pod {spec:?}: expected NAMESPACE/NAME[/CONTAINER]"));
    };
    let pod = pods
        .find(namespace, name)
        .ok_or_else(|| format!("pod {spec:?}: not in the pod metadata given"))?;
    let mut cgroup = format!(
        "/kubepods.slice/kubepods-pod{}.slice",
        pod.uid.replace('-', "_")
    );
    if let Some(container) = parts.next() {
        let info = pod
            .containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| format!("pod {spec:?}: the pod has no container {container:?}"))?;
        let id = info.id.rsplit("://").next().unwrap_or(&info.id);
        cgroup.push_str(&format!("/cri-containerd-{id}.scope"));
    }
    Ok(cgroup)
}
