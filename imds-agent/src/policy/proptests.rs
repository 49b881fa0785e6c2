//! Properties of the matcher and of the request pipeline, over generated paths and patterns.

use http::Request;
use proptest::prelude::*;

use super::{Action, CanonicalPath, PathPattern, PolicySet, Unmatched, parse, pattern::PatternSet};
use crate::{
    identity::{Identity, pods::PodDirectory},
    proxy::request,
};

/// An independent reference: dynamic programming over segments (the matcher under test
/// recurses with backtracking). `*` inside a segment is checked by a byte-level DP too.
fn reference_matches(pattern: &[String], path: &[String]) -> bool {
    let (p, n) = (pattern.len(), path.len());
    // dp[i][j]: pattern[i..] matches path[j..]
    let mut dp = vec![vec![false; n + 1]; p + 1];
    dp[p][n] = true;
    for i in (0..p).rev() {
        for j in (0..=n).rev() {
            dp[i][j] = if pattern[i] == "**" {
                dp[i + 1][j] || (j < n && dp[i][j + 1])
            } else {
                j < n && glob(pattern[i].as_bytes(), path[j].as_bytes()) && dp[i + 1][j + 1]
            };
        }
    }
    dp[0][0]
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let mut dp = vec![vec![false; text.len() + 1]; pattern.len() + 1];
    dp[pattern.len()][text.len()] = true;
    for i in (0..pattern.len()).rev() {
        for j in (0..=text.len()).rev() {
            dp[i][j] = if pattern[i] == b'*' {
                dp[i + 1][j] || (j < text.len() && dp[i][j + 1])
            } else {
                j < text.len() && pattern[i] == text[j] && dp[i + 1][j + 1]
            };
        }
    }
    dp[0][0]
}

fn segment() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "-"]), 1..3)
        .prop_map(|v| v.concat())
}

fn pattern_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => segment(),
        1 => Just("*".to_owned()),
        1 => Just("**".to_owned()),
        1 => segment().prop_map(|s| format!("{s}*")),
        1 => segment().prop_map(|s| format!("*{s}")),
    ]
}

/// Request paths from an alphabet that includes every trick a bypass would use.
fn hostile_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "/", "a", "b", ".", "..", "%2f", "%61", "\\", ";", "//", "*", "A", "~",
        ]),
        1..10,
    )
    .prop_map(|v| format!("/{}", v.concat()))
}

proptest! {
    #[test]
    fn matcher_agrees_with_the_reference(
        pattern in prop::collection::vec(pattern_segment(), 0..5),
        path in prop::collection::vec(segment(), 0..6),
        trailing_slash in any::<bool>(),
    ) {
        let text = format!("/{}{}", path.join("/"), if trailing_slash && !path.is_empty() { "/" } else { "" });
        let compiled = PathPattern::parse(&format!("/{}", pattern.join("/"))).unwrap();
        let canonical = CanonicalPath::parse(&text).unwrap();
        prop_assert_eq!(compiled.matches(&canonical), reference_matches(&pattern, &path));
    }

    /// A compiled set answers exactly what its patterns, tried one by one, would.
    #[test]
    fn a_pattern_set_agrees_with_its_patterns(
        patterns in prop::collection::vec(prop::collection::vec(pattern_segment(), 0..4), 1..8),
        path in prop::collection::vec(segment(), 0..5),
    ) {
        let compiled: Vec<PathPattern> = patterns
            .iter()
            .map(|p| PathPattern::parse(&format!("/{}", p.join("/"))).unwrap())
            .collect();
        let text = format!("/{}", path.join("/"));
        let canonical = CanonicalPath::parse(&text).unwrap();
        let expected = compiled.iter().filter(|p| p.matches(&canonical)).map(PathPattern::specificity).max();
        prop_assert_eq!(PatternSet::new(&compiled).best_match(&canonical), expected);
    }

    /// The check without splitting (for requests and callers' cgroup paths) accepts exactly
    /// what the parser accepts, with the same error.
    #[test]
    fn the_check_agrees_with_the_parser(path in hostile_path()) {
        prop_assert_eq!(CanonicalPath::check(&path), CanonicalPath::parse(&path).map(|_| ()));
    }

    /// Through the whole pipeline (strict parse, then policy): a request is allowed only if
    /// the allowing pattern matches its canonical path, and a path the parser accepts is in
    /// canonical form already (nothing to normalise, so nothing for a server to read
    /// differently).
    #[test]
    fn a_path_is_allowed_only_by_a_pattern_that_matches_it(
        path in hostile_path(),
        pattern in prop::collection::vec(pattern_segment(), 0..4),
    ) {
        let pattern_text = format!("/{}", pattern.join("/"));
        let doc = format!(
            "name: p\ndefault: deny\nrules:\n  - name: r\n    action: allow\n    methods: [GET]\n    paths: [\"{pattern_text}\"]\n"
        );
        let set = PolicySet { policies: vec![parse(std::path::Path::new("p.yaml"), &doc).unwrap()], unmatched: Unmatched::Deny, mode: super::Mode::Enforce };
        let Ok(http_request) = Request::get(path.as_str()).header("host", "x").body(()) else {
            return Ok(());
        };
        let Ok(valid) = request::validate(&http_request) else {
            return Ok(());
        };
        let canonical = valid.canonical_path();
        for segment in &canonical.segments {
            prop_assert!(!segment.is_empty() && *segment != "." && *segment != "..");
            prop_assert!(!segment.contains(['%', '\\', ';', '*']));
        }
        let joined = format!("/{}", canonical.segments.join("/"));
        let with_slash = format!("{joined}/");
        prop_assert!(valid.path == joined || valid.path == with_slash);

        let who = Identity::for_cgroup("/web", 0, 0, &PodDirectory::default());
        let decision = set.decide(&set.select(&who), &who, "GET", &canonical);
        if decision.action == Action::Allow {
            let compiled = PathPattern::parse(&pattern_text).unwrap();
            prop_assert!(compiled.matches(&canonical));
            let segments: Vec<String> = canonical.segments.iter().map(|s| (*s).to_owned()).collect();
            prop_assert!(reference_matches(&pattern, &segments));
        }
    }

    /// The query forwarded says what the filter read: parsed again (as the service parses
    /// it), it gives the same parameters, whatever the client's spelling.
    #[test]
    fn the_forwarded_query_reads_as_the_received_one(
        query in "[a-zA-Z0-9%+&=._~:/?!$'()*,;@-]{0,40}",
    ) {
        let Ok(http_request) = Request::get(format!("/m?{query}")).header("host", "x").body(()) else {
            return Ok(());
        };
        let Ok(valid) = request::validate(&http_request) else {
            return Ok(());
        };
        let again = Request::get(valid.target()).header("host", "x").body(()).unwrap();
        let reread = request::validate(&again).expect("a rebuilt query is valid");
        prop_assert_eq!(&reread.params, &valid.params);
        prop_assert_eq!(&reread.query, &valid.query);
    }
}
