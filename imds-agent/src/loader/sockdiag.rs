//! Closing connections to the metadata service that existed before enforcement started, so a
//! keep-alive connection opened earlier cannot dodge the policy. Uses the kernel's sock_diag
//! netlink interface: dump TCP sockets (each with its cgroup id, kernel >= 5.7), then
//! SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY) the ones that matter, by socket cookie.
//!
//! Scope: the agent's network namespace (sock_diag is per namespace). A pod's connection
//! opened before the agent started, in the pod's own namespace, is not closed by this pass.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use super::netlink::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, Reply};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_CGROUP_ID: u16 = 21;
const IPPROTO_TCP: u8 = 6;
/// Every TCP state but LISTEN (10) and TIME_WAIT (6): sockets that can still carry a request.
const STATES: u32 = 0xfff & !(1 << 10) & !(1 << 6);

const SOCKID: usize = 48;
const DIAG_MSG: usize = 4 + SOCKID + 20;

/// One TCP socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    pub family: u8,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub cgroup_id: Option<u64>,
    /// The raw `inet_diag_sockid`, which SOCK_DESTROY takes back to name the socket.
    id: [u8; SOCKID],
}

/// An `inet_diag_req_v2` for TCP sockets of `family` in [`STATES`].
fn request(kind: u16, flags: u16, family: u8, id: &[u8; SOCKID]) -> Vec<u8> {
    let mut payload = vec![family, IPPROTO_TCP, 0, 0];
    payload.extend_from_slice(&STATES.to_ne_bytes());
    payload.extend_from_slice(id);
    netlink::request(kind, flags, &payload)
}

fn address(family: u8, bytes: &[u8], port: [u8; 2]) -> SocketAddr {
    let port = u16::from_be_bytes(port);
    let ip = if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&bytes[..16]);
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    SocketAddr::new(ip, port)
}

/// Parses one dump datagram: the sockets in it, and whether the dump is done.
pub fn parse_dump(data: &[u8]) -> io::Result<(Vec<DiagSocket>, bool)> {
    let mut sockets = Vec::new();
    for reply in netlink::replies(data)? {
        match reply {
            Reply::Done => return Ok((sockets, true)),
            Reply::Message {
                kind: SOCK_DIAG_BY_FAMILY,
                body,
            } if body.len() >= DIAG_MSG => {
                let family = body[0];
                let id: [u8; SOCKID] = body[4..4 + SOCKID].try_into().expect("sockid");
                let cgroup_id = netlink::attributes(&body[DIAG_MSG..])
                    .find(|&(kind, value)| kind == INET_DIAG_CGROUP_ID && value.len() >= 8)
                    .map(|(_, value)| u64::from_ne_bytes(value[..8].try_into().expect("8 bytes")));
                sockets.push(DiagSocket {
                    family,
                    source: address(family, &id[4..20], [id[0], id[1]]),
                    destination: address(family, &id[20..36], [id[2], id[3]]),
                    cgroup_id,
                    id,
                });
            }
            _ => {}
        }
    }
    Ok((sockets, false))
}

/// Every TCP socket of this network namespace that can still carry a request.
pub fn tcp_sockets() -> io::Result<Vec<DiagSocket>> {
    let mut all = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let socket = netlink::Socket::open(NETLINK_SOCK_DIAG)?;
        socket.send(&request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[0; SOCKID],
        ))?;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = socket.receive(&mut buffer)?;
            let (sockets, done) = parse_dump(&buffer[..n])?;
            all.extend(sockets);
            if done || n == 0 {
                break;
            }
        }
    }
    Ok(all)
}

/// Aborts a socket: its owner's next read or write fails with ECONNABORTED.
pub fn destroy(socket: &DiagSocket) -> io::Result<()> {
    let netlink = netlink::Socket::open(NETLINK_SOCK_DIAG)?;
    netlink.send(&request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        socket.family,
        &socket.id,
    ))?;
    let mut buffer = [0u8; 512];
    let n = netlink.receive(&mut buffer)?;
    // An ack, or an error with the kernel's errno.
    netlink::replies(&buffer[..n]).map(drop)
}

/// The IPv4 address a destination names, for IPv4 and v4-mapped IPv6 sockets.
pub fn destination_ipv4(socket: &DiagSocket) -> Option<Ipv4Addr> {
    match socket.destination.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}

const _: () = assert!(size_of::<[u8; SOCKID]>() == 48);

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram as the kernel sends it: one IPv4 socket 10.0.0.5:40000 -> 169.254.169.254:80
    /// with a cgroup id attribute, then NLMSG_DONE.
    fn crafted() -> Vec<u8> {
        let mut id = [0u8; SOCKID];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&80u16.to_be_bytes());
        id[4..8].copy_from_slice(&[10, 0, 0, 5]);
        id[20..24].copy_from_slice(&[169, 254, 169, 254]);
        let mut body = vec![libc::AF_INET as u8, 1, 0, 0];
        body.extend_from_slice(&id);
        body.extend_from_slice(&[0u8; 20]);
        body.extend(netlink::attribute(
            INET_DIAG_CGROUP_ID,
            &4242u64.to_ne_bytes(),
        ));
        let mut data = netlink::request(SOCK_DIAG_BY_FAMILY, 0, &body);
        data.extend(netlink::request(netlink::NLMSG_DONE, 0, &[]));
        data
    }

    #[test]
    fn parses_sockets_and_their_cgroups() {
        let (sockets, done) = parse_dump(&crafted()).unwrap();
        assert!(done);
        assert_eq!(sockets.len(), 1);
        assert_eq!(sockets[0].source, "10.0.0.5:40000".parse().unwrap());
        assert_eq!(
            sockets[0].destination,
            "169.254.169.254:80".parse().unwrap()
        );
        assert_eq!(sockets[0].cgroup_id, Some(4242));
        assert_eq!(
            destination_ipv4(&sockets[0]),
            Some(Ipv4Addr::new(169, 254, 169, 254))
        );
    }

    #[test]
    fn a_truncated_message_is_an_error() {
        let data = crafted();
        assert!(parse_dump(&data[..30]).is_err() || parse_dump(&data[..30]).unwrap().0.is_empty());
        let mut bad = data.clone();
        bad[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(parse_dump(&bad).is_err());
    }
}
