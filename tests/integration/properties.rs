//! Property tests of the pure stages (issue 12, bad input): the YAML emitter against a YAML
//! 1.2 reader (serde-saphyr) and a YAML 1.1 reader (PyYAML, installed by `scripts/test`), and
//! `validate` over 100,000 random and mutated manifests: no panic, and every error has a
//! position. Deterministic: a fixed-seed generator, so a failure reproduces.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use envctl::manifest::{LoadOptions, SourceFile, load};
use serde_json::Value;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Words and shapes that YAML readers like to take for something other than a string.
const TRICKY: &[&str] = &[
    "yes",
    "No",
    "ON",
    "off",
    "Y",
    "n",
    "true",
    "False",
    "NULL",
    "~",
    "null",
    "",
    " ",
    "-",
    "--",
    "---",
    "...",
    "0",
    "012",
    "0x1F",
    "0o17",
    "0b101",
    "1e3",
    "1_000",
    "+1",
    "-1",
    ".5",
    ".inf",
    "-.Inf",
    ".NaN",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "12:30:00",
    "1:20",
    "=",
    "<<",
    "a: b",
    "a #b",
    "#c",
    "&a",
    "*a",
    "!tag",
    "%x",
    "@x",
    "`x",
    "|",
    ">",
    "'q'",
    "\"d\"",
    "{a}",
    "[a]",
    "a,b",
    "k: v\n",
    "multi\nline",
    "tab\there",
    "trail ",
    " lead",
    "é",
    "日本",
    "\u{1F600}",
    "\\",
    "\\n",
    "materialize/clusterd:v0.130.0",
    "8b7c2f0e-4f1e",
    "2Gi",
    "100m",
];

fn random_string(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => rng.pick(TRICKY).to_string(),
        1 => {
            let alphabet: Vec<char> = " :-{}[]#&*!|>'\"%@`\t\n0123456789aZé.,?=~+_/\\"
                .chars()
                .collect();
            (0..rng.below(12)).map(|_| *rng.pick(&alphabet)).collect()
        }
        _ => format!("{}{}", rng.pick(TRICKY), rng.pick(TRICKY)),
    }
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 2 } else { 5 }) {
        0 | 1 => Value::String(random_string(rng)),
        2 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        3 => random_map(rng, depth + 1),
        _ => match rng.below(3) {
            0 => Value::from(rng.next() as i64 % 100_000),
            1 => Value::Bool(rng.below(2) == 0),
            _ => Value::Null,
        },
    }
}

fn random_map(rng: &mut Rng, depth: usize) -> Value {
    let mut m = serde_json::Map::new();
    for _ in 0..rng.below(5) {
        m.insert(random_string(rng), random_value(rng, depth));
    }
    Value::Object(m)
}

/// Random keys and strings render and read back unchanged through a YAML 1.2 reader and a
/// YAML 1.1 reader.
#[test]
fn yaml_round_trips_through_yaml_1_1_and_1_2() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let docs: Vec<Value> = (0..3000).map(|_| random_map(&mut rng, 0)).collect();
    let mut stream = String::new();
    for d in &docs {
        let text = envctl::yaml::to_yaml(d);
        let back: Value = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("YAML 1.2 reader refused:\n{text}\n{e}"));
        assert_eq!(&back, d, "YAML 1.2 reader:\n{text}");
        stream.push_str("---\n");
        stream.push_str(&text);
    }
    // PyYAML resolves YAML 1.1's implicit types (yes/no/on/off, sexagesimals, 0o, ...).
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\nprint(json.dumps(list(yaml.safe_load_all(sys.stdin.read()))))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with PyYAML (scripts/test installs pyyaml)");
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(stream.as_bytes())
        .expect("writing to python");
    let out = python.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "PyYAML refused the stream: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON from python");
    assert_eq!(back.len(), docs.len());
    for (b, d) in back.iter().zip(&docs) {
        assert_eq!(b, d, "YAML 1.1 reader:\n{}", envctl::yaml::to_yaml(d));
    }
}

fn examples() -> Vec<Vec<u8>> {
    let dir = crate::support::repo_root().join("examples/environments");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("examples")
        .map(|e| std::fs::read(e.expect("an entry").path()).expect("an example"))
        .collect();
    out.sort();
    out
}

fn mutate(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    let alphabet = b" :-{}[]#&*!|>'\"%@`\t\n0aZ\xff,.?~";
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let i = rng.below(bytes.len());
        match rng.below(5) {
            0 => bytes[i] = *rng.pick(alphabet),
            1 => {
                bytes.remove(i);
            }
            2 => bytes.insert(i, *rng.pick(alphabet)),
            3 => {
                // Duplicate or drop a whole line.
                let text = String::from_utf8_lossy(&bytes).to_string();
                let mut lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let l = rng.below(lines.len());
                    if rng.below(2) == 0 {
                        let line = lines[l];
                        lines.insert(l, line);
                    } else {
                        lines.remove(l);
                    }
                }
                bytes = lines.join("\n").into_bytes();
            }
            _ => {
                // Replace a value with a tricky one.
                let text = String::from_utf8_lossy(&bytes).to_string();
                let mut i = i.min(text.len());
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                if let Some(colon) = text[i..].find(": ").map(|c| c + i) {
                    let end = text[colon..].find('\n').map_or(text.len(), |e| e + colon);
                    let tricky = rng.pick(TRICKY).replace('\n', " ");
                    bytes = format!("{}: {}{}", &text[..colon], tricky, &text[end..]).into_bytes();
                }
            }
        }
    }
    bytes
}

fn random_manifest(rng: &mut Rng) -> Vec<u8> {
    let mut doc = serde_json::json!({
        "apiVersion": "envctl.materialize.cloud/v1alpha1",
        "kind": "Environment",
        "metadata": {"name": random_string(rng)},
        "spec": {
            "organization": random_string(rng),
            "region": random_string(rng),
            "hostname": random_string(rng),
            "environmentd": {"image": random_string(rng)},
            "services": {"compute": [{"id": random_string(rng), "image": "x", "scale": rng.below(100)}]},
        }
    });
    // Random extra fields at random places.
    for _ in 0..rng.below(3) {
        let at = *rng.pick(&["/spec", "/metadata", "/spec/environmentd", ""]);
        if let Some(Value::Object(m)) = doc.pointer_mut(at) {
            m.insert(random_string(rng), random_value(rng, 2));
        }
    }
    envctl::yaml::to_yaml(&doc).into_bytes()
}

/// `validate` over 100,000 random and mutated manifests: no panic, and every diagnostic names
/// its file and a line and column inside it.
#[test]
fn validate_never_panics_and_every_error_has_a_position() {
    let originals = examples();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut total = 0usize;
    let mut rejected = 0usize;
    let mut by_message: BTreeMap<String, usize> = BTreeMap::new();
    while total < 100_000 {
        let batch: Vec<SourceFile> = (0..1000)
            .map(|i| {
                let bytes = if rng.below(3) == 0 {
                    random_manifest(&mut rng)
                } else {
                    let original = rng.pick(&originals).clone();
                    mutate(&mut rng, &original)
                };
                SourceFile {
                    path: format!("f{}.yaml", total + i),
                    bytes,
                }
            })
            .collect();
        total += batch.len();
        let loaded = load(&batch, &LoadOptions::default());
        let files: BTreeMap<&str, &SourceFile> =
            batch.iter().map(|f| (f.path.as_str(), f)).collect();
        for d in &loaded.diagnostics {
            let file = files
                .get(d.file.as_str())
                .unwrap_or_else(|| panic!("a diagnostic names no file of the batch: {d}"));
            let pos = d.pos.as_ref().unwrap_or_else(|| {
                panic!(
                    "no position: {d}\n--- {}:\n{}",
                    d.file,
                    String::from_utf8_lossy(&file.bytes)
                )
            });
            let lines = file.bytes.split(|b| *b == b'\n').count().max(1);
            assert!(
                pos.line >= 1 && pos.line <= lines + 1 && pos.col >= 1,
                "position {}:{} outside the file of {lines} lines: {d}",
                pos.line,
                pos.col
            );
            *by_message
                .entry(d.message.chars().take(40).collect())
                .or_default() += 1;
        }
        rejected += loaded
            .diagnostics
            .iter()
            .map(|d| d.file.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
    }
    eprintln!(
        "validate: {total} manifests, {rejected} rejected, {} kinds of message",
        by_message.len()
    );
    assert!(
        rejected > total / 2,
        "most inputs are invalid: {rejected} of {total}"
    );
}
