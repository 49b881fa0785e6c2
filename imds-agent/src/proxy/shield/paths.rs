//! What the shield knows of each metadata service: which answers are fixed for the instance's
//! life (shared/reference/imds-protocols.md: identifiers, type, image, placement, account or
//! project, zone), which are credentials (with an absolute expiration, or access tokens
//! with a relative one), and each service's
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
    /// An OAuth access token whose `expires_in` counts from the answer (GCP's service
    /// account tokens, Azure's managed identity tokens): kept until well before then, and
    /// served with `expires_in` counting down from the moment it was asked for.
    UntilExpiresIn,
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

/// Azure's managed identity tokens (reference A3); the query, part of the cache's key, names
/// the resource and the identity.
const AZURE_TOKEN: &str = "/metadata/identity/oauth2/token";
/// GCP's service accounts, whose `<account>/token` is an access token (reference A2.5).
const GCP_SERVICE_ACCOUNTS: &str = "/computeMetadata/v1/instance/service-accounts/";

/// How long the answer to a GET of `path` (canonical, without a trailing `/` unless it is a
/// directory) may be kept.
pub fn lifetime(path: &str) -> Lifetime {
    if FIXED.contains(&path) {
        return Lifetime::Fixed;
    }
    let gcp_token = path
        .strip_prefix(GCP_SERVICE_ACCOUNTS)
        .and_then(|rest| rest.strip_suffix("/token"))
        .is_some_and(|account| !account.is_empty() && !account.contains('/'));
    if gcp_token || path == AZURE_TOKEN {
        return Lifetime::UntilExpiresIn;
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
    fn only_fixed_answers_and_credentials_are_kept() {
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
            // Access tokens, counting down; not an account's other entries, nor deeper paths.
            (
                "/computeMetadata/v1/instance/service-accounts/default/token",
                Lifetime::UntilExpiresIn,
            ),
            (
                "/computeMetadata/v1/instance/service-accounts/sa@p.iam.gserviceaccount.com/token",
                Lifetime::UntilExpiresIn,
            ),
            (
                "/computeMetadata/v1/instance/service-accounts/default/identity",
                Lifetime::Never,
            ),
            (
                "/computeMetadata/v1/instance/service-accounts//token",
                Lifetime::Never,
            ),
            (
                "/computeMetadata/v1/instance/service-accounts/a/b/token",
                Lifetime::Never,
            ),
            ("/metadata/identity/oauth2/token", Lifetime::UntilExpiresIn),
            ("/metadata/identity/oauth2/token/x", Lifetime::Never),
        ] {
            assert_eq!(lifetime(path), lifetime_expected, "{path}");
        }
    }
}
