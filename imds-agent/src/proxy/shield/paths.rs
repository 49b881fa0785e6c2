//! What the shield knows of each metadata service: which answers are fixed for the instance's
//! life (shared/reference/imds-protocols.md: identifiers, type, image, placement, account or
//! project, zone), which are credentials with an absolute expiration, and each service's
//! documented request limits. Everything else, dynamic trees above all (spot and scheduled
//! events, maintenance, network after hot-plug, tags, GCP's `wait_for_change`), is never
//! cached.

use std::net::{IpAddr, Ipv4Addr};

use crate::provider::Provider;

/// How long an answer may be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// The instance's life: the agent's memory goes with it (a stop and start restarts it).
    Fixed,
    /// A credential document with an absolute `Expiration` (AWS, Alibaba).
    UntilExpiration,
    /// Asked of the service every time (shared only with identical requests in flight).
    Never,
}

/// Answers fixed for the instance's life, by canonical path (the query is part of the key,
/// so Azure's `api-version` and `format` are kept apart). Trees do not overlap between
/// providers, so one list serves all.
const FIXED: &[&str] = &[
    // EC2, and the clouds that copy its tree (OpenStack, Alibaba)
    "/latest/meta-data/instance-id",
    "/latest/meta-data/ami-id",
    "/latest/meta-data/instance-type",
    "/latest/meta-data/placement/availability-zone",
    "/latest/meta-data/placement/availability-zone-id",
    "/latest/meta-data/placement/region",
    "/latest/dynamic/instance-identity/document",
    "/latest/meta-data/region-id",
    "/latest/meta-data/zone-id",
    "/latest/meta-data/image-id",
    // GCP
    "/computeMetadata/v1/instance/id",
    "/computeMetadata/v1/instance/name",
    "/computeMetadata/v1/instance/zone",
    "/computeMetadata/v1/instance/machine-type",
    "/computeMetadata/v1/instance/image",
    "/computeMetadata/v1/project/project-id",
    "/computeMetadata/v1/project/numeric-project-id",
    // Azure
    "/metadata/instance/compute/vmId",
    "/metadata/instance/compute/location",
    "/metadata/instance/compute/name",
    "/metadata/instance/compute/subscriptionId",
    "/metadata/instance/compute/resourceGroupName",
    "/metadata/instance/compute/zone",
    "/metadata/instance/compute/vmSize",
    "/metadata/instance/compute/azEnvironment",
    "/metadata/instance/compute/osType",
    // OCI
    "/opc/v2/instance/id",
    "/opc/v2/instance/region",
    "/opc/v2/instance/canonicalRegionName",
    "/opc/v2/instance/availabilityDomain",
    "/opc/v2/instance/faultDomain",
    "/opc/v2/instance/compartmentId",
    "/opc/v2/instance/shape",
    "/opc/v2/instance/image",
    // DigitalOcean
    "/metadata/v1/id",
    "/metadata/v1/region",
    // Hetzner
    "/hetzner/v1/metadata/instance-id",
    "/hetzner/v1/metadata/region",
    "/hetzner/v1/metadata/availability-zone",
];

/// Directories whose entries are role credentials with an absolute `Expiration`.
const CREDENTIAL_DIRECTORIES: &[&str] = &[
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/ram/security-credentials/",
];

/// How long the answer to a GET of `path` (canonical, without a trailing `/` unless it is a
/// directory) may be kept.
pub fn lifetime(path: &str) -> Lifetime {
    if FIXED.contains(&path) {
        return Lifetime::Fixed;
    }
    let role = CREDENTIAL_DIRECTORIES
        .iter()
        .find_map(|dir| path.strip_prefix(dir));
    match role {
        Some(role) if !role.is_empty() && !role.contains('/') => Lifetime::UntilExpiration,
        _ => Lifetime::Never,
    }
}

/// A documented request limit of a metadata service: at most `rate` requests in any second
/// and `in_flight` at once (0: no bound), for requests to `address` whose path starts with
/// `prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub address: IpAddr,
    pub prefix: &'static str,
    pub rate: u32,
    pub in_flight: u32,
}

const METADATA_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));

/// The limits a provider's service documents, most specific first. Azure (reference A3):
/// 5 requests/s per VM, and its managed-identity endpoint 20 requests/s with 5 at once. The
/// others document per-instance throttling without figures (AWS's link-local packet limit is
/// per packet, not per request): `--upstream-rate` and `--upstream-in-flight` set one.
pub fn documented_limits(provider: Provider) -> Vec<Limit> {
    match provider {
        Provider::Azure => vec![
            Limit {
                address: METADATA_IP,
                prefix: "/metadata/identity/",
                rate: 20,
                in_flight: 5,
            },
            Limit {
                address: METADATA_IP,
                prefix: "/",
                rate: 5,
                in_flight: 0,
            },
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fixed_answers_and_role_credentials_are_kept() {
        for (path, lifetime_expected) in [
            ("/latest/meta-data/instance-id", Lifetime::Fixed),
            ("/metadata/instance/compute/location", Lifetime::Fixed),
            (
                "/latest/meta-data/iam/security-credentials/role",
                Lifetime::UntilExpiration,
            ),
            // The listing of roles, and anything deeper, are not credentials documents.
            (
                "/latest/meta-data/iam/security-credentials/",
                Lifetime::Never,
            ),
            (
                "/latest/meta-data/iam/security-credentials/a/b",
                Lifetime::Never,
            ),
            // Dynamic: events, network after hot-plug, tags, the whole instance document.
            ("/latest/meta-data/spot/instance-action", Lifetime::Never),
            (
                "/latest/meta-data/events/maintenance/scheduled",
                Lifetime::Never,
            ),
            ("/latest/meta-data/local-ipv4", Lifetime::Never),
            ("/metadata/instance", Lifetime::Never),
            ("/metadata/scheduledevents", Lifetime::Never),
            (
                "/computeMetadata/v1/instance/maintenance-event",
                Lifetime::Never,
            ),
            (
                "/computeMetadata/v1/instance/service-accounts/default/token",
                Lifetime::Never,
            ),
            ("/metadata/identity/oauth2/token", Lifetime::Never),
        ] {
            assert_eq!(lifetime(path), lifetime_expected, "{path}");
        }
    }
}
