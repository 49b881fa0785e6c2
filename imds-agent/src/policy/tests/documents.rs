//! Documents: errors with their place, files of several policies, explanations, and what
//! `policy check` warns of.

use super::*;

#[test]
fn explain_names_the_deciding_rule_and_why_others_did_not_apply() {
    let set = set(
        &[
            WEB,
            "name: batch\ncallers: {cgroups: [\"/batch/**\"]}\ndefault: allow\n",
        ],
        Unmatched::Deny,
    );
    let who = identity(Some("/web/app"), 0);
    let text = set.explain(
        &who,
        "GET",
        &CanonicalPath::parse("/latest/meta-data/iam/info").unwrap(),
    );
    assert_eq!(
        text,
        "decision: deny by policy 'web' rule 'no-credentials'\n\
         policy 'web' (0.yaml): selects this caller; deny by rule 'no-credentials'\n\
         policy 'batch' (1.yaml): does not select this caller (cgroups do not match)\n"
    );
}

#[test]
fn errors_name_file_line_column_and_field() {
    assert_eq!(
        errors("name: a\ndefault: allow\nrulez: []\n"),
        [
            "p.yaml:3:1: rulez: unknown field `rulez`, expected one of name, description, mode, callers, default, rules, tokens; did you mean \"rules\"?"
        ]
    );
    assert_eq!(
        errors("name: a\ndefault: alow\n"),
        [
            "p.yaml:2:10: default: unknown variant `alow`, expected one of allow, deny; did you mean \"allow\"?"
        ]
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
            "p.yaml:8:11: rules[1].paths: a rule needs at least one path pattern or group",
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
    let set = PolicySet::load(&[dir], Unmatched::Deny)
        .unwrap_or_else(|e| panic!("example policies are invalid: {e:#?}"));
    assert!(
        !set.policies().is_empty(),
        "policies/ has no example policies"
    );
}

#[test]
fn credentials_granted_by_an_executable_alone_are_found() {
    let alone = r#"
name: aws-cli
callers: {executables: ["/usr/bin/aws"]}
default: deny
rules:
  - {name: creds, action: allow, methods: [GET], groups: [credentials]}
  - {name: info, action: allow, methods: [GET], groups: [instance-info]}
"#;
    let beside_a_unit = r#"
name: backup
callers: {executables: ["/usr/bin/aws"], units: [backup.service]}
default: deny
rules:
  - {name: creds, action: allow, methods: [GET], groups: [credentials]}
"#;
    let rule_level = r#"
name: mixed
default: deny
rules:
  - name: creds
    action: allow
    methods: [GET]
    groups: [credentials]
    callers: {executables: ["/usr/bin/aws"]}
"#;
    let by_default = "name: d\ncallers: {executables: [\"/usr/bin/aws\"]}\ndefault: allow\n";
    let found = |text: &str| {
        let policy = parse(Path::new("p.yaml"), text).expect("valid");
        policy
            .credentials_by_executable_alone()
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(found(alone), ["creds"]);
    assert!(found(beside_a_unit).is_empty());
    assert_eq!(found(rule_level), ["creds"]);
    assert_eq!(found(by_default), ["default"]);
}

#[test]
fn a_file_holds_several_policies_as_yaml_documents() {
    let text = "\
name: first
default: deny
---
name: second
default: allow
---
";
    let policies = parse_all(Path::new("p.yaml"), text).expect("two policies");
    let names: Vec<&str> = policies.iter().map(Policy::name).collect();
    assert_eq!(names, ["first", "second"]);
    // An error in the second document is located in the file, not in the document.
    let broken = "name: first\ndefault: deny\n---\nname: second\ndefault: alow\n";
    let errors: Vec<String> = parse_all(Path::new("p.yaml"), broken)
        .expect_err("rejected")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("p.yaml:5:") && e.contains("alow")),
        "{errors:?}"
    );
    // One policy where one is expected.
    assert!(parse(Path::new("p.yaml"), text).is_err());
    assert!(
        parse_all(Path::new("p.yaml"), "---\n").is_err(),
        "no policy"
    );
}

#[test]
fn near_misses_get_a_did_you_mean() {
    let rule = |field: &str| {
        format!(
            "name: p\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GET]\n    {field}\n"
        )
    };
    for (text, expected) in [
        (
            rule("groups: [credential]"),
            "did you mean \"credentials\"?",
        ),
        (
            "name: p\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GTE]\n"
                .to_owned(),
            "did you mean \"GET\"?",
        ),
        (
            "name: p\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methds: [GET]\n"
                .to_owned(),
            "did you mean \"methods\"?",
        ),
        (
            "name: p\ndefault: alow\n".to_owned(),
            "did you mean \"allow\"?",
        ),
    ] {
        let found = errors(&text);
        assert!(
            found.iter().any(|e| e.contains(expected)),
            "{text}: {found:?}"
        );
    }
    // Nothing close: no guess.
    let found = errors(&rule("groups: [secrets]"));
    assert!(
        !found.iter().any(|e| e.contains("did you mean")),
        "{found:?}"
    );
}
