use std::{path::Path, sync::Arc};

use super::*;
use crate::identity::{
    Identity,
    executable::{ExeOrigin, Executable},
    pods::{ContainerInfo, PodDirectory, PodInfo},
};

fn errors(text: &str) -> Vec<String> {
    parse(Path::new("p.yaml"), text)
        .expect_err("policy should be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn identity(cgroup: Option<&str>, uid: u32) -> Identity {
    match cgroup {
        Some(cgroup) => Identity::for_cgroup(cgroup, uid, uid, &PodDirectory::default()),
        None => Identity {
            cgroup: None,
            ..Identity::for_cgroup("/", uid, uid, &PodDirectory::default())
        },
    }
}

fn set(docs: &[&str], unmatched: Unmatched) -> PolicySet {
    PolicySet {
        policies: docs
            .iter()
            .enumerate()
            .map(|(i, d)| parse(Path::new(&format!("{i}.yaml")), d).expect("valid policy"))
            .collect(),
        unmatched,
        mode: Mode::Enforce,
    }
}

/// (action, policy, rule) for one request.
fn decide(set: &PolicySet, who: &Identity, method: &str, path: &str) -> (Action, String, String) {
    let selection = set.select(who);
    let d = set.decide(
        &selection,
        who,
        method,
        &CanonicalPath::parse(path).unwrap(),
    );
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

mod decide;
mod documents;
mod views;
