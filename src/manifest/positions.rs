//! Maps JSON pointers (`/spec/services/compute/0/scale`) to their line and column in a YAML
//! document, so that schema and semantic errors can name the exact place in the file.
//!
//! Runs only on text that serde-saphyr already parsed within its budget; it never expands
//! aliases (a pointer into an alias's expansion resolves to the alias itself).

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

pub use crate::diagnostic::Pos;

/// Positions of every node of every document in one file.
#[derive(Debug, Default)]
pub struct PositionIndex {
    documents: Vec<HashMap<String, Pos>>,
}

enum Frame {
    Map {
        pointer: String,
        key: Option<String>,
    },
    Seq {
        pointer: String,
        next: usize,
    },
    /// A complex (non-scalar) mapping key: nothing inside it is addressable.
    Skip,
}

/// Escapes one JSON pointer segment (RFC 6901).
pub fn escape_segment(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

impl PositionIndex {
    /// Indexes every document of `text`; on a parse error it keeps what it saw so far.
    pub fn build(text: &str) -> PositionIndex {
        let mut documents = Vec::new();
        let mut current: HashMap<String, Pos> = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let pos = Pos {
                line: span.start.line(),
                col: span.start.col() + 1,
            };
            let is_node = matches!(
                event,
                Event::Scalar(..)
                    | Event::SequenceStart(..)
                    | Event::MappingStart(..)
                    | Event::Alias(..)
            );
            if is_node {
                let mut this: Option<String> = None;
                let mut is_key = false;
                match stack.last_mut() {
                    None => {
                        this = Some(String::new());
                    }
                    Some(Frame::Skip) => {}
                    Some(Frame::Seq { pointer, next }) => {
                        this = Some(format!("{pointer}/{next}"));
                        *next += 1;
                    }
                    Some(Frame::Map { pointer, key }) => match key.take() {
                        None => {
                            is_key = true;
                            if let Event::Scalar(value, ..) = &event {
                                let p = format!("{pointer}/{}", escape_segment(value));
                                current.entry(p.clone()).or_insert(pos);
                                *key = Some(p);
                            } else {
                                *key = Some(String::from("\u{0}complex"));
                            }
                        }
                        Some(p) => {
                            if !p.starts_with('\u{0}') {
                                this = Some(p);
                            }
                        }
                    },
                }
                if let Some(p) = &this {
                    current.entry(p.clone()).or_insert(pos);
                }
                match event {
                    Event::SequenceStart(..) => stack.push(match (&this, is_key) {
                        (Some(p), false) => Frame::Seq {
                            pointer: p.clone(),
                            next: 0,
                        },
                        _ => Frame::Skip,
                    }),
                    Event::MappingStart(..) => stack.push(match (&this, is_key) {
                        (Some(p), false) => Frame::Map {
                            pointer: p.clone(),
                            key: None,
                        },
                        _ => Frame::Skip,
                    }),
                    _ => {}
                }
            } else {
                match event {
                    Event::SequenceEnd | Event::MappingEnd => {
                        stack.pop();
                    }
                    Event::DocumentEnd => {
                        documents.push(std::mem::take(&mut current));
                        stack.clear();
                    }
                    _ => {}
                }
            }
        }
        if !current.is_empty() {
            documents.push(current);
        }
        PositionIndex { documents }
    }

    /// The position of `pointer` in document `doc`, or of its nearest indexed ancestor.
    pub fn lookup(&self, doc: usize, pointer: &str) -> Option<Pos> {
        let map = self.documents.get(doc)?;
        let mut p = pointer;
        loop {
            if let Some(pos) = map.get(p) {
                return Some(*pos);
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_and_items() {
        let text = "a: 1\nb:\n  - x\n  - {c: 2}\n---\nd: [1, 2]\n";
        let idx = PositionIndex::build(text);
        assert_eq!(idx.lookup(0, "/a"), Some(Pos { line: 1, col: 1 }));
        assert_eq!(idx.lookup(0, "/b/1"), Some(Pos { line: 4, col: 5 }));
        assert_eq!(idx.lookup(0, "/b/1/c"), Some(Pos { line: 4, col: 6 }));
        assert_eq!(idx.lookup(0, "/b/1/zzz"), Some(Pos { line: 4, col: 5 }));
        assert_eq!(idx.lookup(1, "/d/1"), Some(Pos { line: 6, col: 8 }));
    }

    #[test]
    fn escapes_segments() {
        let idx = PositionIndex::build("labels:\n  team/x: y\n");
        assert_eq!(
            idx.lookup(0, "/labels/team~1x"),
            Some(Pos { line: 2, col: 3 })
        );
    }
}
