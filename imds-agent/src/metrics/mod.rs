//! Prometheus metrics and health endpoints (`--metrics-listen`): `/metrics`, `/healthz`,
//! `/readyz`. The agent serves them only once the programs are attached and the policy is
//! loaded, so readiness means enforcing.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    loader::Enforcer,
    policy::{CanonicalPath, groups, store::PolicyStore},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// allow, deny, would-deny, reject, refuse, limit, overload
    pub decision: &'static str,
    /// The caller's pod namespace, or "" for callers that are not pods.
    pub namespace: String,
    /// The first named path group the path falls in (see `policy::groups`), or "other".
    pub group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    /// The caller's pod namespace, or "" for callers that are not pods.
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    /// pods, imdspolicies, clusterimdspolicies
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelLabels {
    counter: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_seconds: Histogram,
    reloads: Family<ResultLabels, Counter>,
    policy_version: Gauge,
    kernel: Family<KernelLabels, Gauge>,
    watch_synced: Family<WatchLabels, Gauge>,
    watch_errors: Family<WatchLabels, Counter>,
    pods_known: Gauge,
    policy_resources: Family<StateLabels, Gauge>,
    imdsv1: Family<NamespaceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("imds_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by decision, pod namespace and path group",
            requests.clone(),
        );
        // 50 us .. ~1.6 s
        let upstream_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "upstream_seconds",
            "Time from forwarding a request to the metadata service's response headers",
            upstream_seconds.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by result (ok, rejected)",
            reloads.clone(),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "Version of the policy in force",
            policy_version.clone(),
        );
        let kernel = Family::<KernelLabels, Gauge>::default();
        registry.register(
            "kernel_connects",
            "Connects to metadata endpoints seen by the kernel programs (diverted, passed, refused, bypassed)",
            kernel.clone(),
        );
        let watch_synced = Family::<WatchLabels, Gauge>::default();
        registry.register(
            "watch_synced",
            "1 while a Kubernetes watch is listed and streaming, 0 while it fails (the last known state stays in force)",
            watch_synced.clone(),
        );
        let watch_errors = Family::<WatchLabels, Counter>::default();
        registry.register(
            "watch_errors",
            "Kubernetes watch failures (each followed by a retry with backoff)",
            watch_errors.clone(),
        );
        let pods_known = Gauge::default();
        registry.register(
            "pods_known",
            "Pods on this node known from the API server (the identity cache)",
            pods_known.clone(),
        );
        let policy_resources = Family::<StateLabels, Gauge>::default();
        registry.register(
            "policy_resources",
            "ImdsPolicy and ClusterImdsPolicy objects by state (valid, invalid)",
            policy_resources.clone(),
        );
        let imdsv1 = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "imdsv1_requests",
            "Requests without a session token (AWS IMDSv1, Alibaba token-less), by pod namespace; imds-agent report names the workloads",
            imdsv1.clone(),
        );
        Self {
            imdsv1,
            registry,
            requests,
            upstream_seconds,
            reloads,
            policy_version,
            kernel,
            watch_synced,
            watch_errors,
            pods_known,
            policy_resources,
        }
    }
}

/// The first group whose patterns match `path`, for the `group` label.
pub fn group_of(path: &str) -> &'static str {
    let Ok(path) = CanonicalPath::parse(path) else {
        return "other";
    };
    groups::all_compiled()
        .iter()
        .find(|(_, patterns)| patterns.best_match(&path).is_some())
        .map_or("other", |(name, _)| name)
}

impl Metrics {
    /// Counts a request; `group` is its path's ([`group_of`]). No allocation unless the
    /// caller is a pod (the namespace label).
    pub fn request(&self, decision: &'static str, namespace: &str, group: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                decision,
                namespace: namespace.to_owned(),
                group,
            })
            .inc();
    }

    /// Counts a request without a session token (IMDSv1, or Alibaba's token-less mode).
    pub fn imdsv1_request(&self, namespace: &str) {
        self.imdsv1
            .get_or_create(&NamespaceLabels {
                namespace: namespace.to_owned(),
            })
            .inc();
    }

    pub fn upstream_latency(&self, seconds: f64) {
        self.upstream_seconds.observe(seconds);
    }

    pub fn watch_synced(&self, resource: &'static str, synced: bool) {
        self.watch_synced
            .get_or_create(&WatchLabels { resource })
            .set(i64::from(synced));
    }

    pub fn watch_error(&self, resource: &'static str) {
        self.watch_errors
            .get_or_create(&WatchLabels { resource })
            .inc();
    }

    pub fn pods_known(&self, count: usize) {
        self.pods_known
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn policy_resources(&self, valid: usize, invalid: usize) {
        for (state, count) in [("valid", valid), ("invalid", invalid)] {
            self.policy_resources
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition, with the values read at scrape time refreshed.
    pub fn render(&self, policy: &PolicyStore, enforcer: &Enforcer) -> String {
        self.policy_version
            .set(i64::try_from(policy.current().version).unwrap_or(i64::MAX));
        let set_result = |result: &str, value: u64| {
            let counter = self.reloads.get_or_create(&ResultLabels {
                result: result.into(),
            });
            let seen = counter.get();
            counter.inc_by(value.saturating_sub(seen));
        };
        set_result("ok", policy.reloads.load(Ordering::Relaxed));
        set_result("rejected", policy.reload_failures.load(Ordering::Relaxed));
        if let Ok(counters) = enforcer.counters() {
            for (name, value) in [
                ("diverted", counters.diverted),
                ("passed", counters.passed),
                ("refused", counters.refused),
                ("bypassed", counters.bypassed),
            ] {
                self.kernel
                    .get_or_create(&KernelLabels {
                        counter: name.into(),
                    })
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Whether the agent is ready beyond being attached (on Kubernetes: the watches have listed).
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves the endpoints until the task is dropped. `/healthz`: the agent serves (it is
/// attached; a failing watch does not make it unhealthy, as restarting would not help).
/// `/readyz`: also `ready()`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    policy: Arc<PolicyStore>,
    enforcer: Arc<Enforcer>,
    ready: Readiness,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, policy, enforcer, ready) = (
            metrics.clone(),
            policy.clone(),
            enforcer.clone(),
            ready.clone(),
        );
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = match request.uri().path() {
                    "/metrics" => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.render(&policy, &enforcer),
                    ),
                    "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                    "/readyz" if ready() => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                    "/readyz" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: waiting for the first list of pods and policies\n".to_owned(),
                    ),
                    _ => (
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        "not found\n".to_owned(),
                    ),
                };
                async move {
                    let (status, content_type, body) = response;
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(content_type),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics listener (before anything is attached, so a bad address is a config
/// error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_labelled_with_their_group() {
        assert_eq!(
            group_of("/latest/meta-data/iam/security-credentials/r"),
            "credentials"
        );
        assert_eq!(group_of("/latest/user-data"), "user-data");
        assert_eq!(group_of("/latest/meta-data/instance-id"), "instance-info");
        assert_eq!(group_of("/latest/api/token"), "token");
        assert_eq!(group_of("/something/else"), "other");
    }
}
