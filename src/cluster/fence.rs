//! The write fence: whether this process may write to the cluster now. A replica that leads
//! (or holds its shard member Lease) opens the fence for two thirds of a lease duration from
//! the moment it *sent* each renewal that succeeded, on its monotonic clock; nothing else
//! opens it. A fenced client (`super::connect_fenced`) refuses every write request (POST,
//! PUT, PATCH, DELETE; server-side dry-runs excepted) while the fence is closed, before
//! anything is sent, so a replica that was paused past its lease, or whose renewals stall,
//! writes nothing however far its pass had got. Leases themselves are written through an
//! unfenced client.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Method, Request};
use tokio::time::Instant;

/// A shared fence. Clones share one state.
#[derive(Debug, Clone)]
pub struct WriteFence(Arc<State>);

#[derive(Debug)]
struct State {
    /// Never closes: a process that holds no lease (one `envctl run` without leader
    /// election or sharding).
    always: bool,
    until: Mutex<Option<Instant>>,
    /// Wakes `closed()` when the fence is closed before its time.
    closing: tokio::sync::Notify,
}

impl WriteFence {
    /// A fence that is never closed.
    pub fn always_open() -> WriteFence {
        WriteFence(Arc::new(State {
            always: true,
            until: Mutex::new(None),
            closing: tokio::sync::Notify::new(),
        }))
    }

    /// A fence closed until a renewal opens it.
    pub fn new_closed() -> WriteFence {
        WriteFence(Arc::new(State {
            always: false,
            until: Mutex::new(None),
            closing: tokio::sync::Notify::new(),
        }))
    }

    /// Opens the fence until `until` (a later time than it had; an earlier one is ignored).
    pub fn open_until(&self, until: Instant) {
        let mut current = self.0.until.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_none_or(|c| c < until) {
            *current = Some(until);
        }
    }

    /// Closes it at once (the lease was lost or given up).
    pub fn close(&self) {
        *self.0.until.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0.closing.notify_waiters();
    }

    /// Resolves when the fence closes (at once if it is closed; never for an always-open one).
    pub async fn wait_closed(&self) {
        if self.0.always {
            return std::future::pending().await;
        }
        loop {
            let closing = self.0.closing.notified();
            match self.closes_at() {
                Some(t) if Instant::now() < t => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = closing => {}
                    }
                }
                _ => return,
            }
        }
    }

    /// When it closes, if it is open (`None` for an always-open fence, or a closed one).
    pub fn closes_at(&self) -> Option<Instant> {
        if self.0.always {
            return None;
        }
        *self.0.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a write may be sent now.
    pub fn is_open(&self) -> bool {
        self.0.always || self.closes_at().is_some_and(|t| Instant::now() < t)
    }
}

/// The error a fenced client gives for a write it refused to send.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused to send a write: this replica's lease is not current (it was lost, or not renewed within two thirds of its duration)"
)]
pub struct FenceClosed;

/// Whether `err` is a write the fence refused.
pub fn is_fenced(err: &kube::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<FenceClosed>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether a request writes: a dry-run asks the server to write nothing.
fn writes<B>(req: &Request<B>) -> bool {
    let dry_run = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("dryRun=")));
    matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) && !dry_run
}

/// The tower layer that puts a fence in front of a client's requests.
#[derive(Debug, Clone)]
pub struct FenceLayer(pub WriteFence);

impl<S> tower_layer::Layer<S> for FenceLayer {
    type Service = Fenced<S>;
    fn layer(&self, inner: S) -> Fenced<S> {
        Fenced {
            inner,
            fence: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fenced<S> {
    inner: S,
    fence: WriteFence,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower_service::Service<Request<B>> for Fenced<S>
where
    S: tower_service::Service<Request<B>>,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let write = writes(&req);
        if write && !self.fence.is_open() {
            return Box::pin(std::future::ready(Err(Box::new(FenceClosed) as BoxError)));
        }
        let mut sent = Box::pin(self.inner.call(req));
        if !write {
            return Box::pin(async move { sent.await.map_err(Into::into) });
        }
        // A write waits for a connection, or its turn on one, inside the client: judged again
        // each time it is woken, and dropped (never sent, if it was still queued) once the
        // fence has closed, as when the process was paused in between.
        let fence = self.fence.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            if !fence.is_open() {
                return Poll::Ready(Err(Box::new(FenceClosed) as BoxError));
            }
            sent.as_mut().poll(cx).map_err(Into::into)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_writes_are_fenced_and_dry_runs_pass() {
        let req = |m: Method, uri: &str| Request::builder().method(m).uri(uri).body(()).unwrap();
        assert!(!writes(&req(Method::GET, "/api/v1/namespaces")));
        assert!(writes(&req(
            Method::PATCH,
            "/api/v1/namespaces/a?fieldManager=envctl"
        )));
        assert!(writes(&req(Method::DELETE, "/api/v1/namespaces/a")));
        assert!(writes(&req(Method::POST, "/api/v1/namespaces")));
        assert!(!writes(&req(
            Method::PATCH,
            "/api/v1/namespaces/a?dryRun=All&fieldManager=envctl"
        )));
    }

    #[test]
    fn the_fence_is_open_only_until_its_time_and_only_moves_forward() {
        let fence = WriteFence::new_closed();
        assert!(!fence.is_open());
        let now = Instant::now();
        fence.open_until(now + Duration::from_secs(3600));
        fence.open_until(now + Duration::from_secs(60)); // an older renewal's answer
        assert_eq!(fence.closes_at(), Some(now + Duration::from_secs(3600)));
        assert!(fence.is_open());
        let past = WriteFence::new_closed();
        past.open_until(now - Duration::from_millis(1));
        assert!(!past.is_open(), "closed once its time is up");
        fence.close();
        assert!(!fence.is_open(), "closed at once when the lease is lost");
        assert!(WriteFence::always_open().is_open());
    }
}
