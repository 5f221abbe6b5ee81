//! Clocks and times: wall-clock microseconds, as the simulators stamp their runs, and the
//! API's RFC 3339 times read back as milliseconds.

/// Wall-clock microseconds, comparable with the simulator's `/sim/runs` timestamps.
pub fn now_us() -> i64 {
    // A clock before 1970 reads as 0: the benchmarks compare such times with each other
    // and with the simulators' on the same clock, never with a calendar.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Microseconds as milliseconds.
pub fn ms(us: i64) -> f64 {
    us as f64 / 1000.0
}

/// Milliseconds since the epoch of an RFC 3339 time such as `2025-01-02T03:04:05.678Z`,
/// as the API writes them (an offset `+hh:mm` is understood too); `None` for anything
/// else. (`failover` and `scale` each had a copy; this is the stricter of the two.)
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        if !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if s.get(4..5)? != "-" || s.get(7..8)? != "-" || !matches!(s.get(10..11)?, "T" | "t" | " ") {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut frac_ms = 0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let padded = format!("{:0<3}", r.get(..n.min(3))?);
        frac_ms = padded.parse::<i64>().ok()?;
        rest = r.get(n..)?;
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.get(..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.get(3..4)? != ":" {
                return None;
            }
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 60 + om)
        }
    };
    // Days from the civil date (proleptic Gregorian), after H. Hinnant.
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + frac_ms)
}

#[cfg(test)]
mod tests {
    use super::rfc3339_ms;

    /// From `failover`'s copy.
    #[test]
    fn parses_the_api_times() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            rfc3339_ms("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096_789)
        );
        assert_eq!(
            rfc3339_ms("2024-02-29T13:34:56.7+01:00"),
            Some(1_709_210_096_700)
        );
        assert_eq!(rfc3339_ms("2024-02-29 12:34:56Z"), Some(1_709_210_096_000));
        assert_eq!(rfc3339_ms("yesterday"), None);
    }

    /// From `scale`'s copy.
    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            rfc3339_ms("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096_789)
        );
        assert_eq!(
            rfc3339_ms("2024-02-29T14:34:56.789+02:00"),
            Some(1_709_210_096_789)
        );
        assert_eq!(rfc3339_ms("2024-02-29 12:34"), None);
        assert_eq!(rfc3339_ms("not a time at all!!"), None);
    }
}
