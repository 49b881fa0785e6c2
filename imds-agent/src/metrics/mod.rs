//! Prometheus metrics and health endpoints (`--metrics-listen`): `/metrics`, `/healthz`,
//! `/readyz`. The agent serves them only once the programs are attached and the policy is
//! loaded, so readiness means enforcing.

use std::{
    convert::Infallible,
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
    /// The HTTP status the caller got.
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    /// As denials name it: a file's policy name, `imdspolicies/NS/NAME`, `(none)`.
    policy: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
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

/// Seconds from a request's arrival to its audit line. The top buckets hold GCP's
/// `wait_for_change` long polls (up to --long-poll-max-seconds, an hour by default), which
/// would otherwise all land in +Inf.
const DURATION_BUCKETS: [f64; 18] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
    300.0, 900.0, 3_600.0,
];

/// This build's revision, from git when it was built (build.rs), or `unknown`.
const REVISION: &str = match option_env!("IMDS_AGENT_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    denials: Family<DenialLabels, Counter>,
    request_seconds: Histogram,
    upstream_seconds: Histogram,
    reloads: Family<ResultLabels, Counter>,
    policy_version: Gauge,
    kernel: Family<ResultLabels, Counter>,
    process: ProcessMetrics,
    watch_synced: Family<WatchLabels, Gauge>,
    watch_errors: Family<WatchLabels, Counter>,
    pods_known: Gauge,
    policy_resources: Family<StateLabels, Gauge>,
    imdsv1: Family<NamespaceLabels, Counter>,
    shield: Family<ShieldLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShieldLabels {
    /// cache, coalesced, over-budget, upstream-429
    outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        // The process's own, under the names every exporter gives them (no prefix).
        let process = ProcessMetrics::register(&mut root);
        let registry = root.sub_registry_with_prefix("imds_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by decision, pod namespace, path group and HTTP status",
            requests.clone(),
        );
        let denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "denials",
            "Denied requests by the policy and rule that denied them",
            denials.clone(),
        );
        let request_seconds = Histogram::new(DURATION_BUCKETS);
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer's audit line, upstream included",
            request_seconds.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "1, labelled with the agent's version and the git revision it was built from",
            build.clone(),
        );
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                revision: REVISION,
            })
            .set(1);
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
        let kernel = Family::<ResultLabels, Counter>::default();
        registry.register(
            "kernel_connects",
            "Connects to metadata endpoints seen by the kernel programs, by result (diverted, passed, refused, bypassed); kept across agent restarts",
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
        let shield = Family::<ShieldLabels, Counter>::default();
        registry.register(
            "shield",
            "Requests the metadata service did not see (answered from the cache, or coalesced with an identical one in flight), requests over its limits the agent answered 429 (over-budget), and its own 429s (upstream-429)",
            shield.clone(),
        );
        // Series that exist from the start, so that rates and alerts see them before the first
        // event: every kernel result, reload result and shield outcome, at 0.
        for outcome in ["cache", "coalesced", "over-budget", "upstream-429"] {
            shield.get_or_create(&ShieldLabels { outcome }).inc_by(0);
        }
        for result in ["diverted", "passed", "refused", "bypassed"] {
            kernel
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .inc_by(0);
        }
        for result in ["ok", "rejected"] {
            reloads
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .inc_by(0);
        }
        Self {
            imdsv1,
            shield,
            registry: root,
            requests,
            denials,
            request_seconds,
            process,
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
    // Asked for every request, and callers ask a few paths over and over: the groups' patterns
    // are matched once per path and thread (the groups are built in, they never change).
    const KEPT: usize = 256;
    const LONGEST: usize = 256;
    thread_local! {
        static KNOWN: std::cell::RefCell<std::collections::HashMap<String, &'static str>> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }
    KNOWN.with_borrow_mut(|known| {
        if let Some(group) = known.get(path) {
            return *group;
        }
        let group = match CanonicalPath::parse(path) {
            Ok(parsed) => groups::all_compiled()
                .iter()
                .find(|group| group.paths.best_match(&parsed).is_some())
                .map_or("other", |group| group.name),
            Err(_) => "other",
        };
        // Bounded: at most KEPT paths of at most LONGEST bytes per thread, whatever callers send.
        if path.len() <= LONGEST {
            if known.len() >= KEPT {
                known.clear();
            }
            known.insert(path.to_owned(), group);
        }
        group
    })
}

impl Metrics {
    /// Counts a request; `group` is its path's ([`group_of`]), `code` the status answered.
    /// No allocation unless the caller is a pod (the namespace label).
    pub fn request(&self, decision: &'static str, namespace: &str, group: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                decision,
                namespace: namespace.to_owned(),
                group,
                code,
            })
            .inc();
    }

    /// Counts a denial by what denied it.
    pub fn denial(&self, policy: &str, rule: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                policy: policy.to_owned(),
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// A request's time from arrival to its audit line.
    pub fn request_duration(&self, seconds: f64) {
        self.request_seconds.observe(seconds);
    }

    /// Counts a request without a session token (IMDSv1, or Alibaba's token-less mode).
    pub fn imdsv1_request(&self, namespace: &str) {
        self.imdsv1
            .get_or_create(&NamespaceLabels {
                namespace: namespace.to_owned(),
            })
            .inc();
    }

    /// Counts a shield outcome (see `proxy::shield`).
    pub fn shield(&self, outcome: &'static str) {
        self.shield.get_or_create(&ShieldLabels { outcome }).inc();
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
                // The kernel's counts only grow (the maps are pinned); the counter follows.
                let counter = self.kernel.get_or_create(&ResultLabels {
                    result: name.into(),
                });
                counter.inc_by(value.saturating_sub(counter.get()));
            }
        }
        self.process.refresh();
        self.exposition()
    }

    /// The exposition as it stands, without reading the values taken at scrape time (a family
    /// is listed once it has a sample).
    pub fn exposition(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The agent's own process, read from /proc at scrape time.
struct ProcessMetrics {
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
    start_seconds: Gauge,
}

impl ProcessMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            cpu_seconds: Counter::default(),
            resident_bytes: Gauge::default(),
            open_fds: Gauge::default(),
            start_seconds: Gauge::default(),
        };
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            metrics.cpu_seconds.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size, in bytes",
            metrics.resident_bytes.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            metrics.open_fds.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            metrics.start_seconds.clone(),
        );
        metrics
    }

    fn refresh(&self) {
        let Ok(me) = procfs::process::Process::myself() else {
            return;
        };
        let ticks = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            self.cpu_seconds
                .inc_by((cpu - self.cpu_seconds.get()).max(0.0));
            let rss_bytes = stat.rss.saturating_mul(procfs::page_size());
            self.resident_bytes
                .set(i64::try_from(rss_bytes).unwrap_or(i64::MAX));
            if let Ok(boot) = procfs::boot_time_secs() {
                let started = boot + stat.starttime / procfs::ticks_per_second();
                self.start_seconds
                    .set(i64::try_from(started).unwrap_or(i64::MAX));
            }
        }
        if let Ok(fds) = me.fd_count() {
            self.open_fds.set(i64::try_from(fds).unwrap_or(i64::MAX));
        }
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
