//! Pod metadata by pod UID: namespace, name, labels, service account, containers. The cgroup
//! path names the pod UID and container id only; the rest comes from here. Filled from a
//! file (`--pods`, for hosts without an API server, tests and `policy explain`) or, on
//! Kubernetes, from the API server's watch of this node's pods.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub containers: Vec<ContainerInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerInfo {
    pub name: String,
    /// As in the pod status: `containerd://<id>`, `cri-o://<id>`, `docker://<id>` or bare.
    pub id: String,
}

fn default_service_account() -> String {
    "default".into()
}

impl PodInfo {
    /// The name of the container with this runtime id.
    pub fn container_name(&self, container_id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|c| c.id.rsplit("://").next() == Some(container_id))
            .map(|c| c.name.as_str())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsFile {
    pods: Vec<PodInfo>,
}

/// The current pods, swapped atomically as a whole (a node runs at most a few hundred pods:
/// a copy per change is cheap, and readers never wait).
#[derive(Debug, Default)]
pub struct PodDirectory {
    pods: ArcSwap<HashMap<String, Arc<PodInfo>>>,
    /// Serialises writers (the watch), so that no update is lost between load and store.
    writer: std::sync::Mutex<()>,
    /// Bumped on every change, for connections waiting for a pod the watch has not seen.
    changes: tokio::sync::watch::Sender<u64>,
}

impl PodDirectory {
    pub fn len(&self) -> usize {
        self.pods.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.load().is_empty()
    }

    /// Adds or replaces one pod; whether anything changed.
    pub fn upsert(&self, pod: PodInfo) -> bool {
        let _writer = self.writer.lock().expect("pod directory writer");
        let current = self.pods.load();
        if current.get(&pod.uid).is_some_and(|known| **known == pod) {
            return false;
        }
        let mut next = HashMap::clone(&current);
        next.insert(pod.uid.clone(), Arc::new(pod));
        self.pods.store(Arc::new(next));
        self.changes.send_modify(|v| *v += 1);
        true
    }

    /// Forgets a pod; whether it was known.
    pub fn remove(&self, uid: &str) -> bool {
        let _writer = self.writer.lock().expect("pod directory writer");
        let current = self.pods.load();
        if !current.contains_key(uid) {
            return false;
        }
        let mut next = HashMap::clone(&current);
        next.remove(uid);
        self.pods.store(Arc::new(next));
        self.changes.send_modify(|v| *v += 1);
        true
    }

    /// The pod, waiting up to `timeout` for it to appear (a connection from a pod that
    /// started before the watch reported it).
    pub async fn wait_for(&self, uid: &str, timeout: std::time::Duration) -> Option<Arc<PodInfo>> {
        let mut changes = self.changes.subscribe();
        let wait = async {
            loop {
                if let Some(pod) = self.get(uid) {
                    return pod;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// A number that changes with every change of the pods (for what is derived from them).
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.pods.load().get(uid).cloned()
    }

    pub fn find(&self, namespace: &str, name: &str) -> Option<Arc<PodInfo>> {
        self.pods
            .load()
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
            .cloned()
    }

    pub fn replace(&self, pods: impl IntoIterator<Item = PodInfo>) {
        let _writer = self.writer.lock().expect("pod directory writer");
        let map = pods
            .into_iter()
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        self.pods.store(Arc::new(map));
        self.changes.send_modify(|v| *v += 1);
    }

    /// Loads a pods file (`pods: [...]`, YAML or JSON).
    pub fn load_file(&self, path: &Path) -> Result<usize, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: PodsFile = serde_saphyr::from_str(&text).map_err(|e| {
            let at = e
                .location()
                .map_or(String::new(), |l| format!(":{}:{}", l.line(), l.column()));
            format!(
                "{}{at}: {}",
                path.display(),
                e.to_string().lines().next().unwrap_or("")
            )
        })?;
        let count = file.pods.len();
        self.replace(file.pods);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_by_runtime_id() {
        let pod = PodInfo {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            labels: BTreeMap::new(),
            service_account: "default".into(),
            containers: vec![
                ContainerInfo {
                    name: "app".into(),
                    id: "containerd://abc".into(),
                },
                ContainerInfo {
                    name: "sidecar".into(),
                    id: "def".into(),
                },
            ],
        };
        assert_eq!(pod.container_name("abc"), Some("app"));
        assert_eq!(pod.container_name("def"), Some("sidecar"));
        assert_eq!(pod.container_name("ab"), None);
    }
}
