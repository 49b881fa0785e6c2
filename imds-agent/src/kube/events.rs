//! Kubernetes Events on a pod for its denied metadata requests, so that `kubectl describe pod`
//! shows why a request failed. One event per pod, policy and rule per interval (the audit line
//! has every denial); published off the request path, and dropped rather than waited for
//! when the API server is slow.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::mpsc;

use crate::identity::pods::PodInfo;

/// How often one pod, policy and rule gets an event.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Denials waiting to be published before more are dropped.
const QUEUE: usize = 256;
/// The event's reason, as `kubectl describe` and field selectors show it.
pub const REASON: &str = "MetadataRequestDenied";

/// One denial, as the event describes it.
pub struct Denial {
    pub pod: Arc<PodInfo>,
    pub policy: String,
    pub rule: String,
    pub method: String,
    pub path: String,
}

/// The sending side; the publishing task runs until every sender is gone.
#[derive(Clone)]
pub struct DenialEvents {
    queue: mpsc::Sender<Denial>,
}

impl DenialEvents {
    /// Starts publishing, as the agent on `node`.
    pub fn start(client: Client, node: String) -> Self {
        let (queue, denials) = mpsc::channel(QUEUE);
        tokio::spawn(publish(client, node, denials));
        Self { queue }
    }

    /// Queues a denial for its pod's events; never waits.
    pub fn denied(&self, denial: Denial) {
        let _ = self.queue.try_send(denial);
    }
}

async fn publish(client: Client, node: String, mut denials: mpsc::Receiver<Denial>) {
    let mut last: HashMap<(String, String, String), Instant> = HashMap::new();
    while let Some(denial) = denials.recv().await {
        let now = Instant::now();
        last.retain(|_, at| now.duration_since(*at) < INTERVAL);
        let key = (
            denial.pod.uid.clone(),
            denial.policy.clone(),
            denial.rule.clone(),
        );
        if last.contains_key(&key) {
            continue;
        }
        last.insert(key, now);
        let event = event(&denial, &node);
        let api: Api<Event> = Api::namespaced(client.clone(), &denial.pod.namespace);
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            tracing::debug!(pod = %denial.pod.name, %error, "cannot publish a denial event");
        }
    }
}

/// The Event (events.k8s.io/v1) regarding the pod.
fn event(denial: &Denial, node: &str) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let pod = &denial.pod;
    Event {
        metadata: ObjectMeta {
            namespace: Some(pod.namespace.clone()),
            name: Some(format!("{}.{:x}", pod.name, now.as_nanosecond())),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(REASON.into()),
        action: Some("Deny".into()),
        note: Some(format!(
            "{} {} to the instance metadata service denied by policy '{}' rule '{}' \
             (imds-agent on {node}; further denials of this rule are in its audit log)",
            denial.method, denial.path, denial.policy, denial.rule
        )),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some("imds-agent.dev/agent".into()),
        reporting_instance: Some(format!("imds-agent-{node}")),
        ..Event::default()
    }
}
