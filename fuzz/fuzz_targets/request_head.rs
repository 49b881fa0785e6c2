//! The strict request-head gate on arbitrary bytes: never panics, and whatever it accepts has
//! only CRLF line endings, one request line in origin-form and no body framing.
#![no_main]

use imds_agent::proxy::gate::check_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = data.to_vec();
    head.extend_from_slice(b"\r\n\r\n");
    if check_head(&head).is_ok() {
        for (i, &b) in head.iter().enumerate() {
            assert!(b != b'\n' || (i > 0 && head[i - 1] == b'\r'), "bare LF accepted");
            assert!(b != b'\r' || head.get(i + 1) == Some(&b'\n'), "bare CR accepted");
        }
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
        assert_eq!(target.first(), Some(&b'/'), "non-origin-form target accepted");
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(!text.contains("\ntransfer-encoding:"), "Transfer-Encoding accepted");
    }
});
