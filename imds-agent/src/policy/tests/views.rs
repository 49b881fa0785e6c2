//! Views: which one a decision carries, what a view denies, and that recursive reads and
//! listings never show what a view removes.

use super::*;

/// The decision's action, rule and view (as `policy explain` prints it).
fn viewed(set: &PolicySet, who: &Identity, path: &str) -> (Action, String, Option<String>) {
    let selection = set.select(who);
    let d = set.decide(&selection, who, "GET", &CanonicalPath::parse(path).unwrap());
    (d.action, d.rule.to_owned(), d.view.map(ToString::to_string))
}

const APP: &str = r#"
name: app
callers: {cgroups: ["/app"]}
default: deny
rules:
  - name: config
    action: allow
    methods: [GET]
    groups: [user-data]
    view: {keys: [PORT, DB_HOST]}
  - name: instance
    action: allow
    methods: [GET]
    groups: [instance-info]
  - name: compute
    action: allow
    methods: [GET]
    paths: ["/metadata/instance/compute/**"]
    view: {without: [/metadata/instance/compute/osProfile]}
"#;

#[test]
fn a_rule_view_and_a_group_document_view_reach_the_decision() {
    let set = set(&[APP], Unmatched::Deny);
    let who = identity(Some("/app"), 1000);
    assert_eq!(
        viewed(&set, &who, "/latest/user-data"),
        (
            Action::Allow,
            "config".into(),
            Some("keys PORT, DB_HOST".into())
        )
    );
    let (action, rule, view) = viewed(&set, &who, "/metadata/instance");
    assert_eq!((action, rule.as_str()), (Action::Allow, "instance"));
    let view = view.expect("instance-info grants Azure's document through a view");
    for removed in [
        "compute/userData",
        "compute/osProfile",
        "compute/publicKeys",
        "network",
    ] {
        assert!(
            view.contains(&format!("/metadata/instance/{removed}")),
            "{view}"
        );
    }
    // Plain instance-info paths are whole.
    assert_eq!(
        viewed(&set, &who, "/latest/meta-data/instance-id"),
        (Action::Allow, "instance".into(), None)
    );
    // The field a view removes is denied by its own path, and anything below it.
    for path in [
        "/metadata/instance/compute/osProfile",
        "/metadata/instance/compute/osProfile/adminUsername",
    ] {
        let (action, rule, view) = viewed(&set, &who, path);
        assert_eq!((action, rule.as_str()), (Action::Deny, "compute"), "{path}");
        assert!(view.is_some());
    }
    let text = set.explain(
        &who,
        "GET",
        &CanonicalPath::parse("/metadata/instance/compute/osProfile").unwrap(),
    );
    assert!(
        text.contains("the rule's view removes /metadata/instance/compute/osProfile"),
        "{text}"
    );
    let text = set.explain(
        &who,
        "GET",
        &CanonicalPath::parse("/latest/user-data").unwrap(),
    );
    assert!(
        text.contains("the caller gets these keys of the answer, where present: PORT, DB_HOST"),
        "{text}"
    );
}

#[test]
fn a_document_granted_whole_elsewhere_in_the_rule_is_whole_and_a_view_beats_whole_between_policies()
{
    let both = r#"
name: both
default: deny
rules:
  - name: everything-of-the-droplet
    action: allow
    methods: [GET]
    groups: [instance-info, user-data]
"#;
    let set1 = set(&[both], Unmatched::Deny);
    let who = identity(Some("/app"), 0);
    assert_eq!(
        viewed(&set1, &who, "/metadata/v1.json"),
        (Action::Allow, "everything-of-the-droplet".into(), None)
    );
    let info = "name: info\ndefault: deny\nrules:\n  - {name: info, action: allow, methods: [GET], groups: [instance-info]}\n";
    let data = "name: data\ndefault: deny\nrules:\n  - {name: data, action: allow, methods: [GET], groups: [user-data]}\n";
    let set2 = set(&[data, info], Unmatched::Deny);
    let (action, rule, view) = viewed(&set2, &who, "/metadata/v1.json");
    assert_eq!((action, rule.as_str()), (Action::Allow, "info"));
    assert!(view.is_some_and(|v| v.contains("/metadata/v1.json/user_data")));
}

#[test]
fn recursive_reads_and_listings_never_show_what_a_view_removes() {
    let gcp = r#"
name: gcp
default: deny
rules:
  - name: attributes
    action: allow
    methods: [GET]
    paths: ["/computeMetadata/v1/instance/attributes/**"]
    view: {without: [/computeMetadata/v1/instance/attributes/kube-env]}
"#;
    let set = set(&[gcp], Unmatched::Deny);
    let who = identity(Some("/app"), 0);
    let selection = set.select(&who);
    let dir = CanonicalPath::parse("/computeMetadata/v1/instance/attributes/").unwrap();
    assert_eq!(
        set.decide_subtree(&selection, &who, "GET", &dir).action,
        Action::Deny,
        "a recursive read would hold kube-env"
    );
    let above = CanonicalPath::parse("/computeMetadata/v1/instance/").unwrap();
    assert_eq!(
        set.decide_subtree(&selection, &who, "GET", &above).action,
        Action::Deny
    );
    let visible = |entry: &str| {
        set.listing_entry_visible(
            &selection,
            &who,
            "/computeMetadata/v1/instance/attributes/",
            entry,
        )
    };
    assert!(visible("startup-script"));
    assert!(!visible("kube-env"));
    assert!(!visible("kube-env/"));
}

#[test]
fn a_view_is_checked_where_it_is_written() {
    let errors = errors(
        r#"name: a
default: deny
rules:
  - name: r
    action: deny
    methods: [GET]
    paths: ["/latest/user-data"]
    view:
      keys: ["A=1", ok]
      without: ["/metadata/*/x", "/"]
  - name: s
    action: allow
    methods: [GET]
    paths: ["/latest/user-data"]
    view: {}
"#,
    );
    assert_eq!(
        errors,
        [
            "p.yaml:4:11: rules[0].view: a view narrows what a rule allows; a deny rule has nothing to narrow",
            r#"p.yaml:9:14: rules[0].view.keys[0]: "A=1": a key is a name, without '=' or a value"#,
            r#"p.yaml:10:17: rules[0].view.without[0]: "/metadata/*/x": '*' is not allowed in a request path (a field is named by its metadata path, without wildcards)"#,
            "p.yaml:10:34: rules[0].view.without[1]: the root is the whole tree, not a field",
            "p.yaml:11:11: rules[1].view: name the keys a caller may read (keys) or the fields removed (without)",
        ]
    );
}
