//! The HTTP filter: serves connections the kernel diverted, one caller per connection.
//!
//! Per connection: look up the kernel's record by the client's address (no record: refused),
//! resolve the identity, select the governing policy once. Per request: validate, decide
//! (a pure function of request, identity and policy), then either answer 403 naming the policy
//! and rule, or forward a request rebuilt from what was parsed to the endpoint the caller asked
//! for, over an upstream connection that this client connection uses alone and that only ever
//! serves this caller (`pool`: idle ones are kept per cgroup, uid and gid).

pub mod gate;
pub mod limits;
pub mod pool;
pub mod request;
pub mod tokens;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use imds_common::{AF_INET, AF_INET6, Caller, VERDICT_BYPASS, VERDICT_REFUSE, VerdictKey};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Mutex,
};

use crate::{
    identity::{Identity, Resolver},
    loader::Enforcer,
    metrics::Metrics,
    policy::{Action, KernelVerdict, Selection, store::PolicyStore, store::Versioned},
    provider::SessionTokens,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long connecting to the metadata service may take.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A listing larger than this is refused (502) rather than passed unfiltered, so that no
/// listing can carry a name the caller may not see.
const MAX_LISTING_BYTES: usize = 1 << 20;

/// Everything the filter needs, shared by all connections.
pub struct Filter {
    pub enforcer: Arc<Enforcer>,
    pub resolver: Resolver,
    pub policy: Arc<PolicyStore>,
    pub metrics: Arc<Metrics>,
    pub timeouts: gate::Timeouts,
    pub limits: Arc<limits::Limits>,
    pub upstream: UpstreamTimeouts,
    pub tally: Arc<crate::status::Tally>,
    pub selections: SelectionCache,
    /// The diverted endpoints, for the interface of link-local ones.
    pub endpoints: Vec<SocketAddr>,
    /// How long a connection from a pod not yet known waits for the pod watch (zero without
    /// one).
    pub unknown_pod_wait: Duration,
    /// Idle upstream connections, per caller.
    pub pool: Arc<pool::UpstreamPool>,
    /// The cloud: its request rules apply before any policy, and where its metadata service
    /// has session tokens, the token rules (per-policy requirements, binding).
    pub provider: crate::provider::Provider,
    /// Whether deny responses carry the `imds-agent-explain` header.
    pub explain_denials: bool,
    /// Whether tokens are bound to the caller they were handed out to.
    pub token_binding: bool,
    pub tokens: Arc<tokens::TokenBindings>,
    /// Who reads what (`imds-agent report`).
    pub inventory: Arc<crate::inventory::Inventory>,
    /// The node, as audit lines name it.
    pub node: String,
    /// Events on pods for their denials (on Kubernetes).
    pub denial_events: Option<crate::kube::events::DenialEvents>,
}

/// A request id unique to this agent's life and across its restarts: the agent's start
/// (milliseconds since the epoch, hex) and a count.
fn next_request_id() -> String {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    });
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{start:x}-{n}")
}

/// The header that carries the request id on the agent's own answers.
const REQUEST_ID_HEADER: &str = "imds-agent-request-id";

/// Which policies select a caller, shared across its connections: SDKs open a connection per
/// request, and selecting scans every loaded policy. Keyed by what selection depends on (the
/// kernel-attested cgroup, uid and gid, and the executable); valid for one policy version.
/// Pod metadata is loaded once at start today; when it can change (the API watch), a change
/// must clear this cache as a policy change does.
#[derive(Default)]
pub struct SelectionCache {
    entries: std::sync::Mutex<std::collections::HashMap<SelectionKey, (u64, Arc<Selection>)>>,
}

/// The executable with what was checked of it: the same path running another file (mounted
/// over it, or another content) is another caller.
type SelectionKey = (
    u64,
    u32,
    u32,
    Option<crate::identity::executable::Executable>,
);

/// Entries kept before the cache starts over (a cheap bound; a miss only costs a scan).
const SELECTION_CACHE_MAX: usize = 8192;

impl SelectionCache {
    pub fn get(&self, identity: &Identity, policy: &Versioned) -> Arc<Selection> {
        let key = (
            identity.cgroup_id,
            identity.uid,
            identity.gid,
            identity.exe.clone(),
        );
        if let Some((version, selection)) = self.entries.lock().expect("selection cache").get(&key)
            && *version == policy.version
        {
            return selection.clone();
        }
        let selection = Arc::new(policy.set.select(identity));
        let mut entries = self.entries.lock().expect("selection cache");
        if entries.len() >= SELECTION_CACHE_MAX {
            entries.clear();
        }
        entries.insert(key, (policy.version, selection.clone()));
        selection
    }
}

/// How long to wait for the metadata service's response headers.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    /// Ordinary requests.
    pub request: Duration,
    /// Upper bound for GCP `wait_for_change` long-polls, which may legitimately hang for
    /// their `timeout_sec` (or, without one, until the value changes).
    pub long_poll: Duration,
}

impl UpstreamTimeouts {
    /// The bound for one request: a long-poll gets its `timeout_sec` plus slack, within the
    /// long-poll cap; everything else the ordinary bound.
    pub fn for_query(&self, query: Option<&str>) -> Duration {
        let params = || query.into_iter().flat_map(|q| q.split('&'));
        if !params().any(|p| p == "wait_for_change=true") {
            return self.request;
        }
        params()
            .find_map(|p| p.strip_prefix("timeout_sec=")?.parse::<u64>().ok())
            .map_or(self.long_poll, |secs| {
                (Duration::from_secs(secs) + self.request).min(self.long_poll)
            })
    }
}

/// One accepted, attributed client connection.
struct Connection {
    identity: Identity,
    /// Which policies select this caller, for the policy version it was computed with.
    selection: std::sync::Mutex<(u64, Arc<Selection>)>,
    /// Where the caller was going before the kernel diverted it.
    original: SocketAddr,
    /// Taken from the caller's idle connections or created on the first allowed request;
    /// used by this client connection alone, then returned to the caller's idle connections.
    upstream: Mutex<Option<SendRequest<Empty<Bytes>>>>,
    pool: Arc<pool::UpstreamPool>,
    pool_key: pool::PoolKey,
}

impl Connection {
    /// Whose tokens this connection's requests may present.
    fn token_owner(&self) -> tokens::Owner {
        (
            self.pool_key.cgroup_id,
            self.pool_key.uid,
            self.pool_key.gid,
        )
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(sender) = self.upstream.get_mut().take() {
            self.pool.put(self.pool_key, sender);
        }
    }
}

/// Accepts connections on every listener (loopback, and the node address for pods) until
/// `shutdown` resolves, then lets in-flight requests finish for at most `drain`.
pub async fn serve(
    listeners: Vec<TcpListener>,
    filter: Arc<Filter>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(
        filter.limits.config().max_connections,
    ));
    tokio::pin!(shutdown);
    let mut turn = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_any(&listeners, &mut turn) => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = connections.clone().try_acquire_owned() else {
                        filter.metrics.request("overload", "", "other", 503);
                        tokio::spawn(refuse(stream, peer, "503 Service Unavailable", "imds-agent: overloaded, try again later\n", "overload"));
                        continue;
                    };
                    let filter = filter.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let Some(connection) = attribute(&filter, &stream, peer).await else {
                            filter.metrics.request("refuse", "", "other", 403);
                            refuse_unrecorded(stream, peer).await;
                            return;
                        };
                        let connection = Arc::new(connection);
                        let filter_timeouts = filter.timeouts;
                        let service = service_fn(move |request| {
                            let (filter, connection) = (filter.clone(), connection.clone());
                            async move { Ok::<_, Infallible>(handle(&filter, &connection, request).await) }
                        });
                        // Every request head passes the strict gate before hyper sees it;
                        // the gate enforces the head and idle timeouts.
                        let gated = gate::Gate::new(stream, filter_timeouts);
                        // half_close: after a rejection the gate reads as EOF; hyper must still
                        // answer the request in hand instead of dropping the connection.
                        let conn = hyper::server::conn::http1::Builder::new()
                            .half_close(true)
                            .serve_connection(TokioIo::new(gated), service);
                        if let Err(error) = watcher.watch(conn).await {
                            tracing::debug!(%peer, %error, "client connection ended with an error");
                        }
                        drop(slot);
                    });
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listeners);
    tracing::info!("stopped accepting; draining in-flight requests");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain timed out; closing remaining connections");
    }
}

/// The next connection from whichever listener has one; the listener asked first rotates,
/// so that a busy one cannot starve the others.
async fn accept_any(
    listeners: &[TcpListener],
    turn: &mut usize,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    *turn = turn.wrapping_add(1);
    let first = *turn;
    std::future::poll_fn(|cx| {
        for i in 0..listeners.len() {
            let listener = &listeners[(first + i) % listeners.len()];
            if let std::task::Poll::Ready(accepted) = listener.poll_accept(cx) {
                return std::task::Poll::Ready(accepted);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn attribute(filter: &Filter, stream: &TcpStream, peer: SocketAddr) -> Option<Connection> {
    // The listener is IPv4; connect6 diverts to its v4-mapped address, so a peer that arrives
    // over IPv6 was not diverted by the kernel.
    if peer.is_ipv6() {
        return None;
    }
    let caller: Caller = filter.enforcer.caller(stream, peer)?;
    let policy = filter.policy.current();
    filter.resolver.want_digests(policy.set.pins_digests());
    let mut identity = filter.resolver.identify(&caller);
    if let crate::identity::Workload::Pod { pod_uid, .. } = &identity.workload
        && identity.pod.is_none()
        && !filter.unknown_pod_wait.is_zero()
    {
        // Started before the watch reported it: wait for it, within bounds. After that the
        // caller has no pod metadata, so no namespace's or pod's policy can select it.
        if filter
            .resolver
            .pods()
            .wait_for(pod_uid, filter.unknown_pod_wait)
            .await
            .is_some()
        {
            identity = filter.resolver.identify(&caller);
        } else {
            tracing::warn!(pod_uid = %pod_uid, wait = ?filter.unknown_pod_wait, "a pod the API server has not reported: deciding without pod metadata");
        }
    }
    let selection = filter.selections.get(&identity, &policy);
    if let Some(verdict) = policy.set.kernel_verdict(&selection, &identity) {
        install_verdict(filter, &caller, verdict, policy.version);
    }
    let original =
        crate::provider::upstream_address(original_destination(&caller)?, &filter.endpoints);
    Some(Connection {
        identity,
        selection: std::sync::Mutex::new((policy.version, selection)),
        original,
        upstream: Mutex::new(None),
        pool: filter.pool.clone(),
        pool_key: pool::PoolKey {
            cgroup_id: caller.cgroup_id,
            uid: caller.uid,
            gid: caller.gid,
            upstream: original,
        },
    })
}

/// `--explain-denials`: why a request was denied, every policy's part in one line.
const EXPLAIN_HEADER: &str = "imds-agent-explain";

/// The explanation's lines joined by "; ", limited to visible ASCII and 4 KiB.
fn explain_header(explanation: &str) -> Option<HeaderValue> {
    let mut line: String = explanation
        .lines()
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    line.truncate(4096);
    HeaderValue::from_str(&line).ok()
}

/// The policy name in denials by token binding (not a policy file's decision).
pub const TOKEN_BINDING_POLICY: &str = "(token binding)";

/// The longest session-token lifetime (AWS and Alibaba: 6 hours): how long a token is bound
/// when neither the request nor the response states its lifetime.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(21_600);

/// A token request asking for a longer lifetime than the caller may have asks for the cap.
fn cap_token_ttl(session: &SessionTokens, headers: &mut http::HeaderMap, max: u32) {
    if session.ttl(headers).is_some_and(|ttl| ttl > u64::from(max)) {
        headers.insert(session.ttl_header, HeaderValue::from(max));
    }
}

/// Why this request's token (or its absence) is refused, as (policy, rule); `None` if not.
fn token_refusal<'a>(
    filter: &Filter,
    session: &SessionTokens,
    connection: &Connection,
    valid: &request::ValidRequest,
    rules: &crate::policy::TokenRules<'a>,
) -> Option<(&'a str, &'static str)> {
    if session.is_token_request(&valid.method, &valid.path) {
        return None;
    }
    let Some(token) = valid.headers.get(session.token_header) else {
        return rules.required_by.map(|policy| (policy, "tokens-required"));
    };
    if !filter.token_binding {
        return None;
    }
    match filter
        .tokens
        .holder(token.as_bytes(), connection.token_owner())
    {
        tokens::Holder::Owner => None,
        tokens::Holder::Other => Some((TOKEN_BINDING_POLICY, "token-of-another-caller")),
        tokens::Holder::Unknown => Some((TOKEN_BINDING_POLICY, "token-not-issued-to-caller")),
    }
}

/// Records the token in a successful token response as this caller's, for its lifetime: the
/// one the response states (AWS echoes it), else the one asked for, else the longest.
async fn bind_token(
    filter: &Filter,
    session: &SessionTokens,
    connection: &Connection,
    requested_ttl: Option<u64>,
    response: Response<Body>,
) -> Result<Response<Body>, &'static str> {
    if response.status() != StatusCode::OK {
        return Ok(response);
    }
    let ttl = session
        .ttl(response.headers())
        .or(requested_ttl)
        .map_or(MAX_TOKEN_TTL, Duration::from_secs)
        .min(MAX_TOKEN_TTL);
    let (parts, body) = response.into_parts();
    // A token is about 60 bytes; anything much larger is not a token response.
    let limited = http_body_util::Limited::new(body, 4096);
    let bytes = limited
        .collect()
        .await
        .map_err(|_| "token response unreadable")?
        .to_bytes();
    filter
        .tokens
        .bind(bytes.trim_ascii(), connection.token_owner(), ttl);
    Ok(Response::from_parts(
        parts,
        Full::new(bytes).map_err(|never| match never {}).boxed(),
    ))
}

/// Lets the kernel decide this caller's next connects. This connection is still served (the
/// caller sees the 403 once, with the policy's name); later ones fail at connect().
fn install_verdict(filter: &Filter, caller: &Caller, verdict: KernelVerdict, version: u64) {
    let key = VerdictKey {
        cgroup_id: caller.cgroup_id,
        uid: caller.uid,
        gid: caller.gid,
    };
    let value = match verdict {
        KernelVerdict::Refuse => VERDICT_REFUSE,
        KernelVerdict::Bypass => VERDICT_BYPASS,
    };
    if let Err(error) = filter.enforcer.set_verdict(key, value) {
        tracing::warn!(%error, "cannot install a kernel verdict; the agent keeps deciding");
        return;
    }
    // A reload between deciding and installing would leave a stale verdict: start over.
    if filter.policy.current().version != version {
        filter.enforcer.clear_verdicts();
    }
}

impl Connection {
    /// The selection for `policy`, recomputed only when the policy version changed since the
    /// last request on this connection: each request is decided by the policy in force when
    /// it arrives, while the per-request cost stays independent of how many policies exist.
    fn selection(&self, filter: &Filter, policy: &Versioned) -> Arc<Selection> {
        let mut cached = self.selection.lock().expect("selection lock");
        if cached.0 != policy.version {
            *cached = (
                policy.version,
                filter.selections.get(&self.identity, policy),
            );
        }
        cached.1.clone()
    }
}

fn original_destination(caller: &Caller) -> Option<SocketAddr> {
    let original = &caller.original;
    match original.family {
        AF_INET => {
            let ip = std::net::Ipv4Addr::from(original.addr[0].to_ne_bytes());
            Some(SocketAddr::from((ip, original.port)))
        }
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(original.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(SocketAddr::from((
                std::net::Ipv6Addr::from(octets),
                original.port,
            )))
        }
        _ => None,
    }
}

/// A connection the kernel did not divert reached the listener: someone connected to it
/// directly. It is answered with a fixed 403 and closed.
async fn refuse_unrecorded(stream: TcpStream, peer: SocketAddr) {
    refuse(
        stream,
        peer,
        "403 Forbidden",
        "imds-agent: refused: this connection was not diverted by the kernel\n",
        "not-diverted",
    )
    .await;
}

/// Answers a connection with a fixed response, without reading it, and closes it.
async fn refuse(mut stream: TcpStream, peer: SocketAddr, status: &str, body: &str, reason: &str) {
    tracing::info!(
        target: crate::audit::TARGET,
        %peer,
        decision = "refuse",
        reason,
        "connection refused"
    );
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// One request in flight: who asked what, and since when; audits and answers it.
struct Exchange<'a> {
    filter: &'a Filter,
    connection: &'a Connection,
    method: String,
    target: String,
    /// The client's User-Agent, for the audit line.
    user_agent: String,
    request_id: String,
    started: Instant,
    /// An AWS request without a session token (IMDSv1), for the inventory.
    tokenless: bool,
}

impl Exchange<'_> {
    fn audit(&self, outcome: Outcome<'_>) {
        audit(self, outcome);
    }

    /// Audits an answer the agent gives itself, then gives it: fixed text, never request bytes.
    fn answer(&self, outcome: Outcome<'_>, body: String) -> Response<Body> {
        let status = outcome.status;
        self.audit(outcome);
        let mut response = own_answer(self.filter.provider, status, body);
        if let Ok(id) = HeaderValue::from_str(&self.request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, id);
        }
        response
    }
}

impl<'a> Outcome<'a> {
    /// An answer that no policy made (limits, malformed requests).
    fn refused(decision: &'static str, status: StatusCode, detail: &'a str) -> Self {
        Self {
            decision,
            policy: "",
            rule: "",
            status,
            upstream_status: None,
            detail,
        }
    }
}

async fn handle(
    filter: &Filter,
    connection: &Connection,
    request: Request<Incoming>,
) -> Response<Body> {
    let mut exchange = Exchange {
        filter,
        connection,
        method: request.method().as_str().to_owned(),
        target: request.uri().path().to_owned(),
        user_agent: request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        request_id: next_request_id(),
        started: Instant::now(),
        tokenless: false,
    };
    let key = (connection.identity.cgroup_id, connection.identity.uid);
    let _permit = match filter.limits.admit(key, exchange.started) {
        Ok(permit) => permit,
        Err(refusal) => {
            let reason = match refusal {
                limits::Refusal::TooManyInFlight => "too many requests in flight from this caller",
                limits::Refusal::RateExceeded => "request rate exceeded for this caller",
            };
            let status = StatusCode::TOO_MANY_REQUESTS;
            let mut response = exchange.answer(
                Outcome::refused("limit", status, reason),
                format!("imds-agent: {reason}\n"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
    };
    if exchange.method == gate::REJECT_METHOD {
        // The gate found the request head malformed and said why in the target. The client's
        // method and path are unknown (the head was malformed): the audit line has neither.
        let violation = gate::violation_from_target(&exchange.target);
        let exchange = Exchange {
            method: String::new(),
            target: String::new(),
            ..exchange
        };
        let mut response = exchange.answer(
            Outcome::refused("reject", violation.status, violation.reason),
            format!("imds-agent: bad request: {}\n", violation.reason),
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let mut valid = match request::validate(&request) {
        Ok(valid) => valid,
        Err(rejection) => {
            let detail = rejection.detail.as_deref().unwrap_or(rejection.reason);
            return exchange.answer(
                Outcome::refused("reject", rejection.status, detail),
                format!("imds-agent: bad request: {}\n", rejection.reason),
            );
        }
    };
    if let Err(refusal) = filter.provider.check_request(&valid.path, &valid.headers) {
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
        return exchange.answer(
            Outcome::refused("reject", status, refusal.reason),
            format!("imds-agent: {}\n", refusal.reason),
        );
    }
    let session = filter.provider.session_tokens();
    let token_request = session.is_some_and(|s| s.is_token_request(&valid.method, &valid.path));
    exchange.tokenless =
        session.is_some_and(|s| !token_request && !valid.headers.contains_key(s.token_header));
    let policy = filter.policy.current();
    let selection = connection.selection(filter, &policy);
    let decision = if valid.is_recursive() {
        policy.set.decide_subtree(
            &selection,
            &connection.identity,
            valid.method.as_str(),
            &valid.canonical_path(),
        )
    } else {
        policy.set.decide(
            &selection,
            &connection.identity,
            valid.method.as_str(),
            &valid.canonical_path(),
        )
    };
    if decision.action == Action::Deny {
        let outcome = Outcome {
            decision: "deny",
            policy: decision.policy,
            rule: decision.rule,
            ..Outcome::refused("deny", StatusCode::FORBIDDEN, "")
        };
        // Names from the policy file only; nothing from the request is reflected.
        let body = format!(
            "imds-agent: denied by policy '{}' rule '{}'\n",
            decision.policy, decision.rule
        );
        let mut response = exchange.answer(outcome, body);
        if filter.explain_denials {
            let mut explanation = policy.set.explain(
                &connection.identity,
                valid.method.as_str(),
                &valid.canonical_path(),
            );
            if valid.is_recursive() {
                // The explanation is the path's; the subtree decided.
                explanation = format!(
                    "recursive read: deny by policy '{}' rule '{}' (it denies part of the \
                     subtree); the path itself: {explanation}",
                    decision.policy, decision.rule
                );
            }
            if let Some(value) = explain_header(&explanation) {
                response.headers_mut().insert(EXPLAIN_HEADER, value);
            }
        }
        return response;
    }
    let mut would_deny = decision.would_deny;
    let mut requested_ttl = None;
    if let Some(session) = &session {
        let rules = policy.set.token_rules(&selection);
        if token_request {
            if let Some(max) = rules.max_ttl {
                cap_token_ttl(session, &mut valid.headers, max.0);
            }
            requested_ttl = session.ttl(&valid.headers);
        }
        if let Some((policy_name, rule)) =
            token_refusal(filter, session, connection, &valid, &rules)
        {
            if !policy.set.dry_run() {
                let outcome = Outcome {
                    decision: "deny",
                    policy: policy_name,
                    rule,
                    ..Outcome::refused("deny", StatusCode::UNAUTHORIZED, "")
                };
                // As the metadata service answers a missing or invalid token: SDKs fetch a
                // (new) token and retry.
                let body = format!(
                    "imds-agent: session token refused by policy '{policy_name}' rule '{rule}'\n"
                );
                return exchange.answer(outcome, body);
            }
            would_deny = would_deny.or(Some((policy_name, rule)));
        }
    }
    // The headers move into the upstream request; nothing reads them after this.
    let headers = std::mem::take(&mut valid.headers);
    let mut response = forward(filter, connection, &valid, headers).await;
    if let Some(session) = &session
        && token_request
        && filter.token_binding
        && let Ok(upstream) = response
    {
        response = bind_token(filter, session, connection, requested_ttl, upstream).await;
    }
    if let Ok(upstream) = &response
        && is_listing(&valid, upstream)
    {
        let upstream = response.expect("checked above");
        response = filter_listing(upstream, |entry| {
            policy
                .set
                .listing_entry_visible(&selection, &connection.identity, &valid.path, entry)
        })
        .await;
    }
    let (status, upstream_status, detail) = match &response {
        Ok(r) => (r.status(), Some(r.status()), ""),
        Err(detail) => (gateway_status(detail), None, *detail),
    };
    // An audit-mode policy that would have denied is named in the audit line.
    let (verdict, policy_name, rule_name) = match would_deny {
        Some((policy, rule)) => ("would-deny", policy, rule),
        None => ("allow", decision.policy, decision.rule),
    };
    exchange.audit(Outcome {
        decision: verdict,
        policy: policy_name,
        rule: rule_name,
        status,
        upstream_status,
        detail,
    });
    match response {
        Ok(response) => response,
        Err(detail) => own_answer(
            filter.provider,
            gateway_status(detail),
            format!("imds-agent: metadata service unavailable: {detail}\n"),
        ),
    }
}

async fn forward(
    filter: &Filter,
    connection: &Connection,
    valid: &request::ValidRequest,
    headers: http::HeaderMap,
) -> Result<Response<Body>, &'static str> {
    let uri: Uri = valid.target().parse().map_err(|_| "invalid target")?;
    let mut upstream_request = Request::builder()
        .method(valid.method.clone())
        .uri(uri)
        .body(Empty::<Bytes>::new())
        .map_err(|_| "invalid request")?;
    *upstream_request.headers_mut() = headers;
    let host = match (connection.original, connection.original.port()) {
        (SocketAddr::V4(addr), 80) => addr.ip().to_string(),
        (SocketAddr::V6(addr), 80) => format!("[{}]", addr.ip()),
        (addr, _) => addr.to_string(),
    };
    upstream_request.headers_mut().insert(
        header::HOST,
        HeaderValue::from_str(&host).map_err(|_| "invalid host")?,
    );

    let mut upstream = connection.upstream.lock().await;
    let ours = match upstream.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    let mut pooled = false;
    if !ours {
        *upstream = match connection.pool.take(&connection.pool_key) {
            Some(sender) => {
                pooled = true;
                Some(sender)
            }
            None => Some(connect_upstream(filter, connection.original).await?),
        };
    }
    // A connection that sat idle in the pool may have been closed by the server meanwhile:
    // then the request is sent once more on a new connection (metadata requests are safe to
    // repeat). Requests on the client connection's own upstream, just checked ready, are
    // not copied for that.
    let retry = pooled.then(|| clone_request(&upstream_request));
    let sender = upstream.as_mut().expect("set above");
    let sent = Instant::now();
    let bound = filter.upstream.for_query(valid.query.as_deref());
    let first = tokio::time::timeout(bound, sender.try_send_request(upstream_request))
        .await
        .map_err(|_| UPSTREAM_TIMED_OUT)?;
    let mut response = match (first, retry) {
        (Ok(response), _) => response,
        (Err(error), Some(request)) if is_stale_connection(error.error()) => {
            tracing::debug!(error = %error.error(), "reused upstream connection was closed; retrying on a new one");
            let sender = upstream.insert(connect_upstream(filter, connection.original).await?);
            tokio::time::timeout(bound, sender.send_request(request))
                .await
                .map_err(|_| UPSTREAM_TIMED_OUT)?
                .map_err(|_| "upstream request failed")?
        }
        (Err(_), _) => return Err("upstream request failed"),
    };
    filter
        .metrics
        .upstream_latency(sent.elapsed().as_secs_f64());
    request::strip_hop_by_hop(response.headers_mut());
    Ok(response.map(BodyExt::boxed))
}

fn clone_request(request: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut copy = Request::new(Empty::new());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Errors of a connection the server closed while it sat idle, before answering.
fn is_stale_connection(error: &hyper::Error) -> bool {
    error.is_canceled() || error.is_closed() || error.is_incomplete_message()
}

async fn connect_upstream(
    filter: &Filter,
    addr: SocketAddr,
) -> Result<SendRequest<Empty<Bytes>>, &'static str> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|_| "socket failed")?;
    // Closed with RST when its client connection ends (never mid-response: the response was
    // read whole by then). A FIN close would leave a TIME_WAIT per client connection, and at
    // SDK-style one-connection-per-request rates the agent would run out of source ports.
    let _ = socket.set_zero_linger();
    let stream = tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        filter.enforcer.connect_exempt(socket, addr),
    )
    .await
    .map_err(|_| "connect timed out")?
    .map_err(|error| {
        tracing::warn!(%error, "upstream connect failed");
        "connect failed"
    })?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| "handshake failed")?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

const UPSTREAM_TIMED_OUT: &str = "no answer in time";

fn gateway_status(detail: &str) -> StatusCode {
    if detail == UPSTREAM_TIMED_OUT {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    }
}

/// A directory listing: a successful GET of a path ending in `/`, as plain text.
fn is_listing(request: &request::ValidRequest, response: &Response<Body>) -> bool {
    request.method == http::Method::GET
        && request.path.ends_with('/')
        && response.status() == StatusCode::OK
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|t| t.as_bytes().starts_with(b"text/plain"))
}

/// Keeps the listing's lines for which `visible` holds; the rest of the response is unchanged
/// (the length is recomputed).
async fn filter_listing(
    response: Response<Body>,
    visible: impl Fn(&str) -> bool,
) -> Result<Response<Body>, &'static str> {
    let (mut parts, body) = response.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_LISTING_BYTES);
    let bytes = limited
        .collect()
        .await
        .map_err(|_| "listing too large or truncated")?
        .to_bytes();
    let text = std::str::from_utf8(&bytes).map_err(|_| "listing is not UTF-8")?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !line.is_empty() && visible(line))
        .collect();
    let filtered = kept.join("\n");
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(
        parts,
        Full::new(Bytes::from(filtered))
            .map_err(|never| match never {})
            .boxed(),
    ))
}

/// An answer the agent gives itself, in the shape the provider's clients read: Azure's read an
/// error body as JSON (`error`, `error_description`, as IMDS writes them) and report a body
/// they cannot parse as "unavailable" without its reason; the other clouds' read text.
fn own_answer(
    provider: crate::provider::Provider,
    status: StatusCode,
    body: String,
) -> Response<Body> {
    if provider != crate::provider::Provider::Azure {
        return text(status, body);
    }
    let error = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "_");
    let json = serde_json::json!({"error": error, "error_description": body.trim_end()});
    let mut response = text(status, json.to_string());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

struct Outcome<'a> {
    decision: &'static str,
    policy: &'a str,
    rule: &'a str,
    status: StatusCode,
    upstream_status: Option<StatusCode>,
    detail: &'a str,
}

/// One structured line per request: who, what, the decision and what made it, and the result.
fn audit(exchange: &Exchange<'_>, outcome: Outcome<'_>) {
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
    let (method, target, started, tokenless) =
        (method.as_str(), target.as_str(), *started, *tokenless);
    let id = &connection.identity;
    let namespace = id.pod.as_ref().map_or("", |p| p.namespace.as_str());
    let group = crate::metrics::group_of(target);
    filter
        .metrics
        .request(outcome.decision, namespace, group, outcome.status.as_u16());
    filter
        .metrics
        .request_duration(started.elapsed().as_secs_f64());
    if outcome.decision == "deny" {
        filter.metrics.denial(outcome.policy, outcome.rule);
        if let (Some(events), Some(pod)) = (&filter.denial_events, &id.pod) {
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
        filter.metrics.imdsv1_request(namespace);
    }
    filter.inventory.record(
        id,
        &crate::inventory::Use {
            path: target,
            group,
            denied: outcome.decision == "deny",
            tokenless,
        },
    );
    filter.tally.record(outcome.decision);
    if outcome.decision == "deny" {
        filter.tally.denied(crate::status::Denial {
            time: crate::status::iso8601(std::time::SystemTime::now()),
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
        crate::identity::Workload::Pod {
            pod_uid,
            container_id,
            ..
        } => (pod_uid.as_str(), container_id.as_deref().unwrap_or("")),
        _ => ("", ""),
    };
    crate::audit::Request {
        request_id,
        node: &filter.node,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_polls_get_their_own_bound() {
        let t = UpstreamTimeouts {
            request: Duration::from_secs(10),
            long_poll: Duration::from_secs(3600),
        };
        assert_eq!(t.for_query(None), Duration::from_secs(10));
        assert_eq!(t.for_query(Some("recursive=true")), Duration::from_secs(10));
        assert_eq!(
            t.for_query(Some("wait_for_change=true&timeout_sec=60")),
            Duration::from_secs(70)
        );
        assert_eq!(
            t.for_query(Some("wait_for_change=true")),
            Duration::from_secs(3600)
        );
        assert_eq!(
            t.for_query(Some("wait_for_change=true&timeout_sec=99999")),
            Duration::from_secs(3600)
        );
    }
}
