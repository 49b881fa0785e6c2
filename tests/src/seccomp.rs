//! The agent's system call allowlist as a seccomp profile for container runtimes (the OCI
//! format runc, crun, CRI-O and containerd read), derived from the host unit's
//! `SystemCallFilter=`: one list, so the agent in a pod runs under exactly what its service
//! runs under, and the container test shows that list suffices.
//!
//! systemd expands the unit's groups (`@system-service`, ...) itself; `systemd-analyze
//! syscall-filter` prints the same expansion, which is used here.

use std::{collections::BTreeSet, path::Path, process::Command};

use serde_json::{Value, json};

/// Where the profile is kept for users, and kubelet's name for it (`localhostProfile`).
pub const PROFILE: &str = "deploy/seccomp/imds-agent.json";

/// A unit's system call filter: what its allowlist names, what later `~` lines take out of
/// it, and `SystemCallErrorNumber=`.
pub struct UnitFilter {
    pub allowed: Vec<String>,
    pub denied: Vec<String>,
    pub errno: String,
}

/// The filter of the unit text `unit`; the first `SystemCallFilter=` must be an allowlist.
pub fn unit_filter(unit: &str) -> UnitFilter {
    let mut filter = UnitFilter {
        allowed: Vec::new(),
        denied: Vec::new(),
        errno: "EPERM".to_owned(),
    };
    for line in unit.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("SystemCallFilter=") {
            if let Some(denied) = value.strip_prefix('~') {
                assert!(
                    !filter.allowed.is_empty(),
                    "SystemCallFilter={value}: a deny-list, not the allowlist a profile is made of"
                );
                filter
                    .denied
                    .extend(denied.split_whitespace().map(str::to_owned));
            } else {
                filter
                    .allowed
                    .extend(value.split_whitespace().map(str::to_owned));
            }
        } else if let Some(value) = line.strip_prefix("SystemCallErrorNumber=") {
            value.clone_into(&mut filter.errno);
        }
    }
    filter
}

/// The system calls `entries` name, groups expanded as systemd expands them; `None` without
/// `systemd-analyze`.
pub fn expand(entries: &[String]) -> Option<BTreeSet<String>> {
    let listing = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .ok()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    // "@group" headers, then indented members (system calls, or other groups); comments
    // start with '#'. A section that is not a group ends with an unindented header.
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut current = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_owned());
            groups.entry(line.trim().to_owned()).or_default();
        } else if !line.starts_with(char::is_whitespace) {
            // Another section (the kernel's calls no group lists).
            current = None;
        } else if let Some(group) = &current {
            let member = line.trim();
            if !member.is_empty() && !member.starts_with('#') {
                groups
                    .get_mut(group)
                    .expect("group")
                    .push(member.to_owned());
            }
        }
    }
    let mut calls = BTreeSet::new();
    let mut pending: Vec<String> = entries.to_vec();
    let mut seen = BTreeSet::new();
    while let Some(entry) = pending.pop() {
        if !seen.insert(entry.clone()) {
            continue;
        }
        if entry.starts_with('@') {
            let members = groups
                .get(&entry)
                .unwrap_or_else(|| panic!("systemd-analyze knows no group {entry}"));
            pending.extend(members.iter().cloned());
        } else {
            calls.insert(entry);
        }
    }
    Some(calls)
}

/// The profile for `calls`: everything else fails with `errno`, as under the unit.
pub fn profile(calls: &BTreeSet<String>, errno: &str) -> Value {
    let errno = match errno {
        "EPERM" => libc::EPERM,
        "EACCES" => libc::EACCES,
        "ENOSYS" => libc::ENOSYS,
        other => panic!("SystemCallErrorNumber={other}: not mapped here"),
    };
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno,
        // The unit's SystemCallArchitectures=native, for the images' two architectures.
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": calls, "action": "SCMP_ACT_ALLOW"}],
    })
}

/// The profile the unit at `unit` makes, as the file holds it (pretty JSON, a final newline);
/// `None` without `systemd-analyze`.
pub fn profile_for_unit(unit: &Path) -> Option<String> {
    let text = std::fs::read_to_string(unit).expect("the unit file");
    let filter = unit_filter(&text);
    let denied = expand(&filter.denied)?;
    let calls = expand(&filter.allowed)?
        .into_iter()
        .filter(|call| !denied.contains(call))
        .collect();
    let mut out = serde_json::to_string_pretty(&profile(&calls, &filter.errno)).expect("JSON");
    out.push('\n');
    Some(out)
}
