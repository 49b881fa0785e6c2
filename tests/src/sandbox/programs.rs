//! What is attached to a cgroup, as bpftool reports it.

use super::*;

/// A program attached to a cgroup, as `bpftool cgroup show` lists it.
pub struct AttachedProgram {
    pub id: u64,
    /// bpftool's name for the attach type, e.g. `cgroup_inet4_connect`.
    pub attach_type: String,
}

/// The attach types of the programs attached to `cgroup`, sorted; `None` (after [`skip`])
/// without bpftool.
pub fn attach_types(cgroup: &Path) -> Option<Vec<String>> {
    match attached_programs(cgroup) {
        Ok(programs) => {
            let mut types: Vec<String> = programs.into_iter().map(|p| p.attach_type).collect();
            types.sort();
            Some(types)
        }
        Err(error) => {
            skip(&error);
            None
        }
    }
}

/// What the agent attaches to the enforced cgroup: programs that run at socket() and at
/// connect() or sendmsg() to an address, and nothing at the TCP events of every connection.
pub const ENFORCED_ATTACH_TYPES: [&str; 5] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_inet_sock_create",
    "cgroup_udp4_sendmsg",
    "cgroup_udp6_sendmsg",
];

/// The programs attached to `cgroup` (not inherited ones), from `bpftool -j cgroup show`;
/// an error if bpftool cannot be run or fails.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<AttachedProgram>, String> {
    let output = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .map_err(|e| format!("bpftool: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "bpftool cgroup show {}: {}",
            cgroup.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // Nothing attached: bpftool prints nothing at all.
    if output.stdout.trim_ascii().is_empty() {
        return Ok(Vec::new());
    }
    let listed: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("bpftool output: {e}"))?;
    Ok(listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(AttachedProgram {
                id: p["id"].as_u64()?,
                attach_type: p["attach_type"].as_str()?.to_owned(),
            })
        })
        .collect())
}
