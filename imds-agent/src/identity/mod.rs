//! Who is calling: from the kernel-attested cgroup id, uid and gid of a diverted connection to
//! a cgroup path, the workload (pod and container, systemd unit), and the process. Never from
//! the source address.

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

use imds_common::Caller;
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
    /// The process name (informational: pids can be reused).
    pub comm: Option<String>,
    /// The executable, read when the connection is accepted and only if the process is still
    /// in the connection's cgroup (a reused pid elsewhere gives `None`, which no `executables`
    /// selector matches).
    pub exe: Option<String>,
}

impl Identity {
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

/// How many cgroup id -> path entries are kept.
const CACHE_CAPACITY: usize = 4096;

/// Resolves cgroup ids below one enforced root.
pub struct Resolver {
    mount: PathBuf,
    mount_fd: File,
    /// The enforced root, relative to the mount (`/` for the whole hierarchy).
    root: String,
    pods: Arc<PodDirectory>,
    cache: Mutex<PathCache>,
}

/// cgroup id -> path relative to the mount, bounded (oldest out first).
#[derive(Default)]
struct PathCache {
    paths: HashMap<u64, String>,
    order: VecDeque<u64>,
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
            cache: Mutex::new(PathCache::default()),
        })
    }

    pub fn pods(&self) -> &PodDirectory {
        &self.pods
    }

    pub fn identify(&self, caller: &Caller) -> Identity {
        let full_path = self.cached_path(caller.cgroup_id);
        let cgroup = full_path
            .as_deref()
            .and_then(|path| relative_to(&self.root, path));
        let workload = cgroup.as_deref().map_or(Workload::Other, workload::parse);
        let (pod, container) = pod_and_container(&workload, &self.pods);
        Identity {
            cgroup_id: caller.cgroup_id,
            unit: cgroup.as_deref().and_then(unit_of),
            exe: full_path.as_deref().and_then(|p| executable(caller.pid, p)),
            cgroup,
            workload,
            pod,
            container,
            uid: caller.uid,
            gid: caller.gid,
            pid: caller.pid,
            comm: process_name(caller.pid),
        }
    }

    /// The cgroup's path, from the cache when the cached path still names this cgroup. Ids
    /// are inode numbers: a cached path is checked to still have that inode before it is used,
    /// so a removed cgroup, or an id reused for another one, is resolved afresh.
    fn cached_path(&self, cgroup_id: u64) -> Option<String> {
        let cached = self
            .cache
            .lock()
            .expect("cache lock")
            .paths
            .get(&cgroup_id)
            .cloned();
        if let Some(path) = cached {
            let full = self.mount.join(path.trim_start_matches('/'));
            if std::fs::metadata(&full).is_ok_and(|m| m.ino() == cgroup_id) {
                return Some(path);
            }
        }
        let path = self.cgroup_path(cgroup_id).ok();
        let mut cache = self.cache.lock().expect("cache lock");
        match &path {
            Some(path) => {
                if cache.paths.insert(cgroup_id, path.clone()).is_none() {
                    cache.order.push_back(cgroup_id);
                }
                while cache.order.len() > CACHE_CAPACITY {
                    if let Some(old) = cache.order.pop_front() {
                        cache.paths.remove(&old);
                    }
                }
            }
            None => {
                cache.paths.remove(&cgroup_id);
                cache.order.retain(|id| *id != cgroup_id);
            }
        }
        path
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

/// `/proc/<pid>/exe`, if the process is still in `cgroup` (mount-relative path): a pid
/// reused by a process elsewhere must not lend its executable to this connection.
fn executable(pid: u32, cgroup: &str) -> Option<String> {
    let cgroups = read_proc(&format!("/proc/{pid}/cgroup"))?;
    let current = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    if current != cgroup {
        return None;
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    exe.to_str().map(str::to_owned)
}

fn process_name(pid: u32) -> Option<String> {
    let comm = read_proc(&format!("/proc/{pid}/comm"))?;
    Some(comm.trim_end().to_owned())
}

/// A small /proc file in one read (read_to_string would stat it first and read twice: a
/// new connection's identity reads two of these).
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
