//! The write fence: whether this process may write to the cluster now. A replica that leads
//! (or holds its shard member Lease) opens the fence for two thirds of a lease duration from
//! the moment it *sent* each renewal that succeeded, on its monotonic clock; nothing else
//! opens it. A fenced client (`super::connect_fenced`) refuses every write request (POST,
//! PUT, PATCH, DELETE; server-side dry-runs excepted) while the fence is closed, before
//! anything is sent, so a replica that was paused past its lease, or whose renewals stall,
//! writes nothing however far its pass had got. Leases themselves are written through an
//! unfenced client.
//!
//! The fence is checked twice: by `FenceLayer` before a write is handed to the HTTP client,
//! and by `FencedConnector`'s connections as a request's first bytes are written to the
//! socket. The second catches a write handed over just before the process was paused: the
//! connection's own task may run before anything wakes the request, and would otherwise
//! send it once the process resumes, past its lease.

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
        // A connection's refusal is an I/O error carrying `FenceClosed`.
        let carried = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .is_some_and(|inner| inner.is::<FenceClosed>());
        if e.is::<FenceClosed>() || carried {
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

/// Whether `bytes`, written at the start of an HTTP/1 request, begin a write: a request line
/// of POST, PUT, PATCH or DELETE without `dryRun=`.
fn begins_a_write(bytes: &[u8]) -> bool {
    let writing = [&b"POST "[..], b"PUT ", b"PATCH ", b"DELETE "]
        .iter()
        .any(|m| bytes.starts_with(m));
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    writing && !line.windows(7).any(|w| w == b"dryRun=")
}

/// A connector whose connections refuse to put a write's request line on the wire while
/// the fence is closed (see the module's comment).
#[derive(Debug, Clone)]
pub struct FencedConnector<C> {
    inner: C,
    fence: WriteFence,
}

impl<C> FencedConnector<C> {
    pub fn new(inner: C, fence: WriteFence) -> FencedConnector<C> {
        FencedConnector { inner, fence }
    }
}

impl<C> tower_service::Service<http::Uri> for FencedConnector<C>
where
    C: tower_service::Service<http::Uri>,
    C::Future: Send + 'static,
{
    type Response = FencedIo<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let fence = self.fence.clone();
        Box::pin(async move {
            Ok(FencedIo {
                inner: connecting.await?,
                fence,
            })
        })
    }
}

/// One connection of a `FencedConnector`.
#[derive(Debug)]
pub struct FencedIo<T> {
    inner: T,
    fence: WriteFence,
}

impl<T> FencedIo<T> {
    fn refuses(&self, first: &[u8]) -> bool {
        !self.fence.is_open() && begins_a_write(first)
    }
}

fn refused() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, FenceClosed)
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for FencedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for FencedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.refuses(buf) {
            return Poll::Ready(Err(refused()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty()).map(|b| &b[..]);
        if first.is_some_and(|b| self.refuses(b)) {
            return Poll::Ready(Err(refused()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for FencedIo<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected()
    }
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
    fn a_connection_refuses_a_write_request_line_while_closed() {
        assert!(begins_a_write(
            b"PATCH /api/v1/namespaces/a?fieldManager=envctl HTTP/1.1\r\nhost: x\r\n"
        ));
        assert!(begins_a_write(b"DELETE /api/v1/namespaces/a HTTP/1.1\r\n"));
        assert!(!begins_a_write(b"GET /api/v1/namespaces HTTP/1.1\r\n"));
        assert!(!begins_a_write(
            b"PATCH /api/v1/namespaces/a?dryRun=All HTTP/1.1\r\n"
        ));
        assert!(!begins_a_write(b"{\"kind\":\"Namespace\"}"));
    }

    /// A write handed to a connection while the fence was open, and written after it closed
    /// (the process was paused in between), never reaches the server; a read still does.
    #[tokio::test]
    async fn a_write_written_after_the_fence_closed_is_refused_at_the_socket() {
        use hyper::rt::Write as _;
        let fence = WriteFence::new_closed();
        let (near, mut far) = tokio::io::duplex(4096);
        let mut io = FencedIo {
            inner: hyper_util::rt::TokioIo::new(near),
            fence: fence.clone(),
        };
        let write = b"PATCH /api/v1/namespaces/a HTTP/1.1\r\n\r\n";
        let sent = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, write)).await;
        let err = sent.expect_err("refused");
        assert!(
            err.get_ref().is_some_and(|e| e.is::<FenceClosed>()),
            "{err}"
        );
        let read = b"GET /api/v1/namespaces HTTP/1.1\r\n\r\n";
        let sent = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, read)).await;
        assert_eq!(sent.expect("a read passes"), read.len());
        fence.open_until(Instant::now() + Duration::from_secs(60));
        let sent = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, write)).await;
        assert_eq!(sent.expect("open: sent"), write.len());
        let mut got = vec![0u8; read.len() + write.len()];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got)
            .await
            .unwrap();
        assert!(
            got.starts_with(b"GET "),
            "only the read and the later write arrived"
        );
    }

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
