//! The crate's layers read top-down: every `crate::` path in `src/` names a module below the
//! one that holds it (or the module itself). A pure check of the source text, no cluster.

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::repo_root;

/// Bottom to top. Modules on one line share a rank and may not import each other.
const LAYERS: &[&[&str]] = &[
    &["vocab"],
    &["duration", "diagnostic", "yaml"],
    &["health", "shard"],
    &["cluster"],
    &["metrics"],
    &["source"],
    &["manifest"],
    &["render"],
    &["rollout"],
    &["observe"],
    &["plan"],
    &["apply"],
    &["status"],
    &["certs"],
    &["pass"],
    &["controller"],
    &["cli"],
    &["lib", "main"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules a file names through `crate::`, with the line of each.
fn imports(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::x, b};`: the names at the top level of the group.
                let body = &text[text.find(line).unwrap_or(0)..];
                let body = &body[body.find("crate::{").map_or(0, |i| i + 8)..];
                let end = body.find("};").unwrap_or(body.len());
                let mut depth = 0;
                let mut item = String::new();
                for c in body[..end].chars().chain(std::iter::once(',')) {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            let name: String = item
                                .trim()
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            if !name.is_empty() {
                                found.push((n + 1, name));
                            }
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        item.push(c);
                    }
                }
                rest = group;
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push((n + 1, name));
        }
    }
    found
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn no_import_runs_back_up() {
    let src = repo_root().join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut upward = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let own = rank(&module)
            .unwrap_or_else(|| panic!("src/{} is in no layer of LAYERS", rel.display()));
        let text = std::fs::read_to_string(path).expect("reading a source file");
        for (line, target) in imports(&text) {
            *seen.entry(target.clone()).or_default() += 1;
            if target == module {
                continue;
            }
            let theirs = rank(&target).unwrap_or_else(|| {
                panic!(
                    "src/{}:{line} names crate::{target}, which is in no layer",
                    rel.display()
                )
            });
            if theirs >= own {
                upward.push(format!(
                    "src/{}:{line}: {module} (layer {own}) uses crate::{target} (layer {theirs})",
                    rel.display()
                ));
            }
        }
    }
    // The check saw the crate's imports at all (it cannot pass by reading nothing).
    assert!(seen.get("vocab").copied().unwrap_or(0) > 10, "{seen:?}");
    assert!(
        upward.is_empty(),
        "imports that run back up:\n{}",
        upward.join("\n")
    );
}
