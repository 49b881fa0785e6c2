//! GCP: the agent with `--provider gcp` in front of a fake GCP metadata server, and Google's
//! own client library (google-auth's compute_engine credentials) as the workload.

use imds_tests::{
    fake_imds::clouds::{GCP_KUBE_ENV, GCP_SERVICE_ACCOUNT, GCP_TOKEN_PREFIX},
    sandbox::{Agent, Curl, Process, Sandbox},
};

const POLICY: &str = r#"
name: app
callers: {cgroups: ["/app"]}
default: deny
rules:
  - name: service-account
    action: allow
    methods: [GET]
    groups: [credentials, instance-info]
  - name: attribute-names
    action: allow
    methods: [GET]
    paths: ["/computeMetadata/v1/instance/attributes/"]
"#;

/// google-auth as an application on GCE uses it: refresh the default service account's
/// credentials from the metadata server.
const GOOGLE_AUTH: &str = r#"
import json
import google.auth.compute_engine
import google.auth.transport.requests
credentials = google.auth.compute_engine.Credentials()
try:
    credentials.refresh(google.auth.transport.requests.Request())
    print(json.dumps({"token": credentials.token, "email": credentials.service_account_email}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__}))
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
    let imds = sandbox.start_fake_cloud("gcp", &[]);
    let policies = sandbox.write_policies(&[("app.yaml", POLICY)]);
    let mut args = vec!["--provider", "gcp"];
    args.extend_from_slice(extra);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &args);
    Some(Env {
        agent,
        _imds: imds,
        sandbox,
    })
}

impl Env {
    fn get(&self, cgroup: &str, path: &str) -> Curl {
        self.get_with(cgroup, path, &[])
    }

    fn get_with(&self, cgroup: &str, path: &str, args: &[&str]) -> Curl {
        let url = format!("http://169.254.169.254{path}");
        let mut all = vec!["-H", "Metadata-Flavor: Google"];
        all.extend_from_slice(args);
        all.push(&url);
        self.sandbox.curl(cgroup, None, &all)
    }
}

#[test]
fn only_documented_queries_pass_and_hanging_gets_outlast_the_upstream_bound() {
    let Some(env) = start_with(
        "gcp-queries",
        &["--upstream-timeout-ms", "400", "--explain-denials"],
    ) else {
        return;
    };
    const ID: &str = "/computeMetadata/v1/instance/id";
    let delayed = ["-H", "X-Fake-Delay-Ms: 1500"];
    // An ordinary read of a service that hangs is cut at the bound.
    let hung = env.get_with("enforced/app", ID, &delayed);
    assert_eq!(hung.status, 504, "{hung:?}");
    // A hanging GET with its own timeout_sec is not.
    let path = format!("{ID}?wait_for_change=true&timeout_sec=3");
    let long_poll = env.get_with("enforced/app", &path, &delayed);
    assert_eq!(long_poll.status, 200, "{long_poll:?}");
    // A parameter GCP's server does not document, or a documented one spelt otherwise, is
    // refused before the service sees it.
    for query in ["foo=1", "alt=json&Recursive=true"] {
        let refused = env.get("enforced/app", &format!("{ID}?{query}"));
        assert_eq!(
            (refused.status, refused.body.as_str()),
            (
                400,
                "imds-agent: a query parameter this metadata service does not document\n"
            ),
            "{query}"
        );
    }
    // A recursive read denied for part of its subtree says so first.
    let denied = env.get_with(
        "enforced/app",
        "/computeMetadata/v1/instance/attributes/?recursive=true",
        &["-D", "-"],
    );
    assert_eq!(denied.status, 403, "{denied:?}");
    let explained = denied
        .body
        .lines()
        .find_map(|l| l.strip_prefix("imds-agent-explain: "))
        .unwrap_or_default();
    assert!(
        explained.starts_with("recursive read: deny by policy 'app'"),
        "{denied:?}"
    );
}

#[test]
fn google_auth_gets_a_token_only_where_policy_allows() {
    if !imds_tests::sandbox::python_has("google.auth.compute_engine, requests", "google-auth") {
        return;
    }
    let Some(env) = start("gcp-sdk") else {
        return;
    };
    let refresh = |cgroup: &str| {
        env.sandbox.python_json(cgroup, GOOGLE_AUTH, |command| {
            // The library's documented overrides of metadata.google.internal.
            command
                .env("GCE_METADATA_HOST", "169.254.169.254")
                .env("GCE_METADATA_IP", "169.254.169.254");
        })
    };
    // The library asks for the service account recursively, then for its token: both pass.
    let allowed = refresh("enforced/app");
    assert!(
        allowed["token"]
            .as_str()
            .is_some_and(|t| t.starts_with(GCP_TOKEN_PREFIX)),
        "{allowed}\n{}",
        env.agent.log()
    );
    assert_eq!(allowed["email"], GCP_SERVICE_ACCOUNT);
    // Another workload: the library reports a refresh error, no token.
    let denied = refresh("enforced/web");
    assert_eq!(denied["error"], "RefreshError", "{denied}");
}

#[test]
fn gke_kube_env_stays_out_of_reach_of_listings_and_recursive_reads() {
    let Some(env) = start("gcp-kube-env") else {
        return;
    };
    // The attribute names may be listed; the attribute itself may not be read.
    let names = env.get("enforced/app", "/computeMetadata/v1/instance/attributes/");
    assert_eq!(names.status, 200, "{names:?}");
    let secret = env.get(
        "enforced/app",
        "/computeMetadata/v1/instance/attributes/kube-env",
    );
    assert_eq!(secret.status, 403, "{secret:?}");
    // Nor read in one go with the listing: the fake server would return kube-env in it.
    let recursive = env.get(
        "enforced/app",
        "/computeMetadata/v1/instance/attributes/?recursive=true",
    );
    assert_eq!(recursive.status, 403, "{recursive:?}");
    assert!(!recursive.body.contains("KUBELET"));
    // Nor named in a listing asked for as JSON, which the text-listing filter cannot read.
    let as_json = env.get(
        "enforced/app",
        "/computeMetadata/v1/instance/attributes/?alt=json",
    );
    assert_eq!(as_json.status, 403, "{as_json:?}");
    assert!(!as_json.body.contains("kube-env"), "{as_json:?}");
    assert!(
        env.get(
            "outside",
            "/computeMetadata/v1/instance/attributes/?alt=json"
        )
        .body
        .contains("kube-env")
    );
    // However the name is spelt: the server decodes `%72ecursive` as `recursive`; a spelling
    // it does not document is refused (400) before anything is decided.
    for (spelling, status) in [("%72ecursive=true", 403), ("RECURSIVE=true", 400)] {
        let path = format!("/computeMetadata/v1/instance/attributes/?{spelling}");
        let encoded = env.get("enforced/app", &path);
        assert_eq!(encoded.status, status, "{encoded:?}");
        assert!(!encoded.body.contains("KUBELET"));
        let direct = env.get("outside", &path);
        assert!(direct.body.contains("KUBELET"), "{direct:?}");
    }
    // The legacy tree, which never required the header, is closed.
    let legacy = env.get(
        "enforced/app",
        "/computeMetadata/v1beta1/instance/attributes/kube-env",
    );
    assert_eq!(legacy.status, 403, "{legacy:?}");
    assert!(!legacy.body.contains("KUBELET"));
    // Outside the enforced tree the fake server does answer all three (the control).
    let direct = env.get(
        "outside",
        "/computeMetadata/v1/instance/attributes/?recursive=true",
    );
    assert!(direct.body.contains("KUBELET"), "{direct:?}");
    assert!(GCP_KUBE_ENV.contains("KUBELET"));
}

#[test]
fn the_provider_is_detected_also_past_a_previous_agents_programs() {
    let Some(sandbox) = Sandbox::new("detect") else {
        return;
    };
    let _imds = sandbox.start_fake_cloud("gcp", &[]);
    let policies = sandbox.write_policies(&[("app.yaml", POLICY)]);
    let detected = |agent: &Agent| {
        agent.log().lines().any(|l| {
            l.contains("detected the cloud provider") && l.contains("\"provider\":\"gcp\"")
        })
    };
    let first = sandbox.start_agent("enforced", "agent", &[&policies], &[]);
    assert!(detected(&first), "{}", first.log());
    // GCP's rules are in force: a header-less request is refused by the agent.
    let bare = sandbox.curl(
        "enforced/app",
        None,
        &["http://169.254.169.254/computeMetadata/v1/instance/id"],
    );
    assert_eq!(bare.status, 403, "{bare:?}");
    assert!(bare.body.contains("Metadata-Flavor"), "{bare:?}");
    // Killed: its programs stay pinned and divert the next agent's own probes, which run
    // from inside the enforced tree now; they are exempted through the pinned map.
    drop(first);
    let second = sandbox.start_agent("enforced", "enforced/agent", &[&policies], &[]);
    assert!(detected(&second), "{}", second.log());
}

/// Certificates as GCP's guest agent and metadata server hold them, made with openssl in
/// `dir`: the server's (metadata.google.internal) and the client's, both from one root.
/// Returns (the fake server's TLS directory, the node's credentials directory).
fn mtls_certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut root = vec!["req", "-x509", "-days", "2", "-subj", "/CN=fake-mds-root"];
    root.extend(ec);
    root.extend(["-keyout", "root.key", "-out", "root.crt"]);
    run(&root);
    for (name, extension) in [
        (
            "server",
            "subjectAltName=DNS:metadata.google.internal\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let mut request = vec!["req", "-subj", "/CN=fake"];
        request.extend(ec);
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        request.extend(["-keyout", &key, "-out", &csr]);
        run(&request);
        std::fs::write(dir.join(&ext), extension).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "root.crt",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
    }
    let server = dir.join("fake-server");
    std::fs::create_dir_all(&server).unwrap();
    std::fs::copy(dir.join("server.crt"), server.join("server.crt")).unwrap();
    std::fs::copy(dir.join("server.key"), server.join("server.key")).unwrap();
    std::fs::copy(dir.join("root.crt"), server.join("client-ca.crt")).unwrap();
    // As the guest agent writes them: the root, and the client's certificate and key in one.
    let node = dir.join("google-mds-mtls");
    std::fs::create_dir_all(&node).unwrap();
    std::fs::copy(dir.join("root.crt"), node.join("root.crt")).unwrap();
    let client = [
        std::fs::read_to_string(dir.join("client.crt")).unwrap(),
        std::fs::read_to_string(dir.join("client.key")).unwrap(),
    ]
    .concat();
    std::fs::write(node.join("client.key"), client).unwrap();
    (server, node)
}

/// Where the node has GCP's metadata server credentials, the agent's requests go over mutual
/// TLS to port 443; workloads speak plain HTTP to the agent, and their own connects to port 443
/// stay refused. Credentials that cannot be used fail the request, never a plain one.
#[test]
fn upstream_requests_use_the_metadata_servers_mutual_tls_where_the_node_has_it() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        imds_tests::sandbox::skip("openssl is not installed (cargo xtask setup installs it)");
        return;
    }
    let Some(sandbox) = Sandbox::new("gcp-mtls") else {
        return;
    };
    let (server, node) = mtls_certificates(&sandbox.work_dir);
    let log = sandbox.work_dir.join("requests.log");
    let _imds = sandbox.spawn_fake_imds(
        &[
            "--provider",
            "gcp",
            "--tls-listen",
            "169.254.169.254:443",
            "--tls-dir",
            server.to_str().unwrap(),
            "--request-log",
            log.to_str().unwrap(),
        ],
        &[],
    );
    let policies = sandbox.write_policies(&[("app.yaml", POLICY)]);
    let _agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&policies],
        &[
            "--provider",
            "gcp",
            "--gcp-mtls-dir",
            node.to_str().unwrap(),
        ],
    );
    let get = |args: &[&str]| {
        let mut all = vec!["-H", "Metadata-Flavor: Google"];
        all.extend_from_slice(args);
        sandbox.curl("enforced/app", None, &all)
    };
    let id = get(&["http://169.254.169.254/computeMetadata/v1/instance/id"]);
    assert_eq!(id.status, 200, "{id:?}");
    let requests = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        requests.lines().collect::<Vec<_>>(),
        ["GET /computeMetadata/v1/instance/id mtls"],
        "the agent's request went over mutual TLS"
    );
    // A workload's own TLS connect to the server stays refused (fail closed).
    let direct = get(&[
        "--cacert",
        node.join("root.crt").to_str().unwrap(),
        "--resolve",
        "metadata.google.internal:443:169.254.169.254",
        "https://metadata.google.internal/computeMetadata/v1/instance/id",
    ]);
    assert_eq!((direct.status, direct.exit), (0, 7), "{direct:?}");

    // Credentials that cannot be used: the request fails, nothing goes out in the clear.
    std::fs::write(node.join("client.key"), "not a key\n").unwrap();
    // The agent looks at the files at most once a second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let failed = get(&["http://169.254.169.254/computeMetadata/v1/instance/zone"]);
    assert_eq!(failed.status, 502, "{failed:?}");
    // The instance id, fixed for the instance's life, is served from memory: the server is
    // not asked again.
    let again = get(&["http://169.254.169.254/computeMetadata/v1/instance/id"]);
    assert_eq!((again.status, again.body.as_str()), (200, id.body.as_str()));
    let requests = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(requests.lines().count(), 1, "{requests}");
}
