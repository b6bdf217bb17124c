//! The Lease tasks' own thread: however long a pass keeps the controller's runtime busy
//! (rendering and planning a large fleet is CPU work), renewals are sent on time.

use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use super::leader::LeaseError;
use super::options::LeaseConnect;
use crate::vocab::error_chain;

/// Runs a Lease task (`task`, given a client of its own) on a thread and a runtime of its
/// own. Ends when `stop` turns true; its result, if it ends for good, is what the returned
/// receiver gets.
pub fn on_lease_thread<F, Fut>(
    connect: LeaseConnect,
    mut stop: watch::Receiver<bool>,
    task: F,
) -> tokio::sync::oneshot::Receiver<LeaseError>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = LeaseError>,
{
    let (done, result) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("envctl-lease".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "starting the Lease thread's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let client = loop {
                    match crate::cluster::connect_as(connect.kubeconfig.as_deref(), Some(&connect.agent)).await {
                        Ok(c) => break c,
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "connecting the Lease client; retrying in a second");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = stop.wait_for(|s| *s) => return,
                            }
                        }
                    }
                };
                tokio::select! {
                    e = task(client) => { let _ = done.send(e); }
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting the Lease thread");
    }
    result
}
