//! `imds-agent report --suggest-policy`: least-privilege policies written from what workloads
//! did (audit mode is the way to collect it: every request is then seen and served). One
//! policy per workload as policies select it (the replicas of a pod share one), allowing the
//! path groups it read with the methods it used, the paths outside any group one by one,
//! nothing else; `tokens.required` where it used session tokens only. Requests that were
//! denied are left out: a suggestion never grants what a policy in force refused.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{WorkloadSelector, WorkloadUse};

/// A policy document as a file holds it (with `name`), or as an ImdsPolicy's spec (without).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyText {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    description: String,
    callers: Callers,
    default: &'static str,
    rules: Vec<RuleText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<TokensText>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Callers {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cgroups: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    units: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    namespaces: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pod_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    containers: Vec<String>,
}

#[derive(Debug, Serialize)]
struct RuleText {
    name: String,
    action: &'static str,
    methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    paths: Vec<String>,
}

#[derive(Debug, Serialize)]
struct TokensText {
    required: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: PolicyText,
}

#[derive(Debug, Serialize)]
struct Metadata {
    name: String,
    namespace: String,
}

/// One suggested policy, and what it was written from.
pub struct Suggestion {
    pub name: String,
    selector: WorkloadSelector,
    policy: PolicyText,
    /// The workloads (replicas included) whose requests it allows.
    pub workloads: Vec<String>,
    pub requests: u64,
}

impl Suggestion {
    pub fn is_pod(&self) -> bool {
        matches!(self.selector, WorkloadSelector::Pod { .. })
    }
}

/// Suggestions from `workloads`, counting only requests last made at or after `since` (ISO
/// 8601, UTC) when given. Workloads with nothing allowed left, or that no policy can select
/// (an unresolved cgroup, the inventory's overflow), get none.
pub fn suggest(workloads: &[WorkloadUse], since: Option<&str>) -> Vec<Suggestion> {
    // The replicas of a pod, or the processes of one unit, are one workload to a policy.
    let mut by_selector: BTreeMap<&WorkloadSelector, Vec<&WorkloadUse>> = BTreeMap::new();
    for workload in workloads {
        if let Some(selector) = &workload.selector {
            by_selector.entry(selector).or_default().push(workload);
        }
    }
    let mut suggestions = Vec::new();
    let mut names = BTreeSet::new();
    for (selector, members) in by_selector {
        // (group, method) -> count, and for paths outside a group, method -> paths.
        let mut groups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut paths: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let (mut requests, mut tokenless, mut tokens_used) = (0, 0, false);
        for workload in &members {
            for (key, seen) in &workload.uses {
                if seen.allowed == 0 || since.is_some_and(|since| seen.last.as_str() < since) {
                    continue;
                }
                let Some((method, path)) = key.split_once(' ') else {
                    continue;
                };
                requests += seen.allowed;
                tokenless += seen.tokenless;
                tokens_used |= seen.group == "token";
                if seen.group == "other" {
                    paths.entry(method).or_default().insert(path);
                } else {
                    groups.entry(&seen.group).or_default().insert(method);
                }
            }
        }
        if requests == 0 {
            continue;
        }
        let mut rules: Vec<RuleText> = groups
            .into_iter()
            .map(|(group, methods)| RuleText {
                name: group.to_owned(),
                action: "allow",
                methods: methods.into_iter().map(str::to_owned).collect(),
                groups: vec![group.to_owned()],
                paths: Vec::new(),
            })
            .collect();
        rules.extend(paths.into_iter().map(|(method, paths)| RuleText {
            name: format!("paths-{}", method.to_ascii_lowercase()),
            action: "allow",
            methods: vec![method.to_owned()],
            groups: Vec::new(),
            paths: paths.into_iter().map(str::to_owned).collect(),
        }));
        let name = unique_name(&mut names, selector);
        let workload_names: Vec<String> = members.iter().map(|w| w.workload.clone()).collect();
        let policy = PolicyText {
            name: Some(name.clone()),
            description: format!(
                "Suggested by imds-agent report --suggest-policy from {requests} requests of {}.",
                workload_names.join(", ")
            ),
            callers: callers(selector),
            default: "deny",
            rules,
            // Only where every request of the workload came with a session token.
            tokens: (tokens_used && tokenless == 0).then_some(TokensText { required: true }),
        };
        suggestions.push(Suggestion {
            name,
            selector: selector.clone(),
            policy,
            workloads: workload_names,
            requests,
        });
    }
    suggestions
}

fn callers(selector: &WorkloadSelector) -> Callers {
    match selector {
        WorkloadSelector::Pod {
            namespace,
            labels,
            service_account,
            container,
        } => Callers {
            namespaces: vec![namespace.clone()],
            pod_labels: labels.clone(),
            service_accounts: vec![service_account.clone()],
            containers: container.iter().cloned().collect(),
            ..Callers::default()
        },
        WorkloadSelector::Unit(unit) => Callers {
            units: vec![unit.clone()],
            ..Callers::default()
        },
        WorkloadSelector::Cgroup(cgroup) => Callers {
            cgroups: vec![cgroup.clone()],
            ..Callers::default()
        },
    }
}

/// `suggested-<workload>`, as both a policy name and a Kubernetes object name take it
/// (lower case, digits, `-`; at most 63), made unique with a number.
fn unique_name(taken: &mut BTreeSet<String>, selector: &WorkloadSelector) -> String {
    let what = match selector {
        WorkloadSelector::Pod {
            labels, container, ..
        } => {
            let app = labels
                .get("app.kubernetes.io/name")
                .or_else(|| labels.get("app"))
                .cloned()
                .unwrap_or_else(|| "pod".to_owned());
            match container {
                Some(container) => format!("{app}-{container}"),
                None => app,
            }
        }
        WorkloadSelector::Unit(unit) => unit.clone(),
        WorkloadSelector::Cgroup(cgroup) => cgroup.clone(),
    };
    let mut name = String::from("suggested-");
    for c in what.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let mut name = name
        .trim_end_matches('-')
        .chars()
        .take(56)
        .collect::<String>();
    name = name.trim_end_matches('-').to_owned();
    let mut unique = name.clone();
    let mut n = 2;
    while !taken.insert(unique.clone()) {
        unique = format!("{name}-{n}");
        n += 1;
    }
    unique
}

/// The suggestions as policy files hold them: YAML documents, one per policy.
pub fn render_files(suggestions: &[Suggestion]) -> String {
    let mut out = String::new();
    for suggestion in suggestions {
        out.push_str("---\n");
        out.push_str(&yaml(&suggestion.policy));
    }
    out
}

/// The pods' suggestions as ImdsPolicy objects, in each pod's namespace; the others are left
/// to node policy files (an ImdsPolicy governs pods only).
pub fn render_kubernetes(suggestions: Vec<Suggestion>) -> String {
    let mut out = String::new();
    for suggestion in suggestions {
        let WorkloadSelector::Pod { namespace, .. } = &suggestion.selector else {
            continue;
        };
        let namespace = namespace.clone();
        let mut spec = suggestion.policy;
        spec.name = None;
        // An ImdsPolicy selects its own namespace's pods only: the field is implied.
        spec.callers.namespaces.clear();
        out.push_str("---\n");
        out.push_str(&yaml(&Resource {
            api_version: "imds-agent.dev/v1alpha1",
            kind: "ImdsPolicy",
            metadata: Metadata {
                name: suggestion.name,
                namespace,
            },
            spec,
        }));
    }
    out
}

fn yaml(value: &impl Serialize) -> String {
    serde_saphyr::to_string(value).expect("suggestions serialize")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::inventory::Seen;

    fn seen(group: &str, allowed: u64, denied: u64, tokenless: u64, last: &str) -> Seen {
        Seen {
            group: group.into(),
            allowed,
            denied,
            tokenless,
            last: last.into(),
        }
    }

    fn pod(name: &str, container: &str) -> WorkloadUse {
        WorkloadUse {
            workload: format!("pod payments/{name} container {container}"),
            namespace: "payments".into(),
            selector: Some(WorkloadSelector::Pod {
                namespace: "payments".into(),
                labels: BTreeMap::from([("app".into(), "api".into())]),
                service_account: "api".into(),
                container: Some(container.into()),
            }),
            ..WorkloadUse::default()
        }
    }

    #[test]
    fn replicas_share_a_policy_of_what_they_were_allowed() {
        let mut first = pod("api-0", "app");
        first.uses = BTreeMap::from([
            (
                "PUT /latest/api/token".into(),
                seen("token", 3, 0, 0, "2026-12-02T05:00:00Z"),
            ),
            (
                "GET /latest/meta-data/iam/security-credentials/role".into(),
                seen("credentials", 3, 0, 0, "2026-12-02T05:00:00Z"),
            ),
            // Denied by a policy in force: never suggested.
            (
                "GET /latest/user-data".into(),
                seen("user-data", 0, 2, 0, "2026-12-02T05:00:00Z"),
            ),
        ]);
        let mut second = pod("api-1", "app");
        second.uses = BTreeMap::from([(
            "GET /latest/meta-data/custom/thing".into(),
            seen("other", 1, 0, 0, "2026-12-02T05:01:00Z"),
        )]);
        let unit = unit_workload();
        let suggestions = suggest(&[first, second, unit], None);
        assert_eq!(suggestions.len(), 2);
        let files = render_files(&suggestions);
        let policies = crate::policy::parse_all(Path::new("suggested.yaml"), &files)
            .unwrap_or_else(|e| panic!("{e:?}\n{files}"));
        assert_eq!(policies.len(), 2, "{files}");
        assert!(files.contains("name: suggested-api-app"), "{files}");
        assert!(
            files.contains("- /latest/meta-data/custom/thing"),
            "{files}"
        );
        assert!(!files.contains("user-data"), "{files}");
        // Tokens only for the pod, which never asked without one.
        assert_eq!(files.matches("required: true").count(), 1, "{files}");
        assert!(files.contains("units:\n  - nginx.service"), "{files}");

        // Bounded by time: the unit's requests are older.
        let recent = suggest(&[unit_workload()], Some("2026-12-02T00:00:00Z"));
        assert!(recent.is_empty());

        let kubernetes = render_kubernetes(suggestions);
        assert!(kubernetes.contains("kind: ImdsPolicy"), "{kubernetes}");
        assert!(kubernetes.contains("namespace: payments"), "{kubernetes}");
        assert!(!kubernetes.contains("nginx"), "{kubernetes}");
    }

    /// A unit that read its instance id without session tokens, a day ago.
    fn unit_workload() -> WorkloadUse {
        let mut unit = WorkloadUse {
            workload: "unit nginx.service".into(),
            selector: Some(WorkloadSelector::Unit("nginx.service".into())),
            ..WorkloadUse::default()
        };
        unit.uses = BTreeMap::from([(
            "GET /latest/meta-data/instance-id".into(),
            seen("instance-info", 5, 0, 5, "2026-12-01T00:00:00Z"),
        )]);
        unit
    }
}
