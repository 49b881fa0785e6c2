//! Policy v1: YAML files of ordered rules, compiled once and evaluated per request.
//!
//! ```yaml
//! name: web                  # names the policy in denials and audit lines
//! callers:                   # which callers this policy governs (omitted: every caller)
//!   cgroups: ["/web/**"]     # cgroup path globs, relative to the enforced root (--cgroup)
//!   uids: [1000]             # any of these uids (omitted: any uid)
//!   gids: [1000]
//!   units: ["nginx.service"] # systemd unit globs
//! default: deny              # required: the decision when no rule matches
//! rules:                     # in order; the first rule that matches decides
//!   - name: instance-info
//!     action: allow          # allow | deny
//!     methods: [GET, HEAD]   # required; "*" for any method
//!     paths: ["/latest/meta-data/instance-id", "/latest/meta-data/placement/**"]
//!     callers: {uids: [0]}   # optional: narrows the rule further
//! ```
//!
//! Several policies: files are read in the order given (a directory in file-name order). A
//! caller is governed by the first policy whose `callers` selects it; a caller no policy
//! selects gets the agent's `--unmatched` decision (deny unless set otherwise). Path pattern
//! syntax: see [`pattern`].

pub mod pattern;

use std::{
    collections::HashSet,
    fmt, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::identity::Identity;
pub use pattern::{CanonicalPath, NamePattern, PathError, PathPattern};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
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

// ---------------------------------------------------------------------------------------------
// The file format. Spanned values carry their line and column for error messages.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    name: Spanned<String>,
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for people reading the file")]
    description: Option<String>,
    #[serde(default)]
    callers: Option<SelectorDoc>,
    default: Action,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: Spanned<String>,
    action: Action,
    methods: Spanned<Vec<Spanned<String>>>,
    paths: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    callers: Option<SelectorDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorDoc {
    #[serde(default)]
    cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    units: Vec<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Errors: always file, line, column, the field and what is wrong.

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {source}", file.display())]
    Read { file: PathBuf, source: io::Error },
    #[error("{}:{line}:{column}: {field}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: u64,
        column: u64,
        field: String,
        message: String,
    },
    #[error("{}: no policy files (*.yaml, *.yml) in this directory", .0.display())]
    EmptyDirectory(PathBuf),
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

/// Which callers a policy or rule applies to. Empty lists do not constrain.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    cgroups: Vec<PathPattern>,
    units: Vec<NamePattern>,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Selector {
    fn matches(&self, caller: &ResolvedCaller<'_>) -> bool {
        (self.cgroups.is_empty() || self.cgroups.iter().any(|p| p.matches(&caller.cgroup)))
            && (self.units.is_empty()
                || caller
                    .unit
                    .is_some_and(|unit| self.units.iter().any(|p| p.matches(unit))))
            && (self.uids.is_empty() || self.uids.contains(&caller.uid))
            && (self.gids.is_empty() || self.gids.contains(&caller.gid))
    }
}

#[derive(Debug, Clone)]
enum Methods {
    Any,
    Only(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Rule {
    name: String,
    action: Action,
    methods: Methods,
    paths: Vec<PathPattern>,
    callers: Selector,
}

#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    source: PathBuf,
    callers: Selector,
    default: Action,
    rules: Vec<Rule>,
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
}

/// All loaded policies plus the decision for callers none of them selects.
#[derive(Debug, Clone)]
pub struct PolicySet {
    policies: Vec<Policy>,
    unmatched: Action,
}

/// The outcome for one request, naming what decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub action: Action,
    pub policy: &'a str,
    pub rule: &'a str,
}

/// The policy name in decisions for callers that no policy selects.
pub const UNMATCHED_POLICY: &str = "(none)";
/// The rule name in decisions made by a policy's `default`.
pub const DEFAULT_RULE: &str = "default";

/// The parts of an identity the policy uses, for a caller whose cgroup was resolved.
struct ResolvedCaller<'a> {
    cgroup: CanonicalPath<'a>,
    unit: Option<&'a str>,
    uid: u32,
    gid: u32,
}

impl<'a> ResolvedCaller<'a> {
    fn new(identity: &'a Identity) -> Option<Self> {
        Some(Self {
            cgroup: CanonicalPath::parse(identity.cgroup.as_deref()?).ok()?,
            unit: identity.unit.as_deref(),
            uid: identity.uid,
            gid: identity.gid,
        })
    }
}

/// Which policy governs a caller; computed once per connection (the identity is fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Policy(usize),
    Unmatched,
    /// The caller's cgroup could not be resolved: every request is denied.
    Unresolved,
}

impl PolicySet {
    /// Loads policy files; a directory contributes its `*.yaml`/`*.yml` files in name order.
    /// Returns every error found, so one run of `policy check` shows them all.
    pub fn load(paths: &[PathBuf], unmatched: Action) -> Result<Self, Vec<PolicyError>> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in paths {
            match policy_files(path) {
                Ok(found) => files.extend(found),
                Err(error) => errors.push(error),
            }
        }
        let mut policies: Vec<Policy> = Vec::new();
        for file in files {
            match load_file(&file) {
                Ok(policy) => {
                    if let Some(other) = policies.iter().find(|p| p.name == policy.name) {
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
            })
        } else {
            Err(errors)
        }
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn select(&self, identity: &Identity) -> Selection {
        let Some(caller) = ResolvedCaller::new(identity) else {
            return Selection::Unresolved;
        };
        self.policies
            .iter()
            .position(|p| p.callers.matches(&caller))
            .map_or(Selection::Unmatched, Selection::Policy)
    }

    /// The decision for one request. Pure: no I/O, no clock; the proxy calls it per request
    /// with the connection's selection.
    pub fn decide<'a>(
        &'a self,
        selection: Selection,
        identity: &Identity,
        method: &str,
        path: &CanonicalPath<'_>,
    ) -> Decision<'a> {
        let (policy, caller) = match (selection, ResolvedCaller::new(identity)) {
            (Selection::Policy(index), Some(caller)) => (&self.policies[index], caller),
            (Selection::Unmatched, Some(_)) => {
                return Decision {
                    action: self.unmatched,
                    policy: UNMATCHED_POLICY,
                    rule: "unmatched",
                };
            }
            _ => {
                return Decision {
                    action: Action::Deny,
                    policy: UNMATCHED_POLICY,
                    rule: "unresolved-cgroup",
                };
            }
        };
        let rule = policy.rules.iter().find(|rule| {
            let method_ok = match &rule.methods {
                Methods::Any => true,
                Methods::Only(methods) => methods.iter().any(|m| m == method),
            };
            method_ok && rule.paths.iter().any(|p| p.matches(path)) && rule.callers.matches(&caller)
        });
        match rule {
            Some(rule) => Decision {
                action: rule.action,
                policy: &policy.name,
                rule: &rule.name,
            },
            None => Decision {
                action: policy.default,
                policy: &policy.name,
                rule: DEFAULT_RULE,
            },
        }
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
    if files.is_empty() {
        return Err(PolicyError::EmptyDirectory(path.to_owned()));
    }
    Ok(files)
}

/// The known HTTP methods a rule may name (RFC 9110 plus PATCH).
const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE",
];

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn load_file(file: &Path) -> Result<Policy, Vec<PolicyError>> {
    let text = std::fs::read_to_string(file).map_err(|source| {
        vec![PolicyError::Read {
            file: file.to_owned(),
            source,
        }]
    })?;
    parse(file, &text)
}

/// Parses and validates one policy document.
pub fn parse(file: &Path, text: &str) -> Result<Policy, Vec<PolicyError>> {
    let doc: PolicyDoc =
        serde_saphyr::from_str(text).map_err(|e| vec![yaml_error(file, text, &e)])?;
    let mut at = Located {
        file,
        errors: Vec::new(),
    };
    if !valid_name(&doc.name.value) {
        at.error(&doc.name, "name", "must be 1-128 of A-Z a-z 0-9 - _ .");
    }
    let callers = compile_selector(&mut at, "callers", doc.callers.as_ref());
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
            Rule {
                name: rule.name.value.clone(),
                action: rule.action,
                methods: compile_methods(&mut at, &field, &rule.methods),
                paths: compile_paths(&mut at, &field, &rule.paths),
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
    Ok(Policy {
        name: doc.name.value,
        source: file.to_owned(),
        callers,
        default: doc.default,
        rules,
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
                    "unknown method {:?} (expected one of {}, or \"*\")",
                    method.value,
                    METHODS.join(", ")
                ),
            );
        }
    }
    Methods::Only(methods.value.iter().map(|m| m.value.clone()).collect())
}

fn compile_paths(
    at: &mut Located<'_>,
    field: &str,
    paths: &Spanned<Vec<Spanned<String>>>,
) -> Vec<PathPattern> {
    if paths.value.is_empty() {
        at.error(
            paths,
            format!("{field}.paths"),
            "must list at least one path pattern",
        );
    }
    paths
        .value
        .iter()
        .enumerate()
        .filter_map(|(i, path)| match PathPattern::parse(&path.value) {
            Ok(pattern) => Some(pattern),
            Err(e) => {
                at.error(
                    path,
                    format!("{field}.paths[{i}]"),
                    format_args!("{:?}: {e}", path.value),
                );
                None
            }
        })
        .collect()
}

fn compile_selector(at: &mut Located<'_>, field: &str, doc: Option<&SelectorDoc>) -> Selector {
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
    Selector {
        cgroups,
        units,
        uids: doc.uids.clone(),
        gids: doc.gids.clone(),
    }
}

fn yaml_error(file: &Path, text: &str, error: &serde_saphyr::Error) -> PolicyError {
    let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
    // serde-saphyr's Display is "error: line L column C: message", sometimes followed by a
    // source snippet; keep the message only, the location is printed in front of it.
    let display = error.to_string();
    let first = display.lines().next().unwrap_or("invalid YAML");
    let message = first
        .strip_prefix("error: ")
        .and_then(|rest| rest.strip_prefix("line "))
        .and_then(|rest| rest.split_once(": "))
        .map_or(first, |(_, message)| message)
        .to_owned();
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
mod tests;
