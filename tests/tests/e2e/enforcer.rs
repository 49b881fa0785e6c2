//! The enforcer end to end, on the real kernel, in a sandbox per test.
//!
//! Layout in every sandbox (paths relative to the sandbox's parent cgroup):
//! `enforced/` is the attach point (the agent's --cgroup) with workloads `enforced/web` and
//! `enforced/batch`; `outside/` is a sibling that is not enforced; `agent/` holds the agent
//! and `imds/` the fake metadata service.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use imds_tests::{
    fake_imds::{ACCESS_KEY_PREFIX, CONNECTION_PATH, INSTANCE_ID, TTL_HEADER, USER_DATA},
    sandbox::{
        Agent, ENFORCED_ATTACH_TYPES, OTHER_SERVER, Process, Sandbox, attach_types, binary,
        read_settled,
    },
};

const IMDS: &str = "http://169.254.169.254";
const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/demo-node-role";

fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn url(path: &str) -> String {
    format!("{IMDS}{path}")
}

struct Env {
    agent: Agent,
    _imds: Process,
    // Last: dropped after the processes it hosts.
    sandbox: Sandbox,
}

/// A sandbox with the fake IMDS and an agent enforcing `enforced/` with the repo's policies.
fn start(label: &str, tokens_required: bool) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    let imds = sandbox.start_fake_imds(tokens_required);
    let agent = sandbox.start_agent("enforced", "agent", &[&repo_policies()], &[]);
    let mut env = Env {
        agent,
        _imds: imds,
        sandbox,
    };
    assert!(env.agent.is_running(), "agent exited:\n{}", env.agent.log());
    Some(env)
}

fn counters(sandbox: &Sandbox) -> serde_json::Value {
    sandbox.kernel_counters()
}

#[test]
fn allowed_path_gets_the_upstream_body_and_a_denied_path_names_the_rule() {
    let Some(env) = start("allow-deny", false) else {
        return;
    };
    let sb = &env.sandbox;

    let allowed = sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        (allowed.status, allowed.body.as_str()),
        (200, INSTANCE_ID),
        "{allowed:?}"
    );

    let denied = sb.curl("enforced/web", None, &[&url(CREDENTIALS_PATH)]);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(
        denied.body,
        "imds-agent: denied by policy 'web' rule 'default'\n"
    );
    assert!(!denied.body.contains(ACCESS_KEY_PREFIX));

    let user_data = sb.curl("enforced/web", None, &[&url("/latest/user-data")]);
    assert_eq!(user_data.status, 403);
    assert!(!user_data.body.contains("hunter2"));

    let audit = env.agent.audit();
    let line = |path: &str| {
        audit
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no audit line for {path}: {audit:#?}"))
            .clone()
    };
    let allow = line(INSTANCE_ID_PATH);
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["cgroup"], "/web");
    assert_eq!(allow["policy"], "web");
    assert_eq!(allow["rule"], "instance-info");
    assert_eq!(allow["upstream_status"], 200);
    assert_eq!(allow["comm"], "curl");
    assert_eq!(allow["uid"], 0);
    assert!(allow["latency_us"].as_u64().is_some());
    let deny = line(CREDENTIALS_PATH);
    assert_eq!(
        (deny["decision"].as_str(), deny["status"].as_u64()),
        (Some("deny"), Some(403))
    );
}

#[test]
fn a_cgroup_outside_the_attach_point_goes_direct() {
    let Some(env) = start("outside", false) else {
        return;
    };
    let direct = env.sandbox.curl("outside", None, &[&url(CREDENTIALS_PATH)]);
    assert_eq!(direct.status, 200, "{direct:?}");
    assert!(direct.body.contains(ACCESS_KEY_PREFIX), "{direct:?}");
    assert!(
        env.agent.audit().is_empty(),
        "the agent saw it: {:#?}",
        env.agent.audit()
    );
}

#[test]
fn other_destinations_from_an_enforced_cgroup_connect_unchanged() {
    let Some(env) = start("other-dest", false) else {
        return;
    };
    let before = counters(&env.sandbox);
    // The same path that policy denies on the metadata address, on another server.
    let other = env.sandbox.curl(
        "enforced/web",
        None,
        &[&format!("http://{OTHER_SERVER}{CREDENTIALS_PATH}")],
    );
    assert_eq!(other.status, 200, "{other:?}");
    assert!(other.body.contains(ACCESS_KEY_PREFIX));
    assert!(
        env.agent.audit().is_empty(),
        "diverted: {:#?}",
        env.agent.audit()
    );
    assert_eq!(counters(&env.sandbox)["diverted"], before["diverted"]);
}

#[test]
fn imdsv2_token_flow_works_through_the_filter() {
    let Some(env) = start("imdsv2", true) else {
        return;
    };
    let sb = &env.sandbox;
    let token = sb.curl(
        "enforced/web",
        None,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("{TTL_HEADER}: 300"),
            "-D",
            "/dev/stderr",
            &url("/latest/api/token"),
        ],
    );
    assert_eq!(token.status, 200, "{token:?}");
    assert!(!token.body.is_empty());
    // The TTL header the SDKs parse comes back unchanged.
    assert!(
        token
            .stderr
            .to_ascii_lowercase()
            .contains(&format!("{TTL_HEADER}: 300")),
        "{token:?}"
    );

    let with_token = sb.curl(
        "enforced/web",
        None,
        &[
            "-H",
            &format!("x-aws-ec2-metadata-token: {}", token.body),
            &url(INSTANCE_ID_PATH),
        ],
    );
    assert_eq!(
        (with_token.status, with_token.body.as_str()),
        (200, INSTANCE_ID)
    );

    // The service's own answers pass through: no token, and a forged token, are 401.
    let without = sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(without.status, 401, "{without:?}");
    let forged = sb.curl(
        "enforced/web",
        None,
        &[
            "-H",
            "x-aws-ec2-metadata-token: forged",
            &url(INSTANCE_ID_PATH),
        ],
    );
    assert_eq!(forged.status, 401);

    // A bad TTL is the service's 400, not the filter's.
    let bad_ttl = sb.curl(
        "enforced/web",
        None,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("{TTL_HEADER}: 0"),
            &url("/latest/api/token"),
        ],
    );
    assert_eq!(bad_ttl.status, 400);
    // The filter refuses forwarding headers itself.
    let xff = sb.curl(
        "enforced/web",
        None,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("{TTL_HEADER}: 60"),
            "-H",
            "X-Forwarded-For: 10.0.0.1",
            &url("/latest/api/token"),
        ],
    );
    assert_eq!(xff.status, 403);
    assert!(xff.body.contains("forwarding headers"), "{xff:?}");
}

#[test]
fn the_uid_rule_separates_two_processes_in_one_cgroup() {
    let Some(env) = start("uid", false) else {
        return;
    };
    let job = env
        .sandbox
        .curl("enforced/batch", Some(1000), &[&url(CREDENTIALS_PATH)]);
    assert_eq!(job.status, 200, "{job:?}");
    assert!(job.body.contains(ACCESS_KEY_PREFIX));

    let other = env
        .sandbox
        .curl("enforced/batch", Some(0), &[&url(CREDENTIALS_PATH)]);
    assert_eq!(other.status, 403);
    assert_eq!(
        other.body,
        "imds-agent: denied by policy 'batch' rule 'default'\n"
    );
    // Both may read what the policy grants everyone in the cgroup.
    let id = env
        .sandbox
        .curl("enforced/batch", Some(0), &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(id.status, 200);
}

#[test]
fn a_killed_agent_fails_closed_and_a_restarted_agent_serves_again() {
    let Some(mut env) = start("restart", false) else {
        return;
    };
    let sb = &env.sandbox;
    assert_eq!(
        sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)])
            .status,
        200
    );

    env.agent.process.signal(libc::SIGKILL);
    env.agent.process.wait(Duration::from_secs(5));
    let refused = sb.curl("enforced/batch", Some(1000), &[&url(CREDENTIALS_PATH)]);
    assert_eq!(refused.status, 0, "served without an agent: {refused:?}");
    assert_eq!(refused.exit, 7, "expected connection refused: {refused:?}");
    // Not enforced: unaffected.
    assert_eq!(
        sb.curl("outside", None, &[&url(INSTANCE_ID_PATH)]).status,
        200
    );

    let agent = sb.start_agent("enforced", "agent", &[&repo_policies()], &[]);
    let served = sb.curl("enforced/batch", Some(1000), &[&url(CREDENTIALS_PATH)]);
    assert_eq!(served.status, 200, "{served:?}\n{}", agent.log());
    let denied = sb.curl("enforced/web", None, &[&url(CREDENTIALS_PATH)]);
    assert_eq!(denied.status, 403);
}

/// An agent started over an earlier version's installation whose caller records had another
/// layout: it must not adopt that map (the kernel would refuse its programs), and it removes
/// the old pin. Here the old pin is any map under the old name.
#[test]
fn an_upgraded_agent_leaves_an_older_caller_map_alone_and_removes_its_pin() {
    let Some(sandbox) = Sandbox::new("upgrade") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    imds_agent::fs::ensure_bpffs().expect("bpffs");
    std::fs::create_dir_all(&sandbox.pin_dir).unwrap();
    let old_pin = sandbox.pin_dir.join("IMDS_CALLERS");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old_pin)
        .args("type hash key 4 value 48 entries 1 name IMDS_CALLERS".split(' '))
        .output()
        .expect("bpftool");
    assert!(created.status.success(), "{created:?}");

    let agent = sandbox.start_agent("enforced", "agent", &[&repo_policies()], &[]);
    let served = sandbox.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        (served.status, served.body.as_str()),
        (200, INSTANCE_ID),
        "{served:?}\n{}",
        agent.log()
    );
    assert!(!old_pin.exists(), "the old callers pin is still there");
    assert!(sandbox.pin_dir.join(imds_common::PIN_CALLERS).exists());
}

#[test]
fn detach_removes_enforcement() {
    let Some(mut env) = start("detach", false) else {
        return;
    };
    env.agent.process.signal(libc::SIGTERM);
    env.agent.process.wait(Duration::from_secs(15));
    let output = std::process::Command::new(binary("imds-agent"))
        .args(["detach", "--pin-dir"])
        .arg(&env.sandbox.pin_dir)
        .output()
        .expect("imds-agent detach");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("detached"));
    assert!(!env.sandbox.pin_dir.exists());
    // No longer diverted: the enforced cgroup reaches the service directly.
    let direct = env
        .sandbox
        .curl("enforced/web", None, &[&url(CREDENTIALS_PATH)]);
    assert_eq!(direct.status, 200, "{direct:?}");
    assert!(direct.body.contains(ACCESS_KEY_PREFIX));
}

#[test]
fn sigterm_exits_zero_and_leaves_enforcement_in_place() {
    let Some(mut env) = start("sigterm", false) else {
        return;
    };
    env.agent.process.signal(libc::SIGTERM);
    assert_eq!(
        env.agent.process.wait(Duration::from_secs(15)),
        Some(0),
        "{}",
        env.agent.log()
    );
    let refused = env
        .sandbox
        .curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!((refused.status, refused.exit), (0, 7), "{refused:?}");
}

#[test]
fn a_bad_policy_file_is_a_clear_error_and_nothing_is_attached() {
    let Some(sandbox) = Sandbox::new("bad-policy") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let bad = sandbox.work_dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "name: broken\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GET]\n    paths: [\"/latest//x\"]\n",
    )
    .unwrap();
    let mut agent = sandbox.launch_agent("enforced", "agent", &[&bad], &[]);
    assert_eq!(agent.process.wait(Duration::from_secs(10)), Some(64));
    let log = agent.log();
    assert!(
        log.contains(&format!("{}:7:13: rules[0].paths[0]", bad.display()))
            && log.contains("empty path segment"),
        "{log}"
    );
    assert!(!imds_agent::loader::is_attached(&sandbox.pin_dir));
    // Nothing in the kernel either: the enforced cgroup still reaches the service directly.
    let direct = sandbox.curl("enforced/web", None, &[&url(CREDENTIALS_PATH)]);
    assert_eq!(direct.status, 200, "{direct:?}");
}

#[test]
fn the_agent_inside_the_enforced_tree_is_not_diverted_to_itself() {
    let Some(sandbox) = Sandbox::new("exempt") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let agent = sandbox.start_agent("enforced", "enforced/agent", &[&repo_policies()], &[]);
    let allowed = sandbox.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(allowed.status, 200, "{allowed:?}\n{}", agent.log());
    let counters = counters(&sandbox);
    assert_eq!(counters["diverted"], 1, "{counters}");
    assert_eq!(
        counters["passed"], 1,
        "the agent's upstream connect: {counters}"
    );
}

#[test]
fn connections_the_kernel_did_not_divert_are_refused_by_the_agent() {
    let Some(env) = start("direct-listener", false) else {
        return;
    };
    // Straight to the agent's listener, from enforced and unenforced cgroups alike.
    for cgroup in ["enforced/web", "outside"] {
        let direct = env.sandbox.curl(
            cgroup,
            None,
            &[&format!("http://127.0.0.1:954{INSTANCE_ID_PATH}")],
        );
        assert_eq!(direct.status, 403, "{cgroup}: {direct:?}");
        assert!(
            direct.body.contains("not diverted by the kernel"),
            "{direct:?}"
        );
        assert!(!direct.body.contains(INSTANCE_ID));
    }
}

#[test]
fn unmatched_callers_are_denied_by_default() {
    let Some(env) = start("unmatched", false) else {
        return;
    };
    let stray = env
        .sandbox
        .curl("enforced/stray", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(stray.status, 403);
    assert_eq!(
        stray.body,
        "imds-agent: denied by policy '(none)' rule 'unmatched'\n"
    );
    assert!(
        !env.sandbox
            .curl("enforced/stray", None, &[&url("/latest/user-data")])
            .body
            .contains(USER_DATA)
    );
}

const SDK_POLICY: &str = r#"
name: sdk
callers:
  cgroups: ["/sdk-allowed"]
default: deny
rules:
  - name: token
    action: allow
    methods: [PUT]
    paths: ["/latest/api/token"]
  - name: credentials
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/iam/security-credentials/**"]
"#;

/// botocore's own instance-metadata credential fetcher, as every AWS SDK for Python uses it.
const BOTOCORE_FETCH: &str = r#"
import json
from botocore.utils import InstanceMetadataFetcher
creds = InstanceMetadataFetcher(timeout=2, num_attempts=1).retrieve_iam_role_credentials()
print(json.dumps({"role": creds.get("role_name"), "access_key": creds.get("access_key")}))
"#;

/// Runs [`BOTOCORE_FETCH`] in `cgroup`, with the SDK's metadata overrides cleared.
fn botocore_fetch(sandbox: &Sandbox, cgroup: &str) -> serde_json::Value {
    sandbox.python_json(cgroup, BOTOCORE_FETCH, |command| {
        command
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT");
    })
}

#[test]
fn botocore_fetches_credentials_through_the_filter_only_when_allowed() {
    if !imds_tests::sandbox::python_has("botocore", "botocore") {
        return;
    }
    let Some(sandbox) = Sandbox::new("botocore") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(true);
    let policies = sandbox.write_policies(&[("sdk.yaml", SDK_POLICY)]);
    let _agent = sandbox.start_agent("enforced", "agent", &[&policies], &[]);

    let fetch = |cgroup: &str| botocore_fetch(&sandbox, cgroup);
    let allowed = fetch("enforced/sdk-allowed");
    assert_eq!(allowed["role"], "demo-node-role", "{allowed}");
    assert!(
        allowed["access_key"]
            .as_str()
            .is_some_and(|k| k.starts_with(ACCESS_KEY_PREFIX)),
        "{allowed}"
    );

    let denied = fetch("enforced/sdk-denied");
    assert_eq!(denied["access_key"], serde_json::Value::Null, "{denied}");
}

/// Neither policy lets its workload have a session token; one requires tokens.
const FALLBACK_POLICIES: [(&str, &str); 2] = [
    (
        "legacy.yaml",
        r#"
name: legacy
callers: {cgroups: ["/legacy"]}
default: deny
rules:
  - name: credentials
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/iam/security-credentials/**"]
"#,
    ),
    (
        "v2-only.yaml",
        r#"
name: v2-only
callers: {cgroups: ["/v2-only"]}
tokens: {required: true}
default: deny
rules:
  - name: credentials
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/iam/security-credentials/**"]
"#,
    ),
];

#[test]
fn botocore_falls_back_to_imdsv1_only_where_the_policy_lets_it() {
    if !imds_tests::sandbox::python_has("botocore", "botocore") {
        return;
    }
    let Some(sandbox) = Sandbox::new("botocore-v1") else {
        return;
    };
    // An instance that still serves IMDSv1.
    let _imds = sandbox.start_fake_imds(false);
    let policies = sandbox.write_policies(&FALLBACK_POLICIES);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    let fetch = |cgroup: &str| botocore_fetch(&sandbox, cgroup);
    // The token request is denied (403): the SDK falls back to IMDSv1, which this
    // workload's policy allows.
    let legacy = fetch("enforced/legacy");
    assert!(
        legacy["access_key"]
            .as_str()
            .is_some_and(|k| k.starts_with(ACCESS_KEY_PREFIX)),
        "{legacy}\n{}",
        agent.log()
    );
    let audit = agent.audit();
    let seen = |cgroup: &str, method: &str, decision: &str| {
        audit.iter().any(|line| {
            line["cgroup"] == cgroup && line["method"] == method && line["decision"] == decision
        })
    };
    assert!(seen("/legacy", "PUT", "deny"), "{audit:#?}");
    assert!(seen("/legacy", "GET", "allow"), "{audit:#?}");
    // The same fallback where the workload's policy requires tokens: refused (401), although
    // the instance itself still serves IMDSv1.
    let v2_only = fetch("enforced/v2-only");
    assert_eq!(v2_only["access_key"], serde_json::Value::Null, "{v2_only}");
    let audit = agent.audit();
    assert!(
        audit.iter().any(|line| line["cgroup"] == "/v2-only"
            && line["method"] == "GET"
            && line["status"] == 401
            && line["rule"] == "tokens-required"),
        "{audit:#?}"
    );
}

#[test]
fn the_agent_in_audit_mode_serves_what_it_would_deny_and_says_so() {
    let Some(sandbox) = Sandbox::new("dry-run") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    // From the environment, as the Kubernetes settings pass it.
    let agent = sandbox.launch_agent_with_env(
        "enforced",
        "agent",
        &[&repo_policies()],
        &[],
        &[("IMDS_AGENT_MODE", "audit")],
    );
    let creds = sandbox.curl("enforced/web", None, &[&url(CREDENTIALS_PATH)]);
    assert_eq!(creds.status, 200, "{creds:?}\n{}", agent.log());
    assert!(creds.body.contains(ACCESS_KEY_PREFIX), "{creds:?}");
    // A caller no policy selects is served too, also on its next connect (no kernel refusal).
    for _ in 0..2 {
        let unmatched = sandbox.curl("enforced/nobody", None, &[&url(INSTANCE_ID_PATH)]);
        assert_eq!(unmatched.status, 200, "{unmatched:?}");
    }
    let audit = agent.audit();
    let reported: Vec<_> = audit
        .iter()
        .map(|l| {
            (
                l["decision"].as_str().unwrap_or(""),
                l["policy"].as_str().unwrap_or(""),
                l["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        reported,
        [
            ("would-deny", "web", 200),
            ("would-deny", "(none)", 200),
            ("would-deny", "(none)", 200)
        ],
        "{audit:#?}"
    );
}

#[test]
fn upstream_connections_are_reused_per_caller_and_never_across_callers() {
    let Some(sandbox) = Sandbox::new("upstream-pool") else {
        return;
    };
    let imds = sandbox.start_fake_imds(false);
    let policies = sandbox.write_policies(&[(
        "all.yaml",
        "name: all\ndefault: deny\nrules:\n  - name: connection\n    action: allow\n    methods: [GET]\n    paths: [/fake/connection]\n",
    )]);
    // One serving thread: each keeps the idle connections it opened, and a client connection
    // is served by whichever accepted it.
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &["--serve-threads", "1"]);
    // Which upstream connection (its client address, as the fake IMDS saw it) carried a
    // request from this caller; each curl is a new client connection, as SDKs make.
    let carried_by = |cgroup: &str, uid: Option<u32>| {
        let reply = sandbox.curl(cgroup, uid, &[&url(CONNECTION_PATH)]);
        assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
        // The client connection has ended: its upstream connection is idle again.
        std::thread::sleep(Duration::from_millis(100));
        reply.body
    };
    let first = carried_by("enforced/a", None);
    assert_eq!(
        carried_by("enforced/a", None),
        first,
        "one caller reuses its connection"
    );
    let other_cgroup = carried_by("enforced/b", None);
    let other_uid = carried_by("enforced/a", Some(1000));
    assert_ne!(other_cgroup, first, "never another cgroup's connection");
    assert_ne!(other_uid, first, "never another uid's connection");
    assert_ne!(other_uid, other_cgroup);
    assert_eq!(carried_by("enforced/a", None), first);
    // The metadata service restarts: idle connections to it are dead; the next request is
    // served on a new one, not answered 502.
    drop(imds);
    let _imds = sandbox.start_fake_imds(false);
    assert_ne!(carried_by("enforced/a", None), first);
}

#[test]
fn explain_mode_says_why_in_a_header_and_is_off_by_default() {
    // The response heads of denied requests for `paths`, from an agent run with `extra`.
    let heads_of = |extra: &[&str], paths: &[&str]| -> Option<Vec<String>> {
        let sandbox = Sandbox::new("explain")?;
        let _imds = sandbox.start_fake_imds(false);
        let _agent = sandbox.start_agent("enforced", "agent", &[&repo_policies()], extra);
        let heads = paths
            .iter()
            .map(|path| {
                let denied = sandbox.curl("enforced/web", None, &["-D", "-", &url(path)]);
                assert_eq!(denied.status, 403, "{denied:?}");
                denied.body
            })
            .collect();
        Some(heads)
    };
    let Some(plain) = heads_of(&[], &[CREDENTIALS_PATH]) else {
        return;
    };
    let plain = &plain[0];
    assert!(
        !plain.to_ascii_lowercase().contains("imds-agent-explain"),
        "{plain}"
    );
    let Some(explained) = heads_of(&["--explain-denials"], &[CREDENTIALS_PATH]) else {
        return;
    };
    let header_of = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("imds-agent-explain: "))
            .unwrap_or_else(|| panic!("no explanation: {head}"))
            .to_owned()
    };
    let header = header_of(&explained[0]);
    // The decision, and each other policy's reason for not selecting the caller.
    assert!(
        header.starts_with("decision: deny by policy 'web' rule 'default'"),
        "{header}"
    );
    assert!(
        header.contains("policy 'batch'") && header.contains("does not select this caller"),
        "{header}"
    );
}

#[test]
fn other_connections_run_no_program_at_their_tcp_events() {
    let Some(mut env) = start("no-sock-ops", false) else {
        return;
    };
    let sb = &env.sandbox;
    let Some(enforced) = attach_types(&sb.cgroup("enforced")) else {
        return;
    };
    // At connect() and socket() only: no sock_ops program, which the kernel would run at five
    // points of every TCP connection.
    assert_eq!(enforced, ENFORCED_ATTACH_TYPES, "{enforced:?}");
    // The agent finds its callers through a program on its own cgroup.
    assert_eq!(
        attach_types(&sb.cgroup("agent")).unwrap_or_default(),
        ["cgroup_inet4_getpeername"]
    );
    let allowed = sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(allowed.status, 200, "{allowed:?}");
    let audit = env.agent.audit();
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(
        (audit[0]["cgroup"].as_str(), audit[0]["comm"].as_str()),
        (Some("/web"), Some("curl"))
    );
    // Enforcement stays without the agent, and so does its program on the cgroup its
    // listening sockets were made in (a successor handed them, or systemd keeping them, needs
    // it there); removing the installation takes both away.
    env.agent.process.signal(libc::SIGKILL);
    env.agent.process.wait(Duration::from_secs(5));
    assert_eq!(
        attach_types(&sb.cgroup("agent")).unwrap_or_default(),
        ["cgroup_inet4_getpeername"]
    );
    assert_eq!(
        attach_types(&sb.cgroup("enforced")).unwrap_or_default(),
        enforced
    );
    assert!(imds_agent::loader::detach(&sb.pin_dir).expect("detach"));
    for cgroup in ["agent", "enforced"] {
        assert_eq!(
            attach_types(&sb.cgroup(cgroup)).unwrap_or_default(),
            Vec::<String>::new(),
            "{cgroup} after detach"
        );
    }
}

/// Audit lines in a file of their own (`--audit-log`), apart from the operational log, under
/// OpenTelemetry's names (`--audit-names otel`), and a log rotation: the file is moved away,
/// SIGHUP, and the next line starts a new file.
#[test]
fn audit_lines_go_to_their_own_file_and_follow_a_rotation() {
    let Some(sandbox) = Sandbox::new("audit-file") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let file = sandbox.work_dir.join("audit.jsonl");
    let agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&repo_policies()],
        &[
            "--audit-log",
            file.to_str().expect("UTF-8 path"),
            "--audit-names",
            "otel",
        ],
    );
    let lines = |path: &Path| -> Vec<serde_json::Value> {
        read_settled(path)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON audit line"))
            .collect()
    };
    let first = sandbox.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(first.status, 200, "{first:?}");
    let written = lines(&file);
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(
        (
            &written[0]["url.path"],
            &written[0]["http.response.status_code"],
            &written[0]["target"]
        ),
        (
            &serde_json::json!(INSTANCE_ID_PATH),
            &serde_json::json!(200),
            &serde_json::json!("imds_agent::audit")
        )
    );
    assert!(
        agent.audit().is_empty(),
        "audit lines left the operational log:\n{}",
        agent.log()
    );

    let rotated = sandbox.work_dir.join("audit.jsonl.1");
    std::fs::rename(&file, &rotated).expect("rotate");
    agent.process.signal(libc::SIGHUP);
    let reopened = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        file.exists()
    });
    assert!(
        reopened,
        "the audit file was not reopened:\n{}",
        agent.log()
    );
    let second = sandbox.curl("enforced/web", None, &[&url(CREDENTIALS_PATH)]);
    assert_eq!(second.status, 403, "{second:?}");
    assert_eq!(lines(&rotated).len(), 1);
    let after = lines(&file);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["imds_agent.decision"], "deny");
}

/// A serving thread's audit lines are written in one batch when it goes idle: a burst of
/// concurrent keep-alive requests still leaves exactly one whole JSON line per request, all
/// there once the agent has stopped.
#[test]
fn a_burst_of_concurrent_requests_leaves_one_whole_audit_line_each() {
    let Some(sandbox) = Sandbox::new("audit-burst") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let agent = unlimited_agent(&sandbox, &[]);
    const CLIENTS: usize = 8;
    const EACH: usize = 40;
    // Each curl sends its requests one after the other on one connection.
    for answers in concurrent_curls(&sandbox, CLIENTS, EACH, &[]) {
        assert_eq!(answers.len(), EACH, "{answers:?}");
        assert!(answers.iter().all(|a| a.starts_with("200 ")), "{answers:?}");
    }
    let log = stop(agent);
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("imds_agent::audit"))
        .collect();
    assert_eq!(lines.len(), CLIENTS * EACH, "{log}");
    for line in lines {
        let line: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(
            (line["path"].as_str(), line["status"].as_u64()),
            (Some(INSTANCE_ID_PATH), Some(200)),
            "{line}"
        );
    }
}

/// The agent with the repository's policies and no per-caller rate limit (bursts of
/// requests from one caller are the point), plus `extra` arguments.
fn unlimited_agent(sandbox: &Sandbox, extra: &[&str]) -> Agent {
    let mut args = vec!["--rate-per-caller", "1e9", "--burst-per-caller", "1e9"];
    args.extend_from_slice(extra);
    sandbox.start_agent("enforced", "agent", &[&repo_policies()], &args)
}

/// Stops the agent as its service manager would (SIGTERM), checks that it drained and
/// exited 0, and returns its log.
fn stop(mut agent: Agent) -> String {
    agent.process.signal(libc::SIGTERM);
    assert_eq!(
        agent.process.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.log()
    );
    agent.log()
}

/// `clients` curls at once from `enforced/web`, each asking for the instance id `each` times
/// (with `extra` arguments): each one's answers, "STATUS CONNECTIONS-OPENED" per request.
fn concurrent_curls(
    sandbox: &Sandbox,
    clients: usize,
    each: usize,
    extra: &[&str],
) -> Vec<Vec<String>> {
    // `-o` applies to one URL: one per URL.
    let target = url(INSTANCE_ID_PATH);
    let urls: Vec<&str> = (0..each)
        .flat_map(|_| ["-o", "/dev/null", target.as_str()])
        .collect();
    let running: Vec<_> = (0..clients)
        .map(|_| {
            sandbox
                .command("curl", "enforced/web")
                .args(["-s", "--noproxy", "*", "-m", "20"])
                .args(extra)
                .args(["-w", "%{http_code} %{num_connects}\\n"])
                .args(&urls)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn curl")
        })
        .collect();
    running
        .into_iter()
        .map(|client| {
            let output = client.wait_with_output().expect("curl");
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// `--serve-threads N`: N threads accept and serve connections, each on its own runtime; a
/// burst of new connections (as SDKs make, one per request) is answered whole, and the agent
/// drains and exits as with one.
#[test]
fn serving_threads_answer_a_burst_of_new_connections() {
    let Some(sandbox) = Sandbox::new("serve-threads") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let agent = unlimited_agent(&sandbox, &["--serve-threads", "3"]);
    let task_dir = format!("/proc/{}/task", agent.process.child.id());
    let serving = || -> Vec<String> {
        std::fs::read_dir(&task_dir)
            .expect("the agent's threads")
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("imds-serve-"))
            .collect()
    };
    // The threads start as the agent begins to serve, just after it says it is ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while serving().len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(serving().len(), 3, "{:?}", serving());
    const CLIENTS: usize = 6;
    const EACH: usize = 20;
    // `Connection: close`: a new connection for every request.
    for answers in concurrent_curls(&sandbox, CLIENTS, EACH, &["-H", "Connection: close"]) {
        assert_eq!(answers.len(), EACH, "{answers:?}");
        assert!(answers.iter().all(|a| a == "200 1"), "{answers:?}");
    }
    let answered = stop(agent)
        .lines()
        .filter(|line| line.contains("imds_agent::audit") && line.contains(INSTANCE_ID_PATH))
        .count();
    assert_eq!(answered, CLIENTS * EACH);
}

/// The kernel runs a cgroup's own connect programs before its parents', and programs of one
/// cgroup in the order they were attached; each sees the address the ones before it left.
/// Another installation of the agent plays the other program (as Azure's guest proxy agent
/// is one at the cgroup root): whichever runs first diverts, and the agent says which runs
/// first at start-up.
#[test]
fn another_program_at_connect_diverts_in_the_kernels_order_and_is_named() {
    let Some(sandbox) = Sandbox::new("neighbours") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let policies = sandbox.write_policies(&[("open.yaml", "name: open\ndefault: allow\n")]);
    let first = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    let enforced = format!("/{}/enforced", sandbox.name);
    let said = |agent: &Agent, level: &str| -> Vec<serde_json::Value> {
        agent
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| {
                l["level"] == level
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("another program runs at connect()"))
            })
            .collect()
    };

    // On the same cgroup, attached after the first: the first's program runs first and
    // diverts; the second never sees the connect, and says so at start-up.
    let mut second = sandbox.start_second_agent(
        "enforced",
        "agent2",
        &[&policies],
        &["--listen", "127.0.0.1:955"],
    );
    // A moment after start (a predecessor's replaced links may linger for a little while).
    let settled = |agent: &Agent, level: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while said(agent, level).len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        said(agent, level)
    };
    let warned = settled(&second, "ERROR");
    assert_eq!(warned.len(), 2, "connect4 and connect6: {}", second.log());
    assert_eq!(
        (&warned[0]["program"], &warned[0]["attached_at"]),
        (
            &serde_json::json!("imds_connect4"),
            &serde_json::json!(enforced)
        ),
        "{:?}",
        warned[0]
    );
    let served = sandbox.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!((first.audit().len(), second.audit().len()), (1, 0));

    // On a subtree below the first: the second's program runs first there and diverts; the
    // first's then sees the second's address and leaves it.
    second.process.signal(libc::SIGKILL);
    second.process.wait(Duration::from_secs(5));
    imds_agent::loader::detach(&sandbox.second_pin_dir()).expect("detach the second");
    let below = sandbox.start_second_agent(
        "enforced/web",
        "agent2",
        &[&policies],
        &["--listen", "127.0.0.1:955"],
    );
    let noted = settled(&below, "INFO");
    assert!(said(&below, "ERROR").is_empty(), "{}", below.log());
    assert_eq!(noted.len(), 2, "{}", below.log());
    assert_eq!(noted[0]["attached_at"], serde_json::json!(enforced));
    let served = sandbox.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!((first.audit().len(), below.audit().len()), (1, 1));
    // Elsewhere in the tree, the first's program alone.
    let batch = sandbox.curl("enforced/batch", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(batch.status, 200, "{batch:?}");
    assert_eq!((first.audit().len(), below.audit().len()), (2, 1));
}
