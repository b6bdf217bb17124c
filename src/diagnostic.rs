//! One problem with one input file, printed as `FILE:LINE:COL: error: MESSAGE (at POINTER)`.
//!
//! Shared by `source` (files it cannot read) and `manifest` (files it cannot accept); it only
//! describes, it never decides.

use std::fmt;

/// A 1-based line and column in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Diagnostic {
    /// The file as the user named it (relative to the given path, or the Git tree's root).
    pub file: String,
    /// Where in the file, when known.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub pos: Option<Pos>,
    /// JSON pointer of the offending field, when the problem is about one field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.into(),
            pos: None,
            pointer: None,
            message: message.into(),
        }
    }

    pub fn at(file: impl Into<String>, pos: Option<Pos>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.into(),
            pos,
            pointer: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(Pos { line, col }) => {
                write!(f, "{}:{line}:{col}: error: {}", self.file, self.message)?
            }
            None => write!(f, "{}: error: {}", self.file, self.message)?,
        }
        if let Some(p) = &self.pointer {
            write!(f, " (at {})", if p.is_empty() { "/" } else { p })?;
        }
        Ok(())
    }
}
