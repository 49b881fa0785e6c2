//! Timestamps as audit lines, status files and AWS credential documents write them: ISO 8601
//! in UTC, without a time-zone database.

use std::time::{SystemTime, UNIX_EPOCH};

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC): audit-friendly, and what AWS credential JSON uses.
pub fn iso8601(time: SystemTime) -> String {
    format!("{}Z", iso8601_seconds(time))
}

/// As [`iso8601`], with microseconds (`2026-11-24T00:00:00.000123Z`), as tracing-subscriber
/// writes timestamps.
pub fn iso8601_micros(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    // One audit line per request: the date part is formatted once per second and thread.
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    SECOND.with_borrow_mut(|(secs, text)| {
        if *secs != since_epoch.as_secs() {
            *secs = since_epoch.as_secs();
            *text = iso8601_seconds(time);
        }
        format!("{text}.{:06}Z", since_epoch.subsec_micros())
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
        let at = |micros: u64| iso8601_micros(UNIX_EPOCH + Duration::from_micros(micros));
        assert_eq!(at(1_795_478_400_000_123), "2026-11-24T00:00:00.000123Z");
        assert_eq!(at(1_795_478_400_999_999), "2026-11-24T00:00:00.999999Z");
        assert_eq!(at(1_795_478_401_000_000), "2026-11-24T00:00:01.000000Z");
        assert_eq!(at(1_795_478_400_000_001), "2026-11-24T00:00:00.000001Z");
    }
}
