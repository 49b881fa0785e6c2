//! User data as `KEY=VALUE` lines, as env files have them (Docker's `--env-file`, systemd's
//! `EnvironmentFile=`, dotenv): blank lines and `#` comments between entries, an optional
//! `export `, values unquoted to the end of the line, or in single quotes (literal) or double
//! quotes (backslash escapes), which may span lines, followed by nothing but an optional
//! comment. Anything else is not env format: the caller gets nothing rather than a guess.

/// One `KEY=VALUE` entry: its key, and its text as written (all its lines, without the
/// final line break).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub key: &'a str,
    pub text: &'a str,
}

/// The entries of `text`, or the first line that is not env format and why.
pub fn parse(text: &str) -> Result<Vec<Entry<'_>>, String> {
    let mut entries = Vec::new();
    let mut start = 0;
    let mut line = 1;
    while start < text.len() {
        let end = line_end(text, start);
        let content = text[start..end].trim_end_matches('\r');
        let trimmed = content.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            start = end + 1;
            line += 1;
            continue;
        }
        let assignment = trimmed
            .strip_prefix("export ")
            .map_or(trimmed, str::trim_start);
        let key_len = assignment
            .bytes()
            .take_while(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            .count();
        let key = &assignment[..key_len];
        if key.is_empty()
            || key.as_bytes()[0].is_ascii_digit()
            || assignment.as_bytes().get(key_len) != Some(&b'=')
        {
            return Err(format!("line {line}: not KEY=VALUE"));
        }
        // Where the value starts, in `text` (`assignment` is a slice of it).
        let value = assignment.as_ptr() as usize - text.as_ptr() as usize + key_len + 1;
        let (value_end, lines) = match text.as_bytes().get(value) {
            Some(&quote @ (b'\'' | b'"')) if value < end => {
                let close = closing_quote(text, value + 1, quote)
                    .ok_or_else(|| format!("line {line}: unterminated {} quote", quote as char))?;
                let lines = text[value..close].matches('\n').count();
                (close + 1, lines)
            }
            _ => (end, 0),
        };
        let entry_end = line_end(text, value_end);
        // After a closing quote: nothing, or a comment after white space.
        let after = text[value_end..entry_end].trim_end_matches('\r');
        let comment = after.trim_start();
        let allowed = comment.is_empty()
            || (comment.starts_with('#') && after.starts_with(char::is_whitespace));
        if !allowed {
            return Err(format!(
                "line {}: text after the closing quote",
                line + lines
            ));
        }
        entries.push(Entry {
            key,
            text: text[start..entry_end].trim_end_matches('\r'),
        });
        start = entry_end + 1;
        line += lines + 1;
    }
    Ok(entries)
}

/// The end of the line that `from` is on (the index of its `\n`, or the text's end).
fn line_end(text: &str, from: usize) -> usize {
    text[from..].find('\n').map_or(text.len(), |i| from + i)
}

/// The index of the quote closing one opened before `from`; in double quotes a backslash
/// escapes the next character.
fn closing_quote(text: &str, from: usize, quote: u8) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quote == b'"' => i += 2,
            b if b == quote => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The entries whose key is in `keys`, in their order and as written (comments dropped: a
/// commented-out line can hold what the caller may not read); and how many entries there were.
pub fn keep(text: &str, keys: &[String]) -> Result<(String, usize, usize), String> {
    let entries = parse(text)?;
    let kept: Vec<&str> = entries
        .iter()
        .filter(|e| keys.iter().any(|k| k == e.key))
        .map(|e| e.text)
        .collect();
    let distinct = |entries: &mut dyn Iterator<Item = &str>| {
        let mut seen: Vec<&str> = entries.collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    let kept_keys = distinct(
        &mut entries
            .iter()
            .filter(|e| keys.iter().any(|k| k == e.key))
            .map(|e| e.key),
    );
    let total = distinct(&mut entries.iter().map(|e| e.key));
    let mut out = kept.join("\n");
    if !out.is_empty() && text.ends_with('\n') {
        out.push('\n');
    }
    Ok((out, kept_keys, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<&str> {
        parse(text).unwrap().iter().map(|e| e.key).collect()
    }

    #[test]
    fn env_files_as_they_are_written() {
        let text = "# service settings\nPORT=8080\nexport DB_HOST=db.internal\n\n  \
                    DB_PASSWORD='s3cr#t\nline two'\nGREETING=\"say \\\"hi\\\"\" # a comment\n\
                    EMPTY=\nURL=http://x/?a=b#frag\r\n";
        assert_eq!(
            keys(text),
            ["PORT", "DB_HOST", "DB_PASSWORD", "GREETING", "EMPTY", "URL"]
        );
        let (out, kept, total) =
            keep(text, &["DB_HOST".into(), "GREETING".into(), "URL".into()]).unwrap();
        assert_eq!(
            out,
            "export DB_HOST=db.internal\nGREETING=\"say \\\"hi\\\"\" # a comment\n\
             URL=http://x/?a=b#frag\n"
        );
        assert_eq!((kept, total), (3, 6));
        // A multi-line quoted value is kept whole or not at all.
        let (out, _, _) = keep(text, &["DB_PASSWORD".into()]).unwrap();
        assert_eq!(out, "  DB_PASSWORD='s3cr#t\nline two'\n");
    }

    #[test]
    fn what_is_not_env_format_says_where() {
        for (text, line) in [
            ("#!/bin/bash\necho hello\n", "line 2"),
            ("#cloud-config\nusers:\n  - name: x\n", "line 2"),
            ("A=1\nB = 2\n", "line 2"),
            ("A='open\nB=2\n", "line 1"),
            ("A='x' trailing\n", "line 1"),
            ("1A=x\n", "line 1"),
            ("=x\n", "line 1"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.starts_with(line), "{text:?}: {error}");
        }
    }

    #[test]
    fn nothing_granted_present_is_nothing() {
        let (out, kept, total) = keep("A=1\nB=2\n", &["C".into()]).unwrap();
        assert_eq!((out.as_str(), kept, total), ("", 0, 2));
    }
}
