//! The long-running controller, `envctl run`: the loop that polls the source and runs the
//! shared pass (`crate::pass`) on every new revision, drift, retry and resync, as named steps
//! (`reconcile`); leader election on a Lease, or sharding over member Leases (`--shard`); the
//! relay of webhooks from standbys; the HTTP listener (health, metrics, webhook, HTTP-01);
//! each environment's health from watches; rollouts in waves (the decision is
//! `crate::rollout`'s); the certificate worker. It never renders, plans or writes objects
//! itself: that is the pass's, through the pipeline's modules.
//!
//! Bottom to top: `claim`, `options`, `leader`, `shard`, `lease_thread`, `relay`, `http`, `health`,
//! `poll`, `cert_worker`, `reconcile`, `run`.

mod cert_worker;
pub mod claim;
pub mod health;
pub mod http;
pub mod leader;
mod lease_thread;
pub mod options;
mod poll;
mod reconcile;
pub mod relay;
pub mod run;
pub mod shard;
