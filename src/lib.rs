//! envctl: a GitOps controller for Materialize-style cloud environments.
//!
//! The modules follow the pipeline: `source` -> `manifest` -> `render` -> `observe` -> `plan`
//! -> `apply` -> `certs` -> `status`; `cli` and the controller call the same stages.

pub mod apply;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod controller;
pub mod diagnostic;
pub mod duration;
pub mod manifest;
pub mod observe;
pub mod plan;
pub mod render;
pub mod source;
pub mod status;
pub mod yaml;

pub use cli::run;
