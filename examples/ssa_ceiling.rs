//! The API server's ceiling for server-side apply, for the benchmarks (`scripts/bench-scale`,
//! `scripts/bench-diff`): a bare client that applies the objects `envctl render -o json`
//! printed, `--concurrency` requests at a time, over envctl's own HTTP stack. Namespaces go
//! first (the rest live in them); nothing is read, planned or dry-run. Prints one JSON line:
//! `{"objects": N, "seconds": S, "failed": F}`.
//!
//! Usage: ssa_ceiling --kubeconfig FILE --objects RENDERED.json [--concurrency 32]

use std::path::PathBuf;
use std::time::Instant;

use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use envctl::cluster::{api_resource, connect_as, with_retries};
use envctl::vocab::ObjectKind;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let kubeconfig = arg(&args, "--kubeconfig").map(PathBuf::from);
    let objects = arg(&args, "--objects").ok_or("--objects RENDERED.json is required")?;
    let concurrency: usize = arg(&args, "--concurrency")
        .map(|c| c.parse())
        .transpose()?
        .unwrap_or(32);
    let list: Value = serde_json::from_slice(&std::fs::read(&objects)?)?;
    let items = list["items"]
        .as_array()
        .ok_or("no items in the rendered list")?;
    let client = connect_as(kubeconfig.as_deref(), Some("ssa-ceiling")).await?;
    let params = PatchParams::apply("ssa-ceiling").force();
    let kind_of = |v: &Value| {
        ObjectKind::ALL
            .into_iter()
            .find(|k| v["kind"].as_str() == Some(k.as_str()))
    };
    let (namespaces, rest): (Vec<&Value>, Vec<&Value>) = items
        .iter()
        .partition(|v| kind_of(v) == Some(ObjectKind::Namespace));
    let started = Instant::now();
    let mut failed = 0usize;
    for wave in [namespaces, rest] {
        let results: Vec<bool> = futures::stream::iter(wave.into_iter().map(|v| {
            let client = client.clone();
            let params = params.clone();
            async move {
                let Some(kind) = kind_of(v) else {
                    return false;
                };
                let ar = api_resource(kind);
                let api: Api<DynamicObject> = match v["metadata"]["namespace"].as_str() {
                    Some(ns) => Api::namespaced_with(client, ns, &ar),
                    None => Api::all_with(client, &ar),
                };
                let name = v["metadata"]["name"].as_str().unwrap_or_default();
                let patch = Patch::Apply(v);
                with_retries(|| api.patch(name, &params, &patch))
                    .await
                    .is_ok()
            }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
        failed += results.iter().filter(|ok| !**ok).count();
    }
    println!(
        "{}",
        serde_json::json!({
            "objects": items.len(),
            "seconds": started.elapsed().as_secs_f64(),
            "failed": failed,
        })
    );
    Ok(())
}
