//! Where the kernel's file systems are: the cgroup v2 mount (found from mountinfo, never
//! assumed) and bpffs (mounted when absent, as Cilium's agent does).

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use procfs::process::MountInfo;

/// Where bpffs is expected; pin directories live below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// This mount namespace's mounts (`/proc/self/mountinfo`, read by procfs).
pub fn mounts() -> io::Result<Vec<MountInfo>> {
    procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .map(|mounts| mounts.0)
        .map_err(io::Error::other)
}

/// The mount point of the cgroup v2 hierarchy in this mount namespace.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    find_mount(&mounts()?, "cgroup2").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 file system is mounted (see /proc/self/mountinfo); cgroup v2 is required",
        )
    })
}

/// The directory of this process's own cgroup on the cgroup v2 mount.
///
/// `/proc/self/cgroup` names the cgroup from the root of the process's cgroup namespace,
/// which need not be the mount's root: a container given the node's cgroup tree (a hostPath
/// volume) sees a mount whose root is its own node's root (`/sys/fs/cgroup` bound from a
/// subtree), and in a private cgroup namespace (containerd on cgroup v2) it reads `/` for a
/// cgroup deep in the tree. The path is used where the mount's root is a prefix of it;
/// otherwise the cgroup is found on the mount by the process's own pid in `cgroup.procs`.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let (mount_root, mount_point) = find_mount_entry(&mounts()?, "cgroup2").ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system is mounted")
    })?;
    let cgroups = procfs::process::Process::myself()
        .and_then(|me| me.cgroups())
        .map_err(io::Error::other)?;
    let own = cgroups
        .0
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| c.pathname)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup v2 line in /proc/self/cgroup",
            )
        })?;
    if let Some(relative) = below_mount_root(&mount_root, &own) {
        let dir = mount_point.join(relative);
        if dir.join("cgroup.procs").is_file() {
            return Ok(dir);
        }
    }
    find_cgroup_of(&mount_point, std::process::id()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "this process's cgroup ({own} in its cgroup namespace) is not on the cgroup2 \
                 mount at {} (root {mount_root}): mount the whole cgroup tree there",
                mount_point.display()
            ),
        )
    })
}

/// `cgroup` relative to a mount whose root is `mount_root`, if it is below it.
fn below_mount_root<'a>(mount_root: &str, cgroup: &'a str) -> Option<&'a str> {
    let root = mount_root.trim_end_matches('/');
    let rest = cgroup.strip_prefix(root)?;
    (rest.is_empty() || rest.starts_with('/')).then(|| rest.trim_start_matches('/'))
}

/// The cgroup directory below `dir` whose `cgroup.procs` lists `pid` (as this process's pid
/// namespace numbers it, which is how the kernel writes the file for its reader).
fn find_cgroup_of(dir: &Path, pid: u32) -> Option<PathBuf> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if procs.lines().any(|line| line.trim().parse() == Ok(pid)) {
        return Some(dir.to_owned());
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|entry| find_cgroup_of(&entry.path(), pid))
}

/// The first mount point of a file system type.
pub fn find_mount(mounts: &[MountInfo], fstype: &str) -> Option<PathBuf> {
    find_mount_entry(mounts, fstype).map(|(_, point)| point)
}

/// The root within the file system and the mount point of the first mount of a file system
/// type. procfs gives both as the kernel writes them, escaped.
fn find_mount_entry(mounts: &[MountInfo], fstype: &str) -> Option<(String, PathBuf)> {
    let mount = mounts.iter().find(|m| m.fs_type == fstype)?;
    let point = unescape_mountinfo(&mount.mount_point.to_string_lossy());
    Some((unescape_mountinfo(&mount.root), PathBuf::from(point)))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// cgroup v1 controllers whose activation makes the kernel stop matching sockets to their
/// cgroup v2 cgroup ("cgroup: disabling cgroup2 socket matching due to net_prio or net_cls
/// activation"): every socket then looks like the v2 root's, and per-cgroup enforcement would
/// silently collapse.
const COLLAPSING_V1_CONTROLLERS: [&str; 2] = ["net_cls", "net_prio"];

/// The v1 controllers from [`COLLAPSING_V1_CONTROLLERS`] among `mounts` (a v1 hierarchy
/// names its controllers in its super options).
pub fn collapsing_v1_controllers(mounts: &[MountInfo]) -> Vec<&'static str> {
    COLLAPSING_V1_CONTROLLERS
        .into_iter()
        .filter(|controller| {
            mounts
                .iter()
                .any(|m| m.fs_type == "cgroup" && m.super_options.contains_key(*controller))
        })
        .collect()
}

/// Whether `path` is on a bpf file system (statfs(2) magic).
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; the path is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c_path.as_ptr(), &mut stat) }) == 0 && stat.f_type == libc::BPF_FS_MAGIC
}

/// Mounts bpffs at [`BPFFS_ROOT`] unless it is mounted there already.
///
/// Not in a container that shares the node's processes but not its mounts (a DaemonSet pod
/// with hostPID): a bpffs mounted there is the container's own, and the pinned links, which
/// keep enforcement while no agent runs, would go with the container.
pub fn ensure_bpffs() -> io::Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs(root) {
        return Ok(());
    }
    if !shares_init_mounts() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{BPFFS_ROOT} is not a bpf file system, and one mounted here would be this \
                 container's own: the pinned programs, and enforcement with them, would go when \
                 it exits. Mount bpffs on the node (systemd does; or `mount -t bpf bpf \
                 {BPFFS_ROOT}`) and give the agent the node's {BPFFS_ROOT} (a hostPath volume)"
            ),
        ));
    }
    std::fs::create_dir_all(root)?;
    let source = c"bpf";
    let target = CString::new(BPFFS_ROOT).expect("constant has no NUL");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process is in the mount namespace of pid 1 as it sees it (true when that
/// cannot be read: pid 1 is then this container's own, or /proc hides it).
fn shares_init_mounts() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(init)) => own == init,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(mountinfo: &str) -> Vec<MountInfo> {
        mountinfo
            .lines()
            .map(|line| MountInfo::from_line(line).expect("a mountinfo line"))
            .collect()
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        assert_eq!(
            find_mount(&parse(HYBRID), "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(&parse(HYBRID), "bpf"), None);
    }

    #[test]
    fn finds_net_cls_and_net_prio_v1_hierarchies() {
        assert!(collapsing_v1_controllers(&parse(HYBRID)).is_empty());
        let with_net = format!(
            "{HYBRID}42 31 0:39 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio\n"
        );
        assert_eq!(
            collapsing_v1_controllers(&parse(&with_net)),
            ["net_cls", "net_prio"]
        );
        let only_prio = format!("{HYBRID}42 31 0:39 / /x rw - cgroup cgroup rw,net_prio\n");
        assert_eq!(collapsing_v1_controllers(&parse(&only_prio)), ["net_prio"]);
    }

    #[test]
    fn a_cgroup_is_found_below_a_mount_of_a_subtree() {
        // The node's tree bound into a container: the mount's root is the node's cgroup.
        let bound = "90 80 0:38 /node-a /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount_entry(&parse(bound), "cgroup2"),
            Some(("/node-a".into(), PathBuf::from("/sys/fs/cgroup")))
        );
        assert_eq!(
            below_mount_root("/node-a", "/node-a/kubepods/pod1/ctr"),
            Some("kubepods/pod1/ctr")
        );
        assert_eq!(below_mount_root("/node-a", "/node-a"), Some(""));
        assert_eq!(
            below_mount_root("/", "/system.slice/x"),
            Some("system.slice/x")
        );
        // Another subtree, one that only shares a prefix, and a private cgroup namespace
        // (whose mount root reads as a walk upwards): not derivable from the path.
        assert_eq!(below_mount_root("/node-a", "/node-b/x"), None);
        assert_eq!(below_mount_root("/node-a", "/node-ab/x"), None);
        assert_eq!(below_mount_root("/../../..", "/"), None);
    }

    #[test]
    fn a_cgroup_is_found_by_a_pid_in_its_procs_file() {
        let dir = std::env::temp_dir().join(format!("imds-fs-test-{}", std::process::id()));
        let leaf = dir.join("kubepods/pod1/ctr");
        std::fs::create_dir_all(&leaf).expect("dirs");
        std::fs::write(dir.join("cgroup.procs"), "1\n").expect("root procs");
        std::fs::write(dir.join("kubepods/cgroup.procs"), "").expect("procs");
        std::fs::write(leaf.join("cgroup.procs"), "17\n4242\n").expect("leaf procs");
        assert_eq!(find_cgroup_of(&dir, 4242), Some(leaf));
        assert_eq!(find_cgroup_of(&dir, 1), Some(dir.clone()));
        assert_eq!(find_cgroup_of(&dir, 424), None);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(&parse(line), "cgroup2"),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }
}
