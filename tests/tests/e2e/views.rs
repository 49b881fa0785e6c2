//! Views end to end: workloads granted some keys of the user data get exactly those, in the
//! service's own format and encoding; what a view cannot take apart is never served in part;
//! a document granted through a view lacks its secret fields however it is read.

use base64::Engine as _;
use imds_tests::sandbox::{Agent, Curl, Process, Sandbox};

const ENV_USER_DATA: &str = "# service settings\nPORT=8080\nDB_HOST=db.internal\n\
                             DB_PASSWORD='hunter2'\nexport API_KEY=sk-live-0123\n";

const POLICY: &str = r#"
name: app
callers: {cgroups: ["/app", "/nothing", "/other-keys", "/whole"]}
default: deny
rules:
  - name: config
    action: allow
    methods: [GET]
    groups: [user-data]
    view: {keys: [PORT, DB_HOST, database.host, region]}
    callers: {cgroups: ["/app"]}
  - name: other-keys
    action: allow
    methods: [GET]
    groups: [user-data]
    view: {keys: [NOT_THERE]}
    callers: {cgroups: ["/other-keys"]}
  - name: whole
    action: allow
    methods: [GET]
    groups: [user-data]
    callers: {cgroups: ["/whole"]}
  - name: instance
    action: allow
    methods: [GET]
    groups: [instance-info]
  - name: compute
    action: allow
    methods: [GET]
    paths: ["/metadata/instance/compute/**"]
    view:
      without:
        - /metadata/instance/compute/osProfile
        - /metadata/instance/compute/publicKeys
        - /metadata/instance/compute/userData
    callers: {cgroups: ["/app"]}
"#;

struct Env {
    agent: Agent,
    _imds: Process,
    sandbox: Sandbox,
    azure: bool,
}

/// A sandbox whose fake cloud (`aws` or `azure`) serves `user_data`, behind an agent.
fn start(label: &str, cloud: &str, user_data: &str) -> Option<Env> {
    let sandbox = Sandbox::new(label)?;
    let file = sandbox.work_dir.join("user-data");
    std::fs::write(&file, user_data).expect("user data file");
    let imds = sandbox.spawn_fake_imds(
        &["--provider", cloud, "--user-data", file.to_str().unwrap()],
        &[],
    );
    let policies = sandbox.write_policies(&[("app.yaml", POLICY)]);
    let agent = sandbox.start_agent(
        "enforced",
        "agent",
        &[&policies],
        &["--provider", cloud, "--explain-denials"],
    );
    Some(Env {
        agent,
        _imds: imds,
        sandbox,
        azure: cloud == "azure",
    })
}

impl Env {
    fn get(&self, cgroup: &str, path: &str) -> Curl {
        let url = format!("http://169.254.169.254{path}");
        let mut args = vec!["-D", "/dev/stderr"];
        if self.azure {
            args.extend(["-H", "Metadata: true"]);
        }
        args.push(&url);
        self.sandbox.curl(cgroup, None, &args)
    }

    fn user_data(&self, cgroup: &str) -> Curl {
        if self.azure {
            self.get(
                cgroup,
                "/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
            )
        } else {
            self.get(cgroup, "/latest/user-data")
        }
    }

    /// The audit detail of the last request of `path` from a caller.
    fn audit_detail(&self, path: &str) -> String {
        self.agent
            .audit()
            .iter()
            .rev()
            .find(|line| line["path"] == path)
            .map(|line| line["detail"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    }
}

fn decoded(body: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .unwrap_or_else(|e| panic!("{body:?} is not base64: {e}"));
    String::from_utf8(bytes).unwrap()
}

#[test]
fn env_user_data_gives_each_workload_its_keys_and_nothing_else() {
    let Some(env) = start("view-env", "aws", ENV_USER_DATA) else {
        return;
    };
    let app = env.user_data("enforced/app");
    assert_eq!(app.status, 200, "{app:?}");
    assert_eq!(app.body, "PORT=8080\nDB_HOST=db.internal\n", "{app:?}");
    // The length is the cut answer's, not the whole's.
    assert!(
        app.stderr
            .to_ascii_lowercase()
            .contains(&format!("content-length: {}", app.body.len())),
        "{}",
        app.stderr
    );
    assert_eq!(env.audit_detail("/latest/user-data"), "view: 2 of 4 keys");

    // No rule grants user data: 403, as ever.
    let nothing = env.user_data("enforced/nothing");
    assert_eq!(nothing.status, 403, "{nothing:?}");
    assert!(!nothing.body.contains("8080"));
    // Keys granted, none present: 403, saying why, nothing of the user data.
    let other = env.user_data("enforced/other-keys");
    assert_eq!(other.status, 403, "{other:?}");
    assert!(
        other
            .stderr
            .contains("none of the keys this caller may read (NOT_THERE)"),
        "{}",
        other.stderr
    );
    assert!(!other.body.contains("hunter2") && !other.body.contains("8080"));
    // A rule without a view: the whole user data, byte for byte.
    let whole = env.user_data("enforced/whole");
    assert_eq!((whole.status, whole.body.as_str()), (200, ENV_USER_DATA));
    // Outside the enforced tree, the fake serves it whole (the control).
    assert_eq!(env.user_data("outside").body, ENV_USER_DATA);
}

#[test]
fn json_user_data_is_cut_by_key_and_dotted_path() {
    let json = r#"{"region":"eu-west-1","database":{"host":"db.internal","password":"hunter2"},"apiKey":"sk-live"}"#;
    let Some(env) = start("view-json", "aws", json) else {
        return;
    };
    let app = env.user_data("enforced/app");
    assert_eq!(app.status, 200, "{app:?}");
    let got: serde_json::Value = serde_json::from_str(&app.body).expect("JSON");
    assert_eq!(
        got,
        serde_json::json!({"region": "eu-west-1", "database": {"host": "db.internal"}})
    );
    // In the service's order: region first.
    assert!(app.body.starts_with(r#"{"region""#), "{}", app.body);
}

#[test]
fn multipart_user_data_is_never_served_in_part() {
    let multipart = "Content-Type: multipart/mixed; boundary=\"==BOUNDARY==\"\nMIME-Version: 1.0\n\n\
                     --==BOUNDARY==\nContent-Type: text/x-shellscript\n\n#!/bin/sh\nPORT=8080\n\
                     DB_PASSWORD=hunter2\n--==BOUNDARY==--\n";
    let Some(env) = start("view-mime", "aws", multipart) else {
        return;
    };
    let app = env.user_data("enforced/app");
    assert_eq!(app.status, 403, "{app:?}");
    assert!(!app.body.contains("8080") && !app.body.contains("hunter2"));
    assert!(app.stderr.contains("MIME multipart"), "{}", app.stderr);
    assert!(
        env.audit_detail("/latest/user-data")
            .contains("MIME multipart"),
        "{}",
        env.agent.log()
    );
    let whole = env.user_data("enforced/whole");
    assert_eq!((whole.status, whole.body.as_str()), (200, multipart));
}

#[test]
fn azure_user_data_stays_base64_and_the_instance_document_keeps_its_secrets() {
    let Some(env) = start("view-azure", "azure", ENV_USER_DATA) else {
        return;
    };
    // User data: base64 in, base64 out, only the granted lines inside.
    let app = env.user_data("enforced/app");
    assert_eq!(app.status, 200, "{app:?}");
    assert_eq!(decoded(&app.body), "PORT=8080\nDB_HOST=db.internal\n");
    assert_eq!(
        decoded(&env.user_data("enforced/whole").body),
        ENV_USER_DATA
    );

    // The instance document through instance-info's view, for any workload the policy
    // governs: the location is there, the secrets are not, whichever way it is read.
    let secrets = [
        "osProfile",
        "azureuser",
        "userData",
        "publicKeys",
        "AAAAFAKEAZUREKEY",
    ];
    for cgroup in ["enforced/nothing", "enforced/app"] {
        for path in [
            "/metadata/instance?api-version=2021-02-01",
            "/metadata/instance/compute?api-version=2021-02-01",
        ] {
            let document = env.get(cgroup, path);
            assert_eq!(document.status, 200, "{cgroup} {path}: {document:?}");
            let parsed: serde_json::Value = serde_json::from_str(&document.body).expect("JSON");
            let compute = parsed.get("compute").unwrap_or(&parsed);
            assert_eq!(compute["location"], "westeurope", "{document:?}");
            for secret in secrets {
                assert!(
                    !document.body.contains(secret),
                    "{path}: {secret}: {document:?}"
                );
            }
            assert!(!document.body.contains("tagsList") && !document.body.contains("10.0.0.4"));
        }
    }
    // The removed fields by their own paths: not in any group for one workload; for the
    // other, whose rule grants the compute subtree through a view, denied by that view.
    for path in [
        "/metadata/instance/compute/osProfile?api-version=2021-02-01",
        "/metadata/instance/compute/osProfile/adminUsername?api-version=2021-02-01&format=text",
        "/metadata/instance/compute/publicKeys?api-version=2021-02-01",
    ] {
        for cgroup in ["enforced/nothing", "enforced/app"] {
            let field = env.get(cgroup, path);
            assert_eq!(field.status, 403, "{cgroup} {path}: {field:?}");
            assert!(!field.body.contains("azureuser") && !field.body.contains("AAAAFAKE"));
        }
    }
    let removed = env.get(
        "enforced/app",
        "/metadata/instance/compute/osProfile/adminUsername?api-version=2021-02-01&format=text",
    );
    assert!(
        removed
            .stderr
            .contains("view removes /metadata/instance/compute/osProfile"),
        "{}",
        removed.stderr
    );
    // What the view keeps is readable by its own path too.
    let location = env.get(
        "enforced/app",
        "/metadata/instance/compute/location?api-version=2021-02-01&format=text",
    );
    assert_eq!(
        (location.status, location.body.as_str()),
        (200, "westeurope")
    );
    // The control: outside, the fake's document holds every secret.
    let direct = env.get("outside", "/metadata/instance?api-version=2021-02-01");
    for secret in secrets {
        assert!(direct.body.contains(secret), "{secret}: {direct:?}");
    }
}

#[test]
fn gcp_attributes_through_a_view_never_show_the_removed_one_by_listing_or_recursive_read() {
    let Some(sandbox) = Sandbox::new("view-gcp") else {
        return;
    };
    let _imds = sandbox.start_fake_cloud("gcp", &[]);
    let policy = r#"
name: app
default: deny
rules:
  - name: attributes
    action: allow
    methods: [GET]
    paths: ["/computeMetadata/v1/instance/attributes/**"]
    view: {without: [/computeMetadata/v1/instance/attributes/kube-env]}
"#;
    let policies = sandbox.write_policies(&[("app.yaml", policy)]);
    let _agent = sandbox.start_agent("enforced", "agent", &[&policies], &["--provider", "gcp"]);
    let get = |cgroup: &str, path: &str| {
        let url = format!("http://169.254.169.254/computeMetadata/v1/instance/attributes/{path}");
        sandbox.curl(cgroup, None, &["-H", "Metadata-Flavor: Google", &url])
    };
    let listing = get("enforced/app", "");
    assert_eq!((listing.status, listing.body.as_str()), (200, "app-config"));
    let config = get("enforced/app", "app-config");
    assert_eq!((config.status, config.body.as_str()), (200, "PORT=8080\n"));
    for path in [
        "kube-env",
        "?recursive=true",
        "?alt=json",
        "kube-env?alt=json",
    ] {
        let denied = get("enforced/app", path);
        assert_eq!(denied.status, 403, "{path}: {denied:?}");
        assert!(!denied.body.contains("KUBELET"), "{path}: {denied:?}");
    }
    // The control: the fake's listing and recursive read do hold it.
    assert!(get("outside", "").body.contains("kube-env"));
    assert!(get("outside", "?recursive=true").body.contains("KUBELET"));
    assert!(get("outside", "?alt=json").body.contains("kube-env"));
}
