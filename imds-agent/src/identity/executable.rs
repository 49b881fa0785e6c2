//! What a caller's executable is: the path `/proc/<pid>/exe` names, whether the file running
//! is the node's file at that path, and the file's sha256 where a policy pins one.
//!
//! `/proc/<pid>/exe` names a path inside the caller's own mount namespace and root. On a
//! host, an unprivileged user can bind-mount any program over an allowed path in a private
//! user and mount namespace (`unshare -rm`), or chroot into a tree of their own, and run it:
//! the path then reads as the allowed one. So for a host process the path counts only if the
//! running file is the node's file at that path (same device and inode), the node's file
//! being found through pid 1's root: the node's, also for an agent in a container that shares
//! the node's pids. A container's path names its image's file, whatever the node has there:
//! it is taken as the container's own, and only a digest says which program it is. Digests
//! are computed once per file (device, inode, size, change time), never per request, and only
//! while a policy pins one.

use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

/// How the running file relates to the node's file at the path it is named by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExeOrigin {
    /// The node's file at that path.
    NodeFile,
    /// A container's: the path names the container's own file.
    Container,
    /// A host process running another file than the node's at its path (another file mounted
    /// over it in a private mount namespace, another root, a replaced or deleted file): path
    /// selectors do not match it.
    NotTheNodeFile,
}

impl ExeOrigin {
    /// As audit lines and `policy explain` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeFile => "node-file",
            Self::Container => "container",
            Self::NotTheNodeFile => "not-the-node-file",
        }
    }
}

/// A caller's executable as read when its program first connected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Executable {
    /// As `/proc/<pid>/exe` names it.
    pub path: String,
    pub origin: ExeOrigin,
    /// The running file's sha256, when a policy pins digests.
    pub sha256: Option<[u8; 32]>,
}

impl Executable {
    /// An executable taken at its word (the node's file at `path`), as `policy explain` and
    /// tests describe a caller.
    pub fn assumed(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            origin: ExeOrigin::NodeFile,
            sha256: None,
        }
    }
}

/// A file's identity, for the digest cache: a file changed in place changes its change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// Digests of executables, per file.
#[derive(Default)]
pub struct Digests {
    wanted: AtomicBool,
    by_file: Mutex<HashMap<FileId, [u8; 32]>>,
}

/// Files whose digests are kept before the cache starts over (a miss costs one read).
const DIGESTS_MAX: usize = 4096;

impl Digests {
    /// Whether digests are computed: only while a policy pins one.
    pub fn want(&self, wanted: bool) {
        self.wanted.store(wanted, Ordering::Relaxed);
    }

    pub fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }

    /// The sha256 of the file behind `/proc/<pid>/exe`, if it is still `expected`.
    fn of(&self, pid: u32, expected: FileId) -> Option<[u8; 32]> {
        if let Some(digest) = self.by_file.lock().expect("digests").get(&expected) {
            return Some(*digest);
        }
        let mut file = File::open(format!("/proc/{pid}/exe")).ok()?;
        // The same file that was checked (the process did not exec in between).
        if FileId::of(&file.metadata().ok()?) != expected {
            return None;
        }
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buffer).ok()?;
            if n == 0 {
                break;
            }
            context.update(&buffer[..n]);
        }
        let digest: [u8; 32] = context.finish().as_ref().try_into().ok()?;
        let mut cache = self.by_file.lock().expect("digests");
        if cache.len() >= DIGESTS_MAX {
            cache.clear();
        }
        cache.insert(expected, digest);
        Some(digest)
    }
}

/// Reads the executable of process `pid`; `container`: whether the caller is a container's.
pub fn read(pid: u32, container: bool, digests: &Digests) -> Option<Executable> {
    let exe = format!("/proc/{pid}/exe");
    let path = std::fs::read_link(&exe).ok()?.to_str()?.to_owned();
    // stat follows the link to the file the process runs.
    let running = std::fs::metadata(&exe).ok()?;
    let origin = if container {
        ExeOrigin::Container
    } else {
        match std::fs::metadata(node_path(&path)) {
            Ok(node) if node.dev() == running.dev() && node.ino() == running.ino() => {
                ExeOrigin::NodeFile
            }
            _ => ExeOrigin::NotTheNodeFile,
        }
    };
    let sha256 = if digests.wanted() {
        digests.of(pid, FileId::of(&running))
    } else {
        None
    };
    Some(Executable {
        path,
        origin,
        sha256,
    })
}

/// `path` as the node sees it: below pid 1's root, or the agent's own where pid 1's cannot be
/// read (pid 1 is then not the node's init, or hides its root: the agent runs as a service on
/// the node, whose root is the node's). The path comes from the kernel with every symlink
/// resolved, so the walk crosses none (an absolute symlink would be followed from the agent's
/// own root).
fn node_path(path: &str) -> PathBuf {
    static NODE_ROOT: OnceLock<&'static Path> = OnceLock::new();
    let root = NODE_ROOT.get_or_init(|| {
        let init_root = Path::new("/proc/1/root");
        if std::fs::metadata(init_root.join("")).is_ok() {
            init_root
        } else {
            Path::new("/")
        }
    });
    root.join(path.trim_start_matches('/'))
}

/// A digest as policies write it: 64 lowercase hex digits.
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2)?;
        if !pair
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_the_node_file_and_its_digest_is_its_content() {
        let digests = Digests::default();
        let own = read(std::process::id(), false, &digests).expect("own executable");
        assert_eq!(
            Path::new(&own.path),
            std::env::current_exe().unwrap().as_path()
        );
        assert_eq!(own.origin, ExeOrigin::NodeFile);
        assert_eq!(own.sha256, None, "not computed unless wanted");

        digests.want(true);
        let hashed = read(std::process::id(), false, &digests).expect("own executable");
        let content = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let expected = ring::digest::digest(&ring::digest::SHA256, &content);
        assert_eq!(
            hashed.sha256.as_ref().map(|d| &d[..]),
            Some(expected.as_ref())
        );

        let in_container = read(std::process::id(), true, &digests).expect("own executable");
        assert_eq!(in_container.origin, ExeOrigin::Container);
    }

    #[test]
    fn digests_are_64_lowercase_hex_digits() {
        let hex = "00ff".repeat(16);
        let parsed = parse_sha256(&hex).expect("parses");
        assert_eq!((parsed[0], parsed[1], parsed[31]), (0x00, 0xff, 0xff));
        for bad in [
            &hex[..62],
            &"00FF".repeat(16),
            &"0g".repeat(32),
            "+1".repeat(32).as_str(),
        ] {
            assert_eq!(parse_sha256(bad), None, "{bad}");
        }
    }
}
