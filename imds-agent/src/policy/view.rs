//! Views: what of an allowed answer its callers get. A rule's `view` keeps some keys of user
//! data, or removes fields of a document; groups grant some documents through a view of their
//! own (`groups::documents`). The policy only says which view applies; `reduce` applies it to
//! the answer.
//!
//! A removed field is named by its metadata path, so one rule says both what is cut from the
//! document and what may not be read by the field's own path: a request at or below a removed
//! field is denied, and a listing never shows it.

use std::{fmt, sync::Arc};

use serde_saphyr::Spanned;

use super::{Action, compile::Located, document::ViewDocument, pattern::CanonicalPath};

/// A view of an allowed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Only these keys of user data (empty: every key): env names, or a JSON object's
    /// top-level keys and dotted paths below them.
    keys: Vec<String>,
    /// Fields removed from documents, by metadata path (canonical text, and its segments).
    without: Vec<(String, Vec<String>)>,
}

impl View {
    /// A view that removes `fields` (metadata paths; the built-in groups' documents).
    pub(super) fn without(fields: &[&str]) -> Self {
        Self::new(&[], fields).expect("built-in fields parse (unit-tested)")
    }

    /// A view of these keys and without these fields, as a rule's `view` says them (for
    /// tests and fuzzing; policies are compiled with their errors located).
    pub fn new(keys: &[&str], without: &[&str]) -> Result<Self, String> {
        if let Some((key, problem)) = keys.iter().find_map(|k| key_error(k).map(|p| (k, p))) {
            return Err(format!("{key:?}: {problem}"));
        }
        let mut fields = Vec::new();
        for field in without {
            let path = CanonicalPath::parse(field).map_err(|e| format!("{field:?}: {e}"))?;
            if path.segments.is_empty() {
                return Err("the root is not a field".into());
            }
            fields.push((path.as_str().to_owned(), owned(&path.segments)));
        }
        Ok(Self {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            without: fields,
        })
    }

    /// The keys of user data a caller may read (empty: the view keeps every key).
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The removed field that `path` is, or is below: such a path may not be read.
    pub fn removes(&self, path: &CanonicalPath<'_>) -> Option<&str> {
        self.without
            .iter()
            .find(|(_, field)| {
                path.segments.len() >= field.len()
                    && path.segments.iter().zip(field).all(|(a, b)| *a == b)
            })
            .map(|(text, _)| text.as_str())
    }

    /// The removed fields inside the answer for `path`, relative to it (segments).
    pub fn fields_below<'v>(
        &'v self,
        path: &CanonicalPath<'_>,
    ) -> impl Iterator<Item = &'v [String]> {
        let depth = path.segments.len();
        self.without
            .iter()
            .filter(move |(_, field)| {
                field.len() > depth && field[..depth].iter().eq(path.segments.iter())
            })
            .map(move |(_, field)| &field[depth..])
    }

    /// Whether anything of the answer for `path` is cut (keys kept, or fields removed below).
    pub fn cuts(&self, path: &CanonicalPath<'_>) -> bool {
        !self.keys.is_empty() || self.fields_below(path).next().is_some()
    }

    /// This view, and `other`'s removals too.
    pub(super) fn and(&self, other: &Self) -> Self {
        let mut merged = self.clone();
        for field in &other.without {
            if !merged.without.contains(field) {
                merged.without.push(field.clone());
            }
        }
        if merged.keys.is_empty() {
            merged.keys.clone_from(&other.keys);
        }
        merged
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.keys.is_empty() {
            write!(f, "keys {}", self.keys.join(", "))?;
        }
        if !self.without.is_empty() {
            if !self.keys.is_empty() {
                f.write_str("; ")?;
            }
            let fields: Vec<&str> = self.without.iter().map(|(text, _)| text.as_str()).collect();
            write!(f, "without {}", fields.join(", "))?;
        }
        Ok(())
    }
}

fn owned(segments: &[&str]) -> Vec<String> {
    segments.iter().map(|s| (*s).to_owned()).collect()
}

/// Documents a rule grants through a view (from its groups): the document's path (canonical
/// text) and the view. A handful at most, so a list.
#[derive(Debug, Default)]
pub struct DocumentViews(pub(super) Vec<(String, Arc<View>)>);

impl DocumentViews {
    pub(super) fn get(&self, path: &CanonicalPath<'_>) -> Option<&View> {
        self.0
            .iter()
            .find(|(document, _)| document == path.as_str())
            .map(|(_, view)| &**view)
    }

    /// Whether a document at or below `path` is granted through a view.
    pub(super) fn any_at_or_below(&self, path: &CanonicalPath<'_>) -> bool {
        self.0.iter().any(|(document, _)| {
            document == path.as_str()
                || document
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// A rule's `view`, validated: only on allow rules; keys are names, fields are paths.
pub(super) fn compile_view(
    at: &mut Located<'_>,
    field: &str,
    action: Action,
    name: &Spanned<String>,
    doc: Option<&ViewDocument>,
) -> Option<Arc<View>> {
    let doc = doc?;
    if action == Action::Deny {
        at.error(
            name,
            format!("{field}.view"),
            "a view narrows what a rule allows; a deny rule has nothing to narrow",
        );
    }
    if doc.keys.is_empty() && doc.without.is_empty() {
        at.error(
            name,
            format!("{field}.view"),
            "name the keys a caller may read (keys) or the fields removed (without)",
        );
    }
    let mut keys = Vec::new();
    for (i, key) in doc.keys.iter().enumerate() {
        match key_error(&key.value) {
            Some(problem) => at.error(
                key,
                format!("{field}.view.keys[{i}]"),
                format_args!("{:?}: {problem}", key.value),
            ),
            None => keys.push(key.value.clone()),
        }
    }
    let mut without = Vec::new();
    for (i, removed) in doc.without.iter().enumerate() {
        match CanonicalPath::parse(&removed.value) {
            Ok(path) if !path.segments.is_empty() => {
                without.push((path.as_str().to_owned(), owned(&path.segments)));
            }
            Ok(_) => at.error(
                removed,
                format!("{field}.view.without[{i}]"),
                "the root is the whole tree, not a field",
            ),
            Err(error) => at.error(
                removed,
                format!("{field}.view.without[{i}]"),
                format_args!(
                    "{:?}: {error} (a field is named by its metadata path, without wildcards)",
                    removed.value
                ),
            ),
        }
    }
    Some(Arc::new(View { keys, without }))
}

/// What is wrong with a key, if anything.
fn key_error(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("empty")
    } else if key
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        Some("a key has no spaces or control characters")
    } else if key.contains('=') {
        Some("a key is a name, without '=' or a value")
    } else if key.split('.').any(str::is_empty) {
        Some("a dotted path has no empty part")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> CanonicalPath<'_> {
        CanonicalPath::parse(text).unwrap()
    }

    #[test]
    fn a_removed_field_is_cut_below_and_refused_at_or_below() {
        let view = View::without(&[
            "/metadata/instance/compute/osProfile",
            "/metadata/instance/network",
        ]);
        let below: Vec<_> = view.fields_below(&path("/metadata/instance")).collect();
        assert_eq!(
            below,
            [
                &["compute".to_owned(), "osProfile".to_owned()][..],
                &["network".to_owned()][..]
            ]
        );
        let below: Vec<_> = view
            .fields_below(&path("/metadata/instance/compute/"))
            .collect();
        assert_eq!(below, [&["osProfile".to_owned()][..]]);
        assert!(view.cuts(&path("/metadata/instance/compute")));
        assert!(!view.cuts(&path("/metadata/instance/compute/location")));
        assert_eq!(view.removes(&path("/metadata/instance/compute")), None);
        assert_eq!(
            view.removes(&path("/metadata/instance/compute/osProfile/adminUsername")),
            Some("/metadata/instance/compute/osProfile")
        );
        assert_eq!(
            view.removes(&path("/metadata/instance/network/")),
            Some("/metadata/instance/network")
        );
        // A field named like a removed one's prefix is not removed.
        assert_eq!(
            view.removes(&path("/metadata/instance/compute/osProfileX")),
            None
        );
    }

    #[test]
    fn keys_are_names() {
        assert_eq!(key_error("DB_HOST"), None);
        assert_eq!(key_error("database.host"), None);
        assert!(key_error("A=B").is_some());
        assert!(key_error("a..b").is_some());
        assert!(key_error("a b").is_some());
        assert!(key_error("").is_some());
    }
}
