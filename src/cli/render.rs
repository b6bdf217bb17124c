//! `envctl render`: print every environment's desired objects, in apply order.

use std::collections::BTreeSet;
use std::io::Write;

use clap::Args;

use super::args::ManifestArgs;
use super::output::{Format, print_diagnostics, write_rendered};
use super::{CliError, Exit};
use crate::manifest;

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub manifests: ManifestArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
}

pub fn handle(args: &RenderArgs) -> Result<Exit, CliError> {
    let policy = &args.manifests.policy;
    let loaded = policy.load(&args.manifests.paths);
    if !loaded.is_valid() {
        let mut err = std::io::stderr().lock();
        print_diagnostics(&mut err, &loaded.diagnostics)?;
        let files: BTreeSet<&String> = loaded.diagnostics.iter().map(|d| &d.file).collect();
        return Err(CliError::Invalid { count: files.len() });
    }
    let envs: Vec<&manifest::Environment> =
        loaded.environments.iter().map(|e| &e.environment).collect();
    let mut buffered = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    write_rendered(&mut buffered, &envs, &policy.render_options(), args.output)?;
    buffered.flush().map_err(CliError::Output)?;
    Ok(Exit::Ok)
}
