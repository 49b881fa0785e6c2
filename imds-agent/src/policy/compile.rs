//! Compiling a document into the form decisions are made with: every pattern parsed once,
//! every error found with its file, line, column and field.

use std::{
    collections::{BTreeMap, HashSet},
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_saphyr::Spanned;

use super::{
    Action, DEFAULT_RULE, METHODS, Mode,
    document::{PolicyDocument, RuleDocument, SelectorDocument, TokensDocument},
    exe_pattern::ExePattern,
    groups,
    pattern::{CanonicalPath, CompiledPatterns, NamePattern, PathPattern},
    suggest::did_you_mean,
    view::{DocumentViews, View, compile_view},
};

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

pub(super) struct Located<'a> {
    pub(super) file: &'a Path,
    pub(super) errors: Vec<PolicyError>,
}

impl Located<'_> {
    pub(super) fn error<T>(
        &mut self,
        at: &Spanned<T>,
        field: impl Into<String>,
        message: impl fmt::Display,
    ) {
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
    pub(super) cgroups: Vec<PathPattern>,
    pub(super) units: Vec<NamePattern>,
    pub(super) executables: Vec<ExePattern>,
    pub(super) uids: Vec<u32>,
    pub(super) gids: Vec<u32>,
    pub(super) namespaces: Vec<String>,
    pub(super) pod_labels: BTreeMap<String, String>,
    pub(super) service_accounts: Vec<String>,
    pub(super) containers: Vec<String>,
}

#[derive(Debug, Clone)]
pub(super) enum Methods {
    Any,
    Only(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub(super) name: String,
    pub(super) action: Action,
    pub(super) methods: Methods,
    pub(super) paths: Arc<CompiledPatterns>,
    pub(super) callers: Selector,
    /// What of the answers it allows its callers get (the rule's `view`).
    pub(super) view: Option<Arc<View>>,
    /// Documents the rule's groups grant through a view (the rule's own view added), where
    /// nothing else in the rule grants them whole.
    pub(super) documents: Arc<DocumentViews>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub(super) name: String,
    pub(super) source: PathBuf,
    pub(super) mode: Mode,
    pub(super) callers: Selector,
    pub(super) default: Action,
    pub(super) rules: Vec<Rule>,
    pub(super) tokens: TokensDocument,
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

    pub(super) fn uses_executables(&self) -> bool {
        !self.callers.executables.is_empty()
            || self.rules.iter().any(|r| !r.callers.executables.is_empty())
    }

    pub(super) fn pins_digests(&self) -> bool {
        std::iter::once(&self.callers)
            .chain(self.rules.iter().map(|r| &r.callers))
            .any(|s| s.executables.iter().any(ExePattern::pins_digest))
    }
}

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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

pub(super) fn compile(
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
            let (paths, documents) = compile_paths(&mut at, &field, rule);
            let callers =
                compile_selector(&mut at, &format!("{field}.callers"), rule.callers.as_ref());
            let view = compile_view(&mut at, &field, rule.action, &rule.name, rule.view.as_ref());
            let documents = match &view {
                Some(view) if !documents.0.is_empty() => Arc::new(DocumentViews(
                    documents
                        .0
                        .iter()
                        .map(|(path, document)| (path.clone(), Arc::new(document.and(view))))
                        .collect(),
                )),
                _ => documents,
            };
            Rule {
                name: rule.name.value.clone(),
                action: rule.action,
                methods,
                paths,
                callers,
                view,
                documents,
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

/// The rule's patterns, and the documents its groups grant through a view. A document some
/// other pattern of the rule grants (a path, or a group granting it whole) is granted whole:
/// within one rule, what its groups grant adds up.
fn compile_paths(
    at: &mut Located<'_>,
    field: &str,
    rule: &RuleDocument,
) -> (Arc<CompiledPatterns>, Arc<DocumentViews>) {
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
        return (Arc::clone(&shared.paths), Arc::clone(&shared.documents));
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
    let mut documents = Vec::new();
    for (i, group) in rule.groups.iter().enumerate() {
        match groups::compiled(&group.value) {
            Some(group) => {
                let granted_whole = group.paths.patterns().iter().filter(|p| {
                    !group
                        .documents
                        .0
                        .iter()
                        .any(|(document, _)| p.as_str() == document)
                });
                patterns.extend(granted_whole.cloned());
                documents.extend(group.documents.0.iter().cloned());
            }
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
    let whole = CompiledPatterns::new(patterns.clone());
    documents.retain(|(document, _)| {
        CanonicalPath::parse(document).is_ok_and(|path| whole.best_match(&path).is_none())
    });
    patterns.extend(documents.iter().map(|(document, _)| {
        PathPattern::parse(document).expect("built-in documents parse (unit-tested)")
    }));
    (
        Arc::new(CompiledPatterns::new(patterns)),
        Arc::new(DocumentViews(documents)),
    )
}

fn compile_selector(at: &mut Located<'_>, field: &str, doc: Option<&SelectorDocument>) -> Selector {
    let Some(doc) = doc else {
        return Selector::default();
    };
    let cgroups = compile_list(at, field, "cgroups", &doc.cgroups, PathPattern::parse);
    let units = compile_list(at, field, "units", &doc.units, NamePattern::parse);
    let executables = compile_list(
        at,
        field,
        "executables",
        &doc.executables,
        ExePattern::parse,
    );
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

/// Parses each pattern of a list; each one that does not parse is an error at its own position.
fn compile_list<T, E: fmt::Display>(
    at: &mut Located<'_>,
    field: &str,
    list: &str,
    values: &[Spanned<String>],
    parse: impl Fn(&str) -> Result<T, E>,
) -> Vec<T> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, value)| match parse(&value.value) {
            Ok(pattern) => Some(pattern),
            Err(error) => {
                at.error(
                    value,
                    format!("{field}.{list}[{i}]"),
                    format_args!("{:?}: {error}", value.value),
                );
                None
            }
        })
        .collect()
}
