//! Instants at 100 ns resolution ([`Ticks`]), as IoT Hub writes them.
//!
//! `operationTimestamp` is parsed strictly (`docs/semantics.md` §1: a value that is present but
//! not in the exact form is a dead letter); enqueued times, which come from the transport rather
//! than from the hub's own properties, are parsed leniently.

use std::fmt;

/// 100 ns ticks since 1970-01-01T00:00:00Z (negative before), the resolution of IoT Hub's
/// seven-digit fractions and of .NET's `DateTime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ticks(pub i64);

pub const TICKS_PER_SECOND: i64 = 10_000_000;
const TICKS_PER_MILLISECOND: i64 = 10_000;
const SECONDS_PER_DAY: i64 = 86_400;

impl Ticks {
    /// The wall clock now (before 1970, negative; beyond `i64` ticks, in the year 31,000 or
    /// so, saturated): for ages and latencies, never for anything that must be
    /// deterministic.
    pub fn now() -> Ticks {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(since) => Ticks(i64::try_from(since.as_nanos() / 100).unwrap_or(i64::MAX)),
            Err(before) => {
                Ticks(i64::try_from(before.duration().as_nanos() / 100).map_or(i64::MIN, |t| -t))
            }
        }
    }

    pub fn from_unix_millis(ms: i64) -> Ticks {
        Ticks(ms.saturating_mul(TICKS_PER_MILLISECOND))
    }

    pub fn unix_millis(self) -> i64 {
        self.0.div_euclid(TICKS_PER_MILLISECOND)
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.f]` followed by `Z` or `±HH:MM`, with 1 to 7 fraction
    /// digits when a dot is present, a real calendar date, hours 00-23, minutes and seconds
    /// 00-59, upper-case `T` and `Z`. Nothing else is accepted.
    pub fn parse_strict(s: &str) -> Option<Ticks> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
            return None;
        }
        if b[13] != b':' || b[16] != b':' {
            return None;
        }
        let year = digits(&b[0..4])?;
        let month = digits(&b[5..7])?;
        let day = digits(&b[8..10])?;
        let hour = digits(&b[11..13])?;
        let minute = digits(&b[14..16])?;
        let second = digits(&b[17..19])?;
        let mut rest = &b[19..];
        let mut fraction_ticks = 0;
        if rest.first() == Some(&b'.') {
            let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if !(1..=7).contains(&n) {
                return None;
            }
            fraction_ticks = digits(&rest[1..1 + n])? * 10i64.pow(7 - n as u32);
            rest = &rest[1 + n..];
        }
        let offset_seconds = match rest {
            [b'Z'] => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let oh = digits(&[*h1, *h2])?;
                let om = digits(&[*m1, *m2])?;
                if oh > 23 || om > 59 {
                    return None;
                }
                let magnitude = oh * 3600 + om * 60;
                if *sign == b'+' {
                    magnitude
                } else {
                    -magnitude
                }
            }
            _ => return None,
        };
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        let days = days_from_civil(year, month, day)?;
        let seconds = days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset_seconds;
        Some(Ticks(seconds * TICKS_PER_SECOND + fraction_ticks))
    }

    /// Parses an enqueued time as the transports write it: ISO 8601 with any number of fraction
    /// digits (extra digits beyond 100 ns are dropped), `Z`, an offset or no zone (UTC), a
    /// space instead of `T`; or .NET's `M/D/YYYY h:mm:ss AM` form.
    pub fn parse_lenient(s: &str) -> Option<Ticks> {
        let s = s.trim();
        if let Some(t) = Ticks::parse_strict(s) {
            return Some(t);
        }
        if s.contains('/') {
            return parse_us_dotnet(s);
        }
        let b = s.as_bytes();
        if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return None;
        }
        // Everything is read as bytes: the text is untrusted, and byte 19 may fall inside a
        // multi-byte character (`"2019-05-10T06:06:3é"`), where slicing the `str` would panic.
        let (head, tail) = b.split_at(19);
        if !head.is_ascii() {
            return None;
        }
        let mut normalized = String::with_capacity(36);
        normalized.extend(head[..10].iter().map(|&c| char::from(c)));
        normalized.push('T');
        normalized.extend(head[11..].iter().map(|&c| char::from(c)));
        let mut i = 0;
        if tail.first() == Some(&b'.') {
            let n = tail[1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if n == 0 {
                return None;
            }
            normalized.push('.');
            for &c in tail[1..1 + n.min(7)].iter() {
                normalized.push(c as char);
            }
            i = 1 + n;
        }
        match &tail[i..] {
            [] | [b'Z' | b'z'] => normalized.push('Z'),
            zone => normalized.push_str(std::str::from_utf8(zone).ok()?),
        }
        Ticks::parse_strict(&normalized)
    }
}

/// `M/D/YYYY h:mm:ss AM|PM`, as .NET's invariant culture prints a `DateTime` (some Capture
/// tools show `EnqueuedTimeUtc` so); UTC.
fn parse_us_dotnet(s: &str) -> Option<Ticks> {
    let mut parts = s.split_whitespace();
    let date = parts.next()?;
    let time = parts.next()?;
    let meridiem = parts.next();
    if parts.next().is_some() {
        return None;
    }
    // Each field is 1 to 4 plain digits (no sign, no overflow): a year of 20 digits would
    // otherwise overflow the tick arithmetic below.
    let field = |text: Option<&str>| -> Option<i64> {
        let text = text?.as_bytes();
        if text.is_empty() || text.len() > 4 {
            return None;
        }
        digits(text)
    };
    let mut d = date.split('/');
    let month = field(d.next())?;
    let day = field(d.next())?;
    let year = field(d.next())?;
    let mut t = time.split(':');
    let mut hour = field(t.next())?;
    let minute = field(t.next())?;
    let second = field(t.next())?;
    if d.next().is_some() || t.next().is_some() {
        return None;
    }
    match meridiem {
        Some("PM") if hour < 12 => hour += 12,
        Some("AM") if hour == 12 => hour = 0,
        None | Some("AM" | "PM") => {}
        Some(_) => return None,
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    let seconds = days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second;
    Some(Ticks(seconds * TICKS_PER_SECOND))
}

fn digits(b: &[u8]) -> Option<i64> {
    let mut n: i64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(c - b'0');
    }
    Some(n)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> Option<i64> {
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// RFC 3339 in UTC with seven fraction digits, as IoT Hub writes times:
/// `2024-06-03T16:00:00.1012345Z`.
impl fmt::Display for Ticks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.0.div_euclid(TICKS_PER_SECOND);
        let fraction = self.0.rem_euclid(TICKS_PER_SECOND);
        let days = seconds.div_euclid(SECONDS_PER_DAY);
        let of_day = seconds.rem_euclid(SECONDS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{fraction:07}Z",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_accepts_the_documented_forms() {
        let z = Ticks::parse_strict("2022-06-01T22:27:50.2612586Z").expect("valid");
        let offset = Ticks::parse_strict("2022-06-01T22:27:50.2612586+00:00").expect("valid");
        assert_eq!(z, offset);
        assert_eq!(z.to_string(), "2022-06-01T22:27:50.2612586Z");
        let plus_two = Ticks::parse_strict("2022-06-02T00:27:50.2612586+02:00").expect("valid");
        assert_eq!(plus_two, z);
        assert_eq!(Ticks::parse_strict("1970-01-01T00:00:00Z"), Some(Ticks(0)));
        assert_eq!(
            Ticks::parse_strict("1970-01-01T00:00:00.1Z"),
            Some(Ticks(1_000_000))
        );
        assert!(Ticks::parse_strict("0001-01-01T00:00:00Z").is_some());
    }

    #[test]
    fn strict_rejects_everything_else() {
        for bad in [
            "",
            "2022-06-01",
            "2022-06-01T22:27:50",
            "2022-06-01t22:27:50Z",
            "2022-06-01T22:27:50z",
            "2022-06-01T22:27:50.Z",
            "2022-06-01T22:27:50.12345678Z",
            "2022-06-01T24:00:00Z",
            "2022-06-01T23:60:00Z",
            "2022-06-01T23:59:60Z",
            "2022-13-01T00:00:00Z",
            "2022-02-30T00:00:00Z",
            "2022-06-01T22:27:50+0000",
            "2022-06-01T22:27:50+24:00",
            "2022-06-01T22:27:50+00:60",
            "2022-06-01 22:27:50Z",
            " 2022-06-01T22:27:50Z",
            "2022-06-01T22:27:50Z ",
            "+022-06-01T22:27:50Z",
        ] {
            assert_eq!(Ticks::parse_strict(bad), None, "{bad:?} must be rejected");
        }
    }

    #[test]
    fn lenient_takes_transport_forms() {
        let expected = Ticks::parse_strict("2019-05-10T06:06:32.7220000Z");
        assert_eq!(Ticks::parse_lenient("2019-05-10T06:06:32.722Z"), expected);
        assert_eq!(
            Ticks::parse_lenient("2019-05-10T06:06:32.72200000000Z"),
            expected
        );
        assert_eq!(Ticks::parse_lenient("2019-05-10 06:06:32.722"), expected);
        assert_eq!(
            Ticks::parse_lenient("12/8/2017 3:03:17 AM"),
            Ticks::parse_strict("2017-12-08T03:03:17Z")
        );
        assert_eq!(
            Ticks::parse_lenient("12/8/2017 3:03:17 PM"),
            Ticks::parse_strict("2017-12-08T15:03:17Z")
        );
    }

    /// Issue 23: byte 19 inside a multi-byte character panicked `str::split_at`, and the
    /// durable checkpoint made it a crash loop. Every cut of such strings must be `None`.
    #[test]
    fn no_parser_panics_on_a_character_cut_at_any_byte() {
        for bad in [
            "2019-05-10T06:06:3é",
            "2019-05-10T06:06:3éZ",
            "2019-05-10T06:06:32é",
            "2019-05-10T06:06:32.7é",
            "2019-05-10T06:06:32.722+0é:00",
            "2019-05-10 06:06:3€",
            "2019-05-10é06:06:32Z",
            "é019-05-10T06:06:32Z",
            "2019-05-10T06:06:32.7220000😀",
            "12/8/2017 3:03:1é AM",
            "12/8/2017 3:03:17 AMé",
            "99999999999999999999/8/2017 3:03:17 AM",
            "12/8/99999999999999999999 3:03:17 AM",
            "12/8/-2017 3:03:17 AM",
            "12/8/2017 -3:03:17 AM",
            "12/8/2017/1 3:03:17 AM",
        ] {
            assert_eq!(Ticks::parse_lenient(bad), None, "{bad:?} must be rejected");
            assert_eq!(Ticks::parse_strict(bad), None, "{bad:?} must be rejected");
        }
        // Every prefix of every char-aligned cut of a valid time with a multi-byte tail.
        let text = "2019-05-10T06:06:32.7220000Zé€😀";
        for end in 0..=text.len() {
            if let Some(prefix) = text.get(..end) {
                let _ = Ticks::parse_lenient(prefix);
                let _ = Ticks::parse_strict(prefix);
            }
            for c in ["é", "€", "😀"] {
                let mut spliced = text.as_bytes()[..end].to_vec();
                spliced.extend_from_slice(c.as_bytes());
                if let Ok(spliced) = std::str::from_utf8(&spliced) {
                    let _ = Ticks::parse_lenient(spliced);
                    let _ = Ticks::parse_strict(spliced);
                }
            }
        }
    }

    proptest::proptest! {
        /// Strings of the characters times are made of, with multi-byte ones among them:
        /// parsing never panics, whatever the cut.
        #[test]
        fn parsers_never_panic(text in "[0-9:./ TtZz+é€😀APM-]{0,40}") {
            let _ = Ticks::parse_lenient(&text);
            let _ = Ticks::parse_strict(&text);
        }
    }

    #[test]
    fn now_is_the_wall_clock_in_ticks() {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970");
        let before = since.as_millis() as i64;
        let now = Ticks::now().unix_millis();
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_millis() as i64;
        assert!(
            before <= now && now <= after,
            "{before} <= {now} <= {after}"
        );
    }

    #[test]
    fn display_round_trips_before_the_epoch() {
        let t = Ticks::parse_strict("1969-12-31T23:59:59.9999999Z").expect("valid");
        assert_eq!(t, Ticks(-1));
        assert_eq!(t.to_string(), "1969-12-31T23:59:59.9999999Z");
    }
}
