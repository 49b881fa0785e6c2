use super::*;

fn errors(text: &str) -> Vec<String> {
    parse(Path::new("p.yaml"), text)
        .expect_err("policy should be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn identity(cgroup: Option<&str>, uid: u32) -> Identity {
    Identity {
        cgroup_id: 1,
        unit: cgroup.and_then(crate::identity::unit_of),
        cgroup: cgroup.map(str::to_owned),
        uid,
        gid: uid,
        pid: 1,
        comm: None,
    }
}

fn set(docs: &[&str], unmatched: Action) -> PolicySet {
    PolicySet {
        policies: docs
            .iter()
            .enumerate()
            .map(|(i, d)| parse(Path::new(&format!("{i}.yaml")), d).expect("valid policy"))
            .collect(),
        unmatched,
    }
}

/// (action, policy, rule) for one request.
fn decide(set: &PolicySet, who: &Identity, method: &str, path: &str) -> (Action, String, String) {
    let selection = set.select(who);
    let d = set.decide(selection, who, method, &CanonicalPath::parse(path).unwrap());
    (d.action, d.policy.to_owned(), d.rule.to_owned())
}

const WEB: &str = r#"
name: web
callers:
  cgroups: ["/web/**"]
default: deny
rules:
  - name: no-credentials
    action: deny
    methods: ["*"]
    paths: ["/latest/meta-data/iam/**"]
  - name: token
    action: allow
    methods: [PUT]
    paths: ["/latest/api/token"]
  - name: root-reads-everything
    action: allow
    methods: [GET, HEAD]
    paths: ["/**"]
    callers: {uids: [0]}
  - name: instance-info
    action: allow
    methods: [GET, HEAD]
    paths: ["/latest/meta-data/instance-id", "/latest/meta-data/placement/**"]
"#;

#[test]
fn first_matching_rule_decides_in_order() {
    let set = set(&[WEB], Action::Deny);
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
    let deny_set = set(&[WEB], Action::Deny);
    assert_eq!(
        decide(&deny_set, &other, "GET", "/latest/meta-data/instance-id"),
        (
            Action::Deny,
            UNMATCHED_POLICY.to_owned(),
            "unmatched".to_owned()
        )
    );
    let allow_set = set(&[WEB], Action::Allow);
    assert_eq!(decide(&allow_set, &other, "GET", "/x").0, Action::Allow);
}

#[test]
fn unresolved_callers_are_denied_even_when_unmatched_is_allow() {
    let set = set(&[WEB], Action::Allow);
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
fn the_first_policy_that_selects_a_caller_governs_it() {
    let everyone = "name: everyone\ndefault: allow\n";
    let set = set(&[WEB, everyone], Action::Deny);
    let web = identity(Some("/web"), 1000);
    let batch = identity(Some("/batch"), 1000);
    assert_eq!(set.select(&web), Selection::Policy(0));
    assert_eq!(set.select(&batch), Selection::Policy(1));
    assert_eq!(
        decide(&set, &batch, "GET", "/latest/user-data").1,
        "everyone"
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
    let set = set(&[doc], Action::Deny);
    let mut who = identity(Some("/system.slice/app-1.service"), 33);
    assert_eq!(set.select(&who), Selection::Policy(0));
    who.gid = 35;
    assert_eq!(set.select(&who), Selection::Unmatched);
    let elsewhere = identity(Some("/system.slice/sshd.service"), 33);
    assert_eq!(set.select(&elsewhere), Selection::Unmatched);
    let no_unit = identity(Some("/web"), 33);
    assert_eq!(set.select(&no_unit), Selection::Unmatched);
}

#[test]
fn errors_name_file_line_column_and_field() {
    assert_eq!(
        errors("name: a\ndefault: allow\nrulez: []\n"),
        [
            "p.yaml:3:1: rulez: unknown field `rulez`, expected one of name, description, callers, default, rules"
        ]
    );
    assert_eq!(
        errors("name: a\ndefault: alow\n"),
        ["p.yaml:2:10: default: unknown variant `alow`, expected one of allow, deny"]
    );
    let bad_rules = r#"name: a
default: deny
rules:
  - name: r1
    action: allow
    methods: [GET, FETCH]
    paths: ["/ok", "/a//b", "latest"]
  - name: r1
    action: deny
    methods: []
    paths: []
    callers:
      cgroups: ["/web/x**"]
"#;
    assert_eq!(
        errors(bad_rules),
        [
            r#"p.yaml:6:20: rules[0].methods[1]: unknown method "FETCH" (expected one of GET, HEAD, PUT, POST, DELETE, PATCH, OPTIONS, TRACE, or "*")"#,
            r#"p.yaml:7:20: rules[0].paths[1]: "/a//b": empty path segment ('//')"#,
            r#"p.yaml:7:29: rules[0].paths[2]: "latest": must start with '/'"#,
            "p.yaml:8:11: rules[1].name: duplicate rule name in this policy",
            r#"p.yaml:10:14: rules[1].methods: must name at least one method, or "*""#,
            "p.yaml:11:12: rules[1].paths: must list at least one path pattern",
            r#"p.yaml:13:17: rules[1].callers.cgroups[0]: "/web/x**": '**' must be a whole path segment"#,
        ]
    );
    assert_eq!(errors("default: deny\n").len(), 1, "name is required");
    assert!(
        errors("name: a\n")[0].contains("default"),
        "default is required: {:?}",
        errors("name: a\n")
    );
}

#[test]
fn every_example_policy_in_the_repository_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = PolicySet::load(&[dir], Action::Deny)
        .unwrap_or_else(|e| panic!("example policies are invalid: {e:#?}"));
    assert!(
        !set.policies().is_empty(),
        "policies/ has no example policies"
    );
}
