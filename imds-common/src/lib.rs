//! Types and constants shared by the kernel programs (`imds-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and no `bool`, because the
//! same bytes are read by BPF programs and by the agent through map syscalls.
#![no_std]

/// Metadata endpoints to divert, keyed by IPv4 address in network byte order (exactly as the
/// kernel presents `bpf_sock_addr.user_ip4`). Value: [`Endpoint`]. IPv6 connects to an
/// address that embeds an IPv4 one (v4-mapped, v4-compatible, NAT64) are looked up here too.
pub const MAP_ENDPOINTS4: &str = "IMDS_ENDPOINTS4";
/// IPv6 metadata endpoints, keyed by the address as four network-order words (as
/// `bpf_sock_addr.user_ip6`). Value: [`Endpoint`].
pub const MAP_ENDPOINTS6: &str = "IMDS_ENDPOINTS6";
/// Socket storage: the [`Caller`] of a diverted connection, on the client's socket (connect
/// programs) and on the agent's accepted socket (getpeername program), where the agent reads it
/// by file descriptor.
pub const MAP_CALLERS: &str = "IMDS_CALLERS";
/// Where the agent pins [`MAP_CALLERS`]. The name carries the [`Caller`] layout: a map pinned
/// by an agent with another layout cannot be adopted (the kernel would refuse programs that
/// write the new size into it), so a new layout is pinned under a new name.
pub const PIN_CALLERS: &str = "IMDS_CALLERS_V2";
/// Pods' network namespaces, keyed by the pod's IPv4 address (network byte order); value: the
/// namespace's id (nsid) in the agent's namespace, where the getpeername program looks up the
/// client's socket. Written by the agent before it asks for a pod connection's peer.
pub const MAP_POD_NETNS: &str = "IMDS_POD_NETNS";
/// Socket cookies of the agent's own upstream sockets, which are never diverted.
pub const MAP_EXEMPT: &str = "IMDS_EXEMPT";
/// Verdicts the agent installs for callers whose decision does not depend on the request,
/// keyed by [`CallerKey`]; value [`VERDICT_REFUSE`] or [`VERDICT_BYPASS`]. A caller without an
/// entry is diverted to the agent.
pub const MAP_VERDICTS: &str = "IMDS_VERDICTS";
/// Per-CPU counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "IMDS_COUNTERS";

/// Global set at load time: the agent's listener (IPv4, network byte order).
pub const GLOBAL_DIVERT_IP4: &str = "IMDS_DIVERT_IP4";
/// Global set at load time: the agent's listener port (host byte order).
pub const GLOBAL_DIVERT_PORT: &str = "IMDS_DIVERT_PORT";

/// Global set at load time: the network namespace cookie of the agent's namespace. Connects
/// from it are diverted to [`GLOBAL_DIVERT_IP4`] (loopback); connects from any other namespace
/// (pods) to [`GLOBAL_POD_DIVERT_IP4`], since their loopback is their own.
pub const GLOBAL_HOST_NETNS: &str = "IMDS_HOST_NETNS";
/// Global set at load time: an address of the node that pods can reach, where the agent also
/// listens (IPv4, network byte order); 0: connects from other namespaces are refused.
pub const GLOBAL_POD_DIVERT_IP4: &str = "IMDS_POD_DIVERT_IP4";

/// Global set at load time: 1 to refuse raw sockets in enforced cgroups.
pub const GLOBAL_REFUSE_RAW: &str = "IMDS_REFUSE_RAW";
/// Global set at load time: [`SocketOffsets`] of the running kernel.
pub const GLOBAL_SOCK_OFFSETS: &str = "IMDS_SOCK_OFFSETS";
/// Global set at load time: [`TaskOffsets`] of the running kernel.
pub const GLOBAL_TASK_OFFSETS: &str = "IMDS_TASK_OFFSETS";

/// Program names as they appear in the object file.
pub const PROG_CONNECT4: &str = "imds_connect4";
pub const PROG_CONNECT6: &str = "imds_connect6";
pub const PROG_SENDMSG4: &str = "imds_sendmsg4";
pub const PROG_SENDMSG6: &str = "imds_sendmsg6";
pub const PROG_SOCK_CREATE: &str = "imds_sock_create";
pub const PROG_GETPEERNAME4: &str = "imds_getpeername4";

/// Bounds for the maps; those keyed by socket, caller or pod are LRU so they never fill up and block.
pub const MAX_ENDPOINTS: u32 = 64;
pub const MAX_POD_NETNS: u32 = 4_096;
pub const MAX_EXEMPT: u32 = 4_096;
pub const MAX_VERDICTS: u32 = 16_384;

/// The caller may read nothing: connect() fails with EPERM, no agent round trip.
pub const VERDICT_REFUSE: u32 = 1;
/// No policy governs the caller and the agent is set to leave such callers alone.
pub const VERDICT_BYPASS: u32 = 2;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// One metadata endpoint on an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The metadata service's TCP port, host byte order.
    pub port: u16,
    /// Another service's port on the same address (Azure's HostGAPlugin beside its
    /// WireServer), or 0. Was reserved and zero: a pinned map of an earlier agent reads the
    /// same.
    pub other_port: u16,
    /// Reserved, zero (room for per-endpoint flags without changing the layout).
    pub flags: u32,
}

/// An IP socket address. IPv4 addresses use `addr[0]` in network byte order and zero the rest,
/// as the kernel does in `bpf_sock_addr.user_ip4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
}

/// Who connected, as attested by the kernel at `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// cgroup v2 id (the cgroup directory's inode number) of the socket's creator, recorded at
    /// `socket()`; the connecting task's for a socket created before the programs attached.
    pub cgroup_id: u64,
    /// Thread-group id (the process id) of the connecting task.
    pub pid: u32,
    /// The socket creator's uid and gid (as `cgroup_id`).
    pub uid: u32,
    pub gid: u32,
    /// Which program image of the process connected: the low 32 bits of the connecting
    /// task's `self_exec_id`, which every exec() increments (threads share their process's).
    pub exec_id: u32,
    /// When the process started (its thread-group leader's `start_boottime`, nanoseconds since
    /// boot), so that a reused pid is told apart; 0 when the kernel's task fields are unknown.
    /// With `pid` and `exec_id`, it names one program image of one process.
    pub process_start: u64,
    /// The metadata endpoint the caller asked for before the rewrite.
    pub original: SockAddr,
    pub _pad: u32,
}

impl Caller {
    pub fn key(&self) -> CallerKey {
        CallerKey {
            cgroup_id: self.cgroup_id,
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// Who a caller is, as the kernel attests it: a socket creator's cgroup, uid and gid. The key
/// of everything kept per caller, in the kernel (its verdict: the policy depends on these, and
/// on the executable, which is why the agent installs no verdicts while any policy selects by
/// executable) and in the agent (tokens, limits, idle upstream connections, selections).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CallerKey {
    pub cgroup_id: u64,
    pub uid: u32,
    pub gid: u32,
}

/// Byte offsets of the kernel fields that lead from a connect program's context to the
/// socket's creator: `bpf_sock_addr_kern.sk`, then the socket's cgroup (`sock.sk_cgrp_data
/// .cgroup`, `cgroup.kn`, `kernfs_node.id`) and the credentials of the file that owns it
/// (`sock.sk_socket`, `socket.file`, `file.f_cred`, `cred.uid`, `cred.gid`). They differ per
/// kernel build, so the agent reads them from the kernel's BTF at load time. `valid == 0`
/// (no BTF): the programs use the connecting task instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOffsets {
    pub ctx_sk: u32,
    pub sk_cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    pub sk_socket: u32,
    pub socket_file: u32,
    pub file_cred: u32,
    pub cred_uid: u32,
    pub cred_gid: u32,
    pub valid: u32,
}

/// Byte offsets of the `task_struct` fields that say which process image connected
/// (`group_leader`, then its `start_boottime`; `self_exec_id`), read from the kernel's BTF at
/// load time as [`SocketOffsets`] are. `valid == 0`: [`Caller::process_start`] stays 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    pub group_leader: u32,
    pub start_boottime: u32,
    pub self_exec_id: u32,
    pub valid: u32,
}

/// Indexes into [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Connects to a metadata endpoint rewritten to the agent.
    Diverted = 0,
    /// Connects to a metadata endpoint let through unchanged: the agent's own upstream sockets.
    Passed = 1,
    /// Connects refused (EPERM): a metadata address on another port, or a caller whose
    /// installed verdict is refuse.
    Refused = 2,
    /// Connects let through unchanged because the caller's verdict is bypass.
    Bypassed = 3,
}

pub const COUNTER_COUNT: u32 = 4;

impl SockAddr {
    pub const fn v4(addr_be: u32, port: u16) -> Self {
        Self {
            addr: [addr_be, 0, 0, 0],
            port,
            family: AF_INET,
        }
    }

    pub const fn v6(addr: [u32; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            family: AF_INET6,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all fields are plain integers with explicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Caller {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CallerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SocketOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TaskOffsets {}
}

/// The third word of a v4-mapped address (`::ffff:a.b.c.d`), host order.
pub const V4_MAPPED_WORD: u32 = 0x0000_ffff;
/// The first word of the NAT64 well-known prefix `64:ff9b::/96`, host order.
pub const NAT64_WORD: u32 = 0x0064_ff9b;

/// The IPv4 address inside a v4-mapped, v4-compatible or NAT64 IPv6 address, given and
/// returned as the kernel holds them (network order words). The connect and sendmsg programs
/// treat such an address as the IPv4 endpoint it embeds: a miss here lets a dual-stack socket
/// reach the metadata service undiverted, so it lives here, where host tests cover it.
#[inline(always)]
pub fn embedded_ipv4(ip6: &[u32; 4]) -> Option<u32> {
    let (w0, w1, w2) = (
        u32::from_be(ip6[0]),
        u32::from_be(ip6[1]),
        u32::from_be(ip6[2]),
    );
    let embeds = (w0 == 0 && w1 == 0 && (w2 == V4_MAPPED_WORD || w2 == 0))
        || (w0 == NAT64_WORD && w1 == 0 && w2 == 0);
    embeds.then_some(ip6[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Endpoint>(), 8);
        assert_eq!(core::mem::size_of::<SockAddr>(), 20);
        assert_eq!(core::mem::size_of::<Caller>(), 56);
        assert_eq!(core::mem::offset_of!(Caller, process_start), 24);
        assert_eq!(core::mem::offset_of!(Caller, original), 32);
        assert_eq!(core::mem::size_of::<CallerKey>(), 16);
        assert_eq!(core::mem::size_of::<SocketOffsets>(), 40);
        assert_eq!(core::mem::size_of::<TaskOffsets>(), 16);
    }

    /// An IPv6 address as the kernel holds it: four network-order words.
    fn words(ip: core::net::Ipv6Addr) -> [u32; 4] {
        let o = ip.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    #[test]
    fn ipv4_endpoints_embedded_in_ipv6_addresses_are_found() {
        let metadata = u32::from_ne_bytes([169, 254, 169, 254]);
        for embedding in [
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::169.254.169.254",
        ] {
            let ip: core::net::Ipv6Addr = embedding.parse().unwrap();
            assert_eq!(embedded_ipv4(&words(ip)), Some(metadata), "{embedding}");
        }
        for other in [
            "fd00:ec2::254",
            "::1:a9fe:a9fe",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2001:db8::a9fe:a9fe",
            "fe80::a9fe:a9fe",
        ] {
            let ip: core::net::Ipv6Addr = other.parse().unwrap();
            assert_eq!(embedded_ipv4(&words(ip)), None, "{other}");
        }
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in [
            MAP_ENDPOINTS4,
            MAP_ENDPOINTS6,
            MAP_CALLERS,
            MAP_POD_NETNS,
            MAP_EXEMPT,
            MAP_VERDICTS,
            MAP_COUNTERS,
        ] {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }
}
