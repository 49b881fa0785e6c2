//! The view reducers on arbitrary answers and views: never panic, and what they serve only
//! ever has keys the answer had and the view grants (user data), or fewer fields (documents).
#![no_main]

use imds_agent::{
    policy::{CanonicalPath, View},
    reduce::{keys_of, reduce},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<String>, bool, &[u8])| {
    let (granted, document, answer) = input;
    let keys: Vec<&str> = granted.iter().map(String::as_str).take(4).collect();
    let (view, path, yaml) = if document {
        // A dotted name is a key of its own in a document's field, a path in key listings.
        if keys.iter().any(|k| k.contains('.')) {
            return;
        }
        let fields: Vec<String> = keys.iter().map(|k| format!("/doc/{k}")).collect();
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        let Ok(view) = View::new(&[], &fields) else { return };
        (view, "/doc", true)
    } else {
        let Ok(view) = View::new(&keys, &[]) else { return };
        (view, "/latest/user-data", false)
    };
    let path = CanonicalPath::parse(path).expect("a valid path");
    // An answer a view does not cut is passed on whole (the proxy's view phase).
    if !view.cuts(&path) {
        return;
    }
    let Ok(reduced) = reduce(&view, &path, answer) else { return };
    let before = keys_of(answer, yaml).expect("a reduced answer had keys");
    let after = keys_of(&reduced.body, yaml).expect("a reduced answer has keys");
    for key in &after {
        assert!(before.contains(key), "{key} was not in the answer");
        if !document {
            let granted = keys.iter().any(|g| {
                key == g || key.starts_with(&format!("{g}.")) || g.starts_with(&format!("{key}."))
            });
            assert!(granted, "{key} is not granted");
        }
    }
    if document {
        assert!(after.len() <= before.len());
        for removed in &keys {
            assert!(!after.contains(&(*removed).to_owned()), "{removed} kept");
        }
    }
});
