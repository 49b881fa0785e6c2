//! The caller inventory: per workload (pod and container, systemd unit, or cgroup), which
//! executables asked, which path groups they read, how many requests were denied, and how many
//! came without a session token (IMDSv1): the migration report AWS users ask for before
//! requiring IMDSv2, with the attribution that packet tracers cannot give.
//!
//! The running agent keeps it in memory, bounded, and writes it with its state;
//! `imds-agent report` prints it, and writes least-privilege policies from it (`suggest`).

pub mod suggest;

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// Workloads kept; beyond it new ones are counted under [`OVERFLOW`].
const MAX_WORKLOADS: usize = 4096;
/// Executables, paths and requests kept per workload.
const MAX_EXECUTABLES: usize = 16;
const MAX_PATHS: usize = 64;
const MAX_USES: usize = 128;
/// Pod labels that name one revision or one pod of a controller, not the workload.
const REVISION_LABELS: [&str; 7] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
    "batch.kubernetes.io/job-completion-index",
];
const OVERFLOW: &str = "(more workloads than the inventory keeps)";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadUse {
    /// `pod NAMESPACE/NAME container C`, `unit NAME`, or `cgroup PATH`.
    pub workload: String,
    /// The pod's namespace, or "".
    pub namespace: String,
    pub executables: BTreeSet<String>,
    /// Requests by path group (see `policy::groups`; "other" for the rest).
    pub groups: BTreeMap<String, u64>,
    /// Paths requested (the first [`MAX_PATHS`]).
    pub paths: BTreeSet<String>,
    pub requests: u64,
    pub denied: u64,
    /// Requests without a session token, on AWS (the token request itself excluded).
    pub imdsv1: u64,
    pub last_seen: String,
    /// What a policy can select the workload by (absent in an earlier agent's inventory).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Requests by `METHOD PATH` (the first [`MAX_USES`]).
    #[serde(default)]
    pub uses: BTreeMap<String, Seen>,
}

/// A workload as policies select it: a pod's container by its namespace, stable labels,
/// service account and container name; a systemd unit by name; any other cgroup by path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WorkloadSelector {
    Pod {
        namespace: String,
        labels: BTreeMap<String, String>,
        service_account: String,
        container: Option<String>,
    },
    Unit(String),
    Cgroup(String),
}

/// One kind of request of a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub group: String,
    pub allowed: u64,
    pub denied: u64,
    /// Without a session token (AWS), the token request excluded.
    pub tokenless: u64,
    /// When last asked (ISO 8601, UTC).
    pub last: String,
}

#[derive(Debug, Default)]
pub struct Inventory {
    workloads: Mutex<HashMap<String, WorkloadUse>>,
}

/// One request, as the inventory counts it.
pub struct Use<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub group: &'static str,
    pub denied: bool,
    pub tokenless: bool,
}

impl Inventory {
    /// Counts one request. Called for every request under one lock: what is already known
    /// (the workload, its path, its group, its executable) is looked up by reference, and
    /// strings are allocated only for what is new.
    pub fn record(&self, identity: &Identity, request: &Use<'_>) {
        thread_local! {
            // The workload's name and the `METHOD PATH` key, rebuilt in place per request.
            static KEYS: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
        }
        let path = request.path.split('?').next().unwrap_or_default();
        KEYS.with_borrow_mut(|(name, key)| {
            name.clear();
            write_workload_name(name, identity);
            key.clear();
            let _ = write!(key, "{} {path}", request.method);
            crate::calendar::with_iso8601(std::time::SystemTime::now(), |now| {
                let mut workloads = self.workloads.lock().expect("inventory lock");
                if !workloads.contains_key(name.as_str()) {
                    let name = if workloads.len() >= MAX_WORKLOADS {
                        OVERFLOW.to_owned()
                    } else {
                        name.clone()
                    };
                    workloads
                        .entry(name.clone())
                        .or_insert_with(|| WorkloadUse {
                            workload: name,
                            namespace: identity
                                .pod
                                .as_ref()
                                .map_or_else(String::new, |p| p.namespace.clone()),
                            selector: selector_of(identity),
                            ..WorkloadUse::default()
                        });
                }
                let entry = match workloads.get_mut(name.as_str()) {
                    Some(entry) => entry,
                    None => workloads.get_mut(OVERFLOW).expect("inserted above"),
                };
                entry.count(identity, request, path, key, now);
            });
        });
    }

    /// Adds a predecessor's inventory (an upgrade) to this one.
    pub fn merge(&self, earlier: Vec<WorkloadUse>) {
        let mut workloads = self.workloads.lock().expect("inventory lock");
        for old in earlier {
            if !workloads.contains_key(&old.workload) && workloads.len() >= MAX_WORKLOADS {
                continue;
            }
            let entry = workloads
                .entry(old.workload.clone())
                .or_insert_with(|| WorkloadUse {
                    workload: old.workload.clone(),
                    namespace: old.namespace.clone(),
                    selector: old.selector.clone(),
                    ..WorkloadUse::default()
                });
            entry.requests += old.requests;
            entry.denied += old.denied;
            entry.imdsv1 += old.imdsv1;
            for (group, count) in old.groups {
                *entry.groups.entry(group).or_default() += count;
            }
            for exe in old.executables {
                if entry.executables.len() < MAX_EXECUTABLES {
                    entry.executables.insert(exe);
                }
            }
            for path in old.paths {
                if entry.paths.len() < MAX_PATHS {
                    entry.paths.insert(path);
                }
            }
            for (key, seen) in old.uses {
                if entry.uses.len() >= MAX_USES && !entry.uses.contains_key(&key) {
                    continue;
                }
                let mine = entry.uses.entry(key).or_insert_with(|| Seen {
                    group: seen.group.clone(),
                    ..Seen::default()
                });
                mine.allowed += seen.allowed;
                mine.denied += seen.denied;
                mine.tokenless += seen.tokenless;
                if seen.last > mine.last {
                    mine.last = seen.last;
                }
            }
            // ISO 8601 in UTC: the later one sorts last.
            if old.last_seen > entry.last_seen {
                entry.last_seen = old.last_seen;
            }
        }
    }

    /// Every workload, busiest first.
    pub fn snapshot(&self) -> Vec<WorkloadUse> {
        let mut all: Vec<WorkloadUse> = self
            .workloads
            .lock()
            .expect("inventory lock")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then_with(|| a.workload.cmp(&b.workload))
        });
        all
    }
}

fn selector_of(identity: &Identity) -> Option<WorkloadSelector> {
    if let Some(pod) = &identity.pod {
        return Some(WorkloadSelector::Pod {
            namespace: pod.namespace.clone(),
            labels: pod
                .labels
                .iter()
                .filter(|(key, _)| !REVISION_LABELS.contains(&key.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            service_account: pod.service_account.clone(),
            container: identity.container.clone(),
        });
    }
    match (&identity.unit, &identity.cgroup) {
        (Some(unit), _) => Some(WorkloadSelector::Unit(unit.clone())),
        (None, Some(cgroup)) => Some(WorkloadSelector::Cgroup(cgroup.clone())),
        (None, None) => None,
    }
}

fn write_workload_name(out: &mut String, identity: &Identity) {
    let _ = match (&identity.pod, &identity.container) {
        (Some(pod), Some(container)) => write!(
            out,
            "pod {}/{} container {container}",
            pod.namespace, pod.name
        ),
        (Some(pod), None) => write!(out, "pod {}/{}", pod.namespace, pod.name),
        _ => match (&identity.unit, &identity.cgroup) {
            (Some(unit), _) => write!(out, "unit {unit}"),
            (None, Some(cgroup)) => write!(out, "cgroup {cgroup}"),
            (None, None) => write!(out, "(unresolved cgroup)"),
        },
    };
}

impl WorkloadUse {
    /// One request of this workload, `key` its `METHOD PATH` and `now` the time as the
    /// inventory writes it.
    fn count(&mut self, identity: &Identity, request: &Use<'_>, path: &str, key: &str, now: &str) {
        self.requests += 1;
        self.denied += u64::from(request.denied);
        self.imdsv1 += u64::from(request.tokenless);
        match self.groups.get_mut(request.group) {
            Some(count) => *count += 1,
            None => {
                self.groups.insert(request.group.to_owned(), 1);
            }
        }
        if self.paths.len() < MAX_PATHS && !path.is_empty() && !self.paths.contains(path) {
            self.paths.insert(path.to_owned());
        }
        if !self.uses.contains_key(key) && self.uses.len() < MAX_USES {
            self.uses.insert(
                key.to_owned(),
                Seen {
                    group: request.group.to_owned(),
                    ..Seen::default()
                },
            );
        }
        if let Some(seen) = self.uses.get_mut(key) {
            if request.denied {
                seen.denied += 1;
            } else {
                seen.allowed += 1;
            }
            seen.tokenless += u64::from(request.tokenless);
            seen.last.clear();
            seen.last.push_str(now);
        }
        if let Some(exe) = &identity.exe
            && self.executables.len() < MAX_EXECUTABLES
            && !self.executables.contains(&exe.path)
        {
            self.executables.insert(exe.path.clone());
        }
        self.last_seen.clear();
        self.last_seen.push_str(now);
    }
}

/// The report as a table: one line per workload.
pub fn render(workloads: &[WorkloadUse]) -> String {
    use std::fmt::Write as _;
    if workloads.is_empty() {
        return "no metadata requests seen yet\n".to_owned();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<48} {:>8} {:>7} {:>7}  {:<32} executables",
        "workload", "requests", "denied", "IMDSv1", "path groups"
    );
    for w in workloads {
        let groups: Vec<String> = w.groups.iter().map(|(g, n)| format!("{g}:{n}")).collect();
        let executables: Vec<&str> = w.executables.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "{:<48} {:>8} {:>7} {:>7}  {:<32} {}",
            w.workload,
            w.requests,
            w.denied,
            w.imdsv1,
            groups.join(" "),
            if executables.is_empty() {
                "?".to_owned()
            } else {
                executables.join(" ")
            }
        );
    }
    let v1: Vec<&str> = workloads
        .iter()
        .filter(|w| w.imdsv1 > 0)
        .map(|w| w.workload.as_str())
        .collect();
    if v1.is_empty() {
        let _ = writeln!(
            out,
            "\nevery workload uses session tokens (IMDSv2): requiring them breaks no one seen here"
        );
    } else {
        let _ = writeln!(
            out,
            "\nstill on IMDSv1 (requests without a session token): {}",
            v1.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::pods::PodDirectory;

    #[test]
    fn requests_are_counted_per_workload_with_imdsv1_use() {
        let inventory = Inventory::default();
        let mut web =
            Identity::for_cgroup("/system.slice/web.service", 0, 0, &PodDirectory::default());
        web.exe = Some(crate::identity::executable::Executable::assumed(
            "/usr/bin/python3",
        ));
        let batch = Identity::for_cgroup("/batch", 1000, 1000, &PodDirectory::default());
        let read = |path, group, denied, tokenless| Use {
            method: "GET",
            path,
            group,
            denied,
            tokenless,
        };
        inventory.record(
            &web,
            &read(
                "/latest/meta-data/instance-id",
                "instance-info",
                false,
                true,
            ),
        );
        inventory.record(&web, &read("/latest/api/token", "token", false, false));
        inventory.record(
            &web,
            &read(
                "/latest/meta-data/instance-id?x=1",
                "instance-info",
                false,
                false,
            ),
        );
        inventory.record(&batch, &read("/latest/user-data", "user-data", true, false));
        let report = inventory.snapshot();
        assert_eq!(report[0].workload, "unit web.service");
        assert_eq!(
            (report[0].requests, report[0].imdsv1, report[0].denied),
            (3, 1, 0)
        );
        // The same path asked twice (its query apart) is one use, counted twice.
        let id = &report[0].uses["GET /latest/meta-data/instance-id"];
        assert_eq!(
            (id.allowed, id.tokenless, id.group.as_str()),
            (2, 1, "instance-info")
        );
        assert_eq!(report[0].uses.len(), 2);
        assert_eq!(report[0].paths.len(), 2);
        assert_eq!(report[0].groups["instance-info"], 2);
        assert!(
            crate::calendar::parse_iso8601(&id.last).is_some(),
            "{}",
            id.last
        );
        assert_eq!(report[0].last_seen.len(), "2026-11-24T00:00:00Z".len());
        assert!(report[0].executables.contains("/usr/bin/python3"));
        assert_eq!(report[1].workload, "cgroup /batch");
        assert_eq!(report[1].groups["user-data"], 1);
        let table = render(&report);
        assert!(
            table.contains("still on IMDSv1 (requests without a session token): unit web.service"),
            "{table}"
        );
    }
}
