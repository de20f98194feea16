//! UTC timestamps for audit events: RFC 3339 formatting with milliseconds,
//! parsing of the `--since` forms, without a date library.
//!
//! Owns the calendar arithmetic (proleptic Gregorian, UTC). It must not read
//! the clock except in [`now_ms`].

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of a formatted timestamp, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub const RFC3339_MS_LEN: usize = 24;

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Formats `ms` (since the Unix epoch) as `YYYY-MM-DDTHH:MM:SS.mmmZ` into a
/// stack buffer. Years past 9999 are clamped to 9999-12-31T23:59:59.999Z.
pub fn format_rfc3339_ms(ms: u64) -> [u8; RFC3339_MS_LEN] {
    // 253402300799999 = 9999-12-31T23:59:59.999Z
    let ms = ms.min(253_402_300_799_999);
    let secs = ms / 1000;
    let millis = (ms % 1000) as u32;
    let days = (secs / 86_400) as i64;
    let sod = (secs % 86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut out[0..4], y as u32);
    put_digits(&mut out[5..7], m);
    put_digits(&mut out[8..10], d);
    put_digits(&mut out[11..13], sod / 3600);
    put_digits(&mut out[14..16], (sod / 60) % 60);
    put_digits(&mut out[17..19], sod % 60);
    put_digits(&mut out[20..23], millis);
    out
}

/// The same as [`format_rfc3339_ms`], as a `String`.
pub fn rfc3339_ms_string(ms: u64) -> String {
    String::from_utf8_lossy(&format_rfc3339_ms(ms)).into_owned()
}

fn put_digits(dst: &mut [u8], mut v: u32) {
    for slot in dst.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Days since 1970-01-01 → (year, month, day). Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01. Howard Hinnant's algorithm.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses an RFC 3339 timestamp (`2026-11-26T10:00:00Z`, optional fraction,
/// `Z` or `±HH:MM`; a space or `t` may stand for `T`) or a bare date
/// (`2026-11-26`, midnight UTC) into milliseconds since the Unix epoch.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter()
            .try_fold(0u32, |acc, c| Some(acc * 10 + u32::from(c - b'0')))
    };
    let year = i64::from(num(0..4)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let month = num(5..7)?;
    let day = num(8..10)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if b.len() == 10 {
        return u64::try_from(days.checked_mul(86_400_000)?).ok();
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) || b.get(13) != Some(&b':') {
        return None;
    }
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    if b.get(16) != Some(&b':') {
        return None;
    }
    let second = num(17..19)?;
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0u32;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z' | b'z') if b.len() == i + 1 => 0,
        Some(&sign @ (b'+' | b'-')) if b.len() == i + 6 && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = i64::from(oh * 3600 + om * 60);
            if sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let secs =
        days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second.min(59))
            - offset_secs;
    let ms = secs.checked_mul(1000)?.checked_add(i64::from(millis))?;
    u64::try_from(ms).ok()
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
