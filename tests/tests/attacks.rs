//! The attack suite: every route a compromised workload could take to the metadata service,
//! each as its own case. Every one must end in a denial or a refused connection, never in an
//! upstream answer (the fake IMDS's credentials).
//!
//! The policy: the attacker's cgroup `enforced/attacker` may read the instance id and nothing
//! else; the prize is the role's credentials.

use imds_tests::{
    fake_imds::{ACCESS_KEY_PREFIX, INSTANCE_ID},
    sandbox::{Agent, Curl, Process, Sandbox},
};

const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/demo-node-role";
const ATTACKER: &str = "enforced/attacker";

const POLICY: &str = r#"
name: attacker
callers: {cgroups: ["/attacker"]}
default: deny
rules:
  - name: instance-id
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/instance-id"]
"#;

struct Env {
    agent: Agent,
    _imds: Process,
    sandbox: Sandbox,
}

fn start(label: &str) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    let imds = sandbox.start_fake_imds(false);
    let policy = sandbox.work_dir.join("attacker.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let agent = sandbox.start_agent("enforced", "agent", &[&policy], &[]);
    Some(Env {
        agent,
        _imds: imds,
        sandbox,
    })
}

/// The attack got nothing from the metadata service: a denial, or no connection.
fn assert_no_credentials(attempt: &Curl) {
    assert!(
        !attempt.body.contains(ACCESS_KEY_PREFIX),
        "the attack reached the metadata service: {attempt:?}"
    );
    assert!(
        attempt.status == 403 || attempt.status == 400 || attempt.status == 0,
        "{attempt:?}"
    );
}

/// The request was diverted to the agent, which denied it by policy.
fn assert_denied_by_agent(attempt: &Curl) {
    assert_eq!(attempt.status, 403, "{attempt:?}");
    assert_eq!(
        attempt.body,
        "imds-agent: denied by policy 'attacker' rule 'default'\n"
    );
}

#[test]
fn ipv4_mapped_ipv6_on_a_dual_stack_socket_is_diverted() {
    let Some(env) = start("v4mapped") else { return };
    let attempt = env.sandbox.curl(
        ATTACKER,
        None,
        &[
            "-g",
            &format!("http://[::ffff:169.254.169.254]{CREDENTIALS}"),
        ],
    );
    assert_denied_by_agent(&attempt);
    // And the same route works for what the policy allows.
    let allowed = env.sandbox.curl(
        ATTACKER,
        None,
        &[
            "-g",
            "http://[::ffff:169.254.169.254]/latest/meta-data/instance-id",
        ],
    );
    assert_eq!(
        allowed.body,
        INSTANCE_ID,
        "{allowed:?}\n{}",
        env.agent.log()
    );
}

#[test]
fn the_ipv6_metadata_address_is_diverted() {
    let Some(env) = start("v6") else { return };
    let attempt = env.sandbox.curl(
        ATTACKER,
        None,
        &["-g", &format!("http://[fd00:ec2::254]{CREDENTIALS}")],
    );
    assert_denied_by_agent(&attempt);
    let allowed = env.sandbox.curl(
        ATTACKER,
        None,
        &["-g", "http://[fd00:ec2::254]/latest/meta-data/instance-id"],
    );
    assert_eq!(
        allowed.body,
        INSTANCE_ID,
        "{allowed:?}\n{}",
        env.agent.log()
    );
}

#[test]
fn nat64_and_v4_compatible_embeddings_count_as_the_metadata_address() {
    let Some(env) = start("embedded") else { return };
    for host in ["[64:ff9b::a9fe:a9fe]", "[::a9fe:a9fe]"] {
        let attempt = env.sandbox.curl(
            ATTACKER,
            None,
            &["-g", &format!("http://{host}{CREDENTIALS}")],
        );
        assert_no_credentials(&attempt);
        assert_denied_by_agent(&attempt);
        // Served from the IPv4 endpoint they embed, for what the policy allows.
        let allowed = env.sandbox.curl(
            ATTACKER,
            None,
            &["-g", &format!("http://{host}/latest/meta-data/instance-id")],
        );
        assert_eq!(allowed.body, INSTANCE_ID, "{host}: {allowed:?}");
    }
}
