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
#[derive(Debug)]
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
    /// message first, the fields, then the target; newline-terminated. Written field by field
    /// (names are constants that need no escaping) rather than through serde's map, which
    /// escaped every name on every request.
    fn json_line(&self, time: SystemTime, line: &mut Vec<u8>, otel: bool) {
        line.extend_from_slice(b"{\"timestamp\":\"");
        crate::calendar::write_iso8601_micros(line, time);
        line.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
        for ((name, otel_name), value) in self.fields() {
            line.extend_from_slice(b",\"");
            line.extend_from_slice(if otel { otel_name } else { name }.as_bytes());
            line.extend_from_slice(b"\":");
            // Writing into memory cannot fail.
            let _ = match value {
                Value::Text(text) => push_json_string(line, text),
                Value::Number(number) => serde_json::to_writer(&mut *line, &number),
            };
        }
        let _ = writeln!(line, ",\"target\":\"{TARGET}\"}}");
    }

    /// The fields in the line's order, each under its own name and OpenTelemetry's
    /// (`--audit-names otel`).
    fn fields(&self) -> [((&'static str, &'static str), Value<'_>); 27] {
        use Value::{Number, Text};
        [
            (
                ("request_id", "imds_agent.request_id"),
                Text(self.request_id),
            ),
            (("node", "k8s.node.name"), Text(self.node)),
            (("cgroup", "imds_agent.cgroup"), Text(self.cgroup)),
            (
                ("cgroup_id", "imds_agent.cgroup_id"),
                Number(self.cgroup_id),
            ),
            (("unit", "imds_agent.systemd_unit"), Text(self.unit)),
            (("namespace", "k8s.namespace.name"), Text(self.namespace)),
            (("pod", "k8s.pod.name"), Text(self.pod)),
            (("pod_uid", "k8s.pod.uid"), Text(self.pod_uid)),
            (
                ("service_account", "imds_agent.service_account"),
                Text(self.service_account),
            ),
            (("container", "k8s.container.name"), Text(self.container)),
            (("container_id", "container.id"), Text(self.container_id)),
            (("uid", "process.user.id"), Number(self.uid.into())),
            (("gid", "process.group.id"), Number(self.gid.into())),
            (("pid", "process.pid"), Number(self.pid.into())),
            (("comm", "process.executable.name"), Text(self.comm)),
            (("exe", "process.executable.path"), Text(self.exe)),
            (("exe_check", "imds_agent.exe_check"), Text(self.exe_check)),
            (("method", "http.request.method"), Text(self.method)),
            (("path", "url.path"), Text(self.path)),
            (("user_agent", "user_agent.original"), Text(self.user_agent)),
            (("decision", "imds_agent.decision"), Text(self.decision)),
            (("policy", "imds_agent.policy"), Text(self.policy)),
            (("rule", "imds_agent.rule"), Text(self.rule)),
            (
                ("status", "http.response.status_code"),
                Number(self.status.into()),
            ),
            (
                ("upstream_status", "imds_agent.upstream_status_code"),
                Number(self.upstream_status.into()),
            ),
            (("detail", "imds_agent.detail"), Text(self.detail)),
            (
                ("latency_us", "imds_agent.latency_us"),
                Number(self.latency_us),
            ),
        ]
    }
}

/// One field's value in an audit line.
enum Value<'a> {
    Text(&'a str),
    Number(u64),
}

/// `text` as a JSON string. Most values (paths, names, ids) need no escaping and are copied
/// as they are; the others are escaped by serde_json.
fn push_json_string(line: &mut Vec<u8>, text: &str) -> serde_json::Result<()> {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        line.push(b'"');
        line.extend_from_slice(text.as_bytes());
        line.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(line, text)
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

    /// What a client controls (its User-Agent, its path) reads back as it was sent, whatever
    /// bytes it holds, and never ends the line early.
    #[test]
    fn json_lines_read_back_every_text_as_it_was() {
        for text in [
            "Botocore/1.34.0 Python/3.12",
            "tab\there",
            "line\nbreak\r",
            "quote\" and \\backslash",
            "\u{1}\u{1f}\u{7f}",
            "caf\u{e9} \u{1f980}",
            "",
        ] {
            let request = Request {
                request_id: text,
                node: text,
                cgroup: text,
                cgroup_id: u64::MAX,
                unit: text,
                namespace: text,
                pod: text,
                pod_uid: text,
                service_account: text,
                container: text,
                container_id: text,
                uid: u32::MAX,
                gid: 0,
                pid: 1,
                comm: text,
                exe: text,
                exe_check: text,
                method: text,
                path: text,
                user_agent: text,
                decision: text,
                policy: text,
                rule: text,
                status: 403,
                upstream_status: 0,
                detail: text,
                latency_us: 0,
            };
            for otel in [false, true] {
                let mut line = Vec::new();
                request.json_line(SystemTime::now(), &mut line, otel);
                let line = String::from_utf8(line).unwrap();
                assert_eq!(line.lines().count(), 1, "{line}");
                let value: serde_json::Value = serde_json::from_str(&line).unwrap();
                let fields = value.as_object().unwrap();
                assert_eq!(fields.len(), 31, "{line}");
                let texts = fields
                    .iter()
                    .filter(|(_, v)| v.is_string())
                    .filter(|(name, _)| {
                        !["timestamp", "level", "message", "target"].contains(&name.as_str())
                    })
                    .inspect(|(name, v)| assert_eq!(v.as_str(), Some(text), "{name}: {line}"))
                    .count();
                assert_eq!(texts, 20, "{line}");
                let cgroup_id = if otel {
                    "imds_agent.cgroup_id"
                } else {
                    "cgroup_id"
                };
                assert_eq!(value[cgroup_id], u64::MAX, "{line}");
            }
        }
    }
}
