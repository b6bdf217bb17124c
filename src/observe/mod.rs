//! Observe: reads what is live, never changes it. Bottom to top:
//!
//! - `live`: `Live` (the objects envctl owns, labels `app.kubernetes.io/managed-by=envctl`
//!   and its instance, as the plan reads them), the kinds observed, `ObserveError`;
//! - `watched`: one watch-fed map, which the cache and the health watches are built on;
//! - `read`: one-shot reads (LISTs of owned objects, namespace labels, health inputs);
//! - `dry_run`: what a server-side apply would make of a desired object (`dryRun=All`,
//!   which persists nothing), and the fields envctl's manager owns;
//! - `cache`: the controller's watch cache of every owned object, and the snapshot of it a
//!   pass plans against;
//! - `health_watch`: the controller's watches of what health is judged from (projections of
//!   StatefulSets, pods and namespaces).

mod cache;
mod dry_run;
mod health_watch;
mod live;
mod read;
mod watched;

pub use cache::{Cache, NamespaceDigests, Snapshot};
pub use dry_run::{DryRunFailure, dry_run, prune_to_fields};
pub use health_watch::HealthWatch;
pub use live::{Live, LiveObject, OBSERVED_KINDS, ObserveError};
pub use read::{
    NamespaceLookup, group_for_health, list_owned, namespace_labels, read_health_inputs,
};
