//! Policies: YAML documents of ordered rules, compiled once and evaluated per request.
//!
//! ```yaml
//! name: web                  # names the policy in denials and audit lines
//! mode: enforce              # enforce (default) | audit: would-deny is logged, then allowed
//! callers:                   # which callers this policy governs (omitted: every caller)
//!   cgroups: ["/web/**"]     # cgroup path globs, relative to the enforced root (--cgroup)
//!   uids: [1000]             # any of these uids (omitted: any uid); gids likewise
//!   units: ["nginx.service"] # systemd unit globs
//!   executables: ["/usr/bin/python3*"]
//!   namespaces: [payments]   # pods: namespace, labels (all must match), service account,
//!   podLabels: {app: api}    #       container name
//!   serviceAccounts: [api]
//!   containers: [app]
//! default: deny              # required: the decision when no rule matches
//! rules:                     # in order; the first rule that matches decides for this policy
//!   - name: instance-info
//!     action: allow          # allow | deny
//!     methods: [GET, HEAD]   # required; "*" for any method
//!     groups: [instance-info]            # named path groups (see `groups`)
//!     paths: ["/latest/meta-data/tags/**"] # and/or path patterns (see `pattern`)
//!     callers: {uids: [0]}   # optional: narrows the rule further
//! ```
//!
//! Precedence when several policies select one caller: each policy gives its verdict (its
//! first matching rule, else its default). A rule beats a default; between rules the more
//! specific path pattern wins (`pattern::Specificity`), and at equal specificity deny wins.
//! Between defaults only, deny wins. A caller no policy selects gets the agent's `--unmatched`
//! decision (deny unless set otherwise). Audit-mode policies never change a decision: the
//! decision is made by the enforcing policies alone (allow if only audit policies select the
//! caller), and where the audit policies would have denied, the request is logged and counted
//! as would-deny.

mod compile;
mod decide;
mod document;
mod exe_pattern;
mod explain;
pub mod groups;
mod load;
pub mod pattern;
mod plan;
pub mod store;
mod suggest;
mod view;

use std::fmt;

use serde::Deserialize;

pub use compile::{Policy, PolicyError, compile_resource};
pub use decide::{Decision, Selection, TokenRules};
pub use document::{PolicyDocument, RuleDocument, SelectorDocument, TokensDocument, ViewDocument};
pub(crate) use load::yaml_error;
pub use load::{parse, parse_all};
pub use pattern::{
    CanonicalPath, CompiledPatterns, NamePattern, PathError, PathPattern, PatternSet, Specificity,
};
pub use plan::{Admission, Asked, Plan, Versioned};
pub(crate) use suggest::did_you_mean;
pub use view::View;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Deserialize,
    serde::Serialize,
    clap::ValueEnum,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// What happens to callers that no policy selects (`--unmatched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unmatched {
    /// Served through the filter, with audit lines.
    Allow,
    /// Denied (403), and refused in the kernel after the first request.
    Deny,
    /// Not diverted at all once the agent has seen them: no filter, no audit line, no cost.
    Bypass,
}

impl Unmatched {
    pub fn action(self) -> Action {
        match self {
            Self::Deny => Action::Deny,
            Self::Allow | Self::Bypass => Action::Allow,
        }
    }
}

impl fmt::Display for Unmatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Bypass => "bypass",
        })
    }
}

/// A decision the kernel can make for a caller without asking the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelVerdict {
    Refuse,
    Bypass,
}

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// The policy name in decisions for callers that no policy selects.
pub const UNMATCHED_POLICY: &str = "(none)";
/// The rule name in decisions made by a policy's `default`.
pub const DEFAULT_RULE: &str = "default";

/// The known HTTP methods a rule may name (RFC 9110 plus PATCH).
pub(crate) const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE",
];

/// All loaded policies plus the decision for callers none of them selects.
#[derive(Debug, Clone)]
pub struct PolicySet {
    pub(super) policies: Vec<Policy>,
    pub(super) unmatched: Unmatched,
    /// The agent's `--mode`: in audit mode (a dry run) nothing is denied; every denial is
    /// logged and counted as would-deny instead.
    pub(super) mode: Mode,
}

impl PolicySet {
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Whether a policy pins an executable's digest: only then are digests read.
    pub fn pins_digests(&self) -> bool {
        self.policies.iter().any(Policy::pins_digests)
    }

    /// This set with the agent's mode (`--mode audit`: a dry run).
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// This set followed by `more` (policies from API resources).
    pub fn with(&self, more: &[Policy]) -> Self {
        let mut set = self.clone();
        set.policies.extend_from_slice(more);
        set
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
