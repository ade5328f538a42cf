//! Durations written as Go's `time.ParseDuration` reads them (`100ms`, `1.5h`,
//! `1h30m`, `2us`): runc's flags take them, so callers pass them to us too.

use std::time::Duration;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("time: invalid duration {0:?}")]
    Invalid(String),
    #[error("time: missing unit in duration {0:?}")]
    MissingUnit(String),
    #[error("time: unknown unit {unit:?} in duration {text:?}")]
    UnknownUnit { unit: String, text: String },
    /// A Duration cannot be negative (Go's can; no flag of ours wants one).
    #[error("time: negative duration {0:?}")]
    Negative(String),
}

/// Nanoseconds per unit, with Go's unit names (µ as U+00B5 or U+03BC).
fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Parses `[-+]?([0-9]*(\.[0-9]*)?[a-zµμ]+)+`, or a bare `0`, as Go does,
/// with Go's error words and its limit (what fits in an i64 of nanoseconds).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(text.into());
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            // No digits at all (".s", "s", "1h.")
            return Err(invalid());
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit(text.into()));
        }
        let scale = unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit {
            unit: unit.into(),
            text: text.into(),
        })?;
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid())?
        };
        // The fraction's digits past what a nanosecond can hold do not count.
        let mut part = whole.checked_mul(scale).ok_or_else(invalid)?;
        let mut place = scale;
        for d in frac.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            part += u128::from(d - b'0') * place;
        }
        total = total.checked_add(part).ok_or_else(invalid)?;
        if total > i64::MAX as u128 {
            return Err(invalid());
        }
        rest = next;
    }
    if negative && total > 0 {
        return Err(DurationError::Negative(text.into()));
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn reads_what_go_reads() {
        assert_eq!(parse("100ms"), Ok(ms(100)));
        assert_eq!(parse("5s"), Ok(ms(5000)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse(".5s"), Ok(ms(500)));
        assert_eq!(parse("1.s"), Ok(ms(1000)));
        assert_eq!(parse("+2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("300ns"), Ok(Duration::from_nanos(300)));
        assert_eq!(parse("2us"), Ok(Duration::from_micros(2)));
        assert_eq!(parse("2µs"), Ok(Duration::from_micros(2)));
        assert_eq!(parse("2μs"), Ok(Duration::from_micros(2)));
        assert_eq!(parse("1m0.5s"), Ok(ms(60_500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("-0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("1.0000000001s"), Ok(Duration::from_secs(1)));
        assert_eq!(
            parse("2562047h47m16.854775807s"),
            Ok(Duration::from_nanos(i64::MAX as u64))
        );
    }

    #[test]
    fn refuses_what_go_refuses_in_its_words() {
        assert_eq!(
            parse("1").unwrap_err().to_string(),
            "time: missing unit in duration \"1\""
        );
        assert_eq!(
            parse("1x").unwrap_err().to_string(),
            "time: unknown unit \"x\" in duration \"1x\""
        );
        assert_eq!(
            parse("").unwrap_err().to_string(),
            "time: invalid duration \"\""
        );
        assert_eq!(
            parse("1..5s"),
            Err(DurationError::MissingUnit("1..5s".into()))
        );
        for bad in ["-", ".", ".s", "s", "1h.", "2562047h47m16.854775808s"] {
            assert!(
                matches!(parse(bad), Err(DurationError::Invalid(_))),
                "{bad:?}: {:?}",
                parse(bad)
            );
        }
        assert_eq!(parse("-1s"), Err(DurationError::Negative("-1s".into())));
    }
}
