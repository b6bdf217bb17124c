//! `envctl validate`: check manifests, print every problem with its position.

use std::io::Write;

use clap::Args;

use super::args::ManifestArgs;
use super::output::{print_diagnostics, summary};
use super::{CliError, Exit};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub manifests: ManifestArgs,
}

pub fn handle(args: &ValidateArgs) -> Result<Exit, CliError> {
    let loaded = args.manifests.policy.load(&args.manifests.paths);
    let mut out = std::io::stdout().lock();
    print_diagnostics(&mut out, &loaded.diagnostics)?;
    writeln!(out, "{}", summary(&loaded)).map_err(CliError::Output)?;
    Ok(if loaded.is_valid() && loaded.files > 0 {
        Exit::Ok
    } else {
        Exit::Invalid
    })
}
