//! The watches: this node's pods (field selector `spec.nodeName`) into the pod directory, and
//! ImdsPolicies and ClusterImdsPolicies into the policy store, each policy validated on its
//! own and reported in its status.
//!
//! Failure: a watch that errors keeps the last known state in force and retries with
//! kube-runtime's backoff (exponential, capped); the metrics show each watch's state and
//! errors. A policy update that does not validate is reported (`Accepted=False`) and the
//! object's previously accepted version stays in force.
//!
//! Policies are watched as untyped objects and read one by one: a typed watch fails a whole
//! list page on one object it cannot deserialize, so one tenant's object (an ImdsPolicy is a
//! namespace admin's to write) would stop policy changes on every node and keep a new agent
//! from ever becoming ready. An object that cannot be read is reported like one that does not
//! validate, and nothing else waits on it. Untyped rather than kube's `DeserializeGuard`, so
//! that the object's own status (the condition already written) is read whatever its spec.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::crd::{ClusterImdsPolicy, ImdsPolicy};
use crate::{
    identity::pods::{ContainerInfo, PodDirectory, PodInfo},
    metrics::Metrics,
    policy::{Policy, PolicyDocument, compile_resource, store::PolicyStore},
};

/// Which watches have delivered their first complete list: the agent is ready (`/readyz`)
/// only then, so that no pod is started on a node whose agent does not know its policy.
#[derive(Debug, Default)]
pub struct Synced {
    pub pods: AtomicBool,
    pub namespaced_policies: AtomicBool,
    pub cluster_policies: AtomicBool,
}

impl Synced {
    pub fn all(&self) -> bool {
        self.pods.load(Ordering::Relaxed)
            && self.namespaced_policies.load(Ordering::Relaxed)
            && self.cluster_policies.load(Ordering::Relaxed)
    }
}

/// Everything the watches feed.
pub struct Watches {
    pub client: Client,
    pub node: String,
    pub pods: Arc<PodDirectory>,
    pub policy: Arc<PolicyStore>,
    pub metrics: Arc<Metrics>,
    pub synced: Arc<Synced>,
}

impl Watches {
    /// Runs the three watches until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let resources = Arc::new(ResourcePolicies::default());
        tokio::join!(
            self.clone().watch_pods(),
            self.clone().watch_policies::<ImdsPolicy>(resources.clone()),
            self.clone().watch_policies::<ClusterImdsPolicy>(resources),
        );
    }

    async fn watch_pods(self: Arc<Self>) {
        const RESOURCE: &str = "pods";
        let api: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut listed = Vec::new();
        while let Some(event) = events.next().await {
            let changed = match event {
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    false
                }
                Ok(watcher::Event::InitApply(pod)) => {
                    listed.extend(pod_info(&pod));
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    self.pods.replace(listed.drain(..));
                    self.synced.pods.store(true, Ordering::Relaxed);
                    self.metrics.watch_synced(RESOURCE, true);
                    tracing::info!(pods = self.pods.len(), node = %self.node, "pods listed");
                    true
                }
                Ok(watcher::Event::Apply(pod)) => {
                    pod_info(&pod).is_some_and(|p| self.pods.upsert(p))
                }
                Ok(watcher::Event::Delete(pod)) => pod
                    .metadata
                    .uid
                    .as_deref()
                    .is_some_and(|uid| self.pods.remove(uid)),
                Err(error) => {
                    self.watch_failed(RESOURCE, &error);
                    false
                }
            };
            if changed {
                self.metrics.pods_known(self.pods.len());
                // Selections and kernel verdicts were derived from the old pod metadata.
                self.policy.bump();
            }
        }
    }

    async fn watch_policies<K: PolicyResource>(self: Arc<Self>, resources: Arc<ResourcePolicies>) {
        let api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &ApiResource::erase::<K>(&()));
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listed = Vec::new();
        let mut listed_all = false;
        while let Some(event) = events.next().await {
            let reports = match event {
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    Vec::new()
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listed.push(object);
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    listed_all = true;
                    resources.relist::<K>(&listed)
                }
                Ok(watcher::Event::Apply(object)) => {
                    resources.apply::<K>(&object).into_iter().collect()
                }
                Ok(watcher::Event::Delete(object)) => {
                    resources.delete::<K>(&object);
                    Vec::new()
                }
                Err(error) => {
                    self.watch_failed(K::PLURAL, &error);
                    continue;
                }
            };
            let version = self.policy.set_resources(resources.accepted());
            let (accepted, rejected) = resources.counts();
            self.metrics.policy_resources(accepted, rejected);
            for report in reports {
                tracing::info!(
                    version,
                    resource = %report.source,
                    accepted = report.error.is_none(),
                    error = report.error.as_deref().unwrap_or(""),
                    "policy resource"
                );
                self.report::<K>(report).await;
            }
            if std::mem::take(&mut listed_all) {
                listed.clear();
                // In force and reported: ready as far as this kind goes.
                K::synced(&self.synced).store(true, Ordering::Relaxed);
                self.metrics.watch_synced(K::PLURAL, true);
            }
        }
    }

    fn watch_failed(&self, resource: &'static str, error: &watcher::Error) {
        tracing::warn!(
            resource,
            %error,
            "watch failed; the last known state stays in force, retrying with backoff"
        );
        self.metrics.watch_error(resource);
        self.metrics.watch_synced(resource, false);
    }

    /// Writes the `Accepted` condition. Every agent writes the same condition for the same
    /// generation (validation depends on the spec alone), so concurrent writers agree.
    async fn report<K: PolicyResource>(&self, report: Report) {
        let resource = ApiResource::erase::<K>(&());
        let api: Api<DynamicObject> = match report.namespace.as_deref() {
            Some(namespace) => Api::namespaced_with(self.client.clone(), namespace, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let (status, reason, message) = match &report.error {
            None => ("True", "Valid", "in force".to_owned()),
            Some(error) if report.previous_in_force => (
                "False",
                "Invalid",
                format!("{error}; the previously accepted version stays in force"),
            ),
            Some(error) => ("False", "Invalid", error.clone()),
        };
        let previous = report.previous_condition.as_ref();
        if previous.is_some_and(|c| {
            c.status == status && c.message == message && c.observed_generation == report.generation
        }) {
            // Another node's agent said the same already: one write per change, not per node.
            return;
        }
        // The transition time changes only when the status does.
        let since = previous.filter(|c| c.status == status).map_or_else(
            || k8s_openapi::jiff::Timestamp::now().to_string(),
            |c| c.last_transition_time.0.to_string(),
        );
        let patch = serde_json::json!({
            "status": {"conditions": [{
                "type": "Accepted",
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": report.generation,
                "lastTransitionTime": since,
            }]}
        });
        if let Err(error) = api
            .patch_status(&report.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(resource = %report.source, %error, "cannot update the policy's status");
        }
    }
}

/// The pod's metadata as policies use it; `None` without a uid, namespace or name.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let containers = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .chain(&s.init_container_statuses)
                .chain(&s.ephemeral_container_statuses)
                .flatten()
        })
        .filter_map(|c| {
            Some(ContainerInfo {
                name: c.name.clone(),
                id: c.container_id.clone()?,
            })
        })
        .collect();
    Some(PodInfo {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        labels: meta.labels.clone().unwrap_or_default(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        containers,
    })
}

/// An ImdsPolicy or ClusterImdsPolicy.
pub trait PolicyResource:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
    /// The resource's plural, which also prefixes its policies' names.
    const PLURAL: &'static str;
    /// Whether it governs the pods of its own namespace only.
    const NAMESPACED: bool;
    fn document(&self) -> &PolicyDocument;
    fn synced(synced: &Synced) -> &AtomicBool;
}

impl PolicyResource for ImdsPolicy {
    const PLURAL: &'static str = "imdspolicies";
    const NAMESPACED: bool = true;
    fn document(&self) -> &PolicyDocument {
        &self.spec.policy
    }
    fn synced(synced: &Synced) -> &AtomicBool {
        &synced.namespaced_policies
    }
}

impl PolicyResource for ClusterImdsPolicy {
    const PLURAL: &'static str = "clusterimdspolicies";
    const NAMESPACED: bool = false;
    fn document(&self) -> &PolicyDocument {
        &self.spec.policy
    }
    fn synced(synced: &Synced) -> &AtomicBool {
        &synced.cluster_policies
    }
}

/// Reads one watched object as `K`, or says why it cannot be read (a value out of what the
/// agent reads, a field of the wrong type): the reason a report gives.
fn read_object<K: PolicyResource>(object: &DynamicObject) -> Result<K, String> {
    let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| format!("cannot be read: {e}"))
}

/// The object's `Accepted` condition as it stands, whatever else its status holds.
fn accepted_condition(object: &DynamicObject) -> Option<Condition> {
    object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
}

/// The policy resources as validated, by (plural, namespace, name).
#[derive(Default)]
pub(super) struct ResourcePolicies {
    entries: Mutex<BTreeMap<(&'static str, String, String), Entry>>,
}

struct Entry {
    generation: Option<i64>,
    /// The last version that validated; stays in force while a later one does not.
    accepted: Option<Policy>,
    valid: bool,
}

/// What to write into one object's status.
pub(super) struct Report {
    pub(super) source: String,
    namespace: Option<String>,
    name: String,
    generation: Option<i64>,
    pub(super) error: Option<String>,
    previous_in_force: bool,
    /// The object's Accepted condition as it was.
    previous_condition: Option<Condition>,
}

impl ResourcePolicies {
    /// Validates a new or changed object. `None` when its spec did not change (a status
    /// update, or a resync): nothing to do, nothing to report.
    pub(super) fn apply<K: PolicyResource>(&self, object: &DynamicObject) -> Option<Report> {
        let namespace = object.namespace().filter(|_| K::NAMESPACED);
        let name = object.name_any();
        let generation = object.meta().generation;
        let key = (
            K::PLURAL,
            namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        let mut entries = self.entries.lock().expect("resource policies");
        if generation.is_some()
            && entries
                .get(&key)
                .is_some_and(|e| e.generation == generation)
        {
            return None;
        }
        // The name policies go by in denials and audit lines: never a file's (no '/').
        let source = match &namespace {
            Some(namespace) => format!("{}/{namespace}/{name}", K::PLURAL),
            None => format!("{}/{name}", K::PLURAL),
        };
        let result = read_object::<K>(object).and_then(|typed| {
            compile_resource(
                &PathBuf::from(&source),
                source.clone(),
                typed.document(),
                namespace.as_deref(),
            )
            .map_err(|errors| {
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        });
        let entry = entries.entry(key).or_insert(Entry {
            generation: None,
            accepted: None,
            valid: false,
        });
        entry.generation = generation;
        let error = match result {
            Ok(policy) => {
                entry.accepted = Some(policy);
                entry.valid = true;
                None
            }
            Err(error) => {
                entry.valid = false;
                Some(error)
            }
        };
        Some(Report {
            source,
            namespace,
            name,
            generation,
            error,
            previous_in_force: entry.accepted.is_some(),
            previous_condition: accepted_condition(object),
        })
    }

    /// A complete list of one kind (at start, or after the watch restarted): objects no
    /// longer listed are gone.
    pub(super) fn relist<K: PolicyResource>(&self, objects: &[DynamicObject]) -> Vec<Report> {
        {
            let mut entries = self.entries.lock().expect("resource policies");
            entries.retain(|(plural, namespace, name), _| {
                *plural != K::PLURAL
                    || objects.iter().any(|o| {
                        o.name_any() == *name
                            && o.namespace().filter(|_| K::NAMESPACED).unwrap_or_default()
                                == *namespace
                    })
            });
        }
        objects.iter().filter_map(|o| self.apply::<K>(o)).collect()
    }

    fn delete<K: PolicyResource>(&self, object: &DynamicObject) {
        let namespace = object
            .namespace()
            .filter(|_| K::NAMESPACED)
            .unwrap_or_default();
        self.entries.lock().expect("resource policies").remove(&(
            K::PLURAL,
            namespace,
            object.name_any(),
        ));
    }

    /// The policies in force, in a stable order.
    pub(super) fn accepted(&self) -> Vec<Policy> {
        self.entries
            .lock()
            .expect("resource policies")
            .values()
            .filter_map(|e| e.accepted.clone())
            .collect()
    }

    /// (valid, invalid) objects.
    fn counts(&self) -> (usize, usize) {
        let entries = self.entries.lock().expect("resource policies");
        let valid = entries.values().filter(|e| e.valid).count();
        (valid, entries.len() - valid)
    }
}
