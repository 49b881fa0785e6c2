//! The identity cache against real cgroups: ids are inode numbers, so a cached path must not
//! outlive its cgroup. (cgroup v2 refuses renames with EPERM, so removal is the only way a
//! cgroup's path stops naming it.)

use std::{os::unix::fs::MetadataExt as _, sync::Arc};

use imds_agent::identity::{Resolver, pods::PodDirectory};
use imds_common::{Caller, SockAddr};
use imds_tests::sandbox::Sandbox;

fn caller(cgroup_id: u64) -> Caller {
    Caller {
        cgroup_id,
        pid: 0,
        uid: 0,
        gid: 0,
        exec_id: 0,
        process_start: 0,
        original: SockAddr::v4(0, 80),
        _pad: 0,
    }
}

#[test]
fn cached_paths_do_not_outlive_their_cgroup() {
    let Some(sandbox) = Sandbox::new("idcache") else {
        return;
    };
    let resolver = Resolver::new(
        &sandbox.cgroup_mount,
        &sandbox.cgroup_root,
        Arc::new(PodDirectory::default()),
    )
    .expect("resolver");
    let first = sandbox.cgroup("app");
    let first_id = std::fs::metadata(&first).unwrap().ino();
    assert_eq!(
        resolver.identify(&caller(first_id)).cgroup.as_deref(),
        Some("/app")
    );
    // Cached now. Removed: unresolvable (and so denied), not served from the cache.
    std::fs::remove_dir(&first).unwrap();
    assert_eq!(resolver.identify(&caller(first_id)).cgroup, None);
    // A new cgroup under the old name is a different cgroup with its own id.
    let again = sandbox.cgroup("app");
    let again_id = std::fs::metadata(&again).unwrap().ino();
    assert_ne!(again_id, first_id);
    assert_eq!(
        resolver.identify(&caller(again_id)).cgroup.as_deref(),
        Some("/app")
    );
    assert_eq!(resolver.identify(&caller(first_id)).cgroup, None);
}
