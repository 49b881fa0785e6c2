//! Named path groups, so policies say what they mean ("credentials") rather than list URLs.
//!
//! A group covers the paths of every supported provider at once (AWS, GCP, Azure): their
//! trees do not overlap, so one policy works wherever the agent runs, and a group can never
//! miss a provider because the agent was told the wrong one. Groups list only the latest
//! API version (`/latest/` on AWS, `v1` on GCP); other versions fall to the policy's default,
//! which is why the examples default to deny.
//!
//! Sources: shared/reference/imds-protocols.md (A1.4 AWS categories, A2.5 GCP sensitive
//! paths, A3 Azure). Where a group is a judgement call it takes the safe side: AWS
//! `identity-credentials/` is credentials (reserved for internal use, still credentials);
//! Azure's whole `/metadata/instance` document is not instance-info because the compute
//! section can carry user data.

pub const NAMES: [&str; 6] = [
    "credentials",
    "user-data",
    "identity-document",
    "instance-info",
    "network",
    "token",
];

/// The path patterns of a group, or `None` for an unknown name.
pub fn patterns(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "credentials" => &[
            // AWS
            "/latest/meta-data/iam/**",
            "/latest/meta-data/identity-credentials/**",
            // GCP: OAuth tokens, identity tokens, scopes of the attached service accounts
            "/computeMetadata/v1/instance/service-accounts/**",
            // Azure managed identities
            "/metadata/identity/**",
        ],
        "user-data" => &[
            "/latest/user-data",
            // GCP: startup scripts, kube-env (kubelet credentials), ssh keys
            "/computeMetadata/v1/instance/attributes/**",
            "/computeMetadata/v1/project/attributes/**",
            "/metadata/instance/compute/userData",
            "/metadata/instance/compute/customData",
        ],
        "identity-document" => &[
            "/latest/dynamic/instance-identity/**",
            "/computeMetadata/v1/instance/service-accounts/*/identity",
            "/metadata/attested/**",
        ],
        "instance-info" => &[
            "/latest/meta-data",
            "/latest/meta-data/ami-id",
            "/latest/meta-data/ami-launch-index",
            "/latest/meta-data/autoscaling/**",
            "/latest/meta-data/events/**",
            "/latest/meta-data/hostname",
            "/latest/meta-data/instance-action",
            "/latest/meta-data/instance-id",
            "/latest/meta-data/instance-life-cycle",
            "/latest/meta-data/instance-type",
            "/latest/meta-data/local-hostname",
            "/latest/meta-data/placement/**",
            "/latest/meta-data/product-codes",
            "/latest/meta-data/reservation-id",
            "/latest/meta-data/services/**",
            "/latest/meta-data/spot/**",
            "/latest/meta-data/system",
            "/latest/meta-data/tags/**",
            "/computeMetadata/v1/instance/cpu-platform",
            "/computeMetadata/v1/instance/description",
            "/computeMetadata/v1/instance/hostname",
            "/computeMetadata/v1/instance/id",
            "/computeMetadata/v1/instance/image",
            "/computeMetadata/v1/instance/machine-type",
            "/computeMetadata/v1/instance/name",
            "/computeMetadata/v1/instance/tags",
            "/computeMetadata/v1/instance/zone",
            "/computeMetadata/v1/project/numeric-project-id",
            "/computeMetadata/v1/project/project-id",
            "/metadata/instance/compute/azEnvironment",
            "/metadata/instance/compute/location",
            "/metadata/instance/compute/name",
            "/metadata/instance/compute/resourceGroupName",
            "/metadata/instance/compute/subscriptionId",
            "/metadata/instance/compute/tags",
            "/metadata/instance/compute/vmId",
            "/metadata/instance/compute/vmSize",
            "/metadata/instance/compute/zone",
            "/metadata/versions",
        ],
        "network" => &[
            "/latest/meta-data/mac",
            "/latest/meta-data/local-ipv4",
            "/latest/meta-data/public-ipv4",
            "/latest/meta-data/public-hostname",
            "/latest/meta-data/ipv6",
            "/latest/meta-data/network/**",
            "/computeMetadata/v1/instance/network-interfaces/**",
            "/metadata/instance/network/**",
            "/metadata/loadbalancer",
        ],
        // IMDSv2 session tokens (PUT); useless without read rights elsewhere.
        "token" => &["/latest/api/token"],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CanonicalPath, PathPattern};

    fn in_group(group: &str, path: &str) -> bool {
        let path = CanonicalPath::parse(path).unwrap();
        patterns(group)
            .unwrap()
            .iter()
            .any(|p| PathPattern::parse(p).unwrap().matches(&path))
    }

    #[test]
    fn every_group_parses() {
        for name in NAMES {
            for pattern in patterns(name).unwrap() {
                PathPattern::parse(pattern).unwrap_or_else(|e| panic!("{name}: {pattern}: {e}"));
            }
        }
        assert!(patterns("secrets").is_none());
    }

    #[test]
    fn provider_paths_fall_in_the_expected_groups() {
        let table = [
            (
                "credentials",
                "/latest/meta-data/iam/security-credentials/role",
                true,
            ),
            (
                "credentials",
                "/latest/meta-data/iam/security-credentials/",
                true,
            ),
            (
                "credentials",
                "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                true,
            ),
            (
                "credentials",
                "/computeMetadata/v1/instance/service-accounts/default/token",
                true,
            ),
            ("credentials", "/metadata/identity/oauth2/token", true),
            ("credentials", "/latest/meta-data/instance-id", false),
            ("user-data", "/latest/user-data", true),
            (
                "user-data",
                "/computeMetadata/v1/instance/attributes/kube-env",
                true,
            ),
            ("user-data", "/metadata/instance/compute/userData", true),
            (
                "identity-document",
                "/latest/dynamic/instance-identity/document",
                true,
            ),
            (
                "identity-document",
                "/computeMetadata/v1/instance/service-accounts/default/identity",
                true,
            ),
            ("identity-document", "/metadata/attested/document", true),
            ("instance-info", "/latest/meta-data/instance-id", true),
            ("instance-info", "/latest/meta-data/", true),
            ("instance-info", "/latest/meta-data/placement/region", true),
            ("instance-info", "/computeMetadata/v1/instance/zone", true),
            ("instance-info", "/metadata/instance/compute/vmId", true),
            // Never secrets under instance-info.
            ("instance-info", "/latest/meta-data/iam/info", false),
            ("instance-info", "/latest/user-data", false),
            (
                "instance-info",
                "/metadata/instance/compute/userData",
                false,
            ),
            ("instance-info", "/metadata/instance", false),
            (
                "instance-info",
                "/computeMetadata/v1/instance/attributes/kube-env",
                false,
            ),
            (
                "network",
                "/latest/meta-data/network/interfaces/macs/0e:00:00:00:00:01/subnet-id",
                true,
            ),
            (
                "network",
                "/computeMetadata/v1/instance/network-interfaces/0/ip",
                true,
            ),
            ("token", "/latest/api/token", true),
        ];
        for (group, path, expected) in table {
            assert_eq!(in_group(group, path), expected, "{group} vs {path}");
        }
    }
}
