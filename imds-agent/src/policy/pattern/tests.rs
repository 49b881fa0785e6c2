use super::*;

fn matches(pattern: &str, path: &str) -> bool {
    PathPattern::parse(pattern)
        .unwrap()
        .matches(&CanonicalPath::parse(path).unwrap())
}

#[test]
fn matching_table() {
    let table = [
        // (pattern, path, expected)
        (
            "/latest/meta-data/instance-id",
            "/latest/meta-data/instance-id",
            true,
        ),
        (
            "/latest/meta-data/instance-id",
            "/latest/meta-data/instance-id/",
            true,
        ),
        (
            "/latest/meta-data/instance-id/",
            "/latest/meta-data/instance-id",
            true,
        ),
        (
            "/latest/meta-data/instance-id",
            "/latest/meta-data/instance-id-x",
            false,
        ),
        (
            "/latest/meta-data/instance-id",
            "/latest/meta-data/Instance-Id",
            false,
        ),
        ("/latest/meta-data/iam/**", "/latest/meta-data/iam", true),
        ("/latest/meta-data/iam/**", "/latest/meta-data/iam/", true),
        (
            "/latest/meta-data/iam/**",
            "/latest/meta-data/iam/security-credentials/r",
            true,
        ),
        ("/latest/meta-data/iam/**", "/latest/meta-data/iamx", false),
        (
            "/latest/meta-data/iam/security-credentials/role",
            "/latest/meta-data/iam/security-credentials/role-admin",
            false,
        ),
        (
            "/latest/meta-data/placement/*",
            "/latest/meta-data/placement/region",
            true,
        ),
        (
            "/latest/meta-data/placement/*",
            "/latest/meta-data/placement",
            false,
        ),
        (
            "/latest/meta-data/placement/*",
            "/latest/meta-data/placement/a/b",
            false,
        ),
        ("/*/meta-data/ami-id", "/2021-03-23/meta-data/ami-id", true),
        (
            "/latest/meta-data/tags/instance/env-*",
            "/latest/meta-data/tags/instance/env-prod",
            true,
        ),
        (
            "/latest/meta-data/tags/instance/env-*",
            "/latest/meta-data/tags/instance/team",
            false,
        ),
        ("/a/*-x-*", "/a/1-x-2", true),
        ("/a/*-x-*", "/a/1-y-2", false),
        ("/**", "/", true),
        ("/**", "/anything/at/all", true),
        ("/", "/", true),
        ("/", "/latest", false),
        ("/a/**/c", "/a/c", true),
        ("/a/**/c", "/a/b/b/c", true),
        ("/a/**/c", "/a/b/b/d", false),
    ];
    for (pattern, path, expected) in table {
        assert_eq!(matches(pattern, path), expected, "{pattern} vs {path}");
    }
}

#[test]
fn request_paths_are_rejected_not_normalised() {
    let table = [
        ("latest", PathError::NotAbsolute),
        ("/latest//meta-data", PathError::EmptySegment),
        ("/latest/./meta-data", PathError::DotSegment),
        ("/latest/../latest", PathError::DotSegment),
        ("/latest/meta%2Ddata", PathError::BadByte(b'%')),
        ("/metadata/identity\\oauth2", PathError::BadByte(b'\\')),
        ("/a/..;/b", PathError::BadByte(b';')),
        ("/a/b c", PathError::BadByte(b' ')),
        ("/a/\u{e9}", PathError::BadByte(0xc3)),
        ("/a/\x01", PathError::BadByte(1)),
        ("/a/*", PathError::Wildcard),
    ];
    for (path, error) in table {
        assert_eq!(CanonicalPath::parse(path), Err(error.clone()), "{path:?}");
        // The check without splitting says the same (requests and cgroup paths are checked
        // that way, and split only if a rule matches their segments).
        assert_eq!(CanonicalPath::check(path), Err(error), "{path:?}");
    }
    for path in [
        "/",
        "/latest/",
        "/latest/meta-data/iam/security-credentials/role-1",
    ] {
        assert_eq!(CanonicalPath::check(path), Ok(()), "{path:?}");
        assert!(CanonicalPath::parse(path).is_ok(), "{path:?}");
    }
}

#[test]
fn patterns_follow_the_same_grammar() {
    assert_eq!(
        PathPattern::parse("/a/b**").unwrap_err(),
        PathError::PartialAnyDepth
    );
    assert_eq!(
        PathPattern::parse("a/b").unwrap_err(),
        PathError::NotAbsolute
    );
    assert_eq!(
        PathPattern::parse("/a/%41").unwrap_err(),
        PathError::BadByte(b'%')
    );
}

#[test]
fn specificity_orders_patterns() {
    let spec = |p: &str| PathPattern::parse(p).unwrap().specificity();
    assert!(spec("/latest/meta-data/iam/**") > spec("/latest/meta-data/**"));
    assert!(spec("/latest/meta-data/instance-id") > spec("/latest/meta-data/*"));
    assert!(spec("/a/b") > spec("/a/b/**"));
    assert!(spec("/a/role-*") > spec("/a/*"));
    assert_eq!(spec("/a/b"), spec("/x/y"));
}

#[test]
fn matches_below_a_directory() {
    let below = |p: &str, dir: &str| {
        PathPattern::parse(p)
            .unwrap()
            .matches_below(&CanonicalPath::parse(dir).unwrap())
    };
    assert!(below(
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/"
    ));
    assert!(below("/latest/meta-data/iam/**", "/latest/meta-data/iam/"));
    assert!(below("/latest/**", "/latest/meta-data/iam/"));
    assert!(below("/latest/*/iam/info", "/latest/meta-data/"));
    assert!(!below("/latest/meta-data/iam", "/latest/meta-data/iam/"));
    assert!(!below(
        "/latest/meta-data/placement/**",
        "/latest/meta-data/iam/"
    ));
}

#[test]
fn a_pattern_set_matches_like_its_patterns() {
    let sources = [
        "/",
        "/a",
        "/a/b",
        "/a/**",
        "/a/b/**",
        "/**",
        "/a/*/c",
        "/x/role-*",
        "/a/b/c",
    ];
    let patterns: Vec<PathPattern> = sources
        .iter()
        .map(|p| PathPattern::parse(p).unwrap())
        .collect();
    let set = PatternSet::new(&patterns);
    for path in [
        "/",
        "/a",
        "/a/",
        "/a/b",
        "/a/b/c",
        "/a/z/c",
        "/a/b/c/d",
        "/a/b/c/d/",
        "/a/b/",
        "/x/role-1",
        "/x/y",
        "/q",
    ] {
        let canonical = CanonicalPath::parse(path).unwrap();
        let expected = patterns
            .iter()
            .filter(|p| p.matches(&canonical))
            .map(PathPattern::specificity)
            .max();
        assert_eq!(set.best_match(&canonical), expected, "{path}");
    }
    assert_eq!(
        PatternSet::new(&[]).best_match(&CanonicalPath::parse("/a").unwrap()),
        None
    );
}

#[test]
fn name_patterns() {
    let p = NamePattern::parse("nginx*.service").unwrap();
    assert!(p.matches("nginx.service"));
    assert!(p.matches("nginx-2.service"));
    assert!(!p.matches("nginx.scope"));
    assert!(NamePattern::parse("*").unwrap().matches("x"));
}
