//! The `envctl` binary: parses arguments, calls `envctl::run`, prints the error chain.

#![warn(clippy::too_many_lines)]

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Option numbers of the mimalloc 3.x that libmimalloc-sys builds (it names only a few;
/// a test checks these against their defaults).
const MI_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed pages stay committed before they go back to the system. A full pass
/// frees and allocates a few hundred MiB part after part; giving pages back at once (0)
/// made each part fault them in again (a third of rendering time at 10,000 environments),
/// while an idle controller's memory is back within this long either way.
const PURGE_DELAY_MS: std::ffi::c_long = 500;

/// A controller holds a large, long-lived cache beside short-lived pass data: commit arena
/// memory only as it is used, and give freed pages back soon (`PURGE_DELAY_MS`).
fn tune_allocator() {
    // SAFETY: plain setters of mimalloc's global options, valid at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_PURGE_DELAY, PURGE_DELAY_MS);
    }
}

fn main() -> ExitCode {
    tune_allocator();
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
            let code = err.exit_code();
            if code == envctl::cli::Exit::Cluster
                && let Some(hint) = envctl::cluster::unreachable_hint()
            {
                eprintln!("  hint: {hint}");
            }
            code.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_option_numbers_are_the_bundled_mimallocs() {
        // mimalloc 3.x defaults: arena_eager_commit 2, purge_delay 1000 ms.
        // SAFETY: plain getters.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(MI_PURGE_DELAY),
            )
        };
        assert_eq!((eager, delay), (2, 1000));
    }
}
