//! Kernel verdicts: for a caller whose outcome no request can change (the policy refuses
//! everything it could ask, or `--unmatched bypass`), the kernel decides its next connects
//! itself, without diverting them. The policy says when (`policy::Admission`); this module
//! installs them and, whenever the policy version changes (a reload, a policy resource, a pod
//! change), asks again for each one and removes those the new version does not make, so that
//! none outlives the policy that made it and those that still hold stay (an upgrade or a
//! restart keeps them: the map is pinned).

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
    /// Verdicts in an adopted map were derived from the previous agent's policy: they stand
    /// until [`KernelVerdicts::follow`] first asks this agent's policy about each of them.
    pub(super) fn new(map: HashMap<MapData, CallerKey, u32>) -> Self {
        Self {
            map: Mutex::new(map),
            version: AtomicU64::new(0),
        }
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
        // A change between deciding and installing: the revalidation may have run before the
        // insert, so this verdict is taken back (the caller is decided afresh).
        let current = self.version.load(Ordering::SeqCst);
        if current != 0 && current != decided_with {
            let _ = self.map.lock().expect("verdicts lock").remove(&caller);
        }
    }

    /// Keeps each installed verdict that `still_made` makes again for its caller and removes
    /// the others; returns how many were (kept, removed).
    pub fn revalidate(
        &self,
        still_made: impl Fn(CallerKey) -> Option<KernelVerdict>,
    ) -> (usize, usize) {
        let mut map = self.map.lock().expect("verdicts lock");
        let installed: Vec<(CallerKey, u32)> = map.iter().filter_map(Result::ok).collect();
        let (mut kept, mut removed) = (0, 0);
        for (caller, value) in installed {
            let again = still_made(caller).map(|verdict| match verdict {
                KernelVerdict::Refuse => VERDICT_REFUSE,
                KernelVerdict::Bypass => VERDICT_BYPASS,
            });
            if again == Some(value) {
                kept += 1;
            } else {
                let _ = map.remove(&caller);
                removed += 1;
            }
        }
        (kept, removed)
    }

    /// Revalidates every verdict now (the first time: those a predecessor installed), then at
    /// each policy version change, until `changes` closes.
    pub async fn follow(
        &self,
        mut changes: tokio::sync::watch::Receiver<u64>,
        still_made: impl Fn(CallerKey) -> Option<KernelVerdict>,
    ) {
        loop {
            // The version first: an install decided with an older one then takes itself back.
            self.version
                .store(*changes.borrow_and_update(), Ordering::SeqCst);
            let (kept, removed) = self.revalidate(&still_made);
            if kept + removed > 0 {
                tracing::debug!(kept, removed, "kernel verdicts revalidated");
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}
