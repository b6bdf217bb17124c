//! Golden tests: every folder of `tests/golden/` with an `in/` folder or a `source` file holds an
//! input (`in/`, or a `source` file
//! naming a folder of the repository), optional extra arguments (`args`, one per line), and
//! the expected transcripts `validate.out` and `render.out`.

use std::path::Path;

use crate::support::{check_golden, repo_root, run_envctl};

fn case_args(case: &Path) -> (std::path::PathBuf, String, Vec<String>) {
    let extra: Vec<String> = std::fs::read_to_string(case.join("args"))
        .map(|s| {
            s.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    match std::fs::read_to_string(case.join("source")) {
        Ok(src) => (repo_root(), src.trim().to_string(), extra),
        Err(_) => (case.to_path_buf(), "in".to_string(), extra),
    }
}

#[test]
fn golden_cases() {
    let dir = repo_root().join("tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("listing tests/golden")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("in").is_dir() || p.join("source").is_file())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 30,
        "expected the golden corpus, found {} cases",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let (cwd, input, extra) = case_args(case);
        for command in ["validate", "render"] {
            let mut args = vec![command.to_string(), input.clone()];
            args.extend(extra.iter().cloned());
            let actual = run_envctl(&cwd, &args);
            let name = case.file_name().and_then(|n| n.to_str()).unwrap_or("?");
            // Bad inputs must be rejected with exit 2; good ones accepted with exit 0.
            let want_exit = if name.starts_with("bad-") {
                "exit: 2\n"
            } else {
                "exit: 0\n"
            };
            if !actual.starts_with(want_exit) {
                failures.push(format!(
                    "{name} {command}: expected {want_exit:?}, got:\n{actual}"
                ));
            }
            if actual.contains("panicked") {
                failures.push(format!("{name} {command}: panicked:\n{actual}"));
            }
            if let Err(e) = check_golden(&case.join(format!("{command}.out")), &actual) {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn committed_schema_is_generated_from_the_types() {
    let path = repo_root().join("schemas/environment.schema.json");
    let mut actual =
        serde_json::to_string_pretty(&envctl::manifest::json_schema()).expect("schema to JSON");
    actual.push('\n');
    if let Err(e) = check_golden(&path, &actual) {
        panic!("{e}\nrefresh with: ENVCTL_BLESS=1 cargo test --test integration");
    }
}

/// `diff --live none` plans against an empty cluster: no cluster needed, everything is a create.
#[test]
fn diff_without_a_cluster() {
    let out = run_envctl(
        &repo_root(),
        &[
            "diff".into(),
            "--live".into(),
            "none".into(),
            "--source".into(),
            "examples/environments".into(),
        ],
    );
    assert!(out.starts_with("exit: 1\n"), "{out}");
    assert!(
        out.contains("52 to create, 0 to update, 0 to delete, 0 unchanged"),
        "{out}"
    );
    assert!(
        out.contains("+++ desired/StatefulSet environment-acme-prod/compute-cluster-0"),
        "{out}"
    );
}

/// The committed CLI reference is what the argument definitions generate (refresh with
/// `ENVCTL_BLESS=1 cargo test --test integration golden::cli_reference_is_current`).
#[test]
fn cli_reference_is_current() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envctl"))
        .arg("cli-reference")
        .output()
        .expect("running envctl cli-reference");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8 Markdown");
    assert!(text.contains("## `envctl run`") && text.contains("`--leader-elect`"));
    if let Err(diff) = check_golden(&repo_root().join("docs/cli.md"), &text) {
        panic!(
            "docs/cli.md is stale; regenerate it with `envctl cli-reference > docs/cli.md`\n{diff}"
        );
    }
}

/// Every command that `docs/benchmarks.md` gives for its figures exists: each `scripts/...`
/// it runs is an executable file of the repository, each `envctl SUBCOMMAND` a subcommand,
/// and every script's usage line is documented.
#[test]
fn benchmark_commands_exist() {
    let root = repo_root();
    let doc = std::fs::read_to_string(root.join("docs/benchmarks.md"))
        .expect("docs/benchmarks.md exists");
    let spans: Vec<&str> = doc.split('`').skip(1).step_by(2).collect();
    let help = run_envctl(&root, &["--help".to_string()]);
    let mut scripts = std::collections::BTreeSet::new();
    for span in &spans {
        for (i, word) in span.split_whitespace().enumerate() {
            if let Some(script) = word.strip_prefix("scripts/") {
                let path = root.join("scripts").join(script);
                let meta = std::fs::metadata(&path)
                    .unwrap_or_else(|e| panic!("`{span}`: {} does not exist: {e}", path.display()));
                use std::os::unix::fs::PermissionsExt;
                assert!(
                    meta.permissions().mode() & 0o111 != 0,
                    "`{span}`: {script} is not executable"
                );
                scripts.insert(script.to_string());
            }
            if word == "envctl"
                && i == 0
                && let Some(sub) = span
                    .split_whitespace()
                    .nth(1)
                    .filter(|s| !s.starts_with('-'))
            {
                assert!(
                    help.lines()
                        .any(|l| l.trim_start().starts_with(&format!("{sub} "))),
                    "`{span}`: envctl has no subcommand {sub}"
                );
            }
        }
    }
    for needed in ["bench-run", "bench-diff", "bench-render"] {
        assert!(
            scripts.contains(needed),
            "docs/benchmarks.md gives no command for scripts/{needed}"
        );
    }
}
