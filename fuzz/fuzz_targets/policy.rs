//! The policy parser on arbitrary text: never panics; errors always carry a location.
#![no_main]

use imds_agent::policy::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(errors) = parse(std::path::Path::new("fuzz.yaml"), text) {
        assert!(!errors.is_empty());
        for error in errors {
            assert!(error.to_string().starts_with("fuzz.yaml:"), "{error}");
        }
    }
});
