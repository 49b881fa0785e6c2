//! Paths and path patterns, on one strict grammar.
//!
//! A path is `/` followed by segments separated by `/`. A segment is one or more of
//! `A-Z a-z 0-9 - . _ ~ ! $ ' ( ) + , = : @`. Rejected, never normalised: empty segments
//! (`//`), dot segments (`.`, `..`), `%` escapes, `\`, `;`, `&`, spaces, control and non-ASCII
//! bytes. One trailing `/` is allowed and does not change what the path names for policy:
//! `x` and `x/` are the same policy object (the metadata services serve both).
//!
//! Patterns use the same grammar plus wildcards:
//! - `*` inside a segment matches any characters within that one segment (`role-*`);
//! - `**` as a whole segment matches zero or more segments (`/latest/meta-data/iam/**`
//!   matches `/latest/meta-data/iam` and everything below it);
//! - everything else is literal and case-sensitive. Matching is per segment, so `/a/role`
//!   never matches `/a/role-admin`.

use std::fmt;

/// Why a path or pattern is not in the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EmptySegment,
    DotSegment,
    BadByte(u8),
    /// Only in patterns: `**` mixed with other characters in a segment.
    PartialAnyDepth,
    /// Only in requests: a `*` is a wildcard in patterns and never part of a real path.
    Wildcard,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute => f.write_str("must start with '/'"),
            Self::EmptySegment => f.write_str("empty path segment ('//')"),
            Self::DotSegment => f.write_str("'.' and '..' segments are not allowed"),
            Self::BadByte(b) if b.is_ascii_graphic() => {
                write!(f, "character '{}' is not allowed", *b as char)
            }
            Self::BadByte(b) => write!(f, "byte 0x{b:02x} is not allowed"),
            Self::PartialAnyDepth => f.write_str("'**' must be a whole path segment"),
            Self::Wildcard => f.write_str("'*' is not allowed in a request path"),
        }
    }
}

const fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'\''
                | b'('
                | b')'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// Splits a path into its segments, validating the grammar. `allow_star` admits `*` (patterns).
fn segments(path: &str, allow_star: bool) -> Result<Vec<&str>, PathError> {
    // Sized once (one `/` before each segment): no growth while splitting.
    let mut segments = Vec::with_capacity(path.bytes().filter(|&b| b == b'/').count());
    for_each_segment(path, allow_star, |segment| segments.push(segment))?;
    Ok(segments)
}

/// Checks `path` against the grammar, handing each segment to `each`.
fn for_each_segment<'a>(
    path: &'a str,
    allow_star: bool,
    mut each: impl FnMut(&'a str),
) -> Result<(), PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    // One trailing slash names the same object.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(PathError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(PathError::DotSegment);
        }
        for &b in segment.as_bytes() {
            if b == b'*' {
                if !allow_star {
                    return Err(PathError::Wildcard);
                }
            } else if !is_segment_byte(b) {
                return Err(PathError::BadByte(b));
            }
        }
        each(segment);
    }
    Ok(())
}

/// A request path split into validated segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath<'a> {
    pub segments: Vec<&'a str>,
    /// The path without its trailing `/`: the segments are slices of it, so every prefix of
    /// the path is a slice too (hash lookups of prefixes without building strings).
    text: &'a str,
}

impl<'a> CanonicalPath<'a> {
    pub fn parse(path: &'a str) -> Result<Self, PathError> {
        let segments = segments(path, false)?;
        let text = match segments.last() {
            Some(last) => &path[..prefix_len(path, last)],
            None => "",
        };
        Ok(Self { segments, text })
    }

    /// Whether `path` is in the grammar, as [`CanonicalPath::parse`] would say, without
    /// splitting it: a path checked on every request that is split only when something
    /// matches its segments.
    pub fn check(path: &str) -> Result<(), PathError> {
        for_each_segment(path, false, |_| ())
    }

    /// The path without its trailing `/` (`""` for the root).
    pub fn as_str(&self) -> &'a str {
        self.text
    }

    /// `/a/b` for the path `/a/b/c` and `n` = 2; `""` for 0.
    fn prefix(&self, n: usize) -> &'a str {
        match n.checked_sub(1).map(|i| self.segments[i]) {
            Some(last) => &self.text[..prefix_len(self.text, last)],
            None => "",
        }
    }
}

/// The length of `text` up to the end of `segment`, a slice of `text`.
fn prefix_len(text: &str, segment: &str) -> usize {
    segment.as_ptr() as usize - text.as_ptr() as usize + segment.len()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// The literal parts between `*`s: `a*b*c` is `["a", "b", "c"]`.
    Wildcard(Vec<String>),
    AnyDepth,
}

/// A compiled path pattern (also used for cgroup paths, which follow the same grammar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    pub fn parse(pattern: &str) -> Result<Self, PathError> {
        let segments = segments(pattern, true)?
            .into_iter()
            .map(|s| match s {
                "**" => Ok(Segment::AnyDepth),
                _ if s.contains("**") => Err(PathError::PartialAnyDepth),
                _ if s.contains('*') => {
                    Ok(Segment::Wildcard(s.split('*').map(str::to_owned).collect()))
                }
                _ => Ok(Segment::Literal(s.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source: pattern.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, path: &CanonicalPath<'_>) -> bool {
        match_segments(&self.segments, &path.segments)
    }

    /// How specific the pattern is, for precedence between policies: more literal segments
    /// win, then more partial wildcards (`role-*` over `*`), then patterns without `**`.
    pub fn specificity(&self) -> Specificity {
        let count = |f: fn(&Segment) -> bool| {
            u16::try_from(self.segments.iter().filter(|s| f(s)).count()).unwrap_or(u16::MAX)
        };
        Specificity {
            literal: count(|s| matches!(s, Segment::Literal(_))),
            partial: count(
                |s| matches!(s, Segment::Wildcard(parts) if parts.iter().any(|p| !p.is_empty())),
            ),
            bounded: !self.segments.contains(&Segment::AnyDepth),
        }
    }

    /// Whether the pattern matches `dir` and every path below it (it ends in `**`).
    pub fn covers_subtree(&self, dir: &CanonicalPath<'_>) -> bool {
        self.segments.last() == Some(&Segment::AnyDepth) && self.matches(dir)
    }

    /// Whether the pattern can match some path strictly below `dir` (for listings: a
    /// directory entry stays visible when something under it may be read).
    pub fn matches_below(&self, dir: &CanonicalPath<'_>) -> bool {
        match_prefix(&self.segments, &dir.segments)
    }
}

/// Literal path -> specificity. foldhash rather than std's SipHash: a decision hashes up to
/// one key per path segment per rule, and SipHash was about a quarter of the decision time.
/// Hash flooding needs control of the inserted keys, and those come from the policy, not
/// from requests (foldhash's seed is still random per process).
type Lookup = std::collections::HashMap<String, Specificity, foldhash::fast::RandomState>;

/// Many patterns compiled for matching in time that depends on the path's depth, not on how
/// many patterns there are: literal patterns are one hash lookup of the canonical path,
/// `literal/**` patterns one lookup per prefix of the path, and only patterns with wildcards
/// elsewhere are tried one by one.
#[derive(Debug, Clone, Default)]
pub struct PatternSet {
    /// "/a/b" -> specificity, for patterns without wildcards.
    exact: Lookup,
    /// "/a/b" -> specificity, for patterns "/a/b/**" (matching "/a/b" and below).
    subtree: Lookup,
    others: Vec<PathPattern>,
}

impl PatternSet {
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a PathPattern>) -> Self {
        let mut set = Self::default();
        for pattern in patterns {
            let literal = |segments: &[Segment]| -> Option<String> {
                let mut key = String::new();
                for segment in segments {
                    let Segment::Literal(text) = segment else {
                        return None;
                    };
                    key.push('/');
                    key.push_str(text);
                }
                Some(key)
            };
            let specificity = pattern.specificity();
            let keep_max = |map: &mut Lookup, key: String| {
                let entry = map.entry(key).or_insert(specificity);
                *entry = (*entry).max(specificity);
            };
            match pattern.segments.split_last() {
                Some((Segment::AnyDepth, prefix)) if literal(prefix).is_some() => {
                    keep_max(&mut set.subtree, literal(prefix).expect("checked"));
                }
                _ => match literal(&pattern.segments) {
                    Some(key) => keep_max(&mut set.exact, key),
                    None => set.others.push(pattern.clone()),
                },
            }
        }
        set
    }

    /// The specificity of the most specific pattern that matches `path`, if any.
    pub fn best_match(&self, path: &CanonicalPath<'_>) -> Option<Specificity> {
        let mut best = self.exact.get(path.text).copied();
        if !self.subtree.is_empty() {
            for n in 0..=path.segments.len() {
                best = best.max(self.subtree.get(path.prefix(n)).copied());
            }
        }
        self.others
            .iter()
            .filter(|p| p.matches(path))
            .map(PathPattern::specificity)
            .fold(best, |best, s| best.max(Some(s)))
    }
}

/// Path patterns as written (listings and subtree reads ask what may match below a path)
/// and as a [`PatternSet`] for per-request matching. Rules hold them behind an `Arc`: every
/// rule that names one group and nothing else shares the group's copy, so 10,000 policies
/// written with `groups: [instance-info]` hold one set of tables, which stays in the CPU's
/// caches, instead of 10,000.
#[derive(Debug, Default)]
pub struct CompiledPatterns {
    patterns: Vec<PathPattern>,
    set: PatternSet,
}

impl CompiledPatterns {
    pub fn new(patterns: Vec<PathPattern>) -> Self {
        Self {
            set: PatternSet::new(&patterns),
            patterns,
        }
    }

    pub fn patterns(&self) -> &[PathPattern] {
        &self.patterns
    }

    /// See [`PatternSet::best_match`].
    pub fn best_match(&self, path: &CanonicalPath<'_>) -> Option<Specificity> {
        self.set.best_match(path)
    }
}

/// Ordered: a greater value is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    literal: u16,
    partial: u16,
    bounded: bool,
}

/// Whether `pattern` matches some path that extends `prefix` by at least one segment.
fn match_prefix(pattern: &[Segment], prefix: &[&str]) -> bool {
    match (pattern.split_first(), prefix.split_first()) {
        (Some((Segment::AnyDepth, _)), _) => true,
        // The prefix is used up: anything left in the pattern names something below it.
        (Some(_), None) => true,
        (None, _) => false,
        (Some((segment, rest)), Some((first, others))) => {
            segment_matches(segment, first) && match_prefix(rest, others)
        }
    }
}

fn match_segments(pattern: &[Segment], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((Segment::AnyDepth, rest)) => {
            (0..=path.len()).any(|i| match_segments(rest, &path[i..]))
        }
        Some((segment, rest)) => match path.split_first() {
            Some((first, others)) => {
                segment_matches(segment, first) && match_segments(rest, others)
            }
            None => false,
        },
    }
}

fn segment_matches(segment: &Segment, text: &str) -> bool {
    match segment {
        Segment::Literal(literal) => literal == text,
        Segment::Wildcard(parts) => wildcard_matches(parts, text),
        Segment::AnyDepth => true,
    }
}

/// `parts` are the literals around `*`s; the first must be a prefix, the last a suffix, and
/// the middle ones must appear in order in between.
pub(crate) fn wildcard_matches(parts: &[String], text: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return text.is_empty();
    };
    if parts.len() == 1 {
        return first == text;
    }
    if text.len() < first.len() + last.len()
        || !text.starts_with(first.as_str())
        || !text.ends_with(last.as_str())
    {
        return false;
    }
    let mut middle = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match middle.find(part.as_str()) {
            Some(at) => middle = &middle[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// A single-segment glob (for unit names): `*` matches any characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    source: String,
    parts: Vec<String>,
}

impl NamePattern {
    pub fn parse(pattern: &str) -> Result<Self, PathError> {
        if pattern.is_empty() {
            return Err(PathError::EmptySegment);
        }
        if let Some(&b) = pattern
            .as_bytes()
            .iter()
            .find(|&&b| b != b'*' && !is_segment_byte(b) && b != b'\\')
        {
            return Err(PathError::BadByte(b));
        }
        Ok(Self {
            source: pattern.to_owned(),
            parts: pattern.split('*').map(str::to_owned).collect(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, name: &str) -> bool {
        wildcard_matches(&self.parts, name)
    }
}

#[cfg(test)]
mod tests;
