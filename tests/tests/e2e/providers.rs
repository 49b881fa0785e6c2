//! The same policy, and the same scenarios, against every cloud's metadata service: the agent
//! detects the provider, applies the provider's request rules, and the policy's path groups
//! mean the same thing on each (instance facts and network readable, credentials only for
//! the workload granted them, user data for none, whole-instance documents without their
//! secrets), including listings and, where the service has them, session tokens bound to the
//! workload that fetched them.

use imds_tests::{
    fake_imds::{
        ACCESS_KEY_PREFIX, ALIBABA_TOKEN_HEADER, ALIBABA_TTL_HEADER, INSTANCE_ID, TOKEN_HEADER,
        TTL_HEADER, VOLCENGINE_TOKEN_HEADER, VOLCENGINE_TTL_HEADER,
        clouds::{
            ALIBABA_ACCESS_KEY_PREFIX, AZURE_TOKEN_PREFIX, DIGITALOCEAN_DROPLET_ID,
            GCP_TOKEN_PREFIX, HETZNER_INSTANCE_ID, OCI_PRIVATE_KEY, OPENSTACK_SECRET,
            USER_DATA_B64, VOLCENGINE_ACCESS_KEY_PREFIX,
        },
    },
    sandbox::{Curl, Sandbox},
};

/// One policy for every cloud, in path groups only.
const POLICY: &str = r#"
name: app
callers: {cgroups: ["/reader", "/holder"]}
default: deny
rules:
  - name: facts
    action: allow
    methods: [GET, HEAD]
    groups: [instance-info, network]
  - name: session
    action: allow
    methods: [PUT]
    groups: [token]
  - name: credentials
    action: allow
    methods: [GET]
    groups: [credentials]
    callers: {cgroups: ["/holder"]}
"#;

/// A path and a marker of its answer.
type Read = (&'static str, &'static str);

struct Cloud {
    /// `fake-imds --provider` and the name the agent detects.
    name: &'static str,
    address: &'static str,
    /// Headers the service requires on every request.
    headers: &'static [&'static str],
    /// Instance facts: allowed for both workloads.
    facts: Read,
    /// Credentials: for the holder only (None where the cloud serves none).
    credentials: Option<Read>,
    /// User data: for neither.
    user_data: Read,
    /// A request without the required header, and what the agent answers, as the service
    /// would (without asking it).
    headerless: Option<(&'static str, u16)>,
    /// Legacy trees that skip the header: closed whatever the policy says.
    legacy: &'static [&'static str],
    /// A listing, an entry the reader sees and one it does not.
    listing: Option<(&'static str, &'static str, &'static str)>,
    /// More reads by the reader and the status it gets.
    more: &'static [(&'static str, u16)],
    /// The whole-instance document, which instance-info grants through a view: (path, a
    /// marker of what it keeps, markers of what it removes).
    document: Option<(&'static str, &'static str, &'static [&'static str])>,
    /// Session tokens: (token header, TTL header).
    tokens: Option<(&'static str, &'static str)>,
}

fn run(cloud: &Cloud) {
    let Some(sandbox) = Sandbox::new(&format!("cloud-{}", cloud.name)) else {
        return;
    };
    let mut extra = Vec::new();
    let listen = format!("{}:80", cloud.address);
    if cloud.address != "169.254.169.254" {
        sandbox.ip(&["addr", "add", &format!("{}/32", cloud.address), "dev", "lo"]);
        extra.push(listen.as_str());
    }
    let _imds = sandbox.start_fake_cloud(cloud.name, &extra);
    let policies = sandbox.write_policies(&[("app.yaml", POLICY)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    let detected = format!("\"provider\":\"{}\"", cloud.name);
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("detected the cloud provider") && l.contains(&detected)),
        "{} not detected:\n{}",
        cloud.name,
        agent.log()
    );

    let request = |cgroup: &str, method: &str, path: &str, headers: &[&str]| -> Curl {
        let url = format!("http://{}{path}", cloud.address);
        let mut args = vec!["-X", method];
        for header in headers {
            args.extend(["-H", header]);
        }
        args.push(&url);
        sandbox.curl(&format!("enforced/{cgroup}"), None, &args)
    };
    let get = |cgroup: &str, path: &str| request(cgroup, "GET", path, cloud.headers);
    let context = |what: &str, curl: &Curl| format!("{}: {what}: {curl:?}", cloud.name);

    for cgroup in ["reader", "holder"] {
        let facts = get(cgroup, cloud.facts.0);
        assert_eq!(facts.status, 200, "{}", context("facts", &facts));
        assert!(
            facts.body.contains(cloud.facts.1),
            "{}",
            context("facts", &facts)
        );
    }
    if let Some((path, marker)) = cloud.credentials {
        let denied = get("reader", path);
        assert_eq!(denied.status, 403, "{}", context("credentials", &denied));
        assert!(
            denied.body.contains("denied by policy 'app'") && !denied.body.contains(marker),
            "{}",
            context("credentials", &denied)
        );
        let held = get("holder", path);
        assert_eq!(held.status, 200, "{}", context("credentials", &held));
        assert!(
            held.body.contains(marker),
            "{}",
            context("credentials", &held)
        );
    }
    for cgroup in ["reader", "holder"] {
        let user_data = get(cgroup, cloud.user_data.0);
        assert_eq!(
            user_data.status,
            403,
            "{}",
            context("user data", &user_data)
        );
        assert!(!user_data.body.contains(cloud.user_data.1));
    }
    if let Some((path, status)) = cloud.headerless {
        let bare = request("reader", "GET", path, &[]);
        assert_eq!(bare.status, status, "{}", context("no header", &bare));
        assert!(
            bare.body.contains("imds-agent:") && bare.body.contains("header required"),
            "{}",
            context("no header", &bare)
        );
    }
    for path in cloud.legacy {
        let legacy = get("holder", path);
        assert_eq!(legacy.status, 403, "{}", context("legacy", &legacy));
        assert!(
            legacy.body.contains("legacy"),
            "{}",
            context("legacy", &legacy)
        );
    }
    if let Some((path, visible, hidden)) = cloud.listing {
        let listing = get("reader", path);
        assert_eq!(listing.status, 200, "{}", context("listing", &listing));
        let entries: Vec<&str> = listing.body.lines().collect();
        assert!(
            entries.contains(&visible) && !entries.contains(&hidden),
            "{}",
            context("listing", &listing)
        );
    }
    for (path, status) in cloud.more {
        let more = get("reader", path);
        assert_eq!(more.status, *status, "{}", context(path, &more));
    }
    if let Some((path, kept, removed)) = cloud.document {
        for cgroup in ["reader", "holder"] {
            let document = get(cgroup, path);
            assert_eq!(document.status, 200, "{}", context(path, &document));
            assert!(document.body.contains(kept), "{}", context(path, &document));
            for marker in removed {
                assert!(
                    !document.body.contains(marker),
                    "{marker}: {}",
                    context(path, &document)
                );
            }
        }
    }
    // Forwarding headers: refused before the service sees them.
    let mut forwarded = cloud.headers.to_vec();
    forwarded.push("X-Forwarded-For: 203.0.113.9");
    let refused = request("reader", "GET", cloud.facts.0, &forwarded);
    assert_eq!(refused.status, 403, "{}", context("forwarded", &refused));

    if let Some((token_header, ttl_header)) = cloud.tokens {
        let ttl = format!("{ttl_header}: 60");
        let token = request("reader", "PUT", "/latest/api/token", &[&ttl]);
        assert_eq!(token.status, 200, "{}", context("token", &token));
        let with_token = format!("{token_header}: {}", token.body.trim());
        let own = request("reader", "GET", cloud.facts.0, &[&with_token]);
        assert_eq!(own.status, 200, "{}", context("own token", &own));
        assert!(own.body.contains(cloud.facts.1));
        let stolen = request("holder", "GET", cloud.facts.0, &[&with_token]);
        assert_eq!(stolen.status, 401, "{}", context("stolen token", &stolen));
        assert!(
            stolen.body.contains("token-of-another-caller"),
            "{}",
            context("stolen token", &stolen)
        );
    }
}

#[test]
fn aws() {
    run(&Cloud {
        name: "aws",
        address: "169.254.169.254",
        headers: &[],
        facts: ("/latest/meta-data/instance-id", INSTANCE_ID),
        credentials: Some((
            "/latest/meta-data/iam/security-credentials/demo-node-role",
            ACCESS_KEY_PREFIX,
        )),
        user_data: ("/latest/user-data", "hunter2"),
        headerless: None,
        legacy: &[],
        listing: Some(("/latest/meta-data/", "instance-id", "iam/")),
        more: &[("/latest/dynamic/instance-identity/document", 403)],
        document: None,
        tokens: Some((TOKEN_HEADER, TTL_HEADER)),
    });
}

#[test]
fn gcp() {
    run(&Cloud {
        name: "gcp",
        address: "169.254.169.254",
        headers: &["Metadata-Flavor: Google"],
        facts: ("/computeMetadata/v1/instance/zone", "us-central1-a"),
        credentials: Some((
            "/computeMetadata/v1/instance/service-accounts/default/token",
            GCP_TOKEN_PREFIX,
        )),
        user_data: (
            "/computeMetadata/v1/instance/attributes/kube-env",
            "KUBELET_KEY",
        ),
        headerless: Some(("/computeMetadata/v1/instance/zone", 403)),
        legacy: &[
            "/computeMetadata/v1beta1/instance/attributes/kube-env",
            "/0.1/meta-data/attributes/kube-env",
        ],
        listing: None,
        more: &[("/computeMetadata/v1/project/project-id", 200)],
        document: None,
        tokens: None,
    });
}

#[test]
fn azure() {
    run(&Cloud {
        name: "azure",
        address: "169.254.169.254",
        headers: &["Metadata: true"],
        facts: ("/metadata/versions", "2021-02-01"),
        credentials: Some((
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/",
            AZURE_TOKEN_PREFIX,
        )),
        user_data: (
            "/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
            USER_DATA_B64,
        ),
        headerless: Some(("/metadata/versions", 400)),
        legacy: &[],
        listing: None,
        // The whole document carries user data: in no group the policy allows.
        more: &[],
        document: Some((
            "/metadata/instance?api-version=2021-02-01",
            "westeurope",
            &["userData", "osProfile", "publicKeys", "AAAAFAKE"],
        )),
        tokens: None,
    });
}

#[test]
fn oci() {
    run(&Cloud {
        name: "oci",
        address: "169.254.169.254",
        headers: &["Authorization: Bearer Oracle"],
        facts: ("/opc/v2/instance/region", "eu-frankfurt-1"),
        credentials: Some(("/opc/v2/identity/key.pem", OCI_PRIVATE_KEY)),
        user_data: ("/opc/v2/instance/metadata/user_data", USER_DATA_B64),
        headerless: Some(("/opc/v2/instance/region", 401)),
        // The fake still serves v1 without the header; the agent closes it.
        legacy: &["/opc/v1/identity/key.pem", "/opc/v1/instance/region"],
        listing: None,
        more: &[("/opc/v2/vnics/", 200)],
        document: Some((
            "/opc/v2/instance/",
            "eu-frankfurt-1",
            &["user_data", "ssh_authorized_keys", "AAAAFAKE"],
        )),
        tokens: None,
    });
}

#[test]
fn digitalocean() {
    run(&Cloud {
        name: "digitalocean",
        address: "169.254.169.254",
        headers: &[],
        facts: ("/metadata/v1/id", DIGITALOCEAN_DROPLET_ID),
        credentials: None,
        user_data: ("/metadata/v1/user-data", "hunter2"),
        headerless: None,
        legacy: &[],
        listing: Some(("/metadata/v1/", "hostname", "user-data")),
        // The index's redirect passes through; the whole document carries user data.
        more: &[("/metadata/v1", 301)],
        document: Some((
            "/metadata/v1.json",
            "nyc3",
            &["user_data", "public_keys", "hunter2", "AAAAFAKE"],
        )),
        tokens: None,
    });
}

#[test]
fn hetzner() {
    run(&Cloud {
        name: "hetzner",
        address: "169.254.169.254",
        headers: &[],
        facts: ("/hetzner/v1/metadata/instance-id", HETZNER_INSTANCE_ID),
        credentials: None,
        user_data: ("/hetzner/v1/userdata", "hunter2"),
        headerless: None,
        legacy: &[],
        listing: None,
        more: &[("/hetzner/v1/metadata/private-networks", 200)],
        document: Some((
            "/hetzner/v1/metadata",
            "eu-central",
            &["public-keys", "vendor_data", "AAAAFAKE", "203.0.113.30"],
        )),
        tokens: None,
    });
}

#[test]
fn openstack() {
    run(&Cloud {
        name: "openstack",
        address: "169.254.169.254",
        headers: &[],
        facts: ("/latest/meta-data/instance-id", INSTANCE_ID),
        credentials: Some(("/openstack/latest/password", OPENSTACK_SECRET)),
        user_data: ("/openstack/latest/user_data", "hunter2"),
        headerless: None,
        legacy: &[],
        listing: Some(("/openstack/latest/", "network_data.json", "password")),
        more: &[("/openstack/latest/vendor_data2.json", 403)],
        document: Some((
            "/openstack/latest/meta_data.json",
            "nova",
            &["public_keys", "\"meta\"", "AAAAFAKE"],
        )),
        tokens: None,
    });
}

#[test]
fn alibaba() {
    run(&Cloud {
        name: "alibaba",
        address: "100.100.100.200",
        headers: &[],
        facts: ("/latest/meta-data/region-id", "cn-hangzhou"),
        credentials: Some((
            "/latest/meta-data/ram/security-credentials/demo-node-role",
            ALIBABA_ACCESS_KEY_PREFIX,
        )),
        user_data: ("/latest/user-data", "hunter2"),
        headerless: None,
        legacy: &[],
        listing: Some(("/latest/meta-data/", "region-id", "ram/")),
        more: &[],
        document: None,
        tokens: Some((ALIBABA_TOKEN_HEADER, ALIBABA_TTL_HEADER)),
    });
}

#[test]
fn volcengine() {
    run(&Cloud {
        name: "volcengine",
        address: "100.96.0.96",
        headers: &[],
        facts: ("/latest/meta-data/region-id", "cn-beijing"),
        credentials: Some((
            "/volcstack/latest/iam/security_credentials/demo-node-role",
            VOLCENGINE_ACCESS_KEY_PREFIX,
        )),
        user_data: ("/latest/user-data", "hunter2"),
        headerless: None,
        legacy: &[],
        listing: None,
        // The other spelling of the credentials' tree is credentials too; the rest of
        // volcstack/ is in no group.
        more: &[
            ("/latest/iam/security_credentials/demo-node-role", 403),
            ("/volcstack/latest/site_name", 403),
        ],
        document: None,
        tokens: Some((VOLCENGINE_TOKEN_HEADER, VOLCENGINE_TTL_HEADER)),
    });
}
