//! The policy in force, replaced atomically on reload. A reload that finds any error keeps the
//! previous policy in force and says why, with file:line:column.
//!
//! A change is noticed by inotify on the sources' directories (a file source: its parent's),
//! which also reports ConfigMap-style symlink swaps and editors' rename-over saves; each
//! notification is checked against the sources' file list, sizes and modification times, and
//! only a real change reloads. A slower poll of the same fingerprint stays as the fallback
//! ([`FALLBACK_POLL`]; [`POLL_INTERVAL`] where inotify is not available), for file systems
//! without notifications and directories replaced whole. SIGHUP reloads at once.

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

/// Without inotify: a change is in force within about 100 ms (the 200 ms reaction target), for
/// a few stat calls per file per tick.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// With inotify, the poll that finds what no notification reported.
pub const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// Writes come in bursts (an editor's save, kubelet's swap of a ConfigMap's files): a
/// notification is acted on once the burst has settled this long.
const SETTLE: Duration = Duration::from_millis(5);

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

    /// Reloads on change, until the task is dropped: at once on a file notification, else
    /// at the next poll.
    pub async fn watch(self: Arc<Self>) {
        use futures::{FutureExt as _, StreamExt as _};
        let mut notifications = Notifications::new(&self.sources);
        let poll = if notifications.is_some() {
            FALLBACK_POLL
        } else {
            POLL_INTERVAL
        };
        let mut interval = tokio::time::interval(poll);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let notified = async {
                match &mut notifications {
                    Some(n) => n.events.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interval.tick() => {}
                event = notified => {
                    if event.is_none() {
                        tracing::warn!("file notifications ended; polling the policy files instead");
                        notifications = None;
                        interval = tokio::time::interval(POLL_INTERVAL);
                        continue;
                    }
                    tokio::time::sleep(SETTLE).await;
                    // What else arrived in the burst is covered by this one check.
                    if let Some(n) = &mut notifications {
                        while n.events.next().now_or_never().flatten().is_some() {}
                    }
                }
            }
            let store = self.clone();
            // Watches are armed again first: links may now lead to other directories, and a
            // directory replaced whole took its watch with it.
            let watches = notifications.as_ref().map(|n| n.watches.clone());
            // stat calls are blocking; keep them off the async workers.
            let changed = tokio::task::spawn_blocking(move || {
                if let Some(watches) = watches {
                    arm(&watches, &store.sources);
                }
                store.changed()
            })
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

/// inotify watches on the directories that hold the sources.
struct Notifications {
    events: inotify::EventStream<[u8; 4096]>,
    watches: Arc<std::sync::Mutex<inotify::Watches>>,
}

impl Notifications {
    /// `None` where inotify cannot be used (then only the poll finds changes).
    fn new(sources: &[PathBuf]) -> Option<Self> {
        let inotify = inotify::Inotify::init()
            .inspect_err(|error| tracing::warn!(%error, "no file notifications; polling the policy files every 100 ms"))
            .ok()?;
        let watches = inotify.watches();
        let events = inotify.into_event_stream([0u8; 4096]).ok()?;
        let watches = Arc::new(std::sync::Mutex::new(watches));
        arm(&watches, sources);
        Some(Self { events, watches })
    }
}

/// Watches each source directory, each file source's directory, and the directory that each
/// policy file's link leads to (adding a watch that exists is a no-op; a directory that was
/// replaced gets a new one).
fn arm(watches: &std::sync::Mutex<inotify::Watches>, sources: &[PathBuf]) {
    use inotify::WatchMask as M;
    let mask = M::CREATE
        | M::DELETE
        | M::MODIFY
        | M::CLOSE_WRITE
        | M::MOVED_FROM
        | M::MOVED_TO
        | M::ATTRIB
        | M::DELETE_SELF
        | M::MOVE_SELF;
    let mut watches = watches.lock().expect("watches lock");
    for source in sources {
        let dir = if source.is_dir() {
            source.as_path()
        } else {
            match source.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => std::path::Path::new("."),
            }
        };
        let mut dirs = vec![dir.to_path_buf()];
        let files = match std::fs::read_dir(source) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => vec![source.clone()],
        };
        dirs.extend(files.iter().filter_map(|file| {
            let target = std::fs::canonicalize(file).ok()?;
            target.parent().map(std::path::Path::to_path_buf)
        }));
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            if let Err(error) = watches.add(&dir, mask) {
                tracing::debug!(%error, dir = %dir.display(), "cannot watch a policy directory; the poll covers it");
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

    /// Until the store's version passes `version`, at most `limit`; how long it took.
    async fn reloaded(store: &PolicyStore, version: u64, limit: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        while store.current().version == version {
            if started.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Some(started.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_edit_and_a_configmap_swap_apply_on_notification_not_at_the_next_poll() {
        let dir = std::env::temp_dir().join(format!("imds-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A ConfigMap volume: p.yaml -> ..data/p.yaml, ..data -> ..v1.
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/p.yaml"), "name: one\ndefault: deny\n").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/p.yaml", dir.join("p.yaml")).unwrap();
        let store =
            Arc::new(PolicyStore::load(vec![dir.clone()], Unmatched::Deny, Mode::Enforce).unwrap());
        let watcher = tokio::spawn(store.clone().watch());
        // Past the poll's first tick, which comes at once.
        tokio::time::sleep(Duration::from_millis(100)).await;

        // kubelet's update: a new directory, a new link renamed over ..data.
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/p.yaml"), "name: two\ndefault: deny\n").unwrap();
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let took = reloaded(&store, 1, FALLBACK_POLL / 2).await;
        assert!(took.is_some(), "no reload within half the fallback poll");
        assert_eq!(store.current().policies()[0].name(), "two");

        // An edit of the file a policy's link leads to.
        let file = dir.join("..v2/p.yaml");
        let version = store.current().version;
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&file, "name: three\ndefault: deny\n").unwrap();
        assert!(reloaded(&store, version, FALLBACK_POLL / 2).await.is_some());
        assert_eq!(store.current().policies()[0].name(), "three");
        watcher.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
