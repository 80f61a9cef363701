//! Budget periods on the UTC calendar: a daily budget resets at 00:00 UTC, a weekly one on
//! Monday 00:00 UTC, a monthly one on the 1st at 00:00 UTC (PRODUCT.md §5.2). A period is
//! identified by its start, so a rollover happens when the clock passes the end, whether
//! or not the gateway restarted in between.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
}

const DAY: i64 = 86_400;

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
        }
    }

    /// `[start, end)` in Unix seconds of the period that contains `now`.
    pub fn window(self, now: i64) -> (i64, i64) {
        let day = now.div_euclid(DAY);
        match self {
            Period::Daily => (day * DAY, (day + 1) * DAY),
            Period::Weekly => {
                // 1970-01-01 was a Thursday: Monday-based weekday is (day + 3) mod 7.
                let monday = day - (day + 3).rem_euclid(7);
                (monday * DAY, (monday + 7) * DAY)
            }
            Period::Monthly => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1) * DAY, days_from_civil(ny, nm, 1) * DAY)
            }
        }
    }
}

/// `2026-05-01T00:00:00Z`.
pub fn iso8601(unix_s: i64) -> String {
    let (y, m, d) = civil_from_days(unix_s.div_euclid(DAY));
    let secs = unix_s.rem_euclid(DAY);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// `2026-05-01T00:00:00.123Z`.
pub fn iso8601_ms(unix_ms: i64) -> String {
    let s = iso8601(unix_ms.div_euclid(1000));
    format!("{}.{:03}Z", &s[..s.len() - 1], unix_ms.rem_euclid(1000))
}

/// Unix ms of an RFC 3339 time (`2026-05-01T10:00:00Z`, `...T10:00:00.5+02:00`, or a
/// bare date `2026-05-01`, read as midnight UTC).
pub fn parse_iso8601(text: &str) -> Option<i64> {
    let text = text.trim();
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    let (date, time) = match text.find(['T', 't', ' ']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let (y, m, d) = (num(parts.next()?)?, num(parts.next()?)?, num(parts.next()?)?);
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let day_ms = days_from_civil(y, m as u32, d as u32) * DAY * 1000;
    let Some(time) = time else { return Some(day_ms) };
    let (clock, offset_ms) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, off) = (&time[..i], &time[i..]);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (c, sign * (num(oh)? * 3600 + num(om)? * 60) * 1000)
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut hms = hms.split(':');
    let (h, mi, s) = (num(hms.next()?)?, num(hms.next()?)?, num(hms.next()?)?);
    if hms.next().is_some() || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let ms = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(3).collect();
        num(&digits)?
    };
    Some(day_ms + (h * 3600 + mi * 60 + s) * 1000 + ms - offset_ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of `days_from_civil`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, h: i64, min: i64) -> i64 {
        days_from_civil(y, m, d) * DAY + h * 3600 + min * 60
    }

    #[test]
    fn civil_round_trip_over_centuries() {
        for day in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn windows_follow_the_utc_calendar() {
        let now = at(2026, 4, 17, 13, 5);
        assert_eq!(Period::Daily.window(now), (at(2026, 4, 17, 0, 0), at(2026, 4, 18, 0, 0)));
        // 2026-04-17 is a Friday; its week started on Monday the 13th.
        assert_eq!(Period::Weekly.window(now), (at(2026, 4, 13, 0, 0), at(2026, 4, 20, 0, 0)));
        assert_eq!(Period::Monthly.window(now), (at(2026, 4, 1, 0, 0), at(2026, 5, 1, 0, 0)));
        assert_eq!(Period::Monthly.window(at(2026, 12, 31, 23, 59)).1, at(2027, 1, 1, 0, 0));
        assert_eq!(
            Period::Monthly.window(at(2028, 2, 29, 12, 0)),
            (at(2028, 2, 1, 0, 0), at(2028, 3, 1, 0, 0))
        );
        // The boundary itself belongs to the new period.
        assert_eq!(Period::Daily.window(at(2026, 4, 18, 0, 0)).0, at(2026, 4, 18, 0, 0));
        assert_eq!(Period::Weekly.window(at(2026, 4, 20, 0, 0)).0, at(2026, 4, 20, 0, 0));
        assert_eq!(Period::Weekly.window(at(2026, 4, 19, 23, 59)).0, at(2026, 4, 13, 0, 0));
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_iso8601("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_iso8601("2026-05-01"), Some(at(2026, 5, 1, 0, 0) * 1000));
        assert_eq!(parse_iso8601("2026-05-01T10:30:00.25Z"), Some(at(2026, 5, 1, 10, 30) * 1000 + 250));
        assert_eq!(parse_iso8601("2026-05-01T12:30:00+02:00"), Some(at(2026, 5, 1, 10, 30) * 1000));
        assert_eq!(parse_iso8601("2026-05-01T10:30:00-01:30"), Some(at(2026, 5, 1, 12, 0) * 1000));
        assert_eq!(iso8601_ms(at(2026, 5, 1, 10, 30) * 1000 + 7), "2026-05-01T10:30:00.007Z");
        for bad in ["", "yesterday", "2026-13-01", "2026-05-01T25:00:00Z", "2026-05-01T10:00", "1h"] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_iso8601() {
        assert_eq!(iso8601(at(2026, 5, 1, 0, 0)), "2026-05-01T00:00:00Z");
        assert_eq!(iso8601(at(1999, 12, 31, 23, 59) + 7), "1999-12-31T23:59:07Z");
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
    }
}
