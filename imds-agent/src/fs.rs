//! Where the kernel's file systems are: the cgroup v2 mount (found from mountinfo, never
//! assumed) and bpffs (mounted when absent, as Cilium's agent does).

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// Where bpffs is expected; pin directories live below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// The mount point of the cgroup v2 hierarchy in this mount namespace.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    find_mount(&mountinfo, "cgroup2").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 file system is mounted (see /proc/self/mountinfo); cgroup v2 is required",
        )
    })
}

/// The directory of this process's own cgroup on the cgroup v2 mount.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup v2 line in /proc/self/cgroup",
            )
        })?;
    Ok(cgroup2_mount()?.join(relative.trim_start_matches('/')))
}

/// The first mount point of a file system type in mountinfo text (proc(5) format: the mount
/// point is field 5, the type is the first field after the " - " separator).
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != fstype {
            return None;
        }
        left.split(' ')
            .nth(4)
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
    })
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

/// The v1 controllers from [`COLLAPSING_V1_CONTROLLERS`] mounted in this mount namespace.
pub fn collapsing_v1_controllers(mountinfo: &str) -> Vec<&'static str> {
    COLLAPSING_V1_CONTROLLERS
        .into_iter()
        .filter(|controller| {
            mountinfo.lines().any(|line| {
                let Some((_, right)) = line.split_once(" - ") else {
                    return false;
                };
                let mut fields = right.split(' ');
                fields.next() == Some("cgroup")
                    && fields
                        .nth(1)
                        .is_some_and(|options| options.split(',').any(|o| o == *controller))
            })
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
pub fn ensure_bpffs() -> io::Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs(root) {
        return Ok(());
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

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        assert_eq!(
            find_mount(HYBRID, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(HYBRID, "bpf"), None);
    }

    #[test]
    fn finds_net_cls_and_net_prio_v1_hierarchies() {
        assert!(collapsing_v1_controllers(HYBRID).is_empty());
        let with_net = format!(
            "{HYBRID}42 31 0:39 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio\n"
        );
        assert_eq!(
            collapsing_v1_controllers(&with_net),
            ["net_cls", "net_prio"]
        );
        let only_prio = format!("{HYBRID}42 31 0:39 / /x rw - cgroup cgroup rw,net_prio\n");
        assert_eq!(collapsing_v1_controllers(&only_prio), ["net_prio"]);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(line, "cgroup2"),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }
}
