//! Cloud providers: which metadata endpoints the agent diverts by default on each.
//!
//! Source: shared/reference/imds-protocols.md (A1.1, A1.8, A1.10, A4). Only the metadata
//! service's own TCP port is diverted; other ports on its address are refused except DNS
//! (GCP's resolver lives on 169.254.169.254:53), and other link-local services (Amazon DNS
//! 169.254.169.253, Time Sync 169.254.169.123) are other addresses, so they are untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use clap::ValueEnum;

/// The cloud the agent runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Provider {
    /// EC2: IPv4 and the Nitro IPv6 endpoint. The ECS (169.254.170.2) and EKS Pod Identity
    /// (169.254.170.23, fd00:ec2::23) credential endpoints are not IMDS and carry their own
    /// authentication; they are diverted only when named with --endpoint, so that Pod
    /// Identity keeps working unless a policy is meant to govern it.
    Aws,
    Gcp,
    Azure,
    Oci,
    /// Nova's IPv4 endpoint and its IPv6 link-local one (Victoria and later).
    Openstack,
    Digitalocean,
    Alibaba,
    Hetzner,
    /// Volcengine (BytePlus abroad): its own address, an EC2-style tree with session tokens
    /// of its own header names, and role credentials under `volcstack/`.
    #[value(alias = "byteplus")]
    Volcengine,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.to_possible_value().expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

impl Provider {
    /// The endpoints diverted on this provider unless --no-default-endpoints is given.
    pub fn default_endpoints(self) -> Vec<SocketAddr> {
        let ec2_v4 = SocketAddr::from(([169, 254, 169, 254], 80));
        match self {
            Self::Aws => vec![
                ec2_v4,
                SocketAddr::from((Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), 80)),
            ],
            Self::Openstack => vec![
                ec2_v4,
                // Scope (interface) chosen at start-up: see resolve_link_local.
                SocketAddr::from((Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xa9fe, 0xa9fe), 80)),
            ],
            Self::Alibaba => vec![SocketAddr::from(([100, 100, 100, 200], 80))],
            Self::Volcengine => vec![SocketAddr::from(([100, 96, 0, 96], 80))],
            // IMDS, and the WireServer and its HostGAPlugin (VM certificates, extension
            // settings), which Azure's own guest proxy agent guards as well.
            Self::Azure => vec![ec2_v4, WIRESERVER, HOST_GA_PLUGIN],
            Self::Gcp | Self::Oci | Self::Digitalocean | Self::Hetzner => vec![ec2_v4],
        }
    }
}

/// Azure's WireServer: the goal state, the VM's certificates, extension settings (WALinuxAgent's
/// protocol: `/?comp=versions`, `/machine/?comp=goalstate`, `/machine/...?comp=...`).
pub const WIRESERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)), 80);
/// The HostGAPlugin beside it (`/vmSettings`, `/extensionArtifact`, `/status`, ...).
pub const HOST_GA_PLUGIN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)), 32526);

/// A metadata service's session tokens (AWS IMDSv2, and Alibaba's hardened mode, its copy with
/// its own header names; reference A1, A4): a PUT to `path` asking for a lifetime in
/// `ttl_header` issues a token, which later requests carry in `token_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTokens {
    pub path: &'static str,
    pub ttl_header: &'static str,
    pub token_header: &'static str,
}

const AWS_TOKENS: SessionTokens = SessionTokens {
    path: "/latest/api/token",
    ttl_header: "x-aws-ec2-metadata-token-ttl-seconds",
    token_header: "x-aws-ec2-metadata-token",
};

const ALIBABA_TOKENS: SessionTokens = SessionTokens {
    path: "/latest/api/token",
    ttl_header: "x-aliyun-ecs-metadata-token-ttl-seconds",
    token_header: "x-aliyun-ecs-metadata-token",
};

/// Volcengine's copy, with its own header names. Not in the reference: these are the names
/// its users' clients send. The safe side either way: requests with these headers get the
/// token rules and binding, and a request without a token is what a policy allows or not.
const VOLCENGINE_TOKENS: SessionTokens = SessionTokens {
    path: "/latest/api/token",
    ttl_header: "x-volc-ecs-metadata-token-ttl-seconds",
    token_header: "x-volc-ecs-metadata-token",
};

impl SessionTokens {
    /// Whether the request asks for a token.
    pub fn is_token_request(&self, method: &http::Method, path: &str) -> bool {
        method == http::Method::PUT && path.trim_end_matches('/') == self.path
    }

    /// The lifetime a token request asks for, or a token response states.
    pub fn ttl(&self, headers: &http::HeaderMap) -> Option<u64> {
        headers
            .get(self.ttl_header)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Provider {
    /// The session-token protocol of the provider's metadata service, if it has one: where
    /// per-policy token rules (`tokens.required`, `maxTtlSeconds`) and token binding apply.
    /// OpenStack's EC2-compatible tree has no tokens.
    pub fn session_tokens(self) -> Option<SessionTokens> {
        match self {
            Self::Aws => Some(AWS_TOKENS),
            Self::Alibaba => Some(ALIBABA_TOKENS),
            Self::Volcengine => Some(VOLCENGINE_TOKENS),
            _ => None,
        }
    }
}

impl Provider {
    /// The query parameters the service at `destination` documents (reference: A1, A2.4,
    /// A2.5, A3, A4; Azure's WireServer as WALinuxAgent asks it), names as the services read
    /// them (exactly). Any other is refused with 400 rather than passed to a service that may
    /// give it a meaning the policy never saw. The services without parameters take none.
    pub fn query_parameters(self, destination: SocketAddr) -> &'static [&'static str] {
        match self {
            Self::Azure if destination == WIRESERVER => &["comp", "type", "incarnation"],
            Self::Azure if destination == HOST_GA_PLUGIN => &[],
            // As GKE's metadata concealment proxy keeps them.
            Self::Gcp => &[
                "recursive",
                "alt",
                "wait_for_change",
                "timeout_sec",
                "last_etag",
                "service_account",
                "scope",
                "scopes",
                "audience",
                "licenses",
                "format",
            ],
            // Instance, attested, load balancer and scheduled events documents, and managed
            // identity tokens (the user-assigned identity by client, object or resource id;
            // mi_res_id is the newer spelling of msi_res_id).
            Self::Azure => &[
                "api-version",
                "format",
                "extended",
                "nonce",
                "resource",
                "client_id",
                "object_id",
                "msi_res_id",
                "mi_res_id",
                "bypass_cache",
            ],
            Self::Aws
            | Self::Oci
            | Self::Openstack
            | Self::Digitalocean
            | Self::Alibaba
            | Self::Hetzner
            | Self::Volcengine => &[],
        }
    }

    /// Refuses a query parameter the service at `destination` does not document
    /// ([`Self::query_parameters`]).
    pub fn check_query(
        self,
        destination: SocketAddr,
        params: &[(String, String)],
    ) -> Result<(), ProtocolRefusal> {
        let known = self.query_parameters(destination);
        if params
            .iter()
            .all(|(name, _)| known.contains(&name.as_str()))
        {
            Ok(())
        } else {
            Err(ProtocolRefusal {
                status: 400,
                reason: "a query parameter this metadata service does not document",
            })
        }
    }
}

/// A request the provider's metadata service would refuse, or one the agent refuses because
/// it skips the service's own protection: the status to answer and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolRefusal {
    pub status: u16,
    pub reason: &'static str,
}

impl Provider {
    /// The provider's request rules, checked before any policy (reference: A2.2, A2.3, A3, A4):
    /// the header each service requires against SSRF (a request without it is answered as the
    /// service answers it, never forwarded), and the legacy trees that never required it
    /// (closed whatever the policy says: a policy allowing `instance/id` must not open the
    /// header-less `v1beta1/instance/id`).
    pub fn check_request(
        self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<(), ProtocolRefusal> {
        let header_is = |name: &str, value: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(value))
        };
        let refuse = |status, reason| Err(ProtocolRefusal { status, reason });
        match self {
            Self::Gcp => {
                if path == "/0.1" || path.starts_with("/0.1/") {
                    return refuse(
                        403,
                        "legacy metadata endpoint (0.1) closed: use /computeMetadata/v1 with Metadata-Flavor: Google",
                    );
                }
                if let Some(rest) = path.strip_prefix("/computeMetadata/") {
                    let version = rest.split('/').next().unwrap_or_default();
                    if version != "v1" {
                        return refuse(
                            403,
                            "legacy or unknown metadata API version closed: use /computeMetadata/v1 with Metadata-Flavor: Google",
                        );
                    }
                    if !header_is("metadata-flavor", "Google") {
                        return refuse(403, "Metadata-Flavor: Google header required");
                    }
                }
                Ok(())
            }
            Self::Azure if path == "/metadata" || path.starts_with("/metadata/") => {
                if header_is("metadata", "true") {
                    Ok(())
                } else {
                    refuse(400, "Metadata: true header required")
                }
            }
            Self::Oci => {
                if path == "/opc/v1"
                    || path.starts_with("/opc/v1/")
                    || path.starts_with("/openstack")
                {
                    return refuse(
                        403,
                        "legacy metadata endpoint (opc/v1) closed: use /opc/v2 with Authorization: Bearer Oracle",
                    );
                }
                if (path == "/opc/v2" || path.starts_with("/opc/v2/"))
                    && !header_is("authorization", "Bearer Oracle")
                {
                    return refuse(401, "Authorization: Bearer Oracle header required");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Parses an endpoint as `ADDRESS:PORT` or `[IPV6%INTERFACE]:PORT`. The interface (a name or
/// an index) matters only for link-local IPv6 endpoints: the agent's own connection to the
/// metadata service must say which link it is on.
pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    let named_scope = text
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(inside, port)| {
            let (ip, scope) = inside.split_once('%')?;
            Some((ip, scope, port))
        });
    let Some((ip, scope, port)) = named_scope else {
        return text.parse().map_err(|_| {
            format!(
                "{text:?} is not ADDRESS:PORT (IPv6 as [ADDRESS]:PORT or [ADDRESS%INTERFACE]:PORT)"
            )
        });
    };
    let ip: Ipv6Addr = ip
        .parse()
        .map_err(|_| format!("{text:?}: {ip:?} is not an IPv6 address"))?;
    let port: u16 = port
        .strip_prefix(':')
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("{text:?}: missing or invalid :PORT after ]"))?;
    let scope_id = match scope.parse::<u32>() {
        Ok(index) => index,
        Err(_) => interface_index(scope)
            .ok_or_else(|| format!("{text:?}: no network interface named {scope:?}"))?,
    };
    Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope_id)))
}

fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

pub fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// Gives each link-local IPv6 endpoint without an interface the only one it can be on: the
/// single non-loopback interface that is up. With none or several, the endpoint stays
/// unscoped and the caller is told; connects to it are still diverted (and so governed), but
/// the agent cannot forward allowed requests until the interface is configured.
pub fn resolve_link_local(endpoints: &mut [SocketAddr]) -> Vec<String> {
    let mut problems = Vec::new();
    for endpoint in endpoints.iter_mut() {
        let SocketAddr::V6(v6) = endpoint else {
            continue;
        };
        if !is_link_local(&IpAddr::V6(*v6.ip())) || v6.scope_id() != 0 {
            continue;
        }
        match up_interfaces().as_slice() {
            [(_, index)] => v6.set_scope_id(*index),
            interfaces => problems.push(format!(
                "link-local endpoint {v6} needs an interface, and {} non-loopback \
                 interfaces are up ({}): pass --endpoint '[{}%INTERFACE]:{}' or allowed \
                 requests to it will fail with 502",
                interfaces.len(),
                interfaces
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                v6.ip(),
                v6.port()
            )),
        }
    }
    problems
}

/// Non-loopback interfaces that are up, in this network namespace (getifaddrs asks the
/// kernel over netlink; /sys/class/net would show the namespace sysfs was mounted in).
fn up_interfaces() -> Vec<(String, u32)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut up = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        let flags = entry.ifa_flags;
        if flags & libc::IFF_UP as u32 == 0 || flags & libc::IFF_LOOPBACK as u32 != 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        let Ok(name) = name.to_str() else { continue };
        if let Some(index) = interface_index(name) {
            up.push((name.to_owned(), index));
        }
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(list) };
    // One entry per address family and address: keep each interface once.
    up.sort();
    up.dedup();
    up
}

/// The address the agent connects to for a caller that was going to `original`: the same,
/// with the configured interface when it is link-local (the kernel hook sees no scope).
pub fn upstream_address(original: SocketAddr, endpoints: &[SocketAddr]) -> SocketAddr {
    if !is_link_local(&original.ip()) {
        return original;
    }
    endpoints
        .iter()
        .find(|e| e.ip() == original.ip() && e.port() == original.port())
        .copied()
        .unwrap_or(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_and_without_an_interface() {
        assert_eq!(
            parse_endpoint("169.254.169.254:80").unwrap(),
            SocketAddr::from(([169, 254, 169, 254], 80))
        );
        let lo = parse_endpoint("[fe80::a9fe:a9fe%lo]:80").unwrap();
        let SocketAddr::V6(lo) = lo else {
            panic!("IPv6 expected")
        };
        assert_eq!(lo.scope_id(), 1, "lo is interface 1");
        assert_eq!(
            parse_endpoint("[fe80::1%7]:8080").unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 8080, 0, 7))
        );
        for bad in [
            "169.254.169.254",
            "[fe80::1%no-such-interface0]:80",
            "[fe80::1%lo]",
            "[nonsense%lo]:80",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn aws_defaults_leave_pod_identity_alone() {
        let aws = Provider::Aws.default_endpoints();
        assert!(aws.contains(&"169.254.169.254:80".parse().unwrap()));
        assert!(aws.contains(&"[fd00:ec2::254]:80".parse().unwrap()));
        assert!(
            !aws.iter()
                .any(|e| e.ip().to_string().starts_with("169.254.170."))
        );
        assert_eq!(
            Provider::Alibaba.default_endpoints(),
            vec!["100.100.100.200:80".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn each_provider_requires_its_header_and_closes_its_legacy_trees() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        let status = |provider: Provider, path: &str, pairs: &[(&'static str, &'static str)]| {
            provider
                .check_request(path, &headers(pairs))
                .err()
                .map(|r| r.status)
        };
        let google = [("metadata-flavor", "Google")];
        assert_eq!(
            status(Provider::Gcp, "/computeMetadata/v1/instance/id", &google),
            None
        );
        assert_eq!(
            status(Provider::Gcp, "/computeMetadata/v1/instance/id", &[]),
            Some(403)
        );
        assert_eq!(
            status(
                Provider::Gcp,
                "/computeMetadata/v1beta1/instance/id",
                &google
            ),
            Some(403)
        );
        assert_eq!(
            status(Provider::Gcp, "/0.1/meta-data/project-id", &[]),
            Some(403)
        );
        // GCP detection (OnGCE) asks for / without the header.
        assert_eq!(status(Provider::Gcp, "/", &[]), None);
        assert_eq!(
            status(
                Provider::Azure,
                "/metadata/instance",
                &[("metadata", "true")]
            ),
            None
        );
        assert_eq!(
            status(Provider::Azure, "/metadata/instance", &[]),
            Some(400)
        );
        let oracle = [("authorization", "Bearer Oracle")];
        assert_eq!(status(Provider::Oci, "/opc/v2/instance/", &oracle), None);
        assert_eq!(status(Provider::Oci, "/opc/v2/instance/", &[]), Some(401));
        assert_eq!(
            status(Provider::Oci, "/opc/v1/instance/", &oracle),
            Some(403)
        );
        // AWS needs no header (tokens are policy's: see tokens.required).
        assert_eq!(status(Provider::Aws, "/latest/meta-data/", &[]), None);
    }

    #[test]
    fn link_local_upstream_takes_the_configured_interface() {
        let endpoints = [parse_endpoint("[fe80::a9fe:a9fe%3]:80").unwrap()];
        let original: SocketAddr = "[fe80::a9fe:a9fe]:80".parse().unwrap();
        assert_eq!(upstream_address(original, &endpoints), endpoints[0]);
        let global: SocketAddr = "[fd00:ec2::254]:80".parse().unwrap();
        assert_eq!(upstream_address(global, &endpoints), global);
    }
}
