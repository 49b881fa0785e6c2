//! The maps shared with the agent. Names come from `imds-common` (the agent looks them up by
//! the same constants). Maps that must survive an agent restart are pinned by name under the
//! agent's pin directory, so a new agent adopts the live state instead of starting empty.

use aya_ebpf::{
    Global,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use imds_common::{
    Caller, CallerKey, Counter, Endpoint, MAX_ENDPOINTS, MAX_EXEMPT, MAX_POD_NETNS, MAX_VERDICTS,
    SocketOffsets, TaskOffsets,
};

#[map]
pub static IMDS_ENDPOINTS4: HashMap<u32, Endpoint> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map]
pub static IMDS_ENDPOINTS6: HashMap<[u32; 4], Endpoint> = HashMap::pinned(MAX_ENDPOINTS, 0);

/// The caller of a diverted connection, on the client's socket (set by the connect programs)
/// and then on the agent's accepted socket (copied by the agent's getpeername program). The
/// kernel frees it with the socket. A BTF map: socket storage cannot be declared otherwise.
/// Pinned by the loader (`map_pin_path`).
#[btf_map]
pub static IMDS_CALLERS: SkStorage<Caller> = SkStorage::new();

/// Pods' network namespaces by pod address (IPv4, network byte order): the namespace's id
/// (nsid) in the agent's namespace, which the agent resolves from the pod's link before it
/// asks for the connection's peer. Pinned: the getpeername program that reads it may be an
/// earlier agent's (the one that made the listening sockets).
#[map]
pub static IMDS_POD_NETNS: LruHashMap<u32, u32> = LruHashMap::pinned(MAX_POD_NETNS, 0);

#[map]
pub static IMDS_EXEMPT: LruHashMap<u64, u8> = LruHashMap::pinned(MAX_EXEMPT, 0);

#[map]
pub static IMDS_VERDICTS: LruHashMap<CallerKey, u32> = LruHashMap::pinned(MAX_VERDICTS, 0);

#[map]
pub static IMDS_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(imds_common::COUNTER_COUNT, 0);

/// The agent's listener, set by the loader (`EbpfLoader::override_global`). IPv4 in network
/// byte order, port in host byte order.
#[unsafe(no_mangle)]
pub static IMDS_DIVERT_IP4: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static IMDS_DIVERT_PORT: Global<u16> = Global::new(0);
/// The agent's network namespace (its cookie), and the node address the agent listens on for
/// connects from every other namespace (0: none, those are refused). Set by the loader.
#[unsafe(no_mangle)]
pub static IMDS_HOST_NETNS: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
pub static IMDS_POD_DIVERT_IP4: Global<u32> = Global::new(0);
/// Where the socket's creator is found in this kernel's structures; set by the loader from
/// the kernel's BTF (all zero without it).
#[unsafe(no_mangle)]
pub static IMDS_SOCK_OFFSETS: Global<SocketOffsets> = Global::new(SocketOffsets {
    ctx_sk: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
    sk_socket: 0,
    socket_file: 0,
    file_cred: 0,
    cred_uid: 0,
    cred_gid: 0,
    valid: 0,
});
/// Where the connecting process's start time and exec count are found in this kernel's
/// task_struct; set by the loader from the kernel's BTF (all zero without it).
#[unsafe(no_mangle)]
pub static IMDS_TASK_OFFSETS: Global<TaskOffsets> = Global::new(TaskOffsets {
    group_leader: 0,
    start_boottime: 0,
    self_exec_id: 0,
    valid: 0,
});
/// 1: enforced cgroups cannot create raw IP sockets. Set by the loader.
#[unsafe(no_mangle)]
pub static IMDS_REFUSE_RAW: Global<u32> = Global::new(1);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = IMDS_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe { *value += 1 };
    }
}
