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

/// A file's text without comments and without its `#[cfg(test)]` tail (tests may reach
/// anywhere in their folder).
fn code_of(text: &str) -> String {
    let body = text.find("#[cfg(test)]\nmod ").map_or(text, |i| &text[..i]);
    body.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers that follow `prefix` in `line` (`prefix::name`, or each top-level name of a
/// `prefix::{a, b::c}` group).
fn names_after(line: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find(prefix) {
        // Only a path that starts here (`super::x`, not `super::super::x` read twice).
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        // `super::super::…` leaves the folder: not a use inside it.
        if rest.starts_with("super::") {
            while let Some(r) = rest.strip_prefix("super::") {
                rest = r;
            }
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            out.extend(group[..end].split(',').map(ident).filter(|n| !n.is_empty()));
        } else {
            let n = ident(rest);
            if !n.is_empty() {
                out.push(n);
            }
        }
    }
    out
}

/// Every folder of `src/` (a module with children): the modules in it that use each other,
/// by path. A child file uses a sibling through `super::sibling`, `crate::folder::sibling`,
/// or an item the folder's `mod.rs` re-exports from that sibling; it uses `mod.rs` itself
/// through any other `super::item`. `mod.rs` uses a child through `child::…` (its `mod`
/// declarations and `pub use` re-exports are structure, not use).
fn folder_edges(dir: &Path, src: &Path) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir(dir).expect("reading a folder") {
        let path = entry.expect("an entry").path();
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .to_string();
        if path.is_dir() && path.join("mod.rs").exists() {
            children.push((name, path.join("mod.rs")));
        } else if let Some(stem) = name.strip_suffix(".rs")
            && stem != "mod"
        {
            children.push((stem.to_string(), path));
        }
    }
    let is_child = |n: &str| children.iter().any(|(c, _)| c == n);
    let root = code_of(&std::fs::read_to_string(dir.join("mod.rs")).expect("mod.rs"));
    // Items mod.rs brings in from a child (`use child::{A, B}`, public or not).
    let mut from_child: BTreeMap<String, String> = BTreeMap::new();
    for line in root.lines() {
        let t = line.trim();
        let Some(path) = t
            .strip_prefix("pub use ")
            .or_else(|| t.strip_prefix("pub(crate) use "))
            .or_else(|| t.strip_prefix("use "))
        else {
            continue;
        };
        let Some((child, items)) = path.split_once("::") else {
            continue;
        };
        if !is_child(child) {
            continue;
        }
        let items = items
            .trim_end_matches(';')
            .trim_matches(|c| c == '{' || c == '}');
        for item in items.split(',') {
            let item = item.split(" as ").last().unwrap_or("").trim();
            if !item.is_empty() {
                from_child.insert(item.to_string(), child.to_string());
            }
        }
    }
    let folder_path = format!(
        "crate::{}::",
        dir.strip_prefix(src)
            .expect("under src")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .collect::<Vec<_>>()
            .join("::")
    );
    let mut edges: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    edges.entry("mod".into()).or_default();
    for line in root.lines() {
        let t = line.trim();
        if t.starts_with("mod ")
            || t.starts_with("pub mod ")
            || t.starts_with("pub(crate) mod ")
            || t.starts_with("pub use ")
            || t.starts_with("pub(crate) use ")
        {
            continue;
        }
        for (child, _) in &children {
            let own = format!("{child}::");
            let named = names_after(t, &own).len() + names_after(t, &format!("self::{own}")).len();
            if named > 0 {
                edges.get_mut("mod").expect("mod").insert(child.clone());
            }
        }
    }
    for (child, path) in &children {
        let text = code_of(&std::fs::read_to_string(path).expect("a source file"));
        let mut used = std::collections::BTreeSet::new();
        for line in text.lines() {
            for n in names_after(line, "super::")
                .into_iter()
                .chain(names_after(line, &folder_path))
            {
                let target = if is_child(&n) {
                    n
                } else {
                    from_child.get(&n).cloned().unwrap_or_else(|| "mod".into())
                };
                if &target != child {
                    used.insert(target);
                }
            }
        }
        edges.insert(child.clone(), used);
    }
    edges
}

/// A cycle among `edges`, if there is one (as the list of modules around it).
fn cycle(edges: &BTreeMap<String, std::collections::BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, std::collections::BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut found = stack[from..].to_vec();
                    found.push(next.clone());
                    return Some(found);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node)
            && let Some(c) = visit(node, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// Inside each folder too, the modules read top-down: no two use each other, directly or
/// around a longer loop (`mod.rs` included).
#[test]
fn no_cycle_inside_a_folder() {
    let src = repo_root().join("src");
    let mut folders = Vec::new();
    let mut files = Vec::new();
    walk(&src, &mut files);
    for f in &files {
        if f.file_name().is_some_and(|n| n == "mod.rs") {
            folders.push(f.parent().expect("a folder").to_path_buf());
        }
    }
    assert!(folders.len() >= 5, "{folders:?}");
    let mut cycles = Vec::new();
    let mut edges_seen = 0;
    for dir in &folders {
        let edges = folder_edges(dir, &src);
        edges_seen += edges.values().map(|e| e.len()).sum::<usize>();
        if let Some(c) = cycle(&edges) {
            cycles.push(format!(
                "src/{}: {}",
                dir.strip_prefix(&src).expect("under src").display(),
                c.join(" -> ")
            ));
        }
    }
    // The check saw the folders' uses at all.
    assert!(edges_seen > 20, "only {edges_seen} uses inside folders");
    assert!(
        cycles.is_empty(),
        "cycles inside folders:\n{}",
        cycles.join("\n")
    );
}

/// The folder check finds a cycle when there is one.
#[test]
fn a_cycle_inside_a_folder_is_found() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let src = dir.path().join("src");
    let folder = src.join("certs");
    std::fs::create_dir_all(&folder).expect("a folder");
    std::fs::write(
        folder.join("mod.rs"),
        "mod acme;\nmod store;\npub use store::Kept;\npub enum Mode { Acme(acme::Config) }\n",
    )
    .expect("writing");
    std::fs::write(
        folder.join("acme.rs"),
        "use super::Kept;\npub struct Config;\n",
    )
    .expect("writing");
    std::fs::write(
        folder.join("store.rs"),
        "pub fn now() -> u64 { super::unix_now() }\npub struct Kept;\n",
    )
    .expect("writing");
    let edges = folder_edges(&folder, &src);
    let found = cycle(&edges).unwrap_or_else(|| panic!("no cycle found in {edges:?}"));
    let around: std::collections::BTreeSet<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(
        around,
        ["acme", "mod", "store"].into_iter().collect(),
        "{found:?}"
    );
    assert_eq!(found.first(), found.last(), "a loop: {found:?}");
}
