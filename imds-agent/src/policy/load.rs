//! Loading policy files: the files of a directory, several policies per file, YAML errors
//! with their line, column and field, and name clashes across files.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::{
    Mode, PolicyError, PolicySet, Unmatched,
    compile::{Located, Policy, compile, valid_name},
    document::PolicyDocument,
    suggest::did_you_mean,
};

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

pub(crate) fn yaml_error(file: &Path, text: &str, error: &serde_saphyr::Error) -> PolicyError {
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
