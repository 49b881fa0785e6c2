//! Policies written from what workloads did: the agent in audit mode watches a unit, a pod's
//! container and a plain cgroup, `imds-agent report --suggest-policy` writes their policies,
//! and an agent enforcing them serves the same requests and refuses anything else.

use std::{path::Path, time::Duration};

use imds_tests::sandbox::{Curl, Sandbox, binary};

const IMDS: &str = "http://169.254.169.254";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const POD: &str = "3c5d7e9f-1a2b-4c6d-8e0f-a1b2c3d4e5f6";
const CONTAINER: &str = "cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233aabbccdd";
const PODS: &str = r#"
pods:
  - uid: 3c5d7e9f-1a2b-4c6d-8e0f-a1b2c3d4e5f6
    namespace: payments
    name: api-7d9f8b6c5-x2x4q
    serviceAccount: api
    labels: {app: api, pod-template-hash: 7d9f8b6c5}
    containers:
      - name: app
        id: containerd://cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233aabbccdd
"#;

fn url(path: &str) -> String {
    format!("{IMDS}{path}")
}

fn pod_cgroup() -> String {
    let uid = POD.replace('-', "_");
    format!(
        "enforced/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{CONTAINER}.scope"
    )
}

/// What the three workloads do, each as its SDK would: `(status of every request)`.
fn workloads_do_their_jobs(sandbox: &Sandbox) -> Vec<(String, u16)> {
    let mut statuses = Vec::new();
    let mut record = |what: &str, reply: &Curl| statuses.push((what.to_owned(), reply.status));
    // The web server: a session token, then where it runs.
    let token = sandbox.curl(
        "enforced/web",
        None,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 300",
            &url("/latest/api/token"),
        ],
    );
    record("web token", &token);
    let header = format!("{TOKEN_HEADER}: {}", token.body);
    record(
        "web zone",
        &sandbox.curl(
            "enforced/web",
            None,
            &[
                "-H",
                &header,
                &url("/latest/meta-data/placement/availability-zone"),
            ],
        ),
    );
    // The batch unit: credentials, without a token (IMDSv1).
    record(
        "batch role",
        &sandbox.curl(
            "enforced/batch.service",
            None,
            &[&url(
                "/latest/meta-data/iam/security-credentials/demo-node-role",
            )],
        ),
    );
    // The pod's container: its instance id and a custom path.
    record(
        "pod instance id",
        &sandbox.curl(
            &pod_cgroup(),
            None,
            &[&url("/latest/meta-data/instance-id")],
        ),
    );
    statuses
}

#[test]
fn suggested_policies_allow_what_workloads_did_and_nothing_else() {
    let Some(sandbox) = Sandbox::new("suggest") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let pods = sandbox.work_dir.join("pods.yaml");
    std::fs::write(&pods, PODS).unwrap();
    let empty = sandbox.write_policies(&[]);
    let pods_arg = pods.to_str().unwrap();
    let mut audit = sandbox.start_agent(
        "enforced",
        "agent",
        &[&empty],
        &["--mode", "audit", "--pods", pods_arg, "--provider", "aws"],
    );
    let seen = workloads_do_their_jobs(&sandbox);
    assert!(seen.iter().all(|(_, status)| *status == 200), "{seen:?}");
    // The agent writes its state every second.
    std::thread::sleep(Duration::from_millis(1500));

    let report = |extra: &[&str]| {
        let output = std::process::Command::new(binary("imds-agent"))
            .arg("report")
            .arg("--state-dir")
            .arg(sandbox.work_dir.join("state"))
            .arg("--suggest-policy")
            .args(extra)
            .output()
            .expect("imds-agent report");
        assert!(output.status.success(), "{output:?}");
        (
            String::from_utf8(output.stdout).expect("utf-8"),
            String::from_utf8(output.stderr).expect("utf-8"),
        )
    };
    let (suggested, said) = report(&[]);
    assert_eq!(said.lines().count(), 3, "one policy per workload:\n{said}");
    // The replicas' label that names a revision is not selected on.
    assert!(!suggested.contains("pod-template-hash"), "{suggested}");
    let (resources, said) = report(&["--kubernetes"]);
    assert!(said.contains("left out (not a pod)"), "{said}");
    assert_eq!(
        resources.matches("kind: ImdsPolicy").count(),
        1,
        "{resources}"
    );

    // Enforced: the same jobs succeed, anything else is refused.
    audit.process.signal(libc::SIGTERM);
    audit.process.wait(Duration::from_secs(10));
    let dir = sandbox.work_dir.join("suggested");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("suggested.yaml"), &suggested).unwrap();
    let check = std::process::Command::new(binary("imds-agent"))
        .args(["policy", "check"])
        .arg(&dir)
        .output()
        .expect("policy check");
    assert!(check.status.success(), "{check:?}\n{suggested}");
    let enforcing = sandbox.start_agent(
        "enforced",
        "agent",
        &[Path::new(&dir)],
        &["--pods", pods_arg, "--provider", "aws"],
    );
    let again = workloads_do_their_jobs(&sandbox);
    assert!(
        again.iter().all(|(_, status)| *status == 200),
        "{again:?}\n{suggested}\n{}",
        enforcing.log()
    );
    let refused = |cgroup: &str, path: &str| sandbox.curl(cgroup, None, &[&url(path)]).status;
    assert_eq!(
        refused(
            "enforced/web",
            "/latest/meta-data/iam/security-credentials/demo-node-role"
        ),
        403
    );
    // The web server asked with session tokens only: they are required of it now.
    assert_eq!(
        refused(
            "enforced/web",
            "/latest/meta-data/placement/availability-zone"
        ),
        401
    );
    assert_eq!(refused("enforced/batch.service", "/latest/user-data"), 403);
    assert_eq!(
        refused(
            &pod_cgroup(),
            "/latest/meta-data/iam/security-credentials/demo-node-role"
        ),
        403
    );
    assert_eq!(
        refused("enforced/other", "/latest/meta-data/instance-id"),
        403
    );
}
