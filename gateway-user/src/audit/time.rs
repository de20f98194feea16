//! UTC timestamps for audit events: RFC 3339 formatting with milliseconds
//! and parsing of the `--since` forms, with the `time` crate.
//!
//! The output format is fixed (`YYYY-MM-DDTHH:MM:SS.mmmZ`): it is part of
//! every hashed audit record, so chains written before must still verify.
//! It must not read the clock except in [`now_ms`].

use std::time::{SystemTime, UNIX_EPOCH};

use time::{
    format_description::{well_known::Rfc3339, BorrowedFormatItem},
    macros::format_description,
    Date, OffsetDateTime,
};

/// Length of a formatted timestamp, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub const RFC3339_MS_LEN: usize = 24;

/// The audit format: RFC 3339, UTC, exactly three fraction digits.
const RFC3339_MS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// A bare date, `YYYY-MM-DD` (midnight UTC).
const DATE: &[BorrowedFormatItem<'static>] = format_description!("[year]-[month]-[day]");

/// The latest instant formatted, 9999-12-31T23:59:59.999Z.
const MAX_MS: u64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Formats `ms` (since the Unix epoch) as `YYYY-MM-DDTHH:MM:SS.mmmZ` into a
/// stack buffer (no allocation: this runs for every audit record). Years
/// past 9999 are clamped to 9999-12-31T23:59:59.999Z.
pub fn format_rfc3339_ms(ms: u64) -> [u8; RFC3339_MS_LEN] {
    let ms = ms.min(MAX_MS);
    // Records come thousands per second: the thread's last formatted
    // second is reused, and only the milliseconds are written.
    thread_local! {
        static LAST: std::cell::Cell<(u64, [u8; RFC3339_MS_LEN])> =
            const { std::cell::Cell::new((u64::MAX, [0; RFC3339_MS_LEN])) };
    }
    let second = ms / 1000;
    let mut out = match LAST.try_with(std::cell::Cell::get) {
        Ok((at, text)) if at == second => text,
        _ => {
            let text = format_with_time(ms);
            let _ = LAST.try_with(|l| l.set((second, text)));
            text
        }
    };
    let millis = ms % 1000;
    out[20] = b'0' + (millis / 100) as u8;
    out[21] = b'0' + (millis / 10 % 10) as u8;
    out[22] = b'0' + (millis % 10) as u8;
    out
}

/// [`format_rfc3339_ms`] through the `time` crate.
fn format_with_time(ms: u64) -> [u8; RFC3339_MS_LEN] {
    let mut out = *b"9999-12-31T23:59:59.999Z";
    // Both steps are infallible for 0..=MAX_MS (a 4-digit year, exactly 24
    // bytes); the clamped maximum stays in `out` if they ever were not.
    let nanos = i128::from(ms) * 1_000_000;
    if let Ok(t) = OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        let mut w: &mut [u8] = &mut out;
        let _ = t.format_into(&mut w, RFC3339_MS);
    }
    out
}

/// The same as [`format_rfc3339_ms`], as a `String`.
pub fn rfc3339_ms_string(ms: u64) -> String {
    String::from_utf8_lossy(&format_rfc3339_ms(ms)).into_owned()
}

/// Parses an RFC 3339 timestamp (`2026-11-26T10:00:00Z`, optional fraction,
/// `Z` or `±HH:MM`; a space or `t` may stand for `T`) or a bare date
/// (`2026-11-26`, midnight UTC) into milliseconds since the Unix epoch.
/// Fraction digits past milliseconds are truncated; instants before 1970
/// are `None`.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let nanos = if s.len() == 10 {
        Date::parse(s, DATE)
            .ok()?
            .midnight()
            .assume_utc()
            .unix_timestamp_nanos()
    } else {
        // `time` accepts any date/time separator (RFC 3339 5.6 lets
        // applications choose); keep to `T`, `t` and space as before.
        if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
            return None;
        }
        OffsetDateTime::parse(s, &Rfc3339)
            .ok()?
            .unix_timestamp_nanos()
    };
    u64::try_from(nanos.div_euclid(1_000_000)).ok()
}

/// Parses `--since`: an RFC 3339 timestamp or bare date (see
/// [`parse_rfc3339_ms`]) or a duration before `now_ms`: a whole number
/// followed by `s`, `m`, `h` or `d` (`30s`, `10m`, `2h`, `1d`).
pub fn parse_since_at(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    if let Some(unit) = s
        .chars()
        .last()
        .filter(|c| matches!(c, 's' | 'm' | 'h' | 'd'))
    {
        let digits = &s[..s.len() - 1];
        if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
            let n: u64 = digits
                .parse()
                .map_err(|_| format!("{s:?}: number too large"))?;
            let unit_ms: u64 = match unit {
                's' => 1000,
                'm' => 60_000,
                'h' => 3_600_000,
                _ => 86_400_000,
            };
            let back = n
                .checked_mul(unit_ms)
                .ok_or_else(|| format!("{s:?}: duration too large"))?;
            return Ok(now_ms.saturating_sub(back));
        }
    }
    parse_rfc3339_ms(s).ok_or_else(|| {
        format!(
            "{s:?} is not a time: use RFC 3339 (2026-11-26T10:00:00Z), a date (2026-11-26) \
             or a duration ago (30s, 10m, 2h, 1d)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_ms_string(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_ms_string(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_ms_string(1_795_687_200_123),
            "2026-11-26T10:00:00.123Z"
        );
        assert_eq!(rfc3339_ms_string(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    /// The calendar arithmetic this module used before `time` (Howard
    /// Hinnant's algorithm), kept as the reference: audit records already
    /// written hash these exact bytes.
    fn reference_format(ms: u64) -> String {
        let ms = ms.min(MAX_MS);
        let (secs, millis) = (ms / 1000, ms % 1000);
        let (days, sod) = ((secs / 86_400) as i64, secs % 86_400);
        let z = days + 719_468;
        let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }

    #[test]
    fn format_is_byte_identical_to_the_previous_encoder() {
        let mut ms = 0u64;
        while ms < MAX_MS {
            assert_eq!(rfc3339_ms_string(ms), reference_format(ms), "{ms}");
            ms += 3_333_333_337;
        }
        for ms in [0, 999, 1000, 951_782_400_000, 4_107_542_399_999, MAX_MS] {
            assert_eq!(rfc3339_ms_string(ms), reference_format(ms), "{ms}");
        }
    }

    /// The thread's cached second: consecutive instants within a second,
    /// across seconds, minutes and days, and back in time, as formatted
    /// afresh.
    #[test]
    fn the_cached_second_formats_as_the_previous_encoder() {
        let starts = [
            0,
            951_782_399_998,
            1_795_687_199_990,
            1_795_687_201_995,
            MAX_MS - 5,
        ];
        for start in starts {
            for ms in start..start + 12 {
                assert_eq!(rfc3339_ms_string(ms), reference_format(ms), "{ms}");
            }
        }
        for ms in [1_795_687_200_500, 1_795_687_199_500, 1_795_687_200_499] {
            assert_eq!(rfc3339_ms_string(ms), reference_format(ms), "{ms}");
        }
    }

    #[test]
    fn format_and_parse_round_trip() {
        let mut ms = 0u64;
        while ms < 4_102_444_800_000 {
            let text = rfc3339_ms_string(ms);
            assert_eq!(parse_rfc3339_ms(&text), Some(ms), "{text}");
            ms += 7_777_777_777;
        }
    }

    #[test]
    fn parses_rfc3339_forms() {
        let base = 1_795_687_200_000; // 2026-11-26T10:00:00Z
        assert_eq!(parse_rfc3339_ms("2026-11-26T10:00:00Z"), Some(base));
        assert_eq!(parse_rfc3339_ms("2026-11-26t10:00:00z"), Some(base));
        assert_eq!(parse_rfc3339_ms("2026-11-26 10:00:00Z"), Some(base));
        assert_eq!(parse_rfc3339_ms("2026-11-26T10:00:00.5Z"), Some(base + 500));
        assert_eq!(
            parse_rfc3339_ms("2026-11-26T10:00:00.123456789Z"),
            Some(base + 123)
        );
        assert_eq!(parse_rfc3339_ms("2026-11-26T12:30:00+02:30"), Some(base));
        assert_eq!(parse_rfc3339_ms("2026-11-26T09:00:00-01:00"), Some(base));
        assert_eq!(parse_rfc3339_ms("2026-11-26"), Some(base - 10 * 3_600_000));
        for bad in [
            "",
            "2026-11-26T10:00:00",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-26T24:00:00Z",
            "2026-11-26T10:00Z",
            "2026-11-26T10:00:00.Z",
            "2026-11-26T10:00:00+0200",
            "1969-12-31T23:59:59Z",
            "2026-11-26X10:00:00Z",
            "2026-11-2610:00:00Z",
            "26-11-26",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parse_since_cases() {
        let now = 1_795_687_200_000;
        assert_eq!(parse_since_at("30s", now), Ok(now - 30_000));
        assert_eq!(parse_since_at("10m", now), Ok(now - 600_000));
        assert_eq!(parse_since_at("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since_at("1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_since_at(" 0s ", now), Ok(now));
        assert_eq!(parse_since_at("100000d", 5), Ok(0));
        assert_eq!(parse_since_at("2026-11-26T10:00:00Z", 0), Ok(now));
        assert!(parse_since_at("99999999999999999999d", now).is_err());
        for bad in ["", "m", "10", "-5m", "10x", "1.5h", "10 m", "soon"] {
            let err = parse_since_at(bad, now).unwrap_err();
            assert!(err.contains("is not a time"), "{bad:?}: {err}");
        }
    }
}
