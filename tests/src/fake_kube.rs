//! A fake Kubernetes API server for the agent's watches: real HTTP, list and watch JSON as the
//! API server sends them, for pods, ImdsPolicies and ClusterImdsPolicies, and merge patches of
//! a policy's status. Tests change its objects directly; the agent's kube-rs client talks to
//! it through a kubeconfig.
//!
//! It runs in the test process on a runtime of its own, listening on a socket created inside
//! the sandbox's network namespace (a socket stays in the namespace it was created in), so
//! only processes in the sandbox reach it.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub const POLICY_GROUP: &str = "imds-agent.dev/v1alpha1";

/// The collections the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    ImdsPolicy,
    ClusterImdsPolicy,
    Node,
}

impl Kind {
    fn list_path(self) -> &'static str {
        match self {
            Self::Pod => "/api/v1/pods",
            Self::ImdsPolicy => "/apis/imds-agent.dev/v1alpha1/imdspolicies",
            Self::ClusterImdsPolicy => "/apis/imds-agent.dev/v1alpha1/clusterimdspolicies",
            Self::Node => "/api/v1/nodes",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Pod => "PodList",
            Self::ImdsPolicy => "ImdsPolicyList",
            Self::ClusterImdsPolicy => "ClusterImdsPolicyList",
            Self::Node => "NodeList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Pod | Self::Node => "v1",
            _ => POLICY_GROUP,
        }
    }
}

type Key = (Kind, String, String);

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, for watches that start from an older resourceVersion.
    log: Vec<(u64, Kind, Value)>,
    watchers: Vec<Watcher>,
    /// Requests seen, as "METHOD path?query", for tests of what the agent asked.
    requests: Vec<String>,
    /// Events created (events.k8s.io/v1), as posted.
    events: Vec<Value>,
    /// How long a list of each kind takes (a slow API server).
    list_delays: Vec<(Kind, std::time::Duration)>,
}

struct Watcher {
    kind: Kind,
    node: Option<String>,
    events: mpsc::UnboundedSender<Bytes>,
}

pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    /// Serves on `listener` (bound by the caller, e.g. inside a sandbox).
    pub fn start(listener: std::net::TcpListener) -> Self {
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let state = Arc::new(Mutex::new(State::default()));
        let served = state.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            state,
            addr,
            runtime: Some(runtime),
        }
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object (`metadata.namespace` and `metadata.name` say which);
    /// a changed spec bumps `metadata.generation`, as the API server does.
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let mut state = self.state.lock().expect("state");
        state.resource_version += 1;
        let rv = state.resource_version;
        let key = key_of(kind, &object);
        let previous = state.objects.get(&key).cloned();
        let generation = match &previous {
            Some(old) if old["spec"] == object["spec"] => old["metadata"]["generation"].clone(),
            Some(old) => json!(old["metadata"]["generation"].as_i64().unwrap_or(0) + 1),
            None => json!(1),
        };
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("generation".into(), generation);
        if !meta.contains_key("uid") {
            meta.insert("uid".into(), json!(format!("uid-{rv}")));
        }
        if let Some(old) = &previous
            && object.get("status").is_none()
            && let Some(status) = old.get("status")
        {
            object["status"] = status.clone();
        }
        object["apiVersion"] = json!(kind.api_version());
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        publish(&mut state, kind, event, object);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut state = self.state.lock().expect("state");
        let key = (kind, namespace.to_owned(), name.to_owned());
        if let Some(mut object) = state.objects.remove(&key) {
            state.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            publish(&mut state, kind, "DELETED", object);
        }
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().expect("state");
        state
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().expect("state").events.clone()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("state").requests.clone()
    }

    /// Lists of `kind` are answered `delay` late from now on, as a loaded API server answers.
    pub fn delay_lists(&self, kind: Kind, delay: std::time::Duration) {
        let mut state = self.state.lock().expect("state");
        state.list_delays.retain(|(k, _)| *k != kind);
        state.list_delays.push((kind, delay));
    }

    /// The API server goes away: the listener and every open connection close.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            self.state.lock().expect("state").watchers.clear();
            runtime.shutdown_background();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    let namespace = match kind {
        Kind::ClusterImdsPolicy | Kind::Node => String::new(),
        _ => meta["namespace"].as_str().unwrap_or("default").to_owned(),
    };
    (
        kind,
        namespace,
        meta["name"].as_str().expect("metadata.name").to_owned(),
    )
}

fn node_of(object: &Value) -> Option<&str> {
    object["spec"]["nodeName"].as_str()
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event, "object": object})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn publish(state: &mut State, kind: Kind, event: &str, object: Value) {
    let rv = state.resource_version;
    let line = event_line(event, &object);
    state.watchers.retain(|w| {
        if w.kind != kind || (w.node.is_some() && w.node.as_deref() != node_of(&object)) {
            return !w.events.is_closed();
        }
        w.events.send(line.clone()).is_ok()
    });
    let mut logged = object;
    logged["__event"] = json!(event);
    state.log.push((rv, kind, logged));
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    state
        .lock()
        .expect("state")
        .requests
        .push(format!("{method} {path}?{query}"));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    if method == Method::GET
        && let Some(kind) = [Kind::Pod, Kind::ImdsPolicy, Kind::ClusterImdsPolicy]
            .into_iter()
            .find(|k| k.list_path() == path)
    {
        let node = params
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("spec.nodeName="))
            .map(str::to_owned);
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let since = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return watch(state, kind, node, since);
        }
        let delay = state
            .lock()
            .expect("state")
            .list_delays
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| *d);
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        return list(state, kind, node.as_deref());
    }
    if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
        let key = (Kind::Node, String::new(), name.to_owned());
        if method == Method::GET {
            return match state.lock().expect("state").objects.get(&key) {
                Some(node) => json_response(StatusCode::OK, node),
                None => status(StatusCode::NOT_FOUND, "no such node"),
            };
        }
        if method == Method::PATCH {
            return match json_body(request).await {
                Ok(patch) => patch_node(state, key, &patch),
                Err(response) => response,
            };
        }
    }
    if method == Method::POST
        && path.starts_with("/apis/events.k8s.io/v1/namespaces/")
        && path.ends_with("/events")
    {
        return match json_body(request).await {
            Ok(event) => {
                state.lock().expect("state").events.push(event.clone());
                json_response(StatusCode::CREATED, &event)
            }
            Err(response) => response,
        };
    }
    if method == Method::PATCH
        && let Some((kind, namespace, name)) = status_target(&path)
    {
        return match json_body(request).await {
            Ok(patch) => patch_status(state, kind, namespace, name, &patch),
            Err(response) => response,
        };
    }
    status(
        StatusCode::NOT_FOUND,
        "the fake API server does not serve this",
    )
}

/// A request's JSON body, or the 400 to answer.
async fn json_body(request: Request<Incoming>) -> Result<Value, Response<Body>> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&body)
        .map_err(|_| status(StatusCode::BAD_REQUEST, "the body is not JSON"))
}

/// `.../namespaces/NS/imdspolicies/NAME/status` or `.../clusterimdspolicies/NAME/status`.
fn status_target(path: &str) -> Option<(Kind, String, String)> {
    let rest = path.strip_prefix("/apis/imds-agent.dev/v1alpha1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["namespaces", ns, "imdspolicies", name, "status"] => {
            Some((Kind::ImdsPolicy, (*ns).to_owned(), (*name).to_owned()))
        }
        ["clusterimdspolicies", name, "status"] => {
            Some((Kind::ClusterImdsPolicy, String::new(), (*name).to_owned()))
        }
        _ => None,
    }
}

fn list(state: &Mutex<State>, kind: Kind, node: Option<&str>) -> Response<Body> {
    let state = state.lock().expect("state");
    let items: Vec<&Value> = state
        .objects
        .iter()
        .filter(|((k, _, _), o)| *k == kind && (node.is_none() || node_of(o) == node))
        .map(|(_, o)| o)
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": kind.list_kind(),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        }),
    )
}

fn watch(state: &Mutex<State>, kind: Kind, node: Option<String>, since: u64) -> Response<Body> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let mut state = state.lock().expect("state");
    for (rv, logged_kind, object) in &state.log {
        if *rv <= since
            || *logged_kind != kind
            || (node.is_some() && node.as_deref() != node_of(object))
        {
            continue;
        }
        let mut object = object.clone();
        let event = object["__event"].as_str().unwrap_or("MODIFIED").to_owned();
        object.as_object_mut().map(|o| o.remove("__event"));
        let _ = sender.send(event_line(&event, &object));
    }
    state.watchers.push(Watcher {
        kind,
        node,
        events: sender,
    });
    let mut response = Response::new(EventStream(receiver).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn patch_status(
    state: &Mutex<State>,
    kind: Kind,
    namespace: String,
    name: String,
    patch: &Value,
) -> Response<Body> {
    let mut state = state.lock().expect("state");
    state.resource_version += 1;
    let rv = state.resource_version;
    let Some(object) = state.objects.get_mut(&(kind, namespace, name)) else {
        return status(StatusCode::NOT_FOUND, "no such object");
    };
    if let Some(new_status) = patch.get("status") {
        merge(&mut object["status"], new_status);
    }
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let object = object.clone();
    publish(&mut state, kind, "MODIFIED", object.clone());
    json_response(StatusCode::OK, &object)
}

/// A merge patch of a node; a resourceVersion in the patch must be the current one (409).
fn patch_node(state: &Mutex<State>, key: Key, patch: &Value) -> Response<Body> {
    let mut state = state.lock().expect("state");
    state.resource_version += 1;
    let rv = state.resource_version;
    let Some(node) = state.objects.get_mut(&key) else {
        return status(StatusCode::NOT_FOUND, "no such node");
    };
    if let Some(expected) = patch["metadata"]["resourceVersion"].as_str()
        && node["metadata"]["resourceVersion"].as_str() != Some(expected)
    {
        return status(StatusCode::CONFLICT, "the object has been modified");
    }
    merge(node, patch);
    node["metadata"]["resourceVersion"] = json!(rv.to_string());
    json_response(StatusCode::OK, &node.clone())
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().expect("object");
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "code": code.as_u16()}),
    )
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from(serde_json::to_vec(value).expect("json"))).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = value.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A watch response body: one JSON event per line, for as long as the server runs.
struct EventStream(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|b| Ok(Frame::data(b))))
    }
}

/// A pod on `node` with one running container, as the API server reports it, running as the
/// namespace's `default` service account.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: Value,
    container_id: &str,
) -> Value {
    pod_as(namespace, name, uid, node, labels, "default", container_id)
}

/// As [`pod`], running as `service_account`.
pub fn pod_as(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: Value,
    service_account: &str,
    container_id: &str,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": service_account,
                 "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "app", "containerID": format!("containerd://{container_id}"),
            "image": "app:1", "imageID": "", "ready": true, "restartCount": 0
        }]}
    })
}

/// An ImdsPolicy (`namespace` Some) or ClusterImdsPolicy with this spec.
pub fn policy(namespace: Option<&str>, name: &str, spec: Value) -> (Kind, Value) {
    match namespace {
        Some(namespace) => (
            Kind::ImdsPolicy,
            json!({"apiVersion": POLICY_GROUP, "kind": "ImdsPolicy",
                   "metadata": {"namespace": namespace, "name": name}, "spec": spec}),
        ),
        None => (
            Kind::ClusterImdsPolicy,
            json!({"apiVersion": POLICY_GROUP, "kind": "ClusterImdsPolicy",
                   "metadata": {"name": name}, "spec": spec}),
        ),
    }
}
