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
    start_with(label, &[])
}

fn start_with(label: &str, extra: &[&str]) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    let imds = sandbox.start_fake_imds(false);
    let policies = sandbox.write_policies(&[("attacker.yaml", POLICY)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], extra);
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
    // Denied credentials, and the same route works for what the policy allows.
    assert_governed(&env, "http://[::ffff:169.254.169.254]");
}

#[test]
fn the_ipv6_metadata_address_is_diverted() {
    let Some(env) = start("v6") else { return };
    assert_governed(&env, "http://[fd00:ec2::254]");
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

/// A sandbox set up as another cloud: the metadata addresses of OpenStack (IPv6 link-local,
/// on a NIC of its own as on a real instance) and Alibaba, and the ECS credential endpoint,
/// are local and served, and the agent runs with `agent_args`.
fn start_cloud(label: &str, agent_args: &[&str]) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    // A veth whose peer stays down: nic0 is the one interface that is up besides lo.
    sandbox.ip(&[
        "link",
        "add",
        "nic0",
        "type",
        "veth",
        "peer",
        "name",
        "nic0-peer",
    ]);
    sandbox.ip(&["link", "set", "nic0", "up"]);
    sandbox.ip(&[
        "-6",
        "addr",
        "add",
        "fe80::a9fe:a9fe/128",
        "dev",
        "nic0",
        "nodad",
    ]);
    for ip in ["100.100.100.200/32", "169.254.170.2/32"] {
        sandbox.ip(&["addr", "add", ip, "dev", "lo"]);
    }
    let imds = sandbox.start_fake_imds_on(
        false,
        &[
            "[fe80::a9fe:a9fe%nic0]:80",
            "100.100.100.200:80",
            "169.254.170.2:80",
        ],
    );
    let policies = sandbox.write_policies(&[("attacker.yaml", POLICY)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], agent_args);
    Some(Env {
        agent,
        _imds: imds,
        sandbox,
    })
}

/// Credentials from `base` are denied by the agent and the instance id is served through it.
fn assert_governed(env: &Env, base: &str) {
    let attempt = env
        .sandbox
        .curl(ATTACKER, None, &["-g", &format!("{base}{CREDENTIALS}")]);
    assert_denied_by_agent(&attempt);
    let allowed = env.sandbox.curl(
        ATTACKER,
        None,
        &["-g", &format!("{base}/latest/meta-data/instance-id")],
    );
    assert_eq!(
        allowed.body,
        INSTANCE_ID,
        "{base}: {allowed:?}\n{}",
        env.agent.log()
    );
}

#[test]
fn openstack_ipv6_link_local_endpoint_is_diverted_and_served() {
    // The interface is not named: the agent finds the only NIC that is up.
    let Some(env) = start_cloud("openstack", &["--provider", "openstack"]) else {
        return;
    };
    assert_governed(&env, "http://[fe80::a9fe:a9fe%25nic0]");
    assert_governed(&env, "http://169.254.169.254");
}

#[test]
fn alibaba_endpoint_and_extra_endpoints_are_diverted() {
    let Some(env) = start_cloud(
        "alibaba",
        &["--provider", "alibaba", "--endpoint", "169.254.170.2:80"],
    ) else {
        return;
    };
    assert_governed(&env, "http://100.100.100.200");
    // The ECS task-credential endpoint, governed because it was named.
    assert_governed(&env, "http://169.254.170.2");
}

#[test]
fn a_socket_keeps_its_creators_identity_when_the_process_moves() {
    let Some(sandbox) = Sandbox::new("owner") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let trusted = r#"
name: trusted
callers: {cgroups: ["/trusted"]}
default: deny
rules:
  - {name: credentials, action: allow, methods: [GET], groups: [credentials]}
"#;
    let policies = sandbox.write_policies(&[("attacker.yaml", POLICY), ("trusted.yaml", trusted)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    let trusted_procs = sandbox.cgroup("enforced/trusted").join("cgroup.procs");
    // The attacker opens a socket, then moves itself into a cgroup that may read
    // credentials (root in its cgroup namespace can do that within its own subtree) and
    // connects. The socket was made in the attacker's cgroup: that is who it is.
    let script = format!(
        r#"
import os, socket
def get(s):
    s.connect(("169.254.169.254", 80))
    s.sendall(b"GET {CREDENTIALS} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode().split("\r\n")[0] + (" CREDENTIALS" if "{ACCESS_KEY_PREFIX}" in data.decode() else "")
before = socket.socket()
open("{procs}", "w").write(str(os.getpid()))
print("made-before-move:", get(before))
print("made-after-move:", get(socket.socket()))
"#,
        procs = trusted_procs.display()
    );
    let outcome = probe(&sandbox, ATTACKER, &script);
    assert_eq!(
        outcome,
        "made-before-move: HTTP/1.1 403 Forbidden\n\
         made-after-move: HTTP/1.1 200 OK CREDENTIALS",
        "{}",
        agent.log()
    );
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

/// Sends raw bytes to the metadata address from the attacker's cgroup (so they are diverted
/// to the agent) and returns everything the server sent back before closing. `pause_ms`
/// waits after the bytes before reading, for slow-client cases.
fn raw(sandbox: &Sandbox, request: &str, pause_ms: u64) -> String {
    let script = format!(
        r#"
import socket, time, sys
s = socket.create_connection(("169.254.169.254", 80), timeout=5)
s.sendall({request:?}.encode("latin-1"))
time.sleep({pause_ms} / 1000)
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except socket.timeout:
    data += b"<timeout>"
sys.stdout.write(data.decode("latin-1"))
"#
    );
    probe(sandbox, ATTACKER, &script)
}

/// The status codes of every response in a raw exchange, in order.
fn statuses(response: &str) -> Vec<u16> {
    response
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|r| r.get(..3)?.parse().ok())
        .collect()
}

#[test]
fn request_smuggling_shapes_are_rejected_with_400_and_closed() {
    let Some(env) = start("smuggle") else { return };
    let creds = CREDENTIALS;
    let cases = [
        ("bare LF", format!("GET {creds} HTTP/1.1\nHost: x\n\n")),
        (
            "CL.TE",
            format!(
                "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {creds} HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
        ),
        (
            "TE only",
            format!(
                "GET {creds} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "body",
            "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".to_owned(),
        ),
        (
            "duplicate length",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
                .to_owned(),
        ),
        (
            "obs-fold",
            format!("GET {creds} HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
        ),
        (
            "space before colon",
            format!("GET {creds} HTTP/1.1\r\nHost : x\r\n\r\n"),
        ),
        (
            "absolute-form",
            format!("GET http://169.254.169.254{creds} HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "authority-form",
            "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        ),
        (
            "asterisk-form",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        ),
        ("h2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned()),
        (
            "h2c upgrade",
            format!(
                "GET {creds} HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"
            ),
        ),
        ("no Host", format!("GET {creds} HTTP/1.1\r\n\r\n")),
        (
            "two Hosts",
            format!("GET {creds} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ),
        (
            "duplicate token",
            format!(
                "GET {creds} HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: a\r\nx-aws-ec2-metadata-token: b\r\n\r\n"
            ),
        ),
        (
            "connection nominates a header",
            format!(
                "GET {creds} HTTP/1.1\r\nHost: x\r\nConnection: x-aws-ec2-metadata-token\r\n\r\n"
            ),
        ),
    ];
    for (name, request) in cases {
        let response = raw(&env.sandbox, &request, 0);
        assert!(!response.contains(ACCESS_KEY_PREFIX), "{name}: {response}");
        assert_eq!(statuses(&response), [400], "{name}: {response}");
        assert!(
            response.contains("imds-agent: bad request: "),
            "{name}: {response}"
        );
    }
}

#[test]
fn path_tricks_never_reach_a_denied_object() {
    let Some(env) = start("paths") else { return };
    let tricks = [
        "/latest/meta-data/iam/security-credentials/demo-node-role/",
        "/latest/meta-data/iam/security-credentials//demo-node-role",
        "/latest/meta-data/./iam/security-credentials/demo-node-role",
        "/latest/meta-data/instance-id/../iam/security-credentials/demo-node-role",
        "/latest/meta-data/%69am/security-credentials/demo-node-role",
        "/latest/meta-data/iam%2Fsecurity-credentials/demo-node-role",
        "/latest/meta-data\\iam\\security-credentials\\demo-node-role",
        "/latest/meta-data/instance-id;/../iam/security-credentials/demo-node-role",
        "/latest/meta-data/IAM/security-credentials/demo-node-role",
        "/2021-03-23/meta-data/iam/security-credentials/demo-node-role",
        "/latest/meta-data/iam/security-credentials/demo-node-role?x=../../",
        "/latest/meta-data/instance-id#/../iam",
    ];
    for path in tricks {
        let response = raw(
            &env.sandbox,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            0,
        );
        assert!(!response.contains(ACCESS_KEY_PREFIX), "{path}: {response}");
        let status = statuses(&response);
        assert!(status == [400] || status == [403], "{path}: {response}");
        // Denials are fixed text: nothing from the request comes back.
        assert!(
            !response.contains("security-credentials"),
            "{path}: {response}"
        );
    }
}

#[test]
fn forwarding_headers_are_refused() {
    let Some(env) = start("forwarded") else {
        return;
    };
    for header in [
        "X-Forwarded-For: 10.0.0.1",
        "Forwarded: for=10.0.0.1",
        "X-Forwarded-Host: evil",
        "X-Real-IP: 10.0.0.1",
    ] {
        let response = raw(
            &env.sandbox,
            &format!(
                "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n"
            ),
            0,
        );
        assert_eq!(statuses(&response), [403], "{header}: {response}");
        assert!(!response.contains(INSTANCE_ID));
    }
}

#[test]
fn pipelined_requests_are_each_decided() {
    let Some(env) = start("pipeline") else { return };
    let allowed = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n";
    let denied = format!("GET {CREDENTIALS} HTTP/1.1\r\nHost: x\r\n\r\n");
    let last = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let response = raw(
        &env.sandbox,
        &format!("{allowed}{denied}{allowed}{last}"),
        0,
    );
    assert_eq!(statuses(&response), [200, 403, 200, 200], "{response}");
    assert!(!response.contains(ACCESS_KEY_PREFIX));
    // A malformed request in the pipeline ends it there, after the earlier ones are answered.
    let response = raw(
        &env.sandbox,
        &format!("{allowed}GET {CREDENTIALS} HTTP/1.1\nHost: x\n\n{allowed}"),
        0,
    );
    assert_eq!(statuses(&response), [200, 400], "{response}");
}

#[test]
fn slow_heads_time_out_and_idle_connections_are_closed() {
    let Some(env) = start_with(
        "slow",
        &["--head-timeout-ms", "300", "--idle-timeout-ms", "300"],
    ) else {
        return;
    };
    // Slowloris: a head that never ends gets 408 and the connection closes.
    let response = raw(
        &env.sandbox,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
        0,
    );
    assert_eq!(statuses(&response), [408], "{response}");
    assert!(
        !response.contains("<timeout>"),
        "the connection was not closed: {response}"
    );
    // Idle keep-alive: answered, then closed by the agent without another request.
    let response = raw(
        &env.sandbox,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n",
        0,
    );
    assert_eq!(statuses(&response), [200], "{response}");
    assert!(
        !response.contains("<timeout>"),
        "the idle connection was not closed: {response}"
    );
}

#[test]
fn a_flooding_caller_gets_429_and_others_are_still_served() {
    let Some(env) = start_with(
        "flood",
        &["--rate-per-caller", "1", "--burst-per-caller", "5"],
    ) else {
        return;
    };
    let id = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n";
    let last = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let flood = format!("{}{last}", id.repeat(7));
    let response = raw(&env.sandbox, &flood, 0);
    assert_eq!(
        statuses(&response),
        [200, 200, 200, 200, 200, 429, 429, 429],
        "{response}"
    );
    assert!(response.contains("imds-agent: request rate exceeded for this caller"));
    // Another caller has its own budget.
    let other = env.sandbox.curl(
        "enforced/other",
        None,
        &["http://169.254.169.254/latest/meta-data/instance-id"],
    );
    assert_eq!(
        other.status, 403,
        "served by policy, not refused by the limit: {other:?}"
    );
}

/// Holds one request in flight (1.5 s at the fake IMDS), then sends a second from the same
/// caller; returns the second's result and, once it finished, the first's body.
fn second_while_first_in_flight(env: &Env) -> (Curl, String) {
    let first = env.sandbox.spawn_get(
        ATTACKER,
        "http://169.254.169.254/latest/meta-data/instance-id",
        &["-H", "X-Fake-Delay-Ms: 1500"],
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = env.sandbox.curl(
        ATTACKER,
        None,
        &["http://169.254.169.254/latest/meta-data/instance-id"],
    );
    let first = first.wait_with_output().unwrap();
    (second, String::from_utf8_lossy(&first.stdout).into_owned())
}

#[test]
fn too_many_requests_in_flight_get_429() {
    let Some(env) = start_with("inflight", &["--max-in-flight-per-caller", "1"]) else {
        return;
    };
    let (second, first) = second_while_first_in_flight(&env);
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(
        second.body,
        "imds-agent: too many requests in flight from this caller\n"
    );
    assert_eq!(first, INSTANCE_ID);
}

#[test]
fn overload_refuses_new_connections_and_never_bypasses() {
    let Some(env) = start_with("overload", &["--max-connections", "1"]) else {
        return;
    };
    // One connection held open (a request in flight), so the next is refused by the agent,
    // not passed to the metadata service.
    let (refused, first) = second_while_first_in_flight(&env);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(!refused.body.contains(INSTANCE_ID));
    assert_eq!(first, INSTANCE_ID);
    // Once the load is gone, callers are served again.
    let later = env.sandbox.curl(
        ATTACKER,
        None,
        &["http://169.254.169.254/latest/meta-data/instance-id"],
    );
    assert_eq!(later.body, INSTANCE_ID, "{later:?}\n{}", env.agent.log());
}

#[test]
fn a_hung_metadata_service_gives_504() {
    let Some(env) = start_with("upstream-timeout", &["--upstream-timeout-ms", "400"]) else {
        return;
    };
    let hung = env.sandbox.curl(
        ATTACKER,
        None,
        &[
            "-H",
            "X-Fake-Delay-Ms: 1500",
            "http://169.254.169.254/latest/meta-data/instance-id",
        ],
    );
    assert_eq!(hung.status, 504, "{hung:?}");
    // A service that sends the head and then stalls: the caller gets the same 504 in the
    // bound, not a 200 whose body never comes.
    let started = std::time::Instant::now();
    let stalled = env.sandbox.curl(
        ATTACKER,
        None,
        &[
            "-H",
            "X-Fake-Body-Delay-Ms: 3000",
            "http://169.254.169.254/latest/meta-data/instance-id",
        ],
    );
    assert_eq!(
        (stalled.status, stalled.body.contains(INSTANCE_ID)),
        (504, false),
        "{stalled:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2500),
        "the stalled body was waited for: {:?}",
        started.elapsed()
    );
    // One bound for head and body together: each in time, both together not.
    let slow_both = env.sandbox.curl(
        ATTACKER,
        None,
        &[
            "-H",
            "X-Fake-Delay-Ms: 300",
            "-H",
            "X-Fake-Body-Delay-Ms: 300",
            "http://169.254.169.254/latest/meta-data/instance-id",
        ],
    );
    assert_eq!(slow_both.status, 504, "{slow_both:?}");
    let late_body = env.sandbox.curl(
        ATTACKER,
        None,
        &[
            "-H",
            "X-Fake-Body-Delay-Ms: 100",
            "http://169.254.169.254/latest/meta-data/instance-id",
        ],
    );
    assert_eq!(
        (late_body.status, late_body.body.as_str()),
        (200, INSTANCE_ID),
        "{late_body:?}"
    );
    let timed_out = env
        .agent
        .audit()
        .into_iter()
        .filter(|line| line["status"] == 504 && line["detail"] == "no answer in time")
        .count();
    assert_eq!(timed_out, 3, "{}", env.agent.log());
    // GCP's hanging GETs outlast the bound (gcp.rs); EC2's service documents no query
    // parameter, so here the agent refuses one before any upstream wait.
    let long_poll = env.sandbox.curl(
        ATTACKER,
        None,
        &["http://169.254.169.254/latest/meta-data/instance-id?wait_for_change=true&timeout_sec=3"],
    );
    assert_eq!(
        (long_poll.status, long_poll.body.as_str()),
        (
            400,
            "imds-agent: a query parameter this metadata service does not document\n"
        ),
        "{long_poll:?}"
    );
}

/// A HEAD answer has no body but names the length of the GET's: the caller sees the
/// service's length (not the empty body's, which the agent reads whole), and the connection
/// stays usable after it.
#[test]
fn head_requests_keep_the_services_length() {
    let Some(sandbox) = Sandbox::new("head") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let policy = POLICY.replace("methods: [GET]", "methods: [GET, HEAD]");
    let policies = sandbox.write_policies(&[("attacker.yaml", policy.as_str())]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    let url = "http://169.254.169.254/latest/meta-data/instance-id";
    // Twice on one connection: curl reuses it for the second URL.
    let head = sandbox.curl(ATTACKER, None, &["-I", url, url]);
    assert_eq!(
        (head.status, head.exit),
        (200, 0),
        "{head:?}\n{}",
        agent.log()
    );
    let length = format!("content-length: {}\r\n", INSTANCE_ID.len());
    assert_eq!(
        head.body.to_ascii_lowercase().matches(&length).count(),
        2,
        "{head:?}"
    );
    assert!(!head.body.contains(INSTANCE_ID), "{head:?}");
}

#[test]
fn connections_opened_before_enforcement_are_closed() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let Some(sandbox) = Sandbox::new("preexisting") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    // Before the agent: a keep-alive connection straight to the metadata service, proven live.
    let script = format!(
        r#"
import socket, sys
s = socket.create_connection(("169.254.169.254", 80), timeout=5)
def ask(path):
    s.sendall(f"GET {{path}} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s.recv(65536).decode(errors="replace")
print("before:", ask("/latest/meta-data/instance-id").split("\r\n")[0], flush=True)
sys.stdin.readline()
try:
    print("after:", ask("{CREDENTIALS}").replace("\r\n", " "), flush=True)
except OSError as e:
    print("after: error", e.errno, flush=True)
"#
    );
    let mut holder = sandbox
        .command("python3", ATTACKER)
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "before: HTTP/1.1 200 OK");

    let policies = sandbox.write_policies(&[("attacker.yaml", POLICY)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    writeln!(holder.stdin.take().unwrap()).unwrap();
    let after = lines.next().unwrap().unwrap();
    let _ = holder.wait();
    assert!(
        !after.contains(ACCESS_KEY_PREFIX),
        "the old connection still worked: {after}"
    );
    // ECONNABORTED (103) or ECONNRESET (104), or an empty read on a closed connection.
    assert!(
        after == "after: error 103" || after == "after: error 104" || after == "after: ",
        "{after}"
    );
    assert!(
        agent
            .log()
            .contains("closed connections to the metadata service that predate enforcement"),
        "{}",
        agent.log()
    );
}

#[test]
fn io_uring_connect_is_diverted_like_connect() {
    let Some(env) = start("uring") else { return };
    let output = env
        .sandbox
        .command(imds_tests::sandbox::binary("uring-connect"), ATTACKER)
        .args(["169.254.169.254:80", CREDENTIALS])
        .output()
        .unwrap();
    let response = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!response.contains(ACCESS_KEY_PREFIX), "{response}");
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(
        response.ends_with("imds-agent: denied by policy 'attacker' rule 'default'\n"),
        "{response}"
    );
}

#[test]
fn a_recursive_read_cannot_return_what_a_path_by_path_read_could_not() {
    // GCP's recursive=true returns a whole subtree in one answer: a caller that may list
    // /latest/meta-data/ would get everything below it from a service that honoured it. EC2's
    // service documents no query parameter, so the agent refuses them all here (the subtree
    // decisions themselves are GCP's: gcp.rs, and the policy's unit tests).
    let Some(env) = start("recursive") else {
        return;
    };
    const POLICY_WITH_LISTING: &str = r#"
name: lister
callers: {cgroups: ["/lister"]}
default: deny
rules:
  - name: listing
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/", "/latest/meta-data/placement/**"]
"#;
    env.sandbox.write_policies(&[
        ("attacker.yaml", POLICY),
        ("lister.yaml", POLICY_WITH_LISTING),
    ]);
    // The policy directory is watched: wait for the new file to be in force.
    let listed = |query: &str| {
        env.sandbox.curl(
            "enforced/lister",
            None,
            &[&format!("http://169.254.169.254/latest/meta-data/{query}")],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while listed("").status != 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(listed("").status, 200, "the listing itself is allowed");
    for query in [
        "?recursive=true",
        "?alt=json&recursive=true",
        "?recursive",
        "placement/?recursive=true",
    ] {
        let recursive = listed(query);
        assert_eq!(
            (recursive.status, recursive.body.as_str()),
            (
                400,
                "imds-agent: a query parameter this metadata service does not document\n"
            ),
            "{query}"
        );
    }
    assert!(!listed("?recursive=true").body.contains(ACCESS_KEY_PREFIX));
}

#[test]
fn gcp_legacy_trees_and_header_less_requests_are_closed_whatever_the_policy() {
    // A caller that policy allows everything: the protocol rules still apply. GCP's 0.1 and
    // v1beta1 trees never required Metadata-Flavor, so an SSRF could read them.
    let Some(sandbox) = Sandbox::new("gcp-rules") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let policies = sandbox.write_policies(&[(
        "open.yaml",
        "name: open\ncallers: {cgroups: [\"/open\"]}\ndefault: allow\n",
    )]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &["--provider", "gcp"]);
    let get = |path: &str, headers: &[&str]| {
        let mut args: Vec<&str> = headers.iter().flat_map(|h| ["-H", *h]).collect();
        let url = format!("http://169.254.169.254{path}");
        args.push(&url);
        sandbox.curl("enforced/open", None, &args)
    };
    let flavor = "Metadata-Flavor: Google";
    for path in [
        "/computeMetadata/v1beta1/instance/id",
        "/0.1/meta-data/project-id",
    ] {
        let legacy = get(path, &[flavor]);
        assert_eq!(legacy.status, 403, "{path}: {legacy:?}");
        assert!(legacy.body.contains("legacy"), "{legacy:?}");
    }
    let bare = get("/computeMetadata/v1/instance/id", &[]);
    assert_eq!(bare.status, 403, "{bare:?}");
    assert!(
        bare.body
            .contains("Metadata-Flavor: Google header required")
    );
    // With the header the request goes on to the service (the fake IMDS, an AWS one, has no
    // such path: its 404 shows the request was forwarded).
    assert_eq!(
        get("/computeMetadata/v1/instance/id", &[flavor]).status,
        404
    );
    let rejects = agent
        .audit()
        .iter()
        .filter(|l| l["decision"] == "reject")
        .count();
    assert_eq!(rejects, 3);
}
