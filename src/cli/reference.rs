//! `envctl cli-reference` (hidden): the CLI reference as Markdown, generated from the same
//! clap definitions that parse the arguments, so it cannot drift from them. The committed
//! copy is `docs/cli.md`; a test fails when the two differ.

use std::fmt::Write as _;
use std::io::Write;

use clap::{Arg, Command, CommandFactory};

use super::{Cli, CliError, Exit};

pub fn handle() -> Result<Exit, CliError> {
    std::io::stdout()
        .lock()
        .write_all(markdown().as_bytes())
        .map_err(CliError::Output)?;
    Ok(Exit::Ok)
}

/// The whole reference.
pub fn markdown() -> String {
    let mut cli = Cli::command();
    cli.build();
    let mut out = String::from(
        "# envctl command-line reference\n\n\
         Generated from the argument definitions by `envctl cli-reference > docs/cli.md`; a \
         test fails when this file and the definitions differ. Every flag with an environment \
         variable can be set from it instead.\n",
    );
    for sub in cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        command(&mut out, sub);
    }
    out
}

fn command(out: &mut String, cmd: &Command) {
    let name = cmd.get_name();
    let about = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.trim_start_matches("Usage: ");
    let _ = write!(
        out,
        "\n## `envctl {name}`\n\n{about}\n\n```\n{usage}\n```\n"
    );
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !["help", "version"].contains(&a.get_id().as_str()))
        .collect();
    if args.is_empty() {
        return;
    }
    out.push_str("\n| argument | environment | default | description |\n|---|---|---|---|\n");
    for a in args {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            flag(a),
            a.get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_default(),
            default(a),
            cell(&description(a)),
        );
    }
}

fn flag(a: &Arg) -> String {
    let value = a
        .get_value_names()
        .map(|v| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
    if a.is_positional() {
        return format!("`[{value}...]`");
    }
    let takes_value = a.get_action().takes_values();
    let long = a.get_long().map(|l| format!("--{l}"));
    let short = a.get_short().map(|s| format!("-{s}"));
    let names: Vec<String> = short.into_iter().chain(long).collect();
    if takes_value {
        format!("`{} {value}`", names.join(", "))
    } else {
        format!("`{}`", names.join(", "))
    }
}

fn default(a: &Arg) -> String {
    let values: Vec<String> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().to_string())
        .filter(|v| v != "false")
        .collect();
    if values.is_empty() {
        String::new()
    } else {
        format!("`{}`", values.join(","))
    }
}

fn description(a: &Arg) -> String {
    let mut text = a
        .get_long_help()
        .or(a.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    let possible: Vec<String> = a
        .get_possible_values()
        .iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| format!("`{}`", p.get_name()))
        .collect();
    if !possible.is_empty() && a.get_action().takes_values() {
        if !text.is_empty() && !text.ends_with('.') {
            text.push('.');
        }
        let _ = write!(text, " One of {}.", possible.join(", "));
    }
    text
}

/// One table cell: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}
