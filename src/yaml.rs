//! A small, fast block-style YAML emitter for JSON values (the shape of every Kubernetes
//! object envctl prints). Strings that could read as anything but a string are written as
//! JSON double-quoted strings, which YAML reads back identically.
//!
//! Pure; used by `render` output and `plan` diffs. Parsing stays with serde-saphyr.

use serde_json::Value;

/// The YAML text of `v` (ends with a newline unless `v` is null).
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::with_capacity(2048);
    write_yaml(&mut out, v);
    out
}

/// Appends the YAML text of `v` to `out`.
pub fn write_yaml(out: &mut String, v: &Value) {
    match v {
        Value::Null => {}
        Value::Object(m) if !m.is_empty() => write_map(out, m, 0),
        Value::Array(a) if !a.is_empty() => write_seq(out, a, 0),
        scalar => {
            write_scalar(out, scalar);
            out.push('\n');
        }
    }
}

fn indent(out: &mut String, n: usize) {
    for _ in 0..n {
        out.push(' ');
    }
}

/// Writes `key: value` entries at `level` spaces; the first entry's indentation is assumed
/// to be written already when `first_inline` is set (a map inside a sequence item).
fn write_entries(
    out: &mut String,
    m: &serde_json::Map<String, Value>,
    level: usize,
    first_inline: bool,
) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !first_inline {
            indent(out, level);
        }
        write_string(out, k);
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push_str(":\n");
                write_map(out, inner, level + 2);
            }
            Value::Array(items) if !items.is_empty() => {
                out.push_str(":\n");
                write_seq(out, items, level);
            }
            scalar => {
                out.push_str(": ");
                write_scalar(out, scalar);
                out.push('\n');
            }
        }
    }
}

fn write_map(out: &mut String, m: &serde_json::Map<String, Value>, level: usize) {
    write_entries(out, m, level, false);
}

/// Sequences are written at their parent key's indentation ("- " then the item).
fn write_seq(out: &mut String, items: &[Value], level: usize) {
    for item in items {
        indent(out, level);
        out.push_str("- ");
        match item {
            Value::Object(m) if !m.is_empty() => write_entries(out, m, level + 2, true),
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                write_seq(out, a, level + 2);
            }
            scalar => {
                write_scalar(out, scalar);
                out.push('\n');
            }
        }
    }
}

fn write_scalar(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
    }
}

/// Words YAML 1.1 or 1.2 readers take for booleans or null (compared ignoring case).
const RESERVED: [&str; 22] = [
    "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", "True", "False", "Yes", "No",
    "On", "Off", "Y", "N", "Null", "NULL", "TRUE", "FALSE",
];

fn plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if first.is_ascii_digit() {
        // Plain only when no reader could take it for a number or a timestamp: it needs a
        // letter other than an exponent, and no radix prefix or colon.
        let lower = s.to_ascii_lowercase();
        let numeric_prefix = ["0x", "0o", "0b"].iter().any(|p| lower.starts_with(p));
        let has_letter = s
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E');
        if numeric_prefix || !has_letter || s.contains(':') || s.contains(' ') {
            return false;
        }
    } else if !(first.is_ascii_alphabetic() || first == '/' || first == '_') {
        return false; // signs, dots and indicators: could read as a number or syntax
    }
    // Any capitalisation: YAML 1.1 readers take YES, NO, ON and OFF for booleans too.
    if s.len() <= 5 && RESERVED.iter().any(|r| r.eq_ignore_ascii_case(s)) {
        return false;
    }
    let bytes = s.as_bytes();
    let ok_bytes = bytes.iter().all(|&c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'_' | b'.' | b'/' | b':' | b'@' | b'+' | b'=' | b' '
            )
    });
    ok_bytes
        && !matches!(bytes.last(), Some(b':') | Some(b' '))
        && !(bytes.contains(&b' ') && (s.contains(": ") || s.contains(" #")))
}

fn write_string(out: &mut String, s: &str) {
    if plain_safe(s) {
        out.push_str(s);
    } else {
        // A JSON string literal is a valid YAML double-quoted scalar.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\"")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_through_a_real_yaml_parser() {
        let v = json!({
            "apiVersion": "apps/v1",
            "metadata": {"labels": {"a/b": "true", "n": "2", "e": "", "s": "x: y", "h": "#c",
                "ok": "materialize/clusterd:v0.130.0", "nl": "a\nb", "dot": ".5", "neg": "-1",
                "uuid": "8b7c2f0e-4f1e", "exp": "1e3", "hex": "0x1f", "mem": "2Gi", "ts": "2001-12-14",
                "oct": "0o17", "under": "1_000", "bin": "0b101", "time": "12:30"}},
            "spec": {"replicas": 2, "ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}],
                "args": ["--x=1", "y"], "empty": {}, "none": [], "nested": [[1, 2], []],
                "flag": false, "nothing": null}
        });
        let text = to_yaml(&v);
        let back: Value = serde_saphyr::from_str(&text).expect("parses");
        assert_eq!(back, v, "{text}");
    }

    #[test]
    fn yaml_1_1_booleans_are_quoted_in_any_case() {
        for word in [
            "yes", "YES", "Yes", "no", "NO", "on", "ON", "off", "OFF", "y", "N", "TRUE", "Null",
            "nULL",
        ] {
            let text = to_yaml(&json!({ "v": word }));
            assert!(
                text.contains(&format!("\"{word}\"")) || text.contains(&format!("'{word}'")),
                "{word} must be quoted: {text}"
            );
        }
        assert_eq!(to_yaml(&json!({"v": "yesterday"})), "v: yesterday\n");
    }
}
