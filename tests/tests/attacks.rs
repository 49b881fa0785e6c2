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

/// Runs a Python probe in `cgroup`; it prints one line, the outcome.
fn probe(sandbox: &Sandbox, cgroup: &str, script: &str) -> String {
    let output = sandbox
        .command("python3", cgroup)
        .args(["-c", script])
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Prints the errno name of an operation, or "ok".
const OUTCOME: &str = r#"
import errno, socket, sys
def outcome(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
"#;

#[test]
fn other_tcp_ports_on_the_metadata_address_are_refused_but_dns_passes() {
    let Some(env) = start("ports") else { return };
    let script = format!(
        "{OUTCOME}\nfor port in (8080, 443, 53):\n    print(port, outcome(lambda: socket.create_connection(('169.254.169.254', port), timeout=2)))"
    );
    let result = probe(&env.sandbox, ATTACKER, &script);
    // EPERM comes from the connect hook; ECONNREFUSED means the connect went out (to DNS's
    // port, where nothing listens in the sandbox).
    assert_eq!(result, "8080 EPERM\n443 EPERM\n53 ECONNREFUSED");
    // Not enforced: the same connects go out.
    let outside = probe(&env.sandbox, "outside", &script);
    assert_eq!(
        outside,
        "8080 ECONNREFUSED\n443 ECONNREFUSED\n53 ECONNREFUSED"
    );
}

#[test]
fn udp_to_the_metadata_address_is_refused_except_dns() {
    let Some(env) = start("udp") else { return };
    let script = format!(
        r#"{OUTCOME}
u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
print("sendto", outcome(lambda: u4.sendto(b"x", ("169.254.169.254", 9999))))
print("sendto-mapped", outcome(lambda: u6.sendto(b"x", ("::ffff:169.254.169.254", 9999))))
print("sendto-v6", outcome(lambda: u6.sendto(b"x", ("fd00:ec2::254", 9999))))
print("connect", outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(("169.254.169.254", 9999))))
print("dns", outcome(lambda: u4.sendto(b"x", ("169.254.169.254", 53))))
"#
    );
    let result = probe(&env.sandbox, ATTACKER, &script);
    assert_eq!(
        result,
        "sendto EPERM\nsendto-mapped EPERM\nsendto-v6 EPERM\nconnect EPERM\ndns ok"
    );
}

#[test]
fn raw_sockets_cannot_be_created_in_enforced_cgroups() {
    let Some(env) = start("raw") else { return };
    let script = format!(
        "{OUTCOME}\nfor family in (socket.AF_INET, socket.AF_INET6):\n    print(outcome(lambda: socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)))"
    );
    assert_eq!(probe(&env.sandbox, ATTACKER, &script), "EPERM\nEPERM");
    assert_eq!(probe(&env.sandbox, "outside", &script), "ok\nok");
}

#[test]
fn tcp_fast_open_is_diverted_like_connect() {
    let Some(env) = start("tfo") else { return };
    let script = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
request = b"GET {CREDENTIALS} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
s.sendto(request, 0x20000000, ("169.254.169.254", 80))  # MSG_FASTOPEN: connect + data
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().split("\r\n")[0])
print(data.decode().split("\r\n\r\n", 1)[1])
"#
    );
    let result = probe(&env.sandbox, ATTACKER, &script);
    assert_eq!(
        result,
        "HTTP/1.1 403 Forbidden\nimds-agent: denied by policy 'attacker' rule 'default'"
    );
}
