//! The agent's command line as a user runs it (no privileges needed).

use std::{path::Path, process::Command};

use imds_tests::sandbox::binary;

fn agent(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary("imds-agent"))
        .args(args)
        .output()
        .expect("run imds-agent");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn policy_check_accepts_the_example_policies() {
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let (code, stdout, stderr) = agent(&["policy", "check", policies.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("10-web.yaml: ok: policy 'web', 2 rules"),
        "{stdout}"
    );
    assert!(
        stdout.contains("20-batch.yaml: ok: policy 'batch', 3 rules"),
        "{stdout}"
    );
}

#[test]
fn policy_check_reports_every_error_with_its_location_and_exits_64() {
    let dir = std::env::temp_dir().join(format!("imds-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "name: x\ndefault: maybe\n").unwrap();
    let worse = dir.join("worse.yaml");
    std::fs::write(&worse, "name: y\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GET]\n    paths: [\"/a/../b\"]\n").unwrap();
    let (code, _, stderr) = agent(&[
        "policy",
        "check",
        bad.to_str().unwrap(),
        worse.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 64);
    assert!(
        stderr.contains("bad.yaml:2:10: default: unknown variant `maybe`"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "worse.yaml:7:13: rules[0].paths[0]: \"/a/../b\": '.' and '..' segments are not allowed"
        ),
        "{stderr}"
    );
}

#[test]
fn policy_check_warns_where_credentials_hang_on_an_executable_alone() {
    let dir = std::env::temp_dir().join(format!("imds-cli-exe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("aws.yaml");
    std::fs::write(
        &file,
        "name: aws-cli\ncallers: {executables: [\"/usr/bin/aws\"]}\ndefault: deny\nrules:\n  - {name: creds, action: allow, methods: [GET], groups: [credentials]}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = agent(&["policy", "check", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "a warning, not an error: {stderr}");
    assert!(stdout.contains("ok: policy 'aws-cli'"), "{stdout}");
    assert!(
        stderr.contains("aws.yaml: warning: policy 'aws-cli' rule 'creds' grants credentials by executable alone"),
        "{stderr}"
    );
}

#[test]
fn policy_check_takes_several_policies_in_one_file_and_suggests_near_misses() {
    let dir = std::env::temp_dir().join(format!("imds-cli-multi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("several.yaml");
    std::fs::write(
        &file,
        "name: web\ndefault: deny\n---\nname: batch\ndefault: deny\nrules:\n  - {name: r, action: allow, methods: [GET], groups: [instance-info]}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = agent(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("several.yaml: ok: policy 'web', 0 rules")
            && stdout.contains("several.yaml: ok: policy 'batch', 1 rules"),
        "{stdout}"
    );
    std::fs::write(&file, "name: web\ndefault: deny\n---\nname: batch\ndefault: deny\nrules:\n  - {name: r, action: allow, methods: [GET], groups: [instance-infos]}\n").unwrap();
    let (code, _, stderr) = agent(&["policy", "check", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 64);
    assert!(
        stderr.contains("several.yaml:7:") && stderr.contains("did you mean \"instance-info\"?"),
        "{stderr}"
    );
}

#[test]
fn a_missing_policy_file_is_named() {
    let (code, _, stderr) = agent(&["policy", "check", "/nonexistent/p.yaml"]);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("/nonexistent/p.yaml: No such file"),
        "{stderr}"
    );
}

#[test]
fn text_logs_have_no_colours_when_not_on_a_terminal() {
    let dir = std::env::temp_dir().join(format!("imds-cli-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Fails on the cgroup after logging the empty-policy warning: nothing is attached.
    let (code, _, stderr) = agent(&[
        "--log-format",
        "text",
        "run",
        "--policy",
        dir.to_str().unwrap(),
        "--cgroup",
        "/nonexistent",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("no policy files"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escape in logs: {stderr:?}"
    );
}

#[test]
fn policy_test_passes_the_example_cases() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/tests/cases.yaml");
    let (code, stdout, stderr) = agent(&["policy", "test", cases.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.ends_with("7 passed, 0 failed\n"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("PASS ")
            && l.ends_with(
                "cases.yaml:28:11: the payments app container gets credentials: GET \
                 /latest/meta-data/iam/security-credentials/node-role -> allow (policy \
                 'payments-api' rule 'app-reads-credentials')"
            )),
        "{stdout}"
    );
}

#[test]
fn policy_test_says_which_case_failed_and_why_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("imds-cases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let cases = dir.join("cases.yaml");
    // The example policies against whatever the case file holds at the time.
    let test_cases = || {
        agent(&[
            "policy",
            "test",
            "--policy",
            policies.to_str().unwrap(),
            cases.to_str().unwrap(),
        ])
    };
    std::fs::write(
        &cases,
        "cases:\n\
         \x20 - name: web gets credentials\n\
         \x20   caller: {cgroup: /web/app.service, uid: 33}\n\
         \x20   request: GET /latest/meta-data/iam/security-credentials/role\n\
         \x20   expect: allow\n\
         \x20 - name: web reads its instance id\n\
         \x20   caller: {cgroup: /web/app.service, uid: 33}\n\
         \x20   request: get /latest/meta-data/instance-id\n\
         \x20   expect: 200\n\
         \x20   rule: imdsv2-token\n",
    )
    .unwrap();
    let (code, stdout, stderr) = test_cases();
    assert_eq!(code, 1, "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("FAIL ")
            && lines[0].ends_with(
                "cases.yaml:2:11: web gets credentials: GET \
                 /latest/meta-data/iam/security-credentials/role -> deny (policy 'web' rule \
                 'default'); expected allow"
            ),
        "{stdout}"
    );
    // Why, as `policy explain` says it.
    assert!(
        lines[1].trim_start() == "decision: deny by policy 'web' rule 'default'",
        "{stdout}"
    );
    // The method is taken in any case; the decision is right but not its rule.
    assert!(
        stdout.contains(
            "web reads its instance id: GET /latest/meta-data/instance-id -> allow (policy 'web' \
             rule 'instance-info'); expected rule 'imdsv2-token'"
        ),
        "{stdout}"
    );
    assert!(stdout.ends_with("0 passed, 2 failed\n"), "{stdout}");

    // A case file that cannot be used: every problem with where it is, no case run.
    std::fs::write(dir.join("pods.yaml"), "pods: []\n").unwrap();
    std::fs::write(
        &cases,
        "pods: pods.yaml\ncases:\n\
         \x20 - name: a\n\
         \x20   caller: {pod: payments/api-9}\n\
         \x20   request: GET /latest/meta-data/\n\
         \x20   expect: allow\n\
         \x20 - name: b\n\
         \x20   caller: {cgroup: /web, uid: 1}\n\
         \x20   request: /latest/meta-data/\n\
         \x20   expect: allow\n",
    )
    .unwrap();
    let (code, stdout, stderr) = test_cases();
    assert_eq!((code, stdout.as_str()), (64, ""), "{stderr}");
    assert!(
        stderr.contains(
            "cases.yaml:4:13: caller: pod \"payments/api-9\": not in the pod metadata given"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("cases.yaml:9:14: request: \"/latest/meta-data/\": expected METHOD PATH"),
        "{stderr}"
    );
    std::fs::write(
        &cases,
        "cases:\n  - name: a\n    caller: {cgroup: /web}\n    request: GET /\n    expct: allow\n",
    )
    .unwrap();
    let (code, _, stderr) = test_cases();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 64);
    assert!(
        stderr.contains("cases.yaml:5:5: expct: unknown field `expct`")
            && stderr.contains("did you mean \"expect\"?"),
        "{stderr}"
    );
}

#[test]
fn policy_explain_shows_the_view_and_the_keys_a_caller_gets() {
    let dir = std::env::temp_dir().join(format!("imds-cli-view-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("app.yaml");
    std::fs::write(
        &policy,
        "name: app\ndefault: deny\nrules:\n  - name: config\n    action: allow\n    methods: [GET]\n    \
         groups: [user-data]\n    view: {keys: [PORT, DB_HOST]}\n  - name: instance\n    \
         action: allow\n    methods: [GET]\n    groups: [instance-info]\n",
    )
    .unwrap();
    let explain = |path: &str| {
        let (code, stdout, stderr) = agent(&[
            "policy",
            "explain",
            "--policy",
            policy.to_str().unwrap(),
            "--cgroup",
            "/app",
            "GET",
            path,
        ]);
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    let user_data = explain("/latest/user-data");
    let instance = explain("/metadata/instance");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        user_data.contains("decision: allow by policy 'app' rule 'config'")
            && user_data.contains("view: keys PORT, DB_HOST")
            && user_data
                .contains("the caller gets these keys of the answer, where present: PORT, DB_HOST"),
        "{user_data}"
    );
    assert!(
        instance.contains("rule 'instance'")
            && instance.contains("view: without /metadata/instance/compute/userData"),
        "{instance}"
    );
}
