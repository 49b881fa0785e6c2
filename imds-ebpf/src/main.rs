//! Entry points of the kernel programs. Maps and globals live in `maps.rs`.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp,
            bpf_sk_release, bpf_sk_storage_delete, bpf_sk_storage_get,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::{info, warn};
use imds_common::{
    Caller, CallerKey, Counter, Endpoint, SockAddr, V4_MAPPED_WORD, VERDICT_BYPASS, VERDICT_REFUSE,
    embedded_ipv4,
};
use maps::{
    IMDS_CALLERS, IMDS_DIVERT_IP4, IMDS_DIVERT_PORT, IMDS_ENDPOINTS4, IMDS_ENDPOINTS6, IMDS_EXEMPT,
    IMDS_HOST_NETNS, IMDS_POD_DIVERT_IP4, IMDS_POD_NETNS, IMDS_REFUSE_RAW, IMDS_SOCK_OFFSETS,
    IMDS_TASK_OFFSETS, IMDS_VERDICTS, count,
};

/// cgroup/connect4 return values: 1 lets connect() go on (possibly rewritten), 0 fails it with
/// EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
/// DNS over TCP on the metadata address (GCP's resolver) is not metadata traffic.
const DNS_PORT: u16 = 53;

/// `BPF_CGROUP_INET4_CONNECT` (kernel >= 4.17), attached with a link at the root of the
/// enforced cgroup tree. Runs in the connecting task's context before the TCP handshake;
/// rewriting `user_ip4`/`user_port` changes where the socket connects.
#[cgroup_sock_addr(connect4)]
pub fn imds_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Map keys must live on the stack (the verifier refuses pointers into the context).
    let ip: u32 = sa.user_ip4;
    // The fast path for every other destination: one hash lookup, nothing before it.
    let Some(endpoint) = (unsafe { IMDS_ENDPOINTS4.get(&ip) }) else {
        return ALLOW;
    };
    let port = u16::from_be(sa.user_port as u16);
    match decide(&ctx, sa.protocol, *endpoint, SockAddr::v4(ip, port)) {
        Connect::Divert(to) => {
            sa.user_ip4 = to;
            sa.user_port = u32::from(IMDS_DIVERT_PORT.load().to_be());
            ALLOW
        }
        Connect::Allow => ALLOW,
        Connect::Refuse => REFUSE,
    }
}

/// `BPF_CGROUP_INET6_CONNECT` (kernel >= 4.17). Also the only hook that runs for an AF_INET6
/// socket connecting to a v4-mapped address (`tcp_v6_connect` hands those to
/// `tcp_v4_connect` without the INET4 hook), so embedded IPv4 addresses are checked here
/// against the IPv4 endpoints. Diverted connects go to the agent's IPv4 listener as a
/// v4-mapped address; an IPV6_V6ONLY socket then cannot connect at all (fail closed).
#[cgroup_sock_addr(connect6)]
pub fn imds_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = read_ip6(&sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    let (endpoint, original) = match embedded_ipv4(&ip6) {
        Some(ip) => match unsafe { IMDS_ENDPOINTS4.get(&ip) } {
            // Forwarded to the IPv4 endpoint: the embedding is only a route to it.
            Some(endpoint) => (*endpoint, SockAddr::v4(ip, port)),
            None => return ALLOW,
        },
        None => match unsafe { IMDS_ENDPOINTS6.get(&ip6) } {
            Some(endpoint) => (*endpoint, SockAddr::v6(ip6, port)),
            None => return ALLOW,
        },
    };
    match decide(&ctx, sa.protocol, endpoint, original) {
        Connect::Divert(to) => {
            write_ip6(&mut sa.user_ip6, [0, 0, V4_MAPPED_WORD.to_be(), to]);
            sa.user_port = u32::from(IMDS_DIVERT_PORT.load().to_be());
            ALLOW
        }
        Connect::Allow => ALLOW,
        Connect::Refuse => REFUSE,
    }
}

/// Context fields must be accessed one word at a time at a fixed offset from the context
/// pointer: the verifier refuses a copy of the whole array (a load through an offset pointer).
#[inline(always)]
fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: in-bounds reads of a valid context field.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(words: &mut [u32; 4], value: [u32; 4]) {
    // SAFETY: in-bounds writes of a valid, writable context field.
    unsafe {
        core::ptr::write_volatile(&mut words[0], value[0]);
        core::ptr::write_volatile(&mut words[1], value[1]);
        core::ptr::write_volatile(&mut words[2], value[2]);
        core::ptr::write_volatile(&mut words[3], value[3]);
    }
}

/// `BPF_CGROUP_UDP4_SENDMSG` (kernel >= 4.18): unconnected UDP sends (`sendto`) to a metadata
/// address fail with EPERM, except DNS (GCP's resolver lives on the metadata address).
/// Connected UDP sockets are covered by the connect hooks.
#[cgroup_sock_addr(sendmsg4)]
pub fn imds_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    let ip: u32 = sa.user_ip4;
    if unsafe { IMDS_ENDPOINTS4.get(&ip) }.is_none() {
        return ALLOW;
    }
    udp_verdict(&ctx, sa.user_port)
}

/// `BPF_CGROUP_UDP6_SENDMSG`: as sendmsg4, for IPv6 endpoints and IPv4 embeddings.
#[cgroup_sock_addr(sendmsg6)]
pub fn imds_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    let ip6 = read_ip6(&sa.user_ip6);
    let metadata = match embedded_ipv4(&ip6) {
        Some(ip) => unsafe { IMDS_ENDPOINTS4.get(&ip) }.is_some(),
        None => unsafe { IMDS_ENDPOINTS6.get(&ip6) }.is_some(),
    };
    if !metadata {
        return ALLOW;
    }
    udp_verdict(&ctx, sa.user_port)
}

#[inline(always)]
fn udp_verdict(ctx: &SockAddrContext, user_port: u32) -> i32 {
    let port = u16::from_be(user_port as u16);
    if port == DNS_PORT {
        return ALLOW;
    }
    count(Counter::Refused);
    info!(ctx, "refused: UDP to a metadata address, port {}", port);
    REFUSE
}

/// `BPF_CGROUP_INET_SOCK_CREATE` (kernel >= 4.10): raw IP sockets could forge a TCP handshake
/// to the metadata service past every hook above, so enforced cgroups cannot create them
/// (EPERM), unless the agent was started with --allow-raw-sockets. The kernel runs this hook
/// for AF_INET and AF_INET6 only: AF_PACKET sockets are not covered (drop CAP_NET_RAW).
#[cgroup_sock(sock_create)]
pub fn imds_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock for the program's lifetime.
    let sock_type = unsafe { core::ptr::read_volatile(&(*ctx.sock).type_) };
    if sock_type == SOCK_RAW && IMDS_REFUSE_RAW.load() != 0 {
        let (cgroup_id, uid) = (connecting_task().cgroup_id, connecting_task().uid);
        info!(
            &ctx,
            "refused a raw socket: cgroup {} uid {}", cgroup_id, uid
        );
        return REFUSE;
    }
    ALLOW
}

const SOCK_RAW: u32 = 3;

enum Connect {
    /// To the agent's listener at this IPv4 address (network byte order).
    Divert(u32),
    Allow,
    Refuse,
}

/// What to do with a connect to a metadata endpoint, for both address families.
#[inline(always)]
fn decide(ctx: &SockAddrContext, protocol: u32, endpoint: Endpoint, original: SockAddr) -> Connect {
    if protocol != IPPROTO_TCP {
        // UDP: cgroup/sendmsg covers unconnected sends; a connected UDP socket gets the same
        // rule here: DNS passes, anything else to the metadata address is refused.
        if original.port == DNS_PORT {
            return Connect::Allow;
        }
        count(Counter::Refused);
        info!(
            ctx,
            "refused: UDP to a metadata address, port {}", original.port
        );
        return Connect::Refuse;
    }
    if original.port != endpoint.port
        && (endpoint.other_port == 0 || original.port != endpoint.other_port)
    {
        if original.port == DNS_PORT {
            return Connect::Allow;
        }
        count(Counter::Refused);
        info!(
            ctx,
            "refused: a metadata address on port {}, not the service's", original.port
        );
        return Connect::Refuse;
    }

    // Where the agent can be reached from the socket's network namespace: its loopback is
    // only the agent's in the agent's own namespace; pods reach it on a node address.
    // SAFETY: helper valid for cgroup sock_addr programs (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let host = IMDS_HOST_NETNS.load();
    let in_host_netns = host == 0 || netns == host;
    let divert_to = if in_host_netns {
        IMDS_DIVERT_IP4.load()
    } else {
        IMDS_POD_DIVERT_IP4.load()
    };
    if divert_to == 0 {
        // No address where this namespace can reach the agent: fail closed.
        count(Counter::Refused);
        warn!(
            ctx,
            "refused: no agent address for network namespace {}", netns
        );
        return Connect::Refuse;
    }

    // SAFETY: helper valid for cgroup sock_addr programs; ctx is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // The agent registers its upstream sockets' cookies before connecting: a cookie is
    // assigned by the kernel and cannot be claimed by a workload, unlike a mark or a uid.
    if unsafe { IMDS_EXEMPT.get(&cookie) }.is_some() {
        count(Counter::Passed);
        return Connect::Allow;
    }

    let pid_tgid = bpf_get_current_pid_tgid();
    let key = socket_creator(ctx).unwrap_or_else(connecting_task);
    // A verdict the agent installed for a caller whose decision does not depend on the
    // request: no round trip to the agent.
    match unsafe { IMDS_VERDICTS.get(&key) } {
        Some(&VERDICT_REFUSE) => {
            count(Counter::Refused);
            info!(
                ctx,
                "refused by the agent's verdict: cgroup {} uid {} gid {}",
                key.cgroup_id,
                key.uid,
                key.gid
            );
            return Connect::Refuse;
        }
        Some(&VERDICT_BYPASS) => {
            count(Counter::Bypassed);
            return Connect::Allow;
        }
        _ => {}
    }
    let (process_start, exec_id) = process_image().unwrap_or((0, 0));
    let caller = Caller {
        cgroup_id: key.cgroup_id,
        pid: (pid_tgid >> 32) as u32,
        uid: key.uid,
        gid: key.gid,
        exec_id,
        process_start,
        original,
        _pad: 0,
    };
    // On the socket itself: the agent finds it from the connection it accepts (its getpeername
    // program), so no program has to run at the TCP events of every other connection. A
    // connection the agent cannot attribute would be refused there anyway; refusing it here is
    // faster and keeps the rule "unrecorded means refused" in one place.
    // SAFETY: the helper returns null or a pointer to this socket's storage.
    let storage = unsafe { IMDS_CALLERS.get_or_insert_ptr_mut(ctx, None) };
    // SAFETY: checked non-null; the storage lives as long as the socket.
    let recorded = unsafe { storage.as_mut() }
        .map(|slot| *slot = caller)
        .is_some();
    if !recorded {
        count(Counter::Refused);
        warn!(
            ctx,
            "refused: no socket storage for the caller's record (cgroup {})", key.cgroup_id
        );
        return Connect::Refuse;
    }
    count(Counter::Diverted);
    Connect::Divert(divert_to)
}

/// The cgroup, uid and gid of the task running the program.
#[inline(always)]
fn connecting_task() -> CallerKey {
    let uid_gid = bpf_get_current_uid_gid();
    CallerKey {
        // SAFETY: helper valid for cgroup sock_addr programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
    }
}

/// Who created the socket being connected: the socket's cgroup (the one whose programs the
/// kernel runs, fixed at socket()) and the credentials of the file that owns it (the
/// creator's, for the socket's lifetime). Found by following kernel pointers at offsets the
/// agent read from BTF; only on this path, so other connects pay nothing and no socket
/// carries extra state. `None` without offsets or if a read fails.
#[inline(always)]
fn socket_creator(ctx: &SockAddrContext) -> Option<CallerKey> {
    let at = IMDS_SOCK_OFFSETS.load();
    if at.valid == 0 {
        return None;
    }
    // The context is the kernel's bpf_sock_addr_kern, whose `sk` is the struct sock. Read as
    // a number, not through the verifier's socket pointer, which allows no arithmetic.
    let sk: u64 = kernel_read(ctx.sock_addr as u64, at.ctx_sk)?;
    let cgroup: u64 = kernel_read(sk, at.sk_cgroup)?;
    let kn: u64 = kernel_read(cgroup, at.cgroup_kn)?;
    let cgroup_id: u64 = kernel_read(kn, at.kn_id)?;
    let socket: u64 = kernel_read(sk, at.sk_socket)?;
    let file: u64 = kernel_read(socket, at.socket_file)?;
    let cred: u64 = kernel_read(file, at.file_cred)?;
    Some(CallerKey {
        cgroup_id,
        uid: kernel_read(cred, at.cred_uid)?,
        gid: kernel_read(cred, at.cred_gid)?,
    })
}

/// Which program image of which process is connecting: its thread-group leader's start time
/// and the task's exec count. The agent caches what it reads from /proc about a process
/// under these (a reused pid has another start time, an exec() another count), so a process
/// that connects again costs it no /proc reads. `None` without offsets or if a read fails.
#[inline(always)]
fn process_image() -> Option<(u64, u32)> {
    let at = IMDS_TASK_OFFSETS.load();
    if at.valid == 0 {
        return None;
    }
    // SAFETY: helper valid for cgroup sock_addr programs loaded with CAP_PERFMON (as
    // bpf_probe_read_kernel); returns the running task's address.
    let task = unsafe { bpf_get_current_task() };
    let leader: u64 = kernel_read(task, at.group_leader)?;
    let start: u64 = kernel_read(leader, at.start_boottime)?;
    let exec_id: u64 = kernel_read(task, at.self_exec_id)?;
    Some((start, exec_id as u32))
}

/// Reads a `T` at `base + offset` in kernel memory; `None` for a null base or a fault.
#[inline(always)]
fn kernel_read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    let address = base.wrapping_add(u64::from(offset)) as *const T;
    // SAFETY: bpf_probe_read_kernel copies via the kernel's fault-handling accessor: a bad
    // address is an error, never a crash.
    unsafe { bpf_probe_read_kernel(address) }.ok()
}

/// `BPF_CGROUP_INET4_GETPEERNAME` (kernel >= 5.8), attached to the agent's own cgroup only.
/// The agent asks for the peer of each connection it accepts; for one accepted on a listener
/// that connects are diverted to, this finds the client's socket (by the exact address pair,
/// in the agent's namespace or the pod's) and copies the caller the connect program left there
/// onto the accepted socket, where the agent reads it by file descriptor. A connection that
/// was not diverted has nothing to copy.
#[cgroup_sock_addr(getpeername4)]
pub fn imds_getpeername4(ctx: SockAddrContext) -> i32 {
    copy_caller(&ctx);
    // getpeername programs must return 1; the address is left as it is.
    1
}

#[inline(always)]
fn copy_caller(ctx: &SockAddrContext) {
    // SAFETY: the kernel passes a valid bpf_sock_addr whose `sk` is the accepted socket.
    let accepted = unsafe { &*(*ctx.sock_addr).__bindgen_anon_1.sk };
    // src_port is in host byte order in bpf_sock, dst_port in network byte order.
    let (local_ip, local_port) = (accepted.src_ip4, accepted.src_port);
    if local_port != u32::from(IMDS_DIVERT_PORT.load()) {
        return;
    }
    let Some(netns) = client_netns(local_ip, accepted.dst_ip4) else {
        return;
    };
    // The client's socket receives what the listener side sends: a packet from the
    // listener's address to the client's.
    // SAFETY: all-zero bytes are a valid tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = local_ip;
    tuple.__bindgen_anon_1.ipv4.sport = (local_port as u16).to_be();
    tuple.__bindgen_anon_1.ipv4.daddr = accepted.dst_ip4;
    tuple.__bindgen_anon_1.ipv4.dport = accepted.dst_port;
    // SAFETY: helper valid for cgroup sock_addr programs; the tuple is on the stack and the
    // size is that of its IPv4 part.
    let client = unsafe {
        bpf_sk_lookup_tcp(
            ctx.sock_addr.cast(),
            &mut tuple,
            core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv4) as u32,
            netns,
            0,
        )
    };
    if client.is_null() {
        return;
    }
    let map = core::ptr::from_ref(&IMDS_CALLERS).cast_mut().cast();
    // SAFETY: `client` is a referenced socket from the lookup; no F_CREATE: read only.
    let found = unsafe { bpf_sk_storage_get(map, client.cast(), core::ptr::null_mut(), 0) }
        .cast::<Caller>();
    // SAFETY: null or the client socket's storage, valid until the socket is released.
    let caller = unsafe { found.as_ref() }.copied();
    if caller.is_some() {
        // Taken once: if the socket later disconnects (AF_UNSPEC) and connects to the
        // listener directly, undiverted, nothing is left for it to claim.
        // SAFETY: `client` is still referenced.
        unsafe { bpf_sk_storage_delete(map, client.cast()) };
    }
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(client.cast()) };
    let Some(caller) = caller else {
        return;
    };
    // SAFETY: the helper returns null or a pointer to the accepted socket's storage.
    let storage = unsafe { IMDS_CALLERS.get_or_insert_ptr_mut(ctx, None) };
    // SAFETY: checked non-null; the storage lives as long as the socket.
    if let Some(slot) = unsafe { storage.as_mut() } {
        *slot = caller;
    }
}

/// Where the client's socket is, as `bpf_sk_lookup_tcp` takes it: for the loopback listener,
/// the agent's own namespace; for the node address pods are diverted to, the pod's namespace,
/// by the id (nsid) the agent resolved for the client's address before asking. `None`: not a
/// listener connects are diverted to, or a pod the agent has no namespace for.
#[inline(always)]
fn client_netns(local_ip: u32, peer_ip: u32) -> Option<u64> {
    let pod_listener = IMDS_POD_DIVERT_IP4.load();
    if pod_listener != 0 && local_ip == pod_listener {
        // SAFETY: a plain lookup; the key is on the stack.
        if let Some(nsid) = unsafe { IMDS_POD_NETNS.get(&peer_ip) } {
            return Some(u64::from(*nsid));
        }
    }
    (local_ip == IMDS_DIVERT_IP4.load()).then_some(BPF_F_CURRENT_NETNS as u64)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
