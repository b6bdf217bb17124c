//! `envctl schema`: print the manifest's JSON Schema.

use std::io::Write;

use super::output::encode_json;
use super::{CliError, Exit};
use crate::manifest;

pub fn handle() -> Result<Exit, CliError> {
    let text = encode_json("the schema", &manifest::json_schema())?;
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(CliError::Output)?;
    Ok(Exit::Ok)
}
