//! How commands print: diagnostics, summaries, plans (text or JSON) and rendered objects.
//! Writes to the streams it is given; decides no exit code.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};

use clap::ValueEnum;

use super::CliError;
use crate::diagnostic::Diagnostic;
use crate::manifest::{self, Loaded};
use crate::pass::PassPlan;
use crate::render::{self, RenderOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
}

pub(super) fn print_diagnostics(
    out: &mut impl Write,
    diagnostics: &[Diagnostic],
) -> Result<(), CliError> {
    for d in diagnostics {
        writeln!(out, "{d}").map_err(CliError::Output)?;
    }
    Ok(())
}

pub(super) fn summary(loaded: &Loaded) -> String {
    let bad_files: BTreeSet<&str> = loaded.diagnostics.iter().map(|d| d.file.as_str()).collect();
    if loaded.files == 0 {
        return "no manifest files found (*.yaml, *.yml)".to_string();
    }
    // With --region: the valid environments of other regions, read and left out.
    let elsewhere = match loaded.elsewhere.len() {
        0 => String::new(),
        n => format!(" ({n} more of other regions left out)"),
    };
    if loaded.diagnostics.is_empty() {
        return format!(
            "ok: {} environment(s) in {} file(s){elsewhere}",
            loaded.environments.len(),
            loaded.files
        );
    }
    format!(
        "{} error(s) in {} of {} file(s); {} valid environment(s){elsewhere}",
        loaded.diagnostics.len(),
        bad_files.len(),
        loaded.files,
        loaded.environments.len()
    )
}

pub(super) fn encode_json<T: serde::Serialize>(
    what: &'static str,
    v: &T,
) -> Result<String, CliError> {
    serde_json::to_string_pretty(v)
        .map(|mut s| {
            s.push('\n');
            s
        })
        .map_err(|e| CliError::Encode {
            what,
            format: "json",
            message: e.to_string(),
        })
}

/// The plan as `-o json` prints it (documented in the README).
#[derive(serde::Serialize)]
struct PlanDocument<'a> {
    #[serde(flatten)]
    plan: &'a crate::plan::Plan,
    diagnostics: &'a [Diagnostic],
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<&'a crate::apply::Report>,
}

/// Environments of other regions (`--region`) that the plan deletes here, or would with
/// `--prune`: ones whose `spec.region` moved away from this region.
fn moved_away<'a>(pass: &PassPlan, loaded: &'a Loaded) -> Vec<(&'a str, &'a str)> {
    if loaded.elsewhere.is_empty() {
        return Vec::new();
    }
    // One walk of the plan, not one per environment of another region.
    let deleted: BTreeSet<&str> = pass
        .plan
        .changes
        .iter()
        .filter(|c| c.action == crate::plan::Action::Delete)
        .map(|c| c.environment.as_str())
        .collect();
    let orphaned: BTreeSet<&str> = pass.plan.orphaned.iter().map(|k| k.name.as_str()).collect();
    loaded
        .elsewhere
        .iter()
        .filter(|(env, _)| {
            deleted.contains(env.as_str())
                || orphaned.contains(crate::manifest::namespace_for(env).as_str())
        })
        .map(|(e, r)| (e.as_str(), r.as_str()))
        .collect()
}

pub(super) fn print_plan(
    out: &mut impl Write,
    pass: &PassPlan,
    loaded: &Loaded,
    format: PlanFormat,
    applied: Option<&crate::apply::Report>,
) -> Result<(), CliError> {
    match format {
        PlanFormat::Json => {
            let doc = PlanDocument {
                plan: &pass.plan,
                diagnostics: &loaded.diagnostics,
                applied,
            };
            out.write_all(encode_json("the plan", &doc)?.as_bytes())
                .map_err(CliError::Output)
        }
        PlanFormat::Text => {
            let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let mut err = std::io::stderr().lock();
            print_diagnostics(&mut err, &loaded.diagnostics)?;
            out.write_all(crate::plan::render_text(&pass.plan, color).as_bytes())
                .map_err(CliError::Output)?;
            for (env, region) in moved_away(pass, loaded) {
                writeln!(
                    out,
                    "note: environment {env} is now in region {region} (spec.region): that region creates it; here it is deleted only with --prune"
                )
                .map_err(CliError::Output)?;
            }
            if let Some(r) = applied {
                for f in &r.failures {
                    writeln!(
                        err,
                        "failed to {} {}: {}",
                        f.action.as_str(),
                        f.object,
                        f.error
                    )
                    .map_err(CliError::Output)?;
                }
                for (env, failure) in crate::pass::Outcome::failures(pass, r) {
                    writeln!(err, "environment {env} failed: {}", failure.message)
                        .map_err(CliError::Output)?;
                }
                writeln!(
                    out,
                    "applied {}, deleted {}, failed {}",
                    r.applied,
                    r.deleted,
                    r.failures.len()
                )
                .map_err(CliError::Output)?;
            }
            Ok(())
        }
    }
}

/// Renders `envs` and writes their objects as a YAML stream (`---` before each document) or
/// a JSON `v1 List`, in batches encoded in parallel, so memory stays bounded.
pub fn write_rendered(
    out: &mut impl Write,
    envs: &[&manifest::Environment],
    options: &RenderOptions,
    format: Format,
) -> Result<(), CliError> {
    let encode = |env: &manifest::Environment, first: bool| encode(env, options, format, first);
    if format == Format::Json {
        out.write_all(b"{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n")
            .map_err(CliError::Output)?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (batch_no, batch) in envs.chunks(256 * threads).enumerate() {
        let per_thread = batch.len().div_ceil(threads).max(1);
        let parts: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .chunks(per_thread)
                .enumerate()
                .map(|(part_no, part)| {
                    scope.spawn(move || {
                        let mut text = String::new();
                        for (i, env) in part.iter().enumerate() {
                            let first = batch_no == 0 && part_no == 0 && i == 0;
                            text.push_str(&encode(env, first));
                        }
                        text
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok())
                .collect::<Option<Vec<String>>>()
        })
        .ok_or(CliError::Panicked { what: "rendering" })?;
        for p in parts {
            out.write_all(p.as_bytes()).map_err(CliError::Output)?;
        }
    }
    if format == Format::Json {
        out.write_all(b"\n]}\n").map_err(CliError::Output)?;
    }
    Ok(())
}

/// One environment's objects as YAML documents, or as JSON list items (a comma before each
/// but the very first).
fn encode(
    env: &manifest::Environment,
    options: &RenderOptions,
    format: Format,
    first: bool,
) -> String {
    let mut text = String::new();
    for (i, o) in render::render_environment(env, options).iter().enumerate() {
        match format {
            Format::Yaml => {
                text.push_str("---\n");
                crate::yaml::write_yaml(&mut text, &o.object);
            }
            Format::Json => {
                if !(first && i == 0) {
                    text.push_str(",\n");
                }
                text.push_str(&serde_json::to_string_pretty(&o.object).unwrap_or_default());
            }
        }
    }
    text
}
