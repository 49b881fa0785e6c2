//! Who is calling: from the kernel-attested cgroup id, uid and gid of a diverted connection to
//! a cgroup path, a systemd unit and a process name. Never from the source address.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use imds_common::Caller;

/// A caller as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub cgroup_id: u64,
    /// The cgroup path relative to the root of the enforced tree (`/` is the root itself), or
    /// `None` when the cgroup could not be resolved (removed, or outside the tree): such a
    /// caller is denied.
    pub cgroup: Option<String>,
    /// The systemd unit the cgroup belongs to (deepest `*.service` or `*.scope` component).
    pub unit: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The process name at request time (informational: pids can be reused).
    pub comm: Option<String>,
}

/// Resolves cgroup ids below one enforced root.
pub struct Resolver {
    mount: PathBuf,
    mount_fd: File,
    /// The enforced root, relative to the mount (`/` for the whole hierarchy).
    root: String,
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
    pub fn new(mount: &Path, root: &Path) -> io::Result<Self> {
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
        })
    }

    pub fn identify(&self, caller: &Caller) -> Identity {
        let cgroup = self
            .cgroup_path(caller.cgroup_id)
            .ok()
            .and_then(|path| relative_to(&self.root, &path));
        Identity {
            cgroup_id: caller.cgroup_id,
            unit: cgroup.as_deref().and_then(unit_of),
            cgroup,
            uid: caller.uid,
            gid: caller.gid,
            pid: caller.pid,
            comm: process_name(caller.pid),
        }
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

    /// The cgroup id of a directory on the cgroup2 mount (its inode number).
    pub fn cgroup_id(path: &Path) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::metadata(path)?.ino())
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

fn process_name(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
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
