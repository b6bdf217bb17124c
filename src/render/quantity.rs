//! Kubernetes quantities of CPU and memory, in the forms the manifest's schema allows
//! (`2`, `0.5`, `500m`; `8Gi`, `512Mi`, `1.5G`): parsed to whole milli-CPUs and bytes
//! (rounded up), and written back in the API server's canonical form, so that what envctl
//! sends is what the server returns and a plan sees no change. Pure.

/// `q` in milli-CPUs, rounded up; `None` for a form the schema does not allow.
pub fn cpu_millis(q: &str) -> Option<u128> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => scaled(q, 1000),
    }
}

/// `q` in bytes, rounded up; `None` for a form the schema does not allow.
pub fn memory_bytes(q: &str) -> Option<u128> {
    const SUFFIXES: [(&str, u128); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, unit) in SUFFIXES {
        if let Some(number) = q.strip_suffix(suffix) {
            return scaled(number, unit);
        }
    }
    scaled(q, 1)
}

/// A decimal number (`12` or `1.25`) times `unit`, rounded up.
fn scaled(number: &str, unit: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) || fraction.len() > 18 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    whole
        .checked_mul(unit)?
        .checked_add((fraction.checked_mul(unit)?).div_ceil(scale))
}

/// Milli-CPUs in canonical form: whole CPUs as a plain number, others in `m`.
pub fn format_cpu(millis: u128) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Bytes, rounded up to whole MiB, in canonical binary form (the largest suffix that divides
/// the value: `2Gi`, `1536Mi`).
pub fn format_memory(bytes: u128) -> String {
    let mib = bytes.div_ceil(1 << 20);
    if mib == 0 {
        return "0".into();
    }
    let mut value = mib;
    for suffix in ["Mi", "Gi", "Ti", "Pi", "Ei"] {
        if !value.is_multiple_of(1024) || suffix == "Ei" {
            return format!("{value}{suffix}");
        }
        value /= 1024;
    }
    format!("{mib}Mi")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_forms() {
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("0.5"), Some(500));
        assert_eq!(cpu_millis("500m"), Some(500));
        assert_eq!(cpu_millis("1.0005"), Some(1001));
        assert_eq!(cpu_millis("x"), None);
        assert_eq!(cpu_millis(".5"), None);
        assert_eq!(format_cpu(2000), "2");
        assert_eq!(format_cpu(2500), "2500m");
    }

    #[test]
    fn memory_forms() {
        assert_eq!(memory_bytes("8Gi"), Some(8 << 30));
        assert_eq!(memory_bytes("512Mi"), Some(512 << 20));
        assert_eq!(memory_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(memory_bytes("100"), Some(100));
        assert_eq!(memory_bytes("Gi"), None);
        assert_eq!(format_memory(8 << 30), "8Gi");
        assert_eq!(format_memory(3 << 29), "1536Mi");
        assert_eq!(format_memory(1_000_000_000), "954Mi");
        assert_eq!(format_memory(1), "1Mi");
        assert_eq!(format_memory(0), "0");
        assert_eq!(format_memory(1 << 40), "1Ti");
    }
}
