//! Named path groups, so policies say what they mean ("credentials") rather than list URLs.
//!
//! A group covers the paths of every supported provider at once (AWS, GCP, Azure, OCI,
//! OpenStack, DigitalOcean, Alibaba, Hetzner): their trees do not overlap (OpenStack and
//! Alibaba share EC2's `/latest/` tree, with the same meanings), so one policy works
//! wherever the agent runs, and a group can never miss a provider because the agent was told
//! the wrong one. Groups list only the latest API version (`/latest/` on AWS, `v1` on GCP,
//! `v2` on OCI); other versions fall to the policy's default, which is why the examples
//! default to deny.
//!
//! Sources: shared/reference/imds-protocols.md (A1.4 AWS categories, A2.5 GCP sensitive
//! paths, A3 Azure, A4 the others). Where a group is a judgement call it takes the safe side:
//! - AWS `identity-credentials/` is credentials (reserved for internal use, still
//!   credentials); so are OCI's instance-principal certificate and key (`/opc/v2/identity/`)
//!   and OpenStack's `password` and dynamic `vendor_data2.json` (vendordata services hand
//!   out enrolment secrets there).
//! - A document that holds everything is whole in no group but user-data where it carries
//!   user data: Azure's `/metadata/instance` (the compute section), OCI's `/opc/v2/instance/`,
//!   DigitalOcean's `/metadata/v1.json`, OpenStack's `meta_data.json` (user `meta` and keys),
//!   Hetzner's `/hetzner/v1/metadata` (vendor data). `instance-info` grants each of them
//!   through a view without those fields ([`documents`]).
//! - User-supplied key/value metadata is user-data (GCP attributes, OCI `metadata/`), and so
//!   are SSH public keys supplied with it.
//! - Volcengine's `volcstack/` tree is in no group but its role credentials: it is not
//!   documented in the reference, so nothing there is allowed by a group.
//! - Instance tags are values users choose (owners, cost centres, and sometimes what should
//!   have been a secret): a group of their own, `tags`, in no other (EC2's
//!   `meta-data/tags/instance`, opt-in on the instance; Azure's `compute/tags` and
//!   `tagsList`; DigitalOcean's `tags/`). GCP's `instance/tags` are network tags (firewall
//!   targets), instance information.

use std::sync::{Arc, LazyLock};

use super::{
    CompiledPatterns, PathPattern,
    view::{DocumentViews, View},
};

pub const NAMES: [&str; 9] = [
    "credentials",
    "user-data",
    "identity-document",
    "instance-info",
    "network",
    "tags",
    "token",
    "wireserver",
    "host-ga-plugin",
];

/// A group compiled: its patterns (the documents it grants through a view among them), and
/// those documents' views.
pub struct Group {
    pub name: &'static str,
    pub paths: Arc<CompiledPatterns>,
    pub documents: Arc<DocumentViews>,
}

/// Every group, in [`NAMES`] order, parsed and compiled once per process and shared by every
/// rule and metric that uses the group.
pub fn all_compiled() -> &'static [Group] {
    static COMPILED: LazyLock<Vec<Group>> = LazyLock::new(|| {
        NAMES
            .iter()
            .map(|name| {
                let documents = documents(name);
                let patterns = patterns(name)
                    .unwrap_or_default()
                    .iter()
                    .chain(documents.iter().map(|(document, _)| document))
                    .map(|p| PathPattern::parse(p).expect("built-in groups parse (unit-tested)"))
                    .collect();
                let views = documents
                    .iter()
                    .map(|(document, without)| {
                        ((*document).to_owned(), Arc::new(View::without(without)))
                    })
                    .collect();
                Group {
                    name,
                    paths: Arc::new(CompiledPatterns::new(patterns)),
                    documents: Arc::new(DocumentViews(views)),
                }
            })
            .collect()
    });
    &COMPILED
}

/// One group compiled (see [`all_compiled`]), or `None` for an unknown name.
pub fn compiled(name: &str) -> Option<&'static Group> {
    all_compiled().iter().find(|group| group.name == name)
}

/// Azure's instance document without what `instance-info` does not grant: user data, custom
/// data, the OS profile (admin user name), SSH public keys, tags (their own group), and the
/// network section (the `network` group).
const AZURE_INSTANCE_CUT: &[&str] = &[
    "/metadata/instance/compute/userData",
    "/metadata/instance/compute/customData",
    "/metadata/instance/compute/osProfile",
    "/metadata/instance/compute/publicKeys",
    "/metadata/instance/compute/tags",
    "/metadata/instance/compute/tagsList",
    "/metadata/instance/network",
];

/// The documents a group grants through a view: (the document's path, the fields removed,
/// each by its metadata path). A document served as a file names its fields below the file's
/// path. Each one here is a document that otherwise holds everything (see the module's
/// notes), so that a workload needing the region need not be given the user data.
pub fn documents(name: &str) -> &'static [(&'static str, &'static [&'static str])] {
    match name {
        "instance-info" => &[
            ("/metadata/instance", AZURE_INSTANCE_CUT),
            ("/metadata/instance/compute", AZURE_INSTANCE_CUT),
            (
                "/opc/v2/instance",
                &[
                    "/opc/v2/instance/metadata",
                    "/opc/v2/instance/extendedMetadata",
                    "/opc/v2/instance/definedTags",
                    "/opc/v2/instance/freeformTags",
                ],
            ),
            (
                "/metadata/v1.json",
                &[
                    "/metadata/v1.json/user_data",
                    "/metadata/v1.json/vendor_data",
                    "/metadata/v1.json/public_keys",
                    "/metadata/v1.json/tags",
                    "/metadata/v1.json/interfaces",
                    "/metadata/v1.json/floating_ip",
                    "/metadata/v1.json/reserved_ip",
                    "/metadata/v1.json/dns",
                ],
            ),
            (
                "/openstack/latest/meta_data.json",
                &[
                    "/openstack/latest/meta_data.json/meta",
                    "/openstack/latest/meta_data.json/public_keys",
                    "/openstack/latest/meta_data.json/keys",
                    "/openstack/latest/meta_data.json/admin_pass",
                    "/openstack/latest/meta_data.json/random_seed",
                ],
            ),
            (
                "/hetzner/v1/metadata",
                &[
                    "/hetzner/v1/metadata/public-keys",
                    "/hetzner/v1/metadata/vendor_data",
                    "/hetzner/v1/metadata/private-networks",
                    "/hetzner/v1/metadata/public-ipv4",
                ],
            ),
        ],
        _ => &[],
    }
}

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
            // OCI instance principal: certificate, intermediate and private key
            "/opc/v2/identity/**",
            // OpenStack: the (encrypted) admin password, dynamic vendordata
            "/openstack/*/password",
            "/openstack/*/vendor_data2.json",
            // Alibaba RAM role credentials
            "/latest/meta-data/ram/**",
            // Volcengine role credentials, under both trees its clients use
            "/volcstack/latest/iam/**",
            "/latest/iam/**",
        ],
        "user-data" => &[
            "/latest/user-data",
            // GCP: startup scripts, kube-env (kubelet credentials), ssh keys
            "/computeMetadata/v1/instance/attributes/**",
            "/computeMetadata/v1/project/attributes/**",
            "/metadata/instance/compute/userData",
            "/metadata/instance/compute/customData",
            // OCI: user_data, ssh_authorized_keys and any user-supplied key
            "/opc/v2/instance/metadata/**",
            "/openstack/*/user_data",
            "/openstack/*/meta_data.json",
            "/openstack/*/vendor_data.json",
            "/metadata/v1/user-data",
            "/metadata/v1/vendor-data",
            "/metadata/v1/public-keys",
            "/metadata/v1.json",
            "/hetzner/v1/userdata",
            "/hetzner/v1/metadata/public-keys",
            "/hetzner/v1/metadata/vendor_data",
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
            "/metadata/instance/compute/vmId",
            "/metadata/instance/compute/vmSize",
            "/metadata/instance/compute/zone",
            "/metadata/versions",
            // OpenStack's version listing and the latest version's file listing (entries
            // are filtered per caller). Literal, as every instance-info path: a wildcard here
            // would be matched on every decision of every policy using the group.
            "/openstack",
            "/openstack/latest",
            "/opc/v2/instance/availabilityDomain",
            "/opc/v2/instance/canonicalRegionName",
            "/opc/v2/instance/compartmentId",
            "/opc/v2/instance/displayName",
            "/opc/v2/instance/faultDomain",
            "/opc/v2/instance/hostname",
            "/opc/v2/instance/id",
            "/opc/v2/instance/image",
            "/opc/v2/instance/ociAdName",
            "/opc/v2/instance/region",
            "/opc/v2/instance/regionInfo/**",
            "/opc/v2/instance/shape",
            "/opc/v2/instance/shapeConfig/**",
            "/opc/v2/instance/state",
            "/opc/v2/instance/timeCreated",
            "/metadata/v1",
            "/metadata/v1/features/**",
            "/metadata/v1/hostname",
            "/metadata/v1/id",
            "/metadata/v1/region",
            "/latest/meta-data/image-id",
            "/latest/meta-data/instance/**",
            "/latest/meta-data/region-id",
            "/latest/meta-data/zone-id",
            "/hetzner/v1/metadata/availability-zone",
            "/hetzner/v1/metadata/hostname",
            "/hetzner/v1/metadata/instance-id",
            "/hetzner/v1/metadata/region",
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
            "/opc/v2/vnics/**",
            "/openstack/latest/network_data.json",
            "/metadata/v1/dns/**",
            "/metadata/v1/floating_ip/**",
            "/metadata/v1/interfaces/**",
            "/metadata/v1/reserved_ip/**",
            "/latest/meta-data/eipv4",
            "/latest/meta-data/private-ipv4",
            "/latest/meta-data/vpc-id",
            "/latest/meta-data/vswitch-id",
            "/hetzner/v1/metadata/private-networks",
            "/hetzner/v1/metadata/public-ipv4",
        ],
        "tags" => &[
            "/latest/meta-data/tags/**",
            "/metadata/instance/compute/tags",
            "/metadata/instance/compute/tagsList",
            "/metadata/v1/tags/**",
        ],
        // Azure's WireServer (168.63.129.16:80): the goal state with the VM's certificates
        // and private keys, extension settings (protected settings among them), health
        // reports. Azure's guest proxy agent keeps it for root; AKS blocks it for pods.
        // (Its version query, `/?comp=versions`, is the root of every service: in no group.)
        "wireserver" => &["/machine", "/machine/**"],
        // Its HostGAPlugin (168.63.129.16:32526): extension settings and artifacts.
        "host-ga-plugin" => &[
            "/vmSettings",
            "/extensionArtifact",
            "/status",
            "/health",
            "/vmAgentLog",
        ],
        // Session tokens (PUT; AWS IMDSv2 and Alibaba's hardened mode); useless without
        // read rights elsewhere.
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
    fn documents_are_granted_only_through_their_views() {
        for group in all_compiled() {
            for (document, without) in documents(group.name) {
                let path = CanonicalPath::parse(document).unwrap();
                assert!(group.paths.best_match(&path).is_some(), "{document}");
                // Never whole by another of the group's patterns.
                assert!(
                    !in_group(group.name, document),
                    "{}: {document}",
                    group.name
                );
                let view = group.documents.get(&path).expect("a view");
                assert!(view.cuts(&path));
                for field in *without {
                    let field = CanonicalPath::parse(field).unwrap();
                    assert!(view.removes(&field).is_some());
                }
            }
        }
    }

    #[test]
    fn groups_that_policies_allow_are_literal() {
        // Literal patterns (and literal/**) are hash lookups; a wildcard would be tried on
        // every decision of every policy that allows the group.
        for name in ["instance-info", "network", "tags", "token"] {
            for pattern in patterns(name).unwrap() {
                let stem = pattern.strip_suffix("/**").unwrap_or(pattern);
                assert!(!stem.contains(['*', '{']), "{name}: {pattern}");
            }
        }
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
            // User-chosen tag values: their own group, no longer instance information.
            ("tags", "/latest/meta-data/tags/instance/Owner", true),
            ("tags", "/latest/meta-data/tags/instance", true),
            ("tags", "/metadata/instance/compute/tags", true),
            ("tags", "/metadata/instance/compute/tagsList", true),
            ("tags", "/metadata/v1/tags/env", true),
            (
                "instance-info",
                "/latest/meta-data/tags/instance/Owner",
                false,
            ),
            ("instance-info", "/metadata/instance/compute/tags", false),
            ("instance-info", "/metadata/v1/tags/env", false),
            ("tags", "/computeMetadata/v1/instance/tags", false),
            // Volcengine
            (
                "credentials",
                "/volcstack/latest/iam/security_credentials/role",
                true,
            ),
            ("credentials", "/latest/iam/security_credentials/role", true),
            ("instance-info", "/volcstack/latest/site_name", false),
            // Azure's WireServer and HostGAPlugin
            ("wireserver", "/machine/", true),
            ("wireserver", "/machine/abc/def", true),
            ("wireserver", "/", false),
            ("host-ga-plugin", "/vmSettings", true),
            ("instance-info", "/machine", false),
            // OCI
            ("credentials", "/opc/v2/identity/key.pem", true),
            ("user-data", "/opc/v2/instance/metadata/user_data", true),
            ("instance-info", "/opc/v2/instance/region", true),
            ("instance-info", "/opc/v2/instance", false),
            (
                "instance-info",
                "/opc/v2/instance/metadata/user_data",
                false,
            ),
            ("network", "/opc/v2/vnics/", true),
            // OpenStack
            ("credentials", "/openstack/latest/password", true),
            (
                "credentials",
                "/openstack/2018-08-27/vendor_data2.json",
                true,
            ),
            ("user-data", "/openstack/latest/user_data", true),
            ("user-data", "/openstack/latest/meta_data.json", true),
            ("network", "/openstack/latest/network_data.json", true),
            ("instance-info", "/openstack/latest/", true),
            ("instance-info", "/openstack/2018-08-27/", false),
            ("instance-info", "/openstack/latest/password", false),
            ("instance-info", "/openstack/latest/meta_data.json", false),
            // DigitalOcean
            ("instance-info", "/metadata/v1/id", true),
            ("instance-info", "/metadata/v1/", true),
            ("user-data", "/metadata/v1/user-data", true),
            ("user-data", "/metadata/v1.json", true),
            ("instance-info", "/metadata/v1.json", false),
            ("instance-info", "/metadata/v1/user-data", false),
            (
                "network",
                "/metadata/v1/interfaces/public/0/ipv4/address",
                true,
            ),
            // Alibaba
            (
                "credentials",
                "/latest/meta-data/ram/security-credentials/ecs-role",
                true,
            ),
            ("instance-info", "/latest/meta-data/region-id", true),
            (
                "instance-info",
                "/latest/meta-data/ram/security-credentials/",
                false,
            ),
            // Hetzner
            ("instance-info", "/hetzner/v1/metadata/instance-id", true),
            ("user-data", "/hetzner/v1/userdata", true),
            ("instance-info", "/hetzner/v1/metadata", false),
            ("instance-info", "/hetzner/v1/userdata", false),
            ("network", "/hetzner/v1/metadata/private-networks", true),
        ];
        for (group, path, expected) in table {
            assert_eq!(in_group(group, path), expected, "{group} vs {path}");
        }
    }
}
