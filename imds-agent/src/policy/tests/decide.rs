//! Decisions: order, precedence, selectors, audit mode, listings, subtrees, kernel verdicts.

use super::*;

#[test]
fn first_matching_rule_decides_in_order() {
    let set = set(&[WEB], Unmatched::Deny);
    let app = identity(Some("/web/app"), 1000);
    let root = identity(Some("/web/app"), 0);
    let allow = |rule: &str| (Action::Allow, "web".to_owned(), rule.to_owned());
    let deny = |rule: &str| (Action::Deny, "web".to_owned(), rule.to_owned());

    assert_eq!(
        decide(&set, &app, "GET", "/latest/meta-data/instance-id"),
        allow("instance-info")
    );
    assert_eq!(
        decide(&set, &app, "GET", "/latest/meta-data/placement/region"),
        allow("instance-info")
    );
    // The deny rule comes first, so not even root reads credentials.
    assert_eq!(
        decide(
            &set,
            &root,
            "GET",
            "/latest/meta-data/iam/security-credentials/r"
        ),
        deny("no-credentials")
    );
    assert_eq!(
        decide(&set, &root, "GET", "/latest/user-data"),
        allow("root-reads-everything")
    );
    assert_eq!(
        decide(&set, &app, "GET", "/latest/user-data"),
        deny(DEFAULT_RULE)
    );
    // Methods are part of the rule.
    assert_eq!(
        decide(&set, &app, "PUT", "/latest/meta-data/instance-id"),
        deny(DEFAULT_RULE)
    );
    assert_eq!(
        decide(&set, &app, "PUT", "/latest/api/token"),
        allow("token")
    );
    assert_eq!(
        decide(&set, &app, "POST", "/latest/api/token"),
        deny(DEFAULT_RULE)
    );
}

#[test]
fn callers_no_policy_selects_get_the_unmatched_decision() {
    let other = identity(Some("/batch"), 1000);
    let deny_set = set(&[WEB], Unmatched::Deny);
    assert_eq!(
        decide(&deny_set, &other, "GET", "/latest/meta-data/instance-id"),
        (
            Action::Deny,
            UNMATCHED_POLICY.to_owned(),
            "unmatched".to_owned()
        )
    );
    let allow_set = set(&[WEB], Unmatched::Allow);
    assert_eq!(decide(&allow_set, &other, "GET", "/x").0, Action::Allow);
}

#[test]
fn unresolved_callers_are_denied_even_when_unmatched_is_allow() {
    let set = set(&[WEB], Unmatched::Allow);
    let ghost = identity(None, 0);
    assert_eq!(set.select(&ghost), Selection::Unresolved);
    assert_eq!(
        decide(&set, &ghost, "GET", "/latest/meta-data/instance-id"),
        (
            Action::Deny,
            UNMATCHED_POLICY.to_owned(),
            "unresolved-cgroup".to_owned()
        )
    );
}

#[test]
fn every_policy_that_selects_a_caller_has_a_say() {
    let everyone = "name: everyone\ndefault: allow\n";
    let set = set(&[WEB, everyone], Unmatched::Deny);
    let web = identity(Some("/web"), 1000);
    let batch = identity(Some("/batch"), 1000);
    assert_eq!(set.select(&web), Selection::Policies(vec![0, 1]));
    assert_eq!(set.select(&batch), Selection::Policies(vec![1]));
    assert_eq!(
        decide(&set, &batch, "GET", "/latest/user-data").1,
        "everyone"
    );
    // Two defaults disagree: deny wins.
    assert_eq!(
        decide(&set, &web, "GET", "/latest/user-data"),
        (Action::Deny, "web".to_owned(), DEFAULT_RULE.to_owned())
    );
    // A rule beats another policy's default.
    assert_eq!(decide(&set, &web, "GET", INSTANCE_ID).0, Action::Allow);
}

const INSTANCE_ID: &str = "/latest/meta-data/instance-id";

#[test]
fn across_policies_the_more_specific_rule_wins_and_deny_wins_ties() {
    let base = r#"
name: base
default: deny
rules:
  - name: no-iam
    action: deny
    methods: ["*"]
    paths: ["/latest/meta-data/iam/**"]
"#;
    let grant = r#"
name: grant
callers: {cgroups: ["/batch"]}
default: deny
rules:
  - name: role
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/iam/security-credentials/*"]
  - name: iam-tree
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/iam/**"]
"#;
    let set = set(&[base, grant], Unmatched::Deny);
    let batch = identity(Some("/batch"), 0);
    // 4 literal segments beat base's 3.
    assert_eq!(
        decide(
            &set,
            &batch,
            "GET",
            "/latest/meta-data/iam/security-credentials/r"
        ),
        (Action::Allow, "grant".to_owned(), "role".to_owned())
    );
    // Same pattern, same specificity: deny wins.
    assert_eq!(
        decide(&set, &batch, "GET", "/latest/meta-data/iam/info"),
        (Action::Deny, "base".to_owned(), "no-iam".to_owned())
    );
    // base alone for everyone else.
    let web = identity(Some("/web"), 0);
    assert_eq!(
        decide(
            &set,
            &web,
            "GET",
            "/latest/meta-data/iam/security-credentials/r"
        )
        .0,
        Action::Deny
    );
}

#[test]
fn audit_mode_reports_would_deny_and_never_decides() {
    let audit = r#"
name: trial
mode: audit
default: deny
rules:
  - name: id-only
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/instance-id"]
"#;
    let enforce_nothing = "name: open\ncallers: {cgroups: [\"/web\"]}\ndefault: allow\n";
    let deny_all = "name: closed\ncallers: {cgroups: [\"/batch\"]}\ndefault: deny\n";
    let set = set(&[audit, enforce_nothing, deny_all], Unmatched::Deny);
    let d = |who: &Identity, path: &str| {
        let selection = set.select(who);
        let d = set.decide(&selection, who, "GET", &CanonicalPath::parse(path).unwrap());
        (d.action, d.would_deny.map(|(p, r)| format!("{p}/{r}")))
    };
    let web = identity(Some("/web"), 0);
    assert_eq!(d(&web, INSTANCE_ID), (Action::Allow, None));
    assert_eq!(
        d(&web, "/latest/user-data"),
        (Action::Allow, Some("trial/default".into()))
    );
    // Audit policies cannot loosen an enforcing deny.
    let batch = identity(Some("/batch"), 0);
    assert_eq!(d(&batch, INSTANCE_ID), (Action::Deny, None));
    // Only an audit policy selects the caller: allowed, reported.
    let other = identity(Some("/other"), 0);
    assert_eq!(
        d(&other, "/latest/user-data"),
        (Action::Allow, Some("trial/default".into()))
    );
}

#[test]
fn pod_selectors_use_pod_metadata() {
    let uid = "8f5c4d2e-1a2b-4c3d-9e8f-0123456789ab";
    let cid = "3b1f0e9c2d8a7f6e5d4c3b2a19080706f5e4d3c2b1a09f8e7d6c5b4a39281706";
    let pods = PodDirectory::default();
    pods.replace([PodInfo {
        uid: uid.into(),
        namespace: "payments".into(),
        name: "api-0".into(),
        labels: [
            ("app".to_owned(), "api".to_owned()),
            ("tier".to_owned(), "web".to_owned()),
        ]
        .into(),
        service_account: "api".into(),
        containers: vec![ContainerInfo {
            name: "app".into(),
            id: format!("containerd://{cid}"),
        }],
    }]);
    let cgroup = format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{cid}.scope",
        uid.replace('-', "_")
    );
    let who = Identity::for_cgroup(&cgroup, 0, 0, &pods);
    let selects = |selector: &str| {
        let doc = format!("name: p\ncallers: {selector}\ndefault: allow\n");
        set(&[&doc], Unmatched::Deny).select(&who) == Selection::Policies(vec![0])
    };
    assert!(selects("{namespaces: [payments]}"));
    assert!(!selects("{namespaces: [kube-system]}"));
    assert!(selects("{podLabels: {app: api}}"));
    assert!(selects("{podLabels: {app: api, tier: web}}"));
    assert!(!selects("{podLabels: {app: api, tier: db}}"));
    assert!(selects("{serviceAccounts: [api]}"));
    assert!(selects("{containers: [app]}"));
    assert!(!selects("{containers: [sidecar]}"));
    assert!(selects(
        "{namespaces: [payments], containers: [app], serviceAccounts: [api]}"
    ));
    // A pod the directory does not know matches no pod selector.
    let unknown = Identity::for_cgroup(&cgroup, 0, 0, &PodDirectory::default());
    let doc = "name: p\ncallers: {namespaces: [payments]}\ndefault: allow\n";
    assert_eq!(
        set(&[doc], Unmatched::Deny).select(&unknown),
        Selection::Policies(vec![])
    );
}

#[test]
fn executables_select_by_path_pattern() {
    let doc = "name: p\ncallers: {executables: [\"/usr/bin/python3*\"]}\ndefault: allow\n";
    let set = set(&[doc], Unmatched::Deny);
    let mut who = identity(Some("/web"), 0);
    assert_eq!(
        set.select(&who),
        Selection::Policies(vec![]),
        "unknown exe matches nothing"
    );
    who.exe = Some(Executable::assumed("/usr/bin/python3.11"));
    assert_eq!(set.select(&who), Selection::Policies(vec![0]));
    who.exe = Some(Executable::assumed("/usr/bin/curl"));
    assert_eq!(set.select(&who), Selection::Policies(vec![]));
    // The path, but another file than the node's there (mounted over it): not selected, and
    // explain says why.
    who.exe = Some(Executable {
        origin: ExeOrigin::NotTheNodeFile,
        ..Executable::assumed("/usr/bin/python3.11")
    });
    assert_eq!(set.select(&who), Selection::Policies(vec![]));
    let path = CanonicalPath::parse("/latest/meta-data/instance-id").unwrap();
    let explained = set.explain(&who, "GET", &path);
    assert!(
        explained.contains("not the node's file at that path"),
        "{explained}"
    );
}

#[test]
fn groups_name_provider_paths() {
    let doc = r#"
name: g
default: deny
rules:
  - name: info
    action: allow
    methods: [GET]
    groups: [instance-info, network]
"#;
    let set = set(&[doc], Unmatched::Deny);
    let who = identity(Some("/web"), 0);
    for path in [
        INSTANCE_ID,
        "/computeMetadata/v1/instance/zone",
        "/metadata/instance/network/interface",
        "/latest/meta-data/local-ipv4",
    ] {
        assert_eq!(decide(&set, &who, "GET", path).0, Action::Allow, "{path}");
    }
    for path in [
        "/latest/meta-data/iam/info",
        "/latest/user-data",
        "/computeMetadata/v1/instance/attributes/kube-env",
    ] {
        assert_eq!(decide(&set, &who, "GET", path).0, Action::Deny, "{path}");
    }
    assert_eq!(
        errors(
            "name: g\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GET]\n    groups: [secrets]\n"
        ),
        [
            "p.yaml:7:14: rules[0].groups[0]: unknown group \"secrets\" (expected one of credentials, user-data, identity-document, instance-info, network, tags, token, wireserver, host-ga-plugin)"
        ]
    );
    assert!(
        errors(
            "name: g\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GET]\n"
        )[0]
        .contains("at least one path pattern or group")
    );
}

#[test]
fn listings_show_only_what_the_caller_may_read() {
    let doc = r#"
name: l
default: deny
rules:
  - name: listing
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/", "/latest/meta-data/iam/", "/latest/meta-data/iam/security-credentials/"]
  - name: one-role
    action: allow
    methods: [GET]
    paths: ["/latest/meta-data/iam/security-credentials/app-role", "/latest/meta-data/instance-id"]
"#;
    let set = set(&[doc], Unmatched::Deny);
    let who = identity(Some("/web"), 0);
    let selection = set.select(&who);
    let visible = |dir: &str, entry: &str| set.listing_entry_visible(&selection, &who, dir, entry);
    assert!(visible(
        "/latest/meta-data/iam/security-credentials/",
        "app-role"
    ));
    assert!(!visible(
        "/latest/meta-data/iam/security-credentials/",
        "node-admin-role"
    ));
    assert!(visible("/latest/meta-data/", "instance-id"));
    assert!(!visible("/latest/meta-data/", "ami-id"));
    assert!(
        visible("/latest/meta-data/", "iam/"),
        "something below iam/ is readable"
    );
    assert!(!visible("/latest/meta-data/", "placement/"));
    assert!(
        !visible("/latest/meta-data/", "../x"),
        "entries that are not path segments are dropped"
    );
}

#[test]
fn selectors_combine_fields_with_and_and_values_with_or() {
    let doc = r#"
name: units
callers:
  units: ["nginx.service", "app-*.service"]
  gids: [33, 34]
default: allow
"#;
    let set = set(&[doc], Unmatched::Deny);
    let mut who = identity(Some("/system.slice/app-1.service"), 33);
    assert_eq!(set.select(&who), Selection::Policies(vec![0]));
    who.gid = 35;
    assert_eq!(set.select(&who), Selection::Policies(vec![]));
    let elsewhere = identity(Some("/system.slice/sshd.service"), 33);
    assert_eq!(set.select(&elsewhere), Selection::Policies(vec![]));
    let no_unit = identity(Some("/web"), 33);
    assert_eq!(set.select(&no_unit), Selection::Policies(vec![]));
}

#[test]
fn kernel_verdicts_only_where_no_request_can_change_the_outcome() {
    let locked = "name: locked\ncallers: {cgroups: [\"/locked\"]}\ndefault: deny\nrules:\n  - name: no\n    action: deny\n    methods: [\"*\"]\n    paths: [\"/**\"]\n";
    let root_only = "name: rootonly\ncallers: {cgroups: [\"/svc\"]}\ndefault: deny\nrules:\n  - name: root\n    action: allow\n    methods: [GET]\n    paths: [\"/**\"]\n    callers: {uids: [0]}\n";
    let trial = "name: trial\nmode: audit\ncallers: {cgroups: [\"/trial\"]}\ndefault: deny\n";
    let verdict = |unmatched: Unmatched, cgroup: &str, uid: u32| {
        let set = set(&[WEB, locked, root_only, trial], unmatched);
        let who = identity(Some(cgroup), uid);
        set.kernel_verdict(&set.select(&who), &who)
    };
    assert_eq!(
        verdict(Unmatched::Deny, "/locked", 0),
        Some(KernelVerdict::Refuse)
    );
    // Something may be allowed: the agent must see every request.
    assert_eq!(verdict(Unmatched::Deny, "/web", 0), None);
    assert_eq!(verdict(Unmatched::Deny, "/svc", 0), None);
    // The same cgroup, a uid that no allow rule covers: nothing can be allowed.
    assert_eq!(
        verdict(Unmatched::Deny, "/svc", 1000),
        Some(KernelVerdict::Refuse)
    );
    // Audit policies want every request logged.
    assert_eq!(verdict(Unmatched::Deny, "/trial", 0), None);
    // Unmatched callers follow --unmatched.
    assert_eq!(
        verdict(Unmatched::Deny, "/stray", 0),
        Some(KernelVerdict::Refuse)
    );
    assert_eq!(
        verdict(Unmatched::Bypass, "/stray", 0),
        Some(KernelVerdict::Bypass)
    );
    assert_eq!(verdict(Unmatched::Allow, "/stray", 0), None);
    // Unresolved callers are never given a kernel verdict.
    let bypass_set = set(&[locked], Unmatched::Bypass);
    let ghost = identity(None, 0);
    assert_eq!(
        bypass_set.kernel_verdict(&bypass_set.select(&ghost), &ghost),
        None
    );
    // A policy that selects by executable makes verdicts keyed by uid/gid unsafe.
    let by_exe = "name: exe\ncallers: {executables: [\"/usr/bin/curl\"]}\ndefault: allow\n";
    let exe_set = set(&[locked, by_exe], Unmatched::Deny);
    let who = identity(Some("/locked"), 0);
    assert_eq!(exe_set.kernel_verdict(&exe_set.select(&who), &who), None);
}

#[test]
fn the_agent_audit_mode_denies_nothing_and_names_what_would_have() {
    let dry_run = set(&[WEB], Unmatched::Deny).with_mode(Mode::Audit);
    let web = identity(Some("/web/app"), 1000);
    let path = CanonicalPath::parse("/latest/meta-data/iam/security-credentials/r").unwrap();
    let selection = dry_run.select(&web);
    let decision = dry_run.decide(&selection, &web, "GET", &path);
    assert_eq!(decision.action, Action::Allow);
    assert_eq!(decision.would_deny, Some(("web", "no-credentials")));
    // Unmatched callers and unresolved cgroups alike: served, reported, never refused.
    let ghost = identity(Some("/elsewhere"), 1000);
    let selection = dry_run.select(&ghost);
    let decision = dry_run.decide(&selection, &ghost, "GET", &path);
    assert_eq!(
        (decision.action, decision.would_deny),
        (Action::Allow, Some((UNMATCHED_POLICY, "unmatched")))
    );
    assert_eq!(dry_run.kernel_verdict(&selection, &ghost), None);
    let lost = identity(None, 0);
    let decision = dry_run.decide(&dry_run.select(&lost), &lost, "GET", &path);
    assert_eq!(decision.action, Action::Allow);
    // The same set enforcing: denied, and refused in the kernel for the unmatched caller.
    let enforcing = set(&[WEB], Unmatched::Deny);
    assert_eq!(
        decide(
            &enforcing,
            &web,
            "GET",
            "/latest/meta-data/iam/security-credentials/r"
        )
        .0,
        Action::Deny
    );
    assert_eq!(
        enforcing.kernel_verdict(&enforcing.select(&ghost), &ghost),
        Some(KernelVerdict::Refuse)
    );
}

#[test]
fn a_recursive_read_is_allowed_only_where_the_whole_subtree_is() {
    const GKE: &str = r#"
name: gke
callers: {cgroups: ["/app"]}
default: deny
rules:
  - name: no-kube-env
    action: deny
    methods: [GET]
    paths: ["/computeMetadata/v1/instance/attributes/kube-env"]
  - name: instance
    action: allow
    methods: [GET]
    paths: ["/computeMetadata/v1/instance/**"]
  - name: project-id
    action: allow
    methods: [GET]
    paths: ["/computeMetadata/v1/project/project-id", "/computeMetadata/v1/project/"]
"#;
    let set = set(&[GKE], Unmatched::Deny);
    let app = identity(Some("/app"), 0);
    let selection = set.select(&app);
    let subtree = |path: &str| {
        let d = set.decide_subtree(
            &selection,
            &app,
            "GET",
            &CanonicalPath::parse(path).unwrap(),
        );
        (d.action, d.rule)
    };
    // Path by path, the instance tree is allowed except kube-env; recursively, only the
    // parts that hold no denied path.
    assert_eq!(
        decide(&set, &app, "GET", "/computeMetadata/v1/instance/").0,
        Action::Allow
    );
    assert_eq!(
        subtree("/computeMetadata/v1/instance/"),
        (Action::Deny, "no-kube-env")
    );
    assert_eq!(
        subtree("/computeMetadata/v1/instance/attributes/"),
        (Action::Deny, "no-kube-env")
    );
    assert_eq!(
        subtree("/computeMetadata/v1/instance/network-interfaces/"),
        (Action::Allow, "instance")
    );
    // The project listing is allowed, its subtree is not covered: the default denies.
    assert_eq!(
        decide(&set, &app, "GET", "/computeMetadata/v1/project/").0,
        Action::Allow
    );
    assert_eq!(
        subtree("/computeMetadata/v1/project/"),
        (Action::Deny, "default")
    );
}

#[test]
fn rules_naming_one_group_share_its_compiled_patterns_and_mixed_rules_match_all_parts() {
    let doc = |name: &str, rule: &str| {
        format!(
            "name: {name}\ncallers: {{cgroups: [\"/{name}/**\"]}}\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GET]\n    {rule}\n"
        )
    };
    let a = doc("a", "groups: [instance-info]");
    let b = doc("b", "groups: [instance-info]");
    let mixed = doc(
        "mixed",
        "groups: [instance-info, network]\n    paths: [\"/latest/meta-data/iam/info\"]",
    );
    let set = set(&[&a, &b, &mixed], Unmatched::Deny);
    let paths = |i: usize| &set.policies[i].rules[0].paths;
    assert!(Arc::ptr_eq(paths(0), paths(1)));
    assert!(!Arc::ptr_eq(paths(0), paths(2)));
    let who = identity(Some("/mixed/pod"), 1000);
    for path in [
        "/latest/meta-data/instance-id",
        "/latest/meta-data/mac",
        "/latest/meta-data/iam/info",
    ] {
        assert_eq!(decide(&set, &who, "GET", path).0, Action::Allow, "{path}");
    }
    assert_eq!(
        decide(
            &set,
            &who,
            "GET",
            "/latest/meta-data/iam/security-credentials/"
        )
        .0,
        Action::Deny
    );
    let who = identity(Some("/a/pod"), 1000);
    assert_eq!(
        decide(&set, &who, "GET", "/latest/meta-data/mac").0,
        Action::Deny
    );
}
