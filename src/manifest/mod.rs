//! Manifests: turns the bytes of source files into validated `Environment`s, or into
//! diagnostics that name the file, line, column and field.
//!
//! Owns parsing (serde-saphyr, bounded), the JSON Schema check, typed decoding and the semantic
//! rules. Pure apart from compiling the schema once: it reads no files (`source` does) and
//! never touches the cluster.

pub mod check;
pub mod positions;
pub mod types;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use serde_json::Value;

pub use check::Limits;
pub use types::*;

use crate::diagnostic::{Diagnostic, Pos};
use positions::PositionIndex;

pub use crate::source::SourceFile;

/// Where an environment was defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub document: usize,
    pub pos: Option<Pos>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pos {
            Some(p) => write!(f, "{}:{}:{}", self.file, p.line, p.col),
            None => write!(f, "{}", self.file),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadedEnvironment {
    pub origin: Origin,
    pub environment: Environment,
}

/// The source's `RolloutPolicy`, if it has one.
#[derive(Debug, Clone, Default)]
pub enum Rollout {
    /// No policy: every change applies at once.
    #[default]
    None,
    Policy {
        origin: Origin,
        policy: RolloutPolicy,
    },
    /// A policy document that is invalid (or more than one): changes to existing
    /// environments are held, as the policy would not be followed otherwise.
    Invalid(String),
}

/// Everything read from one source revision.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// Valid environments, sorted by name (shared with the revisions whose file of it was
    /// the same: see `Validated`).
    pub environments: Vec<Arc<LoadedEnvironment>>,
    /// Every problem found, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
    /// Names of environments that were found but are invalid: they must keep their last
    /// applied state and must never be pruned.
    pub invalid_names: BTreeSet<String>,
    /// The first problem of each invalid environment, as `FILE:LINE:COL: error: ...`.
    pub invalid_reasons: BTreeMap<String, String>,
    /// Files that failed before any environment name could be read from them. While there are
    /// any, nothing may be pruned: the lost environment could be any of the live ones.
    pub unattributed_files: BTreeSet<String>,
    pub files: usize,
    /// How changes roll out across the fleet.
    pub rollout: Rollout,
    /// With `--region`: the valid environments of other regions, left out of
    /// `environments`, with their region. They are another region's to apply; here they
    /// count as not in the source (one that moved away is pruned only under `--prune`).
    pub elsewhere: BTreeMap<String, String>,
}

impl Loaded {
    /// Keeps only the environments of `regions`; the others move to `elsewhere`. Every file
    /// is still validated (a pull request is judged as a whole), and invalid environments
    /// stay invalid whatever their region: they are never pruned.
    pub fn keep_regions(&mut self, regions: &BTreeSet<String>) {
        let (mine, theirs): (Vec<_>, Vec<_>) = std::mem::take(&mut self.environments)
            .into_iter()
            .partition(|e| regions.contains(&e.environment.spec.region));
        self.environments = mine;
        self.elsewhere.extend(theirs.into_iter().map(|e| {
            (
                e.environment.metadata.name.clone(),
                e.environment.spec.region.clone(),
            )
        }));
    }

    pub fn is_valid(&self) -> bool {
        self.diagnostics.is_empty()
    }

    /// The valid environment named `name` (a binary search: they are sorted by name).
    pub fn environment(&self, name: &str) -> Option<&Arc<LoadedEnvironment>> {
        self.environments
            .binary_search_by(|e| e.environment.metadata.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.environments[i])
    }
}

/// Validates `files` and adds the problems of files the source could not read: they count
/// as files, and as unattributed (their environments are unknown, so nothing is pruned).
pub fn load_with_unread(
    files: &[SourceFile],
    unread: &[Diagnostic],
    options: &LoadOptions,
    known: &mut Validated,
) -> Loaded {
    let mut loaded = load_reusing(files, options, known);
    if let Some(regions) = &options.regions {
        loaded.keep_regions(regions);
    }
    if !unread.is_empty() {
        let paths: BTreeSet<String> = unread.iter().map(|d| d.file.clone()).collect();
        loaded.files += paths.len();
        loaded.unattributed_files.extend(paths);
        loaded.diagnostics.extend(unread.iter().cloned());
        loaded.diagnostics.sort();
    }
    loaded
}

/// Settings that affect validation, and which environments are this process's.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub limits: Limits,
    /// `--region`: only the environments of these regions (`spec.region`) are loaded; the
    /// others go to `Loaded::elsewhere`. `None`: every region's.
    pub regions: Option<BTreeSet<String>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            limits: Limits {
                max_scale: 64,
                platform_labels: BTreeMap::new(),
            },
            regions: None,
        }
    }
}

fn compiled_schema() -> &'static Result<jsonschema::Validator, String> {
    static SCHEMA: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        jsonschema::draft202012::new(&json_schema())
            .map_err(|e| format!("compiling the manifest schema: {e}"))
    })
}

fn compiled_policy_schema() -> &'static Result<jsonschema::Validator, String> {
    static SCHEMA: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        jsonschema::draft202012::new(&types::policy_json_schema())
            .map_err(|e| format!("compiling the RolloutPolicy schema: {e}"))
    })
}

fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 200_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_depth = 32;
    budget.max_nodes = 100_000;
    budget.max_documents = 256;
    budget.max_total_scalar_bytes = 4 * 1024 * 1024;
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = 100_000;
    options.alias_limits.max_alias_expansions_per_anchor = 100;
    options.with_snippet = false;
    options.strict_booleans = true;
    options
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Position of the first invalid UTF-8 byte.
fn utf8_error_pos(bytes: &[u8], valid_up_to: usize) -> Pos {
    let prefix = &bytes[..valid_up_to];
    let line = prefix.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = prefix
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let col = String::from_utf8_lossy(&prefix[line_start..])
        .chars()
        .count()
        + 1;
    Pos { line, col }
}

/// A document of one file, decoded to JSON but not yet typed.
struct Document {
    index: usize,
    value: Value,
}

/// Parses one file into JSON documents and its text, or the diagnostic that prevents it.
fn parse_file(file: &SourceFile) -> Result<(Vec<Document>, &str), Diagnostic> {
    let text = std::str::from_utf8(&file.bytes).map_err(|e| {
        Diagnostic::at(
            &file.path,
            Some(utf8_error_pos(&file.bytes, e.valid_up_to())),
            "file is not valid UTF-8",
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| {
            let pos = e.location().map(|l| Pos {
                line: usize::try_from(l.line()).unwrap_or(usize::MAX),
                col: usize::try_from(l.column()).unwrap_or(usize::MAX),
            });
            Diagnostic::at(
                &file.path,
                pos,
                format!("invalid YAML: {}", yaml_message(&e)),
            )
        })?;
    let docs: Vec<Document> = docs
        .into_iter()
        .enumerate()
        .filter(|(_, v)| !v.is_null())
        .map(|(index, value)| Document { index, value })
        .collect();
    if docs.is_empty() {
        return Err(Diagnostic::file(
            &file.path,
            "file holds no environment (it is empty or only comments)",
        ));
    }
    Ok((docs, text))
}

/// A position index built on first use: valid files never need one.
struct LazyIndex<'a> {
    text: &'a str,
    index: Option<PositionIndex>,
}

impl LazyIndex<'_> {
    fn lookup(&mut self, doc: usize, pointer: &str) -> Option<Pos> {
        let text = self.text;
        self.index
            .get_or_insert_with(|| PositionIndex::build(text))
            .lookup(doc, pointer)
    }
}

/// What one file yielded.
#[derive(Default)]
struct FileOutcome {
    environments: Vec<Arc<LoadedEnvironment>>,
    diagnostics: Vec<Diagnostic>,
    invalid_names: BTreeSet<String>,
    invalid_reasons: BTreeMap<String, String>,
    unattributed: bool,
    policies: Vec<(Origin, Result<RolloutPolicy, String>)>,
}

fn load_file(file: &SourceFile, options: &LoadOptions) -> FileOutcome {
    let mut out = FileOutcome::default();
    let (docs, text) = match parse_file(file) {
        Ok(x) => x,
        Err(d) => {
            out.diagnostics.push(d);
            out.unattributed = true;
            return out;
        }
    };
    let mut index = LazyIndex { text, index: None };
    for doc in docs {
        let name = doc
            .value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let before = out.diagnostics.len();
        let origin = Origin {
            file: file.path.clone(),
            document: doc.index,
            pos: None,
        };
        if doc.value.get("kind").and_then(Value::as_str) == Some(types::POLICY_KIND) {
            load_policy(&mut out, file, &mut index, doc, origin);
            continue;
        }
        load_environment(&mut out, file, &mut index, doc, origin, options);
        if out.diagnostics.len() > before {
            match name {
                Some(n) => {
                    out.invalid_reasons
                        .entry(n.clone())
                        .or_insert_with(|| out.diagnostics[before].to_string());
                    out.invalid_names.insert(n);
                }
                None => out.unattributed = true,
            }
        }
    }
    out
}

/// Reports each schema problem of a document at its position.
fn report(
    out: &mut FileOutcome,
    file: &SourceFile,
    index: &mut LazyIndex,
    doc: usize,
    found: Vec<(String, String)>,
) {
    for (pointer, message) in found {
        out.diagnostics.push(Diagnostic {
            file: file.path.clone(),
            pos: index.lookup(doc, &pointer),
            pointer: Some(pointer),
            message,
        });
    }
}

/// A RolloutPolicy document: checked against its schema, then decoded.
fn load_policy(
    out: &mut FileOutcome,
    file: &SourceFile,
    index: &mut LazyIndex,
    doc: Document,
    origin: Origin,
) {
    let before = out.diagnostics.len();
    let mut found = Vec::new();
    schema_problems_with(compiled_policy_schema(), &doc.value, &mut found);
    report(out, file, index, doc.index, found);
    let first = out.diagnostics.get(before);
    let origin = Origin {
        pos: index.lookup(doc.index, ""),
        ..origin
    };
    let policy = match first {
        Some(d) => Err(d.to_string()),
        None => serde_json::from_value::<RolloutPolicy>(doc.value)
            .map_err(|e| format!("{origin}: decoding the RolloutPolicy: {e}")),
    };
    if let Err(e) = &policy
        && out.diagnostics.len() == before
    {
        out.diagnostics
            .push(Diagnostic::at(&file.path, origin.pos, e.clone()));
    }
    out.policies.push((origin, policy));
}

/// An Environment document: checked against the schema and envctl's own rules, then
/// decoded.
fn load_environment(
    out: &mut FileOutcome,
    file: &SourceFile,
    index: &mut LazyIndex,
    doc: Document,
    origin: Origin,
    options: &LoadOptions,
) {
    if !doc.value.is_object() {
        let pos = index.lookup(doc.index, "");
        out.diagnostics.push(Diagnostic::at(
            &file.path,
            pos,
            format!(
                "expected an Environment mapping, found {}",
                json_type(&doc.value)
            ),
        ));
        return;
    }
    let before = out.diagnostics.len();
    let mut found = Vec::new();
    schema_problems(&doc.value, &mut found);
    found.extend(check::check_environment(&doc.value, &options.limits));
    report(out, file, index, doc.index, found);
    if out.diagnostics.len() == before {
        match serde_json::from_value::<Environment>(doc.value) {
            Err(e) => out.diagnostics.push(Diagnostic::at(
                &file.path,
                index.lookup(doc.index, ""),
                format!("decoding the environment: {e}"),
            )),
            Ok(environment) => out.environments.push(Arc::new(LoadedEnvironment {
                origin,
                environment,
            })),
        }
    }
}

/// Schema violations of one document as (JSON pointer, message).
fn schema_problems(value: &Value, out: &mut Vec<(String, String)>) {
    schema_problems_with(compiled_schema(), value, out)
}

fn schema_problems_with(
    compiled: &Result<jsonschema::Validator, String>,
    value: &Value,
    out: &mut Vec<(String, String)>,
) {
    let validator = match compiled {
        Ok(v) => v,
        Err(e) => {
            out.push((String::new(), e.clone()));
            return;
        }
    };
    for err in validator.iter_errors(value) {
        let at = err.instance_path().as_str().to_string();
        match err.kind() {
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                for field in unexpected {
                    out.push((
                        format!("{at}/{}", positions::escape_segment(field)),
                        format!("unknown field {field:?}"),
                    ));
                }
            }
            jsonschema::error::ValidationErrorKind::Required { property } => {
                let name = property
                    .as_str()
                    .map_or_else(|| property.to_string(), str::to_string);
                out.push((at, format!("missing required field {name:?}")));
            }
            jsonschema::error::ValidationErrorKind::Type { .. } => {
                let found = json_type(err.instance());
                out.push((at, format!("{err}, found {found}")));
            }
            jsonschema::error::ValidationErrorKind::Pattern { pattern } => {
                let value = err.instance();
                match types::pattern_meaning(pattern) {
                    Some(meaning) => out.push((at, format!("{value} {meaning}"))),
                    None => out.push((at, err.to_string())),
                }
            }
            jsonschema::error::ValidationErrorKind::AnyOf { .. } if at.ends_with("/maxInFlight") => {
                out.push((
                    at,
                    format!(
                        "{} must be a count of at least 1 (such as 2) or a percentage from 1% to 100% (such as \"25%\")",
                        err.instance()
                    ),
                ))
            }
            _ => out.push((at, err.to_string())),
        }
    }
}

/// serde-saphyr's message without the position (we print our own) or API hints.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let mut msg = full.lines().next().unwrap_or("invalid YAML").to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    if let Some(i) = msg.find(", set DuplicateKeyPolicy") {
        msg.truncate(i);
    }
    if msg.contains("alias") && msg.contains("limit") {
        msg = format!("aliases expand beyond envctl's limits ({msg}); is this an alias bomb?");
    }
    msg
}

/// What validation made of each file, by path, with a digest of the file's bytes: a
/// revision that changes a few files validates only those, and shares the environments of
/// the others with the revisions before it. Holds for one `LoadOptions` (a controller keeps
/// one between its revisions).
#[derive(Default)]
pub struct Validated(HashMap<String, (u64, Arc<FileOutcome>)>);

fn digest(bytes: &[u8]) -> u64 {
    let mut h = crate::vocab::Fnv64::new();
    h.write(bytes);
    h.mixed()
}

/// Validates every file (in parallel); never panics on any input.
pub fn load(files: &[SourceFile], options: &LoadOptions) -> Loaded {
    load_reusing(files, options, &mut Validated::default())
}

/// `load`, validating only the files that `known` has not seen with the same bytes; `known`
/// is left holding exactly `files`.
pub fn load_reusing(files: &[SourceFile], options: &LoadOptions, known: &mut Validated) -> Loaded {
    let mut loaded = Loaded {
        files: files.len(),
        ..Loaded::default()
    };
    let digests: Vec<u64> = files.iter().map(|f| digest(&f.bytes)).collect();
    let todo: Vec<&SourceFile> = files
        .iter()
        .zip(&digests)
        .filter(|(f, d)| known.0.get(&f.path).is_none_or(|(k, _)| k != *d))
        .map(|(f, _)| f)
        .collect();
    let validated = validate_all(&todo, options);
    let mut fresh: HashMap<&str, Arc<FileOutcome>> = todo
        .iter()
        .map(|f| f.path.as_str())
        .zip(validated.into_iter().map(Arc::new))
        .collect();
    let mut now: HashMap<String, (u64, Arc<FileOutcome>)> = HashMap::with_capacity(files.len());
    let mut outcomes: Vec<(&SourceFile, Arc<FileOutcome>)> = Vec::with_capacity(files.len());
    for (file, d) in files.iter().zip(&digests) {
        let outcome = match fresh.remove(file.path.as_str()) {
            Some(o) => o,
            None => match known.0.get(&file.path) {
                Some((_, o)) => o.clone(),
                None => continue, // not reached: every file is validated or known
            },
        };
        now.insert(file.path.clone(), (*d, outcome.clone()));
        outcomes.push((file, outcome));
    }
    known.0 = now;
    let (by_name, policies) = gather(&mut loaded, outcomes);
    keep_unique(&mut loaded, by_name, files);
    loaded.rollout = rollout_of(&mut loaded, policies);
    loaded.diagnostics.sort();
    loaded.diagnostics.dedup();
    loaded
}

/// Validates `todo` on every core. A panic (a bug) fails each file of its chunk: they are
/// reported, and nothing is pruned while any file is unattributed.
fn validate_all(todo: &[&SourceFile], options: &LoadOptions) -> Vec<FileOutcome> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = todo.len().div_ceil(threads).max(64);
    std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .chunks(chunk)
            .map(|part| {
                let handle = scope.spawn(move || {
                    part.iter()
                        .map(|f| load_file(f, options))
                        .collect::<Vec<_>>()
                });
                (part, handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(part, h)| {
                h.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|f| FileOutcome {
                            diagnostics: vec![Diagnostic::file(
                                &f.path,
                                "internal error while validating this file (a bug; please report it)",
                            )],
                            unattributed: true,
                            ..FileOutcome::default()
                        })
                        .collect()
                })
            })
            .collect()
    })
}

/// Environments by name, each with every definition found.
type ByName = BTreeMap<String, Vec<Arc<LoadedEnvironment>>>;
/// Rollout policies, each where it was found.
type Policies = Vec<(Origin, Result<RolloutPolicy, String>)>;

/// Every file's outcome, merged into `loaded`: its diagnostics, invalid names and
/// unattributed files; the environments by name, and the rollout policies, to be checked
/// across files.
fn gather(
    loaded: &mut Loaded,
    outcomes: Vec<(&SourceFile, Arc<FileOutcome>)>,
) -> (ByName, Policies) {
    let mut by_name: BTreeMap<String, Vec<Arc<LoadedEnvironment>>> = BTreeMap::new();
    let mut policies = Vec::new();
    for (file, outcome) in outcomes {
        policies.extend(outcome.policies.iter().cloned());
        loaded
            .diagnostics
            .extend(outcome.diagnostics.iter().cloned());
        loaded
            .invalid_names
            .extend(outcome.invalid_names.iter().cloned());
        loaded.invalid_reasons.extend(
            outcome
                .invalid_reasons
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        if outcome.unattributed {
            loaded.unattributed_files.insert(file.path.clone());
        }
        for env in outcome.environments.iter().cloned() {
            by_name
                .entry(env.environment.metadata.name.clone())
                .or_default()
                .push(env);
        }
    }
    (by_name, policies)
}

/// Keeps the environments whose name and hostname no other environment has; the others are
/// invalid, each duplicate reported where it stands.
fn keep_unique(loaded: &mut Loaded, by_name: ByName, files: &[SourceFile]) {
    // Positions are only needed when a duplicate is reported.
    let locate = |origin: &Origin| -> Origin {
        let pos = files
            .iter()
            .find(|f| f.path == origin.file)
            .and_then(|f| std::str::from_utf8(&f.bytes).ok())
            .and_then(|t| {
                PositionIndex::build(t.strip_prefix('\u{feff}').unwrap_or(t))
                    .lookup(origin.document, "")
            });
        Origin {
            pos,
            ..origin.clone()
        }
    };
    // Names and hostnames must be unique across all files.
    let mut hostnames: BTreeMap<String, Origin> = BTreeMap::new();
    for (name, mut defs) in by_name {
        if defs.len() > 1 || loaded.invalid_names.contains(&name) {
            let first = locate(&defs[0].origin);
            for d in defs.iter().skip(1) {
                loaded.diagnostics.push(Diagnostic {
                    file: d.origin.file.clone(),
                    pos: locate(&d.origin).pos,
                    pointer: Some("/metadata/name".into()),
                    message: format!(
                        "environment {name:?} is defined more than once (also at {first})"
                    ),
                });
            }
            if defs.len() > 1 {
                loaded.invalid_names.insert(name);
                continue;
            }
        }
        if loaded.invalid_names.contains(&name) {
            continue;
        }
        let Some(def) = defs.pop() else { continue };
        let host = def.environment.spec.hostname.clone();
        if let Some(other) = hostnames.get(&host) {
            let other = locate(other);
            loaded.diagnostics.push(Diagnostic {
                file: def.origin.file.clone(),
                pos: locate(&def.origin).pos,
                pointer: Some("/spec/hostname".into()),
                message: format!("hostname {host:?} is already used by the environment at {other}"),
            });
            loaded.invalid_names.insert(name);
            continue;
        }
        hostnames.insert(host, def.origin.clone());
        loaded.environments.push(def);
    }
}

/// The source's rollout: none, its one RolloutPolicy, or invalid (more than one is
/// reported at each).
fn rollout_of(loaded: &mut Loaded, mut policies: Policies) -> Rollout {
    match policies.len() {
        0 => Rollout::None,
        1 => match policies.remove(0) {
            (origin, Ok(policy)) => Rollout::Policy { origin, policy },
            (_, Err(e)) => Rollout::Invalid(e),
        },
        _ => {
            let (first, _) = &policies[0];
            for (origin, _) in policies.iter().skip(1) {
                loaded.diagnostics.push(Diagnostic::at(
                    &origin.file,
                    origin.pos,
                    format!("only one RolloutPolicy may exist in a source (another is at {first})"),
                ));
            }
            Rollout::Invalid(format!(
                "{} RolloutPolicy documents (at {}); only one may exist",
                policies.len(),
                policies
                    .iter()
                    .map(|(o, _)| o.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Loaded {
        load(
            &[SourceFile {
                path: "x.yaml".into(),
                bytes: text.as_bytes().to_vec(),
            }],
            &LoadOptions::default(),
        )
    }

    const GOOD: &str = "apiVersion: envctl.materialize.cloud/v1alpha1
kind: Environment
metadata:
  name: acme
spec:
  organization: 8b7c2f0e-4f1e-4b7a-9d0c-2b1e7d7c1a11
  region: aws/us-east-1
  hostname: acme.example.cloud
  environmentd: {image: materialize/environmentd:v0.130.0}
  services:
    compute:
      - {id: cluster-0, image: materialize/clusterd:v0.130.0, scale: 2}
";

    #[test]
    fn a_revision_validates_only_its_changed_files() {
        let file = |path: &str, name: &str, scale: u32| SourceFile {
            path: path.into(),
            bytes: GOOD
                .replace("acme", name)
                .replace("scale: 2", &format!("scale: {scale}"))
                .into_bytes(),
        };
        let options = LoadOptions::default();
        let mut known = Validated::default();
        let first = load_reusing(
            &[file("a.yaml", "a", 2), file("b.yaml", "b", 2)],
            &options,
            &mut known,
        );
        assert_eq!(first.environments.len(), 2);
        // b changes (to an invalid scale), c is new: the outcome is a fresh load's.
        let files = [
            file("a.yaml", "a", 2),
            file("b.yaml", "b", 999),
            file("c.yaml", "c", 3),
        ];
        let again = load_reusing(&files, &options, &mut known);
        let fresh = load(&files, &options);
        let names = |l: &Loaded| {
            l.environments
                .iter()
                .map(|e| format!("{:?}", e.environment))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&again), names(&fresh));
        assert_eq!(again.diagnostics, fresh.diagnostics);
        assert_eq!(again.invalid_names, fresh.invalid_names);
        assert!(again.invalid_names.contains("b"), "{:?}", again.diagnostics);
        // a's environment is the very one of the first revision; b's file is validated anew.
        assert!(Arc::ptr_eq(&first.environments[0], &again.environments[0]));
        // A file that is gone is forgotten.
        let last = load_reusing(&files[..1], &options, &mut known);
        assert_eq!(last.environments.len(), 1);
        assert_eq!(known.0.len(), 1);
    }

    #[test]
    fn accepts_a_good_manifest() {
        let l = one(GOOD);
        assert!(l.is_valid(), "{:?}", l.diagnostics);
        assert_eq!(l.environments.len(), 1);
    }

    #[test]
    fn points_at_the_field() {
        let l = one(&GOOD.replace("scale: 2", "scale: -1"));
        assert_eq!(l.diagnostics.len(), 1, "{:?}", l.diagnostics);
        let d = &l.diagnostics[0];
        assert_eq!(d.pointer.as_deref(), Some("/spec/services/compute/0/scale"));
        assert_eq!(d.pos, Some(Pos { line: 12, col: 63 }));
        assert!(l.invalid_names.contains("acme"));
    }

    #[test]
    fn unknown_field_named() {
        let l = one(&GOOD.replace("  region:", "  regoin: x\n  region:"));
        assert!(
            l.diagnostics
                .iter()
                .any(|d| d.message == "unknown field \"regoin\"")
        );
    }

    /// Inputs never seen before: every truncation and thousands of byte mutations of the first
    /// example are judged without a panic, and every problem names the file.
    #[test]
    fn mutated_examples_never_panic() {
        let original = include_str!("../../examples/environments/acme-prod.yaml").as_bytes();
        let check = |bytes: Vec<u8>| {
            let loaded = load(
                &[SourceFile {
                    path: "m.yaml".into(),
                    bytes,
                }],
                &LoadOptions::default(),
            );
            assert!(loaded.is_valid() || loaded.diagnostics.iter().all(|d| d.file == "m.yaml"));
            loaded.is_valid()
        };
        for end in 0..original.len() {
            check(original[..end].to_vec());
        }
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b" :-{}[]#&*!|>'\"%@`\t\n0aZ\xff,.?";
        let mut rejected = 0;
        for _ in 0..3000 {
            let mut bytes = original.to_vec();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % bytes.len();
                bytes[i] = alphabet[(next() as usize) % alphabet.len()];
            }
            if !check(bytes) {
                rejected += 1;
            }
        }
        assert!(
            rejected > 1000,
            "most mutations should be rejected, {rejected} were"
        );
    }

    #[test]
    fn alias_bomb_is_bounded() {
        let mut s = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
        for i in 1..12 {
            s.push_str(&format!(
                "{}: &{} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n",
                (b'a' + i) as char,
                (b'a' + i) as char,
                p = (b'a' + i - 1) as char
            ));
        }
        let l = one(&s);
        assert_eq!(l.diagnostics.len(), 1);
        assert!(l.unattributed_files.contains("x.yaml"));
    }
}
