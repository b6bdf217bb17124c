//! The controller's HTTP listener: `/healthz`, `/readyz`, `/metrics`, HTTP-01 answers, and
//! the Git webhook `POST /hooks/git`, authenticated by an HMAC-SHA256 signature of the body in
//! GitHub's `X-Hub-Signature-256: sha256=<hex>` form (a standby relays it to the leader).
//! Serves; decides nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::sync::Notify;

use crate::status::Metrics;

/// What the handlers share with the controller loop.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Set once the first pass finished (and, with leader election, while leading or standing by).
    pub ready: AtomicBool,
    pub webhook_secret: Option<Vec<u8>>,
    /// Wakes the loop for an immediate poll.
    pub poke: Arc<Notify>,
    /// HTTP-01 answers, read from the cluster (every replica answers); `None` without
    /// certificates.
    pub challenges: Option<Arc<crate::certs::challenges::Challenges>>,
    /// Whether this replica leads (always true without leader election).
    pub leading: tokio::sync::watch::Receiver<bool>,
    /// With leader election: how a standby hands a webhook call to the leader; with
    /// sharding: how a call reaches every replica.
    pub relay: Option<super::relay::Relay>,
    /// `--shard`: every call is relayed (every replica polls for its own environments).
    pub sharded: bool,
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`.
pub fn verify_signature(secret: &[u8], body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    if hex.len() != 64 {
        return false;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        match u8::from_str_radix(&hex[2 * i..2 * i + 2], 16) {
            Ok(v) => *b = v,
            Err(_) => return false,
        }
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &bytes).is_ok()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first reconcile has not finished\n",
        )
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

async fn hook(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let Some(secret) = &shared.webhook_secret else {
        return (
            StatusCode::NOT_FOUND,
            "the webhook is disabled (no --webhook-secret-file)\n",
        );
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !verify_signature(secret, &body, signature) {
        tracing::warn!("rejected a webhook call with a missing or bad signature");
        return (
            StatusCode::UNAUTHORIZED,
            "bad or missing X-Hub-Signature-256\n",
        );
    }
    match &shared.relay {
        Some(relay) if shared.sharded || !*shared.leading.borrow() => match relay.forward().await {
            Ok(()) if shared.sharded => (StatusCode::ACCEPTED, "poll relayed to every replica\n"),
            Ok(()) => (StatusCode::ACCEPTED, "poll relayed to the leader\n"),
            Err(e) => {
                tracing::warn!(error = %crate::vocab::error_chain(&e), "relaying a webhook call");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this replica stands by and could not relay the call to the leader\n",
                )
            }
        },
        _ => {
            shared.poke.notify_one();
            (StatusCode::ACCEPTED, "poll scheduled\n")
        }
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/hooks/git", post(hook))
        .with_state(shared.clone());
    match &shared.challenges {
        Some(c) => router.merge(crate::certs::challenges::challenge_router(c.clone())),
        None => router,
    }
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, router(shared)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        // GitHub's documented example: secret "It's a Secret to Everybody", body "Hello, World!".
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify_signature(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some(sig)
        ));
        assert!(!verify_signature(
            b"It's a Secret to Everybody",
            b"Hello, World?",
            Some(sig)
        ));
        assert!(!verify_signature(b"other", b"Hello, World!", Some(sig)));
        assert!(!verify_signature(b"x", b"y", None));
        assert!(!verify_signature(b"x", b"y", Some("sha1=00")));
    }
}
