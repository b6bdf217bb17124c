//! Sources of manifests: reads `*.yaml`/`*.yml` files from directories, and from Git trees
//! (`git`), into `SourceFile`s, bounded in size and confined to the given roots.
//!
//! Owns file-system traversal and Git fetching only; it never parses YAML (`manifest` does)
//! and never talks to the cluster.

pub mod git;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::diagnostic::Diagnostic;

/// One input file, as read from a directory or a Git tree.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as shown to the user.
    pub path: String,
    pub bytes: Vec<u8>,
}

/// Largest manifest file read (1 MiB); larger files are refused, unread.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1024 * 1024;
/// Deepest directory nesting followed under a root.
const MAX_DEPTH: usize = 32;

fn is_manifest_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

fn read_bounded(path: &Path, shown: &str, max: u64) -> Result<Vec<u8>, Diagnostic> {
    let file = fs::File::open(path)
        .map_err(|e| Diagnostic::file(shown, format!("cannot read file: {e}")))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Diagnostic::file(shown, format!("cannot read file: {e}")))?;
    if bytes.len() as u64 > max {
        return Err(Diagnostic::file(
            shown,
            format!("file is larger than the limit of {max} bytes"),
        ));
    }
    Ok(bytes)
}

struct Walk<'a> {
    max_size: u64,
    root_canonical: PathBuf,
    root_shown: String,
    seen: BTreeSet<PathBuf>,
    files: &'a mut Vec<SourceFile>,
    problems: &'a mut Vec<Diagnostic>,
}

impl Walk<'_> {
    fn visit(&mut self, path: &Path, depth: usize) {
        let shown = path.display().to_string();
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                self.problems
                    .push(Diagnostic::file(&shown, format!("cannot read: {e}")));
                return;
            }
        };
        let target = if meta.file_type().is_symlink() {
            match fs::canonicalize(path) {
                Ok(t) if t.starts_with(&self.root_canonical) => t,
                Ok(t) => {
                    if depth == 0 || is_manifest_name(path) || t.is_dir() {
                        let link = fs::read_link(path)
                            .map(|l| l.display().to_string())
                            .unwrap_or_default();
                        self.problems.push(Diagnostic::file(
                            &shown,
                            format!(
                                "symlink to {link} leads outside {}; refused",
                                self.root_shown
                            ),
                        ));
                    }
                    return;
                }
                Err(e) => {
                    if is_manifest_name(path) {
                        self.problems
                            .push(Diagnostic::file(&shown, format!("broken symlink: {e}")));
                    }
                    return;
                }
            }
        } else {
            match fs::canonicalize(path) {
                Ok(t) => t,
                Err(e) => {
                    self.problems
                        .push(Diagnostic::file(&shown, format!("cannot read: {e}")));
                    return;
                }
            }
        };
        if target.is_dir() {
            if depth > MAX_DEPTH {
                self.problems.push(Diagnostic::file(
                    &shown,
                    format!("directory nesting deeper than {MAX_DEPTH}; not followed"),
                ));
                return;
            }
            if !self.seen.insert(target.clone()) {
                return; // a loop, or a second link to the same directory
            }
            let mut entries: Vec<PathBuf> = match fs::read_dir(path) {
                Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect(),
                Err(e) => {
                    self.problems.push(Diagnostic::file(
                        &shown,
                        format!("cannot list directory: {e}"),
                    ));
                    return;
                }
            };
            entries.sort();
            for entry in entries {
                let hidden = entry
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'));
                if !hidden {
                    self.visit(&entry, depth + 1);
                }
            }
        } else if depth == 0 || is_manifest_name(path) {
            if !self.seen.insert(target.clone()) {
                return;
            }
            match read_bounded(&target, &shown, self.max_size) {
                Ok(bytes) => self.files.push(SourceFile { path: shown, bytes }),
                Err(d) => self.problems.push(d),
            }
        }
    }
}

/// The revision of a directory's content: `dir-` and a digest of every file's path and
/// bytes and of every problem reading it. `apply` and `run` name a directory's content the
/// same way, so `envctl status` shows one revision for the same files.
pub fn directory_revision(files: &[SourceFile], problems: &[Diagnostic]) -> String {
    let mut h = crate::vocab::Fnv64::new();
    for f in files {
        h.write(f.path.as_bytes());
        h.write(&f.bytes);
    }
    for p in problems {
        h.write(p.to_string().as_bytes());
    }
    format!("dir-{}", h.hex())
}

/// Reads every manifest under `paths` (files as given, directories recursively). Problems
/// (unreadable, too large, outside the root) come back as diagnostics; reading goes on.
pub fn read_paths(paths: &[PathBuf], max_size: u64) -> (Vec<SourceFile>, Vec<Diagnostic>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for root in paths {
        let root_canonical = match fs::canonicalize(root) {
            Ok(c) => {
                if c.is_dir() {
                    c
                } else {
                    c.parent().map(Path::to_path_buf).unwrap_or(c)
                }
            }
            Err(e) => {
                problems.push(Diagnostic::file(
                    root.display().to_string(),
                    format!("cannot read: {e}"),
                ));
                continue;
            }
        };
        let mut walk = Walk {
            max_size,
            root_canonical,
            root_shown: root.display().to_string(),
            seen: BTreeSet::new(),
            files: &mut files,
            problems: &mut problems,
        };
        walk.visit(root, 0);
    }
    (files, problems)
}
