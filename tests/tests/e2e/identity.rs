//! The identity caches against real cgroups and processes: ids are inode numbers, never given
//! to another cgroup, and cgroup v2 refuses renames with EPERM, so a cached path names its
//! cgroup for good (checked only where the agent asks whether a cgroup is still there); and a
//! pid must still name the process that connected before /proc says anything about it.

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

/// A sandbox, and a resolver for the cgroups below its root (the agent's, without pods).
fn resolver_in_sandbox(label: &str) -> Option<(Sandbox, Resolver)> {
    let sandbox = Sandbox::new(label)?;
    let resolver = Resolver::new(
        &sandbox.cgroup_mount,
        &sandbox.cgroup_root,
        Arc::new(PodDirectory::default()),
    )
    .expect("resolver");
    Some((sandbox, resolver))
}

#[test]
fn a_cached_path_names_its_cgroup_for_good() {
    let Some((sandbox, resolver)) = resolver_in_sandbox("idcache") else {
        return;
    };
    let first = sandbox.cgroup("app");
    let first_id = std::fs::metadata(&first).unwrap().ino();
    // What the cache rests on: a cgroup2 directory keeps its path while it exists.
    let renamed = std::fs::rename(&first, sandbox.cgroup_root.join("renamed"))
        .expect_err("cgroup2 refuses renames");
    assert_eq!(renamed.raw_os_error(), Some(libc::EPERM), "{renamed}");
    assert_eq!(
        resolver.identify(&caller(first_id)).cgroup.as_deref(),
        Some("/app")
    );
    let key = imds_agent::identity::CallerKey {
        cgroup_id: first_id,
        uid: 0,
        gid: 0,
    };
    assert!(resolver.identify_key(key).is_some(), "a live cgroup");
    // Removed: a connection made in it before (accepted after) is still attributed to it,
    // but a kernel verdict for it is not kept.
    std::fs::remove_dir(&first).unwrap();
    assert_eq!(
        resolver.identify(&caller(first_id)).cgroup.as_deref(),
        Some("/app")
    );
    assert!(resolver.identify_key(key).is_none(), "a removed cgroup");
    // A new cgroup under the old name is a different cgroup with its own id.
    let again = sandbox.cgroup("app");
    let again_id = std::fs::metadata(&again).unwrap().ino();
    assert_ne!(again_id, first_id);
    assert_eq!(
        resolver.identify(&caller(again_id)).cgroup.as_deref(),
        Some("/app")
    );
}

/// A caller's executable is read from /proc only while its pid names the process that
/// connected: by the start time the connect programs record, or, without the kernel's task
/// fields (start 0), by the pid's cgroup. A pid that names another process lends it nothing.
#[test]
fn a_callers_executable_is_read_only_while_its_pid_names_the_process_that_connected() {
    let Some((sandbox, resolver)) = resolver_in_sandbox("idexe") else {
        return;
    };
    let app_id = std::fs::metadata(sandbox.cgroup("app")).unwrap().ino();
    let other_id = std::fs::metadata(sandbox.cgroup("other")).unwrap().ino();
    let mut sleeper = sandbox
        .command("sleep", "app")
        .arg("30")
        .spawn()
        .expect("sleep");
    let pid = sleeper.id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe.to_str();
    // Field 22 of /proc/<pid>/stat, in clock ticks (100 per second): the kernel's
    // start_boottime truncated, so any nanosecond value in that tick stands for it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    let ticks: u64 = after_name
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let start = ticks * 10_000_000 + 1234;
    let connected = |cgroup_id, process_start| {
        resolver.identify(&Caller {
            pid,
            process_start,
            ..caller(cgroup_id)
        })
    };

    let named = connected(app_id, start);
    assert_eq!(
        (
            named.exe.as_ref().map(|e| e.path.as_str()),
            named.comm.as_deref()
        ),
        (exe, Some("sleep"))
    );
    // Another start time: the pid is another process's now.
    let reused = connected(app_id, start + 10_000_000);
    assert_eq!((&reused.exe, &reused.comm), (&None, &None));
    // Without the task fields: the pid must be in the connection's cgroup.
    assert_eq!(
        connected(app_id, 0).exe.as_ref().map(|e| e.path.as_str()),
        exe
    );
    assert_eq!(connected(other_id, 0).exe, None);

    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
