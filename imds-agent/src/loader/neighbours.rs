//! Other programs at the hooks the agent diverts with (connect4, connect6): Azure's guest
//! proxy agent attaches its own `cgroup/connect4` at the cgroup root to send metadata connects
//! to its proxy, Cilium its socket load balancer. Which one diverts a connect follows from the
//! kernel's rules for cgroup programs (kernel/bpf/cgroup.c, `compute_effective_progs`): a
//! cgroup runs its own programs first, then its parent's, up to the root; within one cgroup
//! they run in the order they were attached; each sees the address as the ones before it left
//! it. So:
//! - the agent on a subtree, the other at the root: the agent's program runs first and
//!   diverts; the other then sees the agent's address and leaves it; the agent's own upstream
//!   connects pass through the other (Azure's proxy serves root by default);
//! - both on the same cgroup, the other attached first: the other diverts first, and the
//!   agent never sees those connects: its policies do not apply;
//! - both on the same cgroup, the agent first: the agent diverts, until it is upgraded or
//!   restarted: its new links are attached after the other's.
//!
//! The agent asks the kernel which programs run for the enforced cgroup, in order, and
//! says where each other one is and whether it runs before the agent's.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

/// `BPF_CGROUP_INET4_CONNECT` and `BPF_CGROUP_INET6_CONNECT` (uapi `enum bpf_attach_type`).
const HOOKS: [(&str, u32); 2] = [("connect4", 10), ("connect6", 11)];
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
/// More programs than any node has on one hook.
const MAX_PROGRAMS: usize = 64;

/// The `query` member of `union bpf_attr` up to `prog_cnt` (uapi, stable); the kernel
/// zero-fills the rest of the union.
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// Another program at one of the agent's hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub hook: &'static str,
    pub id: u32,
    /// The program's name, where the agent may read it (CAP_SYS_ADMIN).
    pub name: Option<String>,
    /// The cgroup it is attached to, relative to the cgroup2 mount.
    pub cgroup: String,
    /// Whether it runs before the agent's program on the enforced cgroups.
    pub runs_first: bool,
}

/// The programs attached to `cgroup` for `attach_type` (`effective`: also its ancestors',
/// in the order they run).
fn query(cgroup: &File, attach_type: u32, effective: bool) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; MAX_PROGRAMS];
    let mut attr = ProgQuery {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: if effective { BPF_F_QUERY_EFFECTIVE } else { 0 },
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_PROGRAMS as u32,
        ..ProgQuery::default()
    };
    // SAFETY: BPF_PROG_QUERY reads `attr` and writes at most prog_cnt ids into `ids`, which
    // outlives the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQuery,
            std::mem::size_of::<ProgQuery>() as u32,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate((attr.prog_cnt as usize).min(MAX_PROGRAMS));
    Ok(ids)
}

/// The other programs that run at connect() for the enforced cgroup `enforced` (a directory
/// of the cgroup2 mount `mount`), given the agent's own program ids per hook.
pub fn find(mount: &Path, enforced: &Path, ours: &[(&str, u32)]) -> io::Result<Vec<Neighbour>> {
    let names = program_names();
    let mut found = Vec::new();
    for (hook, attach_type) in HOOKS {
        let Some(&(_, own)) = ours.iter().find(|(h, _)| *h == hook) else {
            continue;
        };
        let effective = query(&File::open(enforced)?, attach_type, true)?;
        let Some(position) = effective.iter().position(|id| *id == own) else {
            continue;
        };
        // Where each is attached: the enforced cgroup or one of its ancestors.
        let mut attached_at: HashMap<u32, String> = HashMap::new();
        let mut dir: PathBuf = enforced.to_owned();
        loop {
            if let Ok(ids) = File::open(&dir).and_then(|f| query(&f, attach_type, false)) {
                let relative = dir.strip_prefix(mount).map_or_else(
                    |_| dir.display().to_string(),
                    |r| format!("/{}", r.display()),
                );
                for id in ids {
                    attached_at.entry(id).or_insert_with(|| relative.clone());
                }
            }
            if dir == mount || !dir.pop() || !dir.starts_with(mount) {
                break;
            }
        }
        for (index, id) in effective.iter().enumerate() {
            if *id == own {
                continue;
            }
            found.push(Neighbour {
                hook,
                id: *id,
                name: names.get(id).cloned(),
                cgroup: attached_at.get(id).cloned().unwrap_or_else(|| "?".into()),
                runs_first: index < position,
            });
        }
    }
    Ok(found)
}

/// Program names by id, as far as the agent may read them.
fn program_names() -> HashMap<u32, String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|info| Some((info.id(), info.name_as_str()?.to_owned())))
        .collect()
}
