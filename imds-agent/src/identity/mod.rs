//! Who is calling: from the kernel-attested cgroup id, uid and gid of a diverted connection to
//! a cgroup path, the workload (pod and container, systemd unit), and the process. Never from
//! the source address.

pub mod attribution;
pub mod executable;
pub mod pods;
pub mod workload;

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use executable::{Digests, Executable};
use imds_common::Caller;
pub use imds_common::CallerKey;
use pods::{PodDirectory, PodInfo};
pub use workload::Workload;

/// A caller as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cgroup_id: u64,
    /// The cgroup path relative to the root of the enforced tree (`/` is the root itself), or
    /// `None` when the cgroup could not be resolved (removed, or outside the tree): such a
    /// caller is denied.
    pub cgroup: Option<String>,
    pub workload: Workload,
    /// The pod's metadata, when the cgroup is a pod's and the pod is known.
    pub pod: Option<Arc<PodInfo>>,
    /// The container's name in its pod, when known.
    pub container: Option<String>,
    /// The systemd unit the cgroup belongs to (deepest `*.service` or `*.scope` component).
    pub unit: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The process name (informational: a process can rename itself), as it was when the
    /// process's current program first connected.
    pub comm: Option<String>,
    /// The executable of the process's current program, read from /proc when that program
    /// first connects and only if the pid still names the process that connected (a reused
    /// pid gives `None`, which no `executables` selector matches), with whether it is the
    /// node's file at its path (see `executable`).
    pub exe: Option<Executable>,
}

impl Identity {
    /// The caller as the kernel attested it.
    pub fn key(&self) -> CallerKey {
        CallerKey {
            cgroup_id: self.cgroup_id,
            uid: self.uid,
            gid: self.gid,
        }
    }

    /// An identity for a cgroup path, as `policy explain` and tests build one.
    pub fn for_cgroup(cgroup: &str, uid: u32, gid: u32, pods: &PodDirectory) -> Self {
        let workload = workload::parse(cgroup);
        let (pod, container) = pod_and_container(&workload, pods);
        Self {
            cgroup_id: 0,
            unit: unit_of(cgroup),
            cgroup: Some(cgroup.to_owned()),
            workload,
            pod,
            container,
            uid,
            gid,
            pid: 0,
            comm: None,
            exe: None,
        }
    }
}

fn pod_and_container(
    workload: &Workload,
    pods: &PodDirectory,
) -> (Option<Arc<PodInfo>>, Option<String>) {
    let Workload::Pod {
        pod_uid,
        container_id,
        ..
    } = workload
    else {
        return (None, None);
    };
    let pod = pods.get(pod_uid);
    let container = pod
        .as_ref()
        .zip(container_id.as_deref())
        .and_then(|(pod, id)| pod.container_name(id).map(str::to_owned));
    (pod, container)
}

/// How many cgroup id -> path entries, and how many process images, are kept.
const CACHE_CAPACITY: usize = 4096;

/// Resolves cgroup ids below one enforced root.
pub struct Resolver {
    mount: PathBuf,
    mount_fd: File,
    /// The enforced root, relative to the mount (`/` for the whole hierarchy).
    root: String,
    pods: Arc<PodDirectory>,
    /// cgroup id -> path relative to the mount.
    paths: Mutex<Bounded<u64, String>>,
    images: Mutex<Bounded<ImageKey, ProcessImage>>,
    /// The identities of callers' process images, each with the pods' generation it was made
    /// in: SDKs open a connection per request, and an identity made anew for each took five
    /// allocations (its paths, unit, executable and name) and their frees.
    identities: Mutex<Bounded<IdentityKey, (u64, Arc<Identity>)>>,
    digests: Digests,
    /// Clock ticks per second, the unit of a process's start time in /proc/<pid>/stat.
    clock_ticks: u64,
}

/// A map that keeps at most [`CACHE_CAPACITY`] entries (oldest out first).
struct Bounded<K, V> {
    entries: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: std::hash::Hash + Eq + Clone, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Bounded<K, V> {
    fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    fn insert(&mut self, key: K, value: V) {
        if self.entries.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > CACHE_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }
}

/// One program image of one process, as the connect programs name it: a reused pid has
/// another start time, and exec() changes the exec count.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ImageKey {
    pid: u32,
    start: u64,
    exec_id: u32,
}

impl ImageKey {
    /// The image the caller connected from; `None` when the kernel could not name it.
    fn of(caller: &Caller) -> Option<Self> {
        (caller.process_start != 0).then_some(Self {
            pid: caller.pid,
            start: caller.process_start,
            exec_id: caller.exec_id,
        })
    }
}

/// A caller and the process image it connected from.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct IdentityKey {
    caller: CallerKey,
    image: ImageKey,
}

/// What /proc said about a process image when it first connected.
#[derive(Clone)]
struct ProcessImage {
    exe: Option<Executable>,
    comm: Option<String>,
}

/// `FILEID_KERNFS` (include/linux/exportfs.h): cgroup2 file handles carry the 64-bit cgroup id.
const FILEID_KERNFS: libc::c_int = 0xfe;

#[repr(C)]
struct KernfsHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    cgroup_id: u64,
}

impl Resolver {
    /// `mount` is the cgroup2 mount point; `root` the enforced cgroup directory below it.
    pub fn new(mount: &Path, root: &Path, pods: Arc<PodDirectory>) -> io::Result<Self> {
        let mount_fd = File::open(mount)?;
        let relative = root.strip_prefix(mount).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cgroup {} is not below the cgroup2 mount {}",
                    root.display(),
                    mount.display()
                ),
            )
        })?;
        Ok(Self {
            mount: mount.to_owned(),
            mount_fd,
            root: format!("/{}", relative.display())
                .trim_end_matches('/')
                .to_owned(),
            pods,
            paths: Mutex::default(),
            images: Mutex::default(),
            identities: Mutex::default(),
            digests: Digests::default(),
            // SAFETY: sysconf has no preconditions.
            clock_ticks: u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
                .ok()
                .filter(|ticks| (1..=1_000_000_000).contains(ticks))
                .unwrap_or(100),
        })
    }

    pub fn pods(&self) -> &PodDirectory {
        &self.pods
    }

    /// Whether executables' digests are read: while a policy pins one.
    pub fn want_digests(&self, wanted: bool) {
        self.digests.want(wanted);
    }

    /// The caller's identity: made once per process image (when the kernel named it) and
    /// pods' generation, then shared by the image's connections.
    pub fn identify(&self, caller: &Caller) -> Arc<Identity> {
        let key = ImageKey::of(caller).map(|image| IdentityKey {
            caller: caller.key(),
            image,
        });
        let generation = self.pods.generation();
        if let Some(key) = &key
            && let Some((made_in, identity)) =
                self.identities.lock().expect("identities lock").get(key)
            && *made_in == generation
            && !self.digest_missing(identity.exe.as_ref())
        {
            return identity.clone();
        }
        let identity = Arc::new(self.resolve(caller));
        // Only what was read whole is kept: a cgroup not resolved or an executable not read
        // (an error reading /proc) is tried again at the image's next connection.
        if let Some(key) = key
            && identity.cgroup.is_some()
            && identity.exe.is_some()
        {
            self.identities
                .lock()
                .expect("identities lock")
                .insert(key, (generation, identity.clone()));
        }
        identity
    }

    fn resolve(&self, caller: &Caller) -> Identity {
        let full_path = self.cached_path(caller.cgroup_id);
        let cgroup = full_path
            .as_deref()
            .and_then(|path| relative_to(&self.root, path));
        let workload = cgroup.as_deref().map_or(Workload::Other, workload::parse);
        let (pod, container) = pod_and_container(&workload, &self.pods);
        // A container's executable is named in its own file system (see `executable`).
        let in_container = matches!(workload, Workload::Pod { .. });
        let process = self.process_image(caller, full_path.as_deref(), in_container);
        Identity {
            cgroup_id: caller.cgroup_id,
            unit: cgroup.as_deref().and_then(unit_of),
            exe: process.exe,
            cgroup,
            workload,
            pod,
            container,
            uid: caller.uid,
            gid: caller.gid,
            pid: caller.pid,
            comm: process.comm,
        }
    }

    /// A caller known only by its key (no process: its executable and name are unknown), as
    /// kernel verdicts name callers; `None` once the cgroup is gone or outside the tree.
    pub fn identify_key(&self, key: CallerKey) -> Option<Identity> {
        let cgroup = relative_to(&self.root, &self.live_path(key.cgroup_id)?)?;
        let workload = workload::parse(&cgroup);
        let (pod, container) = pod_and_container(&workload, &self.pods);
        Some(Identity {
            cgroup_id: key.cgroup_id,
            unit: unit_of(&cgroup),
            cgroup: Some(cgroup),
            workload,
            pod,
            container,
            uid: key.uid,
            gid: key.gid,
            pid: 0,
            comm: None,
            exe: None,
        })
    }

    /// The caller's executable and name: read once per process image and then cached, when
    /// the kernel named the image; otherwise read for each connection, with the process's
    /// cgroup as the check that the pid was not reused.
    fn process_image(
        &self,
        caller: &Caller,
        cgroup: Option<&str>,
        container: bool,
    ) -> ProcessImage {
        let Some(key) = ImageKey::of(caller) else {
            return ProcessImage {
                exe: cgroup
                    .filter(|path| in_cgroup(caller.pid, path))
                    .and_then(|_| executable::read(caller.pid, container, &self.digests)),
                comm: process_name(caller.pid),
            };
        };
        if let Some(image) = self.images.lock().expect("images lock").get(&key) {
            // Read before a policy pinned a digest: read again, for the digest.
            if !self.digest_missing(image.exe.as_ref()) {
                return image.clone();
            }
        }
        let read = || executable::read(caller.pid, container, &self.digests);
        let Some(image) = read_image(caller.pid, caller.process_start, self.clock_ticks, read)
        else {
            // Gone, or the pid is another process's now: nothing to cache.
            return ProcessImage {
                exe: None,
                comm: None,
            };
        };
        self.images
            .lock()
            .expect("images lock")
            .insert(key, image.clone());
        image
    }

    /// Whether `exe` was read before a policy pinned a digest (it is read again, for one).
    fn digest_missing(&self, exe: Option<&Executable>) -> bool {
        self.digests.wanted() && exe.is_some_and(|e| e.sha256.is_none())
    }

    /// The cgroup's path, from the cache once resolved. On cgroup2 a cached path stays true
    /// for as long as anything can carry its id: a cgroup2 directory cannot be renamed (the
    /// kernel refuses with EPERM; only cgroup1 hierarchies have rename) and its id, a 64-bit
    /// kernfs node id, is never given to another cgroup while the hierarchy exists. A caller's
    /// id came from a connect() made inside that cgroup, so its path is the one cached, even if
    /// the cgroup has since been removed. Checking the path again for each connection (a stat
    /// of it) cost about 7% of the agent's CPU time per new connection (`imds-bench builds`).
    fn cached_path(&self, cgroup_id: u64) -> Option<String> {
        if let Some(path) = self.paths.lock().expect("paths lock").get(&cgroup_id) {
            return Some(path.clone());
        }
        let path = self.cgroup_path(cgroup_id).ok()?;
        self.paths
            .lock()
            .expect("paths lock")
            .insert(cgroup_id, path.clone());
        Some(path)
    }

    /// The path of a cgroup that still exists (a removed one's path stays cached, for the
    /// connections made in it before).
    fn live_path(&self, cgroup_id: u64) -> Option<String> {
        let path = self.cached_path(cgroup_id)?;
        let full = self.mount.join(path.trim_start_matches('/'));
        std::fs::metadata(&full)
            .is_ok_and(|m| m.ino() == cgroup_id)
            .then_some(path)
    }

    /// Whether a live cgroup is in the enforced tree.
    pub fn is_enforced(&self, cgroup_id: u64) -> bool {
        self.cgroup_path(cgroup_id)
            .is_ok_and(|path| relative_to(&self.root, &path).is_some())
    }

    /// The path of a live cgroup relative to the mount, found by opening it by id: exact and
    /// O(1), where scanning the tree would be slow and racy.
    pub fn cgroup_path(&self, cgroup_id: u64) -> io::Result<String> {
        let mut handle = KernfsHandle {
            handle_bytes: std::mem::size_of::<u64>() as libc::c_uint,
            handle_type: FILEID_KERNFS,
            cgroup_id,
        };
        // SAFETY: the handle is a valid file_handle header followed by its 8 bytes.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount_fd.as_raw_fd(),
                (&mut handle as *mut KernfsHandle).cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by the kernel and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let relative = link.strip_prefix(&self.mount).map_err(|_| {
            io::Error::new(io::ErrorKind::NotFound, "cgroup outside the cgroup2 mount")
        })?;
        Ok(format!("/{}", relative.display()))
    }
}

/// `path` relative to `root` (both relative to the mount, starting with `/`), if below it.
fn relative_to(root: &str, path: &str) -> Option<String> {
    if root.is_empty() {
        return Some(path.to_owned());
    }
    let rest = path.strip_prefix(root)?;
    match rest {
        "" => Some("/".to_owned()),
        _ if rest.starts_with('/') => Some(rest.to_owned()),
        _ => None,
    }
}

/// The deepest `*.service` or `*.scope` component of a cgroup path, as systemd names units.
pub fn unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .split('/')
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// Whether process `pid` is still in `cgroup` (mount-relative path): a pid reused by a
/// process elsewhere must not lend its executable to this connection.
fn in_cgroup(pid: u32, cgroup: &str) -> bool {
    read_proc(&format!("/proc/{pid}/cgroup"))
        .is_some_and(|cgroups| cgroups.lines().find_map(|l| l.strip_prefix("0::")) == Some(cgroup))
}

/// The executable and name of process `pid`, if it is still the process that started at
/// `start` (nanoseconds since boot, as the kernel recorded it at connect()). The executable is
/// read before the start time is checked: a pid that names the connecting process after the
/// read named it during the read too (a pid never returns to an earlier process).
fn read_image(
    pid: u32,
    start: u64,
    clock_ticks: u64,
    read_exe: impl FnOnce() -> Option<Executable>,
) -> Option<ProcessImage> {
    let exe = read_exe();
    let stat = read_proc(&format!("/proc/{pid}/stat"))?;
    let (comm, started_ticks) = parse_stat(&stat)?;
    // The kernel reports start_boottime in clock ticks, truncated (nsec_to_clock_t).
    let expected_ticks = start / (1_000_000_000 / clock_ticks);
    (started_ticks == expected_ticks).then(|| ProcessImage {
        exe,
        comm: Some(comm.to_owned()),
    })
}

/// The name and the start time (field 22, in clock ticks since boot) from a /proc/<pid>/stat
/// line. The name is between the first `(` and the last `)`: it may hold either, and spaces.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // Fields 3 onwards follow the name: the start time is the 20th of them.
    let start = stat.get(close + 1..)?.split_ascii_whitespace().nth(19)?;
    Some((comm, start.parse().ok()?))
}

fn process_name(pid: u32) -> Option<String> {
    let comm = read_proc(&format!("/proc/{pid}/comm"))?;
    Some(comm.trim_end().to_owned())
}

/// A small /proc file in one read (read_to_string would stat it first and read twice: a
/// new connection's identity reads two of these). Not procfs's readers, which parse every
/// field of a file through a buffered reader: this is on the path of each new caller.
fn read_proc(path: &str) -> Option<String> {
    use std::io::Read as _;
    let mut file = File::open(path).ok()?;
    let mut buffer = [0u8; 1024];
    let n = file.read(&mut buffer).ok()?;
    if n == buffer.len() {
        // Longer than expected (deep cgroup paths): read the rest too.
        let mut text = String::from_utf8(buffer.to_vec()).ok()?;
        file.read_to_string(&mut text).ok()?;
        return Some(text);
    }
    String::from_utf8(buffer[..n].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_to_the_enforced_root() {
        assert_eq!(relative_to("", "/a/b").as_deref(), Some("/a/b"));
        assert_eq!(relative_to("/t/enf", "/t/enf/web").as_deref(), Some("/web"));
        assert_eq!(relative_to("/t/enf", "/t/enf").as_deref(), Some("/"));
        assert_eq!(relative_to("/t/enf", "/t/enforced/web"), None);
        assert_eq!(relative_to("/t/enf", "/other"), None);
    }

    #[test]
    fn proc_files_read_whole_short_or_long() {
        let comm = read_proc("/proc/self/comm").expect("comm");
        assert_eq!(comm, std::fs::read_to_string("/proc/self/comm").unwrap());
        // /proc/self/status is longer than the first read.
        let status = read_proc("/proc/self/status").expect("status");
        assert!(status.len() > 1024 && status.contains("VmRSS"), "{status}");
        assert_eq!(read_proc("/proc/self/no-such-file"), None);
    }

    #[test]
    fn stat_lines_give_the_name_and_start_time_whatever_the_name_holds() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 20 21";
        assert_eq!(
            parse_stat(&format!("77 (curl) {tail}")),
            Some(("curl", 4242))
        );
        assert_eq!(
            parse_stat(&format!("77 (a) b (c)) {tail}")),
            Some(("a) b (c)", 4242))
        );
        assert_eq!(parse_stat("77 (curl) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    /// This process's start time as the kernel records it at connect(), to the tick.
    fn own_start_ns(clock_ticks: u64) -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (_, ticks) = parse_stat(&stat).expect("own stat");
        ticks * (1_000_000_000 / clock_ticks)
    }

    #[test]
    fn a_process_image_is_read_only_while_its_pid_names_the_process_that_connected() {
        let clock_ticks = 100;
        let pid = std::process::id();
        let start = own_start_ns(clock_ticks);
        let digests = Digests::default();
        let read = || executable::read(pid, false, &digests);
        let image = read_image(pid, start, clock_ticks, read).expect("own image");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(image.exe.map(|e| e.path).as_deref(), exe.to_str());
        assert_eq!(
            image.comm.as_deref(),
            Some(
                std::fs::read_to_string("/proc/self/comm")
                    .unwrap()
                    .trim_end()
            )
        );
        // The same pid with another start time: a process that has gone, its pid reused.
        let later = start + 1_000_000_000 / clock_ticks;
        let read = || executable::read(pid, false, &digests);
        assert!(read_image(pid, later, clock_ticks, read).is_none());
    }

    #[test]
    fn an_identity_is_made_once_per_process_image_and_again_when_the_pods_change() {
        let pods = Arc::new(PodDirectory::default());
        let dir = std::env::temp_dir();
        let resolver = Resolver::new(&dir, &dir, pods.clone()).expect("resolver");
        let pod_uid = "6f1c2a3b-1111-4222-8333-944455556666";
        let cgroup_id = 4242;
        // A pod's cgroup, as if resolved before: the cache never forgets a cgroup2 path.
        resolver.paths.lock().unwrap().insert(
            cgroup_id,
            format!("/kubepods/besteffort/pod{pod_uid}/{}", "c".repeat(64)),
        );
        let caller = Caller {
            cgroup_id,
            pid: std::process::id(),
            uid: 1000,
            gid: 1000,
            exec_id: 1,
            process_start: own_start_ns(resolver.clock_ticks),
            original: imds_common::SockAddr {
                addr: [0; 4],
                port: 80,
                family: imds_common::AF_INET,
            },
            _pad: 0,
        };
        let first = resolver.identify(&caller);
        assert!(matches!(first.workload, Workload::Pod { .. }), "{first:?}");
        assert_eq!(first.pod, None, "the pod is not known yet");
        assert!(
            Arc::ptr_eq(&first, &resolver.identify(&caller)),
            "the image's next connection shares its identity"
        );

        // The pod arrives (or its labels change): the same image's next connection sees it.
        pods.upsert(PodInfo {
            uid: pod_uid.into(),
            namespace: "payments".into(),
            name: "api-0".into(),
            labels: Default::default(),
            service_account: "default".into(),
            containers: Vec::new(),
        });
        let after = resolver.identify(&caller);
        assert_eq!(
            after.pod.as_ref().map(|p| p.namespace.as_str()),
            Some("payments")
        );
        assert!(Arc::ptr_eq(&after, &resolver.identify(&caller)));

        // Another program image of the process (an exec) is identified anew.
        let exec = Caller {
            exec_id: 2,
            ..caller
        };
        assert!(!Arc::ptr_eq(&after, &resolver.identify(&exec)));
        // A cgroup not resolved (here: not below the mount) is tried again, not kept.
        let unresolved = Caller {
            cgroup_id: 4243,
            ..caller
        };
        let once = resolver.identify(&unresolved);
        assert_eq!(once.cgroup, None);
        assert!(!Arc::ptr_eq(&once, &resolver.identify(&unresolved)));
        // Without the kernel's name of the image, nothing is shared.
        let unnamed = Caller {
            process_start: 0,
            ..caller
        };
        assert!(!Arc::ptr_eq(
            &resolver.identify(&unnamed),
            &resolver.identify(&unnamed)
        ));
    }

    #[test]
    fn units_come_from_the_deepest_unit_component() {
        assert_eq!(
            unit_of("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/session-3.scope/x").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(unit_of("/web"), None);
    }
}
