//! What `imds-agent status` shows. The kernel side (attached links, counters) is read from
//! the pins; what only the running agent knows (policy version and sources, decisions,
//! recent denials) it writes to `<state-dir>/status.json` every second.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    loader::Counters,
    policy::store::PolicyStore,
    tally::{Denial, Tally},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub cgroup: PathBuf,
    pub listen: String,
    pub policy_version: u64,
    pub policy_sources: Vec<PathBuf>,
    pub policies: Vec<String>,
    pub decisions: BTreeMap<String, u64>,
    pub recent_denials: Vec<Denial>,
    /// Who reads what (`imds-agent report`).
    #[serde(default)]
    pub inventory: Vec<crate::inventory::WorkloadUse>,
}

pub const STATE_FILE: &str = "status.json";

/// Writes the state file every second (atomically: temp file, then rename).
pub async fn write_periodically(
    dir: PathBuf,
    base: AgentState,
    policy: Arc<PolicyStore>,
    tally: Arc<Tally>,
    inventory: Arc<crate::inventory::Inventory>,
) {
    if let Err(error) = std::fs::create_dir_all(&dir) {
        tracing::warn!(%error, dir = %dir.display(), "no state directory; `imds-agent status` will not show the agent");
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let current = policy.current();
        let (decisions, recent_denials) = tally.snapshot();
        let state = AgentState {
            policy_version: current.version,
            policy_sources: current
                .policies()
                .iter()
                .map(|p| p.source().to_owned())
                .collect(),
            policies: current
                .policies()
                .iter()
                .map(|p| p.name().to_owned())
                .collect(),
            decisions: decisions
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            recent_denials,
            inventory: inventory.snapshot(),
            ..base.clone()
        };
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let written = serde_json::to_vec_pretty(&state)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, dir.join(STATE_FILE)));
        if let Err(error) = written {
            tracing::warn!(%error, "cannot write the state file");
        }
    }
}

/// Reads the state file, if the agent that wrote it is still running.
pub fn read_state(dir: &Path) -> Option<AgentState> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
    let state: AgentState = serde_json::from_str(&text).ok()?;
    let alive = std::fs::read_to_string(format!("/proc/{}/comm", state.pid))
        .is_ok_and(|c| c.trim() == "imds-agent");
    alive.then_some(state)
}

/// The human-readable status.
pub fn render(
    pin_dir: &Path,
    attached: bool,
    counters: Counters,
    state: Option<&AgentState>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "enforcement: {} (pin dir {})",
        if attached { "attached" } else { "not attached" },
        pin_dir.display()
    );
    let _ = writeln!(
        out,
        "kernel: diverted {}, passed {}, refused {}, bypassed {}",
        counters.diverted, counters.passed, counters.refused, counters.bypassed
    );
    let Some(state) = state else {
        let note = if attached {
            "not running: enforced callers cannot reach the metadata service (fail closed)"
        } else {
            "not running"
        };
        let _ = writeln!(out, "agent: {note}");
        return out;
    };
    let _ = writeln!(
        out,
        "agent: running (pid {}), enforcing {}, listening on {}",
        state.pid,
        state.cgroup.display(),
        state.listen
    );
    let sources: Vec<String> = state
        .policy_sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let _ = writeln!(
        out,
        "policy: version {}, {} policies ({}) from {}",
        state.policy_version,
        state.policies.len(),
        state.policies.join(", "),
        if sources.is_empty() {
            "no files".to_owned()
        } else {
            sources.join(", ")
        }
    );
    let decisions: Vec<String> = state
        .decisions
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        out,
        "decisions: {}",
        if decisions.is_empty() {
            "none yet".to_owned()
        } else {
            decisions.join(", ")
        }
    );
    if state.recent_denials.is_empty() {
        let _ = writeln!(out, "recent denials: none");
    } else {
        let _ = writeln!(out, "recent denials (newest last):");
        for d in &state.recent_denials {
            let who = if d.unit.is_empty() {
                d.cgroup.clone()
            } else {
                d.unit.clone()
            };
            let _ = writeln!(
                out,
                "  {} {} uid={} comm={} {} {} -> policy '{}' rule '{}'",
                d.time, who, d.uid, d.comm, d.method, d.path, d.policy, d.rule
            );
        }
    }
    out
}
