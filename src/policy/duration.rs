//! ISO 8601 durations as the policy language defines them (docs/semantics.md §4):
//! `PnYnMnWnDTnHnMnS`, ASCII digits, no sign, a `.` fraction on the last component only, at
//! least one component, with Y = 365 days, M = 30 days and W = 7 days.
//!
//! A duration is kept as an exact count of attoseconds, so that `PT0.1M` and `PT6S` compare
//! equal, which floating point seconds would not promise. Fraction digits beyond the 30th are
//! dropped (they weigh less than 10^-22 s even on a year); a duration longer than about 10^13
//! years does not fit and is treated as not a duration.

/// A non-negative length of time in attoseconds (10^-18 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Duration(u128);

const ATTOS_PER_SECOND: u128 = 1_000_000_000_000_000_000;
const DAY: u128 = 86_400;

/// Designators of the date part, in the order they must appear, with their length in seconds.
const DATE_UNITS: [(u8, u128); 4] = [
    (b'Y', 365 * DAY),
    (b'M', 30 * DAY),
    (b'W', 7 * DAY),
    (b'D', DAY),
];
/// Designators of the time part (after `T`), in order.
const TIME_UNITS: [(u8, u128); 3] = [(b'H', 3_600), (b'M', 60), (b'S', 1)];

/// Fraction digits kept; the rest are dropped (see the module comment).
const MAX_FRACTION_DIGITS: usize = 30;

impl Duration {
    /// The length in 100 ns ticks, rounded up: a deadline `t + d` is not after an instant
    /// `c` (both whole ticks) exactly when `t + ticks_ceil(d)` is not.
    pub(crate) fn ticks_ceil(self) -> i64 {
        const ATTOS_PER_TICK: u128 = ATTOS_PER_SECOND / 10_000_000;
        i64::try_from(self.0.div_ceil(ATTOS_PER_TICK)).unwrap_or(i64::MAX)
    }

    #[cfg(test)]
    pub(crate) fn from_attos(attos: u128) -> Duration {
        Duration(attos)
    }
}

/// Parses a duration; `None` when `text` is not one. Allocates nothing.
pub(crate) fn parse(text: &str) -> Option<Duration> {
    let bytes = text.as_bytes();
    if bytes.first() != Some(&b'P') {
        return None;
    }
    let mut pos = 1;
    let mut in_time = false;
    // Index into the current unit table of the first designator still allowed: each
    // designator may appear once, in order.
    let mut next_unit = 0;
    let mut n_components = 0;
    let mut n_time_components = 0;
    let mut total: u128 = 0;
    while pos < bytes.len() {
        if bytes[pos] == b'T' {
            if in_time {
                return None;
            }
            in_time = true;
            next_unit = 0;
            pos += 1;
            continue;
        }
        let int_start = pos;
        while pos < bytes.len() && bytes[pos].is_ascii_digit() {
            pos += 1;
        }
        if pos == int_start {
            return None;
        }
        let int_digits = &bytes[int_start..pos];
        let mut fraction_digits: &[u8] = &[];
        if bytes.get(pos) == Some(&b'.') {
            pos += 1;
            let fraction_start = pos;
            while pos < bytes.len() && bytes[pos].is_ascii_digit() {
                pos += 1;
            }
            if pos == fraction_start {
                return None;
            }
            fraction_digits = &bytes[fraction_start..pos];
        }
        let designator = *bytes.get(pos)?;
        pos += 1;
        let units: &[(u8, u128)] = if in_time { &TIME_UNITS } else { &DATE_UNITS };
        let offset = units[next_unit..]
            .iter()
            .position(|&(d, _)| d == designator)?;
        let unit_seconds = units[next_unit + offset].1;
        next_unit += offset + 1;

        let whole = digits_value(int_digits)?
            .checked_mul(unit_seconds)?
            .checked_mul(ATTOS_PER_SECOND)?;
        total = total.checked_add(whole)?;
        if !fraction_digits.is_empty() {
            // Only the last component may carry a fraction.
            if pos != bytes.len() {
                return None;
            }
            total = total.checked_add(fraction_attos(fraction_digits, unit_seconds))?;
        }
        n_components += 1;
        if in_time {
            n_time_components += 1;
        }
    }
    if n_components == 0 || (in_time && n_time_components == 0) {
        return None;
    }
    Some(Duration(total))
}

/// The value of a run of ASCII digits; `None` when it does not fit.
fn digits_value(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        n.checked_mul(10)?.checked_add(u128::from(d - b'0'))
    })
}

/// `0.<digits>` of a unit of `unit_seconds`, in attoseconds, rounded down.
fn fraction_attos(digits: &[u8], unit_seconds: u128) -> u128 {
    let digits = &digits[..digits.len().min(MAX_FRACTION_DIGITS)];
    // At most 30 digits: below 10^30, and times a year in seconds below 3.2 * 10^37, which
    // fits in a u128 (3.4 * 10^38).
    let numerator = digits_value(digits).unwrap_or(0) * unit_seconds;
    let scale = digits.len() as u32;
    if scale <= 18 {
        numerator * 10u128.pow(18 - scale)
    } else {
        numerator / 10u128.pow(scale - 18)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(s: u128) -> Option<Duration> {
        Some(Duration::from_attos(s * ATTOS_PER_SECOND))
    }

    #[test]
    fn parses_every_component() {
        assert_eq!(parse("PT7M"), seconds(420));
        assert_eq!(parse("PT5H"), seconds(5 * 3600));
        assert_eq!(parse("P1Y"), seconds(365 * 86_400));
        assert_eq!(parse("P1M"), seconds(30 * 86_400));
        assert_eq!(parse("P1W"), seconds(7 * 86_400));
        assert_eq!(parse("P1D"), seconds(86_400));
        assert_eq!(
            parse("P1Y2M3W4DT5H6M7S"),
            seconds(((365 + 60 + 21 + 4) * 24 + 5) * 3600 + 6 * 60 + 7)
        );
        assert_eq!(parse("PT0S"), seconds(0));
        assert_eq!(parse("PT0.1M"), parse("PT6S"));
        assert_eq!(
            parse("PT1.5S"),
            Some(Duration::from_attos(1_500_000_000_000_000_000))
        );
        assert_eq!(
            parse("P49DT17H2M47.295S"),
            Some(Duration::from_attos(4_294_967_295 * 1_000_000_000_000_000))
        );
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for text in [
            "", "P", "PT", "P1DT", "T1H", "p1d", "PT1h", "P-1D", "P+1D", "P1.D", "P.5D", "P1,5D",
            "P1.5DT1H", "P1D1Y", "P1D1D", "PT1S1M", "P1H", "PT1D", "P1DTT1H", " PT1M", "PT1M ",
            "PT1", "P1", "PT1H2", "PT١S",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn huge_durations_do_not_fit() {
        assert_eq!(parse("P99999999999999999999999999999999999999Y"), None);
        assert!(parse("P9999999999Y").is_some());
    }

    #[test]
    fn long_fractions_are_cut_not_refused() {
        let long = format!("PT1.{}S", "0".repeat(40));
        assert_eq!(parse(&long), seconds(1));
    }
}
