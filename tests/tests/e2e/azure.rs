//! Azure: the agent, detecting the provider itself, in front of a fake Azure instance
//! metadata service; a managed identity's token for one workload and not for another, by
//! curl and by Azure's own client library (azure-identity's ManagedIdentityCredential).

use imds_tests::{
    fake_imds::clouds::{AZURE_TOKEN_PREFIX, HOST_GA_PLUGIN_SETTINGS, WIRESERVER_CERTIFICATES},
    sandbox::{Curl, Sandbox},
};

const POLICY: &str = r#"
name: app
callers: {cgroups: ["/app", "/web"]}
default: deny
rules:
  - name: instance
    action: allow
    methods: [GET]
    paths: ["/metadata/instance", "/metadata/instance/**"]
  - name: managed-identity
    action: allow
    methods: [GET]
    groups: [credentials]
    callers: {cgroups: ["/app"]}
"#;

/// azure-identity as an application on an Azure VM uses it: a managed identity's token for
/// Azure Resource Manager, from IMDS.
const AZURE_IDENTITY: &str = r#"
import json
from azure.identity import ManagedIdentityCredential
try:
    token = ManagedIdentityCredential().get_token("https://management.azure.com/.default")
    print(json.dumps({"token": token.token}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)[:300]}))
"#;

const TOKEN: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/";

#[test]
fn azure_is_detected_its_header_required_and_managed_identity_governed() {
    let Some(sandbox) = Sandbox::new("azure") else {
        return;
    };
    let _imds = sandbox.start_fake_cloud("azure", &[]);
    let policies = sandbox.write_policies(&[("app.yaml", POLICY)]);
    // No --provider: detected.
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    assert!(
        agent.log().lines().any(|l| {
            l.contains("detected the cloud provider") && l.contains("\"provider\":\"azure\"")
        }),
        "{}",
        agent.log()
    );
    let get = |cgroup: &str, path: &str, header: bool| -> Curl {
        let url = format!("http://169.254.169.254{path}");
        let mut args = Vec::new();
        if header {
            args.extend(["-H", "Metadata: true"]);
        }
        args.push(url.as_str());
        sandbox.curl(cgroup, None, &args)
    };
    let instance = get(
        "enforced/web",
        "/metadata/instance?api-version=2021-02-01",
        true,
    );
    assert_eq!(instance.status, 200, "{instance:?}");
    assert!(instance.body.contains("westeurope"), "{instance:?}");
    // Without Metadata: true the agent answers as Azure does, without asking it.
    let bare = get(
        "enforced/web",
        "/metadata/instance?api-version=2021-02-01",
        false,
    );
    assert_eq!(bare.status, 400, "{bare:?}");
    assert!(bare.body.contains("Metadata: true"), "{bare:?}");
    // The managed identity: for the app, not for the web tier.
    let token = get("enforced/app", TOKEN, true);
    assert_eq!(token.status, 200, "{token:?}");
    assert!(token.body.contains(AZURE_TOKEN_PREFIX), "{token:?}");
    let denied = get("enforced/web", TOKEN, true);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(!denied.body.contains(AZURE_TOKEN_PREFIX));
}

#[test]
fn azure_identity_gets_a_managed_identity_token_only_where_policy_allows() {
    if !imds_tests::sandbox::python_has("azure.identity", "azure-identity") {
        return;
    }
    let Some(sandbox) = Sandbox::new("azure-sdk") else {
        return;
    };
    let _imds = sandbox.start_fake_cloud("azure", &[]);
    let policies = sandbox.write_policies(&[("app.yaml", POLICY)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &["--provider", "azure"]);
    let get_token = |cgroup: &str| {
        sandbox.python_json(cgroup, AZURE_IDENTITY, |command| {
            // The library's own address for IMDS is 169.254.169.254: no override needed. Its
            // proxy settings must not apply (IMDS is never reached through a proxy).
            command.env("NO_PROXY", "*").env_remove("HTTP_PROXY");
        })
    };
    let allowed = get_token("enforced/app");
    assert!(
        allowed["token"]
            .as_str()
            .is_some_and(|t| t.starts_with(AZURE_TOKEN_PREFIX)),
        "{allowed}\n{}",
        agent.log()
    );
    // The web tier: no token, and the library's error carries the denial (it reads IMDS's
    // JSON error body; from a text body it would say only "unavailable").
    let denied = get_token("enforced/web");
    assert_eq!(denied["error"], "CredentialUnavailableError", "{denied}");
    assert!(
        denied["message"]
            .as_str()
            .is_some_and(|m| m.contains("denied by policy 'app'")),
        "{denied}"
    );
}

/// Azure's WireServer and HostGAPlugin (168.63.129.16, ports 80 and 32526) hold the VM's
/// certificates and extension settings: with `--provider azure` they are diverted too, and
/// the packaged default policy keeps them for root, as Azure's own guest proxy agent does.
#[test]
fn the_wireserver_and_host_ga_plugin_are_for_root_under_the_default_policy() {
    let Some(sandbox) = Sandbox::new("wireserver") else {
        return;
    };
    sandbox.ip(&["addr", "add", "168.63.129.16/32", "dev", "lo"]);
    let _imds = sandbox.start_fake_cloud("azure", &["168.63.129.16:80", "168.63.129.16:32526"]);
    let default_policy =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/default-policy.yaml");
    let _agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&default_policy],
        &["--provider", "azure"],
    );
    let get = |uid: Option<u32>, url: &str| sandbox.curl("enforced/app", uid, &[url]);
    let goal_state = "http://168.63.129.16/machine/?comp=goalstate";
    let certificates = "http://168.63.129.16/machine/c/r?comp=certificates&incarnation=1";
    let vm_settings = "http://168.63.129.16:32526/vmSettings";

    assert_eq!(get(None, goal_state).status, 200);
    let root = get(None, certificates);
    assert!(root.body.contains(WIRESERVER_CERTIFICATES), "{root:?}");
    let root = get(None, vm_settings);
    assert!(root.body.contains(HOST_GA_PLUGIN_SETTINGS), "{root:?}");
    for url in [goal_state, certificates, vm_settings] {
        let user = get(Some(1000), url);
        assert_eq!(user.status, 403, "{url}: {user:?}");
        assert!(
            !user.body.contains(WIRESERVER_CERTIFICATES)
                && !user.body.contains(HOST_GA_PLUGIN_SETTINGS),
            "{user:?}"
        );
    }
    // The WireServer's own query parameters, and no others (not even IMDS's).
    for query in ["comp=goalstate&x=1", "api-version=2021-02-01"] {
        let refused = get(None, &format!("http://168.63.129.16/machine/?{query}"));
        assert_eq!(refused.status, 400, "{query}: {refused:?}");
    }
}
