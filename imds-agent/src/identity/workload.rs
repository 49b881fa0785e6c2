//! What a cgroup path says about the workload in it, for the layouts users run:
//!
//! - Kubernetes pods, systemd cgroup driver (kubelet's default with systemd):
//!   `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`
//!   (guaranteed pods have no qos level: `kubepods.slice/kubepods-pod<uid>.slice/...`);
//!   runtimes `cri-containerd`, `crio`, `docker`.
//! - Kubernetes pods, cgroupfs driver: `kubepods/<qos>/pod<uid>/<container-id>`
//!   (guaranteed: `kubepods/pod<uid>/<id>`); containerd names the leaf by the bare id, CRI-O
//!   `crio-<id>`, podman `libpod-<id>` (and `libpod-<id>.scope` under systemd).
//! - systemd units: `system.slice/<unit>.service`, user services under
//!   `user.slice/user-<uid>.slice/user@<uid>.service/...`, sessions `.../session-<n>.scope`.
//! - Anything else is a plain path.
//!
//! The kubepods tree may sit below other components (kind and k3s nest it), and a workload may
//! create child cgroups inside its container: both resolve to the same workload.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Workload {
    Pod {
        /// The pod UID with dashes, as the API server spells it.
        pod_uid: String,
        qos: Qos,
        /// The container's runtime id (64 hex digits), when the cgroup is a container's.
        container_id: Option<String>,
        /// The runtime's prefix of the leaf (`cri-containerd`, `crio`, `docker`, `libpod`), or
        /// `None` for a bare id (containerd under the cgroupfs driver).
        runtime: Option<String>,
    },
    /// A systemd unit (`nginx.service`, `session-3.scope`), with the user whose slice it is in
    /// for user services and sessions.
    Unit {
        name: String,
        user: Option<u32>,
    },
    Other,
}

/// Container runtimes' prefixes of a container's cgroup leaf: `<runtime>-<id>.scope` under the
/// systemd driver, `<runtime>-<id>` under cgroupfs (CRI-O, podman). Their monitors
/// (`crio-conmon-<id>`, `libpod-conmon-<id>`) are not containers: `crio-conmon` and
/// `libpod-conmon` are no runtime's prefix.
const RUNTIMES: [&str; 4] = ["cri-containerd", "crio", "docker", "libpod"];

pub fn parse(cgroup: &str) -> Workload {
    let components: Vec<&str> = cgroup.split('/').filter(|c| !c.is_empty()).collect();
    if let Some(pod) = parse_pod(&components) {
        return pod;
    }
    let unit = components
        .iter()
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"));
    match unit {
        Some(name) => Workload::Unit {
            name: (*name).to_owned(),
            user: components.iter().find_map(|c| {
                c.strip_prefix("user-")?
                    .strip_suffix(".slice")?
                    .parse()
                    .ok()
            }),
        },
        None => Workload::Other,
    }
}

fn parse_pod(components: &[&str]) -> Option<Workload> {
    let kubepods = components.iter().position(|c| {
        *c == "kubepods" || *c == "kubepods.slice" || c.ends_with("-kubepods.slice")
    })?;
    let below = &components[kubepods + 1..];
    let (index, pod_uid) = below
        .iter()
        .enumerate()
        .find_map(|(i, c)| pod_uid(c).map(|uid| (i, uid)))?;
    let qos = if below[..=index].iter().any(|c| c.contains("burstable")) {
        Qos::Burstable
    } else if below[..=index].iter().any(|c| c.contains("besteffort")) {
        Qos::BestEffort
    } else {
        Qos::Guaranteed
    };
    let (container_id, runtime) = below
        .get(index + 1)
        .and_then(|c| container(c))
        .map_or((None, None), |(id, runtime)| (Some(id), runtime));
    Some(Workload::Pod {
        pod_uid,
        qos,
        container_id,
        runtime,
    })
}

/// `kubepods-burstable-pod<uid_underscored>.slice` or `pod<uid>`.
fn pod_uid(component: &str) -> Option<String> {
    let uid = if let Some(slice) = component.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        uid.replace('_', "-")
    } else {
        component.strip_prefix("pod")?.to_owned()
    };
    is_uuid(&uid).then_some(uid)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// `<runtime>-<id>.scope` (systemd driver), `<runtime>-<id>` or `<id>` (cgroupfs driver).
fn container(component: &str) -> Option<(String, Option<String>)> {
    if is_container_id(component) {
        return Some((component.to_owned(), None));
    }
    let leaf = component.strip_suffix(".scope").unwrap_or(component);
    let (runtime, id) = leaf.rsplit_once('-')?;
    (RUNTIMES.contains(&runtime) && is_container_id(id))
        .then(|| (id.to_owned(), Some(runtime.to_owned())))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8f5c4d2e-1a2b-4c3d-9e8f-0123456789ab";
    const UID_: &str = "8f5c4d2e_1a2b_4c3d_9e8f_0123456789ab";
    const CID: &str = "3b1f0e9c2d8a7f6e5d4c3b2a19080706f5e4d3c2b1a09f8e7d6c5b4a39281706";

    fn pod(qos: Qos, container: bool, runtime: Option<&str>) -> Workload {
        Workload::Pod {
            pod_uid: UID.into(),
            qos,
            container_id: container.then(|| CID.into()),
            runtime: runtime.map(Into::into),
        }
    }

    fn unit(name: &str, user: Option<u32>) -> Workload {
        Workload::Unit {
            name: name.into(),
            user,
        }
    }

    #[test]
    fn real_world_cgroup_paths() {
        let table: Vec<(String, Workload)> = vec![
            // systemd driver, each QoS class and runtime
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(Qos::Burstable, true, Some("cri-containerd")),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
                ),
                pod(Qos::BestEffort, true, Some("crio")),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope"),
                pod(Qos::Guaranteed, true, Some("docker")),
            ),
            // the pod's own cgroup, and a child cgroup a container made for itself
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
                pod(Qos::Burstable, false, None),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/nested/deeper"
                ),
                pod(Qos::Guaranteed, true, Some("cri-containerd")),
            ),
            // cri-o's conmon is not a container
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope"),
                pod(Qos::Guaranteed, false, None),
            ),
            // cgroupfs driver
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                pod(Qos::Burstable, true, None),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{CID}"),
                pod(Qos::BestEffort, true, None),
            ),
            (
                format!("/kubepods/pod{UID}/{CID}"),
                pod(Qos::Guaranteed, true, None),
            ),
            (
                format!("/kubepods/pod{UID}"),
                pod(Qos::Guaranteed, false, None),
            ),
            // cgroupfs driver, runtimes that prefix the leaf: CRI-O and podman (and podman's
            // monitor, which is not a container)
            (
                format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
                pod(Qos::Burstable, true, Some("crio")),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/libpod-{CID}"),
                pod(Qos::BestEffort, true, Some("libpod")),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/libpod-{CID}/nested"),
                pod(Qos::BestEffort, true, Some("libpod")),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/libpod-conmon-{CID}"),
                pod(Qos::BestEffort, false, None),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/crio-conmon-{CID}"),
                pod(Qos::BestEffort, false, None),
            ),
            // podman under the systemd driver
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/libpod-{CID}.scope"
                ),
                pod(Qos::BestEffort, true, Some("libpod")),
            ),
            // a prefix that is no runtime's, and an id of the wrong length
            (
                format!("/kubepods/besteffort/pod{UID}/other-{CID}"),
                pod(Qos::BestEffort, false, None),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/libpod-{}", &CID[..63]),
                pod(Qos::BestEffort, false, None),
            ),
            // nested kubepods trees (kind nodes, k3s)
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(Qos::BestEffort, true, Some("cri-containerd")),
            ),
            (
                format!("/system.slice/k3s.service/kubepods/burstable/pod{UID}/{CID}"),
                pod(Qos::Burstable, true, None),
            ),
            // systemd units, user services and sessions
            (
                "/system.slice/nginx.service".into(),
                unit("nginx.service", None),
            ),
            (
                "/system.slice/system-getty.slice/getty@tty1.service".into(),
                unit("getty@tty1.service", None),
            ),
            (
                "/system.slice/docker.service/child".into(),
                unit("docker.service", None),
            ),
            (
                "/user.slice/user-1000.slice/session-3.scope".into(),
                unit("session-3.scope", Some(1000)),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox.service"
                    .into(),
                unit("app-firefox.service", Some(1000)),
            ),
            // plain paths, and names that only look like pods
            ("/".into(), Workload::Other),
            ("/web".into(), Workload::Other),
            ("/kubepods.slice".into(), Workload::Other),
            ("/kubepods/burstable/podnot-a-uid".into(), Workload::Other),
            (format!("/elsewhere/pod{UID}"), Workload::Other),
        ];
        for (path, expected) in table {
            assert_eq!(parse(&path), expected, "{path}");
        }
    }
}
