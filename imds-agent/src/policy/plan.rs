//! What the proxy asks of the policy, and nothing else: once per connection an admission
//! (which policies select the caller, and whether the kernel may decide its next connects),
//! once per request a plan (the decision, the token rules, which listing entries the caller
//! may see, and on demand why). [`Versioned`]'s set is private to this module tree, so a
//! request reaches the policy through [`Versioned::plan`] alone.

use std::{collections::HashMap, sync::Arc, sync::Mutex};

use super::{
    Action, CanonicalPath, Decision, KernelVerdict, Policy, PolicySet, Selection, TokenRules,
};
use crate::identity::{CallerKey, Identity, executable::Executable};

/// A caller's standing for one connection.
pub struct Admission {
    /// Which policies select the caller, for the policy version it was computed with.
    selection: Mutex<(u64, Arc<Selection>)>,
    /// What the kernel may decide for this caller's next connects, and the policy version
    /// that said so (a verdict of a replaced version must not stay installed).
    pub kernel_verdict: Option<(KernelVerdict, u64)>,
}

/// One request as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'r> {
    pub method: &'r str,
    pub path: &'r CanonicalPath<'r>,
    /// The answer holds the whole subtree below `path` (GCP's `recursive=true`).
    pub recursive: bool,
}

/// Everything the policy says of one request.
pub struct Plan<'p> {
    pub decision: Decision<'p>,
    /// What the enforcing policies require of session tokens.
    pub tokens: TokenRules<'p>,
    /// The agent runs as a dry run (`--mode audit`): nothing is refused.
    pub dry_run: bool,
    set: &'p PolicySet,
    selection: Arc<Selection>,
    identity: &'p Identity,
}

/// A policy set and its version: 1 for the first load, +1 for every change of what decisions
/// depend on (a successful reload, a policy resource, the pod metadata).
pub struct Versioned {
    pub version: u64,
    set: Arc<PolicySet>,
    selections: SelectionCache,
}

impl Versioned {
    pub(super) fn new(version: u64, set: Arc<PolicySet>) -> Self {
        Self {
            version,
            set,
            selections: SelectionCache::default(),
        }
    }

    /// The same policies as the next version, with an empty selection cache (for a change of
    /// something else selections depend on: pod metadata).
    pub(super) fn next(&self) -> Self {
        Self::new(self.version + 1, self.set.clone())
    }

    /// The policies in force, in order.
    pub fn policies(&self) -> &[Policy] {
        self.set.policies()
    }

    /// Whether a policy pins an executable's digest: only then are digests read.
    pub fn pins_digests(&self) -> bool {
        self.set.pins_digests()
    }
}

impl Versioned {
    /// The caller's admission: its selection (shared with its other connections through the
    /// version's cache) and the kernel verdict, if one holds whatever it asks.
    pub fn admit(&self, identity: &Identity) -> Admission {
        let selection = self.selections.get(&self.set, identity);
        let kernel_verdict = self
            .set
            .kernel_verdict(&selection, identity)
            .map(|verdict| (verdict, self.version));
        Admission {
            selection: Mutex::new((self.version, selection)),
            kernel_verdict,
        }
    }

    /// The plan for one request of an admitted caller, by the policy in force when it arrives
    /// (the selection is recomputed only when the version changed since the connection's
    /// last request, so the cost stays independent of how many policies exist).
    pub fn plan<'p>(
        &'p self,
        admission: &Admission,
        identity: &'p Identity,
        asked: Asked<'_>,
    ) -> Plan<'p> {
        let selection = {
            let mut cached = admission.selection.lock().expect("admission lock");
            if cached.0 != self.version {
                *cached = (self.version, self.selections.get(&self.set, identity));
            }
            cached.1.clone()
        };
        let decision = if asked.recursive {
            self.set
                .decide_subtree(&selection, identity, asked.method, asked.path)
        } else {
            self.set
                .decide(&selection, identity, asked.method, asked.path)
        };
        Plan {
            decision,
            tokens: self.set.token_rules(&selection),
            dry_run: self.set.dry_run(),
            set: &self.set,
            selection,
            identity,
        }
    }
}

impl Plan<'_> {
    /// Whether an entry of the allowed listing of `dir` may be shown (see
    /// [`PolicySet::listing_entry_visible`]).
    pub fn listing_entry_visible(&self, dir: &str, entry: &str) -> bool {
        self.set
            .listing_entry_visible(&self.selection, self.identity, dir, entry)
    }

    /// Why the request got its decision, every policy's part (for `--explain-denials`).
    pub fn explanation(&self, asked: Asked<'_>) -> String {
        let explanation = self.set.explain(self.identity, asked.method, asked.path);
        if asked.recursive && self.decision.action == Action::Deny {
            // The explanation is the path's; the subtree decided.
            format!(
                "recursive read: deny by policy '{}' rule '{}' (it denies part of the subtree); \
                 the path itself: {explanation}",
                self.decision.policy, self.decision.rule
            )
        } else {
            explanation
        }
    }
}

/// Which policies select a caller, shared across its connections for one policy version: SDKs
/// open a connection per request, and selecting scans every loaded policy. Keyed by what
/// selection depends on (the kernel-attested caller and the executable); a new version (a
/// reload, a policy resource, a pod change) starts with an empty cache.
#[derive(Default)]
pub struct SelectionCache {
    entries: Mutex<HashMap<SelectionKey, Arc<Selection>>>,
}

/// The caller, and the executable with what was checked of it: the same path running another
/// file (mounted over it, or another content) is another caller.
type SelectionKey = (CallerKey, Option<Executable>);

/// Entries kept before the cache starts over (a cheap bound; a miss only costs a scan).
const SELECTION_CACHE_MAX: usize = 8192;

impl SelectionCache {
    fn get(&self, set: &PolicySet, identity: &Identity) -> Arc<Selection> {
        let key: SelectionKey = (identity.key(), identity.exe.clone());
        if let Some(selection) = self.entries.lock().expect("selection cache").get(&key) {
            return selection.clone();
        }
        let selection = Arc::new(set.select(identity));
        let mut entries = self.entries.lock().expect("selection cache");
        if entries.len() >= SELECTION_CACHE_MAX {
            entries.clear();
        }
        entries.insert(key, selection.clone());
        selection
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        identity::pods::PodDirectory,
        policy::{Mode, Unmatched, parse},
    };

    fn version(version: u64, default: &str) -> Versioned {
        let policy = parse(
            Path::new("p.yaml"),
            &format!("name: p{version}\ndefault: {default}\n"),
        )
        .expect("valid policy");
        let set = PolicySet {
            policies: vec![policy],
            unmatched: Unmatched::Deny,
            mode: Mode::Enforce,
        };
        Versioned::new(version, Arc::new(set))
    }

    #[test]
    fn a_connection_admitted_under_one_version_is_decided_by_the_version_in_force() {
        let caller = Identity::for_cgroup("/app", 1000, 1000, &PodDirectory::default());
        let path = CanonicalPath::parse("/latest/meta-data/instance-id").unwrap();
        let asked = Asked {
            method: "GET",
            path: &path,
            recursive: false,
        };
        let first = version(1, "deny");
        let admission = first.admit(&caller);
        assert_eq!(
            admission.kernel_verdict,
            Some((KernelVerdict::Refuse, 1)),
            "nothing can be allowed: the kernel may refuse the next connects"
        );
        let plan = first.plan(&admission, &caller, asked);
        assert_eq!(
            (plan.decision.action, plan.decision.policy),
            (Action::Deny, "p1")
        );

        // A reload while the connection stays open: its next request is the new version's.
        let second = version(2, "allow");
        let plan = second.plan(&admission, &caller, asked);
        assert_eq!(
            (plan.decision.action, plan.decision.policy),
            (Action::Allow, "p2")
        );
        assert_eq!(second.admit(&caller).kernel_verdict, None);

        // The same policies as a new version (a pod change) select afresh.
        let third = second.next();
        assert_eq!(third.version, 3);
        let plan = third.plan(&admission, &caller, asked);
        assert_eq!(plan.decision.policy, "p2");
        assert_eq!(admission.selection.lock().unwrap().0, 3);
    }
}
