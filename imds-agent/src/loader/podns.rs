//! Which network namespace a pod's address lives in, named the way `bpf_sk_lookup_tcp` takes
//! it: the namespace's id (nsid) in the agent's namespace. The route to the pod's address
//! leaves by the pod's link (a veth pair, or a netkit one), whose other end is in the pod's
//! namespace; the kernel reports that namespace's id with the link, assigning one if it has
//! none yet (`ip link` shows it as link-netnsid).

use std::{collections::HashMap as StdHashMap, net::Ipv4Addr, sync::Mutex};

use aya::maps::{HashMap, MapData, MapError};
use imds_common::{MAP_POD_NETNS, MAX_POD_NETNS};

use super::netlink::{self, NLM_F_REQUEST, Reply};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK_NETNSID: u16 = 37;
/// `struct rtmsg` and `struct ifinfomsg`, which start the route and link messages.
const RTMSG: usize = 12;
const IFINFOMSG: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error("asking the kernel for the route to {address}: {source}")]
    Route {
        address: Ipv4Addr,
        source: std::io::Error,
    },
    #[error("asking the kernel for interface {ifindex}: {source}")]
    Link {
        ifindex: u32,
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
/// the route to `address` leaves.
pub fn netns_id_of(address: Ipv4Addr) -> Result<u32, PodNetnsError> {
    let ifindex = route_interface(address)?;
    let (name, netns_id) = link_peer_netns(ifindex)?;
    let link = name.unwrap_or_else(|| format!("interface {ifindex}"));
    // Negative: the kernel could not assign one (NETNSA_NSID_NOT_ASSIGNED).
    netns_id
        .and_then(|id| u32::try_from(id).ok())
        .ok_or(PodNetnsError::NotAPodLink { address, link })
}

/// One request, one reply: the body of its first message of the `expected` kind.
fn ask(message: &[u8], expected: u16) -> std::io::Result<Option<Vec<u8>>> {
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
}

/// The interface index of the route the kernel would use to reach `address`.
fn route_interface(address: Ipv4Addr) -> Result<u32, PodNetnsError> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    let mut payload = vec![libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    payload.extend(netlink::attribute(RTA_DST, &address.octets()));
    let body = ask(
        &netlink::request(RTM_GETROUTE, NLM_F_REQUEST, &payload),
        RTM_NEWROUTE,
    )
    .map_err(|source| PodNetnsError::Route { address, source })?
    .ok_or_else(|| PodNetnsError::Incomplete(format!("the route to {address}"), "route"))?;
    netlink::attributes(body.get(RTMSG..).unwrap_or_default())
        .find(|&(kind, value)| kind == RTA_OIF && value.len() >= 4)
        .map(|(_, value)| u32::from_ne_bytes(value[..4].try_into().expect("4 bytes")))
        .ok_or_else(|| {
            PodNetnsError::Incomplete(format!("the route to {address}"), "output interface")
        })
}

/// The link's name and the id of the namespace its other end is in (none for a link whose
/// ends are both here, or that has no other end).
fn link_peer_netns(ifindex: u32) -> Result<(Option<String>, Option<i32>), PodNetnsError> {
    // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change (u32).
    let mut payload = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    payload.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    payload.extend_from_slice(&[0u8; 8]);
    let body = ask(
        &netlink::request(RTM_GETLINK, NLM_F_REQUEST, &payload),
        RTM_NEWLINK,
    )
    .map_err(|source| PodNetnsError::Link { ifindex, source })?
    .ok_or_else(|| PodNetnsError::Incomplete(format!("interface {ifindex}"), "link"))?;
    let (mut name, mut netns_id) = (None, None);
    for (kind, value) in netlink::attributes(body.get(IFINFOMSG..).unwrap_or_default()) {
        match kind {
            IFLA_IFNAME => {
                let value = value.split(|&b| b == 0).next().unwrap_or_default();
                name = Some(String::from_utf8_lossy(value).into_owned());
            }
            IFLA_LINK_NETNSID if value.len() >= 4 => {
                netns_id = Some(i32::from_ne_bytes(value[..4].try_into().expect("4 bytes")));
            }
            _ => {}
        }
    }
    Ok((name, netns_id))
}

/// The agent's side of the pods' namespace map: each pod address is resolved when it first
/// connects, and again when a connection from it cannot be attributed (the pod was deleted
/// and its address given to a new pod, whose namespace has another id).
pub struct PodNamespaces {
    /// The node address pods are diverted to, where the agent listens.
    pub listener: Ipv4Addr,
    map: Mutex<HashMap<MapData, u32, u32>>,
    known: Mutex<StdHashMap<Ipv4Addr, u32>>,
}

impl PodNamespaces {
    pub fn new(listener: Ipv4Addr, map: HashMap<MapData, u32, u32>) -> Self {
        Self {
            listener,
            map: Mutex::new(map),
            known: Mutex::new(StdHashMap::new()),
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
                .contains_key(&address)
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
        known.insert(address, id);
        Ok(true)
    }
}
