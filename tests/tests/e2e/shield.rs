//! The shield: what the metadata service is asked, not only what callers get. Fixed answers
//! and credentials come from memory (never to a caller the policy denies, never past their
//! time), dynamic ones always from the service, identical reads in flight share one request,
//! and a burst stays within Azure's documented limit without a client seeing a 429.

use std::{path::Path, time::Duration};

use imds_tests::{
    fake_imds::{ACCESS_KEY_PREFIX, TTL_HEADER, clouds::GCP_TOKEN_PREFIX},
    sandbox::{Curl, Sandbox, curl_result},
};

/// Requests the fake metadata service received for `path`, from its request log.
fn received(log: &Path, path: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.split(' ').nth(1) == Some(path))
        .count()
}

const AWS_POLICY: &str = r#"
name: app
callers: {cgroups: ["/app", "/web"]}
default: deny
rules:
  - name: token
    action: allow
    methods: [PUT]
    groups: [token]
  - name: reads
    action: allow
    methods: [GET]
    groups: [instance-info, network]
  - name: credentials
    action: allow
    methods: [GET]
    groups: [credentials]
    callers: {cgroups: ["/app"]}
"#;

const ROLE: &str = "/latest/meta-data/iam/security-credentials/demo-node-role";

const GCP_TOKEN: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// GCP's access tokens carry a relative `expires_in`: one kept in memory is served with it
/// counting down (no caller may believe a token lives longer than it does), only to callers
/// the policy allows it to.
#[test]
fn access_tokens_come_from_memory_counting_down() {
    let Some(sandbox) = Sandbox::new("shield-gcp") else {
        return;
    };
    let log = sandbox.work_dir.join("requests.log");
    let _imds = sandbox.spawn_fake_imds(
        &["--provider", "gcp", "--request-log", log.to_str().unwrap()],
        &[],
    );
    let policies = sandbox.write_policies(&[(
        "app.yaml",
        "name: app\ncallers: {cgroups: [\"/app\", \"/web\"]}\ndefault: deny\nrules:\n  \
         - name: tokens\n    action: allow\n    methods: [GET]\n    groups: [credentials]\n    \
         callers: {cgroups: [\"/app\"]}\n",
    )]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &["--provider", "gcp"]);
    let url = format!("http://169.254.169.254{GCP_TOKEN}");
    let read = |cgroup: &str| -> Curl {
        sandbox.curl(cgroup, None, &["-H", "Metadata-Flavor: Google", &url])
    };
    let token = |answer: &Curl| -> (String, u64) {
        assert_eq!(answer.status, 200, "{answer:?}");
        let document: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
        (
            document["access_token"]
                .as_str()
                .expect("a token")
                .to_owned(),
            document["expires_in"]
                .as_u64()
                .expect("a number, as GCP gives it"),
        )
    };
    let (first, first_expires_in) = token(&read("enforced/app"));
    assert!(first.starts_with(GCP_TOKEN_PREFIX), "{first}");
    std::thread::sleep(Duration::from_millis(2100));
    let (again, expires_in) = token(&read("enforced/app"));
    assert_eq!(again, first, "the same token, from memory");
    assert!(
        expires_in + 2 <= first_expires_in && expires_in + 4 >= first_expires_in,
        "expires_in counts down with the time it was kept: {first_expires_in} then {expires_in}"
    );
    // A caller the policy denies the token gets 403, from memory or not.
    assert_eq!(read("enforced/web").status, 403);
    assert_eq!(received(&log, GCP_TOKEN), 1, "the service was asked once");
    let notes: Vec<String> = agent
        .audit()
        .iter()
        .filter(|line| line["path"] == GCP_TOKEN && line["status"] == 200)
        .map(|line| line["detail"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(notes, ["", "cache: hit"]);
}

#[test]
fn fixed_answers_and_credentials_come_from_memory_and_dynamic_ones_never() {
    let Some(sandbox) = Sandbox::new("shield-aws") else {
        return;
    };
    let log = sandbox.work_dir.join("requests.log");
    // Credentials valid for 20 minutes and 3 seconds: kept for about 3 seconds.
    let _imds = sandbox.spawn_fake_imds(
        &[
            "--request-log",
            log.to_str().unwrap(),
            "--credential-lifetime-seconds",
            "1203",
        ],
        &[],
    );
    let policies = sandbox.write_policies(&[("app.yaml", AWS_POLICY)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &["--provider", "aws"]);
    let ttl = format!("{TTL_HEADER}: 300");
    let token = |cgroup: &str| -> String {
        let token = sandbox.curl(
            cgroup,
            None,
            &[
                "-X",
                "PUT",
                "-H",
                &ttl,
                "http://169.254.169.254/latest/api/token",
            ],
        );
        assert_eq!(token.status, 200, "{token:?}");
        format!("x-aws-ec2-metadata-token: {}", token.body)
    };
    let app_token = token("enforced/app");
    let get = |cgroup: &str, token: Option<&str>, path: &str| -> Curl {
        let url = format!("http://169.254.169.254{path}");
        let mut args = Vec::new();
        if let Some(token) = token {
            args.extend(["-H", token]);
        }
        args.push(&url);
        sandbox.curl(cgroup, None, &args)
    };
    let mut keys = Vec::new();
    for _ in 0..3 {
        let id = get(
            "enforced/app",
            Some(&app_token),
            "/latest/meta-data/instance-id",
        );
        assert_eq!(id.status, 200, "{id:?}");
        let credentials = get("enforced/app", Some(&app_token), ROLE);
        assert_eq!(credentials.status, 200, "{credentials:?}");
        keys.push(credentials.body.clone());
        let ip = get(
            "enforced/app",
            Some(&app_token),
            "/latest/meta-data/local-ipv4",
        );
        assert_eq!(ip.status, 200, "{ip:?}");
    }
    assert!(
        keys.iter()
            .all(|k| k == &keys[0] && k.contains(ACCESS_KEY_PREFIX))
    );
    assert_eq!(received(&log, "/latest/meta-data/instance-id"), 1);
    assert_eq!(received(&log, ROLE), 1);
    assert_eq!(
        received(&log, "/latest/meta-data/local-ipv4"),
        3,
        "a dynamic answer always comes from the service"
    );
    let notes: Vec<(String, u64)> = agent
        .audit()
        .iter()
        .filter(|line| line["path"] == "/latest/meta-data/instance-id")
        .map(|line| {
            (
                line["detail"].as_str().unwrap_or("").to_owned(),
                line["upstream_status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        notes,
        [
            (String::new(), 200),
            ("cache: hit".into(), 0),
            ("cache: hit".into(), 0)
        ]
    );

    // A caller the policy denies credentials gets none, cached or not.
    let web_token = token("enforced/web");
    let denied = get("enforced/web", Some(&web_token), ROLE);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(!denied.body.contains(ACCESS_KEY_PREFIX));
    // Nor does a caller with another's token, nor one without a token: neither is vouched
    // for, so the service is asked (and here answers the tokenless one, as IMDSv1 allows).
    let stolen = get(
        "enforced/web",
        Some(&app_token),
        "/latest/meta-data/instance-id",
    );
    assert_eq!(stolen.status, 401, "{stolen:?}");
    let tokenless = get("enforced/app", None, "/latest/meta-data/instance-id");
    assert_eq!(tokenless.status, 200, "{tokenless:?}");
    assert_eq!(received(&log, "/latest/meta-data/instance-id"), 2);

    // Past 20 minutes before the credentials' expiration they are asked for again.
    std::thread::sleep(Duration::from_secs(4));
    let renewed = get("enforced/app", Some(&app_token), ROLE);
    assert_eq!(renewed.status, 200, "{renewed:?}");
    assert_ne!(renewed.body, keys[0], "new credentials, not the kept ones");
    assert_eq!(received(&log, ROLE), 2);

    // With the cache off, every read reaches the service.
    drop(agent);
    let agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&policies],
        &["--provider", "aws", "--no-cache"],
    );
    let app_token = token("enforced/app");
    for _ in 0..2 {
        let id = get(
            "enforced/app",
            Some(&app_token),
            "/latest/meta-data/instance-id",
        );
        assert_eq!(id.status, 200, "{id:?}");
    }
    assert_eq!(received(&log, "/latest/meta-data/instance-id"), 4);
    drop(agent);
}

#[test]
fn identical_reads_in_flight_share_one_request_and_each_caller_is_decided_alone() {
    let Some(sandbox) = Sandbox::new("shield-flight") else {
        return;
    };
    let log = sandbox.work_dir.join("requests.log");
    let _imds = sandbox.spawn_fake_imds(
        &["--provider", "gcp", "--request-log", log.to_str().unwrap()],
        &[],
    );
    let policy = r#"
name: app
callers: {cgroups: ["/app", "/other"]}
default: deny
rules:
  - name: config
    action: allow
    methods: [GET]
    paths: ["/computeMetadata/v1/instance/attributes/app-config"]
    callers: {cgroups: ["/app"]}
"#;
    let policies = sandbox.write_policies(&[("app.yaml", policy)]);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &["--provider", "gcp"]);
    // Eight readers and one the policy denies, at once; the service holds each answer 800 ms.
    let path = "/computeMetadata/v1/instance/attributes/app-config";
    let url = format!("http://169.254.169.254{path}");
    let spawn = |cgroup: &str| {
        let mut command = sandbox.command("curl", cgroup);
        command
            .args(imds_tests::sandbox::CURL_ARGS)
            .args([
                "-H",
                "Metadata-Flavor: Google",
                "-H",
                "X-Fake-Delay-Ms: 800",
                &url,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command.spawn().expect("curl")
    };
    let readers: Vec<_> = (0..8).map(|_| spawn("enforced/app")).collect();
    let other = spawn("enforced/other");
    let results: Vec<Curl> = readers
        .into_iter()
        .map(|child| curl_result(child.wait_with_output().unwrap()))
        .collect();
    let other = curl_result(other.wait_with_output().unwrap());
    for result in &results {
        assert_eq!(
            (result.status, result.body.as_str()),
            (200, "PORT=8080\n"),
            "{result:?}"
        );
    }
    assert_eq!(other.status, 403, "{other:?}");
    assert!(!other.body.contains("8080"));
    let upstream = received(&log, path);
    assert!(
        upstream < 8,
        "{upstream} upstream requests for 8 reads in flight together"
    );
    let coalesced = agent
        .audit()
        .iter()
        .filter(|line| line["path"] == path && line["detail"] == "coalesced")
        .count();
    assert_eq!(coalesced + upstream, 8, "{}", agent.log());
}

/// Azure's documented limit (5 requests/s) on the fake, and 100 clients reading what an
/// application reads at start: the VM's location (fixed), the instance document (dynamic)
/// and a managed identity's token.
#[test]
fn a_burst_of_clients_stays_within_azures_limit_and_none_sees_a_429() {
    let Some(sandbox) = Sandbox::new("shield-azure") else {
        return;
    };
    let log = sandbox.work_dir.join("requests.log");
    let _imds = sandbox.spawn_fake_imds(
        &[
            "--provider",
            "azure",
            "--rate-limit",
            "5",
            "--request-log",
            log.to_str().unwrap(),
        ],
        &[],
    );
    let policy = r#"
name: app
default: deny
rules:
  - name: reads
    action: allow
    methods: [GET]
    groups: [instance-info, credentials]
"#;
    let policies = sandbox.write_policies(&[("app.yaml", policy)]);
    // One cgroup stands for a node's hundred pods: the per-caller limits are raised.
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--provider",
            "azure",
            "--max-in-flight-per-caller",
            "1000",
            "--rate-per-caller",
            "10000",
            "--burst-per-caller",
            "10000",
        ];
        args.extend_from_slice(extra);
        sandbox.start_agent("enforced", "agent", &[&policies], &args)
    };
    let statuses = |script: &str| -> Vec<u16> {
        let output = sandbox
            .command("sh", "enforced/app")
            .args(["-c", script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("sh");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.trim().parse().unwrap_or(0))
            .collect()
    };
    let curl = "curl -sS --noproxy '*' -m 20 -w '%{http_code}\\n' -H 'Metadata: true'";
    let base = "http://169.254.169.254/metadata";
    let received = || std::fs::read_to_string(&log).unwrap().lines().count();

    let agent = start(&[]);
    let burst = format!(
        "for i in $(seq 100); do {curl} -o /dev/null -o /dev/null -o /dev/null \
         '{base}/instance/compute/location?api-version=2021-02-01&format=text' \
         '{base}/instance?api-version=2021-02-01' \
         '{base}/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/' & \
         done; wait"
    );
    let through_agent = statuses(&burst);
    assert_eq!(through_agent.len(), 300);
    assert!(through_agent.iter().all(|s| *s == 200), "{through_agent:?}");
    let upstream = received();
    eprintln!("upstream requests for 300 client reads: {upstream}");
    assert!(upstream < 30, "{upstream}");

    // Twenty different reads at once, which nothing can share: spread over four seconds,
    // each answered.
    std::thread::sleep(Duration::from_millis(1100));
    let distinct = format!(
        "for i in $(seq 10 29); do {curl} -o /dev/null \"{base}/instance?api-version=2021-02-$i\" & \
         done; wait"
    );
    let started = std::time::Instant::now();
    let spread = statuses(&distinct);
    let took = started.elapsed();
    assert!(
        spread.len() == 20 && spread.iter().all(|s| *s == 200),
        "{spread:?}"
    );
    assert!(took >= Duration::from_secs(3), "{took:?}");
    let waited = agent
        .audit()
        .iter()
        .filter(|line| {
            line["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("waited"))
        })
        .count();
    assert!(waited >= 10, "{}", agent.log());

    // The control: without the agent's limit the same reads draw the service's 429s.
    drop(agent);
    let _agent = start(&["--upstream-rate", "0"]);
    std::thread::sleep(Duration::from_millis(1100));
    let unlimited = statuses(&distinct);
    assert!(unlimited.contains(&429), "{unlimited:?}");
}
