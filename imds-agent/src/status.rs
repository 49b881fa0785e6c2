//! What `imds-agent status` shows. The kernel side (attached links, counters) is read from
//! the pins; what only the running agent knows (policy version and sources, decisions,
//! recent denials) it writes to `<state-dir>/status.json` every second.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{loader::Counters, policy::store::PolicyStore};

/// Denials kept for `status`.
const RECENT: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Denial {
    pub time: String,
    pub cgroup: String,
    pub unit: String,
    pub uid: u32,
    pub comm: String,
    pub method: String,
    pub path: String,
    pub policy: String,
    pub rule: String,
}

/// Counts and recent denials, updated by the proxy.
#[derive(Debug, Default)]
pub struct Tally {
    decisions: Mutex<BTreeMap<&'static str, u64>>,
    denials: Mutex<VecDeque<Denial>>,
}

impl Tally {
    pub fn record(&self, decision: &'static str) {
        *self
            .decisions
            .lock()
            .expect("tally lock")
            .entry(decision)
            .or_default() += 1;
    }

    pub fn denied(&self, denial: Denial) {
        let mut denials = self.denials.lock().expect("tally lock");
        if denials.len() == RECENT {
            denials.pop_front();
        }
        denials.push_back(denial);
    }
}

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
        let state = AgentState {
            policy_version: current.version,
            policy_sources: current
                .set
                .policies()
                .iter()
                .map(|p| p.source().to_owned())
                .collect(),
            policies: current
                .set
                .policies()
                .iter()
                .map(|p| p.name().to_owned())
                .collect(),
            decisions: tally
                .decisions
                .lock()
                .expect("tally lock")
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            recent_denials: tally
                .denials
                .lock()
                .expect("tally lock")
                .iter()
                .cloned()
                .collect(),
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

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC): audit-friendly, and what AWS credential JSON uses.
pub fn iso8601(time: SystemTime) -> String {
    format!("{}Z", iso8601_seconds(time))
}

/// As [`iso8601`], with microseconds (`2026-11-24T00:00:00.000123Z`), as tracing-subscriber
/// writes timestamps.
pub fn iso8601_micros(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    // One audit line per request: the date part is formatted once per second and thread.
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    SECOND.with_borrow_mut(|(secs, text)| {
        if *secs != since_epoch.as_secs() {
            *secs = since_epoch.as_secs();
            *text = iso8601_seconds(time);
        }
        format!("{text}.{:06}Z", since_epoch.subsec_micros())
    })
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC.
fn iso8601_seconds(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_secs(1_795_478_400)),
            "2026-11-24T00:00:00Z"
        );
        // Microseconds; the cached date part follows the second.
        let at = |micros: u64| iso8601_micros(UNIX_EPOCH + Duration::from_micros(micros));
        assert_eq!(at(1_795_478_400_000_123), "2026-11-24T00:00:00.000123Z");
        assert_eq!(at(1_795_478_400_999_999), "2026-11-24T00:00:00.999999Z");
        assert_eq!(at(1_795_478_401_000_000), "2026-11-24T00:00:01.000000Z");
        assert_eq!(at(1_795_478_400_000_001), "2026-11-24T00:00:00.000001Z");
    }
}
