//! What the proxy counts for `imds-agent status`: decisions, and the latest denials.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

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

impl Tally {
    /// Decisions by kind, and the latest denials, oldest first.
    pub fn snapshot(&self) -> (BTreeMap<&'static str, u64>, Vec<Denial>) {
        (
            self.decisions.lock().expect("tally lock").clone(),
            self.denials
                .lock()
                .expect("tally lock")
                .iter()
                .cloned()
                .collect(),
        )
    }
}
