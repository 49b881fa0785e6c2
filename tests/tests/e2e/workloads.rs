//! Workload identity, policy language and live reload, end to end: fake pods in cgroups named
//! as kubelet names them, a systemd-style unit, policy edits while the agent runs.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use imds_tests::{
    fake_imds::{ACCESS_KEY_PREFIX, INSTANCE_ID},
    sandbox::{Agent, Process, Sandbox, binary},
};

const IMDS: &str = "http://169.254.169.254";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/demo-node-role";
const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";

const POD_A: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
const POD_B: &str = "6fa459ea-ee8a-3ca4-894e-db77e160355e";
const CONTAINER_A: &str = "aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233";
const CONTAINER_B: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn url(path: &str) -> String {
    format!("{IMDS}{path}")
}

/// The cgroup kubelet's systemd driver creates for a burstable pod's container.
fn pod_cgroup(pod_uid: &str, container: &str) -> String {
    let uid = pod_uid.replace('-', "_");
    format!(
        "enforced/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{container}.scope"
    )
}

const PODS: &str = r#"
pods:
  - uid: 1b4e28ba-2fa1-11d2-883f-0016d3cca427
    namespace: payments
    name: api-0
    serviceAccount: api
    labels: {app: api}
    containers:
      - name: app
        id: containerd://aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233
  - uid: 6fa459ea-ee8a-3ca4-894e-db77e160355e
    namespace: frontend
    name: web-0
    labels: {app: web}
    containers:
      - name: nginx
        id: containerd://0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0
"#;

const NAMESPACE_POLICIES: [(&str, &str); 3] = [
    (
        "10-payments.yaml",
        r#"
name: payments-api
callers:
  namespaces: [payments]
  serviceAccounts: [api]
default: deny
rules:
  - name: credentials
    action: allow
    methods: [GET, HEAD]
    groups: [credentials, instance-info]
"#,
    ),
    (
        "20-frontend.yaml",
        r#"
name: frontend
callers:
  namespaces: [frontend]
default: deny
rules:
  - name: instance-info-only
    action: allow
    methods: [GET, HEAD]
    groups: [instance-info]
"#,
    ),
    (
        "30-units.yaml",
        r#"
name: agents
callers:
  units: ["metrics-agent.service"]
default: deny
rules:
  - name: instance-id
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/instance-id"]
"#,
    ),
];

const METRICS: &str = "127.0.0.1:9754";

/// The agent's metrics, scraped from inside the sandbox.
fn scrape(sandbox: &Sandbox) -> String {
    let scrape = sandbox.curl("outside", None, &[&format!("http://{METRICS}/metrics")]);
    assert_eq!(scrape.status, 200, "{scrape:?}");
    scrape.body
}

struct Env {
    agent: Agent,
    policy_dir: PathBuf,
    _imds: Process,
    sandbox: Sandbox,
}

fn start(label: &str, policies: &[(&str, &str)]) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    let imds = sandbox.start_fake_imds(false);
    let policy_dir = sandbox.write_policies(policies);
    let pods = sandbox.work_dir.join("pods.yaml");
    std::fs::write(&pods, PODS).unwrap();
    let agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&policy_dir],
        &[
            "--pods",
            pods.to_str().unwrap(),
            "--metrics-listen",
            METRICS,
        ],
    );
    Some(Env {
        agent,
        policy_dir,
        _imds: imds,
        sandbox,
    })
}

/// Rewrites the `locked` policy to let its callers read what `web`'s may.
fn unlock(policy_dir: &std::path::Path) {
    std::fs::write(
        policy_dir.join("locked.yaml"),
        OPEN.replace("web", "locked"),
    )
    .unwrap();
}

/// Waits until the agent's log contains `needle` `count` times (reloads are polled).
fn wait_for_log(agent: &Agent, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if agent.log().matches(needle).count() >= count {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "agent log never showed {needle:?} x{count}:\n{}",
        agent.log()
    );
}

#[test]
fn pods_in_two_namespaces_get_what_their_namespace_policy_grants() {
    let Some(env) = start("pods", &NAMESPACE_POLICIES) else {
        return;
    };
    let sb = &env.sandbox;
    let pod_a = pod_cgroup(POD_A, CONTAINER_A);
    let pod_b = pod_cgroup(POD_B, CONTAINER_B);

    let creds_a = sb.curl(&pod_a, None, &[&url(CREDENTIALS)]);
    assert_eq!(creds_a.status, 200, "{creds_a:?}\n{}", env.agent.log());
    assert!(creds_a.body.contains(ACCESS_KEY_PREFIX));

    let creds_b = sb.curl(&pod_b, None, &[&url(CREDENTIALS)]);
    assert_eq!(creds_b.status, 403);
    assert_eq!(
        creds_b.body,
        "imds-agent: denied by policy 'frontend' rule 'default'\n"
    );
    assert_eq!(
        sb.curl(&pod_b, None, &[&url(INSTANCE_ID_PATH)]).body,
        INSTANCE_ID
    );

    // The listing shows pod B only what instance-info covers: no iam/, no local-ipv4.
    let listing = sb.curl(&pod_b, None, &[&url("/latest/meta-data/")]);
    assert_eq!(listing.status, 200);
    assert_eq!(
        listing.body,
        "ami-id\nhostname\ninstance-id\ninstance-type\nplacement/"
    );
    // Pod A may read credentials, so it sees iam/ and the role name.
    let roles = sb.curl(
        &pod_a,
        None,
        &[&url("/latest/meta-data/iam/security-credentials/")],
    );
    assert_eq!(roles.body, "demo-node-role");

    let metrics = scrape(sb);
    for line in [
        r#"imds_agent_requests_total{decision="allow",namespace="payments",group="credentials",code="200"} 2"#,
        r#"imds_agent_requests_total{decision="deny",namespace="frontend",group="credentials",code="403"} 1"#,
        r#"imds_agent_requests_total{decision="allow",namespace="frontend",group="instance-info",code="200"} 2"#,
        r#"imds_agent_denials_total{policy="frontend",rule="default"} 1"#,
        r#"imds_agent_kernel_connects_total{result="diverted"} 5"#,
        r#"imds_agent_request_duration_seconds_count 5"#,
        r#"# TYPE process_cpu_seconds counter"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}:\n{metrics}"
        );
    }
    // The build, and the process's own figures, under the names exporters give them.
    for prefix in [
        "imds_agent_build_info{version=\"0.1.0\",revision=\"",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
        "process_cpu_seconds_total ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(prefix)),
            "missing {prefix}:\n{metrics}"
        );
    }

    // Audit lines name the pod's cgroup; a child cgroup inside the container is the same pod.
    let nested = format!("{pod_a}/worker");
    assert_eq!(sb.curl(&nested, None, &[&url(CREDENTIALS)]).status, 200);
    let audit = env.agent.audit();
    assert!(
        audit.iter().any(|l| l["decision"] == "allow"
            && l["policy"] == "payments-api"
            && l["cgroup"].as_str().is_some_and(|c| c.ends_with("/worker"))),
        "{audit:#?}"
    );
}

#[test]
fn a_systemd_unit_is_selected_by_its_unit_name() {
    let Some(env) = start("unit", &NAMESPACE_POLICIES) else {
        return;
    };
    let unit = "enforced/system.slice/metrics-agent.service";
    let allowed = env.sandbox.curl(unit, None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!((allowed.status, allowed.body.as_str()), (200, INSTANCE_ID));
    let denied = env.sandbox.curl(unit, None, &[&url(CREDENTIALS)]);
    assert_eq!(
        denied.body,
        "imds-agent: denied by policy 'agents' rule 'default'\n"
    );
    let other_unit = env.sandbox.curl(
        "enforced/system.slice/sshd.service",
        None,
        &[&url(INSTANCE_ID_PATH)],
    );
    assert_eq!(
        other_unit.body,
        "imds-agent: denied by policy '(none)' rule 'unmatched'\n"
    );
    let line = env
        .agent
        .audit()
        .into_iter()
        .find(|l| l["decision"] == "allow")
        .expect("audit line");
    assert_eq!(line["unit"], "metrics-agent.service");
}

const OPEN: &str = r#"
name: web
callers: {cgroups: ["/web"]}
default: deny
rules:
  - name: instance-id
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/instance-id"]
"#;

const CLOSED: &str = r#"
name: web
callers: {cgroups: ["/web"]}
default: deny
rules:
  - name: locked-down
    action: deny
    methods: ["*"]
    paths: ["/**"]
"#;

#[test]
fn a_live_policy_change_flips_a_decision_without_restart_or_dropping_in_flight_requests() {
    let Some(mut env) = start("reload", &[("web.yaml", OPEN)]) else {
        return;
    };
    let sb = &env.sandbox;
    assert_eq!(
        sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)])
            .status,
        200
    );
    let pid = env.agent.process.child.id();

    // A request that is in flight while the policy changes.
    let slow = sb
        .command_as("curl", "enforced/web", None)
        .args([
            "-sS",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            "-H",
            "X-Fake-Delay-Ms: 1500",
            &url(INSTANCE_ID_PATH),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("slow curl");
    std::thread::sleep(Duration::from_millis(300));

    std::fs::write(env.policy_dir.join("web.yaml"), CLOSED).unwrap();
    wait_for_log(&env.agent, "policy reloaded", 1);
    let denied = sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        denied.body,
        "imds-agent: denied by policy 'web' rule 'locked-down'\n"
    );

    // The in-flight request was decided before the change and completes.
    let output = slow.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{INSTANCE_ID}\n200")
    );
    assert!(env.agent.is_running());
    assert_eq!(env.agent.process.child.id(), pid);

    // SIGHUP reloads too.
    std::fs::write(env.policy_dir.join("web.yaml"), OPEN).unwrap();
    env.agent.process.signal(libc::SIGHUP);
    wait_for_log(&env.agent, "policy reloaded", 2);
    assert_eq!(
        sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)])
            .status,
        200
    );
}

#[test]
fn a_broken_edit_leaves_enforcement_unchanged() {
    let Some(env) = start("broken-edit", &[("web.yaml", OPEN)]) else {
        return;
    };
    let file = env.policy_dir.join("web.yaml");
    std::fs::write(&file, OPEN.replace("action: allow", "action: alow")).unwrap();
    wait_for_log(&env.agent, "policy reload rejected", 1);
    let log = env.agent.log();
    assert!(
        log.contains(&format!(
            "{}:7:13: action: unknown variant `alow`",
            file.display()
        )),
        "{log}"
    );
    let metrics = scrape(&env.sandbox);
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"imds_agent_policy_reloads_total{result="rejected"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "imds_agent_policy_version 1"),
        "{metrics}"
    );
    // The previous policy is still in force: allowed stays allowed, denied stays denied.
    assert_eq!(
        env.sandbox
            .curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)])
            .status,
        200
    );
    assert_eq!(
        env.sandbox
            .curl("enforced/web", None, &[&url(CREDENTIALS)])
            .status,
        403
    );
    assert_eq!(
        env.sandbox
            .curl("enforced/stray", None, &[&url(INSTANCE_ID_PATH)])
            .status,
        403
    );
}

#[test]
fn audit_mode_allows_and_logs_would_deny() {
    let trial = r#"
name: trial
mode: audit
callers: {cgroups: ["/web"]}
default: deny
rules:
  - name: instance-id
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/instance-id"]
"#;
    let Some(env) = start("audit", &[("trial.yaml", trial)]) else {
        return;
    };
    let creds = env.sandbox.curl("enforced/web", None, &[&url(CREDENTIALS)]);
    assert_eq!(creds.status, 200, "audit mode must not deny: {creds:?}");
    assert!(creds.body.contains(ACCESS_KEY_PREFIX));
    let line = env
        .agent
        .audit()
        .into_iter()
        .find(|l| l["path"] == CREDENTIALS)
        .expect("audit line");
    assert_eq!(line["decision"], "would-deny");
    assert_eq!(
        (line["policy"].as_str(), line["rule"].as_str()),
        (Some("trial"), Some("default"))
    );
    assert_eq!(line["status"], 200);
}

#[test]
fn policy_explain_describes_a_pod_by_name() {
    let root = std::env::temp_dir().join(format!("imds-explain-{}", std::process::id()));
    let dir = root.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in NAMESPACE_POLICIES {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let pods = root.join("pods.yaml");
    std::fs::write(&pods, PODS).unwrap();
    let output = std::process::Command::new(binary("imds-agent"))
        .args(["policy", "explain", "--policy"])
        .arg(&dir)
        .arg("--pods")
        .arg(&pods)
        .args(["--pod", "frontend/web-0/nginx", "GET", CREDENTIALS])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with(", pod frontend/web-0"), "{text}");
    assert_eq!(
        lines[1],
        "decision: deny by policy 'frontend' rule 'default'"
    );
    assert!(
        lines[2].ends_with("does not select this caller (namespaces do not match)"),
        "{text}"
    );
    assert!(
        lines[3].ends_with("selects this caller; deny by rule 'default'"),
        "{text}"
    );
    assert!(
        lines[4].ends_with("does not select this caller (units do not match)"),
        "{text}"
    );
}

const LOCKED: &str = r#"
name: locked
callers: {cgroups: ["/locked"]}
default: deny
"#;

fn kernel_counter(sandbox: &Sandbox, name: &str) -> u64 {
    let needle = format!("imds_agent_kernel_connects_total{{result=\"{name}\"}} ");
    scrape(sandbox)
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} counter"))
}

#[test]
fn callers_that_may_read_nothing_are_refused_in_the_kernel_until_the_policy_changes() {
    let Some(env) = start("verdicts", &[("locked.yaml", LOCKED), ("web.yaml", OPEN)]) else {
        return;
    };
    let sb = &env.sandbox;
    // The first request reaches the agent, so the caller learns which policy denies it.
    let first = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        first.body,
        "imds-agent: denied by policy 'locked' rule 'default'\n"
    );
    // Then the kernel refuses the connect itself.
    let refused_before = kernel_counter(sb, "refused");
    let second = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!((second.status, second.exit), (0, 7), "{second:?}");
    assert_eq!(kernel_counter(sb, "refused"), refused_before + 1);
    let audit = env.agent.audit();
    let locked: Vec<_> = audit.iter().filter(|l| l["cgroup"] == "/locked").collect();
    assert_eq!(locked.len(), 1);
    // The kernel program says why it refused, in the agent's log (its own diagnostics).
    wait_for_log(&env.agent, "refused by the agent's verdict", 1);
    let kernel_says: Vec<String> = env
        .agent
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["target"] == "imds_agent::kernel")
        .map(|v| v["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    let expected = format!(
        "refused by the agent's verdict: cgroup {} uid ",
        locked[0]["cgroup_id"]
    );
    assert!(
        kernel_says.iter().any(|m| m.starts_with(&expected)),
        "{expected:?} in {kernel_says:?}"
    );
    // Callers with something to read are still served by the agent.
    assert_eq!(
        sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)])
            .status,
        200
    );

    // The verdict goes with the policy that made it.
    unlock(&env.policy_dir);
    wait_for_log(&env.agent, "policy reloaded", 1);
    let after = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        (after.status, after.body.as_str()),
        (200, INSTANCE_ID),
        "{after:?}"
    );
}

#[test]
fn unmatched_bypass_leaves_unselected_callers_undiverted() {
    let Some(sandbox) = Sandbox::new("bypass") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let policy_dir = sandbox.write_policies(&[("web.yaml", OPEN)]);
    let agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&policy_dir],
        &["--unmatched", "bypass", "--metrics-listen", METRICS],
    );
    for _ in 0..3 {
        let stray = sandbox.curl("enforced/stray", None, &[&url(CREDENTIALS)]);
        assert_eq!(stray.status, 200, "{stray:?}");
    }
    // Seen once by the agent, then straight to the service.
    assert_eq!(
        agent
            .audit()
            .iter()
            .filter(|l| l["cgroup"] == "/stray")
            .count(),
        1
    );
    assert_eq!(kernel_counter(&sandbox, "bypassed"), 2);
    // Selected callers are still filtered.
    assert_eq!(
        sandbox
            .curl("enforced/web", None, &[&url(CREDENTIALS)])
            .status,
        403
    );
}

const CURL_ONLY: &str = r#"
name: curl-only
callers: {executables: ["/usr/bin/curl"]}
default: deny
rules:
  - name: instance-id
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/instance-id"]
"#;

#[test]
fn executables_select_by_the_calling_program() {
    let Some(env) = start("exe", &[("exe.yaml", CURL_ONLY)]) else {
        return;
    };
    let curl = env
        .sandbox
        .curl("enforced/app", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        (curl.status, curl.body.as_str()),
        (200, INSTANCE_ID),
        "{curl:?}"
    );
    // The same cgroup and uid, another program: bash's /dev/tcp.
    let script = format!(
        "exec 3<>/dev/tcp/169.254.169.254/80; printf 'GET {INSTANCE_ID_PATH} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; cat <&3"
    );
    let output = env
        .sandbox
        .command("/bin/bash", "enforced/app")
        .args(["-c", &script])
        .output()
        .unwrap();
    let response = String::from_utf8_lossy(&output.stdout);
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(
        response.contains("denied by policy '(none)' rule 'unmatched'"),
        "{response}"
    );
    let line = env
        .agent
        .audit()
        .into_iter()
        .find(|l| l["status"] == 403)
        .expect("audit line");
    assert_eq!(line["comm"], "bash");
}

/// The agent reads a process's executable and name once per program it runs (the kernel
/// names the program image at connect()): an exec() in the same pid is a new program, a
/// rename is not.
#[test]
fn a_process_that_execs_another_program_is_attributed_to_the_new_one() {
    let Some(env) = start("exec", &[("exe.yaml", CURL_ONLY)]) else {
        return;
    };
    let target = url(INSTANCE_ID_PATH);
    let script = format!(
        r#"
import ctypes, os, urllib.error, urllib.request
def get():
    try:
        return urllib.request.urlopen("{target}", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
print(get(), flush=True)
ctypes.CDLL(None).prctl(15, b"renamed", 0, 0, 0)  # PR_SET_NAME
print(get(), flush=True)
os.execv("/usr/bin/curl", ["curl", "-s", "-o", "/dev/null", "-w", "%{{http_code}}", "{target}"])
"#
    );
    let output = env
        .sandbox
        .command("python3", "enforced/app")
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.split_whitespace().collect::<Vec<_>>(),
        ["403", "403", "200"],
        "python3 is not curl; after exec() it is: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<_> = env
        .agent
        .audit()
        .into_iter()
        .filter(|l| l["cgroup"] == "/app")
        .collect();
    let seen: Vec<_> = lines
        .iter()
        .map(|l| (l["status"].as_u64(), l["comm"].as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some(403), Some("python3")),
            // Named as when its program first connected: the name is informational and a
            // process can rename itself at will; reading it costs /proc reads per connection.
            (Some(403), Some("python3")),
            (Some(200), Some("curl")),
        ]
    );
    assert!(
        lines.iter().all(|l| l["pid"] == lines[0]["pid"]),
        "one process throughout: {lines:?}"
    );
}

#[test]
fn a_restarted_agent_does_not_inherit_the_previous_policys_kernel_verdicts() {
    let Some(mut env) = start("stale-verdicts", &[("locked.yaml", LOCKED)]) else {
        return;
    };
    let sb = &env.sandbox;
    sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    let refused = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        refused.exit, 7,
        "the kernel verdict is in place: {refused:?}"
    );
    // The agent dies; the policy changes while it is down; a new agent starts on the pins.
    env.agent.process.signal(libc::SIGKILL);
    env.agent.process.wait(Duration::from_secs(5));
    unlock(&env.policy_dir);
    let _agent = sb.start_agent("enforced", "agent", &[&env.policy_dir], &[]);
    let served = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        (served.status, served.body.as_str()),
        (200, INSTANCE_ID),
        "{served:?}"
    );
}

#[test]
fn an_upgraded_agent_keeps_the_kernel_verdicts_its_policy_still_makes() {
    let Some(mut env) = start(
        "kept-verdicts",
        &[("locked.yaml", LOCKED), ("web.yaml", OPEN)],
    ) else {
        return;
    };
    let sb = &env.sandbox;
    sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    let refused = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        refused.exit, 7,
        "the kernel verdict is in place: {refused:?}"
    );

    // A successor with the same policies takes over (an upgrade): the caller stays refused
    // by the kernel, without ever reaching the new agent.
    let pods = sb.work_dir.join("pods.yaml");
    let successor = sb.start_agent(
        "enforced",
        "agent",
        &[&env.policy_dir],
        &[
            "--pods",
            pods.to_str().unwrap(),
            "--metrics-listen",
            METRICS,
        ],
    );
    let exit = env.agent.process.wait(Duration::from_secs(20));
    assert_eq!(exit, Some(0), "the predecessor hands over and exits");
    let refused_before = kernel_counter(sb, "refused");
    let still = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!((still.status, still.exit), (0, 7), "{still:?}");
    assert_eq!(kernel_counter(sb, "refused"), refused_before + 1);
    assert!(
        successor.audit().iter().all(|l| l["cgroup"] != "/locked"),
        "the successor decided a caller its policy leaves to the kernel"
    );
    assert_eq!(
        sb.curl("enforced/web", None, &[&url(INSTANCE_ID_PATH)])
            .status,
        200
    );

    // A successor whose policy no longer refuses the caller removes the verdict.
    unlock(&env.policy_dir);
    let mut successor = successor;
    let _third = sb.start_agent(
        "enforced",
        "agent",
        &[&env.policy_dir],
        &[
            "--pods",
            pods.to_str().unwrap(),
            "--metrics-listen",
            METRICS,
        ],
    );
    assert_eq!(successor.process.wait(Duration::from_secs(20)), Some(0));
    let served = sb.curl("enforced/locked", None, &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(
        (served.status, served.body.as_str()),
        (200, INSTANCE_ID),
        "{served:?}"
    );
}

/// A GET of the instance id over a plain socket, as a Python program run under another name;
/// prints the status line.
const PYTHON_GET: &str = "import socket; s = socket.create_connection(('169.254.169.254', 80)); \
    s.sendall(b'GET /latest/meta-data/instance-id HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'); \
    print(s.recv(4096).decode().split('\\r\\n')[0])";

/// Runs Python as `/usr/bin/curl`: in a private user and mount namespace (what any
/// unprivileged user may make), the Python interpreter bind-mounted over /usr/bin/curl, so
/// that /proc/<pid>/exe reads `/usr/bin/curl`. Returns the status line it got.
fn python_posing_as_curl(sandbox: &Sandbox, cgroup: &str) -> String {
    let python = std::fs::canonicalize("/usr/bin/python3").expect("/usr/bin/python3");
    let script = format!(
        "mount --bind {} /usr/bin/curl && exec /usr/bin/curl -c \"{PYTHON_GET}\"",
        python.display()
    );
    let output = sandbox
        .command_as("unshare", cgroup, Some(1000))
        .args(["--map-root-user", "--mount", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The executable of the audit lines with this status, and what was checked of it.
fn audited_executables(agent: &Agent, status: u64) -> Vec<(String, String)> {
    agent
        .audit()
        .into_iter()
        .filter(|l| l["status"] == status)
        .map(|l| {
            (
                l["exe"].as_str().unwrap_or_default().to_owned(),
                l["exe_check"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Another program bind-mounted over the allowed path reads as that path in /proc/<pid>/exe;
/// it is not the node's file there, so the selector does not match it. The real one does.
#[test]
fn another_program_mounted_over_the_allowed_path_is_not_that_program() {
    let Some(env) = start("exe-mount", &[("exe.yaml", CURL_ONLY)]) else {
        return;
    };
    let curl = env
        .sandbox
        .curl("enforced/app", Some(1000), &[&url(INSTANCE_ID_PATH)]);
    assert_eq!(curl.status, 200, "{curl:?}");
    let posing = python_posing_as_curl(&env.sandbox, "enforced/app");
    assert!(posing.starts_with("HTTP/1.1 403"), "{posing}");
    assert_eq!(
        audited_executables(&env.agent, 200),
        [("/usr/bin/curl".to_owned(), "node-file".to_owned())]
    );
    assert_eq!(
        audited_executables(&env.agent, 403),
        [("/usr/bin/curl".to_owned(), "not-the-node-file".to_owned())],
        "the audit says why"
    );
}

/// A selector that pins the program's content: the real curl is allowed on the host and in a
/// container (where a path alone names the container's own file); another file at that
/// path is not, in either.
#[test]
fn a_pinned_digest_names_the_program_whatever_its_path() {
    let content = std::fs::read("/usr/bin/curl").expect("/usr/bin/curl");
    let digest: String = sha256_hex(&content);
    let policy = CURL_ONLY.replace(
        "[\"/usr/bin/curl\"]",
        &format!("[\"/usr/bin/curl@sha256:{digest}\"]"),
    );
    let Some(env) = start("exe-digest", &[("exe.yaml", &policy)]) else {
        return;
    };
    let container = pod_cgroup(POD_A, CONTAINER_A);
    for cgroup in ["enforced/app", container.as_str()] {
        let curl = env
            .sandbox
            .curl(cgroup, Some(1000), &[&url(INSTANCE_ID_PATH)]);
        assert_eq!(curl.status, 200, "{cgroup}: {curl:?}");
        let posing = python_posing_as_curl(&env.sandbox, cgroup);
        assert!(posing.starts_with("HTTP/1.1 403"), "{cgroup}: {posing}");
    }
    let checks: Vec<String> = audited_executables(&env.agent, 403)
        .into_iter()
        .map(|(_, check)| check)
        .collect();
    assert_eq!(checks, ["not-the-node-file", "container"]);
}

/// sha256 as `sha256sum` prints it.
fn sha256_hex(content: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), content).expect("write");
    let output = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}
