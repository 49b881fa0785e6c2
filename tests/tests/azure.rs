//! Azure: the agent, detecting the provider itself, in front of a fake Azure instance
//! metadata service; a managed identity's token for one workload and not for another.

use imds_tests::{
    fake_imds::clouds::AZURE_TOKEN_PREFIX,
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
