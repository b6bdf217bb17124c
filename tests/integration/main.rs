//! The one integration-test binary: golden files (no cluster) and cluster tests (a real
//! kube-apiserver started by `scripts/control-plane`, or `ENVCTL_TEST_KUBECONFIG`).
//!
//! Refresh every golden file with `ENVCTL_BLESS=1 cargo test --test integration`.

mod acme;
mod certs;
mod chart;
mod cluster;
mod compat;
mod diff;
mod faults;
mod fencing;
mod fleet;
mod gitops;
mod golden;
mod health;
mod layers;
mod properties;
mod safety;
mod shard;
mod support;
mod walls;
