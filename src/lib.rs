//! envctl: a GitOps controller for Materialize-style cloud environments.
//!
//! Layers, bottom to top; a module uses only the ones below it (checked by the integration
//! test `layers::no_import_runs_back_up`; inside each folder, `layers::no_cycle_inside_a_folder`
//! holds the files to an order too):
//!
//! - `vocab`: names and small shared types (labels, annotations, object keys, limit names);
//!   `duration`, `diagnostic`, `yaml`: formats; `cluster`: the API client and its retries;
//!   `health`: how an environment's StatefulSets and pods are judged (pure); `metrics`:
//!   every exported metric; `shard`: which replica writes which environment (pure).
//! - The pipeline: `source` -> `manifest` -> `render` (and `rollout`: which environments a
//!   revision reaches now, pure) -> `observe` -> `plan` -> `apply`, then
//!   `status` (what is recorded about each environment) and `certs` (certificates).
//! - `pass`: one reconcile pass over those stages, shared by the CLI and the controller;
//!   `controller`: the long-running loop (`envctl run`); `cli`: the commands.

// No function over `too-many-lines-threshold` (clippy.toml) lines: a longer one wants named
// steps. An exception carries an `#[allow]` with its reason.
#![warn(clippy::too_many_lines)]

pub mod apply;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod controller;
pub mod diagnostic;
pub mod duration;
pub mod health;
pub mod manifest;
pub mod metrics;
pub mod observe;
pub mod pass;
pub mod plan;
pub mod render;
pub mod rollout;
pub mod shard;
pub mod source;
pub mod status;
pub mod vocab;
pub mod yaml;

pub use cli::run;
