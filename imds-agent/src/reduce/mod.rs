//! Reducing an allowed answer to the caller's view (`policy::View`): a document without the
//! fields the view removes, user data with only the keys the caller may read, each in the
//! answer's own format and encoding. Pure: bytes in, bytes out. What cannot be taken apart
//! (cloud-init MIME multipart, scripts, compressed or binary user data) is refused whole,
//! never served in part.

pub mod document;
pub mod env;

use base64::Engine as _;

use crate::policy::{CanonicalPath, View};
use document::Document;

/// User data the metadata service serves in base64 (shared/reference/imds-protocols.md A3:
/// Azure's `userData`; OCI's `user_data` is set and served base64-encoded): decoded before
/// the view, encoded again after.
const BASE64_ANSWERS: [&str; 2] = [
    "/metadata/instance/compute/userData",
    "/opc/v2/instance/metadata/user_data",
];

/// A reduced answer, and what the view kept, for the audit line.
#[derive(Debug, PartialEq, Eq)]
pub struct Reduced {
    pub body: Vec<u8>,
    pub summary: String,
}

/// Why an answer cannot be served through a view: the caller gets none of it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unservable {
    #[error("the answer is not the base64 that this path serves")]
    NotBase64,
    #[error(
        "the user data is MIME multipart (cloud-init): a view of keys cannot take it apart, so \
         it is served whole (by a rule without a view) or not at all"
    )]
    Multipart,
    #[error(
        "the user data is binary (compressed, or not UTF-8): a view of keys cannot take it \
         apart, so it is served whole (by a rule without a view) or not at all"
    )]
    Binary,
    #[error(
        "the user data is neither a JSON object nor KEY=VALUE lines ({0}): a view of keys \
         cannot take it apart, so it is served whole (by a rule without a view) or not at all"
    )]
    NotKeyed(String),
    #[error("none of the keys this caller may read ({0}) is in the user data")]
    NoKey(String),
    #[error("the document cannot be cut to the view: {0}")]
    NotADocument(String),
}

/// `body`, the answer for `path`, reduced to `view`.
pub fn reduce(view: &View, path: &CanonicalPath<'_>, body: &[u8]) -> Result<Reduced, Unservable> {
    let base64 = BASE64_ANSWERS.contains(&path.as_str());
    let decoded;
    let content = if base64 {
        decoded = base64::engine::general_purpose::STANDARD
            .decode(body.trim_ascii())
            .map_err(|_| Unservable::NotBase64)?;
        &decoded[..]
    } else {
        body
    };
    let fields: Vec<&[String]> = view.fields_below(path).collect();
    let mut summary = Vec::new();
    let mut content = content.to_vec();
    if !fields.is_empty() {
        let text = std::str::from_utf8(&content)
            .map_err(|_| Unservable::NotADocument("not UTF-8".into()))?;
        let mut document = Document::parse(text, true).map_err(Unservable::NotADocument)?;
        let removed = fields
            .iter()
            .filter(|field| document::remove(document.map(), field))
            .count();
        content = document
            .write(text.ends_with('\n'))
            .map_err(Unservable::NotADocument)?
            .into_bytes();
        summary.push(format!("{removed} fields removed"));
    }
    if !view.keys().is_empty() {
        let (kept, count, total) = keep_keys(&content, view.keys())?;
        if count == 0 {
            return Err(Unservable::NoKey(view.keys().join(", ")));
        }
        content = kept;
        summary.push(format!("{count} of {total} keys"));
    }
    let body = if base64 {
        base64::engine::general_purpose::STANDARD
            .encode(&content)
            .into_bytes()
    } else {
        content
    };
    Ok(Reduced {
        body,
        summary: summary.join(", "),
    })
}

/// User data with only `keys`: (the kept text, how many of them were there, how many keys
/// the user data has).
fn keep_keys(content: &[u8], keys: &[String]) -> Result<(Vec<u8>, usize, usize), Unservable> {
    let text = user_data_text(content)?;
    if text.trim_start().starts_with('{') {
        let Document::Json(map) = Document::parse(text, false).map_err(Unservable::NotKeyed)?
        else {
            unreachable!("parsed without YAML")
        };
        let grants: Vec<Vec<&str>> = keys.iter().map(|k| k.split('.').collect()).collect();
        let kept = document::keep(&map, &grants);
        let present = document::key_paths(&kept);
        let count = keys.iter().filter(|key| present.contains(key)).count();
        let out = Document::Json(kept)
            .write(text.ends_with('\n'))
            .map_err(Unservable::NotKeyed)?;
        return Ok((out.into_bytes(), count, map.len()));
    }
    let (kept, count, total) = env::keep(text, keys).map_err(Unservable::NotKeyed)?;
    Ok((kept.into_bytes(), count, total))
}

/// User data as text, unless it is a format no view takes apart.
fn user_data_text(content: &[u8]) -> Result<&str, Unservable> {
    if content.starts_with(&[0x1f, 0x8b]) || content.contains(&0) {
        return Err(Unservable::Binary);
    }
    let text = std::str::from_utf8(content).map_err(|_| Unservable::Binary)?;
    let head = text.trim_start().get(..40).unwrap_or(text.trim_start());
    let head = head.to_ascii_lowercase();
    if head.starts_with("content-type: multipart") || head.starts_with("mime-version:") {
        return Err(Unservable::Multipart);
    }
    Ok(text)
}

/// The keys of an answer: every dotted key path of a document (a JSON object, or with
/// `yaml` a YAML mapping), else the names of env-format user data; `None` where it has none.
/// For tests that a view never adds a key.
pub fn keys_of(content: &[u8], yaml: bool) -> Option<Vec<String>> {
    let text = std::str::from_utf8(content).ok()?;
    if let Ok(mut document) = Document::parse(text, yaml) {
        return Some(document::key_paths(document.map()));
    }
    env::parse(text)
        .ok()
        .map(|entries| entries.iter().map(|e| e.key.to_owned()).collect())
}

#[cfg(test)]
mod tests;
