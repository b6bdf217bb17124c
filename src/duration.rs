//! Human durations for flags and settings: `500ms`, `30s`, `10m`, `168h`, `7d`. Pure.

use std::time::Duration;

/// Parses a positive duration; a bare number means seconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a duration such as 30s, 10m or 1h, got {s:?}"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("unknown unit in {s:?}: use ms, s, m, h or d")),
    }
    .ok_or_else(|| format!("{s:?} is too long"))?;
    if ms == 0 {
        return Err("the duration must be above zero".into());
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses() {
        assert_eq!(super::parse("30s").map(|d| d.as_secs()), Ok(30));
        assert_eq!(super::parse("168h").map(|d| d.as_secs()), Ok(604_800));
        assert_eq!(super::parse("250ms").map(|d| d.as_millis()), Ok(250));
        assert_eq!(super::parse("7d").map(|d| d.as_secs()), Ok(604_800));
        assert!(super::parse("0s").is_err());
        assert!(super::parse("soon").is_err());
        assert!(super::parse("5y").is_err());
    }
}
