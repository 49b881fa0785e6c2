//! Evaluation: which policies select a caller, and the decision for one request. Pure: no I/O,
//! no clock.

use std::cell::OnceCell;

use super::{
    Action, DEFAULT_RULE, KernelVerdict, Mode, PolicySet, UNMATCHED_POLICY, Unmatched,
    compile::{Methods, Policy, Rule, Selector},
    pattern::{CanonicalPath, Specificity},
    view::View,
};
use crate::identity::{Identity, executable::ExeOrigin};

impl Selector {
    pub(super) fn matches(&self, caller: &ResolvedCaller<'_>) -> bool {
        self.mismatch(caller).is_none()
    }

    /// The first field that does not match, for `policy explain`.
    pub(super) fn mismatch(&self, caller: &ResolvedCaller<'_>) -> Option<&'static str> {
        let any = |empty: bool, hit: bool| empty || hit;
        let pod = caller.identity.pod.as_deref();
        if !any(
            self.cgroups.is_empty(),
            self.cgroups.iter().any(|p| p.matches(caller.cgroup())),
        ) {
            return Some("cgroups");
        }
        if !any(
            self.uids.is_empty(),
            self.uids.contains(&caller.identity.uid),
        ) {
            return Some("uids");
        }
        if !any(
            self.gids.is_empty(),
            self.gids.contains(&caller.identity.gid),
        ) {
            return Some("gids");
        }
        let unit = caller.identity.unit.as_deref();
        if !any(
            self.units.is_empty(),
            unit.is_some_and(|u| self.units.iter().any(|p| p.matches(u))),
        ) {
            return Some("units");
        }
        if !self.executables.is_empty() {
            let (Some(path), Some(exe)) = (caller.exe(), &caller.identity.exe) else {
                return Some("executables");
            };
            if !self.executables.iter().any(|p| p.matches(path, exe)) {
                return Some(
                    if exe.origin == ExeOrigin::NotTheNodeFile
                        && self.executables.iter().any(|p| p.path.matches(path))
                    {
                        "executables (the file running is not the node's file at that path)"
                    } else {
                        "executables"
                    },
                );
            }
        }
        if !any(
            self.namespaces.is_empty(),
            pod.is_some_and(|p| self.namespaces.contains(&p.namespace)),
        ) {
            return Some("namespaces");
        }
        let labels_match = pod.is_some_and(|p| {
            self.pod_labels
                .iter()
                .all(|(k, v)| p.labels.get(k) == Some(v))
        });
        if !any(self.pod_labels.is_empty(), labels_match) {
            return Some("podLabels");
        }
        if !any(
            self.service_accounts.is_empty(),
            pod.is_some_and(|p| self.service_accounts.contains(&p.service_account)),
        ) {
            return Some("serviceAccounts");
        }
        let container = caller.identity.container.as_ref();
        if !any(
            self.containers.is_empty(),
            container.is_some_and(|c| self.containers.contains(c)),
        ) {
            return Some("containers");
        }
        None
    }
}

impl Methods {
    pub(super) fn contains(&self, method: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(methods) => methods.iter().any(|m| m == method),
        }
    }
}

impl Rule {
    /// The specificity of the most specific pattern matching `path`, if the rule applies.
    pub(super) fn matches(
        &self,
        caller: &ResolvedCaller<'_>,
        method: &str,
        path: &CanonicalPath<'_>,
    ) -> Option<Specificity> {
        if !self.methods.contains(method) || !self.callers.matches(caller) {
            return None;
        }
        self.paths.best_match(path)
    }

    /// The view through which the rule grants `path`: a document's, else the rule's own.
    pub(super) fn view_for(&self, path: &CanonicalPath<'_>) -> Option<&View> {
        self.documents.get(path).or(self.view.as_deref())
    }
}

impl Policy {
    /// This policy's verdict: its first matching rule, else its default.
    pub(super) fn verdict<'a>(
        &'a self,
        caller: &ResolvedCaller<'_>,
        method: &str,
        path: &CanonicalPath<'_>,
    ) -> Verdict<'a> {
        self.rules
            .iter()
            .find_map(|rule| {
                rule.matches(caller, method, path)
                    .map(|specificity| Verdict {
                        action: rule.action,
                        policy: self,
                        rule: Some(rule),
                        specificity: Some(specificity),
                        view: rule.view_for(path),
                    })
            })
            .unwrap_or(Verdict {
                action: self.default,
                policy: self,
                rule: None,
                specificity: None,
                view: None,
            })
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Verdict<'a> {
    pub(super) action: Action,
    pub(super) policy: &'a Policy,
    pub(super) rule: Option<&'a Rule>,
    /// `None` for a default.
    pub(super) specificity: Option<Specificity>,
    /// What of the answer an allow grants.
    pub(super) view: Option<&'a View>,
}

impl<'a> Verdict<'a> {
    pub(super) fn rule_name(&self) -> &'a str {
        self.rule.map_or(DEFAULT_RULE, |r| r.name.as_str())
    }

    /// Precedence: a rule beats a default, a more specific rule beats a less specific one,
    /// and deny beats allow when they are otherwise equal; between allows otherwise equal,
    /// one through a view (it grants less) beats one without.
    fn rank(&self) -> (bool, Option<Specificity>, bool, bool) {
        (
            self.specificity.is_some(),
            self.specificity,
            self.action == Action::Deny,
            self.view.is_some(),
        )
    }
}

/// The winner of `current` and `next`; defaults only: deny wins.
fn combine<'a>(current: Option<Verdict<'a>>, next: Verdict<'a>) -> Option<Verdict<'a>> {
    // Like max_by_key, the later of equals wins; ranks that tie are the same decision anyway.
    match current {
        Some(v) if v.rank() > next.rank() => Some(v),
        _ => Some(next),
    }
}

/// The outcome for one request, naming what decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub action: Action,
    pub policy: &'a str,
    pub rule: &'a str,
    /// Set when an audit-mode policy would have denied this allowed request:
    /// (policy, rule) of that would-be denial.
    pub would_deny: Option<(&'a str, &'a str)>,
    /// An allow: what of the answer the caller gets. A deny: the view that removes the path.
    pub view: Option<&'a View>,
}

/// Token requirements for one caller (see [`PolicySet::token_rules`]), with the policies that
/// set them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenRules<'a> {
    pub required_by: Option<&'a str>,
    pub max_ttl: Option<(u32, &'a str)>,
}

/// The parts of an identity the policy uses, for a caller whose cgroup was resolved.
pub(super) struct ResolvedCaller<'a> {
    pub(super) identity: &'a Identity,
    cgroup_path: &'a str,
    /// The cgroup and executable paths split into segments when a selector first matches
    /// them: most rules select no caller of their own, so a request's decision needs neither
    /// (both were split per request before, 1.7% of the agent's CPU with a new connection per
    /// request under perf).
    cgroup: OnceCell<CanonicalPath<'a>>,
    exe: OnceCell<Option<CanonicalPath<'a>>>,
}

impl<'a> ResolvedCaller<'a> {
    /// `None` when the cgroup is unknown or its path is outside the path grammar.
    pub(super) fn new(identity: &'a Identity) -> Option<Self> {
        let cgroup_path = identity.cgroup.as_deref()?;
        CanonicalPath::check(cgroup_path).ok()?;
        Some(Self {
            identity,
            cgroup_path,
            cgroup: OnceCell::new(),
            exe: OnceCell::new(),
        })
    }

    pub(super) fn cgroup(&self) -> &CanonicalPath<'a> {
        self.cgroup.get_or_init(|| {
            CanonicalPath::parse(self.cgroup_path).expect("checked when the caller was resolved")
        })
    }

    /// `None` when the executable is unknown or its path is outside the path grammar.
    pub(super) fn exe(&self) -> Option<&CanonicalPath<'a>> {
        self.exe
            .get_or_init(|| {
                let exe = self.identity.exe.as_ref()?;
                CanonicalPath::parse(&exe.path).ok()
            })
            .as_ref()
    }
}

/// Which policies govern a caller; computed once per caller and policy version, so the cost
/// of a request depends on the policies that select its caller, not on how many are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Indexes of the selecting policies, in file order (empty: no policy selects the caller).
    Policies(Vec<usize>),
    /// The caller's cgroup could not be resolved: every request is denied.
    Unresolved,
}

impl PolicySet {
    /// A verdict the kernel may enforce for this caller from now on, when no request can
    /// change the outcome: refuse when nothing can be allowed (the connect fails at once),
    /// bypass for unmatched callers under `--unmatched bypass`. `None` when the agent must see
    /// each request: something may be allowed, an audit policy wants the requests logged, or
    /// a policy selects by executable (the kernel verdict is keyed by cgroup, uid and gid).
    pub fn kernel_verdict(
        &self,
        selection: &Selection,
        identity: &Identity,
    ) -> Option<KernelVerdict> {
        let Selection::Policies(indexes) = selection else {
            return None;
        };
        if self.mode == Mode::Audit {
            // A dry run: the agent must see (and allow) every request.
            return (indexes.is_empty() && self.unmatched == Unmatched::Bypass)
                .then_some(KernelVerdict::Bypass);
        }
        if self.policies.iter().any(Policy::uses_executables) {
            return None;
        }
        if indexes.is_empty() {
            return match self.unmatched {
                Unmatched::Deny => Some(KernelVerdict::Refuse),
                Unmatched::Bypass => Some(KernelVerdict::Bypass),
                Unmatched::Allow => None,
            };
        }
        let caller = ResolvedCaller::new(identity)?;
        let policies = || indexes.iter().map(|&i| &self.policies[i]);
        if policies().any(|p| p.mode == Mode::Audit) {
            return None;
        }
        let may_allow = policies().any(|p| {
            p.default == Action::Allow
                || p.rules
                    .iter()
                    .any(|r| r.action == Action::Allow && r.callers.matches(&caller))
        });
        (!may_allow).then_some(KernelVerdict::Refuse)
    }

    pub fn select(&self, identity: &Identity) -> Selection {
        let Some(caller) = ResolvedCaller::new(identity) else {
            return Selection::Unresolved;
        };
        Selection::Policies(
            self.policies
                .iter()
                .enumerate()
                .filter(|(_, p)| p.callers.matches(&caller))
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// The decision for one request. Pure: no I/O, no clock; the proxy calls it per request
    /// with the caller's selection. In audit mode (`--mode audit`) a denial becomes an allow
    /// that names what would have denied.
    pub fn decide<'a>(
        &'a self,
        selection: &Selection,
        identity: &Identity,
        method: &str,
        path: &CanonicalPath<'_>,
    ) -> Decision<'a> {
        self.apply_mode(self.decide_enforcing(selection, identity, method, path))
    }

    /// The decision for a request whose answer holds the whole subtree below `path` (GCP's
    /// `recursive=true`): allowed only if the path is, no selecting policy has a deny rule at
    /// or below it, and the subtree is allowed as a whole (an allow rule ending in `**`
    /// covers it, or every selecting policy allows by default). Otherwise denied, naming the
    /// rule or default that denies part of it: a recursive read must not return what the
    /// caller could not read path by path.
    pub fn decide_subtree<'a>(
        &'a self,
        selection: &Selection,
        identity: &Identity,
        method: &str,
        path: &CanonicalPath<'_>,
    ) -> Decision<'a> {
        let decision = self.decide_enforcing(selection, identity, method, path);
        let subtree = match (decision.action, selection, ResolvedCaller::new(identity)) {
            // A view cuts answers by their paths; a subtree's answer cannot be cut the same.
            (Action::Allow, _, _) if decision.view.is_some() => {
                Some((decision.policy, decision.rule))
            }
            (Action::Allow, Selection::Policies(indexes), Some(caller)) if !indexes.is_empty() => {
                self.subtree_denial(indexes, &caller, method, path)
            }
            _ => None,
        };
        let decision = subtree.map_or(decision, |(policy, rule)| Decision {
            action: Action::Deny,
            policy,
            rule,
            would_deny: None,
            view: None,
        });
        self.apply_mode(decision)
    }

    /// (policy, rule) of what denies part of the subtree below `path`, if anything does.
    fn subtree_denial<'a>(
        &'a self,
        indexes: &[usize],
        caller: &ResolvedCaller<'_>,
        method: &str,
        path: &CanonicalPath<'_>,
    ) -> Option<(&'a str, &'a str)> {
        let enforcing = || {
            indexes
                .iter()
                .map(|&i| &self.policies[i])
                .filter(|p| p.mode == Mode::Enforce)
        };
        let applies = |rule: &Rule| rule.methods.contains(method) && rule.callers.matches(caller);
        for policy in enforcing() {
            for rule in policy
                .rules
                .iter()
                .filter(|r| r.action == Action::Deny && applies(r))
            {
                if rule
                    .paths
                    .patterns()
                    .iter()
                    .any(|p| p.matches(path) || p.matches_below(path))
                {
                    return Some((&policy.name, &rule.name));
                }
            }
        }
        // What a view cuts below the path would be whole in the subtree's answer.
        for policy in enforcing() {
            for rule in policy
                .rules
                .iter()
                .filter(|r| r.action == Action::Allow && applies(r))
            {
                let viewed_below = rule.view.is_some()
                    && rule
                        .paths
                        .patterns()
                        .iter()
                        .any(|p| p.matches(path) || p.matches_below(path));
                if viewed_below || rule.documents.any_at_or_below(path) {
                    return Some((&policy.name, &rule.name));
                }
            }
        }
        let covered = enforcing().any(|policy| {
            policy
                .rules
                .iter()
                .filter(|r| r.action == Action::Allow && applies(r))
                .any(|r| r.paths.patterns().iter().any(|p| p.covers_subtree(path)))
        });
        if covered {
            return None;
        }
        enforcing()
            .find(|p| p.default == Action::Deny)
            .map(|p| (p.name.as_str(), DEFAULT_RULE))
    }

    fn apply_mode<'a>(&self, decision: Decision<'a>) -> Decision<'a> {
        match (self.mode, decision.action) {
            (Mode::Audit, Action::Deny) => Decision {
                action: Action::Allow,
                would_deny: Some((decision.policy, decision.rule)),
                ..decision
            },
            _ => decision,
        }
    }

    fn decide_enforcing<'a>(
        &'a self,
        selection: &Selection,
        identity: &Identity,
        method: &str,
        path: &CanonicalPath<'_>,
    ) -> Decision<'a> {
        let (indexes, caller) = match (selection, ResolvedCaller::new(identity)) {
            (Selection::Policies(indexes), Some(caller)) => (indexes, caller),
            _ => {
                return Decision {
                    action: Action::Deny,
                    policy: UNMATCHED_POLICY,
                    rule: "unresolved-cgroup",
                    would_deny: None,
                    view: None,
                };
            }
        };
        // Each selecting policy's verdict, once: the winner among enforcing policies and
        // among all (audit policies included, for would-deny), in one pass without allocating.
        let (mut enforced, mut all) = (None, None);
        for &i in indexes {
            let verdict = self.policies[i].verdict(&caller, method, path);
            if verdict.policy.mode == Mode::Enforce {
                enforced = combine(enforced, verdict);
            }
            all = combine(all, verdict);
        }
        let would_deny = |effective: Action| match all {
            Some(v) if effective == Action::Allow && v.action == Action::Deny => {
                Some((v.policy.name.as_str(), v.rule_name()))
            }
            _ => None,
        };
        match (enforced, all) {
            // An allow through a view that removes the path: denied, as the field is.
            (Some(v), _) if v.view.is_some_and(|view| view.removes(path).is_some()) => Decision {
                action: Action::Deny,
                policy: &v.policy.name,
                rule: v.rule_name(),
                would_deny: None,
                view: v.view,
            },
            (Some(v), _) => Decision {
                action: v.action,
                policy: &v.policy.name,
                rule: v.rule_name(),
                would_deny: would_deny(v.action),
                view: v.view.filter(|_| v.action == Action::Allow),
            },
            // Only audit policies select the caller: allowed, and reported.
            (None, Some(v)) => Decision {
                action: Action::Allow,
                policy: &v.policy.name,
                rule: v.rule_name(),
                would_deny: would_deny(Action::Allow),
                view: None,
            },
            (None, None) => Decision {
                action: self.unmatched.action(),
                policy: UNMATCHED_POLICY,
                rule: "unmatched",
                would_deny: None,
                view: None,
            },
        }
    }

    /// What the enforcing policies selecting this caller require of AWS session tokens:
    /// required if any requires them (naming the first), the lowest TTL cap.
    pub fn token_rules(&self, selection: &Selection) -> TokenRules<'_> {
        let mut rules = TokenRules::default();
        let Selection::Policies(indexes) = selection else {
            return rules;
        };
        for policy in indexes.iter().map(|&i| &self.policies[i]) {
            if policy.mode != Mode::Enforce {
                continue;
            }
            if policy.tokens.required && rules.required_by.is_none() {
                rules.required_by = Some(&policy.name);
            }
            if let Some(ttl) = policy.tokens.max_ttl_seconds
                && rules.max_ttl.is_none_or(|(lowest, _)| ttl < lowest)
            {
                rules.max_ttl = Some((ttl, &policy.name));
            }
        }
        rules
    }

    /// Whether the agent runs as a dry run (`--mode audit`).
    pub fn dry_run(&self) -> bool {
        self.mode == Mode::Audit
    }

    /// Whether an entry of an allowed listing may be shown: a leaf when the caller may read
    /// it, a directory (ending in `/`) when the caller may read it or anything below it. A
    /// denied role name in `iam/security-credentials/` is thus never disclosed.
    pub fn listing_entry_visible(
        &self,
        selection: &Selection,
        identity: &Identity,
        dir: &str,
        entry: &str,
    ) -> bool {
        let child = format!("{}/{}", dir.trim_end_matches('/'), entry);
        let Ok(path) = CanonicalPath::parse(&child) else {
            return false;
        };
        if self.decide(selection, identity, "GET", &path).action == Action::Allow {
            return true;
        }
        if !entry.ends_with('/') {
            return false;
        }
        let (Selection::Policies(indexes), Some(caller)) =
            (selection, ResolvedCaller::new(identity))
        else {
            return false;
        };
        indexes
            .iter()
            .map(|&i| &self.policies[i])
            .filter(|p| p.mode == Mode::Enforce)
            .flat_map(|p| &p.rules)
            .filter(|r| {
                r.action == Action::Allow && r.methods.contains("GET") && r.callers.matches(&caller)
            })
            .filter(|r| r.view.as_ref().is_none_or(|v| v.removes(&path).is_none()))
            .any(|r| r.paths.patterns().iter().any(|p| p.matches_below(&path)))
    }
}
