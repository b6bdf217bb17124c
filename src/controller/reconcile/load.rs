//! Step 1, load and history: a revision's manifests, validated (a new revision validates
//! only the files that changed), and the last revisions read, which a rollout renders held
//! environments from (read again from Git once no longer in memory).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use super::super::poll::{POLL_TIMEOUT, Revision, SharedGit};
use crate::manifest::{self, LoadOptions, Loaded, Validated};
use crate::vocab::error_chain;

/// How many source revisions `History` keeps.
const KEPT: usize = 8;

/// The revisions read and their validated manifests.
pub struct History {
    /// The validated manifests of the last revision read (drift and resync passes reuse
    /// them).
    current: Option<(String, Arc<Loaded>)>,
    /// The last revisions read, newest last.
    kept: VecDeque<(String, Arc<Loaded>)>,
    /// Earlier revisions that could not be read (not asked again).
    unreadable: BTreeSet<String>,
    /// What validation made of each file of the last revision.
    validated: Validated,
    /// The Git source, to read earlier revisions (a directory source keeps none).
    git: Option<SharedGit>,
    load: LoadOptions,
    max_file_size: u64,
}

impl History {
    pub fn new(git: Option<SharedGit>, load: LoadOptions, max_file_size: u64) -> History {
        History {
            current: None,
            kept: VecDeque::new(),
            unreadable: BTreeSet::new(),
            validated: Validated::default(),
            git,
            load,
            max_file_size,
        }
    }

    /// The manifests of `revision`: validated once per revision, logged with their
    /// problems, and kept.
    pub fn load(&mut self, revision: &Revision) -> Arc<Loaded> {
        if let Some((id, loaded)) = &self.current
            && *id == revision.id
        {
            return loaded.clone();
        }
        let loaded = Arc::new(manifest::load_with_unread(
            &revision.files,
            &revision.problems,
            &self.load,
            &mut self.validated,
        ));
        for d in &loaded.diagnostics {
            tracing::warn!(revision = %revision.id, "{d}");
        }
        self.current = Some((revision.id.clone(), loaded.clone()));
        if !self.kept.iter().any(|(id, _)| *id == revision.id) {
            self.keep(&revision.id, loaded.clone());
        }
        loaded
    }

    fn keep(&mut self, id: &str, loaded: Arc<Loaded>) {
        self.kept.push_back((id.to_string(), loaded));
        if self.kept.len() > KEPT {
            self.kept.pop_front();
        }
    }

    /// The validated manifests of an earlier revision: from memory, else read from Git
    /// (which keeps every fetched commit). `None` when it cannot be read.
    pub async fn at(&mut self, id: &str) -> Option<Arc<Loaded>> {
        if let Some((_, l)) = self.kept.iter().find(|(r, _)| r == id) {
            return Some(l.clone());
        }
        if self.unreadable.contains(id) {
            return None;
        }
        let git = self.git.clone()?;
        let (commit, max, load) = (id.to_string(), self.max_file_size, self.load.clone());
        let read = tokio::task::spawn_blocking(move || {
            let g = git.lock().unwrap_or_else(|e| e.into_inner());
            g.read(&commit, max)
                .map(|(files, problems)| {
                    manifest::load_with_unread(&files, &problems, &load, &mut Validated::default())
                })
                .map_err(|e| error_chain(&e))
        });
        match tokio::time::timeout(POLL_TIMEOUT, read).await {
            Ok(Ok(Ok(loaded))) => {
                let loaded = Arc::new(loaded);
                self.keep(id, loaded.clone());
                Some(loaded)
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(revision = id, error = %e, "cannot read an earlier revision; environments held on it are left as they are");
                self.unreadable.insert(id.to_string());
                None
            }
            _ => {
                tracing::warn!(
                    revision = id,
                    "reading an earlier revision failed or timed out"
                );
                None
            }
        }
    }
}
