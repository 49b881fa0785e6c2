//! The policy in force, replaced atomically on reload. A reload that finds any error keeps the
//! previous policy in force and says why, with file:line:column.
//!
//! Changes are found by polling the sources' file list, sizes and modification times (every
//! [`POLL_INTERVAL`]): unlike inotify this sees ConfigMap-style symlink swaps and edits on any
//! file system, costs a few stat calls, and needs no dependency. SIGHUP reloads at once.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;

use super::{Mode, Policy, PolicyError, PolicySet, Unmatched, plan::Versioned};

/// 100 ms: a change is in force within about that (the 200 ms reaction target), for a few
/// stat calls per file per tick.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

pub struct PolicyStore {
    sources: Vec<PathBuf>,
    unmatched: Unmatched,
    mode: Mode,
    current: ArcSwap<Versioned>,
    /// The policies from the files, as last loaded successfully.
    files: std::sync::Mutex<PolicySet>,
    /// Policies from API resources (ImdsPolicy, ClusterImdsPolicy), each validated already.
    resources: std::sync::Mutex<Vec<Policy>>,
    /// Serialises changes, so that versions are consecutive and none is lost.
    change: std::sync::Mutex<()>,
    fingerprint: std::sync::Mutex<Fingerprint>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// The version in force, for those who must act on a change (kernel verdicts).
    changes: tokio::sync::watch::Sender<u64>,
}

/// What the sources look like on disk: (path, size, mtime) of every file, in order.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

impl PolicyStore {
    /// Loads the files; `mode` is the agent's (`--mode audit`: a dry run).
    pub fn load(
        sources: Vec<PathBuf>,
        unmatched: Unmatched,
        mode: Mode,
    ) -> Result<Self, Vec<PolicyError>> {
        let fingerprint = fingerprint(&sources);
        let set = PolicySet::load(&sources, unmatched)?.with_mode(mode);
        Ok(Self {
            sources,
            unmatched,
            mode,
            current: ArcSwap::from_pointee(Versioned::new(1, Arc::new(set.clone()))),
            files: std::sync::Mutex::new(set),
            resources: std::sync::Mutex::new(Vec::new()),
            change: std::sync::Mutex::new(()),
            fingerprint: std::sync::Mutex::new(fingerprint),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(1),
        })
    }

    /// Notified with the new version after every successful reload.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The policy in force. Cheap (an atomic load); callers hold the Arc for as long as they
    /// need one consistent view, e.g. for one request.
    pub fn current(&self) -> Arc<Versioned> {
        self.current.load_full()
    }

    /// Reads the sources again. On success the new set is in force for every request that
    /// starts after this returns; on failure nothing changes.
    pub fn reload(&self) -> Result<u64, Vec<PolicyError>> {
        *self.fingerprint.lock().expect("fingerprint lock") = fingerprint(&self.sources);
        match PolicySet::load(&self.sources, self.unmatched) {
            Ok(set) => {
                *self.files.lock().expect("files lock") = set.with_mode(self.mode);
                let version = self.recompose();
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(version)
            }
            Err(errors) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(errors)
            }
        }
    }

    /// Puts these resource policies in force (with the files' policies), replacing the
    /// previous ones. They were validated one by one; resource names cannot clash with file
    /// names (they contain a '/').
    pub fn set_resources(&self, policies: Vec<Policy>) -> u64 {
        *self.resources.lock().expect("resources lock") = policies;
        self.recompose()
    }

    /// A new version of the same policies, for a change of something else decisions depend on
    /// (pod metadata): cached selections are dropped, kernel verdicts asked again.
    pub fn bump(&self) -> u64 {
        let _change = self.change.lock().expect("change lock");
        let current = self.current.load_full();
        let version = current.version + 1;
        self.current.store(Arc::new(current.next()));
        self.changes.send_replace(version);
        version
    }

    fn recompose(&self) -> u64 {
        let _change = self.change.lock().expect("change lock");
        let set = self
            .files
            .lock()
            .expect("files lock")
            .with(&self.resources.lock().expect("resources lock"));
        let version = self.current.load().version + 1;
        self.current
            .store(Arc::new(Versioned::new(version, Arc::new(set))));
        self.changes.send_replace(version);
        version
    }

    /// Whether the sources changed on disk since the last load or reload.
    pub fn changed(&self) -> bool {
        *self.fingerprint.lock().expect("fingerprint lock") != fingerprint(&self.sources)
    }

    /// Reloads and logs the outcome; `why` says what triggered it.
    pub fn reload_and_log(&self, why: &str) {
        match self.reload() {
            Ok(version) => {
                let current = self.current();
                tracing::info!(
                    version,
                    trigger = why,
                    policies = ?current.policies().iter().map(|p| p.name()).collect::<Vec<_>>(),
                    "policy reloaded"
                );
            }
            Err(errors) => {
                for error in &errors {
                    tracing::error!(trigger = why, %error, "policy reload rejected; the previous policy stays in force");
                }
            }
        }
    }

    /// Polls the sources and reloads on change, until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut interval = tokio::time::interval(POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let store = self.clone();
            // stat calls are blocking; keep them off the async workers.
            let changed = tokio::task::spawn_blocking(move || store.changed())
                .await
                .unwrap_or(false);
            if changed {
                let store = self.clone();
                let _ =
                    tokio::task::spawn_blocking(move || store.reload_and_log("file change")).await;
            }
        }
    }
}

fn fingerprint(sources: &[PathBuf]) -> Fingerprint {
    let mut files = Vec::new();
    for source in sources {
        match std::fs::read_dir(source) {
            Ok(entries) => {
                let mut paths: Vec<PathBuf> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                paths.sort();
                files.extend(paths);
            }
            Err(_) => files.push(source.clone()),
        }
    }
    files
        .into_iter()
        .map(|path| {
            // metadata() follows symlinks: a swapped link target shows as a change.
            let meta = std::fs::metadata(&path).ok();
            let size = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let modified = meta.and_then(|m| m.modified().ok());
            (path, size, modified)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_edit_keeps_the_previous_policy_and_a_fix_applies() {
        let dir = std::env::temp_dir().join(format!("imds-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.yaml");
        std::fs::write(&file, "name: one\ndefault: deny\n").unwrap();
        let store = PolicyStore::load(vec![dir.clone()], Unmatched::Deny, Mode::Enforce).unwrap();
        assert_eq!(store.current().version, 1);
        assert!(!store.changed());

        std::fs::write(&file, "name: one\ndefault: maybe\n").unwrap();
        assert!(store.changed());
        let errors = store.reload().unwrap_err();
        assert!(errors[0].to_string().contains("p.yaml:2:10"), "{errors:?}");
        assert_eq!(store.current().version, 1);
        assert_eq!(store.current().policies()[0].name(), "one");
        assert_eq!(store.reload_failures.load(Ordering::Relaxed), 1);

        std::fs::write(&file, "name: two\ndefault: allow\n").unwrap();
        assert_eq!(store.reload().unwrap(), 2);
        assert_eq!(store.current().policies()[0].name(), "two");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
