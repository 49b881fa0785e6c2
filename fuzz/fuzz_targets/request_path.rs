//! The path grammar: never panics; an accepted path is already canonical (re-joining its
//! segments gives it back), and no accepted segment can mean something else upstream.
#![no_main]

use imds_agent::policy::{CanonicalPath, PathPattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(path) = CanonicalPath::parse(text) {
        let joined = format!("/{}", path.segments.join("/"));
        assert!(text == joined || text == format!("{joined}/"), "{text:?} is not canonical");
        for segment in &path.segments {
            assert!(!segment.is_empty() && *segment != "." && *segment != "..");
            assert!(!segment.contains(['%', '\\', ';', '*', '?', '#']));
        }
        // A pattern written as the path itself matches it.
        if let Ok(pattern) = PathPattern::parse(text) {
            assert!(pattern.matches(&path));
        }
    }
    let _ = PathPattern::parse(text);
});
