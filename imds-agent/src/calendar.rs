//! Timestamps as audit lines, status files and AWS credential documents write them: ISO 8601
//! in UTC, without a time-zone database.

use std::time::{SystemTime, UNIX_EPOCH};

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC): audit-friendly, and what AWS credential JSON uses.
pub fn iso8601(time: SystemTime) -> String {
    format!("{}Z", iso8601_seconds(time))
}

/// Writes `time` as [`iso8601`] does, with microseconds (`2026-11-24T00:00:00.000123Z`), as
/// tracing-subscriber writes timestamps: into the audit line, without a String of its own.
pub fn write_iso8601_micros(out: &mut Vec<u8>, time: SystemTime) {
    use std::io::Write as _;
    let micros = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_micros();
    with_iso8601(time, |text| {
        let seconds = text.strip_suffix('Z').unwrap_or(text);
        // Writing into memory cannot fail.
        let _ = write!(out, "{seconds}.{micros:06}Z");
    });
}

/// `f` given `time` as [`iso8601`] writes it, formatted once per second and thread: audit
/// lines and the inventory stamp every request with it.
pub fn with_iso8601<R>(time: SystemTime, f: impl FnOnce(&str) -> R) -> R {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            *cached = secs;
            *text = iso8601(time);
        }
        f(text)
    })
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC.
fn iso8601_seconds(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The time a `YYYY-MM-DDTHH:MM:SSZ` timestamp names (fractions of a second ignored), as AWS
/// and Alibaba write a credential's `Expiration`; `None` for anything else.
pub fn parse_iso8601(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || !text.ends_with('Z') {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(range)?;
        digits
            .bytes()
            .all(|d| d.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let fraction = &text[19..text.len() - 1];
    let fraction_ok = fraction.is_empty()
        || (fraction.len() > 1
            && fraction.starts_with('.')
            && fraction[1..].bytes().all(|d| d.is_ascii_digit()));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || !fraction_ok {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days-from-civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_secs(1_795_478_400)),
            "2026-11-24T00:00:00Z"
        );
        // Microseconds; the cached date part follows the second.
        let at = |micros: u64| {
            let mut out = Vec::new();
            write_iso8601_micros(&mut out, UNIX_EPOCH + Duration::from_micros(micros));
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(1_795_478_400_000_123), "2026-11-24T00:00:00.000123Z");
        assert_eq!(at(1_795_478_400_999_999), "2026-11-24T00:00:00.999999Z");
        assert_eq!(at(1_795_478_401_000_000), "2026-11-24T00:00:01.000000Z");
        assert_eq!(at(1_795_478_400_000_001), "2026-11-24T00:00:00.000001Z");
        let whole = |secs: u64| with_iso8601(UNIX_EPOCH + Duration::from_secs(secs), str::to_owned);
        assert_eq!(whole(1_795_478_400), "2026-11-24T00:00:00Z");
        assert_eq!(whole(1_795_478_401), "2026-11-24T00:00:01Z");
    }

    #[test]
    fn credential_expirations_parse_back() {
        for secs in [
            0,
            951_782_400,
            1_795_478_400,
            1_795_478_400 + 86_399,
            4_102_444_800,
        ] {
            let time = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_iso8601(&iso8601(time)), Some(time), "{secs}");
        }
        assert_eq!(
            parse_iso8601("2026-11-24T00:00:00.123Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_795_478_400))
        );
        for bad in [
            "",
            "2026-11-24",
            "2026-11-24T00:00:00",
            "2026-13-24T00:00:00Z",
            "2026-11-24T24:00:00Z",
            "2026-11-24T00:00:00+01:00",
            "20x6-11-24T00:00:00Z",
            "2026-11-24T00:00:00.Z",
        ] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
    }
}
