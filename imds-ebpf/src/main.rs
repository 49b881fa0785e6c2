//! Entry points of the kernel programs. Maps and globals live in `maps.rs`.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use imds_common::{AF_INET, Caller, Counter, SockAddr, VERDICT_BYPASS, VERDICT_REFUSE, VerdictKey};
use maps::{
    IMDS_CONNS, IMDS_DIVERT_IP4, IMDS_DIVERT_PORT, IMDS_ENDPOINTS4, IMDS_EXEMPT, IMDS_PENDING,
    IMDS_VERDICTS, count,
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
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Map keys must live on the stack (the verifier refuses pointers into the context).
    let ip: u32 = sa.user_ip4;
    // The fast path for every other destination: one hash lookup, nothing before it.
    let Some(endpoint) = (unsafe { IMDS_ENDPOINTS4.get(&ip) }) else {
        return Ok(ALLOW);
    };
    if sa.protocol != IPPROTO_TCP {
        // TODO(issue 5): UDP connect/sendmsg to the metadata address.
        return Ok(ALLOW);
    }
    let port = u16::from_be(sa.user_port as u16);
    if port != endpoint.port {
        if port == DNS_PORT {
            return Ok(ALLOW);
        }
        count(Counter::Refused);
        return Ok(REFUSE);
    }

    // SAFETY: helper valid for cgroup/connect4; ctx is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // The agent registers its upstream sockets' cookies before connecting: a cookie is
    // assigned by the kernel and cannot be claimed by a workload, unlike a mark or a uid.
    if unsafe { IMDS_EXEMPT.get(&cookie) }.is_some() {
        count(Counter::Passed);
        return Ok(ALLOW);
    }

    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let key = VerdictKey {
        cgroup_id,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
    };
    // A verdict the agent installed for a caller whose decision does not depend on the
    // request: no round trip to the agent.
    match unsafe { IMDS_VERDICTS.get(&key) } {
        Some(&VERDICT_REFUSE) => {
            count(Counter::Refused);
            return Ok(REFUSE);
        }
        Some(&VERDICT_BYPASS) => {
            count(Counter::Bypassed);
            return Ok(ALLOW);
        }
        _ => {}
    }
    let caller = Caller {
        cgroup_id,
        pid: (pid_tgid >> 32) as u32,
        uid: key.uid,
        gid: key.gid,
        _pad0: 0,
        original: SockAddr::v4(ip, port),
        _pad1: 0,
    };
    // A connection the agent cannot attribute would be refused there anyway; refusing it here
    // is faster and keeps the rule "unrecorded means refused" in one place.
    if IMDS_PENDING.insert(&cookie, &caller, 0).is_err() {
        count(Counter::Refused);
        return Ok(REFUSE);
    }
    sa.user_ip4 = IMDS_DIVERT_IP4.load();
    sa.user_port = u32::from(IMDS_DIVERT_PORT.load().to_be());
    count(Counter::Diverted);
    Ok(ALLOW)
}

/// `BPF_CGROUP_SOCK_OPS` (kernel >= 4.13). `TCP_CONNECT_CB` runs in `tcp_connect()` after the
/// source port is chosen and before the SYN is sent, so the agent's accept() can never see a
/// diverted connection before it is recorded. `STATE_CB` (enabled per diverted socket only)
/// removes the record when the connection closes.
#[sock_ops]
pub fn imds_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

fn local_addr(ctx: &SockOpsContext) -> SockAddr {
    // local_port is in host byte order in bpf_sock_ops; local_ip4 in network byte order.
    SockAddr::v4(ctx.local_ip4(), ctx.local_port() as u16)
}

fn on_connect(ctx: &SockOpsContext) {
    if ctx.family() != u32::from(AF_INET) || ctx.remote_ip4() != IMDS_DIVERT_IP4.load() {
        return;
    }
    // SAFETY: helper valid for sock_ops; ctx is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(caller) = (unsafe { IMDS_PENDING.get(&cookie) }) else {
        return;
    };
    let caller = *caller;
    let _ = IMDS_PENDING.remove(&cookie);
    if IMDS_CONNS.insert(&local_addr(ctx), &caller, 0).is_ok() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

fn on_close(ctx: &SockOpsContext) {
    let _ = IMDS_CONNS.remove(&local_addr(ctx));
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
