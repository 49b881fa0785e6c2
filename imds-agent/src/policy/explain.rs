//! What `policy explain` and `policy check` say of policies: why a request gets its decision,
//! and where a policy grants credentials too widely.

use super::{
    Action, DEFAULT_RULE, Mode, PolicySet, Selection,
    compile::{Policy, Selector},
    decide::ResolvedCaller,
    pattern::{CanonicalPath, CompiledPatterns},
};
use crate::identity::Identity;

impl Selector {
    /// Whether no field but `executables` narrows the callers.
    fn names_no_caller_but_by_executable(&self) -> bool {
        self.cgroups.is_empty()
            && self.units.is_empty()
            && self.uids.is_empty()
            && self.gids.is_empty()
            && self.namespaces.is_empty()
            && self.pod_labels.is_empty()
            && self.service_accounts.is_empty()
            && self.containers.is_empty()
    }
}

impl Policy {
    /// Where this policy grants credentials to callers named by their executable alone (no
    /// cgroup, unit, uid, gid or pod field beside it): any process that runs that program,
    /// or a container's program at that path, gets them. `policy check` warns of each: the
    /// rule's name, or `default`.
    pub fn credentials_by_executable_alone(&self) -> Vec<&str> {
        const CREDENTIALS: [&str; 3] = [
            "/latest/meta-data/iam/security-credentials/role",
            "/computeMetadata/v1/instance/service-accounts/default/token",
            "/metadata/identity/oauth2/token",
        ];
        let grants = |paths: &CompiledPatterns| {
            CREDENTIALS.iter().any(|path| {
                CanonicalPath::parse(path).is_ok_and(|path| paths.best_match(&path).is_some())
            })
        };
        let by_executable_alone = |rule: Option<&Selector>| {
            let selectors = || std::iter::once(&self.callers).chain(rule);
            selectors().any(|s| !s.executables.is_empty())
                && selectors().all(Selector::names_no_caller_but_by_executable)
        };
        let mut found: Vec<&str> = self
            .rules
            .iter()
            .filter(|r| r.action == Action::Allow && r.methods.contains("GET"))
            .filter(|r| grants(&r.paths) && by_executable_alone(Some(&r.callers)))
            .map(|r| r.name.as_str())
            .collect();
        if self.default == Action::Allow && by_executable_alone(None) {
            found.push(DEFAULT_RULE);
        }
        found
    }
}

impl PolicySet {
    /// Why a request gets its decision: the decision, then one line per policy saying whether
    /// it selected the caller (and if not, which field did not match) and what it decided.
    pub fn explain(&self, identity: &Identity, method: &str, path: &CanonicalPath<'_>) -> String {
        use std::fmt::Write as _;
        let selection = self.select(identity);
        let decision = self.decide(&selection, identity, method, path);
        let mut out = format!(
            "decision: {} by policy '{}' rule '{}'\n",
            decision.action, decision.policy, decision.rule
        );
        if let Some((policy, rule)) = decision.would_deny {
            let _ = writeln!(out, "audit: policy '{policy}' rule '{rule}' would deny");
        }
        match (decision.action, decision.view) {
            (Action::Allow, Some(view)) if view.cuts(path) => {
                let _ = writeln!(out, "view: {view}");
                if !view.keys().is_empty() {
                    let _ = writeln!(
                        out,
                        "the caller gets these keys of the answer, where present: {}",
                        view.keys().join(", ")
                    );
                }
            }
            (Action::Deny, Some(view)) => {
                if let Some(field) = view.removes(path) {
                    let _ = writeln!(out, "the rule's view removes {field}");
                }
            }
            _ => {}
        }
        let Some(caller) = ResolvedCaller::new(identity) else {
            out.push_str("the caller's cgroup could not be resolved\n");
            return out;
        };
        for policy in &self.policies {
            let _ = write!(
                out,
                "policy '{}' ({}): ",
                policy.name,
                policy.source.display()
            );
            if let Some(field) = policy.callers.mismatch(&caller) {
                let _ = writeln!(out, "does not select this caller ({field} do not match)");
                continue;
            }
            let verdict = policy.verdict(&caller, method, path);
            let mode = if policy.mode == Mode::Audit {
                " [audit mode]"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "selects this caller; {} by rule '{}'{mode}",
                verdict.action,
                verdict.rule_name()
            );
        }
        if matches!(&selection, Selection::Policies(p) if p.is_empty()) {
            let _ = writeln!(
                out,
                "no policy selects this caller: --unmatched {}",
                self.unmatched
            );
        }
        out
    }
}
