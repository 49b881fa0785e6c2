//! `imds-agent policy test FILE...`: a table of cases (a caller, a request, the decision
//! expected) checked against policies without attaching anything, so that policies can be
//! kept under test in their owners' CI. A case file:
//!
//! ```yaml
//! policies: [policies.d]      # relative to this file; `--policy` adds more
//! pods: pods.yaml             # optional: pod metadata, as for `run --pods`
//! unmatched: deny             # optional: the `--unmatched` decision
//! cases:
//!   - name: nginx reads where it runs
//!     caller: {cgroup: /system.slice/nginx.service, uid: 33}
//!     request: GET /latest/meta-data/placement/region
//!     expect: allow           # allow | deny, or the agent's status: 200 | 403
//!   - name: nobody gets the role's credentials
//!     caller: {cgroup: /user.slice/user-1000.slice, uid: 1000}
//!     request: GET /latest/meta-data/iam/security-credentials/role
//!     expect: deny
//!     policy: host-default    # optional: the policy and rule that decide
//!     rule: no-secrets
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::{
    identity::{Identity, executable::Executable, pods::PodDirectory},
    policy::{Action, CanonicalPath, PolicyError, PolicySet, Unmatched},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    policies: Vec<PathBuf>,
    #[serde(default)]
    pods: Option<PathBuf>,
    #[serde(default)]
    unmatched: Option<Spanned<String>>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: Spanned<String>,
    caller: Spanned<CallerDocument>,
    request: Spanned<String>,
    expect: Spanned<Expected>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    rule: Option<String>,
}

/// A caller as `policy explain` describes one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerDocument {
    /// Relative to the enforced root.
    #[serde(default)]
    cgroup: Option<String>,
    /// NAMESPACE/NAME[/CONTAINER], looked up in the file's `pods`.
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    uid: u32,
    /// Default: the uid.
    #[serde(default)]
    gid: Option<u32>,
    /// Taken to be the node's file at that path.
    #[serde(default)]
    executable: Option<String>,
}

/// The decision expected, written as one (`allow`, `deny`) or as the status the agent answers
/// with for it (200, 403).
#[derive(Debug, Clone, Copy)]
struct Expected(Action);

impl<'de> Deserialize<'de> for Expected {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Status(u16),
            Word(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Status(200) => Ok(Self(Action::Allow)),
            Written::Status(403) => Ok(Self(Action::Deny)),
            Written::Word(word) if word == "allow" => Ok(Self(Action::Allow)),
            Written::Word(word) if word == "deny" => Ok(Self(Action::Deny)),
            Written::Status(other) => Err(serde::de::Error::custom(format!(
                "status {other}: a policy decides 200 (allow) or 403 (deny)"
            ))),
            Written::Word(other) => Err(serde::de::Error::custom(format!(
                "{other:?}: expected allow, deny, 200 or 403{}",
                crate::policy::did_you_mean(&other, &["allow", "deny"])
            ))),
        }
    }
}

/// What a run of case files found: the report, and whether every case passed.
pub struct Outcome {
    pub report: String,
    pub failed: usize,
}

/// Checks every case of `files` against the policies each names and `extra_policies`.
/// Errors (a case file or a policy that cannot be read, a case that cannot be evaluated) are
/// reported together, each with where it is; no case is checked then.
pub fn run(files: &[PathBuf], extra_policies: &[PathBuf]) -> Result<Outcome, Vec<PolicyError>> {
    let mut report = String::new();
    let (mut passed, mut failed) = (0, 0);
    let mut errors = Vec::new();
    let mut checked = Vec::new();
    for file in files {
        match check_file(file, extra_policies) {
            Ok(lines) => checked.push(lines),
            Err(found) => errors.extend(found),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    for lines in checked {
        for (ok, line) in lines {
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
            report.push_str(&line);
            report.push('\n');
        }
    }
    report.push_str(&format!("{passed} passed, {failed} failed\n"));
    Ok(Outcome { report, failed })
}

/// Each case of one file: (passed, its report line).
fn check_file(
    file: &Path,
    extra_policies: &[PathBuf],
) -> Result<Vec<(bool, String)>, Vec<PolicyError>> {
    let text = std::fs::read_to_string(file).map_err(|source| {
        vec![PolicyError::Read {
            file: file.to_owned(),
            source,
        }]
    })?;
    let cases: CaseFile = serde_saphyr::from_str(&text)
        .map_err(|e| vec![crate::policy::yaml_error(file, &text, &e)])?;
    let invalid = |at: (u64, u64), field: &str, message: String| PolicyError::Invalid {
        file: file.to_owned(),
        line: at.0,
        column: at.1,
        field: field.to_owned(),
        message,
    };
    let position = |span: &serde_saphyr::Location| (span.line(), span.column());
    let base = file.parent().unwrap_or(Path::new("."));
    let mut sources: Vec<PathBuf> = cases.policies.iter().map(|p| base.join(p)).collect();
    sources.extend(extra_policies.iter().cloned());
    if sources.is_empty() {
        return Err(vec![invalid(
            (1, 1),
            "policies",
            "no policies to test: name them here or with --policy".into(),
        )]);
    }
    let unmatched = match &cases.unmatched {
        None => Unmatched::Deny,
        Some(word) => {
            <Unmatched as clap::ValueEnum>::from_str(&word.value, false).map_err(|_| {
                vec![invalid(
                    position(&word.referenced),
                    "unmatched",
                    format!(
                        "{:?}: expected allow, deny or bypass{}",
                        word.value,
                        crate::policy::did_you_mean(&word.value, &["allow", "deny", "bypass"])
                    ),
                )]
            })?
        }
    };
    let set = PolicySet::load(&sources, unmatched)?;
    let pods = PodDirectory::default();
    if let Some(pods_file) = &cases.pods {
        pods.load_file(&base.join(pods_file))
            .map_err(|message| vec![invalid((1, 1), "pods", message)])?;
    }

    let mut errors = Vec::new();
    let mut lines = Vec::new();
    for case in &cases.cases {
        let identity = match identity(&case.caller.value, &pods) {
            Ok(identity) => identity,
            Err(message) => {
                errors.push(invalid(
                    position(&case.caller.referenced),
                    "caller",
                    message,
                ));
                continue;
            }
        };
        let (method, path) = match case.request.value.split_once(' ') {
            Some((method, path)) if !method.is_empty() => (method.to_ascii_uppercase(), path),
            _ => {
                errors.push(invalid(
                    position(&case.request.referenced),
                    "request",
                    format!("{:?}: expected METHOD PATH", case.request.value),
                ));
                continue;
            }
        };
        let raw_path = path.trim();
        let path = match CanonicalPath::parse(raw_path) {
            Ok(path) => path,
            Err(error) => {
                errors.push(invalid(
                    position(&case.request.referenced),
                    "request",
                    format!("path {raw_path:?}: {error}"),
                ));
                continue;
            }
        };
        let decision = set.decide(&set.select(&identity), &identity, &method, &path);
        let Expected(expected) = case.expect.value;
        let mut mismatches = Vec::new();
        if decision.action != expected {
            mismatches.push(format!("expected {expected}"));
        }
        if let Some(policy) = case.policy.as_deref().filter(|p| *p != decision.policy) {
            mismatches.push(format!("expected policy '{policy}'"));
        }
        if let Some(rule) = case.rule.as_deref().filter(|r| *r != decision.rule) {
            mismatches.push(format!("expected rule '{rule}'"));
        }
        let (line, column) = position(&case.name.referenced);
        let mut text = format!(
            "{} {}:{line}:{column}: {}: {method} {} -> {} (policy '{}' rule '{}')",
            if mismatches.is_empty() {
                "PASS"
            } else {
                "FAIL"
            },
            file.display(),
            case.name.value,
            raw_path,
            decision.action,
            decision.policy,
            decision.rule,
        );
        if !mismatches.is_empty() {
            text.push_str(&format!("; {}", mismatches.join(", ")));
            // Why, as `policy explain` says it.
            for why in set.explain(&identity, &method, &path).lines() {
                text.push_str(&format!("\n    {why}"));
            }
        }
        lines.push((mismatches.is_empty(), text));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

fn identity(caller: &CallerDocument, pods: &PodDirectory) -> Result<Identity, String> {
    let cgroup = match (&caller.cgroup, &caller.pod) {
        (Some(cgroup), None) => cgroup.clone(),
        (None, Some(pod)) => crate::explain::pod_cgroup(pods, pod)?,
        (Some(_), Some(_)) => return Err("either cgroup or pod, not both".into()),
        (None, None) => return Err("cgroup or pod is required".into()),
    };
    let mut identity =
        Identity::for_cgroup(&cgroup, caller.uid, caller.gid.unwrap_or(caller.uid), pods);
    identity.exe = caller.executable.as_deref().map(Executable::assumed);
    Ok(identity)
}
