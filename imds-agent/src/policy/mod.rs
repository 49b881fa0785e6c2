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

mod exe_pattern;
pub mod groups;
pub mod pattern;
pub mod store;
mod suggest;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::identity::{Identity, executable::ExeOrigin};
use exe_pattern::ExePattern;
pub use pattern::{
    CanonicalPath, CompiledPatterns, NamePattern, PathError, PathPattern, PatternSet, Specificity,
};
use suggest::did_you_mean;

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

// ---------------------------------------------------------------------------------------------
// The document: a policy file, and the spec of the ImdsPolicy and ClusterImdsPolicy resources
// (`kube`), whose schema is derived from these types. Spanned values carry their line and
// column for error messages in files (unknown in API objects, which name the object instead).

/// An IMDS policy: which callers it governs, and per request, ordered rules and a default.
#[derive(Debug, Clone, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Names the policy in denials and audit lines. Required in a file; in a resource the
    /// object's name is used instead (and this field is not part of its schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub name: Option<Spanned<String>>,
    /// Free text for people reading the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// enforce (default), or audit: a would-be denial is logged and counted, then allowed.
    #[serde(default)]
    pub mode: Mode,
    /// Which callers this policy governs (omitted: every caller it may govern).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<SelectorDocument>,
    /// The decision when no rule matches a request.
    pub default: Action,
    /// In order; the first rule that matches decides for this policy.
    #[serde(default)]
    pub rules: Vec<RuleDocument>,
    /// AWS session tokens (IMDSv2) for the callers this policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensDocument>,
}

/// IMDSv2 per workload, on AWS endpoints: stricter than the instance's own setting.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokensDocument {
    /// Requests without a session token get 401, as on an instance with HttpTokens=required,
    /// even where the instance still serves IMDSv1.
    #[serde(default)]
    pub required: bool,
    /// The longest token lifetime these callers get: a token request asking for more is sent
    /// on asking for this (the response's TTL header tells the SDK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 21600))]
    pub max_ttl_seconds: Option<u32>,
}

/// One rule: an action for requests with these methods to these paths.
#[derive(Debug, Clone, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleDocument {
    /// Names the rule in denials and audit lines.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    pub action: Action,
    /// HTTP methods (GET, HEAD, PUT, ...), or "*" for any.
    #[schemars(with = "Vec<String>")]
    pub methods: Spanned<Vec<Spanned<String>>>,
    /// Path patterns: `*` one segment, `**` any depth, `{a,b}` alternatives.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub paths: Vec<Spanned<String>>,
    /// Named path groups (credentials, user-data, instance-info, ...).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub groups: Vec<Spanned<String>>,
    /// Narrows the rule to some of the policy's callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<SelectorDocument>,
}

/// Which callers: every field given must match (AND); any of a field's values may (OR).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorDocument {
    /// cgroup path patterns, relative to the enforced root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub cgroups: Vec<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gids: Vec<u32>,
    /// systemd unit name patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub units: Vec<Spanned<String>>,
    /// Executable path patterns, each optionally pinned to the program's content:
    /// `PATTERN@sha256:<64 hex digits>`. A host process matches a path only while it runs
    /// the node's file at that path; a container's path is its own file system's, and only
    /// a digest says which program runs there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub executables: Vec<Spanned<String>>,
    /// Pod namespaces. An ImdsPolicy governs pods of its own namespace only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Pod labels, all of which must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Container names in the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors: always file, line, column, the field and what is wrong.

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {source}", file.display())]
    Read { file: PathBuf, source: io::Error },
    #[error("{}{}: {field}: {message}", file.display(), position(*line, *column))]
    Invalid {
        file: PathBuf,
        line: u64,
        column: u64,
        field: String,
        message: String,
    },
}

/// `:line:column`, or nothing where the position is unknown (policies from the API server).
fn position(line: u64, column: u64) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

struct Located<'a> {
    file: &'a Path,
    errors: Vec<PolicyError>,
}

impl Located<'_> {
    fn error<T>(&mut self, at: &Spanned<T>, field: impl Into<String>, message: impl fmt::Display) {
        self.errors.push(PolicyError::Invalid {
            file: self.file.to_owned(),
            line: at.referenced.line(),
            column: at.referenced.column(),
            field: field.into(),
            message: message.to_string(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled form.

/// Which callers a policy or rule applies to. Empty lists do not constrain; a field that is
/// given must match (AND), and any of its values may (OR). Pod fields never match a caller
/// that is not a known pod.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    cgroups: Vec<PathPattern>,
    units: Vec<NamePattern>,
    executables: Vec<ExePattern>,
    uids: Vec<u32>,
    gids: Vec<u32>,
    namespaces: Vec<String>,
    pod_labels: BTreeMap<String, String>,
    service_accounts: Vec<String>,
    containers: Vec<String>,
}

impl Selector {
    fn matches(&self, caller: &ResolvedCaller<'_>) -> bool {
        self.mismatch(caller).is_none()
    }

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

    /// The first field that does not match, for `policy explain`.
    fn mismatch(&self, caller: &ResolvedCaller<'_>) -> Option<&'static str> {
        let any = |empty: bool, hit: bool| empty || hit;
        let pod = caller.identity.pod.as_deref();
        if !any(
            self.cgroups.is_empty(),
            self.cgroups.iter().any(|p| p.matches(&caller.cgroup)),
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
            let (Some(path), Some(exe)) = (&caller.exe, &caller.identity.exe) else {
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

#[derive(Debug, Clone)]
enum Methods {
    Any,
    Only(Vec<String>),
}

impl Methods {
    fn contains(&self, method: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(methods) => methods.iter().any(|m| m == method),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    name: String,
    action: Action,
    methods: Methods,
    paths: Arc<CompiledPatterns>,
    callers: Selector,
}

impl Rule {
    /// The specificity of the most specific pattern matching `path`, if the rule applies.
    fn matches(
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
}

#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    source: PathBuf,
    mode: Mode,
    callers: Selector,
    default: Action,
    rules: Vec<Rule>,
    tokens: TokensDocument,
}

impl Policy {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

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

    fn uses_executables(&self) -> bool {
        !self.callers.executables.is_empty()
            || self.rules.iter().any(|r| !r.callers.executables.is_empty())
    }

    fn pins_digests(&self) -> bool {
        std::iter::once(&self.callers)
            .chain(self.rules.iter().map(|r| &r.callers))
            .any(|s| s.executables.iter().any(ExePattern::pins_digest))
    }

    /// This policy's verdict: its first matching rule, else its default.
    fn verdict<'a>(
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
                    })
            })
            .unwrap_or(Verdict {
                action: self.default,
                policy: self,
                rule: None,
                specificity: None,
            })
    }
}

#[derive(Debug, Clone, Copy)]
struct Verdict<'a> {
    action: Action,
    policy: &'a Policy,
    rule: Option<&'a Rule>,
    /// `None` for a default.
    specificity: Option<Specificity>,
}

impl<'a> Verdict<'a> {
    fn rule_name(&self) -> &'a str {
        self.rule.map_or(DEFAULT_RULE, |r| r.name.as_str())
    }

    /// Precedence: a rule beats a default, a more specific rule beats a less specific one,
    /// and deny beats allow when they are otherwise equal.
    fn rank(&self) -> (bool, Option<Specificity>, bool) {
        (
            self.specificity.is_some(),
            self.specificity,
            self.action == Action::Deny,
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

/// All loaded policies plus the decision for callers none of them selects.
#[derive(Debug, Clone)]
pub struct PolicySet {
    policies: Vec<Policy>,
    unmatched: Unmatched,
    /// The agent's `--mode`: in audit mode (a dry run) nothing is denied; every denial is
    /// logged and counted as would-deny instead.
    mode: Mode,
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
}

/// Token requirements for one caller (see [`PolicySet::token_rules`]), with the policies that
/// set them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenRules<'a> {
    pub required_by: Option<&'a str>,
    pub max_ttl: Option<(u32, &'a str)>,
}

/// The policy name in decisions for callers that no policy selects.
pub const UNMATCHED_POLICY: &str = "(none)";
/// The rule name in decisions made by a policy's `default`.
pub const DEFAULT_RULE: &str = "default";

/// The parts of an identity the policy uses, for a caller whose cgroup was resolved.
struct ResolvedCaller<'a> {
    identity: &'a Identity,
    cgroup: CanonicalPath<'a>,
    exe: Option<CanonicalPath<'a>>,
}

impl<'a> ResolvedCaller<'a> {
    fn new(identity: &'a Identity) -> Option<Self> {
        Some(Self {
            identity,
            cgroup: CanonicalPath::parse(identity.cgroup.as_deref()?).ok()?,
            exe: identity
                .exe
                .as_ref()
                .and_then(|e| CanonicalPath::parse(&e.path).ok()),
        })
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
    /// Loads policy files; a directory contributes its `*.yaml`/`*.yml` files in name order.
    /// Returns every error found, so one run of `policy check` shows them all.
    pub fn load(paths: &[PathBuf], unmatched: Unmatched) -> Result<Self, Vec<PolicyError>> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in paths {
            match policy_files(path) {
                Ok(found) => files.extend(found),
                Err(error) => errors.push(error),
            }
        }
        // Parsing dominates loading many files: spread it over the cores, keep file order.
        let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let chunk = files.len().div_ceil(workers).max(1);
        let parsed: Vec<(PathBuf, Result<Policy, Vec<PolicyError>>)> =
            std::thread::scope(|scope| {
                let handles: Vec<_> = files
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || {
                            part.iter()
                                .map(|f| (f.clone(), load_file(f)))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("policy parser thread"))
                    // A file of several documents gives several policies.
                    .flat_map(|(file, result)| match result {
                        Ok(policies) => policies
                            .into_iter()
                            .map(|p| (file.clone(), Ok(p)))
                            .collect::<Vec<_>>(),
                        Err(errors) => vec![(file, Err(errors))],
                    })
                    .collect()
            });
        let mut policies: Vec<Policy> = Vec::new();
        // Name -> index, so checking 10,000 names costs 10,000 lookups, not 50 million compares.
        let mut names: HashMap<String, usize> = HashMap::new();
        for (file, result) in parsed {
            match result {
                Ok(policy) => {
                    if let Some(other) = names.get(&policy.name).map(|&i| &policies[i]) {
                        errors.push(PolicyError::Invalid {
                            file: file.clone(),
                            line: 1,
                            column: 1,
                            field: "name".into(),
                            message: format!(
                                "policy name {:?} is already used by {}",
                                policy.name,
                                other.source.display()
                            ),
                        });
                    } else {
                        names.insert(policy.name.clone(), policies.len());
                    }
                    policies.push(policy);
                }
                Err(mut file_errors) => errors.append(&mut file_errors),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                policies,
                unmatched,
                mode: Mode::Enforce,
            })
        } else {
            Err(errors)
        }
    }

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
            (Some(v), _) => Decision {
                action: v.action,
                policy: &v.policy.name,
                rule: v.rule_name(),
                would_deny: would_deny(v.action),
            },
            // Only audit policies select the caller: allowed, and reported.
            (None, Some(v)) => Decision {
                action: Action::Allow,
                policy: &v.policy.name,
                rule: v.rule_name(),
                would_deny: would_deny(Action::Allow),
            },
            (None, None) => Decision {
                action: self.unmatched.action(),
                policy: UNMATCHED_POLICY,
                rule: "unmatched",
                would_deny: None,
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
            .any(|r| r.paths.patterns().iter().any(|p| p.matches_below(&path)))
    }

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

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_err = |source| PolicyError::Read {
        file: path.to_owned(),
        source,
    };
    if !path.is_dir() {
        // A missing file is reported when it is read.
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    // An empty directory is no policies: every caller gets --unmatched (deny by default),
    // never allow-all because a file is missing.
    Ok(files)
}

/// The known HTTP methods a rule may name (RFC 9110 plus PATCH).
pub(crate) const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE",
];

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn load_file(file: &Path) -> Result<Vec<Policy>, Vec<PolicyError>> {
    let text = std::fs::read_to_string(file).map_err(|source| {
        vec![PolicyError::Read {
            file: file.to_owned(),
            source,
        }]
    })?;
    parse_all(file, &text)
}

/// Parses and validates a policy file of one policy.
pub fn parse(file: &Path, text: &str) -> Result<Policy, Vec<PolicyError>> {
    let mut policies = parse_all(file, text)?;
    if policies.len() != 1 {
        return Err(vec![PolicyError::Invalid {
            file: file.to_owned(),
            line: 1,
            column: 1,
            field: "document".into(),
            message: format!("{} policies where one was expected", policies.len()),
        }]);
    }
    Ok(policies.remove(0))
}

/// Parses and validates a policy file: one policy, or several as YAML documents (`---`), as
/// Kubernetes users write manifests. Errors of every document are reported together.
pub fn parse_all(file: &Path, text: &str) -> Result<Vec<Policy>, Vec<PolicyError>> {
    let documents: Vec<Option<PolicyDocument>> =
        serde_saphyr::from_multiple(text).map_err(|e| vec![yaml_error(file, text, &e)])?;
    let documents: Vec<PolicyDocument> = documents.into_iter().flatten().collect();
    if documents.is_empty() {
        return Err(vec![PolicyError::Invalid {
            file: file.to_owned(),
            line: 1,
            column: 1,
            field: "document".into(),
            message: "no policy in the file".into(),
        }]);
    }
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for doc in &documents {
        match parse_document(file, doc) {
            Ok(policy) => policies.push(policy),
            Err(found) => errors.extend(found),
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

fn parse_document(file: &Path, doc: &PolicyDocument) -> Result<Policy, Vec<PolicyError>> {
    let Some(name) = &doc.name else {
        return Err(vec![PolicyError::Invalid {
            file: file.to_owned(),
            line: 1,
            column: 1,
            field: "name".into(),
            message: "required: names the policy in denials and audit lines".into(),
        }]);
    };
    let mut at = Located {
        file,
        errors: Vec::new(),
    };
    if !valid_name(&name.value) {
        at.error(name, "name", "must be 1-128 of A-Z a-z 0-9 - _ .");
    }
    compile(at, name.value.clone(), doc, None)
}

/// Validates the spec of an API object (ImdsPolicy, ClusterImdsPolicy). `source` names the
/// object in errors and explanations; `name` names the policy in denials. A namespaced policy
/// governs pods of `namespace` only: whatever its selectors say, it selects no other caller.
pub fn compile_resource(
    source: &Path,
    name: String,
    doc: &PolicyDocument,
    namespace: Option<&str>,
) -> Result<Policy, Vec<PolicyError>> {
    let mut at = Located {
        file: source,
        errors: Vec::new(),
    };
    if let Some(given) = &doc.name {
        at.error(
            given,
            "name",
            "not allowed in a resource: metadata.name names the policy",
        );
    }
    compile(at, name, doc, namespace)
}

fn compile(
    mut at: Located<'_>,
    name: String,
    doc: &PolicyDocument,
    namespace: Option<&str>,
) -> Result<Policy, Vec<PolicyError>> {
    let file = at.file;
    let mut callers = compile_selector(&mut at, "callers", doc.callers.as_ref());
    if let Some(namespace) = namespace {
        if callers.namespaces.iter().any(|n| n != namespace) {
            at.errors.push(PolicyError::Invalid {
                file: file.to_owned(),
                line: 0,
                column: 0,
                field: "callers.namespaces".into(),
                message: format!(
                    "an ImdsPolicy governs pods of its own namespace ({namespace}) only; use a \
                     ClusterImdsPolicy for others"
                ),
            });
        }
        callers.namespaces = vec![namespace.to_owned()];
    }
    let mut rule_names = HashSet::new();
    let rules = doc
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let field = format!("rules[{i}]");
            if !valid_name(&rule.name.value) {
                at.error(
                    &rule.name,
                    format!("{field}.name"),
                    "must be 1-128 of A-Z a-z 0-9 - _ .",
                );
            } else if rule.name.value == DEFAULT_RULE {
                at.error(
                    &rule.name,
                    format!("{field}.name"),
                    "'default' names the policy's default",
                );
            } else if !rule_names.insert(rule.name.value.clone()) {
                at.error(
                    &rule.name,
                    format!("{field}.name"),
                    "duplicate rule name in this policy",
                );
            }
            // In document order, so errors are too.
            let methods = compile_methods(&mut at, &field, &rule.methods);
            let paths = compile_paths(&mut at, &field, rule);
            Rule {
                name: rule.name.value.clone(),
                action: rule.action,
                methods,
                paths,
                callers: compile_selector(
                    &mut at,
                    &format!("{field}.callers"),
                    rule.callers.as_ref(),
                ),
            }
        })
        .collect();
    if !at.errors.is_empty() {
        return Err(at.errors);
    }
    let tokens = doc.tokens.clone().unwrap_or_default();
    if let Some(ttl) = tokens.max_ttl_seconds
        && !(1..=21_600).contains(&ttl)
    {
        at.errors.push(PolicyError::Invalid {
            file: file.to_owned(),
            line: 0,
            column: 0,
            field: "tokens.maxTtlSeconds".into(),
            message: format!("{ttl}: must be 1 to 21600 (AWS's own bounds)"),
        });
    }
    if !at.errors.is_empty() {
        return Err(at.errors);
    }
    Ok(Policy {
        name,
        source: file.to_owned(),
        mode: doc.mode,
        callers,
        default: doc.default,
        rules,
        tokens,
    })
}

fn compile_methods(
    at: &mut Located<'_>,
    field: &str,
    methods: &Spanned<Vec<Spanned<String>>>,
) -> Methods {
    if methods.value.is_empty() {
        at.error(
            methods,
            format!("{field}.methods"),
            "must name at least one method, or \"*\"",
        );
    }
    if methods.value.iter().any(|m| m.value == "*") {
        if methods.value.len() > 1 {
            at.error(methods, format!("{field}.methods"), "\"*\" stands alone");
        }
        return Methods::Any;
    }
    for (i, method) in methods.value.iter().enumerate() {
        if !METHODS.contains(&method.value.as_str()) {
            at.error(
                method,
                format!("{field}.methods[{i}]"),
                format_args!(
                    "unknown method {:?} (expected one of {}, or \"*\"){}",
                    method.value,
                    METHODS.join(", "),
                    did_you_mean(&method.value, &METHODS)
                ),
            );
        }
    }
    Methods::Only(methods.value.iter().map(|m| m.value.clone()).collect())
}

fn compile_paths(at: &mut Located<'_>, field: &str, rule: &RuleDocument) -> Arc<CompiledPatterns> {
    if rule.paths.is_empty() && rule.groups.is_empty() {
        at.error(
            &rule.name,
            format!("{field}.paths"),
            "a rule needs at least one path pattern or group",
        );
    }
    // One group and nothing else (the usual rule): the group's shared copy.
    if let ([], [group]) = (rule.paths.as_slice(), rule.groups.as_slice())
        && let Some(shared) = groups::compiled(&group.value)
    {
        return Arc::clone(shared);
    }
    let mut patterns = Vec::new();
    for (i, path) in rule.paths.iter().enumerate() {
        match PathPattern::parse(&path.value) {
            Ok(pattern) => patterns.push(pattern),
            Err(e) => at.error(
                path,
                format!("{field}.paths[{i}]"),
                format_args!("{:?}: {e}", path.value),
            ),
        }
    }
    for (i, group) in rule.groups.iter().enumerate() {
        match groups::compiled(&group.value) {
            Some(group) => patterns.extend_from_slice(group.patterns()),
            None => at.error(
                group,
                format!("{field}.groups[{i}]"),
                format_args!(
                    "unknown group {:?} (expected one of {}){}",
                    group.value,
                    groups::NAMES.join(", "),
                    did_you_mean(&group.value, &groups::NAMES)
                ),
            ),
        }
    }
    Arc::new(CompiledPatterns::new(patterns))
}

fn compile_selector(at: &mut Located<'_>, field: &str, doc: Option<&SelectorDocument>) -> Selector {
    let Some(doc) = doc else {
        return Selector::default();
    };
    let cgroups = doc
        .cgroups
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match PathPattern::parse(&c.value) {
            Ok(p) => Some(p),
            Err(e) => {
                at.error(
                    c,
                    format!("{field}.cgroups[{i}]"),
                    format_args!("{:?}: {e}", c.value),
                );
                None
            }
        })
        .collect();
    let units = doc
        .units
        .iter()
        .enumerate()
        .filter_map(|(i, u)| match NamePattern::parse(&u.value) {
            Ok(p) => Some(p),
            Err(e) => {
                at.error(
                    u,
                    format!("{field}.units[{i}]"),
                    format_args!("{:?}: {e}", u.value),
                );
                None
            }
        })
        .collect();
    let executables = doc
        .executables
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match ExePattern::parse(&e.value) {
            Ok(p) => Some(p),
            Err(err) => {
                at.error(
                    e,
                    format!("{field}.executables[{i}]"),
                    format_args!("{:?}: {err}", e.value),
                );
                None
            }
        })
        .collect();
    Selector {
        cgroups,
        units,
        executables,
        uids: doc.uids.clone(),
        gids: doc.gids.clone(),
        namespaces: doc.namespaces.clone(),
        pod_labels: doc.pod_labels.clone(),
        service_accounts: doc.service_accounts.clone(),
        containers: doc.containers.clone(),
    }
}

fn yaml_error(file: &Path, text: &str, error: &serde_saphyr::Error) -> PolicyError {
    let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
    // serde-saphyr's Display is "error: line L column C: message", sometimes followed by a
    // source snippet; keep the message only, the location is printed in front of it.
    let display = error.to_string();
    let first = display.lines().next().unwrap_or("invalid YAML");
    let mut message = first
        .strip_prefix("error: ")
        .and_then(|rest| rest.strip_prefix("line "))
        .and_then(|rest| rest.split_once(": "))
        .map_or(first, |(_, message)| message)
        .to_owned();
    // serde names an unknown field or variant in backticks, then what it expected (in
    // backticks, or as a plain list after "expected one of").
    if message.starts_with("unknown field") || message.starts_with("unknown variant") {
        let named: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
        let plain: Vec<&str> = message
            .split_once("expected one of ")
            .map(|(_, list)| {
                list.split([',', ' '])
                    .filter(|w| !w.is_empty() && *w != "or")
                    .collect()
            })
            .unwrap_or_default();
        if let [given, rest @ ..] = named.as_slice() {
            let expected = if rest.is_empty() {
                plain.as_slice()
            } else {
                rest
            };
            let suggestion = did_you_mean(given, expected);
            message.push_str(&suggestion);
        }
    }
    PolicyError::Invalid {
        file: file.to_owned(),
        line,
        column,
        field: key_on_line(text, line).unwrap_or_else(|| "document".into()),
        message,
    }
}

/// The mapping key written on a (1-based) line, e.g. `default` for `  - default: alow`.
fn key_on_line(text: &str, line: u64) -> Option<String> {
    let source = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let (key, _) = source
        .trim_start()
        .trim_start_matches("- ")
        .split_once(':')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    .then(|| key.to_owned())
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
