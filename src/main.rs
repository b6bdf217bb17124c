//! The `envctl` binary: parses arguments, calls `envctl::run`, prints the error chain.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = envctl::cli::Cli::parse();
    match envctl::run(cli) {
        Ok(code) => code.into(),
        Err(err) => {
            eprintln!("error: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            err.exit_code().into()
        }
    }
}
