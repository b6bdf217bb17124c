//! The poller: asks the source whether it moved (ls-remote, no fetch), fetches and reads
//! only then, bounded in time; and, with `--watch` on a directory, wakes the loop on file
//! changes (debounced).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::options::RunSource;
use crate::diagnostic::Diagnostic;
use crate::manifest::SourceFile;
use crate::metrics::{Metrics, PollLabels, PollResult};
use crate::source::git::{GitBackend, GitError};
use crate::vocab::error_chain;

/// Longest a poll (ls-remote, fetch and read) may take before the loop goes on without it.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(90);

/// One revision of the source, as read.
#[derive(Clone)]
pub struct Revision {
    pub id: String,
    pub files: Vec<SourceFile>,
    pub problems: Vec<Diagnostic>,
    /// Paths that changed since the previous revision, when known.
    pub changed: Option<BTreeSet<String>>,
}

pub type SharedGit = Arc<Mutex<Box<dyn GitBackend>>>;

/// The source as the loop polls it.
pub enum PollSource {
    Git(SharedGit),
    Directory(PathBuf),
}

impl PollSource {
    pub fn new(source: RunSource) -> PollSource {
        match source {
            RunSource::Git(g) => PollSource::Git(Arc::new(Mutex::new(g))),
            RunSource::Directory(d) => PollSource::Directory(d),
        }
    }

    /// The Git source, to read earlier revisions from (a directory keeps none).
    pub fn git(&self) -> Option<SharedGit> {
        match self {
            PollSource::Git(g) => Some(g.clone()),
            PollSource::Directory(_) => None,
        }
    }

    /// Polls once: the new revision if the source moved (also kept as `current`), counted
    /// in the poll metric; a failed poll is logged and keeps the last revision.
    pub async fn poll_into(
        &self,
        current: &mut Option<Revision>,
        max: u64,
        metrics: &Metrics,
    ) -> bool {
        let (result, moved) = match self.poll(current.as_ref(), max).await {
            Ok(Some(rev)) => {
                tracing::info!(revision = %rev.id, "new revision");
                *current = Some(rev);
                (PollResult::Fetched, true)
            }
            Ok(None) => (PollResult::Unchanged, false),
            Err(e) => {
                tracing::warn!(error = %e, "polling the source failed; keeping the last revision");
                (PollResult::Error, false)
            }
        };
        metrics.polls.get_or_create(&PollLabels { result }).inc();
        moved
    }

    /// Asks the source whether it moved; fetches and reads only then.
    async fn poll(&self, current: Option<&Revision>, max: u64) -> Result<Option<Revision>, String> {
        match self {
            PollSource::Git(git) => poll_git(git.clone(), current.map(|r| r.id.clone()), max).await,
            PollSource::Directory(root) => {
                let root = root.clone();
                let (files, problems) =
                    tokio::task::spawn_blocking(move || crate::source::read_paths(&[root], max))
                        .await
                        .map_err(|e| format!("reading the directory failed: {e}"))?;
                let id = crate::source::directory_revision(&files, &problems);
                if current.is_some_and(|c| c.id == id) {
                    return Ok(None);
                }
                Ok(Some(Revision {
                    id,
                    files,
                    problems,
                    changed: None,
                }))
            }
        }
    }
}

/// ls-remote; fetch and read only when the head is not `known`; at most `POLL_TIMEOUT`.
async fn poll_git(
    git: SharedGit,
    known: Option<String>,
    max: u64,
) -> Result<Option<Revision>, String> {
    let task = tokio::task::spawn_blocking(move || -> Result<Option<Revision>, String> {
        // A poll that outlived its timeout may still hold the source: skip this one.
        let mut g = match git.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err("the previous poll is still running".into());
            }
        };
        let result = (|| -> Result<Option<Revision>, GitError> {
            let head = g.remote_head()?;
            if known.as_deref() == Some(head.as_str()) {
                return Ok(None);
            }
            let id = g.fetch()?;
            let (files, problems) = g.read(&id, max)?;
            let changed = known.as_deref().and_then(|k| g.changed(k, &id));
            Ok(Some(Revision {
                id,
                files,
                problems,
                changed,
            }))
        })();
        result.map_err(|e| error_chain(&e))
    });
    match tokio::time::timeout(POLL_TIMEOUT, task).await {
        Ok(joined) => joined.map_err(|e| format!("the Git task failed: {e}"))?,
        Err(_) => Err(format!("the poll took longer than {POLL_TIMEOUT:?}")),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("watching {path} for changes")]
pub struct WatchError {
    path: String,
    #[source]
    source: notify::Error,
}

/// Keeps the file watch of a directory source alive while held.
pub type DirectoryWatch = notify_debouncer_full::Debouncer<
    notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// `--watch`: file changes under a directory source wake `wake` (debounced); `None` for a
/// Git source or without `--watch`.
pub fn watch_directory(
    source: &PollSource,
    watch: bool,
    wake: Arc<Notify>,
) -> Result<Option<DirectoryWatch>, WatchError> {
    let PollSource::Directory(root) = source else {
        return Ok(None);
    };
    if !watch {
        return Ok(None);
    }
    let failed = |source| WatchError {
        path: root.display().to_string(),
        source,
    };
    let mut debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(300),
        None,
        move |result: notify_debouncer_full::DebounceEventResult| {
            if result.is_ok_and(|events| !events.is_empty()) {
                wake.notify_one();
            }
        },
    )
    .map_err(failed)?;
    debouncer
        .watch(root, notify::RecursiveMode::Recursive)
        .map_err(failed)?;
    Ok(Some(debouncer))
}
