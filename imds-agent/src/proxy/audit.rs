//! The audit phase: every request, answered by the agent or by the metadata service, leaves
//! one audit line and is counted in the metrics, the status tally and the inventory; a denial
//! of a pod's request is also an event on the pod.

use std::{sync::Arc, time::Instant};

use http::StatusCode;

use super::{Filter, admit::Connection};
use crate::identity::Workload;

/// Where requests are reported: metrics, the status tally, the inventory, events on pods, and
/// the audit line (which names the node).
pub struct Sinks {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub tally: Arc<crate::tally::Tally>,
    /// Who reads what (`imds-agent report`).
    pub inventory: Arc<crate::inventory::Inventory>,
    /// The node, as audit lines name it.
    pub node: String,
    /// Events on pods for their denials (on Kubernetes).
    pub denial_events: Option<crate::kube::events::DenialEvents>,
}

/// One request in flight: who asked what, and since when.
pub struct Exchange<'a> {
    pub filter: &'a Filter,
    pub connection: &'a Connection,
    /// The client's method and path, as it sent them (empty when its head was malformed).
    pub method: &'a str,
    pub target: &'a str,
    /// The client's User-Agent, for the audit line.
    pub user_agent: &'a str,
    pub request_id: String,
    pub started: Instant,
    /// An AWS request without a session token (IMDSv1), for the inventory.
    pub tokenless: bool,
}

/// How a request ended.
pub struct Outcome<'a> {
    pub decision: &'static str,
    pub policy: &'a str,
    pub rule: &'a str,
    pub status: StatusCode,
    pub upstream_status: Option<StatusCode>,
    pub detail: &'a str,
}

/// A request id unique to this agent's life and across its restarts: the agent's start
/// (milliseconds since the epoch, hex) and a count.
pub fn next_request_id() -> String {
    use std::fmt::Write as _;
    // `{start:x}-`, formatted once.
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        format!("{start:x}-")
    });
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut id = String::with_capacity(prefix.len() + 20);
    id.push_str(prefix);
    let _ = write!(id, "{n}");
    id
}

/// One structured line per request: who, what, the decision and what made it, and the result.
pub fn record(exchange: &Exchange<'_>, outcome: &Outcome<'_>) {
    let Exchange {
        filter,
        connection,
        method,
        target,
        user_agent,
        request_id,
        started,
        tokenless,
    } = exchange;
    let (method, target, started, tokenless) = (*method, *target, *started, *tokenless);
    let id = &connection.identity;
    let namespace = id.pod.as_ref().map_or("", |p| p.namespace.as_str());
    let group = crate::metrics::group_of(target);
    filter
        .sinks
        .metrics
        .request(outcome.decision, namespace, group, outcome.status.as_u16());
    filter
        .sinks
        .metrics
        .request_duration(started.elapsed().as_secs_f64());
    let denied = outcome.decision == "deny";
    if denied {
        filter.sinks.metrics.denial(outcome.policy, outcome.rule);
        if let (Some(events), Some(pod)) = (&filter.sinks.denial_events, &id.pod) {
            events.denied(crate::kube::events::Denial {
                pod: pod.clone(),
                policy: outcome.policy.to_owned(),
                rule: outcome.rule.to_owned(),
                method: method.to_owned(),
                path: target.to_owned(),
            });
        }
    }
    if tokenless {
        filter.sinks.metrics.imdsv1_request(namespace);
    }
    filter.sinks.inventory.record(
        id,
        &crate::inventory::Use {
            method,
            path: target,
            group,
            denied,
            tokenless,
        },
    );
    filter.sinks.tally.record(outcome.decision);
    if denied {
        filter.sinks.tally.denied(crate::tally::Denial {
            time: crate::calendar::iso8601(std::time::SystemTime::now()),
            cgroup: id.cgroup.clone().unwrap_or_else(|| "?".into()),
            unit: id.unit.clone().unwrap_or_default(),
            uid: id.uid,
            comm: id.comm.clone().unwrap_or_else(|| "?".into()),
            method: method.to_owned(),
            path: target.to_owned(),
            policy: outcome.policy.to_owned(),
            rule: outcome.rule.to_owned(),
        });
    }
    let (pod_uid, container_id) = match &id.workload {
        Workload::Pod {
            pod_uid,
            container_id,
            ..
        } => (pod_uid.as_str(), container_id.as_deref().unwrap_or("")),
        _ => ("", ""),
    };
    crate::audit::Request {
        request_id,
        node: &filter.sinks.node,
        cgroup: id.cgroup.as_deref().unwrap_or("?"),
        cgroup_id: id.cgroup_id,
        unit: id.unit.as_deref().unwrap_or(""),
        namespace,
        pod: id.pod.as_ref().map_or("", |p| p.name.as_str()),
        pod_uid,
        service_account: id.pod.as_ref().map_or("", |p| p.service_account.as_str()),
        container: id.container.as_deref().unwrap_or(""),
        container_id,
        uid: id.uid,
        gid: id.gid,
        pid: id.pid,
        comm: id.comm.as_deref().unwrap_or("?"),
        exe: id.exe.as_ref().map_or("", |e| e.path.as_str()),
        exe_check: id.exe.as_ref().map_or("", |e| e.origin.as_str()),
        method,
        path: target,
        user_agent,
        decision: outcome.decision,
        policy: outcome.policy,
        rule: outcome.rule,
        status: outcome.status.as_u16(),
        upstream_status: outcome.upstream_status.map_or(0, |s| s.as_u16()),
        detail: outcome.detail,
        latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    }
    .log();
}
