//! Where callers in other network namespaces (pods) reach the agent. The kernel rewrites a
//! diverted connect from the agent's own namespace to loopback, but a pod's loopback is its
//! own: its connects go to an address of the node instead, where the agent listens on the
//! same port. Connections there are served only if the kernel recorded them as diverted, so
//! the listener being reachable from elsewhere gives nothing away.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// `--pod-address`: how the node address for pods is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodAddress {
    /// The IPv4 address of the interface holding the default route.
    Auto,
    /// No address: connects from other namespaces to a metadata endpoint are refused.
    None,
    Ip(Ipv4Addr),
    /// The node's addresses, all IPv6 (an IPv6-only node; Kubernetes' `status.hostIPs` there):
    /// pods reach the agent over IPv4 only, so their connects are refused, with a warning.
    Ipv6Only(Vec<Ipv6Addr>),
}

impl FromStr for PodAddress {
    type Err = String;

    /// `auto`, `none`, or the node's addresses, comma-separated as Kubernetes writes
    /// `status.hostIPs` (`10.0.0.7,fd00::7`): the first IPv4 one is used.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => return Ok(Self::Auto),
            "none" => return Ok(Self::None),
            _ => {}
        }
        let mut listed = Vec::new();
        for part in s.split(',').map(str::trim) {
            let ip: IpAddr = part.parse().map_err(|_| {
                format!("{part:?}: expected auto, none, or the node's addresses (comma-separated)")
            })?;
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(format!(
                    "{ip}: pods cannot reach the agent there (a pod's loopback is its own)"
                ));
            }
            listed.push(ip);
        }
        let mut v6 = Vec::new();
        for ip in listed {
            match ip {
                IpAddr::V4(ip) => return Ok(Self::Ip(ip)),
                IpAddr::V6(ip) => v6.push(ip),
            }
        }
        Ok(Self::Ipv6Only(v6))
    }
}

impl fmt::Display for PodAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::None => f.write_str("none"),
            Self::Ip(ip) => ip.fmt(f),
            Self::Ipv6Only(ips) => {
                let listed: Vec<String> = ips.iter().map(Ipv6Addr::to_string).collect();
                f.write_str(&listed.join(","))
            }
        }
    }
}

impl PodAddress {
    /// The address to use, `None` for no pod diversion. `auto` without a default route (or
    /// with no IPv4 address on its interface) is no pod diversion, with the reason.
    pub fn resolve(&self) -> (Option<Ipv4Addr>, Option<String>) {
        match self {
            Self::Ip(ip) => (Some(*ip), None),
            Self::None => (None, None),
            Self::Ipv6Only(_) => (
                None,
                Some(format!(
                    "--pod-address {self}: the node has no IPv4 address; pods reach the agent \
                     over IPv4 only, so connects from pods to the metadata service are refused \
                     (node daemons are served). On dual-stack nodes pass an IPv4 address of \
                     the node"
                )),
            ),
            Self::Auto => {
                let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
                let Some(interface) = default_route_interface(&route) else {
                    return (
                        None,
                        Some(
                            "--pod-address auto: no IPv4 default route; connects from other \
                             network namespaces (pods) to the metadata service are refused"
                                .into(),
                        ),
                    );
                };
                match interface_ipv4(&interface) {
                    Some(ip) => (Some(ip), None),
                    None => (
                        None,
                        Some(format!(
                            "--pod-address auto: {interface} (the default route's interface) \
                             has no IPv4 address; connects from pods are refused"
                        )),
                    ),
                }
            }
        }
    }
}

/// The interface of the IPv4 default route in `/proc/net/route` (destination and mask 0; the
/// lowest metric if there are several). Read as text rather than asked over netlink as
/// `loader::podns` asks for one route: finding the default route means listing the table,
/// a dump that spans datagrams on a node with a route per pod, which the one-reply netlink
/// exchanges there do not handle; procfs reads this file no differently.
fn default_route_interface(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let (iface, destination, metric, mask) = (
                fields.first()?,
                fields.get(1)?,
                fields.get(6)?,
                fields.get(7)?,
            );
            (*destination == "00000000" && *mask == "00000000")
                .then(|| (metric.parse::<u32>().unwrap_or(u32::MAX), iface.to_string()))
        })
        .min()
        .map(|(_, iface)| iface)
}

/// The first IPv4 address of an interface in this network namespace.
fn interface_ipv4(name: &str) -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = list;
    while !cursor.is_null() && found.is_none() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let entry_name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        if entry.ifa_addr.is_null() || entry_name.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr of its family.
        let address = unsafe { &*entry.ifa_addr };
        if i32::from(address.sa_family) == libc::AF_INET {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in.
            let v4 = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
            found = Some(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)));
        }
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_parse_and_refuse_loopback() {
        assert_eq!("auto".parse(), Ok(PodAddress::Auto));
        assert_eq!("none".parse(), Ok(PodAddress::None));
        assert_eq!(
            "10.0.0.7".parse(),
            Ok(PodAddress::Ip(Ipv4Addr::new(10, 0, 0, 7)))
        );
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "node",
            "::1",
            "10.0.0.7,",
            "10.0.0.7,::1",
        ] {
            assert!(bad.parse::<PodAddress>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn node_address_lists_give_their_first_ipv4_address() {
        // status.hostIPs on a dual-stack node, in either family order.
        assert_eq!(
            "fd00::7,10.0.0.7".parse(),
            Ok(PodAddress::Ip(Ipv4Addr::new(10, 0, 0, 7)))
        );
        assert_eq!(
            "10.0.0.7,fd00::7".parse(),
            Ok(PodAddress::Ip(Ipv4Addr::new(10, 0, 0, 7)))
        );
        // An IPv6-only node: no pod diversion, and a warning that says so.
        let v6_only: PodAddress = "fd00::7".parse().expect("parses");
        assert_eq!(
            v6_only,
            PodAddress::Ipv6Only(vec!["fd00::7".parse().unwrap()])
        );
        let (ip, problem) = v6_only.resolve();
        assert_eq!(ip, None);
        assert!(
            problem.is_some_and(|p| p.contains("fd00::7") && p.contains("IPv4 only")),
            "the warning names the address and the reason"
        );
    }

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_interface(table).as_deref(), Some("eth0"));
        let no_default = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_route_interface(no_default), None);
    }

    #[test]
    fn loopback_has_its_address() {
        assert_eq!(interface_ipv4("lo"), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(interface_ipv4("no-such-interface0"), None);
    }
}
