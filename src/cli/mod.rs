//! The command line: one file per command, each holding that command's arguments and its
//! handler; argument groups that several commands share live in `args` and `cert_args`,
//! printing in `output`, errors and exit codes in `error`. Holds no reconcile logic: the
//! handlers call the pipeline's stages and `pass`, the same ones the controller calls.

mod apply;
mod args;
mod cert_args;
mod diff;
mod error;
mod output;
mod progress;
mod quota;
mod reference;
mod render;
mod run;
mod schema;
mod status;
mod validate;

use clap::{Parser, Subcommand};

pub use error::{CliError, Exit};
pub use output::write_rendered;

#[derive(Debug, Parser)]
#[command(
    name = "envctl",
    version,
    about = "GitOps controller for Materialize-style cloud environments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check manifests and report every problem as FILE:LINE:COL: error: MESSAGE.
    Validate(validate::ValidateArgs),
    /// Print the desired Kubernetes objects of every environment, in apply order.
    Render(render::RenderArgs),
    /// Show what `apply` would change: a unified diff per object and a summary.
    /// Exit 0: nothing to change; 1: changes; 2: invalid input; 3: cluster unreachable.
    Diff(Box<diff::DiffArgs>),
    /// One reconcile pass: server-side apply what changed, delete what is gone (with --prune),
    /// then bring every TLS environment's certificate up to date (unless --skip-certificates).
    Apply(Box<apply::ApplyArgs>),
    /// The GitOps controller: poll the source, reconcile every new revision, revert drift.
    Run(Box<run::RunArgs>),
    /// Print every environment with its applied revision, state and last error.
    Status(status::StatusArgs),
    /// Print the certificate quota ledger: every bucket with used and remaining tokens and
    /// when the next token frees up, per ACME account, registered domain, name set and name.
    Quota(quota::QuotaArgs),
    /// Print the manifest's JSON Schema (the committed schemas/environment.schema.json).
    Schema,
    /// Print this command-line reference as Markdown (the committed docs/cli.md).
    #[command(hide = true)]
    CliReference,
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<Exit, CliError> {
    match cli.command {
        Command::Validate(args) => validate::handle(&args),
        Command::Render(args) => render::handle(&args),
        Command::Diff(args) => diff::handle(&args),
        Command::Apply(args) => apply::handle(&args),
        Command::Run(args) => run::handle(*args),
        Command::Status(args) => status::handle(&args),
        Command::Quota(args) => quota::handle(&args),
        Command::Schema => schema::handle(),
        Command::CliReference => reference::handle(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}
