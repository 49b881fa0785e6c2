//! AWS session tokens (IMDSv2) per workload: a policy can require them where the instance
//! still serves IMDSv1 and cap their lifetime, and a token works only for the caller it was
//! handed out to. The fake IMDS runs with tokens optional, as many instances still do.

use imds_tests::{
    fake_imds::{INSTANCE_ID, TOKEN_HEADER, TTL_HEADER},
    sandbox::{Agent, Curl, Process, Sandbox},
};

const INSTANCE_ID_URL: &str = "http://169.254.169.254/latest/meta-data/instance-id";
const TOKEN_URL: &str = "http://169.254.169.254/latest/api/token";

const POLICIES: [(&str, &str); 2] = [
    (
        "strict.yaml",
        r#"
name: strict
callers: {cgroups: ["/strict"]}
tokens:
  required: true
  maxTtlSeconds: 300
default: deny
rules:
  - name: token
    action: allow
    methods: [PUT]
    groups: [token]
  - name: instance-id
    action: allow
    methods: [GET]
    paths: [/latest/meta-data/instance-id]
"#,
    ),
    (
        "lax.yaml",
        r#"
name: lax
callers: {cgroups: ["/lax", "/other"]}
default: deny
rules:
  - name: token
    action: allow
    methods: [PUT]
    groups: [token]
  - name: instance-id
    action: allow
    methods: [GET]
    paths: [/latest/meta-data/instance-id]
"#,
    ),
];

struct Env {
    agent: Agent,
    _imds: Process,
    sandbox: Sandbox,
}

fn start(label: &str, extra: &[&str]) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    let imds = sandbox.start_fake_imds(false);
    let policies = sandbox.write_policies(&POLICIES);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], extra);
    Some(Env {
        agent,
        _imds: imds,
        sandbox,
    })
}

impl Env {
    fn token(&self, cgroup: &str, uid: Option<u32>, ttl: &str) -> String {
        let reply = self.sandbox.curl(
            cgroup,
            uid,
            &[
                "-X",
                "PUT",
                "-H",
                &format!("{TTL_HEADER}: {ttl}"),
                TOKEN_URL,
            ],
        );
        assert_eq!(reply.status, 200, "{reply:?}\n{}", self.agent.log());
        reply.body
    }

    fn get(&self, cgroup: &str, uid: Option<u32>, token: Option<&str>) -> Curl {
        let header = token.map(|t| format!("{TOKEN_HEADER}: {t}"));
        let mut args = Vec::new();
        if let Some(header) = &header {
            args.extend(["-H", header.as_str()]);
        }
        args.push(INSTANCE_ID_URL);
        self.sandbox.curl(cgroup, uid, &args)
    }

    /// (decision, policy, rule) of the last audit line.
    fn last_decision(&self) -> (String, String, String) {
        let line = self.agent.audit().pop().expect("an audit line");
        let field = |name: &str| line[name].as_str().unwrap_or_default().to_owned();
        (field("decision"), field("policy"), field("rule"))
    }
}

fn decision(decision: &str, policy: &str, rule: &str) -> (String, String, String) {
    (decision.into(), policy.into(), rule.into())
}

#[test]
fn a_policy_can_require_session_tokens_where_the_instance_does_not() {
    let Some(env) = start("tokens-required", &[]) else {
        return;
    };
    // The instance serves IMDSv1: a caller whose policy says nothing about tokens gets it.
    let lax = env.get("enforced/lax", None, None);
    assert_eq!(
        (lax.status, lax.body.as_str()),
        (200, INSTANCE_ID),
        "{lax:?}"
    );

    // A caller whose policy requires tokens gets 401 without one, as on a v2-only instance,
    // and the metadata service is not asked.
    let tokenless = env.get("enforced/strict", None, None);
    assert_eq!(tokenless.status, 401, "{tokenless:?}");
    assert!(!tokenless.body.contains(INSTANCE_ID));
    assert_eq!(
        env.last_decision(),
        decision("deny", "strict", "tokens-required")
    );
    // With a token, as SDKs do after that 401: served.
    let token = env.token("enforced/strict", None, "21600");
    let with_token = env.get("enforced/strict", None, Some(&token));
    assert_eq!(
        (with_token.status, with_token.body.as_str()),
        (200, INSTANCE_ID),
        "{with_token:?}"
    );
}

#[test]
fn token_lifetimes_are_capped_per_policy() {
    let Some(env) = start("tokens-ttl", &[]) else {
        return;
    };
    // The response's TTL header is what SDKs schedule their refresh by.
    let granted = |cgroup: &str, ttl: &str| {
        let reply = env.sandbox.curl(
            cgroup,
            None,
            &[
                "-D",
                "-",
                "-X",
                "PUT",
                "-H",
                &format!("{TTL_HEADER}: {ttl}"),
                TOKEN_URL,
            ],
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        reply
            .body
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case(TTL_HEADER)
                    .then(|| value.trim().to_owned())
            })
            .expect("a TTL header")
    };
    assert_eq!(granted("enforced/strict", "21600"), "300");
    assert_eq!(granted("enforced/strict", "60"), "60");
    assert_eq!(granted("enforced/lax", "21600"), "21600");
}

#[test]
fn a_token_works_only_for_the_caller_it_was_issued_to() {
    let Some(env) = start("tokens-bound", &[]) else {
        return;
    };
    let token = env.token("enforced/lax", None, "600");
    assert_eq!(env.get("enforced/lax", None, Some(&token)).status, 200);

    // Stolen: another cgroup, or another user in the same cgroup.
    let other_cgroup = env.get("enforced/other", None, Some(&token));
    assert_eq!(other_cgroup.status, 401, "{other_cgroup:?}");
    assert!(!other_cgroup.body.contains(INSTANCE_ID));
    assert_eq!(
        env.last_decision(),
        decision("deny", "(token binding)", "token-of-another-caller")
    );
    assert_eq!(
        env.get("enforced/lax", Some(1000), Some(&token)).status,
        401
    );

    // A token the agent did not hand out: fetched by a process it does not govern.
    let outside = env
        .sandbox
        .curl(
            "outside",
            None,
            &["-X", "PUT", "-H", &format!("{TTL_HEADER}: 600"), TOKEN_URL],
        )
        .body;
    assert!(!outside.is_empty());
    assert_eq!(env.get("enforced/lax", None, Some(&outside)).status, 401);
    assert_eq!(
        env.last_decision(),
        decision("deny", "(token binding)", "token-not-issued-to-caller")
    );
    // The owner's own token still works.
    assert_eq!(env.get("enforced/lax", None, Some(&token)).status, 200);
}

#[test]
fn without_token_binding_any_token_passes_and_a_dry_run_reports_instead() {
    let Some(env) = start("tokens-unbound", &["--no-token-binding", "--mode", "audit"]) else {
        return;
    };
    let token = env.token("enforced/lax", None, "600");
    let stolen = env.get("enforced/other", None, Some(&token));
    assert_eq!((stolen.status, stolen.body.as_str()), (200, INSTANCE_ID));
    // In a dry run a missing token is reported, not refused.
    let tokenless = env.get("enforced/strict", None, None);
    assert_eq!(tokenless.status, 200, "{tokenless:?}");
    assert_eq!(
        env.last_decision(),
        decision("would-deny", "strict", "tokens-required")
    );
}

#[test]
fn the_report_names_the_workloads_still_on_imdsv1() {
    let Some(env) = start("report", &[]) else {
        return;
    };
    assert_eq!(env.get("enforced/lax", None, None).status, 200);
    let token = env.token("enforced/strict", None, "600");
    assert_eq!(env.get("enforced/strict", None, Some(&token)).status, 200);
    assert_eq!(env.get("enforced/strict", None, None).status, 401);
    // The agent writes its state every second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let report = |json: bool| {
        let mut command = std::process::Command::new(imds_tests::sandbox::binary("imds-agent"));
        command
            .arg("report")
            .arg("--state-dir")
            .arg(env.sandbox.work_dir.join("state"));
        if json {
            command.arg("--json");
        }
        let output = command.output().expect("imds-agent report");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).expect("utf-8")
    };
    let workloads: serde_json::Value = serde_json::from_str(&report(true)).expect("JSON");
    let find = |name: &str| {
        workloads
            .as_array()
            .and_then(|all| all.iter().find(|w| w["workload"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {workloads:#}"))
    };
    let lax = find("cgroup /lax");
    assert_eq!(
        (&lax["requests"], &lax["imdsv1"]),
        (&1.into(), &1.into()),
        "{lax}"
    );
    assert_eq!(lax["groups"]["instance-info"], 1, "{lax}");
    assert!(
        lax["executables"].as_array().is_some_and(|e| e
            .iter()
            .any(|x| x.as_str().is_some_and(|x| x.ends_with("/curl")))),
        "{lax}"
    );
    let strict = find("cgroup /strict");
    assert_eq!(
        (&strict["requests"], &strict["imdsv1"], &strict["denied"]),
        (&3.into(), &1.into(), &1.into()),
        "{strict}"
    );
    let table = report(false);
    assert!(
        table.contains(
            "still on IMDSv1 (requests without a session token): cgroup /strict, cgroup /lax"
        ) || table.contains(
            "still on IMDSv1 (requests without a session token): cgroup /lax, cgroup /strict"
        ),
        "{table}"
    );
}
