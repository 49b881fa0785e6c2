//! Kernel verdicts: for a caller whose outcome no request can change (the policy refuses
//! everything it could ask, or `--unmatched bypass`), the kernel decides its next connects
//! itself, without diverting them. The policy says when (`policy::Admission`); this module
//! installs them and drops them all whenever the policy version changes (a reload, a policy
//! resource, a pod change), so that none outlives the policy that made it.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{HashMap, MapData};
use imds_common::{CallerKey, MAP_VERDICTS, VERDICT_BYPASS, VERDICT_REFUSE};

use super::LoaderError;
use crate::policy::KernelVerdict;

pub struct KernelVerdicts {
    map: Mutex<HashMap<MapData, CallerKey, u32>>,
    /// The policy version in force as last seen by [`KernelVerdicts::follow`] (0 before).
    version: AtomicU64,
}

impl KernelVerdicts {
    /// Verdicts in an adopted map were derived from the previous agent's policy, which may
    /// not be this one's: it starts from none (every caller is diverted and re-decided).
    pub(super) fn new(map: HashMap<MapData, CallerKey, u32>) -> Self {
        let verdicts = Self {
            map: Mutex::new(map),
            version: AtomicU64::new(0),
        };
        verdicts.clear();
        verdicts
    }

    /// Lets the kernel decide `caller`'s next connects, as the policy of `decided_with` said.
    /// The connection that asked is still served (the caller sees the 403 once, with the
    /// policy's name); later ones fail at connect() or are not diverted.
    pub fn install(&self, caller: CallerKey, verdict: KernelVerdict, decided_with: u64) {
        let value = match verdict {
            KernelVerdict::Refuse => VERDICT_REFUSE,
            KernelVerdict::Bypass => VERDICT_BYPASS,
        };
        let inserted = self
            .map
            .lock()
            .expect("verdicts lock")
            .insert(caller, value, 0)
            .map_err(|source| LoaderError::Map {
                name: MAP_VERDICTS,
                source,
            });
        if let Err(error) = inserted {
            tracing::warn!(%error, "cannot install a kernel verdict; the agent keeps deciding");
            return;
        }
        // A change between deciding and installing would leave a stale verdict: start over.
        let current = self.version.load(Ordering::SeqCst);
        if current != 0 && current != decided_with {
            self.clear();
        }
    }

    /// Forgets every installed verdict: callers are diverted to the agent again, which
    /// decides afresh and reinstalls what still holds.
    pub fn clear(&self) {
        let mut map = self.map.lock().expect("verdicts lock");
        let keys: Vec<CallerKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
    }

    /// Drops every verdict at each policy version change, until `changes` closes.
    pub async fn follow(&self, mut changes: tokio::sync::watch::Receiver<u64>) {
        self.version
            .store(*changes.borrow_and_update(), Ordering::SeqCst);
        while changes.changed().await.is_ok() {
            // The version first: an install racing with this clear then clears again.
            self.version
                .store(*changes.borrow_and_update(), Ordering::SeqCst);
            self.clear();
        }
    }
}
