//! The command line: one file per command, each holding that command's arguments and its
//! handler; the command set itself in `command`; argument groups that several commands share
//! live in `args` and `cert_args`, printing in `output`, errors and exit codes in `error`,
//! the async runtime in `rt`. This file only dispatches. Holds no reconcile logic: the
//! handlers call the pipeline's stages and `pass`, the same ones the controller calls.

mod apply;
mod args;
mod cert_args;
mod command;
mod diff;
mod error;
mod output;
mod progress;
mod quota;
mod reference;
mod render;
mod rt;
mod run;
mod schema;
mod status;
mod validate;

pub use command::{Cli, Command};
pub use error::{CliError, Exit};
pub use output::write_rendered;
use rt::runtime;

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
