//! Which network namespace a pod's address lives in, named the way `bpf_sk_lookup_tcp` takes
//! it: the namespace's id (nsid) in the agent's namespace. The route to the pod's address
//! leaves by the pod's link (a veth pair, or a netkit one), whose other end is in the pod's
//! namespace; the kernel reports that namespace's id with the link, assigning one if it has
//! none yet (`ip link` shows it as link-netnsid). Where pods share a bridge (the bridge CNI
//! plugin, flannel, Docker), the route leaves by the bridge: the pod's link is the bridge
//! port its hardware address was learned on (the neighbour entry, then the bridge's
//! forwarding table).

use std::{collections::HashSet, net::Ipv4Addr, sync::Mutex};

use aya::maps::{HashMap, MapData, MapError};
use imds_common::{MAP_POD_NETNS, MAX_POD_NETNS};

use super::netlink::{self, NLM_F_REQUEST, Reply};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NDA_MASTER: u16 = 9;
const NDA_VLAN: u16 = 5;
/// `struct rtmsg`, `struct ifinfomsg` and `struct ndmsg`, which start the route, link and
/// neighbour messages.
const RTMSG: usize = 12;
const IFINFOMSG: usize = 16;
const NDMSG: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error("asking the kernel for {what}: {source}")]
    Ask {
        what: String,
        source: std::io::Error,
    },
    #[error("the kernel's answer about {0} has no {1}")]
    Incomplete(String, &'static str),
    #[error(
        "the route to {address} leaves by {link}, which has no end in another network \
         namespace (not a pod's link)"
    )]
    NotAPodLink { address: Ipv4Addr, link: String },
    #[error("map {MAP_POD_NETNS}: {0}")]
    Map(#[from] MapError),
}

/// The id in this network namespace of the namespace at the other end of the link by which
/// the route to `address` leaves, or of the bridge port behind which `address` was learned.
pub fn netns_id_of(address: Ipv4Addr) -> Result<u32, PodNetnsError> {
    let ifindex = route_interface(address)?;
    let mut link = link(ifindex)?;
    if link.netns_id.is_none() && link.kind.as_deref() == Some("bridge") {
        let mac = neighbour_address(address, ifindex)?;
        link = self::link(bridge_port(&mac, ifindex)?)?;
    }
    let name = link.name.unwrap_or_else(|| format!("interface {ifindex}"));
    // Negative: the kernel could not assign one (NETNSA_NSID_NOT_ASSIGNED).
    link.netns_id
        .and_then(|id| u32::try_from(id).ok())
        .ok_or(PodNetnsError::NotAPodLink {
            address,
            link: name,
        })
}

/// One request, one reply: the body of its first message of the `expected` kind. `what` names
/// what was asked for, in errors.
fn ask(message: &[u8], expected: u16, what: &str) -> Result<Vec<u8>, PodNetnsError> {
    let exchange = || -> std::io::Result<Option<Vec<u8>>> {
        let socket = netlink::Socket::open(libc::NETLINK_ROUTE)?;
        socket.send(message)?;
        // A link's message with its statistics is a few KiB.
        let mut buffer = vec![0u8; 32 * 1024];
        let n = socket.receive(&mut buffer)?;
        Ok(netlink::replies(&buffer[..n])?
            .into_iter()
            .find_map(|reply| match reply {
                Reply::Message { kind, body } if kind == expected => Some(body.to_vec()),
                _ => None,
            }))
    };
    exchange()
        .map_err(|source| PodNetnsError::Ask {
            what: what.to_owned(),
            source,
        })?
        .ok_or_else(|| PodNetnsError::Incomplete(what.to_owned(), "answer"))
}

/// The interface index of the route the kernel would use to reach `address`.
fn route_interface(address: Ipv4Addr) -> Result<u32, PodNetnsError> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    let mut payload = vec![libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    payload.extend(netlink::attribute(RTA_DST, &address.octets()));
    let what = format!("the route to {address}");
    let body = ask(
        &netlink::request(RTM_GETROUTE, NLM_F_REQUEST, &payload),
        RTM_NEWROUTE,
        &what,
    )?;
    netlink::attributes(body.get(RTMSG..).unwrap_or_default())
        .find(|&(kind, value)| kind == RTA_OIF && value.len() >= 4)
        .map(|(_, value)| u32::from_ne_bytes(value[..4].try_into().expect("4 bytes")))
        .ok_or(PodNetnsError::Incomplete(what, "output interface"))
}

/// What the kernel says about a link.
struct Link {
    name: Option<String>,
    /// `bridge`, `veth`, ... (IFLA_INFO_KIND); none for a link without a driver kind.
    kind: Option<String>,
    /// The id of the namespace its other end is in; none for a link whose ends are both here,
    /// or that has no other end.
    netns_id: Option<i32>,
}

fn link(ifindex: u32) -> Result<Link, PodNetnsError> {
    // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change (u32).
    let mut payload = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    payload.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    payload.extend_from_slice(&[0u8; 8]);
    let body = ask(
        &netlink::request(RTM_GETLINK, NLM_F_REQUEST, &payload),
        RTM_NEWLINK,
        &format!("interface {ifindex}"),
    )?;
    let text = |value: &[u8]| {
        let value = value.split(|&b| b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(value).into_owned()
    };
    let mut link = Link {
        name: None,
        kind: None,
        netns_id: None,
    };
    for (kind, value) in netlink::attributes(body.get(IFINFOMSG..).unwrap_or_default()) {
        match kind {
            IFLA_IFNAME => link.name = Some(text(value)),
            IFLA_LINKINFO => {
                link.kind = netlink::attributes(value)
                    .find(|&(kind, _)| kind == IFLA_INFO_KIND)
                    .map(|(_, value)| text(value));
            }
            IFLA_LINK_NETNSID if value.len() >= 4 => {
                link.netns_id = Some(i32::from_ne_bytes(value[..4].try_into().expect("4 bytes")));
            }
            _ => {}
        }
    }
    Ok(link)
}

/// `struct ndmsg`: family, pads, ifindex (i32), state (u16), flags, type.
fn ndmsg(family: u8, ifindex: u32) -> Vec<u8> {
    let mut ndmsg = vec![family, 0, 0, 0];
    ndmsg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    ndmsg.extend_from_slice(&[0u8; 4]);
    ndmsg
}

/// The hardware address of the neighbour `address` on link `ifindex`. The agent has just
/// answered the pod's connection through that link, so the entry is fresh.
fn neighbour_address(address: Ipv4Addr, ifindex: u32) -> Result<Vec<u8>, PodNetnsError> {
    let what = format!("the neighbour {address}");
    let mut payload = ndmsg(libc::AF_INET as u8, ifindex);
    payload.extend(netlink::attribute(NDA_DST, &address.octets()));
    let body = ask(
        &netlink::request(RTM_GETNEIGH, NLM_F_REQUEST, &payload),
        RTM_NEWNEIGH,
        &what,
    )?;
    netlink::attributes(body.get(NDMSG..).unwrap_or_default())
        .find(|&(kind, _)| kind == NDA_LLADDR)
        .map(|(_, value)| value.to_vec())
        .ok_or(PodNetnsError::Incomplete(what, "hardware address"))
}

/// The port of bridge `bridge` on which `mac` was learned: without a VLAN, or on VLAN 1 (the
/// default of a bridge that filters VLANs).
fn bridge_port(mac: &[u8], bridge: u32) -> Result<u32, PodNetnsError> {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    let what = format!("the bridge port of {}", hex.join(":"));
    let mut last = None;
    for vlan in [None, Some(1u16)] {
        let mut payload = ndmsg(libc::AF_BRIDGE as u8, 0);
        payload.extend(netlink::attribute(NDA_LLADDR, mac));
        payload.extend(netlink::attribute(NDA_MASTER, &bridge.to_ne_bytes()));
        if let Some(vlan) = vlan {
            payload.extend(netlink::attribute(NDA_VLAN, &vlan.to_ne_bytes()));
        }
        let asked = ask(
            &netlink::request(RTM_GETNEIGH, NLM_F_REQUEST, &payload),
            RTM_NEWNEIGH,
            &what,
        );
        match asked {
            Ok(body) => {
                let port = body
                    .get(4..8)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                return port
                    .and_then(|port| u32::try_from(port).ok())
                    .ok_or(PodNetnsError::Incomplete(what, "port"));
            }
            Err(error) => last = Some(error),
        }
    }
    Err(last.expect("asked at least once"))
}

/// The agent's side of the pods' namespace map: each pod address is resolved when it first
/// connects, and again when a connection from it cannot be attributed (the pod was deleted
/// and its address given to a new pod, whose namespace has another id).
pub struct PodNamespaces {
    /// The node address pods are diverted to, where the agent listens.
    pub listener: Ipv4Addr,
    map: Mutex<HashMap<MapData, u32, u32>>,
    /// The addresses written to `map`, so that a known pod costs no syscall.
    known: Mutex<HashSet<Ipv4Addr>>,
}

impl PodNamespaces {
    pub fn new(listener: Ipv4Addr, map: HashMap<MapData, u32, u32>) -> Self {
        Self {
            listener,
            map: Mutex::new(map),
            known: Mutex::new(HashSet::new()),
        }
    }

    /// Puts the namespace of the pod at `address` where the getpeername program finds it:
    /// asks the kernel unless the address is known and `again` is false. Returns whether it
    /// asked.
    pub fn prepare(&self, address: Ipv4Addr, again: bool) -> Result<bool, PodNetnsError> {
        if !again
            && self
                .known
                .lock()
                .expect("pod netns lock")
                .contains(&address)
        {
            return Ok(false);
        }
        let id = netns_id_of(address)?;
        // Always written: the kernel's map is LRU and may have dropped the entry.
        self.map.lock().expect("pod netns lock").insert(
            u32::from_ne_bytes(address.octets()),
            id,
            0,
        )?;
        let mut known = self.known.lock().expect("pod netns lock");
        if known.len() >= MAX_POD_NETNS as usize {
            // More addresses than a node has pods: forget them all, they are asked again.
            known.clear();
        }
        known.insert(address);
        Ok(true)
    }
}
