//! The async runtime a command's handler runs on.

use super::CliError;

/// A multi-threaded Tokio runtime with I/O and timers.
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}
