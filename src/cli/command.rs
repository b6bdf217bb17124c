//! The command set: `envctl`'s subcommands and the arguments of each (defined beside its
//! handler). Parses; runs nothing.

use clap::{Parser, Subcommand};

use super::{apply, diff, quota, render, run, status, validate};

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
