//! The audit line: one per request, naming who asked what, the decision and what made it.
//!
//! Written through `tracing` (target `imds_agent::audit`, so `IMDS_AGENT_LOG` filters it like
//! any other target), except with `--log-format json`, where the agent writes the line itself,
//! with the same fields in the same layout as tracing-subscriber's JSON lines. The agent's
//! profile under load put tracing-subscriber's JSON formatting of this one event at about a
//! fifth of its CPU time (a visitor per field, a UTF-8 check per fragment); serde serialises
//! the same line into a reused buffer for a fraction of that. Lines are written whole, so
//! lines from several threads never interleave; the JSON lines of a runtime worker are
//! batched until it goes idle (see [`worker_idle`]).

use std::{
    cell::RefCell,
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;

/// The tracing target of audit lines.
pub const TARGET: &str = "imds_agent::audit";

static JSON: AtomicBool = AtomicBool::new(false);
static OTEL_NAMES: AtomicBool = AtomicBool::new(false);

/// `--audit-names otel`: JSON audit lines name their fields as OpenTelemetry's semantic
/// conventions do (`http.request.method`, `url.path`, `k8s.pod.name`, ...; ECS shares most),
/// and the agent's own under `imds_agent.`.
pub fn otel_names(otel: bool) {
    OTEL_NAMES.store(otel, Ordering::Relaxed);
}

/// Set once at start-up, with `--log-format json`: audit lines are written as JSON by
/// [`Request::log`] itself.
pub fn write_json_lines(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Where audit lines go when they have a sink of their own (`--audit-log`): always as JSON,
/// one line per request, apart from the operational log on stderr.
enum Sink {
    Stdout,
    File { path: PathBuf, file: File },
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);
/// Whether [`SINK`] holds a sink: read per request, so that the default (stderr) takes no
/// lock on the request path.
static HAS_SINK: AtomicBool = AtomicBool::new(false);

/// `--audit-log`: `stderr` (with the other logs, the default), `stdout`, or a file appended to
/// (reopened by [`reopen`] on SIGHUP, after a log rotation has moved it).
pub fn set_sink(target: &str) -> std::io::Result<()> {
    let sink = match target {
        "stderr" => None,
        "stdout" => Some(Sink::Stdout),
        path => Some(Sink::File {
            path: PathBuf::from(path),
            file: open_append(Path::new(path))?,
        }),
    };
    HAS_SINK.store(sink.is_some(), Ordering::Relaxed);
    *SINK.lock().expect("audit sink") = sink;
    Ok(())
}

/// Reopens the audit file at its path (the rotated one is left to the rotation). A failure is
/// logged; lines go on to the file that was open.
pub fn reopen() {
    // The lines of requests answered before the signal go to the file they were answered under.
    flush_all();
    let mut sink = SINK.lock().expect("audit sink");
    if let Some(Sink::File { path, file }) = sink.as_mut() {
        match open_append(path) {
            Ok(reopened) => *file = reopened,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot reopen the audit log; writing on to the old file")
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// A worker thread's audit lines not yet written.
type Batch = Arc<Mutex<Vec<u8>>>;

/// Every worker thread's batch, for [`flush_all`].
static BATCHES: Mutex<Vec<Batch>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's batch, once it is a runtime worker that [`worker_idle`] flushes.
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
    /// A line being formatted on a thread without a batch.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A batch this large is written at once, whether or not its worker is idle.
const BATCH_BYTES: usize = 32 * 1024;

/// The longest a line waits in the batch of a worker that never goes idle (see `run`).
pub const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// tokio's hook for a worker thread with nothing left to run: its batch is written, and its
/// later lines are batched. A worker that answers several requests in one wake-up writes their
/// lines with one `write` when it goes idle (microseconds after the answers left), instead of
/// one `write` per line ahead of each answer: that write was the largest single cost of a
/// request in the agent's profile under load. Threads without this hook (the blocking pool,
/// the main thread) write each line at once.
pub fn worker_idle() {
    BATCH.with_borrow_mut(|batch| {
        let batch = batch.get_or_insert_with(|| {
            let batch = Batch::default();
            BATCHES.lock().expect("audit batches").push(batch.clone());
            batch
        });
        write_batch(batch);
    });
}

/// tokio's hook for a thread that ends: a worker's batch is written and forgotten.
pub fn thread_stopped() {
    if let Some(batch) = BATCH.with_borrow_mut(Option::take) {
        write_batch(&batch);
        BATCHES
            .lock()
            .expect("audit batches")
            .retain(|other| !Arc::ptr_eq(other, &batch));
    }
}

/// Writes every worker's batch: from a timer (bounding how long a line waits on a worker that
/// never goes idle) and before the audit file is reopened. As the agent exits, each worker
/// writes its own ([`thread_stopped`]).
pub fn flush_all() {
    for batch in BATCHES.lock().expect("audit batches").iter() {
        write_batch(batch);
    }
}

fn write_batch(batch: &Mutex<Vec<u8>>) {
    let mut lines = batch.lock().expect("audit batch");
    if !lines.is_empty() {
        write_out(&lines);
        lines.clear();
    }
}

/// Appends the line `format` writes to this thread's batch, or writes it at once on a thread
/// without one.
fn emit(format: impl FnOnce(&mut Vec<u8>)) {
    BATCH.with_borrow(|batch| match batch {
        Some(batch) => {
            let mut lines = batch.lock().expect("audit batch");
            format(&mut lines);
            if lines.len() >= BATCH_BYTES {
                write_out(&lines);
                lines.clear();
            }
        }
        None => LINE.with_borrow_mut(|line| {
            line.clear();
            format(line);
            write_out(line);
        }),
    });
}

/// Whole lines to the audit sink (stderr unless `--audit-log` says otherwise), in one `write`
/// so that lines from several threads never interleave.
fn write_out(lines: &[u8]) {
    // An audit line that cannot be written has nowhere else to go.
    if HAS_SINK.load(Ordering::Relaxed) {
        let mut sink = SINK.lock().expect("audit sink");
        let _ = match sink.as_mut() {
            Some(Sink::Stdout) => std::io::stdout().lock().write_all(lines),
            Some(Sink::File { file, .. }) => file.write_all(lines),
            None => std::io::stderr().lock().write_all(lines),
        };
    } else {
        let _ = std::io::stderr().lock().write_all(lines);
    }
}

/// One request's audit record.
#[derive(Debug, Serialize)]
pub struct Request<'a> {
    /// Unique per request (also in the `imds-agent-request-id` header of the agent's own
    /// answers, so a denial a client saw can be found here).
    pub request_id: &'a str,
    /// The node (Kubernetes' node name, else the host name).
    pub node: &'a str,
    pub cgroup: &'a str,
    pub cgroup_id: u64,
    pub unit: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub pod_uid: &'a str,
    pub service_account: &'a str,
    pub container: &'a str,
    /// The runtime's id of the container (from its cgroup).
    pub container_id: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub comm: &'a str,
    /// The executable as the caller's file system names it, and whether it is the node's
    /// file there (`node-file`, `container`, `not-the-node-file`).
    pub exe: &'a str,
    pub exe_check: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The client's User-Agent (it names the SDK and its version).
    pub user_agent: &'a str,
    pub decision: &'a str,
    pub policy: &'a str,
    pub rule: &'a str,
    pub status: u16,
    pub upstream_status: u16,
    pub detail: &'a str,
    pub latency_us: u64,
}

impl Request<'_> {
    pub fn log(&self) {
        // A sink of its own always gets the line; stderr as the log filter and format say.
        let enabled = || tracing::enabled!(target: TARGET, tracing::Level::INFO);
        if HAS_SINK.load(Ordering::Relaxed) || (JSON.load(Ordering::Relaxed) && enabled()) {
            emit(|line| {
                self.json_line(SystemTime::now(), line, OTEL_NAMES.load(Ordering::Relaxed))
            });
            return;
        }
        if !enabled() {
            return;
        }
        tracing::info!(
            target: TARGET,
            request_id = self.request_id,
            node = self.node,
            cgroup = self.cgroup,
            cgroup_id = self.cgroup_id,
            unit = self.unit,
            namespace = self.namespace,
            pod = self.pod,
            pod_uid = self.pod_uid,
            service_account = self.service_account,
            container = self.container,
            container_id = self.container_id,
            uid = self.uid,
            gid = self.gid,
            pid = self.pid,
            comm = self.comm,
            exe = self.exe,
            exe_check = self.exe_check,
            method = self.method,
            path = self.path,
            user_agent = self.user_agent,
            decision = self.decision,
            policy = self.policy,
            rule = self.rule,
            status = self.status,
            upstream_status = self.upstream_status,
            detail = self.detail,
            latency_us = self.latency_us,
            "request"
        );
    }

    /// The line as tracing-subscriber's flattened JSON would write it: timestamp, level and
    /// message first, the fields, then the target; newline-terminated.
    fn json_line(&self, time: SystemTime, line: &mut Vec<u8>, otel: bool) {
        line.extend_from_slice(b"{\"timestamp\":\"");
        crate::calendar::write_iso8601_micros(line, time);
        line.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",");
        let fields = line.len();
        // Serialising a struct of strings and integers into memory cannot fail.
        let _ = if otel {
            serde_json::to_writer(&mut *line, &OtelNamed(self))
        } else {
            serde_json::to_writer(&mut *line, self)
        };
        // `{...}` -> `...`: the fields join the object opened above.
        line.remove(fields);
        line.pop();
        let _ = writeln!(line, ",\"target\":\"{TARGET}\"}}");
    }
}

/// A record under OpenTelemetry's names (`--audit-names otel`).
struct OtelNamed<'a>(&'a Request<'a>);

impl Serialize for OtelNamed<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let r = self.0;
        let mut map = serializer.serialize_map(Some(27))?;
        map.serialize_entry("imds_agent.request_id", r.request_id)?;
        map.serialize_entry("k8s.node.name", r.node)?;
        map.serialize_entry("imds_agent.cgroup", r.cgroup)?;
        map.serialize_entry("imds_agent.cgroup_id", &r.cgroup_id)?;
        map.serialize_entry("imds_agent.systemd_unit", r.unit)?;
        map.serialize_entry("k8s.namespace.name", r.namespace)?;
        map.serialize_entry("k8s.pod.name", r.pod)?;
        map.serialize_entry("k8s.pod.uid", r.pod_uid)?;
        map.serialize_entry("imds_agent.service_account", r.service_account)?;
        map.serialize_entry("k8s.container.name", r.container)?;
        map.serialize_entry("container.id", r.container_id)?;
        map.serialize_entry("process.user.id", &r.uid)?;
        map.serialize_entry("process.group.id", &r.gid)?;
        map.serialize_entry("process.pid", &r.pid)?;
        map.serialize_entry("process.executable.name", r.comm)?;
        map.serialize_entry("process.executable.path", r.exe)?;
        map.serialize_entry("imds_agent.exe_check", r.exe_check)?;
        map.serialize_entry("http.request.method", r.method)?;
        map.serialize_entry("url.path", r.path)?;
        map.serialize_entry("user_agent.original", r.user_agent)?;
        map.serialize_entry("imds_agent.decision", r.decision)?;
        map.serialize_entry("imds_agent.policy", r.policy)?;
        map.serialize_entry("imds_agent.rule", r.rule)?;
        map.serialize_entry("http.response.status_code", &r.status)?;
        map.serialize_entry("imds_agent.upstream_status_code", &r.upstream_status)?;
        map.serialize_entry("imds_agent.detail", r.detail)?;
        map.serialize_entry("imds_agent.latency_us", &r.latency_us)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn json_lines_have_tracing_subscribers_layout_and_escape_what_they_carry() {
        let request = Request {
            request_id: "18c2f0a1-7",
            node: "node-a",
            cgroup: "/web/\"quoted\"\n",
            cgroup_id: 7,
            unit: "web.service",
            namespace: "",
            pod: "",
            pod_uid: "",
            service_account: "",
            container: "",
            container_id: "",
            uid: 1000,
            gid: 1000,
            pid: 42,
            comm: "curl",
            exe: "/usr/bin/curl",
            exe_check: "node-file",
            method: "GET",
            path: "/latest/meta-data/instance-id",
            user_agent: "Botocore/1.34.0",
            decision: "allow",
            policy: "web",
            rule: "info",
            status: 200,
            upstream_status: 200,
            detail: "",
            latency_us: 123,
        };
        let mut line = Vec::new();
        let time = UNIX_EPOCH + Duration::from_micros(1_795_478_400_000_123);
        request.json_line(time, &mut line, false);
        let text = String::from_utf8(line).unwrap();
        assert!(text.ends_with("}\n"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.starts_with(
                "{\"timestamp\":\"2026-11-24T00:00:00.000123Z\",\"level\":\"INFO\",\"message\":\"request\",\"request_id\":\"18c2f0a1-7\",\"node\":\"node-a\",\"cgroup\":\"/web/\\\"quoted\\\"\\n\","
            ),
            "{text}"
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["target"], TARGET);
        assert_eq!(value["cgroup"], "/web/\"quoted\"\n");
        assert_eq!(value["latency_us"], 123);
        assert_eq!(value["upstream_status"], 200);
        assert_eq!(value["exe_check"], "node-file");
        assert_eq!(value["user_agent"], "Botocore/1.34.0");
        assert_eq!(value.as_object().unwrap().len(), 31);

        // The same record under OpenTelemetry's names.
        let mut line = Vec::new();
        request.json_line(time, &mut line, true);
        let otel: serde_json::Value = serde_json::from_slice(&line).unwrap();
        for (field, expected) in [
            ("http.request.method", serde_json::json!("GET")),
            (
                "url.path",
                serde_json::json!("/latest/meta-data/instance-id"),
            ),
            ("http.response.status_code", serde_json::json!(200)),
            ("user_agent.original", serde_json::json!("Botocore/1.34.0")),
            ("k8s.node.name", serde_json::json!("node-a")),
            ("process.pid", serde_json::json!(42)),
            ("imds_agent.decision", serde_json::json!("allow")),
            ("target", serde_json::json!(TARGET)),
        ] {
            assert_eq!(otel[field], expected, "{field}: {otel}");
        }
        // Every field of the record, under one name or the other.
        assert_eq!(otel.as_object().unwrap().len(), 31, "{otel}");
    }
}
