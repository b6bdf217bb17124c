//! The parts of the loop that every step may read: where it writes and what it sees
//! (`Cluster`), and with `--shard`, which environments are this replica's (`Shard`).

use tokio::sync::watch;

use kube::Client;

use super::super::shard::SharedMembership;
use crate::manifest::Loaded;
use crate::metrics::Metrics;
use crate::observe::Cache;
use crate::shard::Writable;
use crate::status::Events;

/// Where the loop writes (the fenced client) and what it reads (the watch cache).
pub struct Cluster {
    pub client: Client,
    pub cache: Cache,
    pub events: Events,
    /// This envctl instance (`--instance`).
    pub instance: String,
    /// The controller's namespace, where the rollout's status is recorded.
    pub namespace: String,
}

/// With `--shard`: the member sets seen, which decide what this replica writes, and a count
/// of their changes (a pass stops writing on one).
pub struct Shard {
    pub membership: SharedMembership,
    pub generation: watch::Receiver<u64>,
}

impl Shard {
    /// What this replica may write in this pass (and the shard metrics).
    pub fn writable(&self, loaded: &Loaded, metrics: &Metrics) -> Writable {
        let m = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let owned = loaded
            .environments
            .iter()
            .filter(|e| m.owns(&e.environment.metadata.name))
            .count();
        metrics
            .shard_environments
            .set(i64::try_from(owned).unwrap_or(i64::MAX));
        metrics.shard_members.set(
            m.members()
                .map_or(0, |s| i64::try_from(s.len()).unwrap_or(i64::MAX)),
        );
        m.writable(tokio::time::Instant::now())
    }

    /// Whether this replica may write `name` now.
    pub fn may_write(&self, name: &str) -> bool {
        self.membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writable(tokio::time::Instant::now())
            .may_write(name)
    }
}
