//! Upgrades no client notices: the agent is replaced again and again while SDK-style clients
//! keep asking, and not one of their requests fails or passes undecided.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use imds_tests::sandbox::{Agent, Sandbox, python_has};

const POLICY: &str = r#"
name: clients
default: deny
rules:
  - name: token
    action: allow
    methods: [PUT]
    paths: ["/latest/api/token"]
  - name: metadata
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/**"]
"#;

/// curl as a keep-alive client: one token fetched at the start and used for every request
/// after (so every agent must know it), 50 requests per curl on one connection, PAUSE
/// seconds (if set) between curls, until STOP exists; one status per request in OUT, curl's
/// complaints in ERR.
pub const CURL_LOOP: &str = r#"
token=$(curl -sS --noproxy '*' -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' \
  http://169.254.169.254/latest/api/token) || exit 1
urls=""
for i in $(seq 50); do urls="$urls -o /dev/null http://169.254.169.254/latest/meta-data/instance-id"; done
while [ ! -e "$STOP" ]; do
  curl -sS --noproxy '*' -m 5 -H "X-aws-ec2-metadata-token: $token" \
    -w '%{http_code}\n' $urls >> "$OUT" 2>> "$ERR"
  sleep "${PAUSE:-0}"
done
"#;

/// botocore's credential fetcher with its defaults (1 s timeout, one attempt), in a loop
/// (PAUSE seconds, if set, between fetches) until STOP exists; prints "ok failed".
pub const BOTOCORE_LOOP: &str = r#"
import logging, os, sys, time
from botocore.utils import InstanceMetadataFetcher
# botocore logs why a fetch failed at debug level: kept, and printed for a failure.
said = []
class Keep(logging.Handler):
    def emit(self, record):
        said.append(f"{time.time():.3f} {record.getMessage()}")
logging.getLogger("botocore.utils").addHandler(Keep())
logging.getLogger("botocore.utils").setLevel(logging.DEBUG)
ok = failed = 0
while not os.path.exists(os.environ["STOP"]):
    said.clear()
    creds = InstanceMetadataFetcher().retrieve_iam_role_credentials()
    if creds.get("access_key"):
        ok += 1
    else:
        failed += 1
        print("botocore got no credentials:", *said, sep="\n  ", file=sys.stderr)
    time.sleep(float(os.environ.get("PAUSE", "0")))
print(ok, failed)
"#;

pub const UPGRADES: usize = 20;

#[test]
fn twenty_upgrades_under_load_fail_no_request() {
    if !python_has("botocore", "botocore") {
        return;
    }
    let Some(sandbox) = Sandbox::new("upgrades") else {
        return;
    };
    let request_log = sandbox.work_dir.join("imds-requests.log");
    let _imds = sandbox.spawn_fake_imds(
        &["--request-log", request_log.to_str().expect("UTF-8 path")],
        &[],
    );
    let policy_dir = sandbox.write_policies(&[("clients.yaml", POLICY)]);
    let start = |sandbox: &Sandbox| {
        sandbox.start_agent(
            "clients",
            "agent",
            &[&policy_dir],
            &[
                "--drain-seconds",
                "5",
                // No detection probes: every request the service sees is a client's.
                "--provider",
                "aws",
                // The clients ask as fast as they can: the test counts failures, not throttling.
                "--rate-per-caller",
                "100000",
                "--burst-per-caller",
                "100000",
            ],
        )
    };
    let mut agents: Vec<Agent> = vec![start(&sandbox)];

    let stop = sandbox.work_dir.join("STOP");
    let (out, err) = (
        sandbox.work_dir.join("curl.out"),
        sandbox.work_dir.join("curl.err"),
    );
    let mut curl = sandbox
        .command("sh", "clients/curl")
        .args(["-c", CURL_LOOP])
        .env("STOP", &stop)
        .env("OUT", &out)
        .env("ERR", &err)
        .spawn()
        .expect("the curl loop");
    let botocore = sandbox
        .command("python3", "clients/botocore")
        .args(["-c", BOTOCORE_LOOP])
        .env("STOP", &stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the botocore loop");
    wait_for_lines(&out, 100);

    let started = Instant::now();
    for upgrade in 1..=UPGRADES {
        let next = start(&sandbox);
        let previous = agents.last_mut().expect("an agent");
        // The predecessor drains and exits once its successor serves.
        let exit = previous.process.wait(Duration::from_secs(20));
        assert_eq!(
            exit,
            Some(0),
            "upgrade {upgrade}: the previous agent did not hand over and exit:\n{}",
            previous.log()
        );
        assert!(
            previous.log().contains("handed over"),
            "upgrade {upgrade}:\n{}",
            previous.log()
        );
        agents.push(next);
        // Some requests through each agent before the next upgrade.
        std::thread::sleep(Duration::from_millis(150));
    }
    let upgrading = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "").expect("stop the clients");
    let status = curl.wait().expect("the curl loop ends");
    let botocore = botocore.wait_with_output().expect("the botocore loop ends");

    let statuses = std::fs::read_to_string(&out).unwrap_or_default();
    let curl_errors = std::fs::read_to_string(&err).unwrap_or_default();
    let failed: Vec<&str> = statuses.lines().filter(|s| *s != "200").collect();
    assert!(status.success(), "the curl loop failed: {curl_errors}");
    assert!(
        failed.is_empty() && curl_errors.is_empty(),
        "{} of {} curl requests failed across {UPGRADES} upgrades ({upgrading:?}): {:?}; {curl_errors}",
        failed.len(),
        statuses.lines().count(),
        &failed[..failed.len().min(10)],
    );
    assert!(
        statuses.lines().count() > 1000,
        "too few requests: {}",
        statuses.lines().count()
    );
    let report = String::from_utf8_lossy(&botocore.stdout);
    let (ok, failures) = report
        .trim()
        .split_once(' ')
        .map(|(ok, failed)| {
            (
                ok.parse::<u64>().unwrap_or(0),
                failed.parse::<u64>().unwrap_or(1),
            )
        })
        .unwrap_or((0, 1));
    assert!(
        ok > 20 && failures == 0,
        "botocore: {ok} fetched, {failures} failed: {}",
        String::from_utf8_lossy(&botocore.stderr)
    );

    // Everything the metadata service served was decided by an agent: each request it saw
    // has an audit line that sent it upstream.
    let served = std::fs::read_to_string(&request_log)
        .unwrap_or_default()
        .lines()
        .count();
    let forwarded: usize = agents
        .iter()
        .map(|agent| {
            agent
                .audit()
                .iter()
                .filter(|line| line["upstream_status"].as_u64().is_some_and(|s| s > 0))
                .count()
        })
        .sum();
    assert_eq!(
        served, forwarded,
        "requests served without an agent's decision"
    );
    // Token bindings survived: the curl loop's token was bound once, by the first agent.
    let unknown_tokens: usize = agents
        .iter()
        .map(|agent| {
            agent
                .audit()
                .iter()
                .filter(|line| line["rule"] == "token-not-issued-to-caller")
                .count()
        })
        .sum();
    assert_eq!(unknown_tokens, 0);
}

/// Waits until `file` has `lines` lines.
fn wait_for_lines(file: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::fs::read_to_string(file).is_ok_and(|text| text.lines().count() >= lines) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the clients did not get going: {}", file.display());
}

/// An agent inside the tree it enforces (as a pod's agent is): its successor must not take
/// the predecessor's upstream connections for ones that predate enforcement, and close them
/// under a request it is still serving.
#[test]
fn a_request_in_flight_upstream_survives_the_handover() {
    let Some(sandbox) = Sandbox::new("upgrade-in-flight") else {
        return;
    };
    let _imds = sandbox.start_fake_imds(false);
    let policy_dir = sandbox.write_policies(&[("clients.yaml", POLICY)]);
    let args = ["--provider", "aws", "--drain-seconds", "5"];
    let mut first = sandbox.start_agent("enforced", "enforced/agent", &[&policy_dir], &args);
    let slow = sandbox.spawn_get(
        "enforced/clients",
        "http://169.254.169.254/latest/meta-data/instance-id",
        &["-w", "\n%{http_code}", "-H", "X-Fake-Delay-Ms: 1500"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let _second = sandbox.start_agent("enforced", "enforced/agent", &[&policy_dir], &args);
    let output = slow.wait_with_output().expect("the slow request ends");
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(
        body.ends_with("\n200"),
        "the request in flight during the handover: {body:?}\n{}",
        first.log()
    );
    assert_eq!(first.process.wait(Duration::from_secs(20)), Some(0));
}
