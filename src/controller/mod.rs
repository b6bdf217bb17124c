//! The long-running controller, `envctl run`: the loop that polls the source and runs the
//! shared pass (`crate::pass`) on every new revision, drift, retry and resync; leader
//! election on a Lease, or sharding over member Leases (`--shard`); the relay of webhooks from standbys; the HTTP listener (health,
//! metrics, webhook, HTTP-01); each environment's health from watches, and rollouts in
//! waves (the decision is `crate::rollout`'s). It never renders, plans or writes objects itself: that is
//! the pass's, through the pipeline's modules.

pub mod health;
pub mod http;
pub mod leader;
pub mod relay;
mod rollout;
pub mod run;
pub mod shard;
